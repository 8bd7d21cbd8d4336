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

:class:`BinderBase` decides all of that (the message's fields, keep or replace, the
errors, the answer) without an event loop; :class:`Binder` (asyncio) and
:class:`TrioBinder` (trio) only listen, accept and relay bytes.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Optional, TypeVar

import trio

from relay.aio.stream import abort_with_reset

__all__ = ["BindRequest", "Binder", "BinderBase", "TrioBinder"]

log = logging.getLogger("relay.agent.bind")

#: Bytes read at a time while relaying.
CHUNK = 64 * 1024
#: Connecting to the hub port may take this long.
CONNECT_TIMEOUT = 10.0

Reply = Callable[[dict[str, Any]], None]
L = TypeVar("L")


@dataclass(frozen=True)
class BindRequest:
    """A ``bind`` message's fields: listen on ``local_port``, relay to the hub."""

    tunnel_id: str
    local_port: int
    hub_host: str
    hub_port: int

    @classmethod
    def parse(cls, message: Any) -> "BindRequest":
        """The request in ``message``; ValueError if a field is missing or malformed."""
        try:
            return cls(str(message["tunnel_id"]), int(message["local_port"]),
                       str(message["hub"]["host"]), int(message["hub"]["port"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError("malformed bind message") from None


def bind_result(message: Any, error: Optional[str]) -> dict[str, Any]:
    """The ``bind.result`` answering ``message`` (``error``: None once listening)."""
    result: dict[str, Any] = {"type": "bind.result", "request_id": message.get("request_id"),
                              "tunnel_id": message.get("tunnel_id"),
                              "local_port": message.get("local_port"), "ok": error is None}
    if error is not None:
        result["error"] = error
    return result


class BinderBase(Generic[L]):
    """Local listeners created by ``bind`` control messages, by tunnel id: what to keep,
    replace or refuse. A subclass listens (``_listen``), stops a listener (``_stop``)
    and says on which port one listens (``_port``), with its loop."""

    def __init__(self) -> None:
        self._listeners: dict[str, L] = {}
        # What each listener serves: tunnel id -> (local port, hub host, hub port).
        self._serving: dict[str, tuple[int, str, int]] = {}

    @property
    def bound(self) -> dict[str, int]:
        """Tunnel id -> local port, for what is listening now."""
        ports = {tid: self._port(listener) for tid, listener in self._listeners.items()}
        return {tid: port for tid, port in ports.items() if port is not None}

    async def answer(self, message: Any, reply: Optional[Reply]) -> None:
        """Bind as ``message`` asks, then ``reply`` with the ``bind.result``."""
        _, error = await self._bind(message)
        if reply is not None and isinstance(message, dict):
            reply(bind_result(message, error))

    def unbind(self, tunnel_id: str) -> bool:
        """Stop listening for ``tunnel_id`` (an ``unbind`` message); False if not bound."""
        if tunnel_id not in self._listeners:
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
            request = BindRequest.parse(message)
        except ValueError as exc:
            log.warning("ignored a malformed bind message: %r", message)
            return None, str(exc)
        tunnel_id, local_port = request.tunnel_id, request.local_port
        serving = (local_port, request.hub_host, request.hub_port)
        old = self._listeners.get(tunnel_id)
        if old is not None and self._port(old) is not None and self._serving.get(tunnel_id) == serving:
            return local_port, None  # the same binding again (re-sent at a reconnect): keep it
        if old is not None and self._serving.get(tunnel_id, (None,))[0] == local_port:
            self._forget(tunnel_id)  # same port, other hub: free the port before binding it
        try:
            listener = await self._listen(request)
        except OSError as exc:
            log.warning("cannot bind tunnel %s on 127.0.0.1:%d: %s", tunnel_id, local_port, exc)
            return None, f"cannot listen on 127.0.0.1:{local_port}: {exc.strerror or exc}"
        self._forget(tunnel_id)  # a new port replaces the old listener once it is bound
        self._listeners[tunnel_id] = listener
        self._serving[tunnel_id] = serving
        log.info("tunnel %s bound on 127.0.0.1:%d (via hub %s:%d)", tunnel_id, local_port,
                 request.hub_host, request.hub_port)
        return local_port, None

    def _forget(self, tunnel_id: str) -> None:
        listener = self._listeners.pop(tunnel_id, None)
        self._serving.pop(tunnel_id, None)
        if listener is not None:
            self._stop(listener)

    def close(self) -> None:
        """Stop every listener."""
        for listener in self._listeners.values():
            self._stop(listener)
        self._listeners.clear()
        self._serving.clear()

    # What a loop provides.

    async def _listen(self, request: BindRequest) -> L:
        """Listen on ``127.0.0.1:request.local_port`` and relay every connection to the
        hub; OSError if the port cannot be bound."""
        raise NotImplementedError

    def _stop(self, listener: L) -> None:
        """Stop listening at once (the port is free when this returns)."""
        raise NotImplementedError

    def _port(self, listener: L) -> Optional[int]:
        """The port ``listener`` listens on, None once it stopped."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- asyncio


class Binder(BinderBase[asyncio.Server]):
    """The bindings of the asyncio agent: an ``asyncio.Server`` per tunnel."""

    def __init__(self) -> None:
        super().__init__()
        self._tasks: set[asyncio.Task[None]] = set()

    def on_control(self, message: Any, reply: Optional[Reply] = None) -> None:
        """Handle a ``bind`` control message (from the session's control callback);
        ``reply`` sends the ``bind.result`` back to the gateway, which waits for it."""
        task = asyncio.get_running_loop().create_task(self.answer(message, reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _listen(self, request: BindRequest) -> asyncio.Server:
        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _relay_to_hub(reader, writer, request.hub_host, request.hub_port)

        return await asyncio.start_server(relay, "127.0.0.1", request.local_port)

    def _stop(self, listener: asyncio.Server) -> None:
        listener.close()

    def _port(self, listener: asyncio.Server) -> Optional[int]:
        return listener.sockets[0].getsockname()[1] if listener.sockets else None

    def close(self) -> None:
        """Stop every listener."""
        super().close()
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


# ----------------------------------------------------------------------------- trio


@dataclass
class _TrioListener:
    listener: trio.SocketListener
    port: int
    scope: trio.CancelScope
    stopped: bool = False


class TrioBinder(BinderBase[_TrioListener]):
    """The bindings of the trio agent. Its listeners, and the connections they relay,
    run in the nursery of :meth:`serve` (the agent's ``run``): they outlive sessions."""

    def __init__(self) -> None:
        super().__init__()
        self._nursery: Optional[trio.Nursery] = None

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the listeners until cancelled (then every one is closed)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.close()

    def on_control(self, message: Any, reply: Optional[Reply] = None) -> None:
        """Handle a ``bind`` control message; ``reply`` sends the ``bind.result``."""
        if self._nursery is None:  # not serving (run_once alone): answer, never leave it waiting
            if reply is not None and isinstance(message, dict):
                reply(bind_result(message, "this agent is not running its bindings (TrioAgent.run)"))
            return
        self._nursery.start_soon(self.answer, message, reply)

    async def _listen(self, request: BindRequest) -> _TrioListener:
        assert self._nursery is not None
        [listener] = await trio.open_tcp_listeners(request.local_port, host="127.0.0.1")
        entry = _TrioListener(listener, listener.socket.getsockname()[1], trio.CancelScope())
        self._nursery.start_soon(self._accept, entry, request)
        return entry

    async def _accept(self, entry: _TrioListener, request: BindRequest) -> None:
        assert self._nursery is not None
        nursery = self._nursery
        with entry.scope:
            while True:
                try:
                    conn = await entry.listener.accept()
                except trio.ClosedResourceError:
                    return
                except OSError as exc:  # out of file descriptors and the like: wait, go on
                    log.warning("tunnel %s: accept failed: %s", request.tunnel_id, exc)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(_trio_relay_to_hub, conn, request.hub_host, request.hub_port)

    def _stop(self, listener: _TrioListener) -> None:
        listener.stopped = True
        listener.scope.cancel()
        listener.listener.socket.close()  # now: the port may be bound again at once

    def _port(self, listener: _TrioListener) -> Optional[int]:
        return None if listener.stopped else listener.port


async def _trio_relay_to_hub(conn: trio.SocketStream, hub_host: str, hub_port: int) -> None:
    """:func:`_relay_to_hub` on trio: both ways, half-closes included; a reset or failure
    of either side reaches the other as a reset (RST)."""
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            hub = await trio.open_tcp_stream(hub_host, hub_port)
    except (OSError, trio.TooSlowError) as exc:
        log.info("cannot reach hub %s:%d: %s", hub_host, hub_port, exc)
        await trio.aclose_forcefully(conn)
        return
    failed = False

    async def copy(source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope) -> None:
        nonlocal failed
        try:
            while data := await source.receive_some(CHUNK):
                await sink.send_all(data)
            await sink.send_eof()  # pass the EOF on (so request/response protocols finish)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            failed = True
            scope.cancel()  # the connection is over either way

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(copy, conn, hub, nursery.cancel_scope)
            nursery.start_soon(copy, hub, conn, nursery.cancel_scope)
    finally:
        for side in (conn, hub):
            if failed:  # the other side must read a reset too, never a clean end
                _trio_linger_zero(side)
            await trio.aclose_forcefully(side)


def _trio_linger_zero(stream: trio.SocketStream) -> None:
    """Make closing ``stream`` send a RST instead of a FIN."""
    try:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, trio.ClosedResourceError):
        pass
