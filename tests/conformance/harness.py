"""The pairings the conformance suite runs against, behind one small interface.

A pairing is an agent (asyncio ``relay.agent.Agent`` or trio ``TrioAgent``) connected to
a gateway side (the real asyncio ``relay.gateway.app.Gateway``, or a trio host built on
``relay.trio.gateway.serve_agents``). Test bodies are trio coroutines taking an
:class:`Env`; they reach a target on the agent's machine with
``env.open_stream_to(target)``, which returns a :class:`Conn` (send, receive, send_eof,
close):

* asyncio gateway: a real TCP connection to a hub port of the gateway (a Tunnels API
  hub per target), so bytes go client -> hub -> mux -> agent -> target;
* trio host: a stream the host opens on the agent's session directly (no hub port).

What only a real gateway serves (declared services and the service proxy, tasks, the
Tunnels API's ``connect`` bindings) is tested on ``GATEWAY_PAIRINGS``, both agents
against the asyncio gateway: ``env.api(...)`` calls its HTTP API with the team's key,
``env.targets.http`` is an HTTP service on the agent's side, and ``conformance(setup=fn)``
gets ``fn(agent, env)`` called before the agent connects (to declare services, register
task handlers or set an allowlist the same way on both agents).

asyncio pieces run on a uvloop loop in a thread of their own (:class:`AsyncioThread`);
trio pieces, the target servers and the test body run in the test's ``trio.run``. All
state of the asyncio side is read on its loop (``AsyncioThread.run_sync``), never from
the trio thread directly.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import pytest
import trio

from relay.mux.errors import ErrorCode

#: ``agent-gateway`` pairings, every test runs on each.
PAIRINGS = ["asyncio-asyncio", "trio-asyncio", "asyncio-trio", "trio-trio"]
#: Both agents against the real (asyncio) gateway: services, tasks, bindings.
GATEWAY_PAIRINGS = ["asyncio-asyncio", "trio-asyncio"]
AGENT_NAME = "conformance"
#: The trio host's only valid key (the asyncio gateway makes real ones).
TRIO_HOST_KEY = "ak-conformance-trio-host"


# ---------------------------------------------------------------------------- plumbing


class AsyncioThread:
    """A uvloop event loop running in a daemon thread, driven from trio."""

    def __init__(self) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="asyncio-side", daemon=True)
        self._thread.start()

    async def call(self, fn: Callable[..., Awaitable[Any]], *args: Any, timeout: float = 30.0) -> Any:
        """Run coroutine function ``fn(*args)`` on the loop; its result (or error)."""
        future = asyncio.run_coroutine_threadsafe(fn(*args), self.loop)
        try:
            return await trio.to_thread.run_sync(future.result, timeout, abandon_on_cancel=True)
        except trio.Cancelled:
            future.cancel()
            raise

    async def run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run plain ``fn(*args)`` on the loop thread: asyncio-owned state is read there."""
        async def wrapper() -> Any:
            return fn(*args)

        return await self.call(wrapper)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass
class Conn:
    """One client connection to a target through the tunnel (both ends byte streams)."""

    send: Callable[[bytes], Awaitable[None]]
    #: ``receive(max_bytes)``: b"" at EOF; ``trio.BrokenResourceError`` after a reset.
    receive: Callable[[int], Awaitable[bytes]]
    send_eof: Callable[[], Awaitable[None]]
    close: Callable[[], Awaitable[None]]

    @classmethod
    def of(cls, stream: trio.abc.HalfCloseableStream) -> "Conn":
        return cls(stream.send_all, stream.receive_some, stream.send_eof, stream.aclose)

    async def receive_all(self, limit: int = 1 << 30) -> bytes:
        parts, total = [], 0
        while total <= limit:
            data = await self.receive(256 * 1024)
            if not data:
                return b"".join(parts)
            parts.append(data)
            total += len(data)
        raise AssertionError("received more than expected")


def session_memory(session: Any) -> int:
    """Bytes a session holds for its streams: received but not consumed (the core's
    unacknowledged count, which includes every binding buffer) plus queued to send."""
    conn = session.connection
    return conn.buffered_received + sum(conn.queued_bytes(stream_id) for stream_id in list(session.streams))


# ---------------------------------------------------------------------------- targets


@dataclass
class Targets:
    """Real TCP servers on 127.0.0.1 at the agent's side (``HOST:PORT`` strings)."""

    echo: str
    digest: str
    abort: str
    closed: str
    #: Set to let the digest server read (it starts stalled when ``stall`` is cleared).
    digest_gate: trio.Event
    #: Bytes the digest server has read so far, over all its connections.
    digest_read: list
    #: An HTTP service (tests.support.openai_server: /health, /echo/...) with the
    #: asyncio gateway only ("" otherwise).
    http: str = ""


