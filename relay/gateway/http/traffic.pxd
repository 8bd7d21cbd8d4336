# The traffic accounting of the gateway's HTTP proxies, compiled from traffic.py (see
# docs/DESIGN.md): Traffic.record runs once per proxied request, so Destination and
# Traffic are extension types and record reads and adds to their fields as C fields.
# Byte counters are Py_ssize_t (64-bit), the latency sum a double; what a Python
# caller reads (requests by class, buckets, the recent rows) stays a Python object.

cdef class Destination:
    cdef public object kind, team_id, name, requests, buckets
    cdef public Py_ssize_t bytes_in, bytes_out
    cdef public double duration_sum
    cdef public bint live

cdef class Traffic:
    cdef public object _clock, counters
    cdef public dict destinations, _recent
