"""Datagrams over a mux stream (stream protocol ``udp``): the framing and the per-flow
rules both ends follow, sans-IO (docs/PROTOCOL.md section 16).

A mux stream is an ordered, reliable byte stream; UDP is neither, and its datagrams
have boundaries a byte stream does not keep. So a stream opened with the metadata
``{"protocol": "udp", "target": "HOST:PORT"}`` carries, in each direction, a sequence
of **records**: a ``u16`` big-endian length, then that many bytes, one record per
datagram (0 to 65535 bytes; a zero-length datagram is a record of length 0). Records
are independent of DATA frames: a frame may hold several records and a record may span
frames; the receiver reassembles them (:class:`DatagramDecoder`). The stream's FIN
means "this flow has ended" and RESET "this flow was refused or cut"; flow control is
the stream's, unchanged.

One stream is one *flow*: one client address and port at the side that opened it.
What UDP would do where a reliable stream would wait:

* a datagram that cannot go on yet (the stream's send window is spent, or the local
  socket beyond the stream is a slow reader) waits in a bounded queue, and when the
  queue is full the **oldest** waiting datagram is dropped and counted
  (:class:`DropOldestQueue`): the newest data is usually the one worth having (a game
  state, a metric, a retransmitted query), and a UDP application expects loss, not
  delay;
* a flow that carried no datagram either way for ``idle_timeout`` seconds has ended
  (:class:`DatagramFlow`): the side that owns the flow ends the stream (FIN).

No clock is read here: every method that needs the time takes ``now`` from the caller.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Optional

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_QUEUE_BYTES",
    "DEFAULT_QUEUE_DATAGRAMS",
    "MAX_DATAGRAM",
    "RECORD_HEADER",
    "UDP_PROTOCOL",
    "DatagramDecoder",
    "DatagramFlow",
    "DatagramTooLarge",
    "DropOldestQueue",
    "encode_datagram",
    "encode_datagrams",
]

#: The ``protocol`` of a stream's open metadata that selects this framing.
UDP_PROTOCOL = "udp"
#: Largest datagram a record can carry (its length is a u16). IPv4 UDP carries at most
#: 65507 bytes and IPv6 65527 (without jumbograms), so every real datagram fits.
MAX_DATAGRAM = 0xFFFF
#: Bytes of the length prefix of each record.
RECORD_HEADER = 2
#: Seconds without a datagram either way after which a flow has ended. Linux's
#: conntrack forgets an unanswered UDP flow after 30 s and an answered one after 120 s;
#: 60 s keeps a request/response client (DNS, NTP) and a chatty one (a game, WireGuard
#: keepalives every 25 s) alike, and frees a forgotten flow within a minute.
DEFAULT_IDLE_TIMEOUT = 60.0
#: Datagrams a flow holds while they cannot go on (each direction), at most...
DEFAULT_QUEUE_DATAGRAMS = 256
#: ...and bytes, at most: what one slow flow may make a side buffer.
DEFAULT_QUEUE_BYTES = 1024 * 1024


class DatagramTooLarge(ValueError):
    """A datagram longer than :data:`MAX_DATAGRAM` cannot be framed."""


def encode_datagram(payload: bytes | bytearray | memoryview) -> bytes:
    """One record: the length (u16, big-endian) and the datagram."""
    n = len(payload)
    if n > MAX_DATAGRAM:
        raise DatagramTooLarge(f"a datagram of {n} bytes is over the {MAX_DATAGRAM}-byte limit")
    return n.to_bytes(RECORD_HEADER, "big") + bytes(payload)


def encode_datagrams(payloads: Iterable[bytes | bytearray | memoryview]) -> bytes:
    """Several records back to back (one write for a batch of datagrams)."""
    return b"".join(encode_datagram(p) for p in payloads)


class DatagramDecoder:
    """Reassembles records from the stream's bytes, however the DATA frames cut them.

    It holds at most one incomplete record (``RECORD_HEADER + MAX_DATAGRAM`` bytes), so
    what a peer can make it buffer is bounded whatever it sends.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete record held (0 between records)."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """The datagrams completed by ``data``, in order."""
        buffer = self._buffer
        buffer += data
        out: list[bytes] = []
        start = 0
        end = len(buffer)
        while end - start >= RECORD_HEADER:
            n = (buffer[start] << 8) | buffer[start + 1]
            stop = start + RECORD_HEADER + n
            if stop > end:
                break
            out.append(bytes(buffer[start + RECORD_HEADER:stop]))
            start = stop
        if start:
            del buffer[:start]
        return out


class DropOldestQueue:
    """A FIFO of datagrams bounded in count and bytes; a push past either bound drops
    the oldest datagrams until the new one fits (as a full UDP socket buffer loses
    datagrams instead of blocking the sender), and counts them in :attr:`dropped`."""

    __slots__ = ("_items", "_bytes", "max_datagrams", "max_bytes", "dropped", "dropped_bytes")

    def __init__(self, max_datagrams: int = DEFAULT_QUEUE_DATAGRAMS,
                 max_bytes: int = DEFAULT_QUEUE_BYTES) -> None:
        if max_datagrams < 1 or max_bytes < MAX_DATAGRAM:
            raise ValueError("a queue must hold at least one datagram of the largest size")
        self._items: deque[bytes] = deque()
        self._bytes = 0
        self.max_datagrams = max_datagrams
        self.max_bytes = max_bytes
        #: Datagrams (and their bytes) dropped so far because the queue was full.
        self.dropped = 0
        self.dropped_bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    @property
    def queued_bytes(self) -> int:
        """Payload bytes held."""
        return self._bytes

    def push(self, datagram: bytes) -> int:
        """Append ``datagram``; returns how many older ones were dropped to make room."""
        items = self._items
        dropped = 0
        size = len(datagram)
        while items and (len(items) >= self.max_datagrams or self._bytes + size > self.max_bytes):
            old = items.popleft()
            self._bytes -= len(old)
            self.dropped_bytes += len(old)
            dropped += 1
        items.append(datagram)
        self._bytes += size
        self.dropped += dropped
        return dropped

    def pop(self) -> Optional[bytes]:
        """The oldest datagram held, or None."""
        if not self._items:
            return None
        datagram = self._items.popleft()
        self._bytes -= len(datagram)
        return datagram

    def count_drop(self, size: int) -> None:
        """Count a datagram dropped without entering the queue (the local side refused
        it: a socket buffer full), so every loss shows in one counter."""
        self.dropped += 1
        self.dropped_bytes += size

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0


class DatagramFlow:
    """The state of one flow over one stream, at either end: what waits to enter the
    stream (``to_stream``), what waits to leave towards the local socket or client
    (``to_local``, used where that side can be slow: a WebSocket), the decoder of the
    stream's records, counters, and the idle deadline.

    The binding calls :meth:`from_local` for each datagram its socket read,
    :meth:`take_record` while the stream can take more (it is not ``send_blocked``),
    :meth:`from_stream` with the bytes the stream delivered (and acknowledges them at
    once: reading is never what slows a datagram stream down), and :meth:`expired`
    when its timer fires.
    """

    __slots__ = ("to_stream", "to_local", "decoder", "idle_timeout", "last_activity",
                 "datagrams_in", "datagrams_out", "bytes_in", "bytes_out", "too_large")

    def __init__(self, now: float, *, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 max_datagrams: int = DEFAULT_QUEUE_DATAGRAMS,
                 max_bytes: int = DEFAULT_QUEUE_BYTES) -> None:
        self.to_stream = DropOldestQueue(max_datagrams, max_bytes)
        self.to_local = DropOldestQueue(max_datagrams, max_bytes)
        self.decoder = DatagramDecoder()
        self.idle_timeout = idle_timeout
        self.last_activity = now
        #: Datagrams (bytes) read locally, towards the stream: "in" to the relay.
        self.datagrams_in = 0
        self.bytes_in = 0
        #: Datagrams (bytes) that came out of the stream, towards the local side.
        self.datagrams_out = 0
        self.bytes_out = 0
        #: Local datagrams too large to frame (over MAX_DATAGRAM), dropped.
        self.too_large = 0

    @property
    def dropped(self) -> int:
        """Datagrams dropped by a full queue, both directions."""
        return self.to_stream.dropped + self.to_local.dropped

    @property
    def deadline(self) -> float:
        """When the flow expires unless a datagram passes before."""
        return self.last_activity + self.idle_timeout

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def from_local(self, datagram: bytes, now: float) -> int:
        """Queue a datagram read locally for the stream; returns how many older ones
        were dropped to make room (0 when the queue had room)."""
        if len(datagram) > MAX_DATAGRAM:
            self.too_large += 1
            return 0
        self.last_activity = now
        self.datagrams_in += 1
        self.bytes_in += len(datagram)
        return self.to_stream.push(datagram)

    def take_record(self) -> Optional[bytes]:
        """The next queued datagram, framed as a record, or None when none waits."""
        datagram = self.to_stream.pop()
        return None if datagram is None else encode_datagram(datagram)

    def lost(self, size: int) -> None:
        """A datagram out of the stream could not be delivered locally (a full or failed
        socket): counted as dropped towards the local side."""
        self.to_local.count_drop(size)

    def from_stream(self, data: bytes | bytearray | memoryview, now: float) -> list[bytes]:
        """The datagrams completed by bytes the stream delivered."""
        datagrams = self.decoder.feed(data)
        if datagrams:
            self.last_activity = now
            self.datagrams_out += len(datagrams)
            self.bytes_out += sum(len(d) for d in datagrams)
        return datagrams
