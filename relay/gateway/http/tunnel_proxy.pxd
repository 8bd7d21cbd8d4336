# The HTTP tunnels' resolver, compiled from tunnel_proxy.py (see docs/DESIGN.md): it runs
# once per proxied request, so HttpTunnels is an extension type whose caches are typed
# dicts and whose resolver reads the request head's fields directly.
from relay.gateway.http.proxy cimport RequestHead

cdef class HttpTunnels:
    cdef public object _gateway, _connections
    cdef public dict _stats, _sessions, _routes, _parts, _answers
    cdef public object _sessions_version, _domain
