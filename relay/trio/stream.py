"""MuxStream: one multiplexed stream as a ``trio.abc.HalfCloseableStream``.

Backpressure, receiving: bytes that arrive wait in the stream's buffer and are
acknowledged to the core (``acknowledge_received_data``) only as ``receive_some`` hands
them to the caller, so a reader that stops reading stops granting window and the peer
stops after one window.

Backpressure, sending: ``send_all`` hands bytes to the core's per-stream send queue in
slices of at most ``SEND_SLICE``, and waits while the queue holds as much as the stream's
window lets leave (``send_blocked``), never past ``send_queue_limit``. The session's send
loop drains the queue onto the transport as the windows allow and wakes the writer. So a
stream whose reader stalls holds at most its window plus one slice here, as the asyncio
binding's splices do, however many streams stall.

Closing follows TCP: ``aclose`` sends our FIN after the data already queued (graceful),
but if unread data is left, or data arrives after the close, the stream is reset, so a
peer that keeps sending to a closed reader gets ``BrokenResourceError`` instead of
filling a buffer nobody reads.
"""
from __future__ import annotations

import operator
from collections import deque
from typing import TYPE_CHECKING, Any, Optional, Union

import trio

from relay.mux.errors import ErrorCode, StreamClosedError

if TYPE_CHECKING:
    from relay.trio.session import TrioMuxSession

#: ``receive_some()`` without ``max_bytes`` returns at most this much (buffered frames are
#: joined up to it: fewer calls per megabyte, bounded copies).
DEFAULT_RECEIVE_SIZE = 64 * 1024
#: The most ``send_all`` queues at a time before checking the window again.
SEND_SLICE = 64 * 1024


def _code_name(error_code: int) -> str:
    try:
        return ErrorCode(error_code).name
    except ValueError:
        return str(error_code)


class StreamResetError(trio.BrokenResourceError):
    """The stream was reset: by the peer, by this side, or because the session ended.

    A ``trio.BrokenResourceError``, so generic trio code handles it; the wire error code
    and message are kept for code that cares.
    """

    def __init__(self, error_code: int, message: str = "", remote: bool = True) -> None:
        who = "by the peer" if remote else "locally"
        super().__init__(f"stream reset {who} ({_code_name(error_code)}){': ' + message if message else ''}")
        self.error_code = error_code
        self.message = message
        self.remote = remote


class StreamRefused(StreamResetError):
    """The peer refused a stream this side opened (its code says why: REFUSED,
    NOT_ALLOWED, CONNECT_FAILED ...)."""

    def __init__(self, error_code: int, message: str = "") -> None:
        trio.BrokenResourceError.__init__(
            self, f"stream refused ({_code_name(error_code)}){': ' + message if message else ''}")
        self.error_code = error_code
        self.message = message
        self.remote = True


class _ConflictDetector:
    """Raise ``trio.BusyResourceError`` when two tasks use the same half of a stream at
    once (trio's rule: concurrent send_all/receive_some on one stream is a bug)."""

    __slots__ = ("_what", "_held")

    def __init__(self, what: str) -> None:
        self._what = what
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(f"another task is already {self._what} on this stream")
        self._held = True

    def __exit__(self, *exc_info: Any) -> None:
        self._held = False


