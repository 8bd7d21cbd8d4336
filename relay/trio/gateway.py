"""The gateway side of agent sessions, for trio applications.

:func:`serve_agents` listens for agents (``relay agent``, asyncio or trio) on
``/api/v1/agent/connect`` with trio-websocket, checks each one's ``Authorization: Bearer
ak-...`` with your ``authenticate`` callable *before* the upgrade (401 otherwise, as
the asyncio gateway answers), and hands your ``handler`` a running
:class:`~relay.trio.TrioMuxSession` (``client=False``) once the agent's SETTINGS (its
hello: name, labels, version) have arrived. Open streams to the agent on it::

    async def handler(session: TrioMuxSession, principal: object) -> None:
        stream = await session.open_stream({"protocol": "tcp", "target": "127.0.0.1:22"})
        await stream.send_all(b"...")           # a trio.abc.HalfCloseableStream

    async with trio.open_nursery() as nursery:
        server = await nursery.start(functools.partial(
            serve_agents, handler, "127.0.0.1", 8080, authenticate=lambda key: key == "ak-..."))

The handler runs for as long as the agent stays connected: it is cancelled when the
session ends (agent gone, keepalive timeout), and when it returns (or fails: logged) the
session is closed gracefully (GOAWAY, open streams may finish). Streams the agent opens towards us are
refused, as the asyncio gateway does, unless ``stream_handler`` is given.
"""
from __future__ import annotations

import inspect
import json
import logging
from typing import Any, Awaitable, Callable, Optional, Union

import trio

from relay.mux.connection import MuxConfig
from relay.mux.errors import ErrorCode
from relay.trio.session import TrioMuxSession, WebSocketStream
from relay.trio.stream import MuxStream, StreamRefused

__all__ = ["AGENT_PATH", "serve_agents", "AgentHandler", "Authenticate"]

log = logging.getLogger("relay.trio.gateway")

#: The agent endpoint, the same path as the asyncio gateway's.
AGENT_PATH = "/api/v1/agent/connect"
#: An agent must complete its SETTINGS exchange within this time after the upgrade.
HELLO_TIMEOUT = 10.0
#: Largest WebSocket message accepted from an agent: its writes are at most one
#: ``data_to_send`` slice (256 KiB) plus control frames, so 16 MiB is ample.
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
#: trio-websocket reads the socket 4 KiB at a time by default; bulk streams need more.
RECEIVE_BUFFER_SIZE = 256 * 1024
#: Bound of the closing handshakes (WebSocket close, graceful session close).
CLOSE_TIMEOUT = 5.0

#: ``authenticate(token)`` -> a principal (anything truthy: passed to the handler) or
#: None/False to answer 401. ``token`` is what follows ``Bearer`` (None if absent).
#: May be a coroutine function.
Authenticate = Callable[[Optional[str]], Union[Any, Awaitable[Any]]]
#: ``handler(session, principal)``: serve one connected agent.
AgentHandler = Callable[[TrioMuxSession, Any], Awaitable[None]]


async def serve_agents(
    handler: AgentHandler,
    host: Optional[str],
    port: int,
    *,
    authenticate: Authenticate,
    config: Optional[MuxConfig] = None,
    ssl_context: Any = None,
    path: str = AGENT_PATH,
    stream_handler: Optional[Callable[[MuxStream], Awaitable[None]]] = None,
    on_control: Optional[Callable[[TrioMuxSession, Any], None]] = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve agents on ``host:port`` (0: any free port) until cancelled.

    Supports ``await nursery.start(...)``, which returns trio-websocket's
    ``WebSocketServer`` (its ``.port`` is the bound port). ``config`` is the mux config
    of every agent session. Control messages from agents (status reports) go to
    ``on_control(session, message)``, or are dropped: an unread queue would stop the
    session (backpressure). With ``ssl_context`` the endpoint is wss://.
    """
    from trio_websocket import serve_websocket  # this module is the only user of the server

    async def on_request(request: Any) -> None:
        request_path = request.path.split("?", 1)[0]
        if request_path != path:
            await _reject(request, 404, "not_found", f"no agent endpoint at {request_path}")
            return
        token = _bearer(request.headers)
        try:
            principal = authenticate(token)
            if inspect.isawaitable(principal):
                principal = await principal
        except Exception:  # a failing check must not take the server down with it
            log.exception("authenticate failed")
            await _reject(request, 500, "internal_error", "cannot check the agent key")
            return
        if not principal:
            code = "missing_credentials" if token is None else "invalid_credentials"
            await _reject(request, 401, code, "a valid agent key is required (Authorization: Bearer ak-...)")
            return
        ws = await request.accept()
        await _serve_agent(ws, principal)

    async def _serve_agent(ws: Any, principal: Any) -> None:
        session = TrioMuxSession(
            WebSocketStream(ws), client=False, config=config,
            handler=stream_handler or _refuse_agent_stream,
            on_control=(lambda message: on_control(session, message)) if on_control else _ignore)
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run)
            try:
                with trio.fail_after(HELLO_TIMEOUT):
                    await session.wait_established()
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.warning("agent connection from %s ended before its hello: %s", ws.remote, exc or "timeout")
                session.abort(ErrorCode.TIMEOUT, "no SETTINGS")
                return
            async with trio.open_nursery() as agent_scope:
                # The handler lives as long as the agent: cancelled when the session ends.
                async def watch() -> None:
                    await session.wait_closed()
                    agent_scope.cancel_scope.cancel()

                agent_scope.start_soon(watch)
                try:
                    await handler(session, principal)
                except Exception:  # one agent's handler must not end the server
                    log.exception("agent handler failed")
                finally:
                    agent_scope.cancel_scope.cancel()
            if not session.is_closed:
                await session.aclose(CLOSE_TIMEOUT)

    await serve_websocket(on_request, host, port, ssl_context,
                          max_message_size=MAX_MESSAGE_SIZE, receive_buffer_size=RECEIVE_BUFFER_SIZE,
                          connect_timeout=HELLO_TIMEOUT, disconnect_timeout=CLOSE_TIMEOUT,
                          task_status=task_status)


def _bearer(headers: list[tuple[bytes, bytes]]) -> Optional[str]:
    """The token of an ``Authorization: Bearer TOKEN`` header, else None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


async def _reject(request: Any, status: int, code: str, message: str) -> None:
    """A JSON error before any upgrade, shaped like the asyncio gateway's errors."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json")]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await request.reject(status, extra_headers=headers, body=body)


async def _refuse_agent_stream(stream: MuxStream) -> None:
    """Agents do not open streams towards the gateway: refuse, never queue."""
    raise StreamRefused(ErrorCode.REFUSED, "the gateway accepts no streams from agents")


def _ignore(message: Any) -> None:
    return None
