"""TrioMuxSession: one sans-IO MuxConnection driven by trio over one byte stream.

Three tasks run the session (all protocol decisions stay in the core):

* the receive loop: ``transport.receive_some`` -> ``MuxConnection.receive_data`` ->
  events dispatched to streams;
* the send loop: sleeps on an event set after every command, writes
  ``data_to_send(FLUSH_SLICE)`` slices with ``send_all``, and wakes the writers the core
  reports in ``writable_streams()``; it is the only task that writes to the transport;
* the timer loop: sleeps until ``next_deadline()`` and calls ``handle_timer``
  (keepalive PINGs, dead-peer detection, half-closed timeouts).

The transport is any ``trio.abc.Stream`` (TCP, TLS, memory streams); over trio-websocket
wrap the connection in :class:`WebSocketStream`, which carries each ``data_to_send``
output as one binary message.
"""
from __future__ import annotations

import logging
import math
import sys
from collections import deque
from typing import Any, Awaitable, Callable, Optional

import trio

from relay.binding import StreamEventRouter
from relay.mux.connection import MuxConfig, MuxConnection
from relay.mux.errors import ErrorCode, ProtocolError, StreamLimitError
from relay.mux.events import (
    ConnectionTerminated,
    ControlReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    PingAcknowledged,
    StreamOpened,
)
from relay.trio.stream import MuxStream, StreamRefused

log = logging.getLogger("relay.trio")

#: Bytes of DATA per ``data_to_send`` call: big enough to amortise the call and the
#: write, small enough that other tasks run between slices.
FLUSH_SLICE = 256 * 1024
#: ``receive_some`` size on the transport.
RECEIVE_SIZE = 256 * 1024
#: Control messages queued for ``next_control`` before the session stops reading the
#: transport (backpressure instead of an unbounded queue).
CONTROL_QUEUE_LIMIT = 256
#: After a protocol error the GOAWAY gets this long to leave before the transport closes.
GOAWAY_LINGER = 5.0
#: Default bound of a graceful ``aclose``: past it, open streams are reset.
CLOSE_TIMEOUT = 10.0
#: Timers fire this much after the core's deadline, so it has surely passed.
_TIMER_SLACK = 0.001

StreamHandler = Callable[[MuxStream], Awaitable[None]]
ControlHandler = Callable[[Any], None]


class SessionClosedError(trio.BrokenResourceError):
    """The session is over (peer gone, protocol error, keepalive timeout, or closed)."""

    def __init__(self, error_code: int, message: str = "") -> None:
        super().__init__(f"mux session closed ({error_code}){': ' + message if message else ''}")
        self.error_code = error_code
        self.message = message


class WebSocketStream(trio.abc.Stream):
    """A ``trio_websocket.WebSocketConnection`` as a byte stream for a session.

    Each ``send_all`` (one ``data_to_send`` output) is one binary message; received
    binary messages are concatenated (the mux splits frames itself, docs/PROTOCOL.md §1).
    A closed WebSocket reads as EOF; a text message breaks the stream. Open the
    connection with a ``max_message_size`` above the peer's largest write (FLUSH_SLICE
    plus control frames; 16 MiB is ample).
    """

    def __init__(self, ws: Any) -> None:
        from trio_websocket import ConnectionClosed  # only this adapter needs trio-websocket

        self._ws = ws
        self._closed_error = ConnectionClosed
        self._pending = memoryview(b"")

    @property
    def websocket(self) -> Any:
        return self._ws

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._ws.send_message(bytes(data))
        except self._closed_error as exc:
            raise trio.BrokenResourceError("the WebSocket is closed") from exc

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: Optional[int] = None) -> bytes:
        while not self._pending:  # an empty message is not EOF: skip it
            try:
                message = await self._ws.get_message()
            except self._closed_error:
                return b""
            if isinstance(message, str):
                raise trio.BrokenResourceError("text message on a mux WebSocket")
            self._pending = memoryview(message)
        n = len(self._pending) if max_bytes is None else max_bytes
        data, self._pending = self._pending[:n], self._pending[n:]
        return bytes(data)

    async def aclose(self) -> None:
        await self._ws.aclose()


