cdef class WebSocketTransport:
    cdef public object _ws, session, _parser, _transport
    cdef public bint _client, _close_sent
    cdef object __weakref__
