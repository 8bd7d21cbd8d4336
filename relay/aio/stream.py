"""MuxStream: one multiplexed stream as an asyncio-style reader/writer, and the splice.

Backpressure, receiving: bytes that arrive are buffered here and acknowledged to the core
(``acknowledge_received_data``) only when the application reads them, so a reader that
stops reading stops granting window and the peer stops after one window.

Backpressure, sending: ``write`` hands bytes to the core's per-stream send queue;
``drain`` waits while that queue is at ``send_queue_limit``. Writes made while the
queue is full wait here (as in an asyncio transport) until the core reports the stream
writable again, so ``write`` never fails for lack of room.

:class:`StreamSplice` is the fast path that relays a stream to a local asyncio transport
without a task or an intermediate buffer (see its docstring).
"""
from __future__ import annotations

import _socket
import asyncio
import socket
import struct
import sys
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Optional, Protocol, cast

from relay.mux.errors import ErrorCode, StreamClosedError

if TYPE_CHECKING:
    from relay.aio.session import MuxSession

#: ``readuntil``/``readline`` give up past this many bytes without a separator (as
#: asyncio's StreamReader). Capped by the stream window: a separator farther away than
#: one window could never arrive, since unread bytes are never acknowledged.
DEFAULT_LIMIT = 64 * 1024
#: ``read(-1)`` reads in pieces of this size (each acknowledged as it is taken).
_READ_ALL_CHUNK = 256 * 1024
#: The C socket type (``socket.socket`` is its Python subclass), for set_socket_option.
_CSocket = _socket.socket
#: SO_LINGER {on, 0 s}: closing the socket sends a RST instead of a FIN.
_LINGER_ZERO = struct.pack("ii", 1, 0)


def abort_with_reset(transport: Any) -> None:
    """Abort ``transport`` so that its peer reads a reset (ECONNRESET), never an end.

    asyncio's and uvloop's ``abort()`` drop the write buffer but still end the
    connection with a FIN, which the peer cannot tell from a complete transfer. Setting
    SO_LINGER {on, 0 s} first makes the close send a RST (as HAProxy's ``nolinger``). A
    transport that carries a reset its own way has a ``send_reset()`` method, used
    instead (the gateway's TCP-over-WebSocket end: close code 4000).
    """
    send_reset = getattr(transport, "send_reset", None)
    if send_reset is not None:
        send_reset()
        return
    try:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    except (OSError, AttributeError, ValueError):  # closed already, or not a TCP socket
        pass
    transport.abort()


class StreamResetError(ConnectionResetError):
    """The stream was reset (by the peer, by this side, or because the session ended)."""

    def __init__(self, error_code: int, message: str = "", remote: bool = True) -> None:
        try:
            name = ErrorCode(error_code).name
        except ValueError:
            name = str(error_code)
        who = "by the peer" if remote else "locally"
        super().__init__(f"stream reset {who} ({name}){': ' + message if message else ''}")
        self.error_code = error_code
        self.message = message
        self.remote = remote


class StreamRefused(ConnectionRefusedError):
    """The peer refused a stream this side opened."""

    def __init__(self, error_code: int, message: str = "") -> None:
        try:
            name = ErrorCode(error_code).name
        except ValueError:
            name = str(error_code)
        super().__init__(f"stream refused ({name}){': ' + message if message else ''}")
        self.error_code = error_code
        self.message = message


class StreamSink(Protocol):
    """What a :class:`MuxStream` hands what it receives to instead of buffering it
    (:meth:`MuxStream._attach_sink`): a :class:`StreamSplice`, or the HTTP proxy's side
    of a stream (relay.gateway.http.proxy), which reads its responses that way."""

    def _mux_data(self, data: Any, n: int) -> None: ...
    def _write_out(self) -> None: ...
    def _mux_eof(self) -> None: ...
    def _mux_reset(self, exc: BaseException) -> None: ...
    def _try_resume_reading(self) -> bool: ...


def _wake(waiter: Optional[asyncio.Future[None]], exc: Optional[BaseException] = None) -> None:
    if waiter is not None and not waiter.done():
        if exc is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(exc)


