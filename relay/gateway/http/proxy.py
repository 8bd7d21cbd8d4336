"""A streaming HTTP/1.1 reverse proxy: client connections to targets behind mux streams.

The engine owns one client connection at a time (:class:`ProxyConnection`, an asyncio
Protocol). It parses requests with httptools (llhttp, the C parser uvicorn uses) and asks
a *resolver* where each one goes: an :class:`Upstream` (how to open a mux stream to the
target, the request-target to send, extra headers, live stats), a :class:`ProxyError`
(answered as ``{"error": {"code", "message"}}``), or None ("not mine": the connection is
handed back to the gateway's HTTP server, head and unread bytes included). Responses are
parsed with httptools too; the agent at the other end only splices bytes, so it needs no
HTTP knowledge.

The steady keep-alive path is callback-driven, with no task, future or ``await`` per
request: client bytes arrive in ``data_received``, the parser's callbacks queue the
request's head, body pieces and end, and they are handled at once: the forwarded head is
built with one bytes join and written to the mux stream together with the body. Response
bytes come from the stream through the same Protocol-level interface
:class:`~relay.aio.StreamSplice` uses (the stream's *sink*): the session hands over what a
batch of frames carried, the response parser turns it into a rewritten head and body
pieces, and they go to the client with one ``transport.write`` per batch. Tasks are used
only on slow paths: a resolver or ``open_stream`` that is a coroutine function.

* Keep-alive both ways: one stream per client connection, reused for the next request
  while the target keeps its connection open and the next request goes to the same
  place (a stale reused stream is retried once for a request without a body).
  Pipelined requests wait in order until the previous exchange is over.
* Streaming both ways, never a whole body in memory: request body pieces go to the
  stream as they are parsed, and reading from the client is paused while the stream has
  no room (send queue full or send window exhausted) or while parsed input waits (over
  ``CLIENT_BUFFER``); response data is acknowledged to the stream (granting window) only
  once written to a client transport that is not paused, so a client that stops reading
  stops the target after one window. Each response piece is written as it arrives, so
  Server-Sent Events and other streamed responses pass through as they arrive.
* Framing: a ``Content-Length`` body passes through as is; a chunked or
  close-delimited body is re-chunked for an HTTP/1.1 client (sent raw, then the
  connection closed, for HTTP/1.0); ``Expect: 100-continue`` is answered by the proxy.
* WebSocket (any ``Upgrade``): the handshake is forwarded; after the target's ``101``
  the client transport and the stream are spliced byte for byte
  (:class:`~relay.aio.StreamSplice`).
* Headers: hop-by-hop ones (RFC 9110 §7.6.1: ``Connection`` and what it lists,
  ``Keep-Alive``, ``Proxy-*``, ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``)
  are dropped both ways, except ``Upgrade``/``Connection: upgrade`` of a handshake;
  ``X-Forwarded-For`` (appended), ``-Proto`` and ``-Host`` are set; ``Host`` is kept,
  so apps that compare ``Origin`` with ``Host`` (Jupyter, ComfyUI) accept WebSockets.
* Paths: with an :attr:`Upstream.prefix` (a path-prefixed tunnel), the response's
  ``Location``, ``Content-Location`` and ``Set-Cookie`` paths are moved under the prefix
  (:func:`rewrite_paths`), as nginx's ``proxy_redirect`` and ``proxy_cookie_path`` do.

Failures before the response started are answered by the gateway: 502 when the agent or
the tunnel fails to reach the target (stream refused, reset, garbage), or whatever the
resolver raises (503 for no online agent). After the response started, the client
connection is aborted, so a truncated body is never mistaken for a complete one. A
connection idle between requests for ``IDLE_TIMEOUT`` is closed.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from http import HTTPStatus
from time import monotonic as _monotonic  # exchange durations (the observers' seconds)
from types import CoroutineType
from typing import TYPE_CHECKING, Any, Optional, Union, cast

import httptools

if TYPE_CHECKING:  # mypy checks the pure-Python twin: cython's no-op declarations
    from relay.mux import _cython_shim as cython
else:
    try:
        import cython
    except ImportError:  # the pure-Python engine runs without Cython installed
        from relay.mux import _cython_shim as cython

from relay.aio import SessionClosedError, StreamRefused, StreamSplice
from relay.aio.stream import MuxStream
from relay.mux.errors import ErrorCode

__all__ = ["Local", "ProxyConnection", "ProxyError", "ProxyStats", "RequestHead", "Resolver", "Upstream",
           "origin_form", "refusal_error", "rewrite_paths", "serve_connection"]

log = logging.getLogger("relay.gateway.proxy")

#: Largest request head (request line + headers) accepted; larger ones get 431.
MAX_HEAD = 64 * 1024
#: Bytes taken from a non-mux upstream stream per read.
UPSTREAM_READ = 256 * 1024
#: Parsed client input that may wait (pipelined, or behind a slow resolver) before
#: reading from the client is paused.
CLIENT_BUFFER = 256 * 1024
#: A client connection idle between requests for this long is closed.
IDLE_TIMEOUT = 60.0
#: A request body left unread by an error response is read and dropped up to this size
#: to keep the connection; larger ones close it.
DISCARD_LIMIT = 64 * 1024
#: After the client's EOF, an answer still awaited or in progress is given up once the
#: target has sent nothing for this long. A half-closed client may still be reading, but
#: one that closed for good would never read it, and only bytes written to it could tell
#: the two apart; without this a hung target would hold the stream, the agent's
#: connection and its own for ever. (nginx gives up at the client's EOF at once.)
EOF_PATIENCE = 3.0
#: When the target answered before the whole request body was sent, the rest of the
#: body gets this long to go out before the connection is given up.
BODY_GRACE = 2.0

_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                         b"transfer-encoding", b"upgrade"})
# Set by the proxy itself: the client's values are dropped (X-Forwarded-For is appended to).
_SET_BY_PROXY = frozenset({b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-prefix",
                           b"expect"})
# Request headers the forwarded head leaves out or rebuilds (checked with one set lookup).
_REQUEST_SPECIAL = _HOP_BY_HOP | _SET_BY_PROXY | {b"x-forwarded-for", b"host", b"content-length"}

Headers = list[tuple[bytes, bytes]]
_FRAMING = frozenset({b"transfer-encoding", b"content-length", b"expect"})
_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}

# Client events, queued by the parser callbacks and handled in order.
_HEAD, _BODY, _END, _EOF, _ERR = 0, 1, 2, 3, 4


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
    #: Called once per finished exchange (answered, refused by the gateway, aborted or
    #: upgraded), with ``(method, target, status, bytes_in, bytes_out, seconds)``: the
    #: request-target as sent to the target, the status the client got (0 if none was
    #: sent: the connection was cut), body bytes each way, and the time from the request
    #: head to the end. For access logs and metrics (relay.gateway.http.traffic); must not raise.
    observer: Optional[Callable[[bytes, bytes, int, int, int, float], None]] = None
    #: A request inspector (relay.gateway.web.inspector) or None: with one, every exchange
    #: keeps its request head, the response head the client got and the first
    #: ``inspect.cap`` bytes of each body, and hands them to ``inspect.add`` at its end.
    inspect: Any = None

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
    (an external target behind a virtual host). ``prefix``: see the field. ``drop_headers`` (lower-case names) are
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
    #: The public path prefix the target is served under (``/tunnel/TOKEN``), or None.
    #: With one, a response's ``Location`` and ``Set-Cookie`` paths are moved under it
    #: (:func:`rewrite_paths`), as nginx's ``proxy_redirect`` and ``proxy_cookie_path``
    #: do, so an app that redirects to ``/login`` stays inside its tunnel.
    prefix: Optional[bytes] = None


class RequestHead:
    """The head of one client request, as the parser gave it (what a resolver sees).

    ``method`` and ``target`` are bytes as sent; ``raw_headers`` keeps the client's
    spelling and order as ``(name, lower-case name, value)``; :attr:`headers` is the
    ``(lower-case name, value)`` view.
    """

    __slots__ = ("method", "target", "http_version", "raw_headers")

    def __init__(self, method: bytes, target: bytes, http_version: bytes,
                 raw_headers: list[tuple[bytes, bytes, bytes]]) -> None:
        self.method = method
        self.target = target
        self.http_version = http_version
        self.raw_headers = raw_headers

    @property
    def headers(self) -> Headers:
        """``(lower-case name, value)`` pairs, in order."""
        return [(lname, value) for _, lname, value in self.raw_headers]

    def __repr__(self) -> str:
        return f"<RequestHead {self.method!r} {self.target!r}>"


#: What a local answer is: ``(status, headers, body)``, the headers ``(name, value)``
#: bytes pairs without framing (the engine adds Content-Length and, when the
#: connection ends, Connection: close).
LocalAnswer = tuple[int, list[tuple[bytes, bytes]], bytes]


class Local:
    """A request the gateway answers itself once its whole body is in (invoke): a
    resolver's answer instead of an :class:`Upstream`. ``respond(head, body)`` gives a
    :data:`LocalAnswer` or an awaitable of one (client input waits meanwhile, as on any
    slow path); a body over ``limit`` bytes is answered 413 and the connection closed.
    ``respond`` turns its own failures into answers (an exception is a 500)."""

    __slots__ = ("respond", "limit")

    def __init__(self, respond: Callable[[RequestHead, bytes], Union[LocalAnswer, Awaitable[LocalAnswer]]],
                 limit: int) -> None:
        self.respond = respond
        self.limit = limit


#: What a resolver answers: where the request goes (None: not ours; a Local: answered by
#: the gateway), or, on a slow path, an awaitable of that. Decides where a request goes;
#: may raise ProxyError.
MaybeUpstream = Union[Optional[Upstream], Local, Awaitable[Optional[Upstream]], Awaitable[Local]]
Resolver = Callable[[RequestHead], MaybeUpstream]


def origin_form(target: bytes) -> bytes:
    """A request-target as the path and query it names: an absolute-form target
    (``http://host/path?q``, which RFC 9112 §3.2.2 says a server must accept) becomes
    ``/path?q`` (``/`` for an empty path); any other form is returned as it is.

    Every resolver routes on this, like the gateway's router (which routes on the
    parsed URL's path): a resolver that compared the raw target would decline what the
    router gave it, and the connection would go back and forth between them."""
    if target[:1] == b"/" or not target[:8].lower().startswith((b"http://", b"https://")):
        return target
    start = target.find(b"//") + 2
    end = len(target)
    for sep in (b"/", b"?", b"#"):
        found = target.find(sep, start)
        if 0 <= found < end:
            end = found
    rest = target[end:]
    return rest if rest[:1] == b"/" else b"/" + rest


# ----------------------------------------------------------------------------- helpers

_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


# Resolver additions (headers, Host) already found clean: they are the same for every
# request to one destination, so each combination is checked once (bounded).
_CLEAN: set[tuple] = set()


def _resolver_values_clean(upstream: Upstream) -> bool:
    """True when what the resolver adds to a request (headers, Host, target) is bytes
    that cannot break the request head (no control characters, token header names)."""
    target = upstream.target
    if type(target) is not bytes or _CTL.search(target) or b" " in target:
        return False
    try:
        key = (tuple(upstream.headers), upstream.host, upstream.host_override)
    except TypeError:
        return False
    if key in _CLEAN:
        return True
    if not _additions_clean(upstream):
        return False
    if len(_CLEAN) >= 1024:
        _CLEAN.clear()
    _CLEAN.add(key)
    return True


def _additions_clean(upstream: Upstream) -> bool:
    for value in (upstream.host, upstream.host_override):
        if value is not None and (not isinstance(value, bytes) or _CTL.search(value)):
            return False
    for name, value in upstream.headers:
        if (not isinstance(name, bytes) or not isinstance(value, bytes) or not _TOKEN.fullmatch(name)
                or _CTL.search(value)):
            return False
    return True


def _tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",")}


def _is_hop_by_hop(lname: bytes, listed: set[bytes]) -> bool:
    return lname in _HOP_BY_HOP or lname.startswith(b"proxy-") or lname in listed


# A hop-by-hop header line of a response head (after its CRLF); names are matched whole.
_HOP_BY_HOP_LINE = re.compile(
    rb"\r\n(?:connection|keep-alive|proxy-[^:\r\n]*|te|trailer|transfer-encoding|upgrade)[ \t]*:[^\r\n]*",
    re.IGNORECASE)
_CONNECTION_VALUES = re.compile(rb"\r\nconnection[ \t]*:([^\r\n]*)")  # on the lower-cased block
# Connection tokens that name no header.
_CONNECTION_PLAIN = frozenset({b"close", b"keep-alive", b"upgrade", b""})


def _header_pairs(block: bytes) -> Headers:
    """``(name, value)`` pairs of header lines (each after a CRLF; folded lines joined)."""
    pairs: Headers = []
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and pairs:  # obs-fold: part of the previous value
            name, value = pairs[-1]
            pairs[-1] = (name, value + b" " + line.strip())
            continue
        name, _, value = line.partition(b":")
        pairs.append((name.strip(), value.strip()))
    return pairs


def _rewrite_response_head(status: int, reason: bytes, block: bytes, no_body: bool, close: bool,
                           http11: bool) -> tuple[bytes, bool, bool, bool]:
    """A target's response head (``block``: its header lines, each after a CRLF) as sent
    to the client: hop-by-hop headers taken out, framing re-declared for a body that is
    not ``Content-Length`` framed. Returns ``(head, rechunk, until_eof, close)``."""
    lower = block.lower()
    framing = None  # b"length" | b"chunked"
    if b"\r\ncontent-length:" in lower:
        framing = b"length"
    elif b"\r\ntransfer-encoding:" in lower:
        framing = b"chunked"
    listed: set[bytes] = set()
    if b"\r\nconnection:" in lower:
        for value in _CONNECTION_VALUES.findall(lower):
            value = value.strip()
            if value not in _CONNECTION_PLAIN:  # "keep-alive", "close": nothing listed
                listed |= _tokens(value)
        listed -= _CONNECTION_PLAIN
    if listed or b"\r\n " in block or b"\r\n\t" in block:
        # Rare: headers the target marked hop-by-hop, or folded lines. Line by line.
        kept = [b"\r\n%s: %s" % (n, v) for n, v in _header_pairs(block)
                if not _is_hop_by_hop(n.lower(), listed)]
        block = b"".join(kept)
    else:
        block = _HOP_BY_HOP_LINE.sub(b"", block)  # one pass in C
    parts = [b"HTTP/1.1 %d %s" % (status, reason), block, b"\r\n"]
    rechunk = until_eof = False
    if not no_body and framing != b"length":
        if framing is None:
            until_eof = True  # framed by the target closing the connection
        if http11:
            rechunk = True
            parts.append(b"transfer-encoding: chunked\r\n")
        else:
            close = True
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts), rechunk, until_eof, close


# A response header line that may carry a path of the target's: matched on the raw head.
_PATH_HEADER = re.compile(rb"\r\n(?:location|content-location|set-cookie)[ \t]*:", re.IGNORECASE)
_COOKIE_PATH = re.compile(rb"(;[ \t]*path[ \t]*=[ \t]*)([^;\r\n]*)", re.IGNORECASE)


def _under(prefix: bytes, path: bytes) -> bytes:
    """``path`` (root-relative) moved under ``prefix``, unless it is there already (an
    app that honours ``X-Forwarded-Prefix`` built it so)."""
    if path == prefix or path.startswith(prefix + b"/") or path.startswith(prefix + b"?"):
        return path
    return prefix + path


def _location(value: bytes, prefix: bytes, hosts: tuple, own: tuple = ()) -> bytes:
    """A ``Location``/``Content-Location`` value as the client must follow it: a
    root-relative path (``/login``) moved under ``prefix``; an absolute URL naming the
    client's ``Host`` (``hosts``) with its path moved under ``prefix``; one naming the
    target's own address (``own``: the Host the proxy sent instead of the client's),
    which the client cannot reach, made root-relative under ``prefix``; anything else (a
    relative path, another site) is left alone."""
    if value[:1] == b"/" and value[1:2] not in (b"/", b"\\"):
        return _under(prefix, value)
    lower = value[:8].lower()
    if lower.startswith((b"http://", b"https://")):
        start = value.find(b"//") + 2
        end = len(value)
        for sep in (b"/", b"?", b"#"):
            found = value.find(sep, start)
            if 0 <= found < end:
                end = found
        authority = value[start:end].lower()
        rest = value[end:]
        rest = rest if rest[:1] == b"/" else b"/" + rest
        if authority in hosts:
            return value[:end] + _under(prefix, rest)
        if authority in own:
            return _under(prefix, rest)
    return value


def rewrite_paths(head: bytes, prefix: bytes, hosts: tuple = (), own: tuple = ()) -> bytes:
    """A response head (status line and header lines, CRLF-separated) with the paths of
    the target moved under ``prefix``: ``Location`` and ``Content-Location`` (see
    :func:`_location`; ``hosts`` are the lower-case authorities the client used,
    ``own`` those of the target itself) and the ``Path`` attribute of every ``Set-Cookie`` (``Path=/`` becomes
    ``Path=PREFIX/``). Bodies are never rewritten: an app whose pages link to
    root-relative URLs needs a tunnel URL of its own (``--tunnel-domain``)."""
    lines = head.split(b"\r\n")
    for i in range(1, len(lines)):
        line = lines[i]
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        lname = name.strip().lower()
        if lname in (b"location", b"content-location"):
            stripped = value.strip()
            new = _location(stripped, prefix, hosts, own)
            if new != stripped:
                lines[i] = name + b": " + new
        elif lname == b"set-cookie":
            lines[i] = _COOKIE_PATH.sub(
                lambda m: m.group(1) + (_under(prefix, m.group(2).strip()) if m.group(2).strip()[:1] == b"/"
                                        else m.group(2)), line)
    return b"\r\n".join(lines)


def _target_hosts(exchange: "_Exchange") -> tuple:
    """``(client, own)``: the lower-case authorities an absolute URL of the target may
    use for itself, the ``Host`` the client sent (forwarded as is unless overridden) and
    the target's own (the default Host, and the override)."""
    own = [exchange.upstream.host.lower()]
    client = []
    if exchange.upstream.host_override is not None:
        own.append(exchange.upstream.host_override.lower())
    for _, lname, value in exchange.head.raw_headers:
        if lname == b"host":
            value = value.strip().lower()
            if value not in own:
                client.append(value)
    return tuple(client), tuple(own)


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


