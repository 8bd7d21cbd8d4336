"""A mux stream spliced to another mux stream, with backpressure end to end.

A forwarded stream arrives at the gateway holding the agent on a peer session (``F``);
the holder opens a stream to the agent (``G``) and joins the two. The existing
:class:`~relay.aio.StreamSplice` already relays a stream to an asyncio transport with
backpressure both ways and no buffer of its own; :class:`StreamTransport` presents
``F`` as such a transport, so ``StreamSplice(G)`` with ``StreamTransport(F)`` as its
local side is the whole join:

* F -> G: what F receives is handed to the splice (``data_received``) and acknowledged
  on F's session once handed over. When G cannot take more, the splice pauses reading
  (``pause_reading``): F's chunks are then kept here unacknowledged, so the forwarding
  gateway's sender stops after one F window, as a paused socket stops a TCP sender.
* G -> F: the splice writes G's data to F (``write``); when F's queue or send window is
  full the splice is told to pause writing and holds G's acknowledgements until F drains
  (``resume_writing``), so the agent's sender stops after one G window.
* Ends and resets cross over: F's FIN is an EOF for the splice (G's FIN follows), G's
  FIN is ``write_eof`` on F; a reset of either resets the other with the same code, and
  a refusal of G (the agent's allowlist, nothing listening) is a refusal of F.

Memory per join is bounded by one window of each stream, as for a splice to a socket.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Optional

from relay.aio.stream import MuxStream, StreamSplice
from relay.mux.errors import ErrorCode

__all__ = ["StreamTransport", "join_streams"]


class StreamTransport:
    """``stream`` as the asyncio transport of a protocol (a :class:`StreamSplice`), and
    at the same time the stream's sink (it receives what the stream receives)."""

    def __init__(self, stream: MuxStream, counter: Optional[Any] = None) -> None:
        self.stream = stream
        self._session = stream._session
        self._protocol: Any = None
        #: Optional object with ``add_in(n)``/``add_out(n)`` counting bytes each way.
        self._counter = counter
        self._paused = False  # the protocol paused our reading
        # Received while paused, not acknowledged yet; made on first use (an idle join
        # should cost little: an empty deque is 600 bytes).
        self._queue: Optional[deque[Any]] = None
        self._eof_queued = False
        # Received in the current batch of events; None while there is none (an idle
        # join should not hold an empty list).
        self._out: Optional[list[Any]] = None
        self._out_n = 0
        self._write_paused = False  # we paused the protocol's writing
        self._closing = False
        self._lost = False

    # -- lifecycle

    def start(self, protocol: Any) -> None:
        """Make ``protocol`` this transport's protocol and start delivering to it."""
        self._protocol = protocol
        protocol.connection_made(self)
        self.stream._attach_sink(self)

    def _connection_lost(self, exc: Optional[BaseException]) -> None:
        if self._lost:
            return
        self._lost = True
        self._session._unblock_reader(self)
        if self._queue:  # never delivered: give the window back
            self._session._acknowledge(self.stream.stream_id, _size(self._queue))
            self._queue = None
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.connection_lost(exc)

    # -- the stream's sink (called by the MuxStream and its session)

    def _mux_data(self, data: Any, n: int) -> None:
        out = self._out
        if out is None:
            self._out = [data]
            self._session._pending_splices.append(self)
        else:
            out.append(data)
        self._out_n += n

    def _write_out(self) -> None:
        out = self._out
        if out is None:
            return
        self._out = None
        self._out_n = 0
        for chunk in out:
            if self._paused or self._queue or self._lost:
                if self._queue is None:
                    self._queue = deque()
                # Kept as bytes: a view would pin the whole received read while we wait.
                self._queue.append(bytes(chunk) if type(chunk) is memoryview else chunk)
            else:
                self._deliver(chunk)
        if self._lost and self._queue:
            self._session._acknowledge(self.stream.stream_id, _size(self._queue))
            self._queue = None

    def _deliver(self, chunk: Any) -> None:
        n = len(chunk)
        if self._counter is not None:
            self._counter.add_in(n)
        self._protocol.data_received(chunk)
        self._session._acknowledge(self.stream.stream_id, n)

    def _mux_eof(self) -> None:
        self._write_out()
        if self._queue:
            self._eof_queued = True
        else:
            self._eof()

    def _eof(self) -> None:
        if self._protocol is None:
            return
        if not self._protocol.eof_received():
            self.close()  # asyncio's rule: a falsy answer closes the transport

    def _mux_reset(self, exc: BaseException) -> None:
        self._out = None
        self._out_n = 0
        self._queue = None  # the core credits unacknowledged data back on a reset
        self._connection_lost(exc)

    def _try_resume_reading(self) -> bool:
        """The stream may take data again (its writable callback, or the session's
        check of blocked readers): let the protocol write once more. True when done."""
        if not self._write_paused:
            return True
        stream = self.stream
        if stream._exc is not None or self._lost:
            self._write_paused = False
            return True
        if stream.writable() and not stream._conn.send_blocked(stream.stream_id):
            self._write_paused = False
            if self._protocol is not None:
                self._protocol.resume_writing()
            return True
        return False

    # -- the protocol's transport

    def _answer(self) -> None:
        stream = self.stream
        if not stream.local and not stream.answered and stream._exc is None:
            stream.accept()

    def write(self, data: Any) -> None:
        if self._closing or self.stream._exc is not None:
            return
        self._answer()
        if self._counter is not None:
            self._counter.add_out(len(data))
        try:
            more = self.stream._send(data)
        except (ConnectionError, RuntimeError):
            return  # reset meanwhile: _mux_reset tells the protocol
        if not more and not self._write_paused:
            self._write_paused = True
            if self._protocol is not None:
                self._protocol.pause_writing()
            self._session._block_reader(self)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self.stream._exc is None:
            self._answer()
            self.stream.write_eof()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self.stream._exc is None:
            self._answer()
            self.stream.close()
        self.stream._loop.call_soon(self._connection_lost, None)

    def abort(self) -> None:
        self.send_reset()

    def send_reset(self) -> None:
        """Reset the stream with the code the protocol's own stream ended with (so a
        refusal by the agent reaches the forwarding gateway as the same refusal)."""
        if self._closing and self._lost:
            return
        self._closing = True
        stream = self.stream
        source = getattr(getattr(self._protocol, "stream", None), "exception", None)
        code = getattr(source, "error_code", ErrorCode.CANCEL)
        message = getattr(source, "message", "") or "the forwarded stream was cut"
        if stream._exc is None:
            if not stream.local and not stream.answered:
                stream.refuse(code, message)
            else:
                stream.abort(code, message)
        stream._loop.call_soon(self._connection_lost, None)

    def is_closing(self) -> bool:
        return self._closing or self.stream._exc is not None

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        self._paused = False
        queue = self._queue
        while queue and not self._paused and not self._lost:
            self._deliver(queue.popleft())
        if not queue and self._eof_queued and not self._paused:
            self._eof_queued = False
            self._eof()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in ("socket", "sockname", "peername"):
            return default  # not a socket: nothing to tune on it
        return self.stream.get_extra_info(name, default)

    def set_write_buffer_limits(self, high: Optional[int] = None, low: Optional[int] = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def set_protocol(self, protocol: Any) -> None:
        self._protocol = protocol

    def get_protocol(self) -> Any:
        return self._protocol


def _size(chunks: Any) -> int:
    """Bytes in ``chunks`` (a function: compiled methods cannot hold a generator)."""
    total = 0
    for chunk in chunks:
        total += len(chunk)
    return total


def join_streams(incoming: MuxStream, outgoing: MuxStream, counter: Optional[Any] = None) -> StreamTransport:
    """Join ``incoming`` (opened by a peer, not answered yet) to ``outgoing`` (opened by
    us): bytes, ends and resets cross over with backpressure both ways. ``incoming`` is
    accepted when ``outgoing`` first carries something back or ends, and refused with
    the same code if ``outgoing`` is refused. ``counter`` (``add_in``/``add_out``)
    counts the bytes from ``incoming`` and towards it. Returns ``incoming``'s side of
    the join (its protocol is the splice of ``outgoing``)."""
    transport = StreamTransport(incoming, counter)
    transport.start(StreamSplice(outgoing))
    return transport
