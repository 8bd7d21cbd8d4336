from relay.aio.stream cimport MuxStream, StreamSplice
from relay.binding cimport StreamEventRouter

cdef class MuxSession(StreamEventRouter):
    cdef public object _loop, _on_stream, _on_control, _transport, _writelines, _flush_handle, _timer
    cdef public object _incoming, _incoming_waiter, _controls, _control_waiter, _ping_waiters
    cdef public object _hello, _closed, _tasks, _error, goaway_received
    cdef public dict _handled
    cdef public double _timer_when
    cdef public set _flushing, _blocked_readers
    cdef public list _pending_splices
    cdef public bint _write_paused, _reading_paused, _draining
    cdef object __weakref__
    cpdef _schedule_flush(self)
    cpdef _acknowledge(self, stream_id, n)
    cpdef _write_pending_splices(self)
    cpdef _handle_events(self, list events)
