"""The agent on trio: :class:`TrioAgent` behaves as :class:`relay.agent.client.Agent`.

Same wire behaviour as the asyncio agent (``relay agent --backend trio`` selects this
one): one outbound WebSocket (trio-websocket) to ``GATEWAY/api/v1/agent/connect`` with
``Authorization: Bearer ak-...``, one mux session on it (``client=True``), the same hello
in SETTINGS ``info`` (``name``, ``labels``, ``version``, ``limits``, declared
``services``), the same allowlist, ``allow_stream`` policies and refusals (NOT_ALLOWED
with the same message, CONNECT_FAILED, PROTOCOL_ERROR for a bad target, REFUSED for an
unknown protocol), the same reconnect backoff (0.5 s doubling to 30 s, +-20 % jitter,
reset after a connection that lasted 10 s; relay.agent.base.Redial) and
:class:`~relay.agent.client.AgentAuthError` for a rejected key. Allowed streams are
connected to their target with ``trio.open_tcp_stream`` (in TLS for an https target)
and spliced both ways with backpressure and half-close (:func:`splice`); udp streams
get a connected UDP socket each (relay.agent.udp).

Tasks (``agent.tasks``, relay.agent.tasks) run in a nursery of their connection, each in
a cancel scope of its own: a ``task.cancel`` or the connection's end reaches the handler
as ``trio.Cancelled``. The Tunnels API's ``bind`` listens with a
:class:`~relay.agent.bind.TrioBinder`, whose listeners live in :meth:`TrioAgent.run`'s
nursery and so outlive a reconnect, as the asyncio agent's do.

Every decision (the hello, which streams to serve and how, what a control message
means, what a task reports, what a binding keeps or refuses) is made by the code the
asyncio agent uses too (relay.agent.base, policy, tasks, bind); tests/conformance runs
the same tests against both agents. With several gateways (a fleet) it holds up to
``connections`` sessions at once, each to another gateway, and redials as the asyncio
agent does (relay.agent.base.Redial); it dials each ``--gateway`` by its name, where
the asyncio agent also dials each address of a name that has several. With
``terminal`` it serves the web terminal (relay.agent.terminal.TrioTerminalShell).
``relay agent --backend trio`` takes every option of the asyncio agent but ``--tunnel``,
which it refuses.
"""
from __future__ import annotations

import dataclasses
import logging
import socket
import ssl
import struct
from collections.abc import Iterable
from typing import Any, Optional, Union

import trio

from relay.agent.base import AgentBase, Redial
from relay.agent.bind import TrioBinder
from relay.agent.client import HANDSHAKE_TIMEOUT, AgentAuthError
from relay.agent.gateways import DialTarget, TargetRing, default_connections
from relay.agent.policy import TargetRefused, target_tls
from relay.agent.tasks import LoopTime, TaskContext
from relay.agent.terminal import TerminalSpec, serve_terminal_stream_trio
from relay.agent.udp import serve_datagram_stream_trio
from relay.mux.connection import MuxConfig
from relay.mux.errors import ErrorCode
from relay.mux.terminal import TERMINAL_PROTOCOL
from relay.trio import MuxStream, StreamRefused, TrioMuxSession, WebSocketStream

__all__ = ["TrioAgent", "splice"]

log = logging.getLogger("relay.agent")

#: Largest WebSocket message accepted from the gateway (its writes are one
#: ``data_to_send`` slice of 256 KiB plus control frames).
WS_MAX_MESSAGE = 16 * 1024 * 1024
#: trio-websocket reads 4 KiB at a time by default: far too little for bulk streams.
WS_RECEIVE_SIZE = 256 * 1024
#: Bound of the WebSocket closing handshake when a connection ends.
WS_CLOSE_TIMEOUT = 5.0
#: Bytes moved per step of a splice direction (one read, then one write).
SPLICE_CHUNK = 64 * 1024
#: A TLS handshake with an https target must end within this (asyncio's default).
TLS_HANDSHAKE_TIMEOUT = 60.0
#: What task handlers sleep and tell time with.
TRIO_TIME = LoopTime(trio.sleep, trio.current_time)


