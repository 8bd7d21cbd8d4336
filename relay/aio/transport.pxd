cdef class WebSocketTransport:
    cdef public object _ws, session, _parser, _transport, _unanswered_ping
    cdef public bint _client, _close_sent, _write_paused
    cdef object __weakref__
