"""A streaming HTTP/1.1 reverse proxy: client connections to targets behind mux streams.

The engine owns one client connection at a time (:class:`ProxyConnection`, an asyncio
Protocol plus one task). It parses requests with h11 (server role) and asks a *resolver*
where each one goes: an :class:`Upstream` (how to open a mux stream to the target, the
request-target to send, extra headers, live stats), a :class:`ProxyError` (answered as
``{"error": {"code", "message"}}``), or None ("not mine": the connection is handed back
to the gateway's HTTP server, head and unread bytes included). It speaks HTTP/1.1 to the
target with h11 (client role) over the stream; the agent at the other end only splices
bytes, so it needs no HTTP knowledge.

* Keep-alive both ways: one stream per client connection, reused for the next request
  while the target keeps its connection open and the next request goes to the same
  place (a stale reused stream is retried once for a request without a body).
* Streaming both ways, never a whole body in memory: client reading is paused while
  h11 holds unprocessed input, the request body goes out with ``stream.drain()``, and
  the response is read from the stream only as fast as the client transport takes it
  (the stream window is granted as we read). Each response chunk is written at once,
  so Server-Sent Events and other streamed responses pass through as they arrive.
* WebSocket (any ``Upgrade``): the handshake is forwarded; after the target's ``101``
  the client transport and the stream are spliced byte for byte
  (:class:`~relay.aio.StreamSplice`).
* Headers: hop-by-hop ones (RFC 9110 §7.6.1: ``Connection`` and what it lists,
  ``Keep-Alive``, ``Proxy-*``, ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``)
  are dropped both ways, except ``Upgrade``/``Connection: upgrade`` of a handshake;
  ``X-Forwarded-For`` (appended), ``-Proto`` and ``-Host`` are set; ``Host`` is kept,
  so apps that compare ``Origin`` with ``Host`` (Jupyter, ComfyUI) accept WebSockets.

Failures before the response started are answered by the gateway: 502 when the agent or
the tunnel fails to reach the target (stream refused, reset, garbage), or whatever the
resolver raises (503 for no online agent). After the response started, the client
connection is aborted, so a truncated body is never mistaken for a complete one.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import weakref
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Optional, Union

import h11

from relay.aio import SessionClosedError, StreamRefused, StreamSplice
from relay.aio.stream import MuxStream
from relay.mux.errors import ErrorCode

__all__ = ["ProxyConnection", "ProxyError", "ProxyStats", "Resolver", "Upstream", "refusal_error",
           "serve_connection", "upstream_request_headers", "downstream_response_headers"]

log = logging.getLogger("relay.gateway.proxy")

#: Largest request/response head h11 buffers (as the gateway's own server).
MAX_HEAD = 64 * 1024
#: Client input h11 may hold unprocessed before reading from the client is paused.
CLIENT_BUFFER = 256 * 1024
#: Bytes taken from the stream per read (each read grants that much window back).
UPSTREAM_READ = 256 * 1024
#: A client connection idle between requests for this long is closed.
IDLE_TIMEOUT = 60.0
#: A request body left unread by an error response is read and dropped up to this size
#: to keep the connection; larger ones close it.
DISCARD_LIMIT = 64 * 1024
#: When the target answered before the whole request body was sent, the rest of the
#: body gets this long to go out before the connection is given up.
BODY_GRACE = 2.0

_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                         b"transfer-encoding", b"upgrade"})
# Set by the proxy itself: the client's values are dropped (X-Forwarded-For is appended to).
_SET_BY_PROXY = frozenset({b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-prefix",
                           b"expect"})

Headers = list[tuple[bytes, bytes]]


class ProxyError(Exception):
    """A failure the gateway answers itself: ``status`` with the JSON error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class ProxyStats:
    """Live counters of one proxied destination (e.g. one tunnel session)."""

    requests: int = 0
    active_requests: int = 0
    websockets: int = 0
    active_websockets: int = 0
    bytes_in: int = 0  # request bodies, client -> target
    bytes_out: int = 0  # response bodies, target -> client
    errors: int = 0  # requests the gateway answered 5xx itself, or aborted
    last_error: Optional[str] = None
    #: Client connections that used this destination and are still open (to close them
    #: when the destination goes away).
    clients: "weakref.WeakSet[ProxyConnection]" = field(default_factory=weakref.WeakSet)

    def as_dict(self) -> dict[str, Any]:
        """The counters as JSON-ready values."""
        return {"requests": self.requests, "active_requests": self.active_requests,
                "websockets": self.websockets, "active_websockets": self.active_websockets,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "errors": self.errors, "last_error": self.last_error,
                "client_connections": len(self.clients)}

    def fail(self, message: str) -> None:
        self.errors += 1
        self.last_error = message


