"""The WebSocket opening handshake (RFC 6455 section 4), sans-IO, on h11 and wsproto.

Only the handshake lives here; afterwards the bytes go through ``relay.ws.FrameParser``
and ``encode_frame`` (much faster than wsproto's frame layer). No extension is negotiated
(the framer rejects RSV bits), so permessage-deflate offers are ignored.

Client::

    hs = ClientHandshake("gw.example.com", "/agent", extra_headers=[("Authorization", tok)])
    sock.sendall(hs.request_bytes())
    while (accepted := hs.receive_data(sock.recv(65536))) is None:
        pass                           # raises HandshakeRejected / HandshakeError
    parser.feed(accepted.leftover)      # frames that arrived with the 101 response

Server, given the ``h11.Request`` its HTTP layer parsed::

    upgrade = parse_upgrade_request(request)          # raises HandshakeError
    transport.write(accept_response(upgrade, subprotocol="relay.v1"))
    # on HandshakeError: transport.write(reject_response(error)); close
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus

import h11
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection
from wsproto.events import Request as WsRequest
from wsproto.handshake import WEBSOCKET_UPGRADE, WEBSOCKET_VERSION, H11Handshake
from wsproto.utilities import (
    RemoteProtocolError,
    generate_accept_token,
    generate_nonce,
    split_comma_header,
)

__all__ = [
    "Accepted",
    "ClientHandshake",
    "HandshakeError",
    "HandshakeRejected",
    "UpgradeRequest",
    "accept_response",
    "parse_upgrade_request",
    "reject_response",
]

Headers = Sequence[tuple[bytes | str, bytes | str]]

#: Most bytes of a rejection body kept for the error message; the rest is dropped so a
#: hostile server cannot make the client buffer without bound.
MAX_REJECT_BODY = 64 * 1024


class HandshakeError(Exception):
    """The handshake failed. On the server, answer with ``reject_response(error)``.

    ``status_code`` and ``headers`` are the HTTP response the server should send (400
    for a malformed upgrade, 405 for a method other than GET, 426 with
    ``Sec-WebSocket-Version: 13`` for a wrong version).
    """

    def __init__(self, message: str, status_code: int = 400,
                 headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.headers = list(headers)


class HandshakeRejected(HandshakeError):
    """The server answered the upgrade with a non-101 response (``body`` is capped)."""

    def __init__(self, status_code: int, headers: Sequence[tuple[bytes, bytes]],
                 body: bytes) -> None:
        text = body[:200].decode("utf-8", "replace")
        super().__init__(f"server refused the WebSocket upgrade with HTTP {status_code}"
                         + (f": {text}" if text else ""), status_code, headers)
        self.body = body


@dataclass(frozen=True, slots=True)
class Accepted:
    """The client's handshake succeeded."""

    #: The subprotocol the server chose, or None.
    subprotocol: str | None
    #: Response headers (names lower-case).
    headers: list[tuple[bytes, bytes]]
    #: Bytes that followed the 101 response: the first WebSocket frames.
    leftover: bytes


def _encode_headers(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(n.encode("ascii") if isinstance(n, str) else n,
             v.encode("latin-1") if isinstance(v, str) else v) for n, v in headers]