class MuxStream:
    """One stream of a :class:`~relay.aio.session.MuxSession`.

    Reading: :meth:`read`, :meth:`readexactly`, :meth:`readuntil`, :meth:`readline`,
    :meth:`at_eof`. Writing: :meth:`write` then ``await`` :meth:`drain`,
    :meth:`write_eof`. Ending: :meth:`close` (graceful) or :meth:`abort` (reset).
    After a reset every operation raises :class:`StreamResetError` (a
    ``ConnectionResetError``) carrying the wire code and message; data not yet read is
    dropped, as a reset means "abandon this stream".

    Streams are created by the session (``open_stream`` or an incoming open); an
    incoming stream must be answered with :meth:`accept` or :meth:`refuse`.
    """

    def __init__(self, session: "MuxSession", stream_id: int, metadata: dict[str, Any], local: bool) -> None:
        self._session = session
        self._conn = session._conn
        self._loop = session._loop
        #: The wire stream id (odd when the dialling side opened it).
        self.stream_id = stream_id
        #: The open metadata (protocol, target, headers ...).
        self.metadata = metadata
        #: True when this side opened the stream.
        self.local = local
        self._answered = False  # accepted (local: by the peer; remote: by us) or refused
        self._accepted = False
        # Received, unread (and, below, written, waiting): made on first use and dropped
        # once empty, as the core does with its send queue. An idle stream must cost
        # little, and an empty deque is 760 bytes.
        self._buffer: Optional[deque[bytes]] = None
        self._buffered = 0
        self._remote_ended = False  # the peer's FIN arrived
        self._eof_requested = False  # the application asked to end its side
        self._local_ended = False  # end_stream was passed to the core
        self._closing = False  # close() called: unread and future data is discarded
        self._exc: Optional[BaseException] = None
        self._finished = False
        self._pending: Optional[deque[bytes]] = None  # writes waiting for room in the core queue
        self._read_waiter: Optional[asyncio.Future[None]] = None
        self._write_waiter: Optional[asyncio.Future[None]] = None
        self._answer_waiter: Optional[asyncio.Future[None]] = None
        self._closed_waiter: Optional[asyncio.Future[None]] = None
        self._sink: Optional[StreamSink] = None
        self._limit = min(DEFAULT_LIMIT, self._conn.config.initial_window)
        #: Payload bytes written to the stream / received on it (per-stream accounting).
        self.bytes_sent = 0
        self.bytes_received = 0

    def __repr__(self) -> str:
        return f"<MuxStream {self.stream_id} {'local' if self.local else 'remote'} buffered={self._buffered}>"

    # ------------------------------------------------------------------ answering

    def accept(self) -> None:
        """Accept a stream the peer opened."""
        if self._exc is not None:
            raise self._exc
        self._conn.accept_stream(self.stream_id)
        self._answered = self._accepted = True
        self._session._schedule_flush()

    def refuse(self, error_code: int = ErrorCode.REFUSED, message: str = "") -> None:
        """Refuse a stream the peer opened; the stream is finished at once."""
        if self._exc is not None:
            return
        self._conn.refuse_stream(self.stream_id, error_code, message)
        self._answered = True
        self._session._schedule_flush()
        self._on_reset(error_code, message, remote=False)

    @property
    def answered(self) -> bool:
        """True once the open was accepted (or refused)."""
        return self._answered

    async def wait_accepted(self) -> None:
        """Wait until the peer accepts a stream this side opened.

        Raises :class:`StreamRefused` if the peer refused it, :class:`StreamResetError`
        if it was reset otherwise or the session ended.
        """
        while not self._accepted:
            if self._exc is not None:
                raise self._exc
            self._answer_waiter = self._loop.create_future()
            try:
                await self._answer_waiter
            finally:
                self._answer_waiter = None

    # ------------------------------------------------------------------ reading

    def at_eof(self) -> bool:
        """True when the peer ended the stream and every byte has been read."""
        return not self._buffer and (self._remote_ended or self._exc is not None)

    async def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes (``-1``: until EOF). ``b""`` means EOF."""
        if n < 0:
            parts: list[bytes] = []
            while True:
                part = await self.read(_READ_ALL_CHUNK)
                if not part:
                    return b"".join(parts)
                parts.append(part)
        if n == 0:
            return b""
        while not self._buffer:
            if not await self._wait_readable():
                return b""
        return self._take(n)

    async def readexactly(self, n: int) -> bytes:
        """Read exactly ``n`` bytes; raises ``asyncio.IncompleteReadError`` at an early EOF."""
        if n < 0:
            raise ValueError("readexactly size can not be less than zero")
        parts: list[bytes] = []
        remaining = n
        while remaining:
            while not self._buffer:
                if not await self._wait_readable():
                    raise asyncio.IncompleteReadError(b"".join(parts), n)
            part = self._take(remaining)
            parts.append(part)
            remaining -= len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        """Read up to and including ``separator`` (asyncio.StreamReader semantics)."""
        if not separator:
            raise ValueError("Separator should be at least one-byte string")
        searched = 0
        while True:
            buffer = self._buffer
            if buffer:
                if len(buffer) > 1:  # search one contiguous buffer
                    joined = b"".join(buffer)
                    buffer.clear()
                    buffer.append(joined)
                data = buffer[0]
                index = data.find(separator, searched)
                if index >= 0:
                    return self._take(index + len(separator))
                searched = max(0, len(data) - len(separator) + 1)
                if len(data) > self._limit:
                    raise asyncio.LimitOverrunError("Separator is not found, and chunk exceed the limit", len(data))
            if not await self._wait_readable():
                partial = self._take(self._buffered) if self._buffer else b""
                raise asyncio.IncompleteReadError(partial, None)

    async def readline(self) -> bytes:
        """Read one ``\\n``-terminated line; at EOF, whatever is left (maybe ``b""``)."""
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial
        except asyncio.LimitOverrunError as exc:
            raise ValueError(exc.args[0]) from None

    def __aiter__(self) -> "MuxStream":
        return self

    async def __anext__(self) -> bytes:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line

    async def _wait_readable(self) -> bool:
        """Wait for data; False at EOF. Raises after a reset."""
        if self._sink is not None:
            raise RuntimeError("this stream is spliced to a transport; it cannot be read directly")
        if self._exc is not None:
            raise self._exc
        if self._remote_ended or self._closing:
            return False
        self._read_waiter = self._loop.create_future()
        try:
            await self._read_waiter
        finally:
            self._read_waiter = None
        if self._exc is not None:
            raise self._exc
        return bool(self._buffer) or not (self._remote_ended or self._closing)

    def _take(self, n: int) -> bytes:
        """Remove up to ``n`` buffered bytes and acknowledge them: this grants the window."""
        buffer = self._buffer
        assert buffer is not None  # called with bytes buffered
        first = buffer[0]
        if len(first) <= n:
            buffer.popleft()
            taken = len(first)
            if taken < n and buffer:
                parts = [first]
                while buffer and taken < n:
                    chunk = buffer[0]
                    if taken + len(chunk) <= n:
                        parts.append(buffer.popleft())
                        taken += len(chunk)
                    else:
                        cut = n - taken
                        parts.append(chunk[:cut])
                        buffer[0] = chunk[cut:]
                        taken = n
                first = b"".join(parts)
        else:
            buffer[0] = first[n:]
            first = first[:n]
            taken = n
        self._buffered -= taken
        if not buffer:
            self._buffer = None
        self._session._acknowledge(self.stream_id, taken)
        return first

    # ------------------------------------------------------------------ writing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``; follow with ``await drain()`` to respect backpressure."""
        self._send(data)

    def _send(self, data: bytes | bytearray | memoryview) -> bool:
        """:meth:`write`; returns whether the stream can take more at once (its send
        queue has room and it has send window), which a splice needs after every read."""
        if self._exc is not None:
            raise self._exc
        if self._eof_requested:
            raise RuntimeError("write() after write_eof() or close()")
        if not data:
            return True
        self.bytes_sent += len(data)
        pending = self._pending
        if pending or not self._conn.writable(self.stream_id):
            if pending is None:
                pending = self._pending = deque()
            pending.append(bytes(data))
            return False
        more = self._conn.send_data(self.stream_id, data)
        self._session._schedule_flush()
        return more

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    def writable(self) -> bool:
        """True while the core send queue has room (``drain`` would not wait)."""
        return not self._pending and self._conn.queued_bytes(self.stream_id) < self._conn.config.send_queue_limit

    async def drain(self) -> None:
        """Wait until the stream's send queue is below its limit."""
        while True:
            if self._exc is not None:
                raise self._exc
            if self.writable():
                return
            self._write_waiter = self._loop.create_future()
            try:
                await self._write_waiter
            finally:
                self._write_waiter = None

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Half-close: the peer reads EOF after the data already written."""
        if self._eof_requested or self._exc is not None:
            return
        self._eof_requested = True
        if not self._pending:
            self._end_local()

    def _end_local(self) -> None:
        try:
            self._conn.end_stream(self.stream_id)
        except StreamClosedError:
            return  # reset meanwhile; the reset event finishes the stream
        self._local_ended = True
        self._session._schedule_flush()
        self._check_finished()

    # ------------------------------------------------------------------ ending

    def is_closing(self) -> bool:
        return self._closing or self._exc is not None

    def close(self) -> None:
        """Graceful close: end our side after queued data; drop unread and later input.

        Bytes still arriving are acknowledged and discarded, so the peer never stalls on
        a stream nobody reads; the stream finishes when the peer ends its side too.
        """
        if self._closing or self._exc is not None:
            return
        if not self.local and not self._answered:
            self.refuse(ErrorCode.REFUSED, "closed before being accepted")
            return
        self._closing = True
        self.write_eof()
        if self._buffered:
            self._session._acknowledge(self.stream_id, self._buffered)
            self._buffer = None
            self._buffered = 0
        _wake(self._read_waiter)
        self._check_finished()

    def abort(self, error_code: int = ErrorCode.CANCEL, message: str = "") -> None:
        """Reset the stream in both directions; queued data is dropped."""
        if self._exc is not None:
            return
        if self._finished:  # nothing left to reset; only unread data to give back
            self._closing = True
            if self._buffered:
                self._session._acknowledge(self.stream_id, self._buffered)
                self._buffer = None
                self._buffered = 0
            return
        self._conn.reset_stream(self.stream_id, error_code, message)
        self._answered = True
        self._session._schedule_flush()
        self._on_reset(error_code, message, remote=False)

    async def wait_closed(self) -> None:
        """Wait until the stream is finished (both sides ended, or reset). Never raises."""
        if self._finished:
            return
        if self._closed_waiter is None:
            self._closed_waiter = self._loop.create_future()
        await asyncio.shield(self._closed_waiter)

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def exception(self) -> Optional[BaseException]:
        """The reset that ended the stream, if any."""
        return self._exc

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``stream_id``, ``metadata``, ``session``, or the session transport's info."""
        if name == "stream_id":
            return self.stream_id
        if name == "metadata":
            return self.metadata
        if name == "session":
            return self._session
        return self._session.get_extra_info(name, default)

    def as_streams(self) -> tuple["MuxStreamReader", "MuxStreamWriter"]:
        """``(reader, writer)`` usable where asyncio's StreamReader/StreamWriter are."""
        return MuxStreamReader(self), MuxStreamWriter(self)

    # ------------------------------------------------------------------ from the session

    def _on_data(self, data: Any, n: int) -> None:
        self.bytes_received += n
        sink = self._sink
        if sink is not None:
            sink._mux_data(data, n)
        elif self._closing:
            self._session._acknowledge(self.stream_id, n)
        else:
            # Keep bytes, not views: a view would pin the whole received chunk.
            buffer = self._buffer
            if buffer is None:
                buffer = self._buffer = deque()
            buffer.append(data if type(data) is bytes else bytes(data))
            self._buffered += n
            _wake(self._read_waiter)

    def _on_remote_end(self) -> None:
        self._remote_ended = True
        if self._sink is not None:
            self._sink._mux_eof()
        _wake(self._read_waiter)
        self._check_finished()

    def _on_accepted(self) -> None:
        self._answered = self._accepted = True
        _wake(self._answer_waiter)

    def _on_reset(self, error_code: int, message: str, remote: bool) -> None:
        if self._exc is not None:
            return
        if self.local and not self._answered and remote:
            self._exc = StreamRefused(error_code, message)
        else:
            self._exc = StreamResetError(error_code, message, remote)
        self._answered = True
        self._buffer = None
        self._buffered = 0  # the core credits unacknowledged data back on a reset
        self._pending = None
        for waiter in (self._read_waiter, self._write_waiter, self._answer_waiter):
            _wake(waiter)
        if self._sink is not None:
            self._sink._mux_reset(self._exc)
        self._finish()

    def _on_writable(self) -> None:
        """The core's send queue for this stream drained below its limit."""
        pending = self._pending
        conn = self._conn
        while pending and conn.writable(self.stream_id):
            conn.send_data(self.stream_id, pending.popleft())
        if not pending:
            self._pending = None
            if self._eof_requested and not self._local_ended:
                self._end_local()
            _wake(self._write_waiter)
        self._session._schedule_flush()
        if self._sink is not None:
            self._sink._try_resume_reading()

    def _check_finished(self) -> None:
        if not self._finished and self._local_ended and (self._remote_ended or self._exc is not None):
            self._finish()

    def _finish(self) -> None:
        self._finished = True
        # Nothing reaches a finished stream's sink any more. Let go of it: the sink (a
        # splice) holds this stream, and that cycle, one per connection, would otherwise
        # wait for the cyclic collector, whose pauses every connection in flight waits out.
        self._sink = None
        _wake(self._closed_waiter)
        self._session._stream_finished(self)

    def _attach_sink(self, sink: StreamSink) -> None:
        """Route everything received from now on to ``sink``; hand it what is buffered."""
        if self._sink is not None:
            raise RuntimeError("this stream is already spliced")
        self._sink = sink
        buffer, self._buffer = self._buffer, None
        while buffer:
            chunk = buffer.popleft()
            self._buffered -= len(chunk)
            sink._mux_data(chunk, len(chunk))
        self._session._write_pending_splices()
        if self._exc is not None:
            sink._mux_reset(self._exc)
        elif self._remote_ended:
            sink._mux_eof()

    def _detach_sink(self) -> None:
        """Stop routing received data to the current sink, so another can be attached.

        A sink is any :class:`StreamSink` (StreamSplice's ``_mux_data``/``_write_out``/
        ``_mux_eof``/``_mux_reset``/``_try_resume_reading``): the HTTP proxy reads its
        responses that way and hands the stream to a StreamSplice after a ``101``.
        """
        self._sink = None


