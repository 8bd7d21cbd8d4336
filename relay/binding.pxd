from relay.mux.connection cimport MuxConnection

cdef class StreamEventRouter:
    cdef public MuxConnection _conn
    cdef public dict _streams
    cpdef list _route_stream_events(self, list events)
