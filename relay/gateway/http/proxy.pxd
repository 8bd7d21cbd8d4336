# The per-request objects of the HTTP proxy engine as extension types (see proxy.py
# and docs/DESIGN.md): typed fields and typed references between them, so the steady
# keep-alive path reads and writes struct fields instead of instance dictionaries, and
# the methods only the engine itself calls are C calls. Flags are bint, counters and
# offsets Py_ssize_t; whatever may hold None or any Python value stays object. Methods
# that asyncio, uvloop, httptools, relay.aio or a timer call stay Python methods.

from relay.aio.session cimport MuxSession
from relay.aio.stream cimport MuxStream

cdef class ProxyConnection

# Client events (see _process), compared as C integers.
cdef Py_ssize_t _HEAD, _BODY, _END, _EOF, _ERR

# Dataclasses in both builds: Cython makes extension types of them, with these fields.
cdef class ProxyStats:
    cdef public Py_ssize_t requests, active_requests, websockets, active_websockets
    cdef public Py_ssize_t bytes_in, bytes_out, errors
    cdef public object last_error, clients, observer, inspect

cdef class Upstream:
    cdef public object open_stream, key, target, headers, host, host_override, drop_headers, prefix
    cdef public ProxyStats stats

cdef class RequestHead:
    cdef public object method, target, http_version, raw_headers

cdef class Local:
    cdef public object respond
    cdef public Py_ssize_t limit

cdef class _Exchange:
    cdef public RequestHead head
    cdef public Upstream upstream
    cdef public ProxyStats stats
    cdef public object upgrade, sent, grace
    cdef public bint has_body, chunked, is_head, started, response_done, request_done
    cdef public bint keep_target, reused, retried
    cdef public Py_ssize_t status, nin, nout, cap
    cdef public object req_body, resp_head, resp_body
    cdef public double t0

# Called once per finished exchange: a C function reading the exchange's fields.
cdef _observe(_Exchange exchange, double now)

cdef class _StreamSide:
    cdef public ProxyConnection conn
    cdef public object stream, key, parser, _in, failed, _buf, _carry, _reason, _block
    cdef public MuxSession session  # None for a _PolledSide
    cdef public object stream_id
    cdef public Py_ssize_t _in_n, _pos, _head_at, _status, _upgrade_offset
    cdef public bint eof, used, _in_head, _mid, _informational, _rechunk, _until_eof, _complete

    cdef _bind(self)
    cdef write(self, data)
    cdef ack(self, Py_ssize_t n)
    cdef bint send_blocked(self)
    cdef wait_send(self)
    cdef bint can_splice(self)
    cdef carry(self, data)
    cdef detach(self)

cdef class _PolledSide(_StreamSide):
    cdef public object _drain_task, _task
    cdef public Py_ssize_t _unsent

    cdef _bind(self)
    cdef write(self, data)
    cdef write(self, data)
    cdef ack(self, Py_ssize_t n)
    cdef bint send_blocked(self)
    cdef wait_send(self)
    cdef bint can_splice(self)
    cdef detach(self)

cdef class ProxyConnection:
    cdef object __weakref__  # ProxyStats.clients is a WeakSet
    cdef public object _resolve, _fallback, _connections, _parser, transport, _loop
    cdef public object _client_ip, _scheme, _events, _url, _hdrs, _raw, _chunk
    cdef public object _drain_waiter, _upgrade_pending, _busy, _discard, _out
    cdef public object _head_cache, _plain_head, _fwd_cache, _clean_target, _joined, _idle_timer, _patience
    cdef public object _local, _local_body
    cdef public Py_ssize_t _local_size
    cdef public bint _answering
    cdef public RequestHead _req
    cdef public _Exchange _exchange
    cdef public _StreamSide _side, _held_side
    cdef public double _idle_since
    cdef public Py_ssize_t _queued, _head_bytes, _framing_bytes, _head_size, _raw_base, _read_base
    cdef public Py_ssize_t _begun, _resolved, _held, _discarded, _upstream_batches
    cdef public bint _in_head, _too_large, _h_chunked, _h_body, _h_expect, _raw_exact, _in_message
    cdef public bint _fresh_read, _paused_stream, _paused_queue, _transport_paused, _write_paused
    cdef public bint _client_eof, _lost, _closing, _detached, _handed_back
    cdef public bint _req_keep_alive, _req_http11, _expect_continue, _req_chunked, _req_has_body
    cdef public bint _req_done, _close_after

    cdef _parse_failed(self, exc)
    cdef _process(self)
    cdef _start_request(self, RequestHead head, bint keep_alive, bint chunked, bint has_body, bint expect)
    cdef _slow(self, coro)
    cdef _resolved_one(self)
    cdef _dispatch(self, RequestHead head, Upstream upstream)
    cdef _send_request(self, _Exchange exchange)
    cdef _write_head(self, _Exchange exchange, _StreamSide side)
    cdef _forward_head(self, RequestHead head, Upstream upstream, _Exchange exchange)
    cdef _header_lines(self, RequestHead head, Upstream upstream, _Exchange exchange)
    cdef _request_body(self, body)
    cdef _request_end(self)
    cdef _local_start(self, Local local)
    cdef _local_end(self)
    cdef _local_answer(self, answer)
    cdef _client_gone(self)
    cdef _client_error(self, exc)
    cdef _update_queue_pause(self)
    cdef _set_reading(self)
    cdef bint _try_resume_for_stream(self, _StreamSide side)
    cdef _upstream_data(self, _StreamSide side, data, Py_ssize_t n)
    cdef _flush(self, _StreamSide side, Py_ssize_t n)
    cdef _release_held(self)
    cdef _response_head(self, _StreamSide side, Py_ssize_t status, head)
    cdef _response_complete(self, _Exchange exchange, _StreamSide side)
    cdef _finish_exchange(self, _Exchange exchange)
    cdef _end_exchange(self, _Exchange exchange, bint keep_stream)
    cdef _maybe_next(self)
    cdef _upstream_eof(self, _StreamSide side)
    cdef _upstream_failed(self, _StreamSide side, exc)
    cdef _exchange_failed(self, _Exchange exchange, exc)
    cdef _refuse(self, exc, bint close=*)
    cdef _reply_error(self, exc, bint close=*)
    cdef _hand_back(self, RequestHead head)
    cdef _switch(self, _StreamSide side, _Exchange exchange, target_pending, Py_ssize_t n)
    cdef _drop_stream(self, bint abort=*)