class _PingWaiter:
    """A :meth:`TrioMuxSession.ping` in flight: set ``done`` when its echo (``rtt``)
    arrives, or when the session ends (``rtt`` stays None)."""

    __slots__ = ("done", "rtt")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.rtt: Optional[float] = None


class TrioMuxSession(StreamEventRouter):
    """A multiplexed session over one ``trio.abc.Stream``.

    ``client=True`` on the dialling side (the agent). Run it with ``async with
    TrioMuxSession(...) as session:`` (graceful close on exit), or start
    :meth:`run` in a nursery (``await nursery.start(session.run)``) and call
    :meth:`aclose` when done.

    Incoming streams go to ``handler(stream)`` if given (run in the session's nursery;
    the stream is not answered yet: call ``stream.accept()`` or ``stream.refuse()``; an
    unanswered stream is refused when the handler returns, the stream is closed after
    it, and a handler error resets the stream, logged, without ending the session);
    otherwise to :meth:`accept_stream` / :meth:`next_stream`. Control messages go to
    ``on_control(message)`` if given, otherwise to :meth:`next_control`.
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        client: bool,
        config: Optional[MuxConfig] = None,
        *,
        handler: Optional[StreamHandler] = None,
        on_control: Optional[ControlHandler] = None,
    ) -> None:
        self._transport = transport
        self._conn = MuxConnection(client, config)
        self._handler = handler
        self._on_control = on_control
        self._streams: dict[int, MuxStream] = {}
        #: Finished streams whose last bytes (and FIN) still sit in the core queue.
        self._flushing: set[int] = set()
        self._incoming: deque[MuxStream] = deque()
        self._incoming_lot = trio.lowlevel.ParkingLot()
        self._controls: deque[Any] = deque()
        self._control_lot = trio.lowlevel.ParkingLot()  # next_control waiters
        self._control_room = trio.lowlevel.ParkingLot()  # the receive loop, queue full
        self._ping_waiters: dict[int, _PingWaiter] = {}  # by the core's ping id
        self._send_wanted = trio.Event()
        self._hello = trio.Event()
        self._ending = trio.Event()  # the session is over: stop the loops
        self._flushed = trio.Event()  # after the end: everything left was written
        self._closed = trio.Event()  # run() finished and the transport is closed
        self._flush_on_end = False
        self._timer_scope: Optional[trio.CancelScope] = None
        self._nursery: Optional[trio.Nursery] = None
        self._nursery_manager: Any = None
        self._started = False
        self._draining = False
        self._closed_locally = False
        self._error: Optional[SessionClosedError] = None
        #: The peer's GOAWAY, once received.
        self.goaway_received: Optional[GoAwayReceived] = None

    # ------------------------------------------------------------------ inspection

    @property
    def connection(self) -> MuxConnection:
        """The sans-IO core (for inspection; drive it only through this session)."""
        return self._conn

    @property
    def transport(self) -> trio.abc.Stream:
        return self._transport

    @property
    def peer_info(self) -> dict[str, Any]:
        """What the peer sent in its SETTINGS ``info`` (empty until established)."""
        return self._conn.peer_info

    @property
    def established(self) -> bool:
        return self._conn.established

    @property
    def is_closed(self) -> bool:
        return self._error is not None

    @property
    def error(self) -> Optional[SessionClosedError]:
        """Why the session ended (None while it runs)."""
        return self._error

    @property
    def streams(self) -> dict[int, MuxStream]:
        """Streams not finished yet, by id (read-only by convention)."""
        return self._streams

    async def wait_established(self) -> dict[str, Any]:
        """Wait for the peer's SETTINGS; returns its ``info``."""
        await self._hello.wait()
        self._check_open()
        return self._conn.peer_info

    async def wait_closed(self) -> None:
        """Wait until :meth:`run` has finished and the transport is closed."""
        await self._closed.wait()

    # ------------------------------------------------------------------ running

    async def __aenter__(self) -> "TrioMuxSession":
        self._nursery_manager = trio.open_nursery()
        nursery = await self._nursery_manager.__aenter__()
        try:
            await nursery.start(self.run)
        except BaseException:
            await self._nursery_manager.__aexit__(*sys.exc_info())
            raise
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        try:
            if exc_type is None:
                await self.aclose()
            else:
                self.abort()
        finally:
            # The body's exception is not handed to the nursery: it would come back
            # wrapped in an ExceptionGroup. The session's tasks end by themselves now.
            await self._nursery_manager.__aexit__(None, None, None)
        return False

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Drive the session until it ends, then close the transport.

        Returns normally however the session ended (see :attr:`error`); streams still
        open are reset and their users get ``trio.BrokenResourceError``.
        """
        if self._started:
            raise RuntimeError("the session is already running (or has run)")
        self._started = True
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._receive_loop)
                nursery.start_soon(self._send_loop)
                nursery.start_soon(self._timer_loop)
                task_status.started()
                await self._ending.wait()
                if self._flush_on_end:  # a GOAWAY to deliver: give it a bounded chance
                    with trio.move_on_after(GOAWAY_LINGER):
                        await self._flushed.wait()
                nursery.cancel_scope.cancel()  # handlers too: their streams are gone
        finally:
            self._finish(ErrorCode.CANCEL, "the session stopped")
            if self._flush_on_end:
                # A graceful end closes the transport gracefully too (a WebSocket sends
                # its close frame), within a bound and even if run() is being cancelled.
                with trio.CancelScope(shield=True), trio.move_on_after(GOAWAY_LINGER):
                    try:
                        await self._transport.aclose()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
            await trio.aclose_forcefully(self._transport)  # idempotent: surely closed now
            self._closed.set()

    # ------------------------------------------------------------------ streams

    def open_stream_nowait(self, metadata: Optional[dict[str, Any]] = None) -> MuxStream:
        """Open a stream and return it at once; data may be sent before it is accepted.

        With no room for another stream (the peer's limit, or this side's receive budget)
        the stream comes back already refused with TOO_MANY_STREAMS, as if the peer had
        refused it: ``wait_accepted`` raises :class:`StreamRefused`."""
        self._check_open()
        try:
            stream_id = self._conn.open_stream(metadata or {})
        except StreamLimitError as exc:
            refused = MuxStream(self, 0, metadata or {}, local=True)  # id 0: never on the wire
            refused._on_reset(ErrorCode.TOO_MANY_STREAMS, str(exc), remote=True)
            return refused
        stream = MuxStream(self, stream_id, metadata or {}, local=True)
        self._streams[stream_id] = stream
        self._wake_sender()
        return stream

    async def open_stream(self, metadata: Optional[dict[str, Any]] = None) -> MuxStream:
        """Open a stream and wait until the peer accepts it.

        Raises :class:`StreamRefused` with the peer's code and message if it refuses,
        :class:`SessionClosedError` / :class:`StreamResetError` (both
        ``trio.BrokenResourceError``) if the session ends first.
        """
        stream = self.open_stream_nowait(metadata)
        try:
            await stream.wait_accepted()
        except trio.Cancelled:
            stream.reset(ErrorCode.CANCEL, "open cancelled")
            raise
        return stream

    async def next_stream(self) -> MuxStream:
        """The next incoming stream, not answered yet (``accept()`` or ``refuse()`` it).

        Raises :class:`SessionClosedError` once the session is over.
        """
        while not self._incoming:
            self._check_open()
            await self._incoming_lot.park()
        await trio.lowlevel.checkpoint()
        if not self._incoming:  # taken meanwhile by another task
            return await self.next_stream()
        return self._incoming.popleft()

    async def accept_stream(self) -> MuxStream:
        """The next incoming stream, accepted (streams reset before that are skipped)."""
        while True:
            stream = await self.next_stream()
            if stream._reset is None:
                stream.accept()
                return stream

    # ------------------------------------------------------------------ session-level

    def send_control(self, message: Any) -> None:
        """Send an application control message (msgpack-encodable)."""
        self._check_open()
        self._conn.send_control(message)
        self._wake_sender()

    async def next_control(self) -> Any:
        """The next control message from the peer (when no ``on_control`` was given)."""
        while not self._controls:
            self._check_open()
            await self._control_lot.park()
        await trio.lowlevel.checkpoint()
        if not self._controls:
            return await self.next_control()
        message = self._controls.popleft()
        self._control_room.unpark_all()
        return message

    async def ping(self) -> float:
        """Send a PING and return its round-trip time in seconds."""
        self._check_open()
        waiter = _PingWaiter()
        self._ping_waiters[self._conn.ping(trio.current_time())] = waiter
        self._wake_sender()
        await waiter.done.wait()
        if waiter.rtt is None:
            self._check_open()  # woken by the session's end
        assert waiter.rtt is not None  # the PING went out with trio's clock: it was timed
        return waiter.rtt

    def goaway(self, error_code: int = ErrorCode.NO_ERROR, message: str = "") -> None:
        """Start a graceful close: the peer opens no more streams; once every stream has
        finished and everything is written, the session ends and the transport closes."""
        if self._error is not None:
            return
        self._conn.goaway(error_code, message)
        self._draining = True
        self._wake_sender()  # the send loop notices when the drain is complete

    def abort(self, error_code: int = ErrorCode.CANCEL, message: str = "session aborted") -> None:
        """End now: every stream is reset, the transport is closed without flushing."""
        self._closed_locally = True
        self._finish(error_code, message)

    async def aclose(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Graceful close (:meth:`goaway`, wait for streams to finish) bounded by
        ``timeout`` seconds, after which (or on cancellation) the session is aborted."""
        self._closed_locally = True
        if not self._started:
            self._finish(ErrorCode.NO_ERROR, "closed before running")
            await trio.aclose_forcefully(self._transport)
            self._closed.set()
            return
        self.goaway()
        # Opens nobody took yet will never be taken now: refuse them (REFUSED is safe to
        # retry on a new session) rather than let them hold the drain until the timeout.
        while self._incoming:
            stream = self._incoming.popleft()
            if not stream.answered:
                stream.refuse(ErrorCode.REFUSED, "the session is closing")
        try:
            with trio.move_on_after(timeout):
                await self._closed.wait()
        finally:
            if not self._closed.is_set():
                self.abort(ErrorCode.TIMEOUT, "graceful close timed out")
                with trio.CancelScope(shield=True):
                    await self._closed.wait()  # run() ends at once after an abort

    # ------------------------------------------------------------------ the loops

    async def _receive_loop(self) -> None:
        conn = self._conn
        transport = self._transport
        while self._error is None:
            try:
                data = await transport.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            try:
                events = conn.receive_data(data, trio.current_time())
            except ProtocolError as exc:
                log.warning("mux protocol error from peer: %s", exc)
                # The core queued a GOAWAY: end with a flush so it leaves.
                self._finish(int(exc.error_code), str(exc), flush=True)
                self._dispatch(getattr(exc, "events", []))
                return
            self._dispatch(events)
            if not data or self._error is not None:
                self._finish(ErrorCode.CANCEL, "the transport closed")
                return
            self._wake_sender()  # answers (PING ACK, WINDOW_UPDATE ...) and reopened windows
            self._reschedule_timer()
            # Backpressure: a full control queue stops reading, as any slow consumer does.
            while len(self._controls) >= CONTROL_QUEUE_LIMIT and self._error is None:
                await self._control_room.park()

    async def _send_loop(self) -> None:
        conn = self._conn
        transport = self._transport
        streams = self._streams
        while True:
            data = conn.data_to_send(FLUSH_SLICE)
            # Wake writers before writing: they refill the queue while this write runs.
            for stream_id in conn.writable_streams():
                if stream_id == 0:  # the session window reopened: every blocked writer may go on
                    for blocked in streams.values():
                        blocked._on_writable()
                    continue
                stream = streams.get(stream_id)
                if stream is not None:
                    stream._on_writable()
            if data:
                try:
                    await transport.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._finish(ErrorCode.CANCEL, f"transport failed: {exc}")
                    return
                continue
            if self._error is not None:
                self._flushed.set()
                return
            if self._flushing:
                self._flushing = {s for s in self._flushing if conn.queued_bytes(s)}
            if self._draining and not self._streams and not self._flushing:
                self._finish(ErrorCode.NO_ERROR, "session closed", flush=True)
                continue  # one more pass: write what the core still holds, then stop
            await self._send_wanted.wait()
            self._send_wanted = trio.Event()

    async def _timer_loop(self) -> None:
        conn = self._conn
        # Start the silence clock now, so a peer that never speaks still times out.
        self._dispatch(conn.handle_timer(trio.current_time()))
        while self._error is None:
            deadline = conn.next_deadline()
            with trio.CancelScope(deadline=math.inf if deadline is None else deadline + _TIMER_SLACK) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            # Early or spurious wake-ups are harmless: the core only does what is due.
            self._dispatch(conn.handle_timer(trio.current_time()))
            self._wake_sender()

    def _reschedule_timer(self) -> None:
        scope = self._timer_scope
        deadline = self._conn.next_deadline()
        if scope is not None and deadline is not None and deadline + _TIMER_SLACK < scope.deadline:
            scope.deadline = deadline + _TIMER_SLACK

    # ------------------------------------------------------------------ events

    def _dispatch(self, events: list[Event]) -> None:
        for event in self._route_stream_events(events):
            if type(event) is ControlReceived:
                self._on_control_received(event.message)
            elif type(event) is PingAcknowledged:
                waiter = self._ping_waiters.pop(event.ping_id, None)  # None: a keepalive
                if waiter is not None:
                    waiter.rtt = event.rtt
                    waiter.done.set()
            elif type(event) is HelloReceived:
                self._hello.set()
            elif type(event) is GoAwayReceived:
                self.goaway_received = event
            elif type(event) is ConnectionTerminated:
                self._finish(event.error_code, event.message)

    def _on_stream_opened(self, event: StreamOpened) -> None:
        stream = MuxStream(self, event.stream_id, event.metadata, local=False)
        self._streams[event.stream_id] = stream
        handler = self._handler
        if handler is not None and self._nursery is not None:
            self._nursery.start_soon(self._run_handler, handler, stream)
            return
        self._incoming.append(stream)
        self._incoming_lot.unpark_all()  # all: a woken waiter may be cancelled before it takes

    async def _run_handler(self, handler: StreamHandler, stream: MuxStream) -> None:
        try:
            await handler(stream)
        except Exception as exc:
            # One stream's failure must not end the session and its other streams.
            if isinstance(exc, StreamRefused):  # the handler's way to refuse with a code
                code, message = exc.error_code, exc.message
            elif isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
                log.debug("stream %d handler ended: %s", stream.stream_id, exc)
                code, message = ErrorCode.CANCEL, str(exc)
            else:
                log.exception("stream %d handler failed", stream.stream_id)
                code, message = ErrorCode.INTERNAL_ERROR, "stream handler failed"
            if not stream.answered:
                stream.refuse(code, message)
            else:
                stream.reset(code, message)
            return
        if not stream.answered:
            stream.refuse(ErrorCode.REFUSED, "not accepted")
        await stream.aclose()

    def _on_control_received(self, message: Any) -> None:
        if self._on_control is not None:
            try:
                self._on_control(message)
            except Exception:
                log.exception("control handler failed")
            return
        self._controls.append(message)
        self._control_lot.unpark_all()

    # ------------------------------------------------------------------ bookkeeping

    def _wake_sender(self) -> None:
        self._send_wanted.set()

    def _acknowledge(self, stream_id: int, n: int) -> None:
        """The application consumed ``n`` bytes: grant window (sent by the send loop)."""
        if n and self._error is None:
            self._conn.acknowledge_received_data(stream_id, n)
            self._wake_sender()

    def _stream_finished(self, stream: MuxStream) -> None:
        if self._streams.pop(stream.stream_id, None) is not None:
            if self._error is None and self._conn.queued_bytes(stream.stream_id):
                self._flushing.add(stream.stream_id)
            if self._draining:
                self._wake_sender()

    def _check_open(self) -> None:
        if self._error is not None:
            if self._closed_locally:
                raise trio.ClosedResourceError(str(self._error)) from self._error
            raise SessionClosedError(self._error.error_code, self._error.message)

    def _finish(self, error_code: int, message: str, flush: bool = False) -> None:
        """End the session on this side: reset every stream, wake every waiter."""
        if self._error is not None:
            return
        self._error = SessionClosedError(error_code, message)
        self._flush_on_end = flush
        for stream in list(self._streams.values()):
            stream._on_reset(error_code, message, remote=False)
        self._streams.clear()
        self._flushing.clear()
        self._incoming_lot.unpark_all()
        self._control_lot.unpark_all()
        self._control_room.unpark_all()
        for waiter in self._ping_waiters.values():
            waiter.done.set()
        self._ping_waiters.clear()
        self._hello.set()  # wait_established re-checks and raises
        self._ending.set()
        self._wake_sender()