class MuxStreamReader:
    """The reading half of a :class:`MuxStream`, shaped like ``asyncio.StreamReader``."""

    def __init__(self, stream: MuxStream) -> None:
        self.stream = stream
        self.read = stream.read
        self.readexactly = stream.readexactly
        self.readuntil = stream.readuntil
        self.readline = stream.readline
        self.at_eof = stream.at_eof

    def exception(self) -> Optional[BaseException]:
        return self.stream.exception

    def __aiter__(self) -> MuxStream:
        return self.stream


class MuxStreamWriter:
    """The writing half of a :class:`MuxStream`, shaped like ``asyncio.StreamWriter``."""

    def __init__(self, stream: MuxStream) -> None:
        self.stream = stream
        self.write = stream.write
        self.writelines = stream.writelines
        self.drain = stream.drain
        self.write_eof = stream.write_eof
        self.can_write_eof = stream.can_write_eof
        self.close = stream.close
        self.is_closing = stream.is_closing
        self.wait_closed = stream.wait_closed
        self.get_extra_info = stream.get_extra_info

    @property
    def transport(self) -> MuxStream:
        return self.stream


#: Unsent bytes a spliced TCP socket may hold in the kernel (TCP_NOTSENT_LOWAT; Linux
#: and macOS). Without it the kernel's send buffer autotunes to megabytes for a peer
#: that reads nothing, and a thousand such peers exhaust the host's TCP memory: every
#: connection on the machine then crawls. Bytes in flight are not limited by it.
UNSENT_LIMIT = 256 * 1024
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25 if sys.platform == "linux" else None)