class TrioAgent(AgentBase):
    """An agent of one team on trio. ``await agent.run()`` serves until cancelled.

    Arguments as :class:`relay.agent.client.Agent`: ``allow`` holds ``HOST:PORT``
    strings (or pairs) the gateway may reach through us (empty: loopback only);
    ``labels`` are advertised; ``ssl_context`` verifies an https/wss gateway.
    """

    _backend_note = " (trio)"

    def __init__(self, gateway_url: str, key: str, *, name: Optional[str] = None,
                 labels: Iterable[str] = (), allow: Iterable[Any] = (),
                 mux_config: Optional[MuxConfig] = None,
                 backoff_initial: float = 0.5, backoff_max: float = 30.0, jitter: float = 0.2,
                 ssl_context: Optional[ssl.SSLContext] = None, more_gateways: Iterable[str] = (),
                 connections: Optional[int] = None, terminal: Optional[TerminalSpec] = None) -> None:
        super().__init__(gateway_url, key, name=name, labels=labels, allow=allow, mux_config=mux_config,
                         backoff_initial=backoff_initial, backoff_max=backoff_max, jitter=jitter,
                         ssl_context=ssl_context, more_gateways=more_gateways)
        if connections is not None and connections < 1:
            raise ValueError("connections must be at least 1")
        #: Sessions held at once, each to another gateway (None: 1; relay.agent.gateways).
        self.connections = connections
        #: The newest session while connected.
        self.session: Optional[TrioMuxSession] = None
        #: Every established session (several with ``connections`` > 1).
        self.sessions: list[TrioMuxSession] = []
        #: How many sessions were established since start.
        self.sessions_established = 0
        #: Local ports bound for tunnels on the gateway's request (relay.agent.bind).
        self.binder = TrioBinder()
        #: The web terminal this agent serves (``--terminal``; relay.agent.terminal), or
        #: None: terminal streams are refused. Advertised in the hello.
        self.terminal = terminal
        #: The shells running now (relay.agent.terminal.TrioTerminalShell).
        self.shells: set[Any] = set()
        self._connected = trio.Event()
        # The sessions being served, and the nursery each one's tasks run in.
        self._serving: dict[TrioMuxSession, trio.Nursery] = {}

    def hello_config(self, connection: int = 0) -> MuxConfig:
        """The session config: ours (or the default) with the hello in ``info``."""
        config = self._mux_config or MuxConfig()
        return dataclasses.replace(config, info={**config.info, **self.hello_info(config, connection)})

    # ------------------------------------------------------------------ streams and tasks

    async def _serve_stream(self, session: TrioMuxSession, stream: MuxStream) -> None:
        """Serve one stream the gateway opened as planned (AgentBase.plan_stream):
        connect, splice.

        Run by the session (its handler contract): raising StreamRefused refuses the
        stream with that code; the stream is closed when this returns."""
        try:
            plan = self.plan_stream(stream.metadata)
        except TargetRefused as exc:
            raise StreamRefused(exc.error_code, exc.message) from None
        if plan.protocol == TERMINAL_PROTOCOL:  # the web terminal
            await serve_terminal_stream_trio(stream, self.terminal, self.name, self.shells)
            return
        host, port = plan.host, plan.port
        if plan.protocol == "udp":  # one connected UDP socket per flow
            await serve_datagram_stream_trio(stream, host, port)
            return
        local: trio.abc.Stream
        try:
            if plan.tls:  # an https target: TLS as the asyncio agent speaks it (policy.target_tls)
                tls = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=target_tls())
                with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
                    await tls.do_handshake()
                local = tls
            else:
                local = await trio.open_tcp_stream(host, port)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            why = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ else exc
            log.info("stream to %s:%d failed: %s", host, port, why)
            raise StreamRefused(ErrorCode.CONNECT_FAILED, f"cannot connect to {host}:{port}: {why}") from None
        stream.accept()
        await splice(stream, local, session)

    def _start_task(self, session: Any, message: dict[str, Any]) -> None:
        nursery = self._serving.get(session)
        if nursery is None:
            return  # the task of a connection that is over: nobody awaits its answer
        ctx = self.tasks.context(session, message, TRIO_TIME)
        scope = trio.CancelScope()  # registered now: a cancel may come before the task starts
        self.tasks.started(ctx.task_id, scope)
        nursery.start_soon(self._run_task, ctx, scope)

    async def _run_task(self, ctx: TaskContext, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await self.tasks.run(ctx)
        finally:
            self.tasks.finished(ctx.task_id, scope)

    # ------------------------------------------------------------------ connecting

    def targets(self) -> list[DialTarget]:
        """Every place this agent may dial: each ``--gateway`` URL, dialled by its name
        (the asyncio agent also dials each address of a name that has several)."""
        found: list[DialTarget] = []
        for gateway in self.gateway_urls:
            if DialTarget(gateway) not in found:
                found.append(DialTarget(gateway))
        return found

    async def run_once(self, target: Optional[DialTarget] = None, connection: int = 0,
                       ended: Optional[list[TrioMuxSession]] = None) -> None:
        """One connection (the agent's number ``connection``, to ``target``: one of
        :meth:`targets`, by default the first URL): dial, serve until the session ends.
        ``ended`` gets the session as soon as it exists (for the reason it ended).

        Raises :class:`AgentAuthError` if the key is rejected (401/403), OSError,
        trio-websocket's HandshakeError or ``trio.TooSlowError`` for other failures.
        """
        from trio_websocket import ConnectionRejected, open_websocket

        target = target or DialTarget(self.gateway_urls[0])
        gateway = target.gateway
        self._set_state("connecting", target=target.label)
        headers = [(b"Authorization", f"Bearer {self._key}".encode())]
        use_ssl: Union[bool, ssl.SSLContext] = False
        if gateway.tls:  # the first URL's context serves every gateway (as on asyncio)
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            use_ssl = self._ssl
        try:
            async with open_websocket(gateway.host, gateway.port, gateway.path, use_ssl=use_ssl,
                                      extra_headers=headers, max_message_size=WS_MAX_MESSAGE,
                                      receive_buffer_size=WS_RECEIVE_SIZE,
                                      connect_timeout=HANDSHAKE_TIMEOUT,
                                      disconnect_timeout=WS_CLOSE_TIMEOUT) as ws:
                await self._serve(ws, target, connection, ended if ended is not None else [])
        except ConnectionRejected as exc:
            if exc.status_code in (401, 403):
                raise AgentAuthError("the gateway rejected the agent key: server refused the WebSocket "
                                     f"upgrade with HTTP {exc.status_code}") from None
            raise

    async def _serve(self, ws: Any, target: DialTarget, connection: int, ended: list[TrioMuxSession]) -> None:
        session: TrioMuxSession

        async def handler(stream: MuxStream) -> None:
            await self._serve_stream(session, stream)

        session = TrioMuxSession(WebSocketStream(ws), client=True, config=self.hello_config(connection),
                                 handler=handler, on_control=lambda message: self.on_control(message, session))
        ended.append(session)  # for the caller: did the gateway refuse us, and why
        failure: Optional[Exception] = None
        # Errors are raised after the nursery, never from inside it: there they would
        # come out wrapped in an ExceptionGroup, which run()'s retry logic does not catch.
        async with trio.open_nursery() as nursery:
            self._serving[session] = nursery  # tasks of this connection run here
            await nursery.start(session.run)
            try:
                with trio.move_on_after(HANDSHAKE_TIMEOUT) as hello_wait:
                    await session.wait_established()
                if hello_wait.cancelled_caught:
                    failure = trio.TooSlowError("the gateway sent no SETTINGS in time")
                else:
                    self.sessions.append(session)
                    self.session = session
                    self.ever_connected = True
                    self.sessions_established += 1
                    self._connected.set()
                    self._set_state("connected", target=target.label)
                    await session.wait_closed()
            except trio.BrokenResourceError as exc:  # the session ended before its hello
                failure = exc
            finally:  # also on cancellation: a stopped agent must not leave its socket open
                session.abort(ErrorCode.NO_ERROR, "agent stopping")
                if session in self.sessions:
                    self.sessions.remove(session)
                self.session = self.sessions[-1] if self.sessions else None
                del self._serving[session]
                if not self.sessions and self._connected.is_set():
                    self._connected = trio.Event()
                nursery.cancel_scope.cancel()  # the connection's tasks: nobody awaits them now
        if failure is not None:
            raise failure

    async def run(self) -> None:
        """Serve forever, reconnecting with backoff after any drop, over up to
        :attr:`connections` sessions at once, each to another gateway (when and where
        to dial again: relay.agent.base.Redial, as the asyncio agent); the bindings
        (:attr:`binder`) live as long as this runs. Raises :class:`AgentAuthError` if
        the key is rejected before it ever worked."""
        targets = self.targets()
        count = self.connections or default_connections(targets)
        ring = TargetRing(targets)
        if count > 1:
            log.info("holding up to %d sessions at once over %d gateway address(es)", count, len(targets))
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.binder.serve)
                try:
                    async with trio.open_nursery() as keepers:
                        for connection in range(count):
                            keepers.start_soon(self._keep, ring, connection, count)
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # the first reason (a rejected key, Ctrl-C) as is
            raise _first(group) from None

    async def _keep(self, ring: TargetRing, connection: int, count: int) -> None:
        """Connection number ``connection`` of the agent: dial, serve, dial again."""
        from trio_websocket import HandshakeError

        redial = Redial(self, ring, connection, count)
        while True:
            started = trio.current_time()
            ended: list[TrioMuxSession] = []
            try:
                await self.run_once(redial.target, connection, ended)
                delay = redial.ended(ended, trio.current_time() - started)
            except AgentAuthError as exc:
                delay = redial.rejected(exc)
            except (OSError, HandshakeError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                delay = redial.failed(ended, exc)
            await trio.sleep(delay)

    def close(self) -> None:
        """Drop the current connection and stop listening for bindings (``run`` would
        reconnect: cancel it to stop)."""
        super().close()
        self.binder.close()

    @property
    def connected(self) -> bool:
        """True while a session is established."""
        return self.session is not None and not self.session.is_closed

    async def wait_connected(self) -> TrioMuxSession:
        """Wait until a session is established; returns the newest."""
        while self.session is None or self.session.is_closed:
            await self._connected.wait()
            await trio.lowlevel.checkpoint()
        return self.session



async def splice(stream: MuxStream, local: trio.abc.Stream,
                 session: Optional[TrioMuxSession] = None) -> None:
    """Relay ``stream`` and ``local`` both ways until both directions have ended.

    Each direction moves one chunk at a time (read, then write), so backpressure is end
    to end with no buffer of our own: a local consumer that stops reading stops us
    taking bytes from the stream, which stops acknowledging them, so the remote sender
    stops after one window; a stream that is not writable stops us reading ``local``.
    EOF is passed on as a half-close and the other direction goes on. A failure on
    either side ends both: a local error resets the stream (CANCEL), a stream reset
    closes the local connection at once. ``session`` (the stream's) lets the splice tell
    the core when it stops reading early (``stop_reading``).
    """
    failure: list[BaseException] = []
    mux_ended = False

    async def pump(source: Any, sink: Any, from_mux: bool, scope: trio.CancelScope) -> None:
        nonlocal mux_ended
        try:
            while True:
                data = await source.receive_some(SPLICE_CHUNK)
                if not data:
                    mux_ended = mux_ended or from_mux
                    if hasattr(sink, "send_eof"):  # not over TLS, which has no half-close
                        await sink.send_eof()
                    return
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            failure.append(exc)
            scope.cancel()  # one side is gone: nothing more can be relayed either way

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, stream, local, True, nursery.cancel_scope)
            nursery.start_soon(pump, local, stream, False, nursery.cancel_scope)
    finally:
        if failure and stream.reset_error is None:
            stream.reset(ErrorCode.CANCEL, f"local connection failed: {failure[0]}")
        if not mux_ended and session is not None:
            # We read no more from the stream: the core credits what is unread and
            # answers further DATA with a RESET, rather than letting it pile up.
            session.connection.stop_reading(stream.stream_id)
        if stream.reset_error is not None:
            # A reset (or the session's end) must reach the target as a RST, never as a
            # FIN that would make a cut stream look complete: SO_LINGER {on, 0 s}.
            _linger_zero(local)
        # Both closes are immediate (no peer round trip); shielded so that a splice
        # cancelled with its session still closes the local socket.
        with trio.CancelScope(shield=True):
            await local.aclose()
            await stream.aclose()


def _linger_zero(local: Any) -> None:
    """Make closing ``local`` (a trio.SocketStream, or TLS over one) send a RST instead
    of a FIN."""
    try:
        getattr(local, "transport_stream", local).setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (AttributeError, OSError, trio.ClosedResourceError):  # not a socket, or closed
        pass


def _first(group: BaseExceptionGroup) -> BaseException:
    """The first exception in ``group`` (nested groups too) that is not a cancellation,
    else the first one."""
    _, others = group.split(trio.Cancelled)
    first: BaseException = others if others is not None else group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first