async def _listen(nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]],
                  rcvbuf: Optional[int] = None) -> str:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=4096)
    if rcvbuf is not None:  # a small receive buffer makes a stalled reader stall early
        listeners[0].socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await nursery.start(trio.serve_listeners, _guarded(handler), listeners)
    return "127.0.0.1:%d" % listeners[0].socket.getsockname()[1]


def _guarded(handler: Callable[[trio.SocketStream], Awaitable[None]]) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A target connection that breaks (the test reset it) must not end the server."""

    async def run(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    return run


async def start_targets(nursery: trio.Nursery) -> Targets:
    gate = trio.Event()
    gate.set()
    read = [0]
    targets_box: list[Targets] = []

    async def echo(stream: trio.SocketStream) -> None:
        """Echo until EOF, then half-close."""
        while data := await stream.receive_some(256 * 1024):
            await stream.send_all(data)
        await stream.send_eof()

    async def digest(stream: trio.SocketStream) -> None:
        """Read until EOF (waiting at the gate first), then answer with the byte count
        and sha256 of everything read: an answer only possible after a half-close."""
        await targets_box[0].digest_gate.wait()
        h, n = hashlib.sha256(), 0
        while data := await stream.receive_some(256 * 1024):
            h.update(data)
            n += len(data)
            read[0] += len(data)
        await stream.send_all(struct.pack(">Q", n) + h.digest())

    async def abort(stream: trio.SocketStream) -> None:
        """Send a greeting, then abort the connection (RST, not FIN)."""
        await stream.send_all(b"bye")
        await trio.sleep(0.05)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()

    closed_sock = socket.socket()
    closed_sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    closed = "127.0.0.1:%d" % closed_sock.getsockname()[1]
    targets = Targets(await _listen(nursery, echo), await _listen(nursery, digest, rcvbuf=64 * 1024),
                      await _listen(nursery, abort), closed, gate, read)
    targets._closed_sock = closed_sock  # type: ignore[attr-defined]  # keep the port reserved
    targets_box.append(targets)
    return targets


# ---------------------------------------------------------------------------- the pairings


class Env:
    """One pairing, running. Test bodies use only the public methods."""

    def __init__(self, pairing: str, tmp_path: Path, nursery: trio.Nursery,
                 setup: Optional[Callable[[Any, "Env"], None]] = None) -> None:
        self.pairing = pairing
        self._setup = setup
        self.agent_kind, self.gateway_kind = pairing.split("-")
        self.tmp_path = tmp_path
        self.nursery = nursery
        self.aio: Optional[AsyncioThread] = None
        self.targets: Targets
        # asyncio gateway
        self._gw: Any = None
        self._store: Any = None
        self._team_id = ""
        self._keys: dict[str, str] = {}
        self._http_target: Any = None
        self._hubs: dict[str, int] = {}
        self._hub_lock = trio.Lock()
        # trio host
        self._host_sessions: list[Any] = []
        # agents
        self.agent: Any = None
        self._agent_task: Any = None
        self.key = TRIO_HOST_KEY
        self.url = ""

    # -- setup / teardown

    async def start(self) -> None:
        if "asyncio" in self.pairing:
            self.aio = AsyncioThread()
        self.targets = await start_targets(self.nursery)
        if self.gateway_kind == "asyncio":
            await self.aio.call(self._start_gateway)
        else:
            await self._start_trio_host()
        if self.agent_kind == "asyncio":
            await self.aio.call(self._start_aio_agent)
        else:
            from relay.agent.trio_client import TrioAgent

            self.agent = TrioAgent(self.url, self.key, name=AGENT_NAME, labels=["x", "conformance"],
                                   backoff_initial=0.05, backoff_max=0.5)
            if self._setup is not None:
                self._setup(self.agent, self)
            self.nursery.start_soon(self.agent.run)
        await self.wait_agent()

    async def _start_gateway(self) -> None:
        from relay.gateway.app import Gateway
        from relay.gateway.store import Store
        from tests.support.openai_server import OpenAIServer

        self._store = Store.open(self.tmp_path / "data")
        team, keys = await self._store.create_team_with_keys("conformance")
        self._team_id = team.id
        self._keys = {kind: str(key) for kind, key in keys.items()}
        self.key = self._keys["ak"]
        self._gw = Gateway(self._store)
        self._gw.services.probe_interval = 0.1  # a declared service is healthy within moments
        self._gw.services.probe_timeout = 1.0
        await self._gw.start("127.0.0.1", 0)
        self.url = self._gw.url
        self._http_target = await OpenAIServer("conformance").start()
        self.targets.http = f"127.0.0.1:{self._http_target.port}"

    async def _start_trio_host(self) -> None:
        from relay.trio.gateway import serve_agents

        async def handler(session: Any, principal: Any) -> None:
            self._host_sessions.append(session)
            await session.wait_closed()

        server = await self.nursery.start(functools.partial(
            serve_agents, handler, "127.0.0.1", 0, authenticate=lambda token: token == TRIO_HOST_KEY))
        self.url = f"http://127.0.0.1:{server.port}"

    async def _start_aio_agent(self) -> None:
        from relay.agent import Agent

        self.agent = Agent(self.url, self.key, name=AGENT_NAME, labels=["x", "conformance"],
                           backoff_initial=0.05, backoff_max=0.5)
        if self._setup is not None:
            self._setup(self.agent, self)
        self._agent_task = asyncio.get_running_loop().create_task(self.agent.run())

    async def stop(self) -> None:
        if self.aio is not None:
            with trio.move_on_after(15):
                await self.aio.call(self._stop_asyncio_side)
            self.aio.stop()

    async def _stop_asyncio_side(self) -> None:
        if self._agent_task is not None:
            self._agent_task.cancel()
            with contextlib.suppress(BaseException):
                await self._agent_task
            self.agent.close()
        if self._gw is not None:
            await self._gw.close()
            await self._store.close()
        if self._http_target is not None:
            await self._http_target.close()
        if self.agent_kind == "asyncio" and self.agent is not None:
            self.agent.binder.close()  # its listeners are the agent's, not the session's

    # -- the gateway side's view of the agent

    def _current_gateway_session(self) -> Any:
        """The gateway/host session of the connected agent (asyncio: call on its loop)."""
        if self.gateway_kind == "asyncio":
            connected = [a for a in self._gw.registry.connected() if not a.session.is_closed]
            return connected[0].session if connected else None
        live = [s for s in self._host_sessions if not s.is_closed]
        return live[-1] if live else None

    async def gateway_session(self) -> Any:
        if self.gateway_kind == "asyncio":
            return await self.aio.run_sync(self._current_gateway_session)
        return self._current_gateway_session()

    async def wait_agent(self, other_than: Any = None, timeout: float = 15.0) -> Any:
        """Wait until the agent is connected (through a session other than
        ``other_than``); returns the gateway side's session."""
        with trio.fail_after(timeout):
            while True:
                session = await self.gateway_session()
                if session is not None and session is not other_than:
                    return session
                await trio.sleep(0.02)

    async def hello(self) -> dict:
        """The agent's SETTINGS ``info`` as the gateway side received it."""
        if self.gateway_kind == "asyncio":
            return await self.aio.run_sync(lambda: dict(self._current_gateway_session().peer_info))
        return dict(self._current_gateway_session().peer_info)

    # -- the real gateway's API (GATEWAY_PAIRINGS)

    async def api(self, method: str, path: str, body: Any = None, key: str = "sk") -> tuple[int, Any]:
        """One request to the gateway's HTTP API with the team's ``key`` (sk, dk, ak);
        ``(status, parsed JSON or None)``."""
        from tests.gateway.test_gateway_e2e import http

        return await self.aio.call(http, self._gw.port, method, path, self._keys[key], body)

    async def events(self, path: str) -> list[tuple[str, Any]]:
        """A whole Server-Sent Events answer of the gateway (``[(event, data), ...]``)."""
        from tests.tunnels.test_tasks import sse

        return await self.aio.call(sse, self._gw.port, path, self._keys["sk"])

    async def agent_id(self) -> str:
        """The id the gateway gave the agent (its welcome)."""
        with trio.fail_after(10):
            while self.agent.agent_id is None:
                await trio.sleep(0.02)
        return str(self.agent.agent_id)

    async def bound(self) -> dict[str, int]:
        """The agent's bindings listening now: tunnel id -> local port."""
        if self.agent_kind == "asyncio":
            return await self.aio.run_sync(lambda: dict(self.agent.binder.bound))
        return dict(self.agent.binder.bound)

    # -- the adapter interface

    async def open_stream_to(self, target: str) -> Conn:
        """A client connection to ``target`` (``HOST:PORT`` on the agent's side)."""
        if self.gateway_kind == "asyncio":
            port = await self._hub_port(target)
            return Conn.of(await trio.open_tcp_stream("127.0.0.1", port))
        session = self._current_gateway_session()
        stream = await session.open_stream({"protocol": "tcp", "target": target})
        return Conn.of(stream)

    async def refusal(self, target: str) -> tuple[str, str]:
        """Open a stream the agent must refuse: ``(code name, message)`` it gave."""
        from relay.trio import StreamRefused

        if self.gateway_kind == "trio":
            with pytest.raises(StreamRefused) as caught:
                await self.open_stream_to(target)
            return ErrorCode(caught.value.error_code).name, caught.value.message
        try:
            conn = await self.open_stream_to(target)
        except OSError:
            conn = None  # the gateway's reset (a refusal is a RST) beat connect() returning
        if conn is not None:
            with trio.fail_after(5):  # the gateway cuts the client connection at once
                with contextlib.suppress(trio.BrokenResourceError):
                    assert await conn.receive_all() == b""
            await conn.close()
        hub_key = f"conformance {target}"

        def last_error() -> Optional[str]:
            return self._gw.tunnels.hub(hub_key).last_error

        with trio.fail_after(5):
            while (error := await self.aio.run_sync(last_error)) is None:
                await trio.sleep(0.02)
        code, _, message = error.partition(": ")
        return code, message

    async def _hub_port(self, target: str) -> int:
        async with self._hub_lock:  # one hub per target, even for concurrent first opens
            return await self._hub_port_locked(target)

    async def _hub_port_locked(self, target: str) -> int:
        if target not in self._hubs:
            host, _, port = target.rpartition(":")

            async def open_hub() -> int:
                [entry] = [a for a in self._gw.registry.connected() if not a.session.is_closed]
                hub = await self._gw.tunnels.open_hub(f"conformance {target}", self._team_id, entry.agent_id,
                                                      host, int(port))
                return hub.port

            self._hubs[target] = await self.aio.call(open_hub)
        return self._hubs[target]

    async def memory(self) -> tuple[int, int]:
        """``(agent side, gateway side)`` bytes held by the sessions for their streams."""
        if self.agent_kind == "asyncio":
            agent = await self.aio.run_sync(lambda: session_memory(self.agent.session))
        else:
            agent = session_memory(self.agent.session)
        if self.gateway_kind == "asyncio":
            gateway = await self.aio.run_sync(lambda: session_memory(self._current_gateway_session()))
        else:
            gateway = session_memory(self._current_gateway_session())
        return agent, gateway

    async def agent_open_streams(self) -> int:
        if self.agent_kind == "asyncio":
            return await self.aio.run_sync(lambda: len(self.agent.session.streams))
        return len(self.agent.session.streams)

    async def drop_agent_connection(self) -> Any:
        """Abort the agent's connection abruptly from the gateway side (no GOAWAY, the
        socket is just closed); returns the session that was dropped."""
        if self.gateway_kind == "asyncio":
            def drop() -> Any:
                session = self._current_gateway_session()
                session.abort(ErrorCode.CANCEL, "dropped by the test")
                return session

            return await self.aio.run_sync(drop)
        session = self._current_gateway_session()
        session.abort(ErrorCode.CANCEL, "dropped by the test")
        return session


