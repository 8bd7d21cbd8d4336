"""MuxSession: one sans-IO MuxConnection driven by one asyncio transport.

The session is an ``asyncio.Protocol``: bytes from the transport go to
``MuxConnection.receive_data``, the resulting events are dispatched to streams, and
every command schedules one coalesced flush that writes ``data_to_send`` slices while
the transport is not paused. No protocol decision is taken here; this module only
moves bytes, wakes waiters and keeps one timer for the core's keepalive.

It runs over anything that offers the small transport surface of
:class:`relay.aio.transport.MuxTransport`: a raw TCP/TLS asyncio transport, or a
message transport (WebSocket) that writes each ``data_to_send`` output as one message.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from types import CoroutineType
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Optional, Union

if TYPE_CHECKING:  # mypy checks the pure-Python twin: cython's no-op declarations
    from relay.mux import _cython_shim as cython
else:
    try:
        import cython
    except ImportError:  # runs uncompiled without Cython installed
        from relay.mux import _cython_shim as cython

from relay.aio.stream import MuxStream, StreamRefused, StreamSink
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
from relay.mux.stream import Chunk

log = logging.getLogger("relay.aio")

#: Bytes of DATA per ``data_to_send`` call: big enough to amortise the call and the
#: transport write, small enough that one session cannot monopolise the loop.
FLUSH_SLICE = 256 * 1024
#: Slices written per flush callback before yielding to other callbacks of the loop.
SLICES_PER_FLUSH = 4
#: A slice of at most this many buffers (frame headers and payloads) is written with the
#: transport's ``writelines`` as is (one ``writev`` on uvloop, no copy); more, i.e. many
#: small frames, are joined first: copying small buffers is cheaper than a huge iovec.
MAX_GATHER = 64
#: Transport write buffer high-water mark. asyncio's default (64 KiB) pauses after a
#: quarter of one slice; a larger mark keeps the socket busy between flushes.
WRITE_HIGH_WATER = 1024 * 1024
#: Control messages queued for ``next_control`` before the session stops reading the
#: transport (backpressure instead of an unbounded queue).
CONTROL_QUEUE_LIMIT = 256
#: After a protocol error the GOAWAY gets this long to leave before the socket is aborted.
GOAWAY_LINGER = 5.0
#: Timers fire this much after the core's deadline, so it has surely passed.
_TIMER_SLACK = 0.001

StreamHandler = Callable[[MuxStream], Union[Awaitable[None], None]]
ControlHandler = Callable[[Any], None]


class SessionClosedError(ConnectionResetError):
    """The session is over; carries the code and message it ended with."""

    def __init__(self, error_code: int, message: str = "") -> None:
        super().__init__(f"mux session closed ({error_code}){': ' + message if message else ''}")
        self.error_code = error_code
        self.message = message


class MuxSession(StreamEventRouter):
    """A multiplexed session over one transport (an asyncio protocol by its methods:
    compiled, it is an extension type, which cannot subclass ``asyncio.Protocol``, and
    event loops only duck-type protocols).

    ``client=True`` on the dialling side (the agent). Incoming streams go to
    ``on_stream(stream)`` if given (a plain callback, or a coroutine function run as a
    task: if it raises :class:`StreamRefused` or any error before answering, the stream
    is refused; an unanswered stream is refused when it returns), otherwise to
    :meth:`next_stream` / ``async for stream in session.incoming_streams()``. Control
    messages go to ``on_control(message)`` if given, otherwise to :meth:`next_control`.
    """

    def __init__(
        self,
        client: bool,
        config: Optional[MuxConfig] = None,
        *,
        on_stream: Optional[StreamHandler] = None,
        on_control: Optional[ControlHandler] = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._conn = MuxConnection(client, config)
        self._on_stream = on_stream
        self._on_control = on_control
        self._transport: Any = None
        self._writelines: Optional[Callable[[list[Chunk]], None]] = None
        self._streams: dict[int, MuxStream] = {}
        self._write_paused = False
        self._flush_handle: Optional[asyncio.Handle] = None
        self._timer: Optional[asyncio.TimerHandle] = None
        self._timer_when = 0.0
        #: Finished streams whose last bytes (and FIN) still sit in the core queue.
        self._flushing: set[int] = set()
        #: Splices whose local reading is paused until their stream can take data again.
        self._blocked_readers: set[StreamSink] = set()
        #: Splices holding payloads from the events being handled (see _write_pending_splices).
        self._pending_splices: list[StreamSink] = []
        self._incoming: deque[MuxStream] = deque()
        self._incoming_waiter: Optional[asyncio.Future[None]] = None
        self._controls: deque[Any] = deque()
        self._control_waiter: Optional[asyncio.Future[None]] = None
        self._reading_paused = False
        self._ping_waiters: dict[int, asyncio.Future[Optional[float]]] = {}  # by the core's ping id
        self._hello: asyncio.Future[None] = self._loop.create_future()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._tasks: set[asyncio.Task[None]] = set()
        #: The stream of each running coroutine handler's task (for _handler_done).
        self._handled: dict[asyncio.Task[None], MuxStream] = {}
        self._draining = False
        self._error: Optional[SessionClosedError] = None
        #: The peer's GOAWAY, once received.
        self.goaway_received: Optional[GoAwayReceived] = None

    # ------------------------------------------------------------------ inspection

    @property
    def connection(self) -> MuxConnection:
        """The sans-IO core (for inspection; drive it only through this session)."""
        return self._conn

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
    def streams(self) -> dict[int, MuxStream]:
        """Streams not finished yet, by id (read-only view by convention)."""
        return self._streams

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if self._transport is None:
            return default
        return self._transport.get_extra_info(name, default)

    async def wait_established(self) -> dict[str, Any]:
        """Wait for the peer's SETTINGS; returns its ``info``."""
        await asyncio.shield(self._hello)
        return self._conn.peer_info

    # ------------------------------------------------------------------ streams

    def open_stream_nowait(self, metadata: Optional[dict[str, Any]] = None) -> MuxStream:
        """Open a stream and return it at once; data may be written before it is accepted.

        ``await stream.wait_accepted()`` tells whether the peer accepted it.
        """
        self._check_open()
        try:
            stream_id = self._conn.open_stream(metadata or {})
        except StreamLimitError as exc:
            # Like a refusal by the peer, which it would be if the peer had no room: the
            # caller already handles that (the stream never existed on the wire).
            return self._refused_stream(metadata or {}, ErrorCode.TOO_MANY_STREAMS, str(exc))
        stream = MuxStream(self, stream_id, metadata or {}, local=True)
        self._streams[stream_id] = stream
        self._schedule_flush()
        return stream

    def _refused_stream(self, metadata: dict[str, Any], error_code: int, reason: str) -> MuxStream:
        """A stream that is already refused (``error_code``, ``reason``) and never existed
        on the wire: callers handle it exactly like a refusal by the peer."""
        stream = MuxStream(self, 0, metadata, local=True)  # id 0: never a real stream
        stream._on_reset(error_code, reason, remote=True)
        return stream

    async def open_stream(self, metadata: Optional[dict[str, Any]] = None) -> MuxStream:
        """Open a stream and wait until the peer accepts it.

        Raises :class:`StreamRefused` (a ``ConnectionRefusedError``) with the peer's code
        and message if it refuses, ``ConnectionResetError`` if the session ends first.
        """
        stream = self.open_stream_nowait(metadata)
        try:
            await stream.wait_accepted()
        except asyncio.CancelledError:
            stream.abort(ErrorCode.CANCEL, "open cancelled")
            raise
        return stream

    def accept(self, stream_id: int) -> MuxStream:
        """Accept the incoming stream ``stream_id``; returns it."""
        stream = self._get(stream_id)
        stream.accept()
        return stream

    def refuse(self, stream_id: int, error_code: int = ErrorCode.REFUSED, message: str = "") -> None:
        """Refuse the incoming stream ``stream_id``."""
        self._get(stream_id).refuse(error_code, message)

    async def next_stream(self) -> MuxStream:
        """The next incoming stream (not answered yet: call ``accept`` or ``refuse``).

        Raises :class:`SessionClosedError` once the session is over.
        """
        while not self._incoming:
            if self._error is not None:
                raise self._error
            self._incoming_waiter = self._loop.create_future()
            try:
                await self._incoming_waiter
            finally:
                self._incoming_waiter = None
        return self._incoming.popleft()

    async def incoming_streams(self) -> AsyncIterator[MuxStream]:
        """``async for stream in session.incoming_streams()``: ends with the session."""
        while True:
            try:
                yield await self.next_stream()
            except SessionClosedError:
                return

    # ------------------------------------------------------------------ session-level

    def send_control(self, message: Any) -> None:
        """Send an application control message (msgpack-encodable)."""
        self._check_open()
        self._conn.send_control(message)
        self._schedule_flush()

    async def next_control(self) -> Any:
        """The next control message from the peer (when no ``on_control`` was given)."""
        while not self._controls:
            if self._error is not None:
                raise self._error
            self._control_waiter = self._loop.create_future()
            try:
                await self._control_waiter
            finally:
                self._control_waiter = None
        message = self._controls.popleft()
        if self._reading_paused and len(self._controls) < CONTROL_QUEUE_LIMIT:
            self._reading_paused = False
            if self._transport is not None:
                self._transport.resume_reading()
        return message

    async def ping(self) -> float:
        """Send a PING and return its round-trip time in seconds."""
        self._check_open()
        waiter: asyncio.Future[Optional[float]] = self._loop.create_future()
        self._ping_waiters[self._conn.ping(self._loop.time())] = waiter
        self._schedule_flush()
        rtt = await waiter
        assert rtt is not None  # the PING went out with the loop's clock: it was timed
        return rtt

    def close(self, error_code: int = ErrorCode.NO_ERROR, message: str = "") -> None:
        """Graceful close: GOAWAY now, close the transport once every stream finished."""
        if self._error is not None:
            return
        self._conn.goaway(error_code, message)
        self._draining = True
        self._schedule_flush()
        self._check_drained()

    def abort(self, error_code: int = ErrorCode.CANCEL, message: str = "session aborted") -> None:
        """Close now: the transport is aborted and every stream is reset."""
        if self._error is not None:
            return
        self._finish(error_code, message)
        if self._transport is not None:
            self._transport.abort()

    async def aclose(self, timeout: Optional[float] = None, error_code: int = ErrorCode.NO_ERROR) -> None:
        """:meth:`close`, wait until closed, and :meth:`abort` if ``timeout`` passes."""
        self.close(error_code)
        try:
            async with asyncio.timeout(timeout):
                await self.wait_closed()
        except TimeoutError:
            self.abort(ErrorCode.TIMEOUT, "graceful close timed out")
            await self.wait_closed()

    async def wait_closed(self) -> None:
        """Wait until the transport is closed (never raises)."""
        await asyncio.shield(self._closed)

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        self._writelines = getattr(transport, "writelines", None)
        set_limits = getattr(transport, "set_write_buffer_limits", None)
        if set_limits is not None:
            set_limits(high=WRITE_HIGH_WATER)
        # Start the silence clock now, so a peer that never speaks still times out.
        self._handle_events(self._conn.handle_timer(self._loop.time()))
        self._schedule_flush()
        self._reschedule_timer()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._conn.receive_data(data, self._loop.time())
        except ProtocolError as exc:
            self._protocol_failed(exc)
            return
        self._handle_events(events)
        if self._error is None:
            conn = self._conn
            # A flush only when there is something for it to do: frames to send (window
            # updates, PING answers, DATA), streams that became writable, streams
            # finishing or a drain. Most small messages need none: a loop callback
            # saved per message on the request/response path.
            if (conn.has_data_to_send or conn.has_writable_streams or self._flushing
                    or self._draining):
                self._schedule_flush()
            # _reschedule_timer's common case, inlined: an armed timer that fires no
            # later than the core's deadline stays as it is.
            deadline = conn.next_deadline()
            if self._timer is None or deadline is None or deadline < self._timer_when:
                self._reschedule_timer()

    def eof_received(self) -> None:
        self._handle_events(self._conn.receive_data(b""))
        return None  # let the transport close

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if not self._conn.terminated:
            self._handle_events(self._conn.receive_data(b""))
        self._finish(ErrorCode.CANCEL, f"transport lost: {exc}" if exc else "transport closed")
        self._transport_closed()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._schedule_flush()

    # ------------------------------------------------------------------ flushing

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and self._transport is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    @cython.locals(stream=MuxStream)
    def _flush(self) -> None:
        """Write what the core has to send, while the transport accepts it."""
        self._flush_handle = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        conn = self._conn
        write = transport.write
        writelines = self._writelines
        for _ in range(SLICES_PER_FLUSH):
            if self._write_paused:
                break
            parts = conn.data_to_send_parts(FLUSH_SLICE)
            if not parts:
                break
            if len(parts) == 1:
                write(parts[0])  # a lone part is a control frame: bytes
            elif writelines is not None and len(parts) <= MAX_GATHER:
                writelines(parts)
            else:
                write(b"".join(parts))
            if not conn.has_data_to_send:
                break
        else:
            self._schedule_flush()  # more may be waiting: continue after other callbacks
        streams = self._streams
        for stream_id in conn.writable_streams():
            if stream_id == 0:  # the session window reopened: any blocked reader may go on
                if self._blocked_readers:
                    self._resume_blocked_readers()
                continue
            stream = streams.get(stream_id)
            if stream is not None:
                stream._on_writable()
        if self._flushing:
            self._flushing = {s for s in self._flushing if conn.queued_bytes(s)}
        if self._draining:
            self._check_drained()

    def _acknowledge(self, stream_id: int, n: int) -> None:
        """The application consumed ``n`` bytes of the stream: grant window (on flush)."""
        if n and self._error is None:
            # Usually nothing to flush: updates are batched (the quarter rule).
            if self._conn.acknowledge_received_data(stream_id, n):
                self._schedule_flush()

    # ------------------------------------------------------------------ events

    def _write_pending_splices(self) -> None:
        """Write out what spliced streams received in the events just handled."""
        pending = self._pending_splices
        while pending:
            self._pending_splices = []
            for splice in pending:
                splice._write_out()
            pending = self._pending_splices

    def _handle_events(self, events: list[Event]) -> None:
        try:
            session_events = self._route_stream_events(events)
            if session_events:
                self._dispatch_session_events(session_events)
        finally:
            if self._pending_splices:
                self._write_pending_splices()

    def _dispatch_session_events(self, events: list[Event]) -> None:
        for event in events:
            if type(event) is ControlReceived:
                self._on_control_received(event.message)
            elif type(event) is PingAcknowledged:
                waiter = self._ping_waiters.pop(event.ping_id, None)  # None: a keepalive
                if waiter is not None and not waiter.done():
                    waiter.set_result(event.rtt)
            elif type(event) is HelloReceived:
                if not self._hello.done():
                    self._hello.set_result(None)
            elif type(event) is GoAwayReceived:
                self.goaway_received = event
            elif type(event) is ConnectionTerminated:
                self._finish(event.error_code, event.message)
                if self._transport is not None:
                    self._transport.abort()  # dead or gone peer: nothing left worth flushing

    def _on_stream_opened(self, event: StreamOpened) -> None:
        stream = MuxStream(self, event.stream_id, event.metadata, local=False)
        self._streams[event.stream_id] = stream
        handler = self._on_stream
        if handler is None:
            self._incoming.append(stream)
            waiter = self._incoming_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            return
        try:
            result = handler(stream)
        except Exception as exc:
            self._handler_failed(stream, exc)
            return
        if type(result) is CoroutineType:
            # The handler's own coroutine is the task, its outcome read by a callback: no
            # wrapping coroutine stepping through every await (one per incoming stream).
            task = self._loop.create_task(result)
            self._tasks.add(task)
            task.add_done_callback(self._handler_done)
            self._handled[task] = stream
        elif inspect.isawaitable(result):
            task = self._loop.create_task(self._run_handler(stream, result))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        """A coroutine handler ended: as :meth:`_run_handler` does after its await."""
        self._tasks.discard(task)
        stream: MuxStream = self._handled.pop(task)
        if task.cancelled():
            stream.abort(ErrorCode.CANCEL, "handler cancelled")
            return
        exc = task.exception()
        if exc is not None:
            if isinstance(exc, Exception):
                self._handler_failed(stream, exc)
            return
        if not stream.answered:
            stream.refuse(ErrorCode.REFUSED, "not accepted")

    async def _run_handler(self, stream: MuxStream, awaitable: Awaitable[None]) -> None:
        try:
            await awaitable
        except asyncio.CancelledError:
            stream.abort(ErrorCode.CANCEL, "handler cancelled")
            raise
        except Exception as exc:
            self._handler_failed(stream, exc)
            return
        if not stream.answered:
            stream.refuse(ErrorCode.REFUSED, "not accepted")

    def _handler_failed(self, stream: MuxStream, exc: Exception) -> None:
        if isinstance(exc, StreamRefused):
            code, message = exc.error_code, exc.message
        elif isinstance(exc, ConnectionError):
            code, message = ErrorCode.CANCEL, str(exc)
        else:
            log.exception("stream %d handler failed", stream.stream_id, exc_info=exc)
            code, message = ErrorCode.INTERNAL_ERROR, "stream handler failed"
        if not stream.answered:
            stream.refuse(code, message)
        else:
            stream.abort(code, message)

    def _on_control_received(self, message: Any) -> None:
        if self._on_control is not None:
            try:
                self._on_control(message)
            except Exception:
                log.exception("control handler failed")
            return
        self._controls.append(message)
        waiter = self._control_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if len(self._controls) >= CONTROL_QUEUE_LIMIT and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    # ------------------------------------------------------------------ stream bookkeeping

    def _get(self, stream_id: int) -> MuxStream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise KeyError(f"no open stream {stream_id}")
        return stream

    def _stream_finished(self, stream: MuxStream) -> None:
        if self._streams.pop(stream.stream_id, None) is not None:
            if self._conn.queued_bytes(stream.stream_id):
                self._flushing.add(stream.stream_id)
            if self._draining:
                self._check_drained()

    def _block_reader(self, splice: StreamSink) -> None:
        self._blocked_readers.add(splice)

    def _unblock_reader(self, splice: StreamSink) -> None:
        self._blocked_readers.discard(splice)

    def _resume_blocked_readers(self) -> None:
        resumed = [s for s in self._blocked_readers if s._try_resume_reading()]
        self._blocked_readers.difference_update(resumed)

    # ------------------------------------------------------------------ timers and ending

    def _reschedule_timer(self) -> None:
        deadline = self._conn.next_deadline()
        if deadline is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        if self._timer is not None:
            if self._timer_when <= deadline:
                return  # it fires early, finds nothing due, and re-arms: cheaper than moving it
            self._timer.cancel()
        self._timer_when = deadline
        self._timer = self._loop.call_at(deadline + _TIMER_SLACK, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._handle_events(self._conn.handle_timer(self._loop.time()))
        if self._error is None:
            self._schedule_flush()
            self._reschedule_timer()

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error

    def _check_drained(self) -> None:
        transport = self._transport
        if self._draining and not self._streams and not self._flushing and transport is not None:
            if transport.is_closing():
                return
            # Only control frames can be left (GOAWAY, window updates): write them even
            # if paused, close() flushes the transport's buffer before closing.
            data = self._conn.data_to_send()
            if data:
                transport.write(data)
            transport.close()

    def _protocol_failed(self, exc: ProtocolError) -> None:
        """The peer broke the protocol: send the core's GOAWAY, close, end everything."""
        log.warning("mux protocol error from peer: %s", exc)
        self._finish(int(exc.error_code), str(exc))
        transport = self._transport
        goaway = self._conn.data_to_send()
        if goaway and not transport.is_closing():
            transport.write(goaway)
        transport.close()
        self._loop.call_later(GOAWAY_LINGER, transport.abort)

    def _finish(self, error_code: int, message: str) -> None:
        """End the session on this side: reset every stream, fail every waiter."""
        if self._error is not None:
            return
        self._error = SessionClosedError(error_code, message)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for stream in list(self._streams.values()):
            stream._on_reset(error_code, message, remote=False)
        self._streams.clear()
        self._blocked_readers.clear()
        for waiter in (self._incoming_waiter, self._control_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_exception(self._error)
        if not self._hello.done():
            self._hello.set_exception(self._error)
            self._hello.exception()  # retrieved: nobody may be waiting for it
        for ping_waiter in self._ping_waiters.values():
            if not ping_waiter.done():
                ping_waiter.set_exception(self._error)
        self._ping_waiters.clear()

    def _transport_closed(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        # The transport (our protocol adapter, or asyncio's) refers back to us: drop our
        # side of the cycle, so a session is freed when its peer leaves, not by a later
        # garbage collection (a flood of short sessions must not pile up in memory).
        self._transport = None
        self._writelines = None
        if not self._closed.done():
            self._closed.set_result(None)