@dataclass
class Upstream:
    """Where one request goes, as the resolver decided.

    ``open_stream`` opens a new mux stream to the target (raise :class:`ProxyError` if it
    cannot, e.g. 503 when no agent is online); requests whose ``key`` is equal may share
    a stream, one after the other. ``target`` is the request-target sent upstream
    (path + query). ``headers`` are added to the forwarded request; ``host`` is the
    ``Host`` sent when the client gave none; ``host_override`` replaces the client's
    (an external target behind a virtual host). ``drop_headers`` (lower-case names) are
    not forwarded (e.g. the gateway credential in ``Authorization``). ``open_stream`` may
    be a coroutine function (e.g. to wait for the agent's accept and try another agent).
    """

    open_stream: Callable[[], Union[MuxStream, Awaitable[MuxStream]]]
    key: Hashable
    target: bytes
    headers: Headers = field(default_factory=list)
    host: bytes = b"localhost"
    stats: ProxyStats = field(default_factory=ProxyStats)
    host_override: Optional[bytes] = None
    drop_headers: frozenset = frozenset()


#: Decides where a request goes: an Upstream, None (not ours: hand the connection back),
#: or raises ProxyError. May be a coroutine function.
Resolver = Callable[[h11.Request], Union[Optional[Upstream], Awaitable[Optional[Upstream]]]]


class _StaleStream(Exception):
    """A reused stream turned out closed before any response byte: retry on a new one."""


# ----------------------------------------------------------------------------- headers


def _connection_tokens(headers: Any) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def _is_hop_by_hop(name: bytes, listed: set[bytes]) -> bool:
    return name in _HOP_BY_HOP or name.startswith(b"proxy-") or name in listed


def upstream_request_headers(request: h11.Request, *, client_ip: bytes, scheme: bytes,
                             upgrade: Optional[bytes], chunked: bool, upstream: Upstream) -> Headers:
    """The headers forwarded to the target: hop-by-hop dropped, ``X-Forwarded-*`` set,
    the upgrade re-declared for a handshake, framing re-declared for a chunked body."""
    listed = _connection_tokens(request.headers)
    out: Headers = []
    forwarded_for: Optional[bytes] = None
    host: Optional[bytes] = None
    for raw_name, value in request.headers.raw_items():  # the client's spelling, kept
        name = raw_name.lower()
        if _is_hop_by_hop(name, listed) or name in _SET_BY_PROXY or name in upstream.drop_headers:
            continue
        if name == b"x-forwarded-for":
            forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
            continue
        if name == b"content-length" and chunked:
            continue
        if name == b"host":
            if upstream.host_override is not None:
                continue
            host = value
        out.append((raw_name, value))
    if host is None:
        host = upstream.host_override or upstream.host
        out.append((b"host", host))
    out.append((b"x-forwarded-for", client_ip if forwarded_for is None
                else forwarded_for + b", " + client_ip))
    out.append((b"x-forwarded-proto", scheme))
    out.append((b"x-forwarded-host", host))
    if chunked:
        out.append((b"transfer-encoding", b"chunked"))
    if upgrade is not None:
        out.append((b"connection", b"upgrade"))
        out.append((b"upgrade", upgrade))
    out.extend(upstream.headers)
    return out


