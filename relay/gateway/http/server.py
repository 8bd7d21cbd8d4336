"""A small HTTP/1.1 server on asyncio + h11: routing, JSON bodies, JSON errors, upgrades.

One :class:`HttpProtocol` per connection parses requests with h11. A request is read
whole (bodies are small JSON documents, capped at :data:`MAX_BODY`), then handed to the
:class:`Router`, whose handler returns a :class:`Response`. Errors are answered as
``{"error": {"code": ..., "message": ...}}`` (SPEC §7): a handler raises
:class:`HttpError` (or :class:`~relay.gateway.auth.AuthError`) and the server turns it
into the response. Requests on one connection are answered in order; reading is paused
while a handler runs, so a client cannot make the server buffer without bound.

WebSocket (and any other) upgrades: the handler calls :meth:`Request.take_over`, which
detaches the TCP transport from HTTP and returns it with the bytes already read past the
request; from then on the handler owns the connection.

Raw routes (``router.add(..., raw=True)``, e.g. the HTTP tunnel proxy) get the request at
headers time, before any of its body is read (``request.body`` is empty), and must call
:meth:`Request.take_over_raw`: the connection is handed over as bytes (the request head
re-serialised + everything received after it), so the new owner parses with its own
HTTP parser and streams the body however it likes.
A new owner that declines a request hands the connection back to a new HttpProtocol
(built with ``declined=True`` when the declined request is the one the route gave it):
that request can then be answered by its route, e.g. an error, but never taken over
again, so a disagreement between a route and its owner costs one 404, not a spin.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Optional, cast
from urllib.parse import parse_qs, urlsplit

import h11

from relay.gateway.auth import AuthError
from relay.gateway.store import StoreUnavailable

__all__ = ["STORE_UNAVAILABLE", "HttpError", "HttpProtocol", "Request", "Response", "Router", "json_body",
           "json_response", "store_failure"]

log = logging.getLogger("relay.gateway.http")

#: What a client is told when the store does not answer: the reason names the database
#: (its host, user, file), which is the operator's business, so it goes to the log only.
STORE_UNAVAILABLE = "the gateway's database is unavailable; try again later"


def store_failure(what: str, exc: BaseException) -> str:
    """Log why the store failed ``what`` and return what the client may be told."""
    log.warning("%s: %s", what, exc)
    return STORE_UNAVAILABLE

#: Largest request body accepted (the control API takes small JSON documents).
MAX_BODY = 1024 * 1024
#: Largest request head (request line + headers) h11 buffers.
MAX_HEAD = 64 * 1024
#: A connection that sends no complete request for this long is closed.
IDLE_TIMEOUT = 60.0
# A header line continued on the next (obs-fold, RFC 9112 5.2): h11 joins it into the
# previous value, the proxy engine's llhttp refuses it. Both paths must agree, so the
# server refuses it too (the RFC's other allowed answer), before anything is routed.
_OBS_FOLD = re.compile(rb"\n[ \t]")
_HEAD_END = re.compile(rb"\n\r?\n")


def _head_has_obs_fold(data: bytes | bytearray) -> bool:
    """True when the request head at the start of ``data`` folds a header line."""
    end = _HEAD_END.search(data)
    return _OBS_FOLD.search(data, 0, end.start() if end else len(data)) is not None
#: After an error answered mid-request, input is read and dropped for up to this long
#: before closing, so the client's unread bytes do not turn our close into a reset that
#: destroys the error response (RFC 9112 §9.6 "lingering close").
LINGER = 2.0

SERVER_HEADER = "relay"


class HttpError(Exception):
    """Answer ``status`` with ``{"error": {"code": code, "message": message}}``."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


@dataclass
class Response:
    """A complete response: status, body bytes and extra headers."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_response(value: Any, status: int = 200, headers: Optional[dict[str, str]] = None) -> Response:
    """A JSON response (``204`` gets no body)."""
    body = b"" if status == 204 else json.dumps(value).encode()
    return Response(status, body, headers=headers or {})


def error_response(status: int, code: str, message: str,
                   headers: Optional[dict[str, str]] = None) -> Response:
    """The project's JSON error response."""
    return json_response({"error": {"code": code, "message": message}}, status, headers)