_INTERNAL_ERROR = (500, [(b"content-type", b"application/json")],
                   _error_body("internal_error", "internal server error"))


_REASONS: dict[int, bytes] = {}


class _CountBegins:
    """Parser protocol counting request starts (for :func:`_request_start`)."""

    def __init__(self) -> None:
        self.begun = 0

    def on_message_begin(self) -> None:
        self.begun += 1


def _begins(data: bytes) -> int:
    counter = _CountBegins()
    try:
        httptools.HttpRequestParser(counter).feed_data(data)
    except httptools.HttpParserError:
        pass  # an upgrade or a limit: the requests before it were counted
    return counter.begun


def _request_start(raw: bytes, index: int) -> int:
    """Offset in ``raw`` (which begins between two requests) of the first byte of request
    number ``index`` (0-based), found by parsing prefixes again (a binary search: a
    hand-back is rare, and this reuses the parser's own idea of where requests end,
    bodies included); -1 if there is no such request."""
    lo, hi = 1, len(raw)  # the shortest prefix in which request ``index`` has begun
    if index < 0 or _begins(raw) <= index:
        return -1
    while lo < hi:
        mid = (lo + hi) // 2
        if _begins(raw[:mid]) > index:
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


def _reason(status: int) -> bytes:
    reason = _REASONS.get(status)
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
        _REASONS[status] = reason
    return reason


