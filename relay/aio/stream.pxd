from relay.aio.session cimport MuxSession
from relay.mux.connection cimport MuxConnection

cdef class MuxStream:
    cdef public MuxSession _session
    cdef public MuxConnection _conn
    cdef public object _loop, stream_id, metadata
    cdef public object _buffer, _exc, _pending, _read_waiter, _write_waiter, _answer_waiter, _closed_waiter, _sink
    cdef public bint local, _answered, _accepted, _remote_ended, _eof_requested, _local_ended, _closing, _finished
    cdef public Py_ssize_t _buffered, _limit
    cdef public long long bytes_sent, bytes_received
    cdef object __weakref__
    cpdef bint _send(self, data) except -1
    cpdef bint writable(self) except -1
    cpdef _on_data(self, data, n)
    cpdef _on_writable(self)

cdef class StreamSplice:
    cdef public MuxStream stream
    cdef public MuxSession _session
    cdef public object _stream_id, transport, _closed
    cdef public list _out
    cdef public Py_ssize_t _held, _out_n, receive_buffer
    cdef public bint _write_paused, _reading_paused, _local_eof, _mux_eof_seen, unsent_limited
    cdef object __weakref__
    cpdef _mux_data(self, data, Py_ssize_t n)
    cpdef _write_out(self)
    cpdef _pause_if_blocked(self)
    cpdef bint _try_resume_reading(self) except -1
