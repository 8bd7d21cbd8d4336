"""Serve agents through another web framework's WebSocket (aiohttp, Starlette, ...).

The relay :class:`~relay.gateway.app.Gateway` normally owns its listening socket. An
application that already has a web server can instead accept the agent's WebSocket
itself, at any path, and hand the *upgraded* connection to a gateway running on the same
event loop (``await gateway.start()`` is optional then: the agent registry, hooks and
tasks work without it; call it if you also want the gateway's own HTTP API and tunnels
on a port of their own)::

    principal = await authenticate_agent(gateway, headers, peer)    # AuthError -> 401/403
    ws = ...accept the WebSocket with your framework...
    await serve_agent_websocket(gateway, principal, receive=..., send=..., close=...)

``receive()`` returns the next binary message (``bytes``) or None once the WebSocket is
closed; ``send(data)`` sends one binary message; ``close()`` closes the WebSocket. The
mux only needs an ordered byte stream, so message boundaries do not matter
(docs/PROTOCOL.md). The agent is registered, runs its hooks and takes tasks exactly as
if it had connected to the gateway's own endpoint. See examples/aiohttp_mount.py.

:func:`open_agent_stream` opens a stream to a connected agent (through the gateway's
``allow_stream`` hooks and byte accounting), for your own routing of requests to it.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from relay.aio.stream import MuxStream
from relay.gateway.auth import AuthError, Principal
from relay.gateway.hooks import GatewaySession

if TYPE_CHECKING:
    from relay.gateway.app import Gateway

__all__ = ["AgentRequest", "authenticate_agent", "open_agent_stream", "serve_agent_websocket"]

#: The session pauses its writes while more than this is waiting to be sent.
WRITE_HIGH = 1024 * 1024
WRITE_LOW = 256 * 1024


@dataclass
class AgentRequest:
    """What ``authenticate`` hooks see of an agent's upgrade request when it came
    through another framework (the gateway's own ``Request`` has the same members)."""

    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    peer: Any = None

    def header(self, name: str) -> Optional[str]:
        return self.headers.get(name.lower())


async def authenticate_agent(gateway: "Gateway", headers: Mapping[str, str], peer: Any = None) -> Principal:
    """The agent's principal from its request headers: the gateway's ``authenticate``
    hook, else its ``ak-`` key check. Raises :class:`AuthError` (``status``, ``to_json()``)."""
    request = AgentRequest({k.lower(): v for k, v in headers.items()}, peer)
    return await gateway.hooks.run_authenticate(
        request, await gateway.auth.agent_default(request.header("authorization")))


def open_agent_stream(gateway: "Gateway", team_id: str, agent_id: str, metadata: dict[str, Any]) -> MuxStream:
    """Open a stream to the team's connected agent (``metadata`` as the agent expects:
    ``{"protocol": "tcp"|"http", "target": "HOST:PORT"}``). ``await stream.wait_accepted()``
    raises StreamRefused with the reason if a hook or the agent refuses it. Raises
    LookupError if the agent is not connected."""
    agent = gateway.registry.get(team_id, agent_id)
    if agent is None:
        raise LookupError(f"agent {agent_id} is not connected")
    return agent.session.open_stream_nowait(metadata)


class _MessageTransport(asyncio.Transport):
    """An asyncio transport whose writes become WebSocket messages sent by a task.

    Writes are batched (everything written since the last send goes in one message) and
    bounded: past WRITE_HIGH bytes waiting, the session is told to pause writing."""

    def __init__(self, session: GatewaySession, send: Callable[[bytes], Awaitable[Any]],
                 close: Callable[[], Awaitable[Any]], peer: Any) -> None:
        super().__init__()
        self._session = session
        self._send = send
        self._close_ws = close
        self._peer = peer
        self._buffer: list[bytes] = []
        self._size = 0
        self._paused = False
        self._closing = False
        self._wake = asyncio.Event()
        self.reading = asyncio.Event()
        self.reading.set()
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._buffer:
                    data, self._buffer = b"".join(self._buffer), []
                    await self._send(data)
                    self._size -= len(data)
                    if self._paused and self._size <= WRITE_LOW:
                        self._paused = False
                        self._session.resume_writing()
                if self._closing:
                    break
        except Exception:  # the WebSocket failed: the session ends with it
            pass
        finally:
            self._closing = True
            await self._close_ws()

    def write(self, data: Any) -> None:
        if self._closing or not data:
            return
        self._buffer.append(bytes(data))
        self._size += len(data)
        self._wake.set()
        if not self._paused and self._size > WRITE_HIGH:
            self._paused = True
            self._session.pause_writing()

    def close(self) -> None:
        """Send what is buffered, then close the WebSocket."""
        self._closing = True
        self._wake.set()

    def abort(self) -> None:
        self._buffer.clear()
        self.close()

    def is_closing(self) -> bool:
        return self._closing

    def can_write_eof(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._peer if name == "peername" else default

    def pause_reading(self) -> None:
        self.reading.clear()

    def resume_reading(self) -> None:
        self.reading.set()

    def set_write_buffer_limits(self, high: Optional[int] = None, low: Optional[int] = None) -> None:
        pass  # the limits above apply


async def serve_agent_websocket(gateway: "Gateway", principal: Principal, *,
                                receive: Callable[[], Awaitable[Optional[bytes]]],
                                send: Callable[[bytes], Awaitable[Any]],
                                close: Callable[[], Awaitable[Any]], peer: Any = None) -> None:
    """Run one agent over an accepted WebSocket until it disconnects (see the module
    docstring). Returns when the session is over."""
    from relay.gateway.app import _refuse_agent_stream

    holder: dict[str, Any] = {}
    # The same session and control handling as the gateway's own endpoint.
    session = GatewaySession(gateway.hooks, False, gateway._mux_config, on_stream=_refuse_agent_stream,
                             on_control=lambda message: gateway._agent_control(holder, message))
    transport = _MessageTransport(session, send, close, peer)
    session.connection_made(transport)
    serving = asyncio.get_running_loop().create_task(gateway._serve_agent(principal, session, holder))
    gateway._agent_tasks.add(serving)  # cancelled by gateway.close() like the others
    serving.add_done_callback(gateway._agent_tasks.discard)
    reader = asyncio.get_running_loop().create_task(_read_loop(session, transport, receive))
    try:
        await session.wait_closed()
    finally:
        reader.cancel()
        transport.close()
        await asyncio.gather(serving, reader, return_exceptions=True)


async def _read_loop(session: GatewaySession, transport: _MessageTransport,
                     receive: Callable[[], Awaitable[Optional[bytes]]]) -> None:
    try:
        while not session.is_closed:
            await transport.reading.wait()  # the session's backpressure
            data = await receive()
            if data is None:
                break
            session.data_received(data)
    except (ConnectionError, AuthError):
        pass
    finally:
        if not session.is_closed:
            session.eof_received()
        session.connection_lost(None)
