"""The agent side of the Tunnels API's ``connect``: bind a local port that reaches a tunnel.

The gateway sends the control message ``{"type": "bind", "tunnel_id": ..., "local_port":
N, "hub": {"host": H, "port": P}, "protocol": ...}``. The agent then listens on
``127.0.0.1:N`` (loopback only: binding must never expose the tunnel to the agent's
network) and relays every connection to the tunnel's hub port ``H:P`` on the gateway
host, which carries it through the exposing agent to the target. So the hub port must be
reachable from this agent (the gateway's ``--hub-host``); a gateway on loopback only
serves agents on its own machine.

``{"type": "unbind", "tunnel_id"}`` (the binding was removed through the API) closes
that tunnel's listener.

The agent answers each bind with ``{"type": "bind.result", "request_id", "tunnel_id",
"local_port", "ok", "error"?}`` (the gateway waits for it: relay.gateway.agents.bindings). A
second bind of the same tunnel on another port replaces the first listener once the new
one is bound; the same binding again (the gateway re-sends every stored binding when the
agent connects) keeps the listener as it is. Listeners live until the agent is closed
(they do not need the agent's session: the relay is plain TCP).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Optional

from relay.aio.stream import abort_with_reset

__all__ = ["Binder"]

log = logging.getLogger("relay.agent.bind")

#: Bytes read at a time while relaying.
CHUNK = 64 * 1024
#: Connecting to the hub port may take this long.
CONNECT_TIMEOUT = 10.0


class Binder:
    """Local listeners created by ``bind`` control messages, by tunnel id."""

    def __init__(self) -> None:
        self._servers: dict[str, asyncio.Server] = {}
        # What each listener serves: tunnel id -> (local port, hub host, hub port).
        self._serving: dict[str, tuple[int, str, int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def bound(self) -> dict[str, int]:
        """Tunnel id -> local port, for what is listening now."""
        return {tid: server.sockets[0].getsockname()[1]
                for tid, server in self._servers.items() if server.sockets}

    def on_control(self, message: Any, reply: Optional[Callable[[dict[str, Any]], None]] = None) -> None:
        """Handle a ``bind`` control message (from the session's control callback);
        ``reply`` sends the ``bind.result`` back to the gateway, which waits for it."""
        task = asyncio.get_running_loop().create_task(self._serve(message, reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, message: Any, reply: Optional[Callable[[dict[str, Any]], None]]) -> None:
        port, error = await self._bind(message)
        if reply is None or not isinstance(message, dict):
            return
        result: dict[str, Any] = {"type": "bind.result", "request_id": message.get("request_id"),
                                  "tunnel_id": message.get("tunnel_id"),
                                  "local_port": message.get("local_port"), "ok": port is not None}
        if error is not None:
            result["error"] = error
        reply(result)

    def unbind(self, tunnel_id: str) -> bool:
        """Stop listening for ``tunnel_id`` (an ``unbind`` message); False if not bound."""
        if tunnel_id not in self._servers:
            return False
        log.info("tunnel %s unbound", tunnel_id)
        self._forget(tunnel_id)
        return True

    async def bind(self, message: Any) -> Optional[int]:
        """Listen on the message's local port; returns it, or None if the message is
        malformed or the port cannot be bound (logged)."""
        port, _ = await self._bind(message)
        return port

    async def _bind(self, message: Any) -> tuple[Optional[int], Optional[str]]:
        """``(local port, None)`` once listening, else ``(None, why)``."""
        try:
            tunnel_id = str(message["tunnel_id"])
            local_port = int(message["local_port"])
            hub_host = str(message["hub"]["host"])
            hub_port = int(message["hub"]["port"])
        except (KeyError, TypeError, ValueError):
            log.warning("ignored a malformed bind message: %r", message)
            return None, "malformed bind message"
        serving = (local_port, hub_host, hub_port)
        old = self._servers.get(tunnel_id)
        if old is not None and old.sockets and self._serving.get(tunnel_id) == serving:
            return local_port, None  # the same binding again (re-sent at a reconnect): keep it
        if old is not None and self._serving.get(tunnel_id, (None,))[0] == local_port:
            self._forget(tunnel_id)  # same port, other hub: free the port before binding it

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _relay_to_hub(reader, writer, hub_host, hub_port)

        try:
            server = await asyncio.start_server(relay, "127.0.0.1", local_port)
        except OSError as exc:
            log.warning("cannot bind tunnel %s on 127.0.0.1:%d: %s", tunnel_id, local_port, exc)
            return None, f"cannot listen on 127.0.0.1:{local_port}: {exc.strerror or exc}"
        self._forget(tunnel_id)  # a new port replaces the old listener once it is bound
        self._servers[tunnel_id] = server
        self._serving[tunnel_id] = serving
        log.info("tunnel %s bound on 127.0.0.1:%d (via hub %s:%d)", tunnel_id, local_port, hub_host, hub_port)
        return local_port, None

    def _forget(self, tunnel_id: str) -> None:
        server = self._servers.pop(tunnel_id, None)
        self._serving.pop(tunnel_id, None)
        if server is not None:
            server.close()

    def close(self) -> None:
        """Stop every listener."""
        for server in self._servers.values():
            server.close()
        self._servers.clear()
        self._serving.clear()
        for task in list(self._tasks):
            task.cancel()


async def _relay_to_hub(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        hub_host: str, hub_port: int) -> None:
    """Relay one local connection to the hub port, both ways, half-closes included; a
    reset of either side (or a failure) reaches the other as a reset (RST)."""
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            hub_reader, hub_writer = await asyncio.open_connection(hub_host, hub_port)
    except (OSError, TimeoutError) as exc:
        log.info("cannot reach hub %s:%d: %s", hub_host, hub_port, exc)
        writer.close()
        return
    reset = True  # unless both directions end cleanly
    try:
        # A task group: a reset on one side cancels the other direction too.
        async with asyncio.TaskGroup() as group:
            group.create_task(_copy(reader, hub_writer))
            group.create_task(_copy(hub_reader, writer))
        reset = False
    except* OSError:  # ConnectionResetError & co: the connection is over either way
        pass
    finally:
        for w in (writer, hub_writer):
            if reset:  # the other side must read a reset too, never a clean end
                abort_with_reset(w.transport)
            else:
                w.close()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then pass the EOF on (so request/response protocols finish)."""
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
