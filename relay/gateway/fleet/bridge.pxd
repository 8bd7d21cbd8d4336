from relay.aio.session cimport MuxSession
from relay.aio.stream cimport MuxStream

# A join carries every byte of a relay connect stream and of a forwarded one: compiled,
# its per-chunk calls (from the session, from the splice) are C calls, not Python frames.
cdef class StreamTransport:
    cdef public MuxStream stream
    cdef public MuxSession _session
    cdef public object _protocol, _counter, _queue
    cdef public list _out
    cdef public Py_ssize_t _out_n
    cdef public bint _paused, _eof_queued, _write_paused, _closing, _lost
    cdef object __weakref__
    cpdef _mux_data(self, data, Py_ssize_t n)
    cpdef _write_out(self)
    cpdef _deliver(self, chunk)