def run_pairing(pairing: str, tmp_path: Path, body: Callable[[Env], Awaitable[None]], timeout: float,
                setup: Optional[Callable[[Any, Env], None]] = None) -> None:
    """Start the pairing (``setup(agent, env)`` before the agent connects), run
    ``body(env)`` bounded by ``timeout`` seconds, tear down."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            env = Env(pairing, tmp_path, nursery, setup)
            try:
                with trio.fail_after(20):
                    await env.start()
                with trio.fail_after(timeout):
                    await body(env)
            finally:
                with trio.CancelScope(shield=True):
                    await env.stop()
                nursery.cancel_scope.cancel()

    trio.run(main)


def conformance(timeout: float = 30.0, pairings: list[str] = PAIRINGS,
                setup: Optional[Callable[[Any, Env], None]] = None,
                ) -> Callable[[Callable[[Env], Awaitable[None]]], Callable[..., None]]:
    """Make an ``async def body(env)`` a test run on every pairing of ``pairings``
    (``setup(agent, env)``: called before the agent connects)."""

    def wrap(body: Callable[[Env], Awaitable[None]]) -> Callable[..., None]:
        @pytest.mark.parametrize("pairing", pairings)
        def test(pairing: str, tmp_path: Path) -> None:
            run_pairing(pairing, tmp_path, body, timeout, setup)

        test.__name__ = body.__name__
        test.__doc__ = body.__doc__
        return test

    return wrap
