"""Sans-IO stream multiplexer: bytes in, events out; commands in, bytes out.

It never touches sockets, event loops or clocks: the caller passes the time in. See
docs/PROTOCOL.md for the wire format and :class:`MuxConnection` for the API.
"""