def limit_unsent(transport: Any) -> None:
    """Cap what a TCP transport's socket keeps unsent in the kernel at UNSENT_LIMIT:
    past it the socket reports itself full, the transport buffers and pauses, and the
    splice stops acknowledging, so a reader that does not read holds one stream window
    of ours and little of the kernel's."""
    if _TCP_NOTSENT_LOWAT is not None:
        # Not TCP (a Unix socket refuses the option), or an old kernel: the limit is an
        # optimisation of memory only.
        set_socket_option(transport, socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, UNSENT_LIMIT)


def limit_unsent_on_listener(server: Any) -> bool:
    """Cap the unsent bytes (as :func:`limit_unsent` does) on every socket ``server``
    listens on; True if each took it. A TCP socket accepted from such a listener inherits
    the cap (Linux copies the listener's TCP options into it), which saves each accepted
    connection of a busy port the look-up and the system call: a splice of one is made
    with ``unsent_limited``."""
    if _TCP_NOTSENT_LOWAT is None or sys.platform != "linux":  # inherited: seen on Linux only
        return False
    sockets = list(getattr(server, "sockets", None) or ())
    done = 0
    for sock in sockets:
        try:
            raw = _CSocket(socket.AF_INET, socket.SOCK_STREAM, 0, sock.fileno())
            try:
                raw.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, UNSENT_LIMIT)
                done += 1
            finally:
                raw.detach()  # the descriptor stays the server's
        except (OSError, ValueError, AttributeError):
            pass
    return bool(sockets) and done == len(sockets)


