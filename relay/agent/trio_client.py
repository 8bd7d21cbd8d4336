"""The agent on trio: :class:`TrioAgent` behaves as :class:`relay.agent.client.Agent`.

Same wire behaviour as the asyncio agent (``relay agent --backend trio`` selects this
one): one outbound WebSocket (trio-websocket) to ``GATEWAY/api/v1/agent/connect`` with
``Authorization: Bearer ak-...``, one mux session on it (``client=True``), the same hello
in SETTINGS ``info`` (``name``, ``labels``, ``version``, ``limits``, declared
``services``), the same allowlist, ``allow_stream`` policies and refusals (NOT_ALLOWED
with the same message, CONNECT_FAILED, PROTOCOL_ERROR for a bad target, REFUSED for an
unknown protocol), the same reconnect backoff (0.5 s doubling to 30 s, +-20 % jitter,
reset after a connection that lasted 10 s) and
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
the same tests against both agents. Not served yet: the web terminal (terminal streams
are refused as by an asyncio agent without ``--terminal``), several gateways or
connections at once, and ``relay bench``'s target (``relay agent --backend trio``
refuses ``--terminal``, ``--bench``, ``--tunnel``, a second ``--gateway`` and
``--connections`` above 1).
"""
from __future__ import annotations

import dataclasses
import logging
import socket
import ssl
import struct
from collections.abc import Iterable
from typing import Any, Optional

import trio