class ClientHandshake:
    """Client side: build the upgrade request, then validate the server's response."""

    def __init__(self, host: str, target: str = "/", *, subprotocols: Sequence[str] = (),
                 extra_headers: Headers = ()) -> None:
        self.host = host
        self.target = target
        self.subprotocols = list(subprotocols)
        self._extra_headers = _encode_headers(extra_headers)
        self._nonce = generate_nonce()
        self._h11 = h11.Connection(h11.CLIENT)
        self._rejection: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self._body: list[bytes] = []
        self._body_len = 0

    def request_bytes(self) -> bytes:
        """Return the HTTP/1.1 upgrade request to send (call once)."""
        headers = [
            (b"Host", self.host.encode("idna")),
            (b"Upgrade", WEBSOCKET_UPGRADE),
            (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Key", self._nonce),
            (b"Sec-WebSocket-Version", WEBSOCKET_VERSION),
        ]
        if self.subprotocols:
            headers.append((b"Sec-WebSocket-Protocol",
                            ", ".join(self.subprotocols).encode("ascii")))
        request = h11.Request(method=b"GET", target=self.target.encode("ascii"),
                              headers=headers + self._extra_headers)
        return self._h11.send(request) or b""

    def receive_data(self, data: bytes) -> Accepted | None:
        """Feed bytes from the server (``b""`` at EOF).

        Returns None while the response is incomplete, ``Accepted`` once a valid 101
        arrived. Raises ``HandshakeRejected`` for any other status (after its body, so
        the message can say why) and ``HandshakeError`` for an invalid 101 or a
        malformed response.
        """
        self._h11.receive_data(data)
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise HandshakeError(f"malformed HTTP response to the upgrade: {exc}") from None
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    return self._accept(event)
                continue  # 1xx other than 101 (e.g. 100 Continue): keep reading
            if isinstance(event, h11.Response):
                self._rejection = (event.status_code, list(event.headers))
            elif isinstance(event, h11.Data):
                if self._body_len < MAX_REJECT_BODY:
                    self._body.append(event.data[:MAX_REJECT_BODY - self._body_len])
                    self._body_len += len(self._body[-1])
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                if self._rejection is None:
                    raise HandshakeError("connection closed before the upgrade response")
                status, headers = self._rejection
                raise HandshakeRejected(status, headers, b"".join(self._body))
            else:  # h11.PAUSED cannot precede a final response
                raise HandshakeError(f"unexpected HTTP event {event!r}")

    def _accept(self, response: h11.InformationalResponse) -> Accepted:
        connection: list[str] = []
        upgrade = accept = subprotocol = None
        for name, value in response.headers:
            if name == b"connection":
                connection.extend(t.lower() for t in split_comma_header(value))
            elif name == b"upgrade":
                upgrade = value.lower()
            elif name == b"sec-websocket-accept":
                accept = value
            elif name == b"sec-websocket-protocol":
                subprotocol = value.decode("ascii")
            elif name == b"sec-websocket-extensions":
                raise HandshakeError("server accepted an extension that was not offered")
        if "upgrade" not in connection:
            raise HandshakeError("101 response without 'Connection: Upgrade'")
        if upgrade != WEBSOCKET_UPGRADE:
            raise HandshakeError("101 response without 'Upgrade: websocket'")
        if accept != generate_accept_token(self._nonce):
            raise HandshakeError("101 response with a wrong Sec-WebSocket-Accept")
        if subprotocol is not None and subprotocol not in self.subprotocols:
            raise HandshakeError(f"server chose subprotocol {subprotocol!r}, not offered")
        leftover, _closed = self._h11.trailing_data
        return Accepted(subprotocol, list(response.headers), bytes(leftover))


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """A valid WebSocket upgrade request, as the server saw it."""

    target: str
    host: str
    #: Subprotocols the client offered, in its order of preference.
    subprotocols: list[str]
    #: The request's other headers (names lower-case), e.g. authorization.
    headers: list[tuple[bytes, bytes]]
    # wsproto's handshake state, kept to build the 101 response.
    _handshake: H11Handshake = field(repr=False, compare=False)


def parse_upgrade_request(request: h11.Request) -> UpgradeRequest:
    """Check that ``request`` is a WebSocket upgrade (GET, Connection: Upgrade, Upgrade:
    websocket, version 13, a key, a Host); raise HandshakeError saying what is wrong."""
    # wsproto's initiate_upgrade_connection rebuilds the request as a GET, so the
    # method is checked here.
    if request.method != b"GET":
        raise HandshakeError("invalid WebSocket upgrade: the request method must be GET",
                             405, [(b"Allow", b"GET")])
    handshake = H11Handshake(ConnectionType.SERVER)
    try:
        # wsproto re-runs the request through h11 and applies RFC 6455 section 4.2.1.
        handshake.initiate_upgrade_connection(list(request.headers), request.target)
    except RemoteProtocolError as exc:
        hint = exc.event_hint
        status = getattr(hint, "status_code", 400)
        headers = _encode_headers(getattr(hint, "headers", None) or [])
        raise HandshakeError(f"invalid WebSocket upgrade: {exc}", status, headers) from None
    event = next(handshake.events())
    assert isinstance(event, WsRequest)
    return UpgradeRequest(
        target=event.target,
        host=event.host,
        subprotocols=list(event.subprotocols),
        headers=_encode_headers(event.extra_headers),
        _handshake=handshake,
    )


def accept_response(upgrade: UpgradeRequest, subprotocol: str | None = None,
                    extra_headers: Headers = ()) -> bytes:
    """Return the ``101 Switching Protocols`` response bytes for ``upgrade``.

    ``subprotocol`` must be one the client offered (ValueError otherwise).
    """
    if subprotocol is not None and subprotocol not in upgrade.subprotocols:
        raise ValueError(f"subprotocol {subprotocol!r} was not offered by the client")
    return upgrade._handshake.send(AcceptConnection(
        subprotocol=subprotocol, extra_headers=_encode_headers(extra_headers)))


def reject_response(error: HandshakeError) -> bytes:
    """Return a complete HTTP error response for a failed upgrade, with the project's
    JSON error body ``{"error": {"code", "message"}}``; then close the connection."""
    body = json.dumps({"error": {"code": "bad_websocket_upgrade",
                                 "message": error.message}}).encode()
    headers = [*_encode_headers(error.headers), (b"Content-Type", b"application/json"),
               (b"Content-Length", str(len(body)).encode()), (b"Connection", b"close")]
    status = error.status_code if 400 <= error.status_code < 600 else 400
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    lines = [f"HTTP/1.1 {status} {phrase}".encode()]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