def set_socket_option(transport: Any, level: int, option: int, value: int) -> bool:
    """``setsockopt`` on a transport's socket; False if it has none or refuses the option."""
    return set_socket_options(transport, ((level, option, value),)) == 1


def set_socket_options(transport: Any, options: Iterable[tuple[int, int, int]]) -> int:
    """``setsockopt`` of each ``(level, option, value)`` on a transport's socket, the
    socket looked up once; returns how many it took (an option it refuses is skipped).

    Done once per spliced connection, so cheaply: uvloop's transports hand out a stand-in
    socket (a ``getsockname`` call each time it is asked for) whose ``setsockopt`` builds
    a full ``socket.socket`` around the descriptor for each call (a Python-level
    constructor, and ``family`` an enum lookup), about a fifth of the instructions a
    connection costs the agent. The C socket type around the same descriptor, detached
    at once, does the same calls."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    done = 0
    try:
        raw = sock if isinstance(sock, socket.socket) else _CSocket(
            socket.AF_INET, socket.SOCK_STREAM, 0, sock.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or not a socket
        return 0
    try:
        for level, option, value in options:
            try:
                raw.setsockopt(level, option, value)
                done += 1
            except (OSError, ValueError):  # not an option of this socket
                pass
    finally:
        if raw is not sock:
            raw.detach()  # the descriptor stays the transport's
    return done


class StreamSplice:
    """Relay a :class:`MuxStream` to a local asyncio transport, Protocol to Protocol.

    An asyncio protocol by its methods, not by its base: compiled, it is an extension
    type, which cannot subclass ``asyncio.Protocol`` (event loops only duck-type it).

    Use it as the protocol of a local connection (``loop.create_connection(lambda:
    StreamSplice(stream), ...)``, or a server whose factory opens a stream with
    ``session.open_stream_nowait``). Backpressure is end to end, with no task and no
    buffer of its own:

    * mux -> local: each received chunk is written to the local transport and
      acknowledged at once while the transport is not paused; while it is paused
      (``pause_writing``) acknowledgements are held and released by ``resume_writing``.
      So a slow local consumer stops the remote sender after one window.
    * local -> mux: each chunk read goes to the stream's send queue; local reading is
      paused while the queue holds as much as the send window lets leave
      (``send_blocked``), and resumed when the peer grants more window.
    * EOF both ways (``write_eof``), resets both ways (a local error resets the stream;
      a stream reset, or the session's end, aborts the local transport with a TCP RST:
      :func:`abort_with_reset`).

    Memory per splice is bounded by one stream window + the local transport's high-water
    mark inbound, and the peer's window for the stream + one read outbound: a thousand
    stalled streams hold what their peer granted them, not a full send queue each.
    """

    def __init__(self, stream: MuxStream, unsent_limited: bool = False, receive_buffer: int = 0) -> None:
        self.stream = stream
        #: The local socket caps its unsent bytes already (accepted from a listener set
        #: up by :func:`limit_unsent_on_listener`): ``connection_made`` leaves it alone.
        self.unsent_limited = unsent_limited
        #: SO_RCVBUF to fix on the local socket when connected (0: the kernel's own,
        #: autotuned); set with the unsent cap, the socket looked up once.
        self.receive_buffer = receive_buffer
        self._session = stream._session
        self._stream_id = stream.stream_id
        self.transport: Optional[asyncio.Transport] = None
        self._write_paused = False
        self._held = 0  # bytes written to the paused local transport, not yet acknowledged
        self._reading_paused = False
        self._local_eof = False
        self._mux_eof_seen = False
        # A future made when someone waits (closed_future): an idle splice should cost
        # little, and a future is 144 bytes. None until then, or True once the local
        # connection was lost with nobody waiting.
        self._closed: Any = None
        # Payloads received in one batch of events, written with one writelines (one
        # syscall) when the batch ends instead of one write per DATA frame; None while
        # there are none (an empty list is 56 bytes per idle splice).
        self._out: Optional[list[Any]] = None
        self._out_n = 0

    # -- local side (asyncio.Protocol)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection's transport (asyncio types the argument for every kind).
        self.transport = cast(asyncio.Transport, transport)
        options = []
        if not self.unsent_limited and _TCP_NOTSENT_LOWAT is not None:
            options.append((socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, UNSENT_LIMIT))
        if self.receive_buffer:
            options.append((socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer))
        if options:
            # Not TCP (a Unix socket refuses the unsent cap), or an old kernel: both are
            # optimisations of memory only.
            set_socket_options(transport, options)
        stream = self.stream
        if not stream.local and not stream.answered and stream._exc is None:
            stream.accept()  # before data_received can run: sending needs an accepted stream
        stream._attach_sink(self)

    def data_received(self, data: bytes) -> None:
        try:
            more = self.stream._send(data)
        except (ConnectionError, RuntimeError, StreamClosedError):
            abort_with_reset(self.transport)  # the stream is gone: nowhere to put these bytes
            return
        if not more:  # send_blocked: pause reading until the window lets this go
            self._pause_if_blocked()

    def eof_received(self) -> bool:
        self._local_eof = True
        self.stream.write_eof()
        # Keep the local transport open for writing until the mux side ends too.
        return not self._mux_eof_seen

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        stream = self.stream
        self.stream._session._unblock_reader(self)
        held = self._held + self._out_n  # acknowledged first: stop_reading credits the rest
        self._out = None
        self._out_n = 0
        if held:
            stream._session._acknowledge(stream.stream_id, held)
            self._held = 0
        if exc is not None:
            stream.abort(ErrorCode.CANCEL, f"local connection failed: {exc}")
        elif not stream.finished:
            stream.write_eof()
            if not self._mux_eof_seen:
                # Nobody is left to deliver the peer's data to: it must stop sending. Not
                # a reset: our bytes still queued go first, then the FIN; the peer is
                # reset only if it sends more (as TCP answers data for a closed socket).
                stream._conn.stop_reading(stream.stream_id)
        closed = self._closed
        if closed is None:
            self._closed = True
        elif closed is not True and not closed.done():
            closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        held, self._held = self._held, 0
        if held:
            self.stream._session._acknowledge(self.stream.stream_id, held)

    # -- mux side (called by the MuxStream)

    def _mux_data(self, data: Any, n: int) -> None:
        # Collected, not written: the session calls _write_out once the events of this
        # read are handled, so a received batch of frames costs one write.
        out = self._out
        if out is None:
            self._out = [data]
            self._session._pending_splices.append(self)
        else:
            out.append(data)
        self._out_n += n

    def _write_out(self) -> None:
        """Write what ``_mux_data`` collected; acknowledge it unless that paused us."""
        out, n = self._out, self._out_n
        if out is None:
            return
        self._out = None
        self._out_n = 0
        transport = self.transport
        assert transport is not None  # data reaches a splice once it is attached, connected
        if transport.is_closing():
            self._session._acknowledge(self._stream_id, n)
            return
        if self._write_paused:
            # Queued behind a reader that does not keep up, perhaps for good: a
            # payload view would keep the whole received read alive with it (a
            # thousand stalled readers, each pinning a 256 KiB read for 16 KiB).
            out = [bytes(x) if type(x) is memoryview else x for x in out]
        if len(out) == 1:
            transport.write(out[0])
        else:
            transport.writelines(out)
        if self._write_paused:  # possibly paused by this very write
            self._held += n
        else:
            self._session._acknowledge(self._stream_id, n)

    def _mux_eof(self) -> None:
        self._write_out()  # the data that came before the FIN goes first
        self._mux_eof_seen = True
        transport = self.transport
        assert transport is not None  # the stream's EOF reaches a splice once connected
        if transport.is_closing():
            return
        if self._local_eof:
            transport.close()  # both directions done; close() still flushes the buffer
        elif transport.can_write_eof():
            transport.write_eof()

    def _mux_reset(self, exc: BaseException) -> None:
        self._out = None  # abandoned with the stream (the core credits it back)
        self._out_n = 0
        if self.transport is not None:
            abort_with_reset(self.transport)  # a RST: a cut stream must not look complete

    def _pause_if_blocked(self) -> None:
        transport = self.transport
        assert transport is not None  # called on local data: connected
        if self._reading_paused or transport.is_closing():
            return
        stream = self.stream
        conn = stream._conn
        if not stream.writable() or conn.send_blocked(stream.stream_id):
            self._reading_paused = True
            transport.pause_reading()
            stream._session._block_reader(self)

    def _try_resume_reading(self) -> bool:
        """Resume local reading if the stream can take data again; True when done."""
        if not self._reading_paused:
            return True
        stream = self.stream
        transport = self.transport
        assert transport is not None  # only a connected splice pauses its reading
        if stream._exc is not None or transport.is_closing():
            return True
        if stream.writable() and not stream._conn.send_blocked(stream.stream_id):
            self._reading_paused = False
            transport.resume_reading()
            return True
        return False

    # -- public

    def abort(self) -> None:
        """Abort both the local connection (with a RST) and the stream."""
        self.stream.abort()
        if self.transport is not None:
            abort_with_reset(self.transport)

    def closed_future(self) -> asyncio.Future[None]:
        """A future done once the local connection is closed (made on first call)."""
        closed = self._closed
        if closed is None or closed is True:
            future: asyncio.Future[None] = self.stream._loop.create_future()
            if closed is True:
                future.set_result(None)
            self._closed = future
            return future
        return cast("asyncio.Future[None]", closed)

    async def wait_closed(self) -> None:
        """Wait until the local connection is closed."""
        await asyncio.shield(self.closed_future())


async def connect_stream_to(stream: MuxStream, host: str, port: int, **kwargs: Any) -> StreamSplice:
    """Open a local TCP connection to ``host:port`` and splice ``stream`` to it.

    An incoming stream not answered yet is accepted once the connection is made, or
    refused with CONNECT_FAILED (and the OSError re-raised) if it cannot be. The
    connection's receive buffer is fixed at TARGET_RECEIVE_BUFFER.
    """
    loop = asyncio.get_running_loop()
    try:
        # Compiled, StreamSplice is an extension type, which cannot subclass asyncio.Protocol.
        _, splice = await loop.create_connection(
            lambda: StreamSplice(stream, receive_buffer=TARGET_RECEIVE_BUFFER), host, port, **kwargs)  # type: ignore[type-var]  # a duck-typed protocol (see above)
    except BaseException as exc:
        message = f"cannot connect to {host}:{port}: {exc}" if isinstance(exc, OSError) else "cancelled"
        if not stream.local and not stream.answered:
            stream.refuse(ErrorCode.CONNECT_FAILED, message)
        else:
            stream.abort(ErrorCode.CONNECT_FAILED, message)
        raise
    return splice


#: Receive buffer of a connection to a target (SO_RCVBUF; the kernel doubles it). A
#: target is near the agent (its host or LAN), where this is a window of ample
#: throughput; autotuned, the buffer grows to megabytes while the splice reads fast, and
#: stays that full once the stream stalls: a thousand stalled streams then hold GBs of
#: the agent host's TCP memory, and every connection on that host crawls.
TARGET_RECEIVE_BUFFER = 256 * 1024


def limit_receive_buffer(transport: Any) -> None:
    """Fix a target connection's receive buffer at TARGET_RECEIVE_BUFFER."""
    # False (not a socket option this transport has): an optimisation of memory only.
    set_socket_option(transport, socket.SOL_SOCKET, socket.SO_RCVBUF, TARGET_RECEIVE_BUFFER)
