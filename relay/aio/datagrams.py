"""asyncio glue of a datagram stream (stream protocol ``udp``): the rules are in
:mod:`relay.mux.datagrams`; this module only moves datagrams between a
:class:`~relay.aio.stream.MuxStream` and whatever delivers them locally (a UDP socket,
a WebSocket), on the event loop.

:class:`DatagramPipe` is the transport of a :class:`~relay.aio.stream.StreamSplice`, so
a datagram flow gets the splice's flow control for free: the splice "pauses reading"
when the stream's send window is spent, and the pipe then keeps datagrams in the
flow's drop-oldest queue instead of blocking; it "resumes reading" when the peer grants
window, and the pipe feeds the queue to the stream again. What the stream delivers is
decoded into datagrams and handed to ``deliver`` at once (and so acknowledged at once).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from typing import Any, Optional

from relay.aio.stream import MuxStream, StreamSplice
from relay.mux.datagrams import DatagramFlow

__all__ = ["DatagramPipe", "send_datagram", "size_socket_buffers"]

log = logging.getLogger("relay.aio.datagrams")


def send_datagram(transport: asyncio.DatagramTransport, datagram: bytes, addr: Any = None) -> None:
    """``transport.sendto(datagram, addr)``, empty datagrams included.

    asyncio's datagram transports (the standard loop's and uvloop's) return from
    ``sendto(b"")`` without sending anything, yet a zero-length datagram is a valid UDP
    message (some protocols use it as a keepalive or a probe). It goes out on a duplicate
    of the transport's socket, so closing that leaves the transport's socket alone; a
    failure loses it, as the network may."""
    if datagram:
        transport.sendto(datagram, addr)
        return
    if transport.is_closing():
        return
    with socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno())) as sock:
        try:
            if addr is None:
                sock.send(b"")
            else:
                sock.sendto(b"", addr)
        except OSError:
            pass


def size_socket_buffers(transport: asyncio.BaseTransport, size: int) -> None:
    """Ask for ``size`` bytes of receive and send buffer on ``transport``'s socket
    (capped by the system's ``rmem_max``/``wmem_max``): a burst of datagrams then waits
    in the kernel while the loop is busy instead of being dropped."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
        except OSError:
            pass  # a smaller buffer only loses more of a burst


class DatagramPipe:
    """One flow: a stream carrying datagram records, and a local ``deliver`` callable.

    ``deliver(datagram)`` sends one datagram towards the local side (a UDP ``sendto``,
    a WebSocket message); ``on_closed(pipe, exc)`` is called once when the flow ends
    (``exc`` None: ended cleanly, by idle expiry or the peer's FIN; else the reset).
    With ``idle_timeout`` set, the pipe ends the flow (FIN) after that long without a
    datagram either way; the side that owns the flow (the one with the client
    addresses) sets it.

    Transport methods (``write``, ``pause_reading`` ...) are for the splice only.
    """

    def __init__(self, stream: MuxStream, deliver: Callable[[bytes], Any],
                 on_closed: Optional[Callable[["DatagramPipe", Optional[BaseException]], Any]] = None,
                 *, flow: Optional[DatagramFlow] = None, idle_timeout: Optional[float] = None) -> None:
        self._loop = asyncio.get_running_loop()
        self.stream = stream
        self.flow = flow if flow is not None else DatagramFlow(self._loop.time())
        if idle_timeout is not None:
            self.flow.idle_timeout = idle_timeout
        self._deliver = deliver
        self._on_closed = on_closed
        self._paused = False  # the stream cannot take more now: datagrams queue
        self._drain_scheduled = False
        self._closed = False
        self._timer: Optional[asyncio.TimerHandle] = None
        self.splice = StreamSplice(stream)
        # Accepts a stream the peer opened and routes what it receives to write().
        self.splice.connection_made(self)  # type: ignore[arg-type]  # the pipe stands in for a socket transport
        if idle_timeout is not None:
            self._timer = self._loop.call_at(self.flow.deadline, self._check_idle)

    # ------------------------------------------------------------------ the local side

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, datagram: bytes) -> None:
        """A datagram from the local side, for the stream (queued while it is blocked;
        the oldest queued is dropped when the queue is full)."""
        if self._closed:
            return
        dropped = self.flow.from_local(datagram, self._loop.time())
        if dropped:
            log.debug("stream %d: %d datagram(s) dropped, the stream is slower than its source",
                      self.stream.stream_id, dropped)
        if not self._paused:
            self._drain()

    def end(self) -> None:
        """End the flow cleanly (FIN after what is queued in the stream); datagrams
        still waiting in the flow's queue are dropped, as a closed socket's would be."""
        if self._closed:
            return
        self._close(None)
        self.splice.connection_lost(None)

    def abort(self, exc: Optional[BaseException] = None) -> None:
        """Reset the flow (also the transport method a stream reset calls)."""
        if self._closed:
            return
        exc = exc or self.stream.exception or ConnectionResetError("datagram flow aborted")
        self._close(exc)
        self.splice.connection_lost(exc)

    def _drain(self) -> None:
        self._drain_scheduled = False
        flow = self.flow
        splice = self.splice
        while not self._paused and not self._closed:
            record = flow.take_record()
            if record is None:
                return
            splice.data_received(record)  # may pause us (pause_reading)

    def _check_idle(self) -> None:
        self._timer = None
        if self._closed:
            return
        now = self._loop.time()
        if self.flow.expired(now):
            log.debug("stream %d: datagram flow idle for %.0f s, ended", self.stream.stream_id,
                      self.flow.idle_timeout)
            self.end()
        else:
            self._timer = self._loop.call_at(self.flow.deadline, self._check_idle)

    def _close(self, exc: Optional[BaseException]) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        callback, self._on_closed = self._on_closed, None
        if callback is not None:  # first: a clean end may still hand over what is queued locally
            callback(self, exc)
        self.flow.to_stream.clear()
        self.flow.to_local.clear()

    # ------------------------------------------------------------------ transport (for the splice)

    def write(self, data: Any) -> None:
        """Bytes the stream delivered: decode and deliver every datagram completed."""
        if self._closed:
            return
        deliver = self._deliver
        flow = self.flow
        for datagram in flow.from_stream(data, self._loop.time()):
            try:
                deliver(datagram)
            except OSError as exc:  # a local send failed: that datagram is lost, as in UDP
                flow.lost(len(datagram))
                log.debug("stream %d: datagram not delivered: %s", self.stream.stream_id, exc)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def is_closing(self) -> bool:
        return self._closed

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        self._paused = False
        if not self._drain_scheduled and not self._closed:
            # Later, not now: the splice is inside its own bookkeeping here.
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """The peer ended the flow (FIN): end ours too, after the splice's turn."""
        if not self._closed:
            self._loop.call_soon(self.end)

    def close(self) -> None:
        if not self._closed:
            self._loop.call_soon(self.end)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def get_write_buffer_size(self) -> int:
        return 0