def json_body(body: bytes) -> Any:
    """A request body as JSON; an empty body is ``{}``. Raises 400 on malformed JSON."""
    if not body.strip():
        return {}
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # e.g. 100,000 nested arrays: within MAX_BODY, past the parser
        raise HttpError(400, "invalid_json", "request body is nested too deeply") from None


class Request:
    """One parsed request, as handlers see it."""

    def __init__(self, protocol: "HttpProtocol", event: h11.Request, body: bytes) -> None:
        self._protocol = protocol
        self.method: str = event.method.decode("ascii")
        self.target: str = event.target.decode("ascii", "replace")
        split = urlsplit(self.target)
        self.path: str = split.path
        self.query: dict[str, list[str]] = parse_qs(split.query)
        #: Header names are lower-case; values latin-1 decoded. Repeated headers: last wins.
        self.headers: dict[str, str] = {n.decode("ascii").lower(): v.decode("latin-1")
                                        for n, v in event.headers}
        self.raw: h11.Request = event
        self.body = body
        #: Path parameters filled in by the router.
        self.params: dict[str, str] = {}

    def header(self, name: str) -> Optional[str]:
        return self.headers.get(name.lower())

    def query_value(self, name: str) -> Optional[str]:
        values = self.query.get(name)
        return values[-1] if values else None

    def json(self) -> Any:
        """The body as JSON (:func:`json_body`)."""
        return json_body(self.body)

    @property
    def peer(self) -> Any:
        return self._protocol.transport.get_extra_info("peername") if self._protocol.transport else None

    @property
    def client_certificate(self) -> Optional[dict[str, Any]]:
        """The client's TLS certificate as verified in the handshake (``ssl``'s
        ``getpeercert()`` form), or None: no TLS, no certificate asked for or given."""
        transport = self._protocol.transport
        cert = transport.get_extra_info("peercert") if transport else None
        return cert or None

    def take_over(self) -> tuple[asyncio.Transport, bytes]:
        """Detach the connection from HTTP (for an upgrade). Returns the transport and the
        bytes received after this request. The caller now owns the transport: it must
        write its own response (e.g. ``101 Switching Protocols``) and set a protocol."""
        return self._protocol._take_over()

    def take_over_raw(self) -> tuple[asyncio.Transport, bytes]:
        """For a raw route: detach the connection and return it with every byte of it not
        answered yet, starting with this request's head (re-serialised; its body, if any,
        follows unread). The caller owns the (paused) transport from now on."""
        protocol = self._protocol
        if protocol._declined:
            # This very request was taken over once already and its new owner handed it
            # back unserved (its resolver disagrees with the router about the target).
            # Taking it over again would pass the connection back and forth for ever
            # with no I/O, so it is answered here instead.
            log.warning("%s %s: handed back unserved by its raw route; answered 404",
                        self.method, self.path[:200])
            raise HttpError(404, "not_found", f"no such endpoint: {self.path[:200]}")
        transport, leftover = protocol._take_over()
        return transport, serialize_head(self.raw) + leftover


