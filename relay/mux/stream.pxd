from relay.mux.flow cimport ReceiveWindow

cdef class Stream:
    cdef public long long stream_id, send_credit, queued, unacked
    cdef public object state, chunks
    cdef public bint local, answered, fin_pending, fin_sent, in_ready, blocked, reading_stopped
    cdef public ReceiveWindow recv
    cpdef transition(self, event)
