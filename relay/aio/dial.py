"""The client side of the WebSocket upgrade, shared by everything that dials a
multiplexed session (the agent, ``relay connect``, and a gateway dialling a peer of its
fleet): :func:`dial_session` opens the connection (TCP, TLS), upgrades it and waits for
the session's SETTINGS; :class:`WebSocketUpgrade` is its protocol until the 101."""
from __future__ import annotations

import asyncio
import ssl
from typing import Optional, cast

from relay.aio.session import MuxSession
from relay.aio.transport import WebSocketTransport
from relay.ws.handshake import ClientHandshake, HandshakeError

__all__ = ["SubprotocolDeclined", "WebSocketUpgrade", "dial_session"]


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


async def dial_session(session: MuxSession, handshake: ClientHandshake, host: str, port: int, *,
                       timeout: float, ssl_context: Optional[ssl.SSLContext] = None,
                       server_hostname: Optional[str] = None,
                       require_subprotocol: Optional[str] = None) -> None:
    """Connect to ``host:port`` (over TLS with ``ssl_context``; ``server_hostname`` when
    ``host`` is an address but the certificate names another), send ``handshake``'s
    upgrade request, hand the WebSocket to ``session`` and wait until it is established
    (the peer's SETTINGS), all within ``timeout`` seconds.

    Raises what the dial raises: OSError, TimeoutError, ConnectionError, the
    :class:`HandshakeError` of a refused or broken upgrade (``HandshakeRejected`` with
    the HTTP status), or :class:`SubprotocolDeclined` with ``require_subprotocol``. On
    failure nothing is left open: a failed upgrade closed its connection itself (a
    declined subprotocol's close 1000 must still go out, so it is not aborted), any other
    failure aborts the connection, or the session once it carries it."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        transport, upgrade = await loop.create_connection(
            lambda: WebSocketUpgrade(handshake, session, require_subprotocol=require_subprotocol),
            host, port, ssl=ssl_context, server_hostname=server_hostname if ssl_context is not None else None)
        try:
            await upgrade.done
        except HandshakeError:
            raise  # the upgrade closed the connection already
        except BaseException:
            transport.abort()
            raise
        try:
            await session.wait_established()
        except BaseException:
            session.abort()
            raise
