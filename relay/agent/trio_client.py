"""The agent on trio: :class:`TrioAgent` behaves as :class:`relay.agent.client.Agent`.

Same wire behaviour as the asyncio agent (``relay agent --backend trio`` selects this
one): one outbound WebSocket (trio-websocket) to ``GATEWAY/api/v1/agent/connect`` with
``Authorization: Bearer ak-...``, one mux session on it (``client=True``), the same hello
in SETTINGS ``info`` (``name``, ``labels``, ``version``, ``limits``), the same allowlist
and refusals (NOT_ALLOWED with the same message, CONNECT_FAILED, PROTOCOL_ERROR for a
bad target, REFUSED for an unknown protocol), the same reconnect backoff (0.5 s doubling
to 30 s, +-20 % jitter, reset after a connection that lasted 10 s) and
:class:`~relay.agent.client.AgentAuthError` for a rejected key. Allowed streams are
connected to their target with ``trio.open_tcp_stream`` and spliced both ways with
backpressure and half-close (:func:`splice`).

URL and allowlist parsing, target checks with their refusal messages, and the backoff
come from ``relay.agent.policy``, which the asyncio agent uses too; tests/conformance
checks that both agents answer alike. Not ported yet (the asyncio agent grew them meanwhile): the Tunnels API
``bind`` control (``relay.agent.bind`` is asyncio-only; answered with a failure), task
handlers (``relay.agent.tasks``), ``allow_stream`` policies and declared services;
``relay agent --backend trio`` (its body is in relay.cli.run) refuses ``--service``
rather than ignore it.
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

from relay import __version__
from relay.agent.base import AgentBase
from relay.agent.client import HANDSHAKE_TIMEOUT, STABLE_CONNECTION, AgentAuthError
from relay.agent.policy import TargetRefused, allowed_by_list, not_allowed_message, parse_target
from relay.mux.connection import MuxConfig
from relay.mux.errors import ErrorCode
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
        self._connected = trio.Event()
        self._last_session: Optional[TrioMuxSession] = None

    # ------------------------------------------------------------------ policy (relay.agent.policy)

    def is_allowed(self, host: str, port: int) -> bool:
        """May the gateway reach ``host:port`` through this agent?"""
        return allowed_by_list(self.allow, host, port)

    def check_target(self, metadata: Any) -> tuple[str, int]:
        """``(host, port)`` of an incoming stream's target, or :class:`StreamRefused`
        with the code and message the asyncio agent uses."""
        try:
            host, port = parse_target(metadata)
        except TargetRefused as exc:
            raise StreamRefused(exc.error_code, exc.message) from None
        if not self.is_allowed(host, port):
            log.warning("refused stream to %s:%d: not on this agent's allowlist", host, port)
            raise StreamRefused(ErrorCode.NOT_ALLOWED, not_allowed_message(host, port, self.name, self.allow))
        return host, port

    def hello_config(self) -> MuxConfig:
        """The session config: ours (or the default) with the hello in ``info``."""
        config = self._mux_config or MuxConfig()
        info = {"name": self.name, "labels": self.labels, "version": __version__,
                "instance": self.instance_id, "limits": {"max_streams": config.max_streams},
                **self.allow_hello(TrioAgent.is_allowed)}
        return dataclasses.replace(config, info={**config.info, **info})

    # ------------------------------------------------------------------ streams

    async def _serve_stream(self, session: TrioMuxSession, stream: MuxStream) -> None:
        """Serve one stream the gateway opened: check the target, connect, splice.

        Run by the session (its handler contract): raising StreamRefused refuses the
        stream with that code; the stream is closed when this returns."""
        host, port = self.check_target(stream.metadata)
        if isinstance(stream.metadata, dict) and stream.metadata.get("tls") is True:
            # Refused with a reason rather than spoken to in plain text (which the target
            # would answer with a TLS alert, seen by the client as a broken response).
            raise StreamRefused(ErrorCode.REFUSED, "the trio agent does not connect to https targets yet")
        try:
            local = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            log.info("stream to %s:%d failed: %s", host, port, exc)
            raise StreamRefused(ErrorCode.CONNECT_FAILED, f"cannot connect to {host}:{port}: {exc}") from None
        stream.accept()
        await splice(stream, local, session)

    def _on_control(self, message: Any) -> None:
        if isinstance(message, dict) and message.get("type") == "welcome":
            self.agent_id = str(message.get("agent_id"))
            log.info("registered as agent %s (%s)", self.agent_id, self.name)
        elif isinstance(message, dict) and message.get("type") == "task":
            # Answer rather than ignore: an unanswered task would wait forever.
            log.warning("the trio agent runs no tasks yet; refusing task %s", message.get("task_id"))
            if self.session is not None and not self.session.is_closed:
                self.session.send_control({"type": "task.error", "task_id": message.get("task_id"),
                                           "error": "this agent (trio backend) runs no tasks"})
        elif isinstance(message, dict) and message.get("type") == "bind":
            # Answer rather than ignore: the gateway's connect call waits for the result.
            log.warning("the trio agent does not serve bind messages yet; refusing it")
            if self.session is not None and not self.session.is_closed:
                self.session.send_control({"type": "bind.result", "request_id": message.get("request_id"),
                                           "tunnel_id": message.get("tunnel_id"),
                                           "local_port": message.get("local_port"), "ok": False,
                                           "error": "this agent (trio backend) does not bind tunnels yet"})

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
                                 handler=handler, on_control=self._on_control)
        self._last_session = session  # for run(): did the gateway refuse us, and why
        failure: Optional[Exception] = None
        # Errors are raised after the nursery, never from inside it: there they would
        # come out wrapped in an ExceptionGroup, which run()'s retry logic does not catch.
        async with trio.open_nursery() as nursery:
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
                if self._connected.is_set():
                    self._connected = trio.Event()
        if failure is not None:
            raise failure

    async def run(self) -> None:
        """Serve forever, reconnecting with backoff after any drop. Raises
        :class:`AgentAuthError` if the key is rejected."""
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



async def splice(stream: MuxStream, local: trio.abc.HalfCloseableStream,
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
    """Make closing ``local`` (a trio.SocketStream) send a RST instead of a FIN."""
    try:
        local.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (AttributeError, OSError, trio.ClosedResourceError):  # not a socket, or closed
        pass
