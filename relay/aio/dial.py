"""The client side of the WebSocket upgrade, shared by everything that dials a
multiplexed session (the agent, and a gateway dialling a peer of its fleet)."""
from __future__ import annotations

import asyncio
from typing import Optional, cast

from relay.aio.session import MuxSession
from relay.aio.transport import WebSocketTransport
from relay.ws.handshake import ClientHandshake, HandshakeError

__all__ = ["SubprotocolDeclined", "WebSocketUpgrade"]


class SubprotocolDeclined(HandshakeError):
    """The server upgraded without the subprotocol the session needs (a server that
    does not speak it); the WebSocket was closed (1000) before anything was sent on it."""


class WebSocketUpgrade(asyncio.Protocol):
    """Protocol of the TCP connection until the 101 arrives, then hands it to the
    session (synchronously, in ``data_received``, so no byte can fall in between).

    ``done`` resolves once the session carries the connection, or fails with the
    :class:`HandshakeError` or the connection's loss. With ``require_subprotocol`` an
    upgrade without that subprotocol fails with :class:`SubprotocolDeclined` instead, and
    the session never writes on that WebSocket."""

    def __init__(self, handshake: ClientHandshake, session: MuxSession, *,
                 require_subprotocol: Optional[str] = None) -> None:
        self._handshake = handshake
        self._session = session
        self._require = require_subprotocol
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP (or TLS) connection's transport: asyncio types the argument for every kind.
        tcp = cast(asyncio.Transport, transport)
        self._transport = tcp
        tcp.write(self._handshake.request_bytes())

    def data_received(self, data: bytes) -> None:
        self._feed(data)

    def eof_received(self) -> Optional[bool]:
        self._feed(b"")
        return None

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost during the upgrade: {exc or 'closed'}"))

    def _feed(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None  # data arrives once connected
        if self.done.done():
            return
        try:
            accepted = self._handshake.receive_data(data)
        except HandshakeError as exc:
            self.done.set_exception(exc)
            transport.close()
            return
        if accepted is not None and self._require is not None and accepted.subprotocol != self._require:
            from relay.ws import CloseCode, Opcode, encode_close_payload, encode_frame

            transport.write(encode_frame(Opcode.CLOSE, encode_close_payload(CloseCode.NORMAL), mask=True))
            transport.close()
            self.done.set_exception(SubprotocolDeclined(
                f"the server does not speak the subprotocol {self._require}", 101))
            return
        if accepted is not None:
            WebSocketTransport.attach(transport, self._session, client=True,
                                      initial=accepted.leftover)
            self.done.set_result(None)