def serialize_head(request: h11.Request) -> bytes:
    """An h11 request head back as bytes, e.g. to hand a connection to another parser."""
    lines = [b"%s %s HTTP/%s" % (request.method, request.target, request.http_version)]
    lines += [name + b": " + value for name, value in request.headers.raw_items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


Handler = Callable[[Request], Awaitable[Optional[Response]]]


class Router:
    """Routes ``(method, path pattern)`` to handlers. Patterns use ``{name}`` for one
    path segment, e.g. ``/api/v1/agents/{agent_id}``, and ``{name:path}`` for the rest of
    the path (any characters, slashes included). Method ``*`` matches any method. Routes
    are tried in the order they were added; a route that matches the path but not the
    method gives way to a later one that takes the method (405 only if none does)."""

    def __init__(self) -> None:
        self._routes: list[tuple[re.Pattern[str], dict[str, Handler]]] = []
        self._raw: set[Handler] = set()
        #: Consulted before the paths, with the request's ``Host``: a raw handler that
        #: takes every request for that host (host-based tunnels), or None.
        self.by_host: Optional[Callable[[Optional[str]], Optional[Handler]]] = None

    def add(self, method: str, pattern: str, handler: Handler, *, raw: bool = False) -> None:
        """Route ``method pattern`` to ``handler``. ``raw``: call it at headers time (see
        :meth:`Request.take_over_raw`)."""
        source = re.sub(r"\{(\w+):path\}", r"(?P<\1>.*)", pattern)
        regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", source) + "$")
        if raw:
            self._raw.add(handler)
        for existing, methods in self._routes:
            if existing.pattern == regex.pattern:
                methods[method.upper()] = handler
                return
        self._routes.append((regex, {method.upper(): handler}))

    def is_raw(self, handler: Handler) -> bool:
        """True if ``handler`` was added with ``raw=True``."""
        return handler in self._raw

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """The handler and path parameters; raises 404 or 405 as JSON errors."""
        not_allowed: Optional[HttpError] = None
        for regex, methods in self._routes:
            match = regex.match(path)
            if match is None:
                continue
            handler = (methods.get(method) or (methods.get("GET") if method == "HEAD" else None)
                       or methods.get("*"))
            if handler is None:
                not_allowed = not_allowed or HttpError(
                    405, "method_not_allowed", f"{method} is not allowed on {path}",
                    {"Allow": ", ".join(sorted(methods))})
                continue
            return handler, match.groupdict()
        raise not_allowed or HttpError(404, "not_found", f"no such endpoint: {path}")


class HttpProtocol(asyncio.Protocol):
    """One HTTP/1.1 server connection."""

    def __init__(self, router: Router, connections: Optional[set["HttpProtocol"]] = None, *,
                 declined: bool = False) -> None:
        """``declined``: the connection comes back from a raw route's new owner (the
        proxy engine), which handed back the very request the route gave it: that first
        request may not be taken over again (see :meth:`Request.take_over_raw`)."""
        self._router = router
        self._declined = declined
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.transport: Optional[asyncio.Transport] = None
        self._request: Optional[h11.Request] = None
        self._body = bytearray()
        self._task: Optional[asyncio.Task] = None
        self._detached = False
        self._connections = connections
        self._idle: Optional[asyncio.TimerHandle] = None
        self._lingering = False
        #: The bytes of the request head being read (until h11 has parsed it), checked
        #: for obs-fold: h11 keeps no trace of a fold once it has joined the lines.
        self._head = bytearray()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP (or TLS) connection's transport: asyncio types the argument for every kind.
        self.transport = cast(asyncio.Transport, transport)
        if self._connections is not None:
            self._connections.add(self)
        self._arm_idle()

    def _connected(self) -> asyncio.Transport:
        """The transport (connection_made sets it before any data or request)."""
        transport = self.transport
        assert transport is not None
        return transport

    def data_received(self, data: bytes) -> None:
        if self._detached or self._lingering:
            return
        if self._h11.their_state is h11.IDLE and len(self._head) <= MAX_HEAD:
            self._head += data
        self._h11.receive_data(data)
        self._process()

    def eof_received(self) -> Optional[bool]:
        if not self._detached and not self._lingering:
            self._h11.receive_data(b"")
            self._process()
        return None

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self._connections is not None:
            self._connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        if self._task is not None and not self._task.done() and not self._detached:
            self._task.cancel()

    def close(self) -> None:
        """Close the connection (unless an upgrade took it over)."""
        if not self._detached and self.transport is not None:
            self._connected().close()

    # -- request processing

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(IDLE_TIMEOUT, self._idle_timeout)

    def _idle_timeout(self) -> None:
        if self._task is None and not self._detached and self.transport is not None:
            self._connected().close()

    def _process(self) -> None:
        """Read events until a whole request is in, then run its handler."""
        while self._task is None and not self._detached:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._send_error_and_close(exc.error_status_hint, "bad_request", f"malformed HTTP request: {exc}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                if _head_has_obs_fold(self._head):
                    self._send_error_and_close(400, "bad_request",
                                               "malformed HTTP request: a header line is folded (obs-fold)")
                    return
                self._head = bytearray()
                self._request = event
                self._body = bytearray()
                if self._start_raw(event):
                    return
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > MAX_BODY:
                    self._send_error_and_close(413, "body_too_large",
                                               f"request body over {MAX_BODY} bytes")
                    return
            elif isinstance(event, h11.EndOfMessage):
                assert self._request is not None
                request = Request(self, self._request, bytes(self._body))
                self._body = bytearray()
                self._connected().pause_reading()  # one request at a time; bounded buffering
                self._task = asyncio.get_running_loop().create_task(self._handle(request))
                return
            elif isinstance(event, h11.ConnectionClosed):
                self._connected().close()
                return

    def _start_raw(self, event: h11.Request) -> bool:
        """At headers time: if a raw route takes this request, run its handler now."""
        request = Request(self, event, b"")
        by_host = self._router.by_host
        handler = by_host(request.header("host")) if by_host is not None else None
        if handler is not None:
            params: dict[str, str] = {}
        else:
            try:
                handler, params = self._router.resolve(request.method, request.path)
            except HttpError:
                return False  # answered once the whole request is in, as usual
            if not self._router.is_raw(handler):
                return False
        request.params = params
        self._connected().pause_reading()
        self._task = asyncio.get_running_loop().create_task(self._handle(request, handler))
        return True

    async def _handle(self, request: Request, handler: Optional[Handler] = None) -> None:
        try:
            if handler is None:
                handler, params = self._router.resolve(request.method, request.path)
                request.params = params
            response = await handler(request)
        except HttpError as exc:
            response = error_response(exc.status, exc.code, exc.message, exc.headers)
        except AuthError as exc:
            response = error_response(exc.status, exc.code, exc.message, exc.headers)
        except StoreUnavailable as exc:  # the database cannot be reached now: try again later
            log.warning("%s %s: %s", request.method, request.path, exc)
            response = error_response(503, "store_unavailable", STORE_UNAVAILABLE, {"Retry-After": "5"})
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("handler for %s %s failed", request.method, request.path)
            response = error_response(500, "internal_error", "internal server error")
        if self._detached:
            return  # the handler took the connection over (upgrade)
        self._declined = False  # only the handed-back request itself is concerned
        if response is None:
            response = Response(204)
        self._task = None
        self._send(response, head_only=request.method == "HEAD")
        if self._h11.our_state is h11.MUST_CLOSE or self._h11.their_state is h11.MUST_CLOSE:
            self._connected().close()
            return
        try:
            self._h11.start_next_cycle()
        except h11.LocalProtocolError:
            # The client is mid-upgrade or otherwise not reusable: end the connection.
            self._connected().close()
            return
        self._head = bytearray(self._h11.trailing_data[0][:MAX_HEAD + 1])  # a pipelined head
        self._arm_idle()
        self._connected().resume_reading()
        self._process()

    def _send(self, response: Response, head_only: bool = False) -> None:
        headers: list[tuple[str, str]] = [("Server", SERVER_HEADER), ("Content-Length", str(len(response.body)))]
        if response.body or response.status not in (204, 304):
            headers.append(("Content-Type", response.content_type))
        headers += list(response.headers.items())
        if self._h11.their_state in (h11.MIGHT_SWITCH_PROTOCOL, h11.SEND_BODY):
            # A refused upgrade, or a request answered before its body was read (a raw
            # route refusing at headers time): the connection cannot carry another
            # request, so say it will close rather than just closing.
            headers.append(("Connection", "close"))
        if response.status == 204:
            headers = [h for h in headers if h[0] != "Content-Length"]
        try:
            out = self._h11.send(h11.Response(status_code=response.status, headers=headers,
                                              reason=_reason(response.status)))
            if response.body and not head_only:
                out += self._h11.send(h11.Data(data=response.body))
            out += self._h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self._connected().close()
            return
        self._connected().write(out)

    def _send_error_and_close(self, status: int, code: str, message: str) -> None:
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self._send(error_response(status, code, message))
        transport = self._connected()
        if transport.can_write_eof():
            # Lingering close: end our side, drop what the client still sends, close later.
            self._lingering = True
            transport.write_eof()
            transport.resume_reading()
            asyncio.get_running_loop().call_later(LINGER, transport.close)
        else:
            transport.close()

    def _take_over(self) -> tuple[asyncio.Transport, bytes]:
        self._detached = True
        if self._idle is not None:
            self._idle.cancel()
        if self._connections is not None:
            self._connections.discard(self)
        leftover, _ = self._h11.trailing_data
        return self._connected(), bytes(leftover)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""
