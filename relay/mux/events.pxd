# The events as extension types (Cython dataclasses): readonly fields keep them frozen
# for Python code, while compiled code (data_received) fills them directly.

cdef class Event:
    pass

cdef class HelloReceived(Event):
    cdef readonly object version, settings, info

cdef class StreamOpened(Event):
    cdef readonly object stream_id, metadata

cdef class StreamAccepted(Event):
    cdef readonly object stream_id

cdef class DataReceived(Event):
    cdef readonly object stream_id, data, flow_controlled_length, end_stream

cdef class StreamEnded(Event):
    cdef readonly object stream_id

cdef class StreamReset(Event):
    cdef readonly object stream_id, error_code, message, remote

cdef class ControlReceived(Event):
    cdef readonly object message

cdef class PingAcknowledged(Event):
    cdef readonly object ping_id, rtt

cdef class GoAwayReceived(Event):
    cdef readonly object last_stream_id, error_code, message

cdef class ConnectionTerminated(Event):
    cdef readonly object error_code, message, extra