class MuxStream(trio.abc.HalfCloseableStream):
    """One stream of a :class:`~relay.trio.session.TrioMuxSession`.

    Created by the session: :meth:`TrioMuxSession.open_stream` (this side opens) or an
    incoming open (``accept_stream`` / the handler). An incoming stream must be answered
    with :meth:`accept` or :meth:`refuse`; ``send_all``/``send_eof`` accept it implicitly.

    Errors, as trio streams have them: ``trio.ClosedResourceError`` after this side's
    :meth:`aclose`; :class:`StreamResetError` (a ``trio.BrokenResourceError``) after a
    reset or the end of the session; ``trio.BusyResourceError`` for two concurrent
    senders or receivers.
    """

    def __init__(self, session: "TrioMuxSession", stream_id: int, metadata: dict[str, Any], local: bool) -> None:
        self._session = session
        self._conn = session._conn
        #: The wire stream id (odd when the dialling side opened it).
        self.stream_id = stream_id
        #: The open metadata (protocol, target, headers ...).
        self.metadata = metadata
        #: True when this side opened the stream.
        self.local = local
        self._answered = False  # local: the peer accepted/refused; remote: we did
        self._accepted = False
        self._buffer: deque[bytes | memoryview] = deque()
        self._buffered = 0
        self._remote_ended = False  # the peer's FIN arrived
        self._local_ended = False  # our FIN was handed to the core
        self._closed = False  # aclose() was called
        self._reset: Optional[tuple[int, str, bool]] = None  # (code, message, remote)
        self._refused = False
        self._finished = False
        self._send_conflict = _ConflictDetector("sending")
        self._receive_conflict = _ConflictDetector("receiving")
        # Waiters re-check the stream's state after every wake-up, so a spurious one is harmless.
        self._readers = trio.lowlevel.ParkingLot()  # data, EOF, reset, close
        self._writers = trio.lowlevel.ParkingLot()  # queue room, reset, close
        self._answer = trio.lowlevel.ParkingLot()  # ACCEPT or refusal

    def __repr__(self) -> str:
        return f"<MuxStream {self.stream_id} {'local' if self.local else 'remote'} buffered={self._buffered}>"

    # ------------------------------------------------------------------ inspection

    @property
    def answered(self) -> bool:
        """True once the open was accepted or refused."""
        return self._answered

    @property
    def finished(self) -> bool:
        """True once both sides ended the stream, or it was reset."""
        return self._finished

    @property
    def reset_error(self) -> Optional[StreamResetError]:
        """The reset that ended the stream, if any."""
        return self._error() if self._reset is not None else None

    # ------------------------------------------------------------------ answering

    def accept(self) -> None:
        """Accept a stream the peer opened. Raises the reset if it is gone already."""
        if self._answered and not self.local:
            return
        self._raise_if_reset()
        self._conn.accept_stream(self.stream_id)
        self._answered = self._accepted = True
        self._session._wake_sender()

    def refuse(self, error_code: int = ErrorCode.REFUSED, message: str = "") -> None:
        """Refuse a stream the peer opened; it is finished at once."""
        if self._reset is not None or self._answered:
            return
        self._conn.refuse_stream(self.stream_id, error_code, message)
        self._answered = True
        self._session._wake_sender()
        self._on_reset(error_code, message, remote=False)

    async def wait_accepted(self) -> None:
        """Wait until the peer accepts a stream this side opened.

        Raises :class:`StreamRefused` if it refused, :class:`StreamResetError` if the
        stream was reset otherwise or the session ended.
        """
        while not self._accepted:
            self._raise_if_reset()
            await self._answer.park()
        await trio.lowlevel.checkpoint()

    # ------------------------------------------------------------------ receiving

    async def receive_some(self, max_bytes: Optional[int] = None) -> bytes:
        """Up to ``max_bytes`` bytes (default: what is buffered, up to 64 KiB); ``b""`` at EOF.

        The bytes returned are acknowledged to the core here, not on arrival: that is
        what grants the peer more window.
        """
        with self._receive_conflict:
            if max_bytes is None:
                max_bytes = DEFAULT_RECEIVE_SIZE
            else:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            # Always a checkpoint (trio's rule), but only one: parking is one already,
            # otherwise a cancel-shielded yield. Bytes are taken only after the last
            # point where a cancellation could strike, so none is ever lost.
            await trio.lowlevel.checkpoint_if_cancelled()
            yielded = False
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("the stream was closed")
                if self._buffer or self._remote_ended or self._reset is not None:
                    if yielded:
                        break
                    await trio.lowlevel.cancel_shielded_checkpoint()
                else:
                    await self._readers.park()
                yielded = True
            if self._buffer:
                return self._take(max_bytes)
            self._raise_if_reset()
            return b""

    def _take(self, n: int) -> bytes:
        """Remove up to ``n`` buffered bytes and acknowledge them: this grants the window."""
        buffer = self._buffer
        first = buffer.popleft()
        if len(first) > n:
            # The rest stays as a view: small reads of a big chunk must not copy the
            # remainder again and again.
            rest = first if type(first) is memoryview else memoryview(first)
            buffer.appendleft(rest[n:])
            data = bytes(rest[:n])
        elif len(first) == n or not buffer:
            data = bytes(first) if type(first) is memoryview else first
        else:
            parts = [first]
            taken = len(first)
            while buffer and taken < n:
                chunk = buffer.popleft()
                if taken + len(chunk) > n:
                    cut = n - taken
                    view = chunk if type(chunk) is memoryview else memoryview(chunk)
                    buffer.appendleft(view[cut:])
                    chunk = view[:cut]
                parts.append(chunk)
                taken += len(chunk)
            data = b"".join(parts)
        self._buffered -= len(data)
        self._session._acknowledge(self.stream_id, len(data))
        return data

    # ------------------------------------------------------------------ sending

    async def send_all(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Send all of ``data``, waiting while the stream's send queue is full.

        Returns once every byte is in the core's queue (as a socket's ``send_all``
        returns once the kernel has the bytes); FIN and ``aclose`` keep the order.
        """
        with self._send_conflict:
            # A cancellation before anything is queued sends nothing; the yield comes
            # at the end, so the send loop runs in the same scheduler batch as we do.
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_sendable()
            if not self.local and not self._answered:
                self.accept()  # sending is an answer: a stream is accepted to be used
            view = memoryview(data).cast("B")
            total = len(view)
            offset = 0
            conn = self._conn
            limit = conn.config.send_queue_limit
            yielded = False
            while offset < total:
                while not conn.writable(self.stream_id) or conn.send_blocked(self.stream_id):
                    await self._writers.park()
                    yielded = True
                    self._check_sendable()
                # Never queue past the limit, nor more than a slice beyond what the window
                # lets leave: that is what bounds memory per stream.
                room = min(limit - conn.queued_bytes(self.stream_id), SEND_SLICE)
                end = min(total, offset + room)
                # One copy: the caller may reuse its buffer once send_all returns.
                chunk = data if offset == 0 and end == total and type(data) is bytes else bytes(view[offset:end])
                conn.send_data(self.stream_id, chunk)
                offset = end
                self._session._wake_sender()
            if not yielded:
                await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the stream may queue more (``send_all`` would not wait at once)."""
        with self._send_conflict:
            await trio.lowlevel.checkpoint()
            self._check_sendable()
            while not self._conn.writable(self.stream_id) or self._conn.send_blocked(self.stream_id):
                await self._writers.park()
                self._check_sendable()

    async def send_eof(self) -> None:
        """Half-close: the peer reads EOF after the data already sent. Idempotent."""
        with self._send_conflict:
            await trio.lowlevel.checkpoint()
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed")
            if self._local_ended:
                return
            self._raise_if_reset()
            if not self.local and not self._answered:
                self.accept()
            self._end_local()

    def _check_sendable(self) -> None:
        if self._closed or self._local_ended:
            raise trio.ClosedResourceError("the stream was closed for sending")
        self._raise_if_reset()

    def _end_local(self) -> None:
        try:
            self._conn.end_stream(self.stream_id)
        except StreamClosedError:
            return  # reset meanwhile; the reset event finishes the stream
        self._local_ended = True
        self._session._wake_sender()
        self._check_finished()

    # ------------------------------------------------------------------ closing

    async def aclose(self) -> None:
        """Close the stream; never waits for the peer.

        Graceful when possible: our FIN follows the data already queued. Unread data (or
        data arriving later) resets the stream instead, as closing a TCP socket with
        unread data does. An incoming stream never answered is refused. Blocked calls in
        other tasks raise ``trio.ClosedResourceError``.
        """
        if not self._closed:
            self._closed = True
            self._close_now()
            self._wake_all()
        await trio.lowlevel.checkpoint()  # after closing: a cancelled aclose still closes

    def reset(self, error_code: int = ErrorCode.CANCEL, message: str = "") -> None:
        """Abort the stream in both directions (RESET); queued data is dropped."""
        if self._reset is not None or self._finished:
            return
        self._conn.reset_stream(self.stream_id, error_code, message)
        self._answered = True
        self._session._wake_sender()
        self._on_reset(error_code, message, remote=False)

    def _close_now(self) -> None:
        if self._reset is not None:
            return
        if not self.local and not self._answered:
            self.refuse(ErrorCode.REFUSED, "closed before being accepted")
        elif self._buffer:
            self.reset(ErrorCode.CANCEL, "closed with unread data")
        else:
            if not self._local_ended:
                self._end_local()
            self._check_finished()

    # ------------------------------------------------------------------ from the session

    def _on_data(self, data: Any, n: int) -> None:
        if self._closed:
            # Nobody will read it: tell the peer to stop, as TCP answers data sent to a
            # closed socket with RST.
            self.reset(ErrorCode.CANCEL, "the reader closed the stream")
            return
        # Keep bytes, not views: a view would pin the whole received chunk.
        self._buffer.append(data if type(data) is bytes else bytes(data))
        self._buffered += n
        self._readers.unpark_all()

    def _on_remote_end(self) -> None:
        self._remote_ended = True
        self._readers.unpark_all()
        self._check_finished()

    def _on_accepted(self) -> None:
        self._answered = self._accepted = True
        self._answer.unpark_all()

    def _on_reset(self, error_code: int, message: str, remote: bool) -> None:
        if self._reset is not None:
            return
        self._refused = self.local and not self._answered and remote
        self._reset = (error_code, message, remote)
        self._answered = True
        # The core credits unacknowledged bytes back on a reset: the buffer is owed nothing.
        self._buffer.clear()
        self._buffered = 0
        self._wake_all()
        self._finish()

    def _on_writable(self) -> None:
        self._writers.unpark_all()

    def _wake_all(self) -> None:
        self._readers.unpark_all()
        self._writers.unpark_all()
        self._answer.unpark_all()

    def _check_finished(self) -> None:
        if not self._finished and self._local_ended and self._remote_ended:
            self._finish()

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._session._stream_finished(self)

    def _error(self) -> StreamResetError:
        assert self._reset is not None
        code, message, remote = self._reset
        if self._refused:
            return StreamRefused(code, message)
        return StreamResetError(code, message, remote)

    def _raise_if_reset(self) -> None:
        if self._reset is not None:
            raise self._error()  # a fresh exception each time: no traceback pile-up