def downstream_response_headers(response: Union[h11.Response, h11.InformationalResponse],
                                upgrade: bool = False) -> Headers:
    """The target's response headers for the client: hop-by-hop dropped (h11 frames the
    body itself); for a ``101`` the upgrade is re-declared."""
    listed = _connection_tokens(response.headers)
    out: Headers = [(n, v) for n, v in response.headers.raw_items()  # the target's spelling
                    if not _is_hop_by_hop(n.lower(), listed)]
    if upgrade:
        out.append((b"connection", b"upgrade"))
        out.extend((n, v) for n, v in response.headers if n == b"upgrade")
    return out


_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _resolver_values_clean(upstream: Upstream) -> bool:
    """True when what the resolver adds to a request (headers, Host, target) is bytes
    that cannot break the request head (no control characters, token header names)."""
    if not isinstance(upstream.target, bytes) or _CTL.search(upstream.target) or b" " in upstream.target:
        return False
    for value in (upstream.host, upstream.host_override):
        if value is not None and (not isinstance(value, bytes) or _CTL.search(value)):
            return False
    for name, value in upstream.headers:
        if (not isinstance(name, bytes) or not isinstance(value, bytes) or not _TOKEN.fullmatch(name)
                or _CTL.search(value)):
            return False
    return True


def _upgrade_of(request: h11.Request) -> Optional[bytes]:
    """The protocol a request asks to upgrade to (``Connection: upgrade`` + ``Upgrade``)."""
    if b"upgrade" not in _connection_tokens(request.headers):
        return None
    for name, value in request.headers:
        if name == b"upgrade":
            return value
    return None


def _body_framing(request: h11.Request) -> tuple[bool, bool]:
    """``(has_body, chunked)`` of a request, from its headers (h11 validated them)."""
    chunked = False
    length = 0
    for name, value in request.headers:
        if name == b"transfer-encoding":
            chunked = True
        elif name == b"content-length":
            length = int(value)
    return chunked or length > 0, chunked


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def refusal_error(exc: BaseException) -> ProxyError:
    """The 502 for a stream the agent refused or the tunnel lost before the response."""
    if isinstance(exc, StreamRefused):
        try:
            name = ErrorCode(exc.error_code).name
        except ValueError:
            name = str(exc.error_code)
        return ProxyError(502, "target_unreachable",
                          f"the agent could not reach the target ({name}): {exc.message}")
    if isinstance(exc, h11.RemoteProtocolError):
        return ProxyError(502, "bad_upstream_response", f"the target sent invalid HTTP: {exc}")
    return ProxyError(502, "tunnel_error", f"the tunnel to the target failed: {exc}")


# ----------------------------------------------------------------------------- connection


def serve_connection(transport: asyncio.Transport, initial: bytes, resolve: Resolver, *,
                     fallback: Optional[Callable[[], asyncio.Protocol]] = None,
                     connections: Optional[set] = None) -> "ProxyConnection":
    """Start proxying the client connection ``transport`` (taken over from the HTTP
    server, paused), whose first unparsed bytes are ``initial``.

    ``fallback`` builds the protocol a request the resolver declines is handed to (the
    gateway's HTTP server); without one such requests get 404. ``connections``: a set
    the connection stays in while open (the gateway closes its members at shutdown).
    """
    conn = ProxyConnection(resolve, fallback=fallback, connections=connections)
    transport.set_protocol(conn)
    conn.connection_made(transport)
    if initial:
        conn.data_received(initial)
    if not conn._reading_paused:
        transport.resume_reading()  # the HTTP server paused it when it handed over
    return conn