def refusal_error(exc: BaseException) -> ProxyError:
    """The 502 for a stream the agent refused or the tunnel lost before the response."""
    if isinstance(exc, StreamRefused):
        try:
            name = ErrorCode(exc.error_code).name
        except ValueError:
            name = str(exc.error_code)
        return ProxyError(502, "target_unreachable",
                          f"the agent could not reach the target ({name}): {exc.message}")
    if isinstance(exc, httptools.HttpParserError):
        return ProxyError(502, "bad_upstream_response", f"the target sent invalid HTTP: {exc}")
    return ProxyError(502, "tunnel_error", f"the tunnel to the target failed: {exc}")


class _Unframed(Exception):
    """Response bytes that do not start where a response should."""


class _HeadDone(Exception):
    """Stops the response parser after the head of a response to HEAD (llhttp cannot be
    told that such a response has no body)."""


# ----------------------------------------------------------------------------- upstream side


class _Exchange:
    """One request in flight: what the response side needs to know about it."""

    __slots__ = ("head", "upstream", "stats", "has_body", "chunked", "upgrade", "is_head", "sent",
                 "started", "response_done", "request_done", "keep_target", "reused", "retried",
                 "grace", "status", "nin", "nout", "t0", "cap", "req_body", "resp_head", "resp_body")

    def __init__(self, head: RequestHead, upstream: Upstream, has_body: bool, chunked: bool) -> None:
        self.head = head
        self.upstream = upstream
        self.stats = upstream.stats
        self.has_body = has_body
        self.chunked = chunked
        self.upgrade: Optional[bytes] = None
        self.is_head = head.method == b"HEAD"
        self.sent = b""  # the forwarded head, kept to retry a body-less request once
        self.started = False  # the response head went to the client
        self.response_done = False
        self.request_done = False
        self.keep_target = True  # the target keeps its connection (the stream) open
        self.reused = False
        self.retried = False
        self.grace: Optional[asyncio.TimerHandle] = None
        self.status = 0  # what the client got (the target's, or the gateway's own error)
        self.nin = 0  # request body bytes sent on
        self.nout = 0  # response body bytes received
        self.t0 = 0.0  # loop time of the request head
        self.cap = 0  # body bytes kept for an inspector (0: none kept)
        self.req_body: Any = None  # bytearray while kept
        self.resp_head = b""
        self.resp_body: Any = None


@cython.locals(stats=ProxyStats)
def _observe(exchange: _Exchange, now: float) -> None:
    """Tell the destination's observer (if any) that ``exchange`` is over; its failure
    is logged, never passed on to the connection."""
    stats = exchange.stats
    observer = stats.observer
    if observer is not None:
        try:
            observer(exchange.head.method, exchange.upstream.target, exchange.status, exchange.nin,
                     exchange.nout, now - exchange.t0)
        except Exception:  # an observer's bug must not break proxying
            log.exception("proxy observer failed")
    if exchange.cap and stats.inspect is not None:
        try:
            # (the bodies as they are: the exchange is over, nothing writes to them again)
            stats.inspect.add(exchange.head, exchange.upstream.target, exchange.status, exchange.req_body,
                              exchange.nin, exchange.resp_head, exchange.resp_body, exchange.nout,
                              now - exchange.t0)
        except Exception:
            log.exception("proxy inspector failed")


class _StreamSide:
    """The sink of one stream to a target: parses responses and hands them to the
    connection. Detached (``conn`` None) when the connection drops the stream; what still
    arrives is then acknowledged and discarded."""

    def __init__(self, conn: "ProxyConnection", stream: MuxStream, key: Hashable) -> None:
        self.conn: Optional[ProxyConnection] = conn
        self.stream = stream
        self.key = key
        self.parser = httptools.HttpResponseParser(self)
        self._in: list[Any] = []
        self._in_n = 0
        self.eof = False  # the target ended its side
        self.failed: Optional[BaseException] = None
        self.used = False  # carried at least one complete response (a reuse may be stale)
        # The response being parsed. Its head is taken from the raw bytes (one regex pass
        # instead of a parser callback per header): ``_buf`` is the batch being parsed,
        # ``_pos`` where the next message starts in it (-1: not known, mid-message),
        # ``_carry`` the start of a head that began in an earlier batch.
        self._buf = b""
        self._pos = 0
        self._head_at = -1
        self._carry: Optional[bytes] = None
        self._status = 0
        self._reason = b""
        self._block = b""  # the header lines, each after a CRLF, of the last head
        self._in_head = False
        self._mid = False  # a response has begun and not ended
        self._informational = False
        self._rechunk = False
        self._until_eof = False
        self._complete = False
        self._upgrade_offset = -1
        self._bind()

    # -- how bytes come and go (a MuxStream here; see _PolledSide for anything else)

    def _bind(self) -> None:
        stream = self.stream
        self.session = stream._session
        self.stream_id = stream.stream_id
        stream._attach_sink(self)

    @cython.locals(stream=MuxStream)
    def write(self, data: Any) -> None:
        """Send ``data`` to the target (MuxStream.write, called as the C method it wraps)."""
        stream = self.stream
        stream._send(data)

    def ack(self, n: int) -> None:
        """``n`` received bytes were delivered: grant them back as window."""
        if n and self.failed is None:
            self.session._acknowledge(self.stream_id, n)

    @cython.locals(stream=MuxStream)
    def send_blocked(self) -> bool:
        """True while the stream should not be given more (queue full or no window)."""
        stream = self.stream
        return not stream.writable() or stream._conn.send_blocked(stream.stream_id)

    def wait_send(self) -> None:
        """Have :meth:`_try_resume_reading` called once the stream may take more."""
        self.session._block_reader(self)

    def can_splice(self) -> bool:
        return True

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        self._in_head = True
        self._mid = True
        self._informational = False
        self._head_at = self._pos

    @cython.locals(exchange=_Exchange, start=cython.longlong, end=cython.longlong, status=cython.longlong,
                   raw=bytes)
    def on_headers_complete(self) -> None:
        self._in_head = False
        carry = self._carry
        if carry is None:
            raw = self._buf
            start = self._head_at
        else:  # the head began in an earlier batch
            self._carry = None
            raw = carry + self._buf
            start = 0
        end = raw.find(b"\r\n\r\n", start) if start >= 0 else -1
        if end < 0 or not raw.startswith(b"HTTP/", start):
            raise _Unframed()  # a response where none was expected (the target is out of step)
        # "HTTP/1.1 200 ...": llhttp checked the shape (three digits after one space), so
        # the status is read from the bytes, not asked of the parser (a Python call).
        status = (raw[start + 9] - 48) * 100 + (raw[start + 10] - 48) * 10 + raw[start + 11] - 48
        self._status = status
        if status < 200 or status == 101:
            line_end = raw.find(b"\r\n", start)
            self._reason = raw[start + 13:line_end]  # "HTTP/1.1 101 Switching...": llhttp checked the shape
            self._block = raw[line_end:end]
            if status != 101:
                # 100 Continue and friends (we sent our own): the next message starts
                # right after this head.
                self._pos = end + 4 - (len(carry) if carry is not None else 0)
                self._informational = True
                return
        self._pos = -1  # a body follows
        conn = self.conn
        if conn is None or status == 101:
            return  # (101: the upgrade, handled once the parser stops: HttpParserUpgrade)
        conn._response_head(self, status, raw[start:end])
        exchange = conn._exchange
        if exchange is not None and exchange.is_head:
            self._complete = True
            raise _HeadDone()

    @cython.locals(exchange=_Exchange)
    def on_body(self, body: bytes) -> None:
        conn = self.conn
        if conn is not None:  # (the connection's part, inlined: this runs per body piece)
            exchange = conn._exchange
            if exchange is not None:
                exchange.stats.bytes_out += len(body)
                exchange.nout += len(body)
                if exchange.cap and len(exchange.resp_body) < exchange.cap:
                    exchange.resp_body += body[:exchange.cap - len(exchange.resp_body)]
            conn._out.append(b"%x\r\n%s\r\n" % (len(body), body) if self._rechunk else body)

    def on_message_complete(self) -> None:
        self._mid = False
        if self._informational:
            return
        self._pos = -1  # anything after this in the batch is not a response we asked for
        if self._rechunk:
            conn = self.conn
            if conn is not None:
                conn._out.append(b"0\r\n\r\n")
        self._complete = True

    # -- sink interface (called by the MuxStream and the session)

    def _mux_data(self, data: Any, n: int) -> None:
        if not self._in:
            self.session._pending_splices.append(self)
        self._in.append(data)
        self._in_n += n

    @cython.locals(n=cython.longlong)
    def _write_out(self) -> None:
        """Parse what the last batch of frames carried; the connection writes the result
        to the client once and acknowledges it."""
        chunks, n = self._in, self._in_n
        if not chunks:
            return
        self._in = []
        self._in_n = 0
        conn = self.conn
        if conn is None:
            self.ack(n)
            return
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if type(data) is not bytes:
            data = bytes(data)  # a view of the received frame: the head is searched in it
        conn._upstream_data(self, data, n)

    def carry(self, data: bytes) -> None:
        """The batch ``data`` ended inside a response head: keep the head's start for the
        next batch (bounded like a request head)."""
        if self._carry is not None:
            self._carry += data
        elif self._head_at >= 0:
            self._carry = data[self._head_at:]
        self._head_at = 0
        if self._carry is not None and len(self._carry) > MAX_HEAD:
            raise httptools.HttpParserError(f"response head over {MAX_HEAD} bytes")

    def _mux_eof(self) -> None:
        self._write_out()  # the data that came before the FIN goes first
        self.eof = True
        if self.conn is not None:
            self.conn._upstream_eof(self)

    def _mux_reset(self, exc: BaseException) -> None:
        self._in = []  # abandoned with the stream (the core credits it back)
        self._in_n = 0
        self.failed = exc
        if self.conn is not None:
            self.conn._upstream_failed(self, exc)

    def _try_resume_reading(self) -> bool:
        conn = self.conn
        if conn is None:
            return True
        return conn._try_resume_for_stream(self)

    def detach(self) -> None:
        self.conn = None
        self.session._unblock_reader(self)


