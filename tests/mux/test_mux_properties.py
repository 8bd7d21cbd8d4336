"""Two MuxConnections back to back under random interleavings (hypothesis).

The machine opens streams from both sides, writes random sizes, half-closes, resets,
pings, delivers the wire in random-sized pieces, and reads (acknowledges) late or never.
After every step: received bytes are a prefix of what was sent, no window is negative, and
unacknowledged bytes stay within the session budget. At the end: a stalled reader has
not blocked any other stream, and once everyone reads and ends, every byte arrived exactly
once and every stream is closed on both sides.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from relay.mux.connection import MuxConfig, MuxConnection
from relay.mux.errors import ErrorCode, StreamLimitError
from relay.mux.events import (
    DataReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
)

# Small limits so windows, frame splitting and queue limits are exercised constantly.
CONFIG = dict(
    max_frame_size=1024,
    initial_window=4096,
    max_window=16384,
    session_window=64 * 1024,
    send_queue_limit=8192,
    max_metadata_size=1024,
)
PATTERN = bytes(range(256)) * 256
RECEIVING = ("OPEN", "HALF_CLOSED_LOCAL")


def expected_reservation(conn: MuxConnection) -> int:
    """The receive budget in use, recomputed from the streams themselves."""
    return sum(s.recv.window + s.recv.debt if s.state.name in RECEIVING else s.unacked
               for s in conn._streams.values())


@dataclass
class StreamModel:
    sent: bytearray = field(default_factory=bytearray)
    received: bytearray = field(default_factory=bytearray)
    unread: int = 0
    ended_local: bool = False
    ended_remote: bool = False
    reset: bool = False
    pending_answer: bool = False
    stalled: bool = False


class Side:
    def __init__(self, name: str, client: bool) -> None:
        self.name = name
        self.conn = MuxConnection(client=client, config=MuxConfig(**CONFIG))
        self.streams: dict[int, StreamModel] = {}
        self.wire = bytearray()  # bytes produced by this side, not yet delivered

    def collect(self, max_bytes=None) -> None:
        self.wire += self.conn.data_to_send(max_bytes)

    def handle(self, events) -> None:
        for event in events:
            if isinstance(event, StreamOpened):
                self.streams[event.stream_id] = StreamModel(pending_answer=True)
                continue
            model = self.streams.get(getattr(event, "stream_id", None))
            if model is None:
                continue
            if isinstance(event, DataReceived):
                assert not model.reset and not model.ended_remote
                model.received += bytes(event.data)
                model.unread += event.flow_controlled_length
            elif isinstance(event, StreamEnded):
                model.ended_remote = True
            elif isinstance(event, StreamReset):
                model.reset = True
                model.unread = 0  # a reset stream owes no acknowledgements
            elif isinstance(event, StreamAccepted):
                pass

    def live(self):
        return [sid for sid, m in self.streams.items() if not m.reset]


class MuxPair(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.a = Side("a", client=True)
        self.b = Side("b", client=False)
        self.peer = {"a": self.b, "b": self.a}

    def sides(self, name):
        side = self.a if name == "a" else self.b
        return side, self.peer[name]

    # ------------------------------------------------------------ actions

    @rule(side=st.sampled_from("ab"), metadata=st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**64 - 1), max_size=3))
    def open_stream(self, side, metadata) -> None:
        me, _ = self.sides(side)
        if me.conn._goaway_received or me.conn._goaway_sent or len(me.streams) >= 12:
            return
        try:
            sid = me.conn.open_stream(metadata)
        except StreamLimitError:  # the receive budget is spent: a refusal, not a failure
            assert me.conn._reserved + me.conn.config.initial_window > me.conn.config.session_window
            return
        me.streams[sid] = StreamModel()

    @rule(side=st.sampled_from("ab"), index=st.integers(0, 20), accept=st.booleans())
    def answer(self, side, index, accept) -> None:
        me, _ = self.sides(side)
        pending = [sid for sid, m in me.streams.items() if m.pending_answer and not m.reset]
        if not pending:
            return
        sid = pending[index % len(pending)]
        me.streams[sid].pending_answer = False
        if accept:
            me.conn.accept_stream(sid)
        else:
            me.conn.refuse_stream(sid, ErrorCode.REFUSED, "no")
            me.streams[sid].reset = True

    @rule(side=st.sampled_from("ab"), index=st.integers(0, 20), size=st.integers(0, 6000), end=st.booleans())
    def write(self, side, index, size, end) -> None:
        me, _ = self.sides(side)
        candidates = [
            sid for sid, m in me.streams.items()
            if not m.reset and not m.ended_local and not m.pending_answer and me.conn.writable(sid)
        ]
        if not candidates:
            return
        sid = candidates[index % len(candidates)]
        model = me.streams[sid]
        start = len(model.sent) % 256
        data = PATTERN[start:start + size]
        me.conn.send_data(sid, data, end_stream=end)
        model.sent += data
        model.ended_local = end

    @rule(side=st.sampled_from("ab"), index=st.integers(0, 20))
    def end(self, side, index) -> None:
        me, _ = self.sides(side)
        candidates = [sid for sid, m in me.streams.items() if not m.reset and not m.ended_local and not m.pending_answer]
        if candidates:
            sid = candidates[index % len(candidates)]
            me.conn.end_stream(sid)
            me.streams[sid].ended_local = True

    @rule(side=st.sampled_from("ab"), index=st.integers(0, 20))
    def reset(self, side, index) -> None:
        me, _ = self.sides(side)
        live = me.live()
        if live:
            sid = live[index % len(live)]
            me.conn.reset_stream(sid, ErrorCode.CANCEL, "test reset")
            me.streams[sid].reset = True
            me.streams[sid].unread = 0

    @rule(side=st.sampled_from("ab"), index=st.integers(0, 20))
    def stall(self, side, index) -> None:
        """Mark a stream's reader as one that does not read until the very end."""
        me, _ = self.sides(side)
        live = me.live()
        stalled = [sid for sid in live if me.streams[sid].stalled]
        if live and len(stalled) < 2:
            me.streams[live[index % len(live)]].stalled = True

    @rule(side=st.sampled_from("ab"), index=st.integers(0, 20), fraction=st.floats(0, 1))
    def read(self, side, index, fraction) -> None:
        me, _ = self.sides(side)
        readable = [sid for sid, m in me.streams.items() if m.unread and not m.stalled and not m.reset]
        if readable:
            sid = readable[index % len(readable)]
            model = me.streams[sid]
            n = max(1, int(model.unread * fraction))
            me.conn.acknowledge_received_data(sid, n)
            model.unread -= n

    @rule(side=st.sampled_from("ab"))
    def ping(self, side) -> None:
        me, _ = self.sides(side)
        me.conn.ping()

    @rule(side=st.sampled_from("ab"), max_bytes=st.one_of(st.none(), st.integers(1, 5000)),
          cut=st.integers(0, 10000))
    def transmit(self, side, max_bytes, cut) -> None:
        """Collect ``side``'s output and deliver a prefix of its wire to the peer, so
        frames split anywhere; the rest stays on the wire for a later step."""
        me, peer = self.sides(side)
        me.collect(max_bytes)
        if not me.wire:
            return
        chunk = bytes(me.wire[:cut or len(me.wire)])
        del me.wire[:len(chunk)]
        peer.handle(peer.conn.receive_data(chunk))

    # ------------------------------------------------------------ invariants

    @invariant()
    def bytes_arrive_once_in_order(self) -> None:
        for me, peer in ((self.a, self.b), (self.b, self.a)):
            for sid, model in me.streams.items():
                other = peer.streams.get(sid)
                if other is not None:
                    assert other.received == model.sent[:len(other.received)], f"stream {sid} corrupted"

    @invariant()
    def windows_never_negative_and_budget_held(self) -> None:
        for side in (self.a, self.b):
            conn = side.conn
            assert conn._session_send_credit >= 0
            assert conn._session_recv.credit >= 0
            for stream in conn._streams.values():
                assert stream.send_credit >= 0
                assert stream.recv.credit >= 0
                assert stream.queued >= 0
            assert 0 <= conn.buffered_received <= conn.config.session_window
            assert conn.buffered_received == sum(s.unacked for s in conn._streams.values())
            assert conn._reserved == expected_reservation(conn) <= conn.config.session_window

    # ------------------------------------------------------------ the end

    def pump(self, read_stalled: bool, rounds: int = 2000) -> None:
        """Answer, read and deliver until nothing moves."""
        for _ in range(rounds):
            moved = False
            for side in (self.a, self.b):
                for sid, model in side.streams.items():
                    if model.pending_answer and not model.reset:
                        side.conn.accept_stream(sid)
                        model.pending_answer = False
                        moved = True
                    if model.unread and not model.reset and (read_stalled or not model.stalled):
                        side.conn.acknowledge_received_data(sid, model.unread)
                        model.unread = 0
                        moved = True
                side.collect()
            for side in (self.a, self.b):
                peer = self.b if side is self.a else self.a
                if side.wire:
                    chunk = bytes(side.wire)
                    side.wire.clear()
                    peer.handle(peer.conn.receive_data(chunk))
                    moved = True
            if not moved:
                return
        raise AssertionError("the pair did not settle")

    def finish_unstalled(self) -> None:
        for side in (self.a, self.b):
            for sid, model in side.streams.items():
                if not model.reset and not model.ended_local and not model.pending_answer and not model.stalled:
                    if side.conn.stream_state(sid).name in ("OPEN", "HALF_CLOSED_REMOTE"):
                        side.conn.end_stream(sid)
                        model.ended_local = True

    def teardown(self) -> None:
        if not hasattr(self, "a"):
            return
        # 1. Stalled readers stay stalled: every other stream must still complete.
        self.pump(read_stalled=False)
        self.finish_unstalled()
        self.pump(read_stalled=False)
        for me, peer in ((self.a, self.b), (self.b, self.a)):
            for sid, model in me.streams.items():
                other = peer.streams.get(sid)
                if other is None or model.reset or other.reset or model.stalled or other.stalled:
                    continue
                if model.ended_local:
                    assert other.received == model.sent, f"stream {sid} blocked behind a stalled reader"
                    assert other.ended_remote
        # 2. Everyone reads and ends: everything arrives and every stream closes.
        for side in (self.a, self.b):
            for model in side.streams.values():
                model.stalled = False
        self.pump(read_stalled=True)
        self.finish_unstalled()
        self.pump(read_stalled=True)
        for me, peer in ((self.a, self.b), (self.b, self.a)):
            for sid, model in me.streams.items():
                other = peer.streams.get(sid)
                if other is not None and not model.reset and not other.reset:
                    assert other.received == model.sent
                    assert other.ended_remote
        for side in (self.a, self.b):
            assert side.conn.open_streams == 0, side.conn._streams
            assert side.conn.buffered_received == 0


MuxPair.TestCase.settings = settings(
    max_examples=200, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestMuxPair = MuxPair.TestCase


def test_regression_fin_behind_the_window_survives_the_last_acknowledgement() -> None:
    """Found by the machine above: a stream closed both ways with our FIN (and 1 byte)
    still queued behind the peer's window was forgotten when the application
    acknowledged the peer's last byte, so the peer never got the end of the data."""
    m = MuxPair()
    m.start()
    m.transmit(side="a", max_bytes=None, cut=0)
    m.open_stream(side="b", metadata={})
    m.open_stream(side="b", metadata={})
    m.stall(side="b", index=1)
    m.transmit(side="b", max_bytes=None, cut=0)
    m.open_stream(side="a", metadata={})
    m.reset(side="a", index=0)
    m.reset(side="b", index=0)
    m.answer(side="a", index=0, accept=True)
    m.write(side="a", index=0, size=4097, end=True)
    m.write(side="b", index=0, size=1, end=True)
    m.teardown()  # asserts every byte arrived and every stream closed
    assert len(m.b.streams[4].received) == 4097