from relay.agent.base import AgentBase
from relay.agent.bind import TrioBinder
from relay.agent.client import HANDSHAKE_TIMEOUT, STABLE_CONNECTION, AgentAuthError
from relay.agent.policy import TargetRefused, no_terminal, target_tls
from relay.agent.tasks import LoopTime, TaskContext
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
                 ssl_context: Optional[ssl.SSLContext] = None) -> None:
        super().__init__(gateway_url, key, name=name, labels=labels, allow=allow, mux_config=mux_config,
                         backoff_initial=backoff_initial, backoff_max=backoff_max, jitter=jitter,
                         ssl_context=ssl_context)
        #: The current session while connected.
        self.session: Optional[TrioMuxSession] = None
        #: How many sessions were established since start (reconnects = this - 1).
        self.connections = 0
        #: Local ports bound for tunnels on the gateway's request (relay.agent.bind).
        self.binder = TrioBinder()
        self._connected = trio.Event()
        self._last_session: Optional[TrioMuxSession] = None
        # The session being served and the nursery its tasks run in.
        self._serving: Optional[tuple[TrioMuxSession, trio.Nursery]] = None

    def hello_config(self) -> MuxConfig:
        """The session config: ours (or the default) with the hello in ``info``."""
        config = self._mux_config or MuxConfig()
        return dataclasses.replace(config, info={**config.info, **self.hello_info(config)})

    # ------------------------------------------------------------------ streams and tasks

    async def _serve_stream(self, session: TrioMuxSession, stream: MuxStream) -> None:
        """Serve one stream the gateway opened as planned (AgentBase.plan_stream):
        connect, splice.

        Run by the session (its handler contract): raising StreamRefused refuses the
        stream with that code; the stream is closed when this returns."""
        try:
            plan = self.plan_stream(stream.metadata)
            if plan.protocol == TERMINAL_PROTOCOL:
                raise no_terminal(self.name)
        except TargetRefused as exc:
            raise StreamRefused(exc.error_code, exc.message) from None
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
        serving = self._serving
        if serving is None or serving[0] is not session:
            return  # the task of a connection that is over: nobody awaits its answer
        ctx = self.tasks.context(session, message, TRIO_TIME)
        scope = trio.CancelScope()  # registered now: a cancel may come before the task starts
        self.tasks.started(ctx.task_id, scope)
        serving[1].start_soon(self._run_task, ctx, scope)

    async def _run_task(self, ctx: TaskContext, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await self.tasks.run(ctx)
        finally:
            self.tasks.finished(ctx.task_id, scope)

    # ------------------------------------------------------------------ connecting

    async def run_once(self) -> None:
        """One connection: dial, serve until the session ends.

        Raises :class:`AgentAuthError` if the key is rejected (401/403), OSError,
        trio-websocket's HandshakeError or ``trio.TooSlowError`` for other failures.
        """
        from trio_websocket import ConnectionRejected, open_websocket

        self._set_state("connecting")
        headers = [(b"Authorization", f"Bearer {self._key}".encode())]
        try:
            async with open_websocket(self.host, self.port, self.path, use_ssl=self._ssl or False,
                                      extra_headers=headers, max_message_size=WS_MAX_MESSAGE,
                                      receive_buffer_size=WS_RECEIVE_SIZE,
                                      connect_timeout=HANDSHAKE_TIMEOUT,
                                      disconnect_timeout=WS_CLOSE_TIMEOUT) as ws:
                await self._serve(ws)
        except ConnectionRejected as exc:
            if exc.status_code in (401, 403):
                raise AgentAuthError("the gateway rejected the agent key: server refused the WebSocket "
                                     f"upgrade with HTTP {exc.status_code}") from None
            raise

    async def _serve(self, ws: Any) -> None:
        session: TrioMuxSession

        async def handler(stream: MuxStream) -> None:
            await self._serve_stream(session, stream)

        session = TrioMuxSession(WebSocketStream(ws), client=True, config=self.hello_config(),
                                 handler=handler, on_control=lambda message: self.on_control(message, session))
        self._last_session = session  # for run(): did the gateway refuse us, and why
        failure: Optional[Exception] = None
        # Errors are raised after the nursery, never from inside it: there they would
        # come out wrapped in an ExceptionGroup, which run()'s retry logic does not catch.
        async with trio.open_nursery() as nursery:
            self._serving = (session, nursery)  # tasks of this connection run here
            await nursery.start(session.run)
            try:
                with trio.move_on_after(HANDSHAKE_TIMEOUT) as hello_wait:
                    await session.wait_established()
                if hello_wait.cancelled_caught:
                    failure = trio.TooSlowError("the gateway sent no SETTINGS in time")
                else:
                    self.session = session
                    self.ever_connected = True
                    self.connections += 1
                    self._connected.set()
                    self._set_state("connected")
                    await session.wait_closed()
            except trio.BrokenResourceError as exc:  # the session ended before its hello
                failure = exc
            finally:  # also on cancellation: a stopped agent must not leave its socket open
                session.abort(ErrorCode.NO_ERROR, "agent stopping")
                self.session = None
                self._serving = None
                if self._connected.is_set():
                    self._connected = trio.Event()
                nursery.cancel_scope.cancel()  # the connection's tasks: nobody awaits them now
        if failure is not None:
            raise failure

    async def run(self) -> None:
        """Serve forever, reconnecting with backoff after any drop; the bindings
        (:attr:`binder`) live as long as this runs. Raises :class:`AgentAuthError` if
        the key is rejected."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.binder.serve)
                try:
                    await self._reconnect()
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # one failure (a rejected key, Ctrl-C): as is
            if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], BaseExceptionGroup):
                raise group.exceptions[0] from None
            raise

    async def _reconnect(self) -> None:
        from trio_websocket import HandshakeError

        attempt = 0
        while True:
            started = trio.current_time()
            self._last_session = None
            refused: Optional[str] = None
            try:
                await self.run_once()
                refused = self.refusal(self._last_session)
                # Start the backoff over only after a connection that lasted and was not
                # refused: one the gateway drops at once must not loop tightly.
                if refused is None and trio.current_time() - started >= STABLE_CONNECTION:
                    attempt = 0
                reason = "connection lost"
            except AgentAuthError as exc:
                if not self.ever_connected:  # never worked: a wrong key, not a revoked one
                    self._set_state("rejected")
                    raise
                refused = f"{exc} (was the key revoked?)"
            except (OSError, HandshakeError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                refused = self.refusal(self._last_session)
                reason = str(exc) or type(exc).__name__
            delay = self.backoff_delay(attempt)
            attempt += 1
            if refused is not None:
                self._refused(refused, delay)
            else:
                self._set_state("disconnected", f"{reason}; retrying in {delay:.1f}s")
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
        """Wait until a session is established; returns it."""
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
