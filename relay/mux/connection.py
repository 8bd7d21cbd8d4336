"""MuxConnection: the sans-IO multiplexer.

Bytes from the transport go in through :meth:`MuxConnection.receive_data`, which returns
events; commands (open, send, end, reset, ping, goaway, control) queue frames that
:meth:`MuxConnection.data_to_send` hands back as bytes. Time never comes from a clock:
callers pass ``now`` (any monotonic float, in seconds) to the methods that need it.

Sending order: control frames (SETTINGS, OPEN, ACCEPT, RESET, WINDOW_UPDATE, PING,
GOAWAY, CONTROL) always go first; then DATA, one frame of at most ``max_frame_size`` per
stream per turn, round-robin over the streams that have data and window. Nothing but
SETTINGS leaves before the peer's SETTINGS has arrived, so both sides always know each
other's limits.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from struct import Struct
from typing import TYPE_CHECKING, Any, Optional, Sequence, TypeGuard

import msgpack

if TYPE_CHECKING:  # mypy checks the pure-Python twin: cython's no-op declarations
    from relay.mux import _cython_shim as cython
else:
    try:
        import cython
    except ImportError:  # the pure-Python core runs without Cython installed
        from relay.mux import _cython_shim as cython

from relay.mux.errors import (
    ErrorCode,
    FlowControlError,
    FrameSizeError,
    LocalProtocolError,
    ProtocolError,
    StreamClosedError,
    StreamLimitError,
)
from relay.mux.events import (
    ConnectionTerminated,
    ControlReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    PingAcknowledged,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    data_received,
)
from relay.mux.flow import ReceiveWindow
from relay.mux.frames import (
    SUPPORTED_VERSIONS,
    Flag,
    FrameDecoder,
    FrameType,
    encode_frame,
    encode_header,
)
from relay.mux.stream import Chunk, Stream, StreamInput, StreamState

_U32 = Struct(">I")
_RESET = Struct(">I")
_GOAWAY = Struct(">II")
_PING = Struct(">Q")
MAX_STREAM_ID = 0xFFFFFFFF
MAX_WINDOW = 0x7FFFFFFF
#: Reason strings in RESET/GOAWAY are cut to this many bytes: enough for a clear
#: message, never enough to matter for memory.
MAX_REASON = 512
#: Before the peer's SETTINGS arrive its limits are unknown; the smallest value any peer
#: may advertise is safe, so early OPEN metadata and CONTROL messages are held to it.
_PRE_HELLO_LIMIT = 256
#: A SETTINGS payload is a handful of numbers and a small info map.
MAX_SETTINGS_SIZE = 64 * 1024

_DATA = int(FrameType.DATA)
_WINDOW_UPDATE = int(FrameType.WINDOW_UPDATE)
_SETTINGS = int(FrameType.SETTINGS)
_OPEN = StreamState.OPEN
_HALF_CLOSED_LOCAL = StreamState.HALF_CLOSED_LOCAL
_HALF_CLOSED_REMOTE = StreamState.HALF_CLOSED_REMOTE
_pack_u32 = _U32.pack
_FIN = int(Flag.FIN)
_ACK = int(Flag.ACK)


@dataclass(slots=True)
class MuxConfig:
    """Limits and tunables of one side. Defaults are documented in docs/PROTOCOL.md."""

    #: Largest DATA payload we send, and the largest we accept (advertised).
    max_frame_size: int = 16 * 1024
    #: Window each new stream starts with, in each direction (advertised). Small on
    #: purpose, as TCP's initial window is: every stream's window is paid for out of
    #: ``session_window`` (see ``MuxConnection``), and a stream grows only as its reader
    #: shows it reads (auto-tuning), so a reader that never reads holds this much and no
    #: more. A session holds at most ``session_window // initial_window`` streams.
    initial_window: int = 16 * 1024
    #: Auto-tuning never grows a stream's receive window beyond this.
    max_window: int = 16 * 1024 * 1024
    #: Session receive window: the most unconsumed bytes the peer can make us hold. It is
    #: also the budget every stream's receive window is reserved from, so it is never the
    #: limit a stream with window left runs into.
    session_window: int = 64 * 1024 * 1024
    #: Concurrent streams the peer may open towards us (advertised).
    max_streams: int = 32768
    #: Largest msgpack OPEN metadata we accept (advertised).
    max_metadata_size: int = 16 * 1024
    #: Largest CONTROL message we accept (advertised).
    max_control_size: int = 1024 * 1024
    #: Per-stream send queue limit; past it the stream is not writable.
    send_queue_limit: int = 1024 * 1024
    #: Control frames queued and not yet taken by ``data_to_send``, in bytes and in
    #: frames. A peer that provokes answers (PING echoes, RESETs of refused opens or
    #: broken streams) faster than it reads them fails the session past either bound
    #: (``OVERLOADED``), as nghttp2 caps its outbound control queue (CVE-2019-9512/9514).
    #: A peer that reads keeps this queue near empty: the binding drains it on every flush.
    max_queued_control: int = 1024 * 1024
    max_queued_control_frames: int = 16 * 1024
    #: Silence after which a PING is sent, and after which the peer is declared dead.
    keepalive_interval: float = 15.0
    keepalive_timeout: float = 45.0
    #: A stream we half-closed is reset if the peer does not finish it within this time.
    half_closed_timeout: float = 600.0
    #: A stream counts as receiving (for the fair share of window growth) until this long
    #: after its last DATA arrived.
    receiving_horizon: float = 0.5
    #: Sent to the peer in SETTINGS (agent name, labels, version ...).
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Byte counts are integers: the compiled core keeps them in C integers, and a
        # float here would mean different arithmetic in the two builds.
        for key in (*_SETTING_RANGES, "max_window", "send_queue_limit", "max_queued_control",
                    "max_queued_control_frames"):
            value = getattr(self, key)
            if type(value) is not int:
                raise TypeError(f"MuxConfig.{key} must be an int, not {type(value).__name__}")
        for key, (low, high) in _SETTING_RANGES.items():
            value = getattr(self, key)
            if not low <= value <= high:
                raise ValueError(f"MuxConfig.{key}={value} is outside {low}..{high}")
        if self.max_window < self.initial_window:
            raise ValueError("MuxConfig.max_window must be at least initial_window")
        if self.session_window < self.initial_window:
            raise ValueError("MuxConfig.session_window must be at least initial_window")

    def advertised(self) -> dict[str, Any]:
        return {
            "versions": list(SUPPORTED_VERSIONS),
            "max_frame_size": self.max_frame_size,
            "initial_window": self.initial_window,
            "session_window": self.session_window,
            "max_streams": self.max_streams,
            "max_metadata_size": self.max_metadata_size,
            "max_control_size": self.max_control_size,
            "info": self.info,
        }


#: Accepted ranges of the numbers a peer advertises.
_SETTING_RANGES = {
    "max_frame_size": (1024, 16 * 1024 * 1024),
    "initial_window": (1024, MAX_WINDOW),
    "session_window": (64 * 1024, MAX_WINDOW),
    "max_streams": (1, MAX_STREAM_ID),
    "max_metadata_size": (256, 16 * 1024 * 1024),
    "max_control_size": (256, 64 * 1024 * 1024),
}


#: Beyond the open half of the growth budget a stream's window may exceed its initial
#: size by a quarter of what it has consumed past its first ``_EARNED_AFTER`` bytes (see
#: ``_consumed_tuned``). The offset is larger than the socket buffers a stalled client's
#: kernel takes in one go, so taking a burst and stalling earns nothing.
_EARNED_RATIO = 4
_EARNED_AFTER = 1024 * 1024


def _keeps_view(data: object) -> TypeGuard[memoryview]:
    """Can :meth:`MuxConnection.send_data` queue ``data`` as it is (see there)? A view
    of ``bytes`` is as immutable as they are."""
    if type(data) is not memoryview:
        return False
    owner = data.obj
    return type(owner) is bytes and data.nbytes * 2 >= len(owner)


class MuxConnection:
    """One end of a multiplexed session.

    ``client=True`` for the side that dialled (the agent): it allocates odd stream ids,
    the other side even ones, so both can open streams at once without colliding.

    The receive budget: every stream's receive window (``window + debt``, from the
    moment it opens) is reserved out of ``session_window``, and so are received bytes
    of streams that no longer receive until they are acknowledged. The reservations
    never add up to more than ``session_window``, so the session window can never run
    out while a stream still has window: a stalled reader holds its own window and
    nothing of anyone else's. A stream that cannot get its ``initial_window`` reserved
    is not opened (``open_stream`` raises :class:`StreamLimitError`; a peer's OPEN is
    refused with ``TOO_MANY_STREAMS``), and auto-tuning grows a window only out of what
    is left.
    """

    def __init__(self, client: bool, config: Optional[MuxConfig] = None) -> None:
        self.client = client
        self.config = config or MuxConfig()
        cfg = self.config
        self._decoder = FrameDecoder(
            max(cfg.max_frame_size, cfg.max_metadata_size, cfg.max_control_size, MAX_SETTINGS_SIZE)
        )
        self._streams: dict[int, Stream] = {}
        self._ready: deque[int] = deque()
        # One emptied send queue kept for the next stream that sends: streams drop theirs
        # once empty (an idle stream keeps none), and a stream that sends one message at
        # a time would otherwise make and drop a deque per message.
        self._spare: Optional[deque[Chunk]] = None
        #: Control frames to send (the list itself becomes what data_to_send_parts returns).
        self._control: list[Chunk] = []
        self._control_size = 0
        #: Frames held until the peer's SETTINGS arrive (OPEN, CONTROL, PING ...).
        self._deferred: list[bytes] = []
        self._events: list[Event] = []
        self._writable: list[int] = []
        self._next_stream_id = 1 if client else 2
        #: Highest stream id the peer has opened (also GOAWAY's last-stream-id).
        self._last_peer_stream = 0
        self._peer_stream_count = 0
        self._local_stream_count = 0
        self.peer_settings: Optional[dict[str, Any]] = None
        self.peer_info: dict[str, Any] = {}
        self.version: Optional[int] = None
        self._peer_max_frame = 0
        self._peer_initial_window = 0
        self._peer_max_streams = 0
        self._peer_max_metadata = 0
        self._peer_max_control = 0
        self._session_send_credit = 0
        self._session_recv = ReceiveWindow(cfg.session_window)
        #: Window growth granted by auto-tuning, summed over streams (bounded by budget):
        #: the sum of ``recv.committed - initial_window``.
        self._granted_growth = 0
        #: The receive budget in use (see the class docstring): ``window + debt`` of every
        #: stream still receiving, plus unacknowledged bytes of the others.
        self._reserved = 0
        #: Auto-tuning's window for every receiving stream. Shared rather than per stream:
        #: the streams of a session share one path, and when that path (or the CPU) is
        #: the bottleneck each stream's share of it is its share of the windows in flight.
        #: A per-stream window that grew while its stream was alone would keep an
        #: outsized share for ever (issue 4: one stream at 9x the others).
        self._tuned_window = cfg.initial_window
        #: Streams that received DATA within ``receiving_horizon``: id -> when counted,
        #: oldest first (so expiry pops from the front).
        self._receiving: OrderedDict[int, float] = OrderedDict()
        self._goaway_sent = False
        self._goaway_received = False
        self._terminated = False
        self.now: Optional[float] = None
        self._last_received: Optional[float] = None
        self._ping_sent: dict[int, Optional[float]] = {}
        self._ping_counter = 0
        #: Smoothed round-trip time from PINGs, in the caller's time units.
        self.rtt: Optional[float] = None
        self._half_closed: dict[int, float] = {}
        self._receiving_refresh = cfg.receiving_horizon / 8
        self._fair = cfg.max_window
        self._fair_until = float("-inf")
        self._queue_control(encode_frame(FrameType.SETTINGS, 0, 0, msgpack.packb(cfg.advertised())))

    # ------------------------------------------------------------------ inspection

    @property
    def established(self) -> bool:
        """True once the peer's SETTINGS arrived (streams can carry data)."""
        return self.peer_settings is not None

    @property
    def terminated(self) -> bool:
        return self._terminated

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def stream_state(self, stream_id: int) -> StreamState:
        """The stream's state; CLOSED for ids no longer (or never) tracked."""
        stream = self._streams.get(stream_id)
        return stream.state if stream is not None else StreamState.CLOSED

    def writable(self, stream_id: int) -> bool:
        """True while the stream's send queue is below ``send_queue_limit``."""
        stream = self._streams.get(stream_id)
        return (stream is not None and (stream.state is _OPEN or stream.state is _HALF_CLOSED_REMOTE)
                and (stream.local or stream.answered) and stream.queued < self.config.send_queue_limit)

    def send_window(self, stream_id: int) -> int:
        """Bytes this side may send on the stream right now (stream and session window)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return min(stream.send_credit, self._session_send_credit)

    @cython.locals(stream=Stream)
    def send_blocked(self, stream_id: int) -> bool:
        """True while data written to the stream now could not all leave: its queue is
        full, or already holds as much as the stream's send window, or the session
        window is spent. A reader feeding the stream (a splice) pauses until
        :meth:`writable_streams` lists it, so what it buffers here stays within the
        window the peer granted plus one read, however many streams stall."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return True
        return stream.blocked or stream.queued >= stream.send_credit or self._session_send_credit <= 0

    def send_capacity(self, stream_id: int) -> int:
        """Bytes ``send_data`` can queue on the stream before it stops being writable."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.can_send or not (stream.local or stream.answered):
            return 0
        return max(0, self.config.send_queue_limit - stream.queued)

    @property
    def has_data_to_send(self) -> bool:
        """True when :meth:`data_to_send` would return something now."""
        return bool(self._control) or bool(
            self._ready and self._session_send_credit > 0 and self.peer_settings is not None)

    @property
    def has_writable_streams(self) -> bool:
        """True when :meth:`writable_streams` has ids to report."""
        return bool(self._writable)

    def queued_bytes(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        return stream.queued if stream is not None else 0

    @property
    def buffered_received(self) -> int:
        """Received bytes the application has not acknowledged yet, over all streams."""
        return self.config.session_window - self._session_recv.credit - self._session_recv.pending

    # ------------------------------------------------------------------ commands

    def open_stream(self, metadata: Optional[dict[str, Any]] = None) -> int:
        """Open a stream carrying ``metadata`` (msgpack-encodable); returns its id.

        Data may be sent at once, before the peer accepts.
        """
        self._check_usable()
        if self._goaway_sent or self._goaway_received:
            raise LocalProtocolError("the session is draining (GOAWAY); open a new session")
        if self.established and self._local_stream_count >= self._peer_max_streams:
            raise StreamLimitError(f"the peer allows at most {self._peer_max_streams} streams")
        stream_id = self._next_stream_id
        if stream_id > MAX_STREAM_ID:
            raise LocalProtocolError("stream ids are exhausted; open a new session")
        payload = _pack(metadata or {}, "open metadata")
        limit = self._peer_max_metadata if self.established else _PRE_HELLO_LIMIT
        if len(payload) > limit:
            raise LocalProtocolError(f"open metadata is {len(payload)} bytes; the limit is {limit}")
        if not self._reserve_stream():
            raise StreamLimitError(
                f"the receive budget is spent: {self._reserved} of {self.config.session_window} bytes "
                f"are reserved by {len(self._streams)} streams")
        self._next_stream_id += 2
        self._streams[stream_id] = Stream(
            stream_id, True, self._peer_initial_window, ReceiveWindow(self.config.initial_window)
        )
        self._local_stream_count += 1
        self._queue_control(encode_frame(FrameType.OPEN, 0, stream_id, payload), defer=True)
        if stream_id + 2 > MAX_STREAM_ID and not self._goaway_sent:
            self.goaway(ErrorCode.NO_ERROR, "stream ids exhausted")
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        """Accept a stream the peer opened (answers :class:`StreamOpened`)."""
        stream = self._get_stream(stream_id)
        if stream.local or stream.answered:
            raise LocalProtocolError(f"stream {stream_id} is not awaiting an answer")
        stream.answered = True
        self._queue_control(encode_frame(FrameType.ACCEPT, 0, stream_id))

    def refuse_stream(self, stream_id: int, error_code: int = ErrorCode.REFUSED, message: str = "") -> None:
        """Refuse a stream the peer opened; it is closed at once."""
        stream = self._get_stream(stream_id)
        if stream.local or stream.answered:
            raise LocalProtocolError(f"stream {stream_id} is not awaiting an answer")
        stream.answered = True
        self.reset_stream(stream_id, error_code, message)

    @cython.locals(stream=Stream)
    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview, end_stream: bool = False) -> bool:
        """Queue ``data`` on the stream; ``end_stream`` half-closes after it.

        ``bytes`` are queued without copying, and so is a memoryview of ``bytes`` that
        covers at least half of them (a payload received on one session and relayed on
        another passes through uncopied; a smaller view would pin more memory than it
        carries); other buffers are copied, since the caller may reuse them. Raises
        :class:`LocalProtocolError` if the stream's send queue is already at
        ``send_queue_limit`` (wait for :meth:`writable_streams`). Returns whether more
        should follow at once: not :meth:`send_blocked`.
        """
        stream = self._streams.get(stream_id)
        # Stream.can_send, inlined: this runs for every write.
        if stream is None or (stream.state is not _OPEN and stream.state is not _HALF_CLOSED_REMOTE):
            raise StreamClosedError(stream_id, "cannot send on a stream closed for sending")
        if not stream.local and not stream.answered:
            raise LocalProtocolError(f"stream {stream_id} must be accepted before sending")
        if stream.queued >= self.config.send_queue_limit:
            stream.blocked = True
            raise LocalProtocolError(f"stream {stream_id}: send queue is full; wait until writable")
        size = len(data)
        if size:
            if type(data) is not bytes and not _keeps_view(data):
                data = bytes(data)
            if stream.chunks is None:
                spare = self._spare
                if spare is not None:
                    self._spare = None
                    stream.chunks = spare
                else:
                    stream.chunks = deque()
            stream.chunks.append(data)
            stream.queued += size
            if stream.queued >= self.config.send_queue_limit:
                stream.blocked = True
            if not stream.in_ready and stream.send_credit > 0:
                stream.in_ready = True
                self._ready.append(stream_id)
        if end_stream:
            self._end_local(stream)
            return False
        return not stream.blocked and stream.queued < stream.send_credit and self._session_send_credit > 0

    def end_stream(self, stream_id: int) -> None:
        """Half-close the stream: the peer sees EOF after the data already queued."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.can_send:
            raise StreamClosedError(stream_id, "already closed for sending")
        if not stream.local and not stream.answered:
            raise LocalProtocolError(f"stream {stream_id} must be accepted before ending it")
        self._end_local(stream)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL, message: str = "") -> None:
        """Abort the stream in both directions; queued data is dropped.

        Received data not yet acknowledged is credited back to the session at once: after
        a reset the application owes no acknowledgements for this stream.
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        self._queue_control(encode_frame(FrameType.RESET, 0, stream_id, _reset_payload(error_code, message)), defer=True)
        self._close_stream(stream)

    def stop_reading(self, stream_id: int) -> None:
        """The application will read nothing more from the stream (it closed its end).

        Unacknowledged bytes are credited back at once, and if the peer sends more DATA
        the stream is reset with CANCEL: a receiver that stops reading says so with a
        RESET, never by silently dropping data (a FIN alone would not tell the peer).
        """
        stream = self._streams.get(stream_id)
        if stream is None or stream.reading_stopped:
            return
        stream.reading_stopped = True
        if stream.unacked:
            self.acknowledge_received_data(stream_id, stream.unacked)

    @cython.locals(stream=Stream)
    def acknowledge_received_data(self, stream_id: int, n: int) -> bool:
        """The application consumed ``n`` bytes of the stream: grant the peer more window.

        Returns whether that queued a WINDOW_UPDATE (then :meth:`data_to_send` has it);
        usually not, since updates are batched."""
        stream = self._streams.get(stream_id)
        if stream is None or n <= 0:
            if n < 0:
                raise LocalProtocolError("cannot acknowledge a negative amount")
            return False  # nothing to do, or the stream closed and was credited in full
        if n > stream.unacked:
            raise LocalProtocolError(f"stream {stream_id}: acknowledged {n} bytes, only {stream.unacked} outstanding")
        stream.unacked -= n
        queued = False
        state = stream.state
        if state is _OPEN or state is _HALF_CLOSED_LOCAL:
            now = self.now
            rtt = self.rtt
            if rtt is not None and now is not None:
                increment = self._consumed_tuned(stream.recv, n, now, rtt)
            else:
                increment = stream.recv.consumed(n)
            if increment:
                self._queue_control(encode_frame(_WINDOW_UPDATE, 0, stream_id, _pack_u32(increment)))
                queued = True
        else:  # it receives no more: what it held is released as it is consumed
            self._reserved -= n
            if state is StreamState.CLOSED and stream.unacked == 0 and not stream.fin_pending:
                self._forget(stream)  # finished both ways and nothing left to acknowledge
        return self._session_consumed(n) or queued

    @cython.locals(recv=ReceiveWindow, target=cython.longlong, committed=cython.longlong,
                   allowed=cython.longlong, open_left=cython.longlong, earned=cython.longlong,
                   grown=cython.longlong, increment=cython.longlong)
    def _consumed_tuned(self, recv: ReceiveWindow, n: int, now: float, rtt: float) -> int:
        """Consume ``n`` bytes of a stream with auto-tuning at time ``now`` (the session's
        clock, with ``rtt`` measured); returns the increment to send.

        One target window (``_tuned_window``) for all receiving streams: it doubles when
        any stream finds its window was the bottleneck, and it is capped at a fair share
        of half the growth budget (a quarter of the session window) among the streams
        receiving now, so it shrinks when more streams start. Each stream moves to the
        target as it consumes: up by at most the ``n`` bytes consumed now or one initial
        window (slow start; the growth rides on this update), down by withholding credit
        (:meth:`ReceiveWindow.resize`). A stream alone still grows to
        ``max_window``; 32 streams converge on equal windows, hence equal throughput.

        Growth granted is never taken back, so a reader that takes a burst and then stalls
        keeps what it was given. The first half of the growth budget is open to any
        stream; the second half only to a stream whose growth stays within a quarter of
        what it has consumed past its first MiB (``_EARNED_RATIO``, ``_EARNED_AFTER``).
        Stalled readers can spend the open half, but to hold the rest each must first read
        a MiB and then four times what it holds, while a healthy reader beside them earns
        its window within a few dozen round trips.
        """
        cfg = self.config
        target = self._tuned_window
        if recv.epoch_test(n, now, rtt):
            target = max(target, min(2 * recv.window, cfg.max_window))
        target = min(target, self._fair if now < self._fair_until else self._fair_window(now))
        self._tuned_window = target
        committed = recv.window + recv.debt
        if target != recv.window:
            if target > committed:  # growth: only as far as the budget still allows
                # Slow start: a window grows by at most what this acknowledgement
                # consumes, or one initial window if that is more. A stream opened after a
                # bulk transfer left the target high does not take that target (and the
                # growth budget with it) at its first few bytes; the floor keeps a stream
                # of small messages from passing through here on every one of them.
                target = min(target, committed + max(n, cfg.initial_window))
                allowed = min(cfg.session_window // 2 - self._granted_growth,
                              cfg.session_window - self._reserved)
                open_left = cfg.session_window // 4 - self._granted_growth
                if target - committed > open_left:
                    # The open half of the growth budget is spent (readers that took a burst
                    # and stalled may hold it for ever): beyond it a window grows only as
                    # its reader earns it by reading.
                    earned = cfg.initial_window + max(recv.total - _EARNED_AFTER, 0) // _EARNED_RATIO - committed
                    allowed = min(allowed, max(open_left, earned))
                target = max(recv.window, min(target, committed + max(allowed, 0)))
            if target != recv.window:
                recv.resize(target)
        increment = recv.consumed(n)
        grown = recv.window + recv.debt - committed
        self._granted_growth += grown
        self._reserved += grown
        return increment

    def _forget_quiet(self, now: float, limit: int) -> None:
        """Drop up to ``limit`` of the oldest streams of ``_receiving`` that went quiet.
        A stream that received once and idles would otherwise keep its entry (about
        100 bytes) until it closes, since the share is computed only as data is
        acknowledged. Called as a stream starts receiving (a few: a bounded cost per
        call) and by :meth:`handle_timer` (all), so idle streams hold none."""
        receiving = self._receiving
        cutoff = now - self.config.receiving_horizon
        while receiving and limit > 0:
            stream_id, seen = next(iter(receiving.items()))
            if seen >= cutoff:
                return
            del receiving[stream_id]
            limit -= 1

    def _fair_window(self, now: float) -> int:
        """The largest window a receiving stream may have at ``now``: an equal share of
        half the growth budget among the streams receiving within ``receiving_horizon``.

        Computed at most once per ``receiving_horizon / 8`` (it is asked on every
        acknowledgement), and at once when a stream starts receiving, so a newcomer
        shrinks the others' share without delay; a stream going quiet raises it late
        by that much at most."""
        if now < self._fair_until:
            return self._fair
        receiving = self._receiving
        cutoff = now - self.config.receiving_horizon
        while receiving:
            stream_id, seen = next(iter(receiving.items()))
            if seen >= cutoff:
                break
            del receiving[stream_id]
        cfg = self.config
        # Half the growth budget, shared: the other half is headroom for streams still
        # above the share (a share falls when streams join; the excess is withheld only
        # as it is consumed), so the newcomers can grow to the share at once instead of
        # waiting for that debt to be repaid.
        share = cfg.initial_window + (cfg.session_window // 4) // max(len(receiving), 1)
        self._fair = min(cfg.max_window, share)
        self._fair_until = now + self._receiving_refresh
        return self._fair

    def ping(self, now: Optional[float] = None) -> int:
        """Send a PING and return its id; the echo produces :class:`PingAcknowledged`
        with that id and the RTT (measured only when a clock was given)."""
        self._check_usable()
        if now is not None:
            self.now = now
        self._ping_counter += 1
        self._ping_sent[self._ping_counter] = self.now
        self._queue_control(encode_frame(FrameType.PING, 0, 0, _PING.pack(self._ping_counter)), defer=True)
        return self._ping_counter

    def goaway(self, error_code: int = ErrorCode.NO_ERROR, message: str = "") -> None:
        """Tell the peer to open no more streams; streams already open may finish."""
        if self._goaway_sent or self._terminated:
            return
        self._goaway_sent = True
        payload = _GOAWAY.pack(self._last_peer_stream, int(error_code)) + message.encode()[:MAX_REASON]
        self._queue_control(encode_frame(FrameType.GOAWAY, 0, 0, payload))

    def send_control(self, message: Any) -> None:
        """Send an application control message (msgpack-encodable) on the session."""
        self._check_usable()
        payload = _pack(message, "control message")
        limit = self._peer_max_control if self.established else _PRE_HELLO_LIMIT
        if len(payload) > limit:
            raise LocalProtocolError(f"control message is {len(payload)} bytes; the limit is {limit}")
        self._queue_control(encode_frame(FrameType.CONTROL, 0, 0, payload), defer=True)

    # ------------------------------------------------------------------ output

    def data_to_send(self, max_bytes: Optional[int] = None) -> bytes:
        """Return the bytes to write to the transport (b"" when there is nothing).

        ``max_bytes`` bounds the DATA added after the control frames, so a binding can
        write in slices and interleave other sessions; control frames are never held back.
        """
        out = self.data_to_send_parts(max_bytes)
        if not out:
            return b""
        return b"".join(out)

    def data_to_send_parts(self, max_bytes: Optional[int] = None) -> list[Chunk]:
        """:meth:`data_to_send` as the list of buffers to write in order (empty: nothing),
        not joined: frame headers and the queued payloads themselves (``bytes`` or
        read-only ``memoryview``), for a transport that gathers them (``writelines``,
        ``writev``) or copies them once anyway (WebSocket masking). The buffers may not
        be modified."""
        out = self._control
        size = self._control_size
        self._control = []
        self._control_size = 0
        ready = self._ready
        if ready and self._session_send_credit > 0 and self.peer_settings is not None:
            self._schedule_data(out, size, max_bytes)
        return out

    @cython.locals(stream=Stream, n=cython.longlong, session=cython.longlong)
    def _schedule_data(self, out: list[Chunk], size: int, max_bytes: Optional[int]) -> int:
        """Round-robin: one DATA frame per ready stream per turn, within both windows."""
        ready = self._ready
        streams = self._streams
        max_frame = self._peer_max_frame
        limit = self.config.send_queue_limit
        session = self._session_send_credit
        budget = max_bytes if max_bytes is not None else 1 << 62
        append = out.append
        while ready and session > 0 and size < budget:
            stream_id = ready.popleft()
            stream = streams.get(stream_id)
            if stream is None or not stream.in_ready:
                continue
            n = min(stream.queued, stream.send_credit, session, max_frame)
            if n > budget - size:
                n = budget - size
            chunks = stream.chunks
            assert chunks is not None  # a ready stream has bytes queued
            first = chunks[0]
            pieces: Sequence[Chunk]
            if len(first) == n:  # the common case: a whole queued buffer fits the frame
                chunks.popleft()
                pieces = (first,)
            else:
                pieces = stream.take(n)
            stream.queued -= n
            if not stream.queued:  # an idle stream keeps no deque (see _spare)
                self._spare = chunks
                stream.chunks = None
            stream.send_credit -= n
            session -= n
            fin = stream.fin_pending and not stream.queued
            append(encode_header(_DATA, _FIN if fin else 0, stream_id, n))
            out.extend(pieces)
            size += 12 + n
            if stream.blocked and stream.queued < limit:
                stream.blocked = False
                self._writable.append(stream_id)
            if fin:
                stream.fin_pending = False
                stream.in_ready = False
                self._fin_sent(stream)
            elif stream.queued and stream.send_credit > 0:
                ready.append(stream_id)
            else:
                stream.in_ready = False
        self._session_send_credit = session
        return size

    def writable_streams(self) -> list[int]:
        """Streams that can take data again since the last call: their full send queue
        drained below the limit, or a WINDOW_UPDATE came while they were
        :meth:`send_blocked` by their window. ``0`` in the list means the session window
        reopened from zero: every blocked stream may go on. An id may appear more than
        once; a stream listed may have closed since, or still be blocked."""
        writable = self._writable
        self._writable = []
        return writable

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes | bytearray | memoryview, now: Optional[float] = None) -> list[Event]:
        """Feed bytes from the transport; ``b""`` means the transport reached EOF.

        Raises :class:`ProtocolError` (after queueing a GOAWAY) if the peer broke the
        protocol; the binding should then flush :meth:`data_to_send` and close. The
        events produced before and by the failure (StreamReset for every open stream,
        ConnectionTerminated) are on the exception as ``events``.
        """
        if now is not None:
            self.now = now
            self._last_received = now
        if self._terminated:
            return []
        if not data:
            self._terminate(ErrorCode.CANCEL, "the transport closed")
            return self._take_events()
        try:
            # Answers we still owe include those our application gave to the peer's last
            # input (refusing its OPENs, say): a peer that keeps sending without reading
            # them is dropped here, before its next frames can add more.
            self._check_control_queue()
            frames = self._decoder.feed(data)
            if frames and self.peer_settings is None and frames[0][0] != _SETTINGS:
                raise ProtocolError("the first frame must be SETTINGS")
            for frame_type, flags, stream_id, payload in frames:
                if frame_type == 0:
                    self._on_data(flags, stream_id, payload)
                else:
                    self._HANDLERS[frame_type](self, flags, stream_id, payload)
        except ProtocolError as exc:
            self._fail(exc)
            exc.events = self._take_events()
            raise
        except Exception as exc:  # a malformed payload must surface as ProtocolError only
            error = ProtocolError(f"malformed frame: {exc}")
            self._fail(error)
            error.events = self._take_events()
            raise error from exc
        events = self._events  # _take_events, inlined: once per read
        self._events = []
        return events

    def _take_events(self) -> list[Event]:
        events = self._events
        self._events = []
        return events

    @cython.locals(stream=Stream, recv=ReceiveWindow, session=ReceiveWindow)
    def _on_data(self, flags: int, stream_id: int, payload: Any) -> None:
        # The hottest path of the receiver: checks are inlined on purpose.
        n = len(payload)
        if n > self.config.max_frame_size:
            raise FrameSizeError(f"DATA frame of {n} bytes exceeds the advertised {self.config.max_frame_size}")
        session = self._session_recv
        if n > session.credit:
            raise FlowControlError("the peer exceeded the session window")
        session.credit -= n
        if session.pending and session.credit <= session.pending:
            # Consumed bytes not yet announced would soon be all the peer may send: say so
            # now, or streams of stalled readers could use up the rest while the reader
            # that consumed has nothing left to acknowledge (and so never announces).
            self._announce_session()
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_known_stream(stream_id)
            self._credit_session(n)  # data in flight when we closed the stream
            return
        state = stream.state
        if state is not _OPEN and state is not _HALF_CLOSED_LOCAL:
            self._credit_session(n)
            self._stream_error(stream, ErrorCode.STREAM_CLOSED, "DATA after the peer's FIN")
            return
        if stream.reading_stopped and n:
            self._credit_session(n)
            self._stream_error(stream, ErrorCode.CANCEL, "the reader closed the stream")
            return
        if n:
            recv = stream.recv
            if n > recv.credit:  # a broken peer; only this stream pays for it
                self._credit_session(n)
                self._stream_error(stream, ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the stream window")
                return
            recv.credit -= n
            stream.unacked += n
            now = self.now
            if recv.epoch_start is None:
                recv.epoch_start = now  # auto-tuning times an epoch from arrival
            if now is not None and now - recv.seen > self._receiving_refresh:
                # Counted as receiving (refreshed a few times per horizon, not per frame).
                receiving = self._receiving
                if stream_id not in receiving:
                    self._fair_until = float("-inf")  # a newcomer: recompute the share
                    self._forget_quiet(now, 4)
                recv.seen = now
                receiving[stream_id] = now
                receiving.move_to_end(stream_id)
            if state is _HALF_CLOSED_LOCAL and self.now is not None:
                self._half_closed.pop(stream_id, None)  # still active: restart its clock
                self._half_closed[stream_id] = self.now
        if flags & _FIN:
            if n:
                self._events.append(data_received(stream_id, payload, n, True))
            self._events.append(StreamEnded(stream_id=stream_id))
            self._receiving.pop(stream_id, None)  # it receives nothing more
            self._reserved -= stream.recv.window + stream.recv.debt - stream.unacked
            if stream.transition(StreamInput.RECV_FIN) is StreamState.CLOSED:
                self._closed_cleanly(stream)
        elif n:
            self._events.append(data_received(stream_id, payload, n))

    def _on_window_update(self, flags: int, stream_id: int, payload: Any) -> None:
        if len(payload) != 4:
            raise FrameSizeError("WINDOW_UPDATE payload must be 4 bytes")
        (increment,) = _U32.unpack(payload)
        if increment == 0:
            raise ProtocolError("WINDOW_UPDATE with a zero increment")
        if stream_id == 0:
            if self._session_send_credit <= 0:
                self._writable.append(0)  # every stream blocked on the session may go on
            self._session_send_credit += increment
            if self._session_send_credit > MAX_WINDOW:
                raise FlowControlError("session window overflow")
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_known_stream(stream_id)
            return
        if stream.queued >= stream.send_credit and stream.can_send:
            self._writable.append(stream_id)  # blocked by its window: it may go on
        stream.send_credit += increment
        if stream.send_credit > MAX_WINDOW:
            raise FlowControlError(f"window overflow on stream {stream_id}")
        if stream.queued and not stream.in_ready:
            stream.in_ready = True
            self._ready.append(stream_id)

    def _on_open(self, flags: int, stream_id: int, payload: Any) -> None:
        if stream_id == 0 or (stream_id & 1) == (1 if self.client else 0):
            raise ProtocolError(f"the peer opened stream {stream_id} of the wrong parity")
        if stream_id <= self._last_peer_stream:
            raise ProtocolError(f"stream id {stream_id} reused or out of order")
        self._last_peer_stream = stream_id
        stream = Stream(stream_id, False, self._peer_initial_window, ReceiveWindow(self.config.initial_window))
        if self._goaway_sent:
            self._refuse_new(stream, ErrorCode.REFUSED, "the session is draining")
            return
        if self._peer_stream_count >= self.config.max_streams:
            self._refuse_new(stream, ErrorCode.TOO_MANY_STREAMS, f"at most {self.config.max_streams} concurrent streams")
            return
        if len(payload) > self.config.max_metadata_size:
            self._refuse_new(stream, ErrorCode.FRAME_SIZE_ERROR, "open metadata too large")
            return
        try:
            metadata = msgpack.unpackb(bytes(payload))
        except Exception:
            self._refuse_new(stream, ErrorCode.PROTOCOL_ERROR, "open metadata is not valid msgpack")
            return
        if not isinstance(metadata, dict):
            self._refuse_new(stream, ErrorCode.PROTOCOL_ERROR, "open metadata must be a map")
            return
        if not self._reserve_stream():
            self._refuse_new(stream, ErrorCode.TOO_MANY_STREAMS,
                             "receive budget spent: too many streams hold unread data")
            return
        self._streams[stream_id] = stream
        self._peer_stream_count += 1
        self._events.append(StreamOpened(stream_id=stream_id, metadata=metadata))

    def _refuse_new(self, stream: Stream, code: ErrorCode, message: str) -> None:
        self._answer(encode_frame(FrameType.RESET, 0, stream.stream_id, _reset_payload(code, message)))

    def _on_accept(self, flags: int, stream_id: int, payload: Any) -> None:
        if payload:
            raise FrameSizeError("ACCEPT carries no payload")
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_known_stream(stream_id)
            return
        if not stream.local or stream.answered:
            raise ProtocolError(f"unexpected ACCEPT for stream {stream_id}")
        stream.answered = True
        self._events.append(StreamAccepted(stream_id=stream_id))

    def _on_reset(self, flags: int, stream_id: int, payload: Any) -> None:
        if len(payload) < 4 or len(payload) > 4 + MAX_REASON:
            raise FrameSizeError("RESET payload must be a 4-byte code and a short reason")
        (code,) = _RESET.unpack_from(payload)
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_known_stream(stream_id)
            return
        if stream.state is StreamState.CLOSED and not stream.fin_pending:
            return  # both sides already finished; the reset adds nothing
        self._events.append(StreamReset(stream_id=stream_id, error_code=code, message=_reason(payload[4:]), remote=True))
        self._close_stream(stream)

    def _on_ping(self, flags: int, stream_id: int, payload: Any) -> None:
        if len(payload) != 8 or stream_id != 0:
            raise ProtocolError("PING must carry 8 bytes on stream 0")
        if flags & _ACK:
            (counter,) = _PING.unpack(payload)
            if counter not in self._ping_sent:
                return  # not ours (or already answered): nothing to measure
            sent = self._ping_sent.pop(counter)
            sample = None
            if sent is not None and self.now is not None:
                sample = max(self.now - sent, 0.0)
                self.rtt = sample if self.rtt is None else 0.875 * self.rtt + 0.125 * sample
            self._events.append(PingAcknowledged(ping_id=counter, rtt=sample))
        else:
            self._answer(encode_frame(FrameType.PING, _ACK, 0, bytes(payload)))

    def _on_goaway(self, flags: int, stream_id: int, payload: Any) -> None:
        if len(payload) < 8 or len(payload) > 8 + MAX_REASON:
            raise FrameSizeError("GOAWAY payload must be 8 bytes and a short reason")
        if stream_id != 0:
            raise ProtocolError("GOAWAY must be sent on stream 0")
        last_stream_id, code = _GOAWAY.unpack_from(payload)
        self._goaway_received = True
        message = _reason(payload[8:])
        self._events.append(GoAwayReceived(last_stream_id=last_stream_id, error_code=code, message=message))
        for stream in [s for s in self._streams.values() if s.local and s.stream_id > last_stream_id]:
            self._events.append(StreamReset(stream_id=stream.stream_id, error_code=ErrorCode.REFUSED,
                                            message="not processed before GOAWAY", remote=True))
            self._close_stream(stream)

    def _on_settings(self, flags: int, stream_id: int, payload: Any) -> None:
        if self.peer_settings is not None:
            raise ProtocolError("SETTINGS may be sent only once")
        if stream_id != 0:
            raise ProtocolError("SETTINGS must be sent on stream 0")
        if len(payload) > MAX_SETTINGS_SIZE:
            raise FrameSizeError(f"SETTINGS of {len(payload)} bytes exceeds {MAX_SETTINGS_SIZE}")
        try:
            settings = msgpack.unpackb(bytes(payload))
        except Exception as exc:
            raise ProtocolError(f"SETTINGS is not valid msgpack: {exc}") from None
        if not isinstance(settings, dict):
            raise ProtocolError("SETTINGS must be a map")
        versions = settings.get("versions")
        if not isinstance(versions, list):
            raise ProtocolError("SETTINGS lacks a version list")
        common = set(SUPPORTED_VERSIONS).intersection(v for v in versions if type(v) is int)
        if not common:
            raise ProtocolError(f"no common protocol version (peer offers {versions[:8]})", ErrorCode.UNSUPPORTED_VERSION)
        values = {}
        for key, (low, high) in _SETTING_RANGES.items():
            value = settings.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ProtocolError(f"SETTINGS {key}={value!r} is outside {low}..{high}")
            values[key] = value
        info = settings.get("info", {})
        self.version = max(common)
        self.peer_settings = values
        self.peer_info = info if isinstance(info, dict) else {}
        self._peer_max_frame = min(values["max_frame_size"], self.config.max_frame_size)
        self._peer_initial_window = values["initial_window"]
        self._peer_max_streams = values["max_streams"]
        self._peer_max_metadata = values["max_metadata_size"]
        self._peer_max_control = values["max_control_size"]
        self._session_send_credit = values["session_window"]
        for stream in self._streams.values():  # opened before the peer's limits were known
            stream.send_credit = self._peer_initial_window
            if stream.queued and not stream.in_ready:
                stream.in_ready = True
                self._ready.append(stream.stream_id)
        for frame in self._deferred:
            self._queue_control(frame)
        self._deferred = []
        self._events.append(HelloReceived(version=self.version, settings=values, info=self.peer_info))
        if self.now is not None:
            self.ping()  # a first RTT sample, so auto-tuning can start

    def _on_control(self, flags: int, stream_id: int, payload: Any) -> None:
        if stream_id != 0:
            raise ProtocolError("CONTROL must be sent on stream 0")
        if len(payload) > self.config.max_control_size:
            raise FrameSizeError(f"CONTROL of {len(payload)} bytes exceeds the limit")
        try:
            message = msgpack.unpackb(bytes(payload))
        except Exception as exc:
            raise ProtocolError(f"CONTROL is not valid msgpack: {exc}") from None
        self._events.append(ControlReceived(message=message))

    _HANDLERS = (
        _on_data, _on_window_update, _on_open, _on_accept, _on_reset,
        _on_ping, _on_goaway, _on_settings, _on_control,
    )

    # ------------------------------------------------------------------ time

    def handle_timer(self, now: float) -> list[Event]:
        """Run time-driven work (keepalive PINGs, dead-peer detection, reaping half-closed
        streams) and return the resulting events. Call it by :meth:`next_deadline`."""
        self.now = now
        if self._terminated:
            return []
        cfg = self.config
        if self._last_received is None:
            self._last_received = now
        silence = now - self._last_received
        if silence >= cfg.keepalive_timeout:
            self._terminate(ErrorCode.TIMEOUT, f"no data from the peer for {silence:.1f}s")
            return self._take_events()
        if silence >= cfg.keepalive_interval and not self._ping_sent and self.established:
            self.ping(now)
        self._forget_quiet(now, len(self._receiving))
        while self._half_closed:
            stream_id, since = next(iter(self._half_closed.items()))
            if now - since < cfg.half_closed_timeout:
                break
            del self._half_closed[stream_id]
            stream = self._streams.get(stream_id)
            if stream is not None and stream.state is StreamState.HALF_CLOSED_LOCAL:
                self._events.append(StreamReset(stream_id=stream_id, error_code=ErrorCode.TIMEOUT,
                                                message="half-closed stream timed out", remote=False))
                self.reset_stream(stream_id, ErrorCode.TIMEOUT, "half-closed stream timed out")
        return self._take_events()

    def next_deadline(self) -> Optional[float]:
        """When :meth:`handle_timer` next has work to do (None: no clock seen yet)."""
        if self._terminated or self._last_received is None:
            return None
        cfg = self.config
        # Without the peer's SETTINGS no PING can be sent, so only the timeout is due.
        waiting = self._ping_sent or self.peer_settings is None  # or not established
        deadline = self._last_received + (cfg.keepalive_timeout if waiting else cfg.keepalive_interval)
        if self._half_closed:
            deadline = min(deadline, next(iter(self._half_closed.values())) + cfg.half_closed_timeout)
        return deadline

    # ------------------------------------------------------------------ internals

    def _queue_control(self, frame: bytes, defer: bool = False) -> None:
        if defer and self.peer_settings is None:
            self._deferred.append(frame)
        else:
            self._control.append(frame)
            self._control_size += len(frame)

    def _check_usable(self) -> None:
        if self._terminated:
            raise LocalProtocolError("the session is closed")

    def _get_stream(self, stream_id: int) -> Stream:
        stream = self._streams.get(stream_id)
        if stream is None or stream.state is StreamState.CLOSED:
            raise StreamClosedError(stream_id)
        return stream

    def _check_known_stream(self, stream_id: int) -> None:
        """A frame for an untracked stream is fine if the id was used before (it closed)."""
        if stream_id == 0:
            raise ProtocolError("stream frame on stream 0")
        ours = (stream_id & 1) == (1 if self.client else 0)
        if ours and stream_id >= self._next_stream_id:
            raise ProtocolError(f"frame for stream {stream_id}, which this side never opened")
        if not ours and stream_id > self._last_peer_stream:
            raise ProtocolError(f"frame for stream {stream_id}, which the peer never opened")

    def _end_local(self, stream: Stream) -> None:
        # The state changes now, so the API refuses further sends at once, even while
        # the FIN itself still waits behind queued data.
        stream.transition(StreamInput.SEND_FIN)
        if stream.queued:
            stream.fin_pending = True
        else:
            self._queue_control(encode_header(_DATA, _FIN, stream.stream_id, 0), defer=True)
            self._fin_sent(stream)

    def _fin_sent(self, stream: Stream) -> None:
        stream.fin_sent = True
        if stream.state is StreamState.CLOSED:
            self._closed_cleanly(stream)
        elif self.now is not None:
            self._half_closed[stream.stream_id] = self.now

    def _closed_cleanly(self, stream: Stream) -> None:
        if not stream.fin_sent and (stream.fin_pending or stream.queued):
            return  # our FIN is still queued; finishing waits for it to leave
        self._half_closed.pop(stream.stream_id, None)
        self._release_slot(stream)
        if stream.unacked == 0:
            self._forget(stream)

    def _stream_error(self, stream: Stream, code: ErrorCode, message: str) -> None:
        self._events.append(StreamReset(stream_id=stream.stream_id, error_code=code, message=message, remote=False))
        self.reset_stream(stream.stream_id, code, message)
        self._check_control_queue()

    def _answer(self, frame: bytes) -> None:
        """Queue a frame the peer's input calls for (not our application's command)."""
        self._queue_control(frame)
        self._check_control_queue()

    def _check_control_queue(self) -> None:
        # Called where the peer's input adds to the queue; our own commands alone (bounded
        # by the number of streams) do not come near the caps.
        cfg = self.config
        if self._control_size > cfg.max_queued_control or len(self._control) > cfg.max_queued_control_frames:
            raise ProtocolError(
                f"the peer provokes answers faster than it reads them: {len(self._control)} frames "
                f"({self._control_size} bytes) queued", ErrorCode.OVERLOADED)

    def _reserve_stream(self) -> bool:
        """Reserve a new stream's initial window out of the receive budget, if it fits."""
        initial = self.config.initial_window
        if self._reserved + initial > self.config.session_window:
            return False
        self._reserved += initial
        return True

    def _close_stream(self, stream: Stream) -> None:
        """Close after a reset: drop queues, credit unacknowledged data, forget the stream."""
        state = stream.state
        was_closed = state is StreamState.CLOSED
        if state is _OPEN or state is _HALF_CLOSED_LOCAL:  # still receiving: its window
            self._reserved -= stream.recv.window + stream.recv.debt
        else:  # what it received and the application had not consumed
            self._reserved -= stream.unacked
        stream.transition(StreamInput.RESET)
        stream.chunks = None
        stream.queued = 0
        stream.fin_pending = False
        stream.in_ready = False
        self._half_closed.pop(stream.stream_id, None)
        if not was_closed:
            self._release_slot(stream)
        if stream.unacked:
            self._credit_session(stream.unacked)
            stream.unacked = 0
        self._forget(stream)

    def _release_slot(self, stream: Stream) -> None:
        self._granted_growth -= stream.recv.window + stream.recv.debt - self.config.initial_window
        self._receiving.pop(stream.stream_id, None)
        if stream.local:
            self._local_stream_count -= 1
        else:
            self._peer_stream_count -= 1

    def _forget(self, stream: Stream) -> None:
        self._streams.pop(stream.stream_id, None)

    def _announce_session(self) -> None:
        session = self._session_recv
        increment = session.pending
        session.pending = 0
        session.credit += increment
        self._queue_control(encode_frame(_WINDOW_UPDATE, 0, 0, _pack_u32(increment)))

    def _credit_session(self, n: int) -> None:
        if n:
            self._session_consumed(n)

    @cython.locals(session=ReceiveWindow)
    def _session_consumed(self, n: int) -> bool:
        """Count ``n`` consumed bytes at the session level; True if that queued an update.

        Besides the quarter and zero rules of :class:`ReceiveWindow`, the session
        announces what was consumed as soon as the peer's remaining credit is no larger:
        with every stream's window reserved out of the session's, the session credit
        then never falls short of what a stream that reads was granted (tests/
        test_mux_hostile.py holds it to that)."""
        session = self._session_recv
        increment = session.consumed(n)
        if increment:
            self._queue_control(encode_frame(_WINDOW_UPDATE, 0, 0, _pack_u32(increment)))
            return True
        if session.pending and session.credit <= session.pending:
            self._announce_session()
            return True
        return False

    def _fail(self, error: ProtocolError) -> None:
        """The peer broke the protocol: queue GOAWAY with the error's code and stop."""
        if not self._goaway_sent:
            self._goaway_sent = True
            payload = _GOAWAY.pack(self._last_peer_stream, int(error.error_code)) + str(error).encode()[:MAX_REASON]
            self._control.append(encode_frame(FrameType.GOAWAY, 0, 0, payload))
        self._terminate(error.error_code, str(error))

    def _terminate(self, code: int, message: str) -> None:
        self._terminated = True
        for stream in list(self._streams.values()):
            if stream.state is not StreamState.CLOSED:
                self._events.append(StreamReset(stream_id=stream.stream_id, error_code=code, message=message, remote=False))
        self._streams.clear()
        self._ready.clear()
        self._reserved = 0
        self._events.append(ConnectionTerminated(error_code=code, message=message))


def _pack(value: Any, what: str) -> bytes:
    try:
        return msgpack.packb(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"{what} cannot be encoded as msgpack: {exc}") from None


def _reset_payload(code: int, message: str) -> bytes:
    return _RESET.pack(int(code)) + message.encode()[:MAX_REASON]


def _reason(payload: Any) -> str:
    return bytes(payload).decode("utf-8", "replace")