class _PolledSide(_StreamSide):
    """A :class:`_StreamSide` over a stream that is not a MuxStream (a plain TCP
    connection to an external service, with ``read``/``write``/``drain``): a task reads
    it and feeds the same parser. Not the hot path."""

    def _bind(self) -> None:
        self._unsent = 0
        self._drain_task: Optional[asyncio.Task] = None
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        stream = self.stream
        try:
            while self.conn is not None:
                data = await stream.read(UPSTREAM_READ)
                if not data:
                    self._mux_eof()
                    return
                self._in.append(data)
                self._in_n += len(data)
                self._write_out()
                conn = self.conn
                while conn is not None and conn._write_paused and not conn._lost:
                    waiter = conn._drain_waiter = asyncio.get_running_loop().create_future()
                    await waiter
                    conn = self.conn
        except (ConnectionError, OSError) as exc:
            self._mux_reset(exc)

    def write(self, data: Any) -> None:
        self.stream.write(data)

    def ack(self, n: int) -> None:
        pass  # TCP has its own flow control; the pump waits while the client is paused

    def send_blocked(self) -> bool:
        return self._unsent > UPSTREAM_READ

    def wait_send(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await self.stream.drain()
        except (ConnectionError, OSError):
            pass  # the pump sees it
        self._drain_task = None
        self._unsent = 0
        self._try_resume_reading()

    def can_splice(self) -> bool:
        return False

    def detach(self) -> None:
        self.conn = None
        for task in (self._task, self._drain_task):
            if task is not None and not task.done():
                task.cancel()


def _new_side(conn: "ProxyConnection", stream: Any, key: Hashable) -> _StreamSide:
    return (_StreamSide if isinstance(stream, MuxStream) else _PolledSide)(conn, stream, key)


# ----------------------------------------------------------------------------- connection


def serve_connection(transport: asyncio.Transport, initial: bytes, resolve: Resolver, *,
                     fallback: Optional[Callable[..., asyncio.Protocol]] = None,
                     connections: Optional[set] = None) -> "ProxyConnection":
    """Start proxying the client connection ``transport`` (taken over from the HTTP
    server, paused), whose first unparsed bytes are ``initial``.

    ``fallback(declined=...)`` builds the protocol a request the resolver declines is
    handed to (the gateway's HTTP server; ``declined`` is true when that request is the
    first one, which the server's route gave us: it must not be handed over again);
    without one such requests get 404. ``connections``: a set
    the connection stays in while open (the gateway closes its members at shutdown).
    """
    conn = ProxyConnection(resolve, fallback=fallback, connections=connections)
    # Compiled, ProxyConnection is an extension type, which cannot subclass asyncio.Protocol.
    transport.set_protocol(conn)  # type: ignore[arg-type]  # a duck-typed protocol (see above)
    conn.connection_made(transport)
    if initial:
        conn.data_received(initial)
    conn._set_reading()  # the HTTP server paused reading when it handed over
    return conn


class ProxyConnection:
    """One client connection served by the proxy (see the module docstring): an asyncio
    Protocol by its methods (asyncio and uvloop only call them), not by inheritance, as
    the compiled build makes it an extension type (proxy.pxd)."""

    def __init__(self, resolve: Resolver, *, fallback: Optional[Callable[..., asyncio.Protocol]] = None,
                 connections: Optional[set] = None) -> None:
        self._resolve = resolve
        self._fallback = fallback
        self._connections = connections
        self._parser = httptools.HttpRequestParser(self)
        self.transport: Optional[asyncio.Transport] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._client_ip = b"unknown"
        self._scheme = b"http"
        # Parsed client input waiting to be handled, and its body bytes.
        self._events: deque[tuple[int, Any]] = deque()
        self._queued = 0
        # The request head being parsed.
        self._url = b""
        self._hdrs: list[tuple[bytes, bytes, bytes]] = []
        self._in_head = False
        self._head_bytes = 0  # bytes received while inside one head (a head arriving in pieces)
        self._framing_bytes = 0  # bytes read in a body that carried no body data
        self._head_size = 0  # the parsed head's size (a head arriving at once)
        self._too_large = False
        self._h_chunked = self._h_body = self._h_expect = False  # framing seen in this head
        # Raw client bytes from the start of the oldest request not yet resolved, for a
        # hand-back (see _hand_back); None while every parsed request is resolved.
        self._raw: Optional[list[bytes]] = None
        self._chunk = b""
        # Where requests start in self._raw, for a hand-back: known only when its first
        # read began between two requests (``_raw_exact``); then the requests that began
        # in it are numbered from ``_raw_base`` + 1 (as ``_begun`` counts them).
        self._raw_exact = False
        self._raw_base = 0
        self._in_message = False  # the parser is inside a request (begun, not complete)
        self._fresh_read = False  # this read began between two requests
        self._read_base = 0  # requests begun before this read
        self._begun = 0
        self._resolved = 0
        # Reading pauses: the stream has no room / parsed input waits.
        self._paused_stream = False
        self._paused_queue = False
        self._transport_paused = True  # the HTTP server hands the transport over paused
        self._write_paused = False
        self._held = 0  # response bytes written to the paused client, not acknowledged
        self._held_side: Optional[_StreamSide] = None
        self._drain_waiter: Optional[asyncio.Future] = None  # a _PolledSide waiting for resume_writing
        self._client_eof = False
        self._upgrade_pending: Optional[bytearray] = None  # client bytes after an upgrade request
        self._lost = False
        self._closing = False
        self._detached = False  # handed back, or spliced after an upgrade
        self._handed_back = False  # the connection is the HTTP server's again
        self._busy: Optional[asyncio.Future] = None  # a slow path (resolver, open_stream, a Local)
        # A request answered by the gateway (a Local): its body so far, while it is read.
        self._local: Optional[Local] = None
        self._local_body: Optional[list[bytes]] = None
        self._local_size = 0
        self._answering = False  # a Local's answer is being computed
        # The current request: its client-side state and the exchange with the target.
        self._req: Optional[RequestHead] = None
        self._req_keep_alive = True
        self._req_http11 = True
        self._expect_continue = False
        self._req_chunked = False
        self._req_has_body = False
        self._req_done = False
        self._discard: Optional[ProxyError] = None  # refusing: the body is read and dropped
        self._discarded = 0
        self._exchange: Optional[_Exchange] = None
        self._side: Optional[_StreamSide] = None  # the stream to the target, reused
        self._out: list[bytes] = []  # response bytes for the client, written once per batch
        self._close_after = False  # the response to the client is framed by closing
        self._head_cache: Optional[tuple] = None  # the last response head rewritten (see _response_head)
        self._plain_head: Optional[bytes] = None  # the last response head with no path to move (ditto)
        self._fwd_cache: Optional[tuple] = None  # the last request header lines built (see _forward_head)
        self._clean_target: Optional[bytes] = None  # the last upstream request-target found clean
        self._joined: Optional[ProxyStats] = None  # the stats whose clients we were last added to
        self._idle_since = 0.0
        self._idle_timer: Optional[asyncio.TimerHandle] = None
        self._patience: Optional[asyncio.TimerHandle] = None  # see EOF_PATIENCE
        self._upstream_batches = 0  # batches of target bytes handled: progress, for EOF_PATIENCE

    # -- asyncio.Protocol (client side)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP (or TLS) connection's transport: asyncio types the argument for every kind.
        self.transport = cast(asyncio.Transport, transport)
        loop = self._loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self._client_ip = str(peer[0]).encode()
        if transport.get_extra_info("ssl_object") is not None:
            self._scheme = b"https"
        if self._connections is not None:
            self._connections.add(self)
        self._idle_since = loop.time()
        self._idle_timer = loop.call_later(IDLE_TIMEOUT, self._check_idle)

    @cython.locals(begun=cython.longlong, events=cython.longlong)
    def data_received(self, data: bytes) -> None:
        if self._detached or self._closing:
            return
        pending = self._upgrade_pending
        if pending is not None:  # after an upgrade request: held for the splice
            pending += data
            self._update_queue_pause()
            return
        if self._raw is not None:
            self._raw.append(data)
        self._chunk = data
        begun = self._begun
        self._fresh_read = not self._in_message
        self._read_base = begun
        events = len(self._events)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            self._upgrade_pending = bytearray(data[offset:])
        except httptools.HttpParserError as exc:
            self._parse_failed(None if self._too_large else exc)
            return
        # A head still incomplete after this read: count the read only if it lies wholly
        # inside that head (no message began in it); the read a head begins in may also
        # carry whole requests before it. The parser so holds at most MAX_HEAD plus one
        # read of an unfinished head; on_headers_complete checks the exact size.
        if self._in_head and self._begun == begun:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._parse_failed(None)
                return
        elif self._in_message and len(self._events) == events:
            # Inside a request past its head, and the read gave no body byte: chunk-size
            # lines, extensions or trailers, which the parser buffers until their line
            # ends. Bounded like a head, so an endless trailer line cannot fill memory.
            self._framing_bytes += len(data)
            if self._framing_bytes > MAX_HEAD:
                self._parse_failed(None)
                return
        else:
            self._framing_bytes = 0
        self._process()

    def _parse_failed(self, exc: Optional[BaseException]) -> None:
        # Nothing after this can be parsed: what came before is still handled in order.
        self._closing = True
        self._events.append((_ERR, exc))
        self._process()

    def eof_received(self) -> bool:
        self._client_eof = True
        if not self._detached:
            self._events.append((_EOF, None))  # handled in order, after what came before
            self._process()
            if self._req is not None and not self._lost and not self._detached:
                self._wait_patiently(-1)
        return True  # keep our side open: a response may still be going out

    @cython.locals(exchange=_Exchange)
    def _wait_patiently(self, seen: int) -> None:
        """After the client's EOF: abort unless the target sent something since the last
        look (``seen`` batches) or the client is still reading a backlog, then look again
        EOF_PATIENCE later."""
        self._patience = None
        if self._lost or self._detached or self._req is None:
            return
        # Silence of the target, not a client still taking what was sent (write paused),
        # nor the gateway still computing an answer of its own.
        if self._upstream_batches == seen and not self._write_paused and not self._answering:
            exchange = self._exchange
            if exchange is not None:
                exchange.stats.fail("client gone, target silent")
            self.abort()
            return
        self._patience = asyncio.get_running_loop().call_later(
            EOF_PATIENCE, self._wait_patiently, self._upstream_batches)

    @cython.locals(exchange=_Exchange)
    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._lost = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._patience is not None:
            self._patience.cancel()
            self._patience = None
        if self._connections is not None and not self._detached:
            self._connections.discard(self)
        if self._busy is not None and not self._busy.done():
            self._busy.cancel()
        if not self._detached:
            exchange = self._exchange
            if exchange is not None:
                self._end_exchange(exchange, keep_stream=False)
            self._drop_stream(abort=exchange is not None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._release_held()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        """Close the client connection (the gateway shutting down, a tunnel closed)."""
        if self.transport is not None and not self._handed_back:
            self.transport.close()

    def abort(self) -> None:
        """Abort the client connection and whatever it is relaying."""
        if self.transport is not None and not self._handed_back:
            self.transport.abort()

    # -- request parser callbacks (httptools)

    def on_message_begin(self) -> None:
        self._url = b""
        self._hdrs = []
        self._in_head = True
        self._head_bytes = 0
        self._head_size = 0
        self._h_chunked = self._h_body = self._h_expect = False
        self._begun += 1
        self._in_message = True
        if self._raw is None:
            self._raw = [self._chunk]
            self._raw_exact = self._fresh_read
            self._raw_base = self._read_base

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # not trailers of a chunked body
            lname = name.lower()
            self._hdrs.append((name, lname, value))
            self._head_size += len(name) + len(value)
            if lname in _FRAMING:  # noted here rather than in another pass over the headers
                if lname == b"transfer-encoding":
                    self._h_chunked = self._h_body = True
                elif lname == b"content-length":
                    if value.strip() not in (b"0", b""):
                        self._h_body = True
                else:
                    self._h_expect = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_size + len(self._url) > MAX_HEAD:
            self._too_large = True
            raise _HeadDone()  # stops the parser: answered 431
        parser = self._parser
        version = parser.get_http_version()
        head = RequestHead(parser.get_method(), self._url, _VERSIONS.get(version) or version.encode(), self._hdrs)
        self._events.append((_HEAD, (head, parser.should_keep_alive(), self._h_chunked, self._h_body,
                                     self._h_expect)))

    def on_body(self, body: bytes) -> None:
        self._events.append((_BODY, body))
        self._queued += len(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        self._events.append((_END, None))

    # -- handling client input, in order

    @cython.locals(kind=cython.longlong)
    def _process(self) -> None:
        """Handle queued client events as far as the state allows."""
        events = self._events
        while events and self._busy is None and not self._detached and not self._lost:
            kind, value = events[0]
            if kind == _HEAD:
                if self._req is not None:
                    break  # pipelined: after the current exchange
                events.popleft()
                head, keep_alive, chunked, has_body, expect = value  # (no *args: a C call when compiled)
                self._start_request(head, keep_alive, chunked, has_body, expect)
            elif kind == _BODY:
                events.popleft()
                self._queued -= len(value)
                self._request_body(value)
            elif kind == _END:
                events.popleft()
                self._request_end()
            else:  # client EOF, or input that cannot be parsed
                if self._req is not None and self._req_done:
                    break  # answer the request first, then close
                events.popleft()
                if kind == _EOF:
                    self._client_gone()
                else:
                    self._client_error(value)
                return
        if (self._paused_queue or events or self._upgrade_pending is not None) and not self._detached \
                and not self._lost:
            self._update_queue_pause()  # (nothing waits in the steady state: no call)

    def _start_request(self, head: RequestHead, keep_alive: bool, chunked: bool, has_body: bool,
                       expect: bool) -> None:
        self._req = head
        self._req_http11 = head.http_version == b"1.1"
        self._req_keep_alive = keep_alive and self._req_http11
        self._req_done = False
        self._discard = None
        self._discarded = 0
        self._req_chunked = chunked
        self._req_has_body = has_body
        self._expect_continue = expect and has_body and self._req_http11
        if head.method == b"CONNECT":
            self._resolved_one()
            self._refuse(ProxyError(405, "method_not_allowed", "CONNECT is not proxied"), close=True)
            return
        try:
            upstream = self._resolve(head)
        except ProxyError as exc:
            self._resolved_one()
            self._refuse(exc)
            return
        if upstream is not None and type(upstream) is not Upstream:
            if isinstance(upstream, Local):
                self._local_start(upstream)
                return
            if inspect.isawaitable(upstream):
                self._slow(self._resolve_slowly(head, upstream))
                return
        self._dispatch(head, upstream)

    async def _resolve_slowly(self, head: RequestHead, pending: Awaitable[Any]) -> None:
        try:
            upstream = await pending
        except ProxyError as exc:
            self._busy = None
            self._resolved_one()
            self._refuse(exc)
            return
        self._busy = None
        if isinstance(upstream, Local):
            self._local_start(upstream)
            return
        self._dispatch(head, upstream)

    def _slow(self, coro: Any) -> None:
        """Run a slow path (a coroutine); client events wait until it is done."""
        loop = self._loop
        assert loop is not None  # connected
        task = self._busy = loop.create_task(coro)
        task.add_done_callback(self._slow_done)

    def _slow_done(self, task: asyncio.Task) -> None:
        if self._busy is task:
            self._busy = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("proxy connection failed", exc_info=exc)
            self.abort()
            return
        self._process()

    def _resolved_one(self) -> None:
        self._resolved += 1
        if self._resolved >= self._begun:
            self._raw = None  # nothing unresolved left to hand back

    @cython.locals(side=_StreamSide, exchange=_Exchange, stats=ProxyStats, resolved=cython.longlong)
    def _dispatch(self, head: RequestHead, upstream: Optional[Upstream]) -> None:
        if upstream is None:
            if self._fallback is None:
                self._resolved_one()
                self._refuse(ProxyError(404, "not_found", "no such endpoint"))
                return
            self._hand_back(head)
            return
        resolved = self._resolved = self._resolved + 1  # (_resolved_one, inlined)
        if resolved >= self._begun:
            self._raw = None
        stats = upstream.stats
        if self._joined is not stats:  # WeakSet.add makes a weakref every call
            stats.clients.add(self)
            self._joined = stats
        stats.requests += 1
        stats.active_requests += 1
        exchange = self._exchange = _Exchange(head, upstream, self._req_has_body, self._req_chunked)
        exchange.t0 = _monotonic()
        if stats.inspect is not None:
            exchange.cap = stats.inspect.cap
            exchange.req_body = bytearray()
            exchange.resp_body = bytearray()
        try:
            sent = exchange.sent = self._forward_head(head, upstream, exchange)
        except ProxyError as exc:
            self._exchange_failed(exchange, exc)
            return
        side = self._side
        if (side is not None and not exchange.has_body and side.key == upstream.key and side.failed is None
                and not side.eof):
            # The steady state, a body-less request on the kept stream: _send_request and
            # _write_head, inlined.
            exchange.reused = True
            try:
                side.write(sent)
            except (ConnectionError, RuntimeError, SessionClosedError) as exc:
                self._upstream_failed(side, exc)
                return
            exchange.request_done = True
            return
        self._send_request(exchange)

    @cython.locals(side=_StreamSide)
    def _send_request(self, exchange: _Exchange) -> None:
        """Write the request head to a stream to the target (the kept one if it fits)."""
        side = self._side
        upstream = exchange.upstream
        if side is not None:
            if side.key == upstream.key and side.failed is None and not side.eof:
                exchange.reused = True
            else:
                self._drop_stream(abort=False)
                side = None
        if side is None:
            exchange.reused = False
            try:
                stream = upstream.open_stream()
            except ProxyError as exc:
                self._exchange_failed(exchange, exc)
                return
            if type(stream) is not MuxStream and inspect.isawaitable(stream):
                self._slow(self._open_slowly(exchange, stream))
                return
            side = self._side = _new_side(self, stream, upstream.key)
            if side.failed is not None:  # reset already (e.g. the session is gone)
                self._upstream_failed(side, side.failed)
                return
        self._write_head(exchange, side)

    async def _open_slowly(self, exchange: _Exchange, pending: Awaitable[MuxStream]) -> None:
        try:
            stream = await pending
        except ProxyError as exc:
            self._busy = None
            self._exchange_failed(exchange, exc)
            return
        except (ConnectionError, SessionClosedError) as exc:
            self._busy = None
            self._exchange_failed(exchange, refusal_error(exc))
            return
        self._busy = None
        if self._lost:
            stream.abort(ErrorCode.CANCEL, "client went away")
            return
        if self._exchange is not exchange:
            stream.abort(ErrorCode.CANCEL, "client request ended")
            return
        side = self._side = _new_side(self, stream, exchange.upstream.key)
        if side.failed is not None:
            self._upstream_failed(side, side.failed)
            return
        self._write_head(exchange, side)

    def _write_head(self, exchange: _Exchange, side: _StreamSide) -> None:
        try:
            side.write(exchange.sent)
            if not exchange.has_body:
                exchange.request_done = True
            elif self._expect_continue and not self._lost:
                self._expect_continue = False
                transport = self.transport
                assert transport is not None  # connected
                transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        except (ConnectionError, RuntimeError, SessionClosedError) as exc:
            self._upstream_failed(side, exc)

    def _forward_head(self, head: RequestHead, upstream: Upstream, exchange: _Exchange) -> bytes:
        """The request head for the target, as one join: hop-by-hop dropped,
        ``X-Forwarded-*`` set, the upgrade re-declared for a handshake, framing
        re-declared for a chunked body."""
        target = upstream.target
        if target is not self._clean_target:  # (the same bytes object: checked already)
            if type(target) is not bytes or _CTL.search(target) or b" " in target:
                raise ProxyError(500, "internal_error", "the proxy built an invalid request")
            self._clean_target = target
        # The header lines depend only on the client's headers, what the resolver adds and
        # the framing: a keep-alive client repeats them, so the last ones are remembered
        # (compared by value with what was checked and built).
        raw_headers = head.raw_headers
        try:  # headers as a tuple: a snapshot, compared by value with what was checked
            extras = (tuple(upstream.headers), upstream.host, upstream.host_override, upstream.drop_headers)
        except TypeError:
            raise ProxyError(500, "internal_error", "the proxy built an invalid request") from None
        cached = self._fwd_cache
        if (cached is not None and cached[1] == extras and cached[2] == exchange.chunked
                and cached[0] == raw_headers):
            exchange.upgrade = cached[4]
            return b"".join((head.method, b" ", target, b" HTTP/1.1\r\n", cached[3]))
        if not _resolver_values_clean(upstream):
            raise ProxyError(500, "internal_error", "the proxy built an invalid request")
        lines = self._header_lines(head, upstream, exchange)
        if type(extras[3]) is frozenset:  # (a mutable set could change under the snapshot)
            self._fwd_cache = (list(raw_headers), extras, exchange.chunked, lines, exchange.upgrade)
        return b"".join((head.method, b" ", target, b" HTTP/1.1\r\n", lines))

    def _header_lines(self, head: RequestHead, upstream: Upstream, exchange: _Exchange) -> bytes:
        """The forwarded request's header lines and the blank line (see _forward_head)."""
        parts: list[bytes] = []
        special = _REQUEST_SPECIAL
        drop = upstream.drop_headers
        listed: Optional[set[bytes]] = None
        forwarded_for: Optional[bytes] = None
        host: Optional[bytes] = None
        upgrade_value: Optional[bytes] = None
        for name, lname, value in head.raw_headers:
            if lname in special or lname in drop or lname.startswith(b"proxy-"):
                if lname == b"connection":
                    listed = _tokens(value) if listed is None else listed | _tokens(value)
                elif lname == b"upgrade":
                    upgrade_value = value
                elif lname == b"x-forwarded-for" and lname not in drop:
                    forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
                elif lname == b"host" and lname not in drop:
                    if upstream.host_override is None:
                        host = value
                        parts += (name, b": ", value, b"\r\n")
                elif lname == b"content-length" and not exchange.chunked and lname not in drop:
                    parts += (name, b": ", value, b"\r\n")
                continue
            parts += (name, b": ", value, b"\r\n")
        exchange.upgrade = None
        if listed:
            listed.discard(b"")
            if listed - {b"close", b"keep-alive", b"upgrade"}:
                # Headers the client marked hop-by-hop: take them out again.
                kept: list[bytes] = []
                for i in range(0, len(parts), 4):
                    if parts[i].lower() not in listed:
                        kept += parts[i:i + 4]
                parts = kept
            if b"upgrade" in listed and upgrade_value is not None:
                exchange.upgrade = upgrade_value
        if host is None:
            host = upstream.host_override or upstream.host
            parts += (b"host: ", host, b"\r\n")
        parts += (b"x-forwarded-for: ",
                  self._client_ip if forwarded_for is None else forwarded_for + b", " + self._client_ip,
                  b"\r\nx-forwarded-proto: ", self._scheme, b"\r\nx-forwarded-host: ", host, b"\r\n")
        if exchange.chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        if exchange.upgrade is not None:
            parts += (b"connection: upgrade\r\nupgrade: ", exchange.upgrade, b"\r\n")
        for name, value in upstream.headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    @cython.locals(exchange=_Exchange, side=_StreamSide)
    def _request_body(self, body: bytes) -> None:
        if self._discard is not None:
            self._discarded += len(body)
            if self._discarded > DISCARD_LIMIT:
                exc, self._discard = self._discard, None
                self._reply_error(exc, close=True)
            return
        local = self._local
        if local is not None:
            self._local_size += len(body)
            if self._local_size > local.limit:
                self._local = self._local_body = None
                self._events.clear()
                self._reply_error(ProxyError(413, "body_too_large", f"request body over {local.limit} bytes"),
                                  close=True)
                return
            body_parts = self._local_body
            assert body_parts is not None  # (set with _local)
            body_parts.append(body)
            return
        exchange = self._exchange
        side = self._side
        if exchange is None or side is None or side.failed is not None:
            return  # the exchange ended early (e.g. the target failed): the body has nowhere to go
        exchange.stats.bytes_in += len(body)
        exchange.nin += len(body)
        if exchange.cap and len(exchange.req_body) < exchange.cap:
            exchange.req_body += body[:exchange.cap - len(exchange.req_body)]
        try:
            if exchange.chunked:
                side.write(b"%x\r\n%s\r\n" % (len(body), body))
            else:
                side.write(body)
        except (ConnectionError, RuntimeError, SessionClosedError):
            return  # the reset reaches _upstream_failed
        if isinstance(side, _PolledSide):
            side._unsent += len(body)
        if not self._paused_stream and side.send_blocked():
            self._paused_stream = True
            side.wait_send()
            self._set_reading()

    @cython.locals(exchange=_Exchange, side=_StreamSide)
    def _request_end(self) -> None:
        self._req_done = True
        if self._discard is not None:
            exc, self._discard = self._discard, None
            self._reply_error(exc, close=False)
            return
        if self._local is not None:
            self._local_end()
            return
        exchange = self._exchange
        if exchange is None:
            self._maybe_next()
            return
        if exchange.has_body and not exchange.request_done:
            exchange.request_done = True
            side = self._side
            if exchange.chunked and side is not None and side.failed is None:
                try:
                    side.write(b"0\r\n\r\n")
                except (ConnectionError, RuntimeError, SessionClosedError):
                    pass
        if exchange.response_done:
            self._finish_exchange(exchange)

    # -- requests the gateway answers itself (a Local)

    def _local_start(self, local: Local) -> None:
        """A resolver answered :class:`Local`: read the body, then ask ``respond``."""
        self._resolved_one()
        self._local = local
        self._local_body = []
        self._local_size = 0
        if self._expect_continue and not self._lost:
            self._expect_continue = False
            transport = self.transport
            assert transport is not None  # connected
            transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _local_end(self) -> None:
        local, parts = self._local, self._local_body
        assert local is not None and parts is not None and self._req is not None  # (a Local's request)
        self._local = self._local_body = None
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        try:
            answer = local.respond(self._req, body)
        except Exception:
            log.exception("a local answer failed")
            answer = _INTERNAL_ERROR
        if isinstance(answer, tuple):
            self._local_answer(answer)
            return
        if type(answer) is CoroutineType:  # (the usual answer: no ensure_future's checks)
            future = self._busy = asyncio.get_running_loop().create_task(answer)
        else:
            future = self._busy = asyncio.ensure_future(answer)
        self._answering = True
        future.add_done_callback(self._local_done)

    def _local_done(self, future: asyncio.Future) -> None:
        if self._busy is future:
            self._busy = None
        self._answering = False
        if future.cancelled() or self._lost or self._detached:
            return
        exc = future.exception()
        if exc is not None:
            log.error("a local answer failed", exc_info=exc)
            self._local_answer(_INTERNAL_ERROR)
        else:
            self._local_answer(future.result())
        self._process()

    def _local_answer(self, answer: LocalAnswer) -> None:
        """Write a local answer; then the next request (or the close)."""
        status, headers, body = answer
        close = not self._req_keep_alive
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if status != 204 and status != 304:
            parts.append(b"content-length: %d\r\n" % len(body))
        if close:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        head = self._req
        if body and status != 204 and status != 304 and not (head is not None and head.method == b"HEAD"):
            parts.append(body)
        transport = self.transport
        assert transport is not None  # connected
        if not self._lost:
            transport.write(b"".join(parts))
        if close:
            self._closing = True
            self._drop_stream(abort=False)
            if not self._lost:
                transport.close()
            return
        self._maybe_next()

    @cython.locals(exchange=_Exchange)
    def _client_gone(self) -> None:
        """The client ended its side with no request waiting for an answer."""
        exchange = self._exchange
        if exchange is not None:  # mid-body: the target must not take the body as complete
            exchange.stats.fail("client connection ended mid-request")
            self._end_exchange(exchange, keep_stream=False)
        self._drop_stream(abort=exchange is not None)
        self._req = None
        self._closing = True
        transport = self.transport
        assert transport is not None  # connected
        transport.close()

    @cython.locals(exchange=_Exchange)
    def _client_error(self, exc: Optional[BaseException]) -> None:
        """The client sent something unparseable (or a head over MAX_HEAD), with no
        request waiting for an answer."""
        self._events.clear()
        exchange = self._exchange
        if exchange is not None:  # mid-body: the target must not take the body as complete
            exchange.stats.fail("malformed request body")
            self._end_exchange(exchange, keep_stream=False)
            if exchange.started:
                self._closing = True
                transport = self.transport
                assert transport is not None  # connected
                transport.abort()
                return
        if exc is None:
            error = ProxyError(431, "bad_request", "request header block too large")
        else:
            error = ProxyError(400, "bad_request", f"malformed HTTP request: {exc}")
        self._reply_error(error, close=True)

    def _update_queue_pause(self) -> None:
        if not self._paused_queue and not self._events and self._upgrade_pending is None:
            return  # the steady state: nothing waits
        pending = self._upgrade_pending
        waiting = self._queued + (len(pending) if pending is not None else 0)
        events = self._events
        paused = waiting > CLIENT_BUFFER or (self._req is not None and bool(events) and events[0][0] == _HEAD)
        if paused != self._paused_queue:
            self._paused_queue = paused
            self._set_reading()

    def _set_reading(self) -> None:
        """Pause or resume reading the client to match the pause reasons."""
        transport = self.transport
        if transport is None or self._lost or self._detached or transport.is_closing():
            return
        want_paused = self._paused_stream or self._paused_queue
        if want_paused != self._transport_paused:
            self._transport_paused = want_paused
            if want_paused:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _try_resume_for_stream(self, side: _StreamSide) -> bool:
        if not self._paused_stream:
            return True
        if side is not self._side or side.failed is not None or self._lost:
            self._paused_stream = False
            self._set_reading()
            return True
        if not side.send_blocked():
            self._paused_stream = False
            self._set_reading()
            return True
        return False

    # -- the response

    @cython.locals(exchange=_Exchange)
    def _upstream_data(self, side: _StreamSide, data: bytes, n: int) -> None:
        """A batch of bytes from the target (called by the stream's sink)."""
        self._upstream_batches += 1
        exchange = self._exchange
        if side is not self._side or exchange is None:
            # Bytes with no request outstanding: the target is out of step.
            side.ack(n)
            if side is self._side:
                self._drop_stream(abort=True)
            return
        # Run the parser over the batch (raising what it raises, except a HEAD's stop).
        side._buf = data
        side._pos = -1 if side._mid else 0  # no response in progress: the batch starts one
        try:
            side.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            side._upgrade_offset = exc.args[0] if exc.args else len(data)
        except httptools.HttpParserError as exc:
            if (not side._complete or not isinstance(exc, httptools.HttpParserCallbackError)
                    or isinstance(exc.__context__, _Unframed)):
                side._buf = b""
                self._flush(side, n)
                self._upstream_failed(side, exc)
                return
            side.parser = httptools.HttpResponseParser(side)  # after a HEAD: a fresh one
            side._mid = False
        side._buf = b""
        if side._in_head:  # a head cut by the batch: keep its start for the next one
            try:
                side.carry(data)
            except httptools.HttpParserError as exc:
                self._flush(side, n)
                self._upstream_failed(side, exc)
                return
        if side._upgrade_offset >= 0:
            offset, side._upgrade_offset = side._upgrade_offset, -1
            self._switch(side, exchange, data[offset:], n)
            return
        done = side._complete
        side._complete = False
        self._flush(side, n)
        if done:
            self._response_complete(exchange, side)

    def _flush(self, side: _StreamSide, n: int) -> None:
        """Write the gathered response bytes to the client; acknowledge ``n`` stream bytes
        (held while the client transport is paused)."""
        out = self._out
        if out and not self._lost:
            self._out = []
            transport = self.transport
            assert transport is not None  # connected
            if len(out) == 1:
                transport.write(out[0])
            else:  # (uvloop writes the pieces with one writev: no joined copy)
                transport.writelines(out)
        elif out:
            self._out = []
        if self._write_paused and not self._lost:
            if self._held_side is not side:
                self._release_held()
                self._held_side = side
            self._held += n
        else:
            side.ack(n)

    @cython.locals(side=_StreamSide, held=cython.longlong)
    def _release_held(self) -> None:
        held, self._held = self._held, 0
        side, self._held_side = self._held_side, None
        if held and side is not None:
            side.ack(held)

    @cython.locals(exchange=_Exchange, line_end=cython.longlong)
    def _response_head(self, side: _StreamSide, status: int, head: bytes) -> None:
        """The target's response head (not 1xx), ``head`` its status line and header
        lines (without the blank line): rewritten into ``_out`` with hop-by-hop headers
        taken out."""
        exchange = self._exchange
        if exchange is None:
            return
        exchange.started = True
        exchange.status = status
        prefix = exchange.upstream.prefix
        if prefix is not None and head != self._plain_head:
            # Before the cache: the rewritten head is what the cache compares. A head
            # found to have no path header is remembered (a target sends the same one
            # again and again), so its repeats cost a comparison instead of a search.
            if _PATH_HEADER.search(head) is not None:
                head = rewrite_paths(head, prefix, *_target_hosts(exchange))
            else:
                self._plain_head = head
        no_body = exchange.is_head or status == 204 or status == 304
        close = not self._req_keep_alive
        http11 = self._req_http11
        # The rewrite depends only on these and the head: a target sends the same head
        # again and again (until its Date moves), so the last one is remembered.
        cached = self._head_cache
        if (cached is not None and cached[0] == head and cached[1] == no_body and cached[2] == close
                and cached[3] == http11):
            out, rechunk, until_eof, close = cached[4]
        else:
            line_end = head.find(b"\r\n")
            if line_end < 0:
                line_end = len(head)  # no header lines
            reason = head[13:line_end] or _reason(status)  # "HTTP/1.1 200 OK": llhttp checked the shape
            result = _rewrite_response_head(status, reason, head[line_end:], no_body, close, http11)
            self._head_cache = (head, no_body, close, http11, result)
            out, rechunk, until_eof, close = result
        side._rechunk = rechunk
        side._until_eof = until_eof
        if close:
            self._close_after = True
        self._out.append(out)
        if exchange.cap:
            exchange.resp_head = out
        exchange.keep_target = not until_eof and side.parser.should_keep_alive()

    def _response_complete(self, exchange: _Exchange, side: _StreamSide) -> None:
        exchange.response_done = True
        side.used = True
        if not exchange.keep_target:
            self._drop_stream(abort=True)
        if exchange.request_done or self._req_done or self._discard is not None:
            if self._exchange is exchange:  # _finish_exchange, inlined (the response is done)
                self._exchange = None
                exchange.stats.active_requests -= 1
                _observe(exchange, _monotonic())
                if exchange.grace is not None:
                    exchange.grace.cancel()
            self._maybe_next()
        else:
            # The target answered before the whole body went out: give it a moment.
            loop = self._loop
            assert loop is not None  # connected
            exchange.grace = loop.call_later(BODY_GRACE, self._grace_over, exchange)

    def _grace_over(self, exchange: _Exchange) -> None:
        if self._exchange is exchange and not self._lost:
            self._end_exchange(exchange, keep_stream=False)
            self._drop_stream(abort=True)
            self._closing = True
            transport = self.transport
            assert transport is not None  # connected
            transport.close()

    def _finish_exchange(self, exchange: _Exchange) -> None:
        """Both the request and the response are complete: ready for the next request."""
        if self._exchange is exchange:  # _end_exchange(keep_stream=True), inlined
            self._exchange = None
            exchange.stats.active_requests -= 1
            _observe(exchange, _monotonic())
            if exchange.grace is not None:
                exchange.grace.cancel()
            if not exchange.response_done:
                self._drop_stream(abort=True)
        self._maybe_next()

    def _end_exchange(self, exchange: _Exchange, keep_stream: bool) -> None:
        if self._exchange is not exchange:
            return
        self._exchange = None
        exchange.stats.active_requests -= 1
        _observe(exchange, _monotonic())
        if exchange.grace is not None:
            exchange.grace.cancel()
        if not keep_stream or not exchange.response_done:
            self._drop_stream(abort=True)

    def _maybe_next(self) -> None:
        """The current request is answered: close, or go on with the next one."""
        if self._exchange is not None or not self._req_done:
            return
        self._req = None
        if self._close_after or not self._req_keep_alive:
            self._closing = True
            self._drop_stream(abort=False)
            if not self._lost:
                transport = self.transport
                assert transport is not None  # connected
                transport.close()
            return
        pending = self._upgrade_pending
        if pending is not None:  # an upgrade the target declined: parse on
            self._upgrade_pending = None
            if pending:
                self.data_received(bytes(pending))
                return
        loop = self._loop
        assert loop is not None  # connected
        self._idle_since = loop.time()
        if self._events:
            self._process()

    @cython.locals(exchange=_Exchange)
    def _upstream_eof(self, side: _StreamSide) -> None:
        """The target ended its side of the stream."""
        exchange = self._exchange
        if side is not self._side:
            return
        if exchange is None or exchange.response_done:
            self._drop_stream(abort=False)  # no request outstanding: not reusable any more
            return
        if exchange.started and side._until_eof:
            if side._rechunk:
                self._out.append(b"0\r\n\r\n")
            self._flush(side, 0)
            self._response_complete(exchange, side)
            return
        self._upstream_failed(side, ConnectionResetError("the target closed the connection"))

    @cython.locals(exchange=_Exchange)
    def _upstream_failed(self, side: _StreamSide, exc: BaseException) -> None:
        """The stream failed (reset, refused, garbage, early close)."""
        if side is not self._side:
            return
        exchange = self._exchange
        self._drop_stream(abort=True)
        if exchange is None or exchange.response_done:
            return
        if exchange.started or self._lost:
            exchange.stats.fail(f"response aborted: {exc}")
            exchange.status = 0  # cut: the client got no complete answer
            self._end_exchange(exchange, keep_stream=False)
            self._out = []
            self._closing = True
            if not self._lost:
                transport = self.transport
                assert transport is not None  # connected
                transport.abort()  # a cut body must not look complete to the client
            return
        if exchange.reused and not isinstance(exc, (StreamRefused, httptools.HttpParserError)):
            if exchange.has_body or exchange.retried:
                self._exchange_failed(exchange, ProxyError(502, "tunnel_error",
                                                           "the target closed the connection"))
                return
            exchange.retried = True  # closed by the target while idle: once more, on a new stream
            self._send_request(exchange)
            return
        self._exchange_failed(exchange, refusal_error(exc))

    def _exchange_failed(self, exchange: _Exchange, exc: ProxyError) -> None:
        """The gateway answers the request itself (nothing of the response was sent)."""
        exchange.stats.fail(exc.message)
        exchange.status = exc.status
        self._end_exchange(exchange, keep_stream=False)
        self._refuse(exc)

    # -- answers of the gateway itself

    def _refuse(self, exc: ProxyError, close: bool = False) -> None:
        """Answer a gateway-level error once the request body is read and dropped (up to
        DISCARD_LIMIT; a larger one closes the connection)."""
        if close or self._req_done:
            self._reply_error(exc, close=close)
        else:
            self._discard = exc  # answered at the request's end (see _request_body/_request_end)
            self._discarded = 0

    def _reply_error(self, exc: ProxyError, close: bool = False) -> None:
        body = _error_body(exc.code, exc.message)
        close = close or not self._req_keep_alive or self._req is None
        head = [b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                % (exc.status, _reason(exc.status), len(body))]
        if close:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        if not (self._req is not None and self._req.method == b"HEAD"):
            head.append(body)
        if not self._lost:
            transport = self.transport
            assert transport is not None  # connected
            transport.write(b"".join(head))
        if close:
            self._closing = True
            self._drop_stream(abort=self._exchange is not None)
            if not self._lost:
                transport = self.transport
                assert transport is not None  # connected
                transport.close()
            return
        self._maybe_next()

    def _hand_back(self, head: RequestHead) -> None:
        """Give the connection to the gateway's HTTP server, starting with this request:
        the raw bytes from its request line on (kept since its first byte arrived)."""
        raw = b"".join(self._raw) if self._raw is not None else b""
        # This is the oldest request not yet resolved: number _resolved + 1.
        start = _request_start(raw, self._resolved - self._raw_base) if self._raw_exact else -1
        if start < 0 or not raw.startswith(head.method + b" ", start):
            # Its first read began inside an earlier request, so where it starts is not
            # known; a guess (e.g. searching for its request line) could run bytes of the
            # earlier request's body as requests. End the connection instead: the answers
            # so far are out, and a pipelining client retries what was not answered.
            self._closing = True
            self._events.clear()
            self._drop_stream(abort=False)
            if not self._lost:
                transport = self.transport
                assert transport is not None  # connected
                transport.close()
            return
        pending = self._upgrade_pending
        data = raw[start:]
        if pending:
            data += bytes(pending)
        self._raw = None
        self._detached = self._handed_back = True
        self._events.clear()
        self._drop_stream()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._connections is not None:
            self._connections.discard(self)
        # The very request the route handed over (nothing was resolved before it): the
        # HTTP server must not give it back to us or to another proxy (no loop).
        fallback = self._fallback
        assert fallback is not None  # _dispatch hands a request back only to one
        protocol = fallback(declined=self._resolved == 0)
        transport = self.transport
        assert transport is not None  # connected
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        transport.resume_reading()
        protocol.data_received(data)
        if self._client_eof:
            protocol.eof_received()

    # -- the upgrade

    def _switch(self, side: _StreamSide, exchange: _Exchange, target_pending: bytes, n: int) -> None:
        """The target answered an upgrade: forward its 101, then splice raw bytes."""
        stats = exchange.stats
        if exchange.upgrade is None or side._status != 101 or not side.can_splice():
            self._flush(side, n)
            self._upstream_failed(side, httptools.HttpParserError("unexpected 101 Switching Protocols"))
            return
        listed: set[bytes] = set()
        headers = _header_pairs(side._block)
        for name, value in headers:
            if name.lower() == b"connection":
                listed |= _tokens(value)
        parts = [b"HTTP/1.1 101 %s\r\n" % (side._reason or b"Switching Protocols")]
        upgrades = []
        for name, value in headers:
            lname = name.lower()
            if lname == b"upgrade":
                upgrades.append(value)
            if lname in _HOP_BY_HOP or lname.startswith(b"proxy-") or lname in listed:
                continue
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"connection: upgrade\r\n")
        for value in upgrades:
            parts += (b"upgrade: ", value, b"\r\n")
        parts.append(b"\r\n")
        out, self._out = self._out, []
        client_pending = bytes(self._upgrade_pending or b"")
        self._upgrade_pending = None
        self._detached = True
        self._events.clear()
        self._exchange = None
        self._side = None
        stats.active_requests -= 1
        exchange.status = 101
        _observe(exchange, _monotonic())
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        stream = side.stream
        side.detach()
        stream._detach_sink()
        transport = self.transport
        assert transport is not None  # connected
        transport.write(b"".join(out) + b"".join(parts) + target_pending)
        side.ack(n)
        if self._held:
            self._release_held()
        if client_pending:
            stream.write(client_pending)
        splice = StreamSplice(stream)
        # Compiled, StreamSplice is an extension type, which cannot subclass asyncio.Protocol.
        transport.set_protocol(splice)  # type: ignore[arg-type]  # a duck-typed protocol (see above)
        splice.connection_made(transport)
        if self._client_eof:
            splice.eof_received()
        else:
            transport.resume_reading()
        stats.websockets += 1
        stats.active_websockets += 1
        splice.closed_future().add_done_callback(lambda _: self._spliced_closed(stats))

    def _spliced_closed(self, stats: ProxyStats) -> None:
        stats.active_websockets -= 1
        if self._connections is not None:
            self._connections.discard(self)

    # -- streams and timers

    @cython.locals(side=_StreamSide)
    def _drop_stream(self, abort: bool = False) -> None:
        side, self._side = self._side, None
        if side is None:
            return
        if self._held_side is side:
            self._release_held()
        if self._paused_stream:
            self._paused_stream = False
            self._set_reading()
        side.detach()
        stream = side.stream
        if abort:
            stream.abort(ErrorCode.CANCEL, "client request ended")
        else:
            stream.close()

    def _check_idle(self) -> None:
        """The idle timer: one per connection, re-armed rather than set per request."""
        self._idle_timer = None
        if self._lost or self._detached:
            return
        loop = self._loop
        assert loop is not None  # connected
        if self._req is None and not self._events:
            left = self._idle_since + IDLE_TIMEOUT - loop.time()
            if left <= 0:
                self._closing = True
                self._drop_stream(abort=False)
                transport = self.transport
                assert transport is not None  # connected
                transport.close()
                return
        else:
            left = IDLE_TIMEOUT
        self._idle_timer = loop.call_later(left, self._check_idle)
