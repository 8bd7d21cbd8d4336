from relay.mux.flow cimport ReceiveWindow
from relay.mux.stream cimport Stream

cdef class MuxConnection:
    cdef public object _control, _decoder, _deferred, _events, _fair_until
    cdef public object _goaway_received, _goaway_sent, _half_closed, _last_peer_stream
    cdef public object _last_received, _local_stream_count, _next_stream_id, _peer_initial_window
    cdef public object _peer_max_control, _peer_max_metadata, _peer_max_streams
    cdef public object _peer_stream_count, _ping_counter, _ping_sent, _ready, _receiving, _receiving_refresh
    cdef public object _streams, _terminated, _writable
    cdef public object client, config, now, peer_info, peer_settings, rtt, version
    cdef public long long _control_size, _session_send_credit, _granted_growth, _tuned_window, _fair, _peer_max_frame
    cdef public ReceiveWindow _session_recv
