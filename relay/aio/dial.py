"""The client side of the WebSocket upgrade, shared by everything that dials a
multiplexed session (the agent, and a gateway dialling a peer of its fleet)."""
from __future__ import annotations

import asyncio
from typing import Optional, cast

from relay.aio.session import MuxSession
from relay.aio.transport import WebSocketTransport
from relay.ws.handshake import ClientHandshake, HandshakeError

__all__ = ["WebSocketUpgrade"]


class WebSocketUpgrade(asyncio.Protocol):
    """Protocol of the TCP connection until the 101 arrives, then hands it to the
    session (synchronously, in ``data_received``, so no byte can fall in between).

    ``done`` resolves once the session carries the connection, or fails with the
    :class:`HandshakeError` or the connection's loss."""

    def __init__(self, handshake: ClientHandshake, session: MuxSession) -> None:
        self._handshake = handshake
        self._session = session
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
        if accepted is not None:
            WebSocketTransport.attach(transport, self._session, client=True,
                                      initial=accepted.leftover)
            self.done.set_result(None)