class ProxyConnection(asyncio.Protocol):
    """One client connection served by the proxy (see the module docstring)."""

    def __init__(self, resolve: Resolver, *, fallback: Optional[Callable[[], asyncio.Protocol]] = None,
                 connections: Optional[set] = None) -> None:
        self._resolve = resolve
        self._fallback = fallback
        self._connections = connections
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.transport: Optional[asyncio.Transport] = None
        self._unprocessed = 0  # bytes fed to h11 since it last asked for more
        self._reading_paused = False
        self._data_waiter: Optional[asyncio.Future] = None
        self._write_paused = False
        self._drain_waiter: Optional[asyncio.Future] = None
        self._lost = False
        self._detached = False  # handed back, or spliced after an upgrade
        self._handed_back = False  # the connection is the HTTP server's again
        self._task: Optional[asyncio.Task] = None
        self._client_ip = b"unknown"
        self._scheme = b"http"
        # The stream to the target, reused across requests (see _upstream_for).
        self._stream: Optional[MuxStream] = None
        self._stream_key: Hashable = None
        self._upstream: Optional[h11.Connection] = None
        self._joined: Optional[ProxyStats] = None  # the stats whose clients we were last added to

    # -- asyncio.Protocol (client side)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self._client_ip = str(peer[0]).encode()
        if transport.get_extra_info("ssl_object") is not None:
            self._scheme = b"https"
        if self._connections is not None:
            self._connections.add(self)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def data_received(self, data: bytes) -> None:
        self._h11.receive_data(data)
        self._unprocessed += len(data)
        if self._unprocessed > CLIENT_BUFFER and not self._reading_paused:
            self._reading_paused = True  # h11 holds enough: let TCP push back
            self.transport.pause_reading()
        _wake(self._data_waiter)

    def eof_received(self) -> bool:
        self._h11.receive_data(b"")
        _wake(self._data_waiter)
        return True  # keep our side open: a response may still be going out

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._lost = True
        _wake(self._data_waiter)
        _wake(self._drain_waiter)
        if self._connections is not None:
            self._connections.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()  # its cleanup aborts the stream to the target

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        _wake(self._drain_waiter)

    def close(self) -> None:
        """Close the client connection (the gateway shutting down, a tunnel closed)."""
        if self.transport is not None and not self._handed_back:
            self.transport.close()

    def abort(self) -> None:
        """Abort the client connection and whatever it is relaying."""
        if self.transport is not None and not self._handed_back:
            self.transport.abort()

    # -- client I/O helpers

    async def _client_event(self, idle: bool = False) -> Any:
        """The next h11 event from the client, reading more as needed. ``idle``: between
        requests, where a silent client is dropped after IDLE_TIMEOUT."""
        while True:
            event = self._h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self._unprocessed = 0
            if self._reading_paused:
                self._reading_paused = False
                self.transport.resume_reading()
            if self._lost:
                raise ConnectionResetError("client connection lost")
            loop = asyncio.get_running_loop()
            waiter = self._data_waiter = loop.create_future()
            # A plain timer rather than asyncio.timeout(): no context manager and no task
            # cancellation bookkeeping once per request on a keep-alive connection.
            timer = loop.call_later(IDLE_TIMEOUT, _time_out, waiter) if idle else None
            try:
                await waiter
            finally:
                self._data_waiter = None
                if timer is not None:
                    timer.cancel()

    def _send(self, event: Any) -> None:
        """Write one h11 event to the client."""
        data = self._h11.send(event)
        if data and not self._lost:
            self.transport.write(data)

    def _write(self, chunks: list[bytes]) -> None:
        """Write serialised h11 events to the client in one go."""
        if not self._lost:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if data:
                self.transport.write(data)

    async def _drain(self) -> None:
        """Wait while the client transport's write buffer is over its high-water mark."""
        while self._write_paused and not self._lost:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        if self._lost:
            raise ConnectionResetError("client connection lost")

    # -- the request loop

    async def _run(self) -> None:
        try:
            while True:
                event = await self._client_event(idle=True)
                if not isinstance(event, h11.Request):
                    break  # ConnectionClosed (or PAUSED: nothing more we can parse)
                if not await self._dispatch(event):
                    return
                if self._h11.our_state is not h11.DONE or self._h11.their_state is not h11.DONE:
                    break
                self._h11.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                status = exc.error_status_hint
                self._reply_error(ProxyError(status, "bad_request", f"malformed HTTP request: {exc}"),
                                  close=True)
        except (ConnectionError, TimeoutError, h11.LocalProtocolError):
            pass
        except asyncio.CancelledError:
            pass  # the client went away
        except Exception:
            log.exception("proxy connection failed")
            if not self._lost:
                self.transport.abort()
        finally:
            self._drop_stream(abort=self._upstream is None or self._upstream.our_state is not h11.IDLE)
            if not self._detached:
                if self._connections is not None:
                    self._connections.discard(self)
                if not self._lost:
                    self.transport.close()

    async def _dispatch(self, request: h11.Request) -> bool:
        """Serve one request; False when the connection left this proxy (handed back or
        upgraded) or must close."""
        if request.method == b"CONNECT":
            self._reply_error(ProxyError(405, "method_not_allowed", "CONNECT is not proxied"), close=True)
            return False
        try:
            upstream = self._resolve(request)
            if inspect.isawaitable(upstream):
                upstream = await upstream
        except ProxyError as exc:
            return await self._refuse(exc)
        if upstream is None:
            if self._fallback is None:
                return await self._refuse(ProxyError(404, "not_found", "no such endpoint"))
            return self._hand_back(request)
        if self._joined is not upstream.stats:  # WeakSet.add makes a weakref every call
            upstream.stats.clients.add(self)
            self._joined = upstream.stats
        upstream.stats.requests += 1
        upstream.stats.active_requests += 1
        try:
            return await self._proxy(request, upstream)
        except ProxyError as exc:
            upstream.stats.fail(exc.message)
            return await self._refuse(exc)
        finally:
            upstream.stats.active_requests -= 1

    async def _refuse(self, exc: ProxyError) -> bool:
        """Answer a gateway-level error; keep the connection if the request body (if
        any) is small enough to read and drop."""
        if self._h11.their_state is h11.SEND_BODY:
            keep = await self._discard_body()
        else:
            keep = self._h11.their_state is h11.DONE
        self._reply_error(exc, close=not keep)
        return keep

    async def _discard_body(self) -> bool:
        dropped = 0
        while True:
            event = await self._client_event()
            if isinstance(event, h11.Data):
                dropped += len(event.data)
                if dropped > DISCARD_LIMIT:
                    return False
            elif isinstance(event, h11.EndOfMessage):
                return True
            else:
                return False

    def _reply_error(self, exc: ProxyError, close: bool = False) -> None:
        body = _error_body(exc.code, exc.message)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        try:
            self._send(h11.Response(status_code=exc.status, headers=headers, reason=_reason(exc.status)))
            if self._h11.our_state is h11.SEND_BODY:
                try:
                    self._send(h11.Data(data=body))
                except h11.LocalProtocolError:
                    pass  # a HEAD request: no body
            self._send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self.abort()

    def _hand_back(self, request: h11.Request) -> bool:
        """Give the connection to the gateway's HTTP server, starting with this request."""
        from relay.gateway.server import serialize_head  # here: server imports the gateway

        pending, closed = self._h11.trailing_data
        self._detached = self._handed_back = True
        self._drop_stream()
        if self._connections is not None:
            self._connections.discard(self)
        protocol = self._fallback()
        transport = self.transport
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        transport.resume_reading()
        protocol.data_received(serialize_head(request) + pending)
        if closed:
            protocol.eof_received()
        return False

    # -- one exchange with the target

    async def _proxy(self, request: h11.Request, upstream: Upstream) -> bool:
        has_body, chunked = _body_framing(request)
        upgrade = _upgrade_of(request)
        headers = upstream_request_headers(request, client_ip=self._client_ip, scheme=self._scheme,
                                           upgrade=upgrade, chunked=chunked, upstream=upstream)
        # The client's headers passed h11's parser; only what the resolver adds is checked
        # here, so h11 can skip validating every header again (_parsed).
        head = h11.Request(method=request.method, target=upstream.target, headers=headers,
                           _parsed=_resolver_values_clean(upstream))
        if not has_body:
            event = await self._client_event()  # the EndOfMessage of a body-less request
            if not isinstance(event, h11.EndOfMessage):
                raise ProxyError(400, "bad_request", "unexpected request framing")
        reused = self._stream is not None and self._stream_key == upstream.key
        try:
            return await self._exchange(head, upstream, has_body, upgrade is not None)
        except _StaleStream:
            if has_body or not reused:
                raise ProxyError(502, "tunnel_error", "the target closed the connection") from None
            self._drop_stream(abort=True)
            try:
                return await self._exchange(head, upstream, has_body, upgrade is not None)
            except _StaleStream:
                raise ProxyError(502, "tunnel_error", "the target closed the connection") from None

    async def _upstream_for(self, upstream: Upstream) -> tuple[MuxStream, h11.Connection, bool]:
        """The stream for this request: the previous one if it can carry another request
        to the same place, else a new one. Returns ``(stream, h11 client, reused)``."""
        stream = self._stream
        if stream is not None:
            uh11 = self._upstream
            if (self._stream_key == upstream.key and uh11 is not None and uh11.our_state is h11.IDLE
                    and stream.exception is None and not stream.at_eof()):
                return stream, uh11, True
            self._drop_stream(abort=uh11 is None or uh11.our_state is not h11.IDLE)
        stream = upstream.open_stream()
        if inspect.isawaitable(stream):
            stream = await stream
        self._stream, self._stream_key = stream, upstream.key
        self._upstream = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        return stream, self._upstream, False

    def _drop_stream(self, abort: bool = False) -> None:
        stream, self._stream, self._upstream = self._stream, None, None
        if stream is not None:
            if abort:
                stream.abort(ErrorCode.CANCEL, "client request ended")
            else:
                stream.close()

    async def _exchange(self, head: h11.Request, upstream: Upstream, has_body: bool,
                        upgrade: bool) -> bool:
        """Send one request on a stream and relay the response; True to keep going."""
        stream, uh11, reused = await self._upstream_for(upstream)
        stats = upstream.stats
        pump: Optional[asyncio.Task] = None
        started = False
        try:
            stream.write(uh11.send(head))
            if has_body:
                if self._h11.client_is_waiting_for_100_continue:
                    self._send(h11.InformationalResponse(status_code=100, headers=[]))
                pump = asyncio.get_running_loop().create_task(self._pump_body(stream, uh11, stats))
                pump.add_done_callback(_retrieve)
            else:
                stream.write(uh11.send(h11.EndOfMessage()))
            # What the client gets is gathered in ``out`` and written once per read from
            # the stream (head and a small body in one write); the client's backpressure
            # is honoured before each further read.
            out: list[bytes] = []
            send = self._h11.send
            while True:
                event = uh11.next_event()
                if event is h11.NEED_DATA:
                    if out:
                        self._write(out)
                        out = []
                        await self._drain()
                    uh11.receive_data(await stream.read(UPSTREAM_READ))
                    continue
                if isinstance(event, h11.Data):
                    stats.bytes_out += len(event.data)
                    out.append(send(event))
                elif isinstance(event, h11.Response):
                    started = True
                    # _parsed: the headers come from h11's parser (already validated).
                    out.append(send(h11.Response(status_code=event.status_code,
                                                 reason=event.reason or _reason(event.status_code),
                                                 headers=downstream_response_headers(event),
                                                 _parsed=True)))
                elif isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101 and upgrade:
                        return await self._switch(stream, uh11, event, stats)
                    continue  # 100 Continue and friends: we sent our own
                elif isinstance(event, h11.EndOfMessage):
                    out.append(send(h11.EndOfMessage()))  # the target's trailers are not passed on
                    self._write(out)
                    break
                else:  # ConnectionClosed before the response ended
                    raise ConnectionResetError("the target closed the connection mid-response")
        except (ConnectionError, h11.RemoteProtocolError, SessionClosedError) as exc:
            if pump is not None:
                pump.cancel()
            if started or self._lost:
                stats.fail(f"response aborted: {exc}")
                self._drop_stream(abort=True)
                self.abort()  # a cut body must not look complete to the client
                return False
            self._drop_stream(abort=True)
            if reused and not isinstance(exc, StreamRefused):
                raise _StaleStream() from None  # closed by the target while idle
            raise refusal_error(exc) from None
        except BaseException:
            if pump is not None:
                pump.cancel()
            raise
        if pump is not None and not pump.done():
            # The target answered before the whole body went out: give it a moment.
            await asyncio.wait({pump}, timeout=BODY_GRACE)
            if not pump.done():
                pump.cancel()
        if pump is not None and (pump.cancelled() or pump.exception() is not None):
            self._drop_stream(abort=True)
            return False
        if uh11.our_state is h11.DONE and uh11.their_state is h11.DONE:
            uh11.start_next_cycle()  # the stream can carry the next request
        else:
            self._drop_stream(abort=True)
        return True

    async def _pump_body(self, stream: MuxStream, uh11: h11.Connection, stats: ProxyStats) -> None:
        """Request body, client -> target, at the pace the stream accepts it."""
        try:
            while True:
                event = await self._client_event()
                if isinstance(event, h11.Data):
                    stats.bytes_in += len(event.data)
                    stream.write(uh11.send(h11.Data(data=event.data)))
                    await stream.drain()
                elif isinstance(event, h11.EndOfMessage):
                    stream.write(uh11.send(h11.EndOfMessage()))
                    return
                else:
                    raise ConnectionResetError("client connection ended mid-body")
        except (ConnectionError, h11.ProtocolError, RuntimeError) as exc:
            # Nothing sensible can follow a broken body: the target must not take it
            # as complete, and the response side learns of it through the reset.
            stream.abort(ErrorCode.CANCEL, f"request body failed: {exc}")
            raise

    async def _switch(self, stream: MuxStream, uh11: h11.Connection,
                      response: h11.InformationalResponse, stats: ProxyStats) -> bool:
        """The target accepted an upgrade: forward its 101, then splice raw bytes."""
        self._send(h11.InformationalResponse(status_code=101, reason=response.reason,
                                             headers=downstream_response_headers(response, upgrade=True)))
        target_pending, _ = uh11.trailing_data
        client_pending, client_closed = self._h11.trailing_data
        self._detached = True
        self._stream = self._upstream = None  # the splice owns the stream now
        transport = self.transport
        if target_pending:
            transport.write(target_pending)
        if client_pending:
            stream.write(client_pending)
        splice = StreamSplice(stream)
        transport.set_protocol(splice)
        splice.connection_made(transport)
        if client_closed:
            splice.eof_received()
        else:
            transport.resume_reading()
        stats.websockets += 1
        stats.active_websockets += 1
        try:
            await splice.wait_closed()
        finally:
            stats.active_websockets -= 1
            if self._connections is not None:
                self._connections.discard(self)
        return False


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _retrieve(task: asyncio.Task) -> None:
    """Mark a helper task's exception as seen (its effect is handled elsewhere)."""
    if not task.cancelled():
        task.exception()


def _time_out(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("client idle"))


def _wake(waiter: Optional[asyncio.Future]) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
