from relay.mux.flow cimport ReceiveWindow
from relay.mux.stream cimport Stream

cdef class MuxConnection:
    # Containers typed so that get/append/pop on them are C calls, not method lookups.
    cdef public dict _streams, _half_closed, _ping_sent
    cdef public list _control, _deferred, _events, _writable
    cdef public object _decoder
    # C doubles: compared and advanced on every acknowledgement.
    cdef public double _fair_until, _receiving_refresh
    cdef public object _goaway_received, _goaway_sent, _last_peer_stream
    cdef public object _last_received, _local_stream_count, _next_stream_id, _peer_initial_window
    cdef public object _peer_max_control, _peer_max_metadata, _peer_max_streams
    cdef public object _peer_stream_count, _ping_counter, _ready, _receiving, _spare
    cdef public object _terminated
    cdef public object client, config, now, peer_info, peer_settings, rtt, version
    cdef public long long _control_size, _session_send_credit, _granted_growth, _tuned_window, _fair, _peer_max_frame, _reserved
    cdef public ReceiveWindow _session_recv
    # cpdef: the binding (relay/aio, relay/binding.py) holds a typed MuxConnection and
    # calls these per message; C calls skip the method lookup and argument tuple.
    cpdef bint writable(self, stream_id) except -1
    cpdef send_window(self, stream_id)
    cpdef bint send_blocked(self, stream_id) except -1
    cpdef queued_bytes(self, stream_id)
    cpdef send_data(self, stream_id, data, end_stream=*)
    # Typed amounts and clocks: window accounting runs on every message received.
    cpdef acknowledge_received_data(self, stream_id, long long n)
    cpdef long long _consumed_tuned(self, ReceiveWindow recv, long long n, double now, double rtt) except? -1
    cpdef bint _session_consumed(self, long long n) except -1
    cpdef _announce_session(self)
    cpdef list data_to_send_parts(self, max_bytes=*)
    cpdef _schedule_data(self, list out, size, max_bytes)
    cpdef list writable_streams(self)
    cpdef list receive_data(self, data, now=*)
    cpdef _on_data(self, flags, stream_id, payload)
    cpdef next_deadline(self)
    cpdef _queue_control(self, frame, defer=*)
