"""MuxConnection, stream level: every transition of the table in relay/mux/stream.py.

    OPEN --send FIN--> HALF_CLOSED_LOCAL --receive FIN--> CLOSED
    OPEN --receive FIN--> HALF_CLOSED_REMOTE --send FIN--> CLOSED
    any state --reset (either side, refusal, timeout)--> CLOSED

plus the API rules around them (answering opens, sending after FIN or before accepting,
the send queue limit). Observed only through the public API: ``stream_state``,
``open_streams``, ``writable``, events and decoded wire output.
"""
from __future__ import annotations

import pytest

from relay.mux.connection import MuxConfig, MuxConnection
from relay.mux.errors import ErrorCode, LocalProtocolError, StreamClosedError
from relay.mux.events import (
    DataReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
)
from relay.mux.stream import StreamState
from tests.mux.test_mux_connection import (
    FIN,
    MODES,
    KiB,
    Pair,
    T,
    data_frame,
    data_frames,
    established,
    feed,
    kinds,
    open_frame,
    received,
    reset_frame,
    reset_summary,
    resets_on_wire,
    window_updates,
)

S = StreamState


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def states(p: Pair, sid: int) -> tuple[StreamState, StreamState]:
    return p.a.stream_state(sid), p.b.stream_state(sid)


# ============================================================================ clean lifecycle


@pytest.mark.parametrize("first", ["opener", "acceptor"])
def test_full_lifecycle_with_half_close_in_either_order(first: str, mode: str) -> None:
    p = Pair(mode=mode).handshake()
    sid = p.a.open_stream({"target": "svc:80"})
    assert p.a.stream_state(sid) is S.OPEN and p.a.open_streams == 1
    _, b_events = p.settle()
    assert b_events == [StreamOpened(stream_id=sid, metadata={"target": "svc:80"})]
    assert states(p, sid) == (S.OPEN, S.OPEN)
    p.b.accept_stream(sid)
    assert p.settle() == ([StreamAccepted(stream_id=sid)], [])

    p.a.send_data(sid, b"request")
    p.b.send_data(sid, b"response")
    a_events, b_events = p.settle()
    assert received(a_events, sid) == b"response" and received(b_events, sid) == b"request"

    closer, other = (p.a, p.b) if first == "opener" else (p.b, p.a)
    closer.end_stream(sid)
    assert closer.stream_state(sid) is S.HALF_CLOSED_LOCAL
    assert not closer.writable(sid)
    a_events, b_events = p.settle()
    assert (b_events if closer is p.a else a_events) == [StreamEnded(stream_id=sid)]
    assert other.stream_state(sid) is S.HALF_CLOSED_REMOTE

    other.send_data(sid, b"tail")  # the side still open may keep sending
    a_events, b_events = p.settle()
    assert received(a_events if closer is p.a else b_events, sid) == b"tail"
    other.end_stream(sid)
    assert other.stream_state(sid) is S.CLOSED
    a_events, b_events = p.settle()
    assert (a_events if closer is p.a else b_events) == [StreamEnded(stream_id=sid)]
    assert states(p, sid) == (S.CLOSED, S.CLOSED)

    # Finished, but still counted until the application acknowledges what it read.
    unread_a = len(b"response") + (4 if closer is p.a else 0)
    unread_b = len(b"request") + (4 if closer is p.b else 0)
    assert (p.a.open_streams, p.b.open_streams) == (1, 1)
    p.a.acknowledge_received_data(sid, unread_a)
    p.b.acknowledge_received_data(sid, unread_b)
    assert (p.a.open_streams, p.b.open_streams) == (0, 0)
    # No per-stream WINDOW_UPDATE for a finished stream.
    assert [s for s, _ in window_updates(p.a.data_to_send() + p.b.data_to_send())] == []


def test_fins_crossing_on_the_wire_close_both_sides(mode: str) -> None:
    p = Pair(mode=mode).handshake()
    sid = p.open_accepted()
    p.a.end_stream(sid)
    p.b.end_stream(sid)
    assert states(p, sid) == (S.HALF_CLOSED_LOCAL, S.HALF_CLOSED_LOCAL)
    a_events, b_events = p.settle()
    assert a_events == b_events == [StreamEnded(stream_id=sid)]
    assert states(p, sid) == (S.CLOSED, S.CLOSED)
    assert p.a.open_streams == p.b.open_streams == 0


def test_fin_waits_behind_queued_data_but_sending_stops_at_once() -> None:
    p = Pair(b_config=MuxConfig(initial_window=4 * KiB)).handshake()
    sid = p.open_accepted()
    p.a.send_data(sid, b"x" * 6 * KiB, end_stream=True)
    assert p.a.stream_state(sid) is S.HALF_CLOSED_LOCAL
    with pytest.raises(StreamClosedError):
        p.a.send_data(sid, b"more")
    out = p.a.data_to_send()
    assert [(f, len(d)) for _, f, d in data_frames(out)] == [(0, 4 * KiB)]  # no FIN: data is left
    assert p.b.receive_data(out)[-1].end_stream is False
    p.b.acknowledge_received_data(sid, 4 * KiB)
    p.to_a()
    out = p.a.data_to_send()
    assert [(f, len(d)) for _, f, d in data_frames(out)] == [(FIN, 2 * KiB)]
    assert p.b.receive_data(out)[-1] == StreamEnded(stream_id=sid)


def test_fin_with_data_reports_data_then_end(mode: str) -> None:
    p = Pair(mode=mode).handshake()
    sid = p.open_accepted()
    p.b.send_data(sid, b"last words", end_stream=True)
    a_events, _ = p.settle()
    assert a_events == [
        DataReceived(stream_id=sid, data=b"last words", flow_controlled_length=10, end_stream=True),
        StreamEnded(stream_id=sid),
    ]
    assert states(p, sid) == (S.HALF_CLOSED_REMOTE, S.HALF_CLOSED_LOCAL)


def test_data_may_flow_before_the_stream_is_accepted(mode: str) -> None:
    p = Pair(mode=mode).handshake()
    sid = p.a.open_stream()
    p.a.send_data(sid, b"eager")
    _, b_events = p.settle()
    assert b_events == [
        StreamOpened(stream_id=sid, metadata={}),
        DataReceived(stream_id=sid, data=b"eager", flow_controlled_length=5),
    ]
    p.b.accept_stream(sid)
    assert p.settle()[0] == [StreamAccepted(stream_id=sid)]


def test_never_opened_ids_report_closed() -> None:
    p = Pair().handshake()
    assert p.a.stream_state(1) is S.CLOSED and p.b.stream_state(99) is S.CLOSED
    assert not p.a.writable(1) and p.a.send_window(1) == 0 and p.a.queued_bytes(1) == 0


# ============================================================================ refusal and reset


@pytest.mark.parametrize("code, message", [(ErrorCode.REFUSED, ""), (ErrorCode.CONNECT_FAILED, "no route to db")])
def test_refused_stream_is_closed_on_both_sides(code: ErrorCode, message: str, mode: str) -> None:
    p = Pair(mode=mode).handshake()
    sid = p.a.open_stream()
    p.settle()
    if code is ErrorCode.REFUSED and not message:
        p.b.refuse_stream(sid)
    else:
        p.b.refuse_stream(sid, code, message)
    assert p.b.stream_state(sid) is S.CLOSED and p.b.open_streams == 0
    a_events, _ = p.settle()
    assert a_events == [StreamReset(stream_id=sid, error_code=code, message=message, remote=True)]
    assert p.a.stream_state(sid) is S.CLOSED and p.a.open_streams == 0
    with pytest.raises(StreamClosedError):
        p.b.accept_stream(sid)
    with pytest.raises(StreamClosedError):
        p.a.send_data(sid, b"x")


def _stream_in_state(p: Pair, resetter: MuxConnection, state: StreamState) -> int:
    sid = p.open_accepted()
    peer = p.b if resetter is p.a else p.a
    if state is S.HALF_CLOSED_LOCAL:
        resetter.end_stream(sid)
    elif state is S.HALF_CLOSED_REMOTE:
        peer.end_stream(sid)
    p.settle()
    assert resetter.stream_state(sid) is state
    return sid


@pytest.mark.parametrize("state", [S.OPEN, S.HALF_CLOSED_LOCAL, S.HALF_CLOSED_REMOTE], ids=lambda s: s.name)
@pytest.mark.parametrize("who", ["opener", "acceptor"])
def test_reset_by_either_side_in_every_state(who: str, state: StreamState, mode: str) -> None:
    p = Pair(mode=mode).handshake()
    resetter = p.a if who == "opener" else p.b
    peer = p.b if who == "opener" else p.a
    sid = _stream_in_state(p, resetter, state)
    if peer.stream_state(sid) is not S.HALF_CLOSED_LOCAL:
        peer.send_data(sid, b"unread")  # left unacknowledged by the resetter
        p.settle()

    resetter.reset_stream(sid, ErrorCode.CANCEL, "user abort")
    assert resetter.stream_state(sid) is S.CLOSED and resetter.open_streams == 0
    with pytest.raises(StreamClosedError):
        resetter.send_data(sid, b"x")
    a_events, b_events = p.settle()
    assert (a_events if resetter is p.a else b_events) == []  # a local reset makes no event
    assert (b_events if resetter is p.a else a_events) == [
        StreamReset(stream_id=sid, error_code=ErrorCode.CANCEL, message="user abort", remote=True)
    ]
    assert states(p, sid) == (S.CLOSED, S.CLOSED)
    assert p.a.open_streams == p.b.open_streams == 0
    assert p.a.buffered_received == p.b.buffered_received == 0  # unread data was credited back


def test_reset_of_an_unanswered_stream_reaches_the_acceptor(mode: str) -> None:
    p = Pair(mode=mode).handshake()
    sid = p.a.open_stream()
    p.settle()
    p.a.reset_stream(sid, ErrorCode.CANCEL)
    _, b_events = p.settle()
    assert reset_summary(b_events) == [(sid, ErrorCode.CANCEL, True)]
    with pytest.raises(StreamClosedError):
        p.b.accept_stream(sid)


def test_peer_reset_drops_our_queued_data() -> None:
    p = Pair(b_config=MuxConfig(initial_window=4 * KiB)).handshake()
    sid = p.open_accepted()
    p.a.send_data(sid, b"x" * 20 * KiB)
    p.to_b()
    assert p.a.queued_bytes(sid) == 16 * KiB
    p.b.reset_stream(sid, ErrorCode.CANCEL)
    assert reset_summary(p.to_a()) == [(sid, ErrorCode.CANCEL, True)]
    assert p.a.queued_bytes(sid) == 0 and not p.a.writable(sid)
    assert p.a.data_to_send() == b""


def test_resetting_twice_or_an_unknown_stream_is_harmless() -> None:
    p = Pair().handshake()
    sid = p.open_accepted()
    p.a.reset_stream(sid)
    p.a.reset_stream(sid)
    p.a.reset_stream(77)
    assert resets_on_wire(p.a.data_to_send()) == {sid: ErrorCode.CANCEL}


def test_a_finished_stream_awaiting_acknowledgement_ignores_a_peer_reset() -> None:
    p = Pair().handshake()
    sid = p.open_accepted()
    p.b.send_data(sid, b"unread", end_stream=True)
    p.a.end_stream(sid)
    p.settle()
    assert p.a.stream_state(sid) is S.CLOSED and p.a.open_streams == 1
    assert p.a.receive_data(reset_frame(sid, ErrorCode.CANCEL)) == []
    assert p.a.open_streams == 1
    p.a.acknowledge_received_data(sid, 6)
    assert p.a.open_streams == 0


def test_open_then_reset_before_the_handshake_sends_open_before_reset(mode: str) -> None:
    p = Pair(mode=mode)
    sid = p.a.open_stream()
    p.a.reset_stream(sid, ErrorCode.CANCEL)
    assert p.a.stream_state(sid) is S.CLOSED
    hello = p.a.data_to_send()
    assert kinds(hello) == [T.SETTINGS]
    p.to_a()
    out = p.a.data_to_send()
    assert kinds(out) == [T.OPEN, T.RESET]
    assert feed(p.b, hello + out, mode)[1:] == [
        StreamOpened(stream_id=sid, metadata={}),
        StreamReset(stream_id=sid, error_code=ErrorCode.CANCEL, message="", remote=True),
    ]
    assert not p.b.terminated and p.b.open_streams == 0 and p.a.open_streams == 0


def test_peer_reset_while_our_fin_waits_behind_data_releases_the_stream() -> None:
    p = Pair(b_config=MuxConfig(initial_window=4 * KiB)).handshake()
    sid = p.open_accepted()
    p.a.send_data(sid, b"x" * 8 * KiB, end_stream=True)  # the FIN waits for window
    p.b.end_stream(sid)
    p.settle()
    assert p.a.stream_state(sid) is S.CLOSED  # both FINs given, ours not yet on the wire
    p.b.reset_stream(sid, ErrorCode.CANCEL)
    a_events = p.to_a()
    assert reset_summary(a_events) == [(sid, ErrorCode.CANCEL, True)]
    assert p.a.open_streams == 0 and p.a.queued_bytes(sid) == 0


# ============================================================================ illegal transitions


@pytest.mark.parametrize("second_fin", [b"", b"more"], ids=["empty-fin", "data-fin"])
@pytest.mark.parametrize("after", [b"", b"x"], ids=["then-empty-frame", "then-data"])
def test_data_after_the_peer_fin_resets_with_stream_closed(second_fin: bytes, after: bytes, mode: str) -> None:
    conn = established()
    events = feed(conn, open_frame(1) + data_frame(1, second_fin, fin=True), mode)
    assert events[-1] == StreamEnded(stream_id=1)
    assert conn.stream_state(1) is S.HALF_CLOSED_REMOTE
    events = feed(conn, data_frame(1, after, fin=not after), mode)
    assert reset_summary(events) == [(1, ErrorCode.STREAM_CLOSED, False)] and len(events) == 1
    assert resets_on_wire(conn.data_to_send()) == {1: ErrorCode.STREAM_CLOSED}
    assert conn.stream_state(1) is S.CLOSED and conn.open_streams == 0
    assert conn.buffered_received == 0 and not conn.terminated
    assert feed(conn, open_frame(3), mode) == [StreamOpened(stream_id=3, metadata={})]


def test_send_or_end_after_end_stream_raises_stream_closed() -> None:
    p = Pair().handshake()
    sid = p.open_accepted()
    p.a.send_data(sid, b"bye", end_stream=True)
    with pytest.raises(StreamClosedError) as info:
        p.a.send_data(sid, b"again")
    assert info.value.stream_id == sid
    with pytest.raises(StreamClosedError):
        p.a.end_stream(sid)
    with pytest.raises(StreamClosedError):
        p.a.send_data(sid, b"", end_stream=True)
    assert [(f, d) for _, f, d in data_frames(p.a.data_to_send())] == [(1, b"bye")]


def test_send_on_a_stream_never_opened_raises_stream_closed() -> None:
    p = Pair().handshake()
    with pytest.raises(StreamClosedError):
        p.a.send_data(1, b"x")
    with pytest.raises(StreamClosedError):
        p.a.end_stream(1)


def test_send_before_accepting_a_remote_stream_is_a_local_error() -> None:
    p = Pair().handshake()
    sid = p.a.open_stream()
    p.settle()
    with pytest.raises(LocalProtocolError) as info:
        p.b.send_data(sid, b"too early")
    assert not isinstance(info.value, StreamClosedError)
    with pytest.raises(LocalProtocolError) as info:
        p.b.end_stream(sid)
    assert not isinstance(info.value, StreamClosedError)
    assert p.b.stream_state(sid) is S.OPEN
    assert p.b.data_to_send() == b""
    p.b.accept_stream(sid)
    p.b.send_data(sid, b"now")
    assert data_frames(p.b.data_to_send()) == [(sid, 0, b"now")]


def test_answering_is_allowed_once_and_only_for_remote_streams() -> None:
    p = Pair().handshake()
    sid = p.a.open_stream()
    p.settle()
    with pytest.raises(LocalProtocolError):
        p.a.accept_stream(sid)  # a opened it: nothing to answer
    with pytest.raises(LocalProtocolError):
        p.a.refuse_stream(sid)
    p.b.accept_stream(sid)
    with pytest.raises(LocalProtocolError):
        p.b.accept_stream(sid)
    with pytest.raises(LocalProtocolError):
        p.b.refuse_stream(sid)
    assert kinds(p.b.data_to_send()) == [T.ACCEPT]
    assert p.b.stream_state(sid) is S.OPEN


# ============================================================================ send queue and slots


def test_send_queue_limit_blocks_then_reports_writable_after_draining() -> None:
    p = Pair(a_config=MuxConfig(send_queue_limit=4 * KiB), b_config=MuxConfig(initial_window=2 * KiB)).handshake()
    sid = p.open_accepted()
    p.a.send_data(sid, b"x" * 3 * KiB)
    assert p.a.writable(sid)
    p.a.send_data(sid, b"x" * 2 * KiB)  # one call may pass the limit
    assert not p.a.writable(sid) and p.a.writable_streams() == []
    assert len(received(p.to_b(), sid)) == 2 * KiB  # the window lets 2 KiB out
    assert p.a.writable(sid)
    assert p.a.writable_streams() == [sid]
    assert p.a.writable_streams() == []

    p.a.send_data(sid, b"y" * KiB)  # 4 KiB queued: full again
    assert not p.a.writable(sid)
    with pytest.raises(LocalProtocolError):
        p.a.send_data(sid, b"z")
    assert p.a.queued_bytes(sid) == 4 * KiB
    p.b.acknowledge_received_data(sid, 2 * KiB)
    p.to_a()
    assert p.a.writable_streams() == [sid]  # the send window reopened from zero
    p.to_b()
    assert p.a.writable_streams() == [sid] and p.a.queued_bytes(sid) == 2 * KiB


def test_closed_streams_release_their_slot() -> None:
    p = Pair(b_config=MuxConfig(max_streams=1)).handshake()
    sid = p.open_accepted()
    with pytest.raises(LocalProtocolError):
        p.a.open_stream()
    p.a.end_stream(sid)
    p.b.end_stream(sid)
    p.settle()
    again = p.open_accepted()  # a clean close released the slot
    p.a.reset_stream(again)
    p.settle()
    third = p.a.open_stream()  # so did the reset
    p.settle()
    p.b.refuse_stream(third)
    p.settle()
    assert p.open_accepted() == third + 2  # and so did the refusal
    assert p.a.open_streams == p.b.open_streams == 1


def test_stop_reading_credits_unread_data_and_resets_on_more_data() -> None:
    p = Pair().handshake()
    sid = p.open_accepted()
    p.a.send_data(sid, b"x" * 3000)
    assert len(received(p.to_b(), sid)) == 3000
    buffered = p.b.buffered_received
    p.b.stop_reading(sid)
    assert p.b.buffered_received == buffered - 3000  # credited back at once
    p.a.send_data(sid, b"more")
    events = p.to_b()
    assert reset_summary(events) == [(sid, ErrorCode.CANCEL, False)]
    assert p.b.stream_state(sid) == StreamState.CLOSED
    assert reset_summary(p.to_a()) == [(sid, ErrorCode.CANCEL, True)]


def test_send_capacity_and_has_data_to_send() -> None:
    p = Pair(a_config=MuxConfig(send_queue_limit=4 * KiB)).handshake()
    assert not p.a.has_data_to_send
    sid = p.a.open_stream()
    assert p.a.has_data_to_send  # the OPEN frame
    p.a.data_to_send()
    assert p.a.send_capacity(sid) == 4 * KiB
    p.a.send_data(sid, b"x" * KiB)
    assert p.a.send_capacity(sid) == 3 * KiB and p.a.has_data_to_send
    p.a.data_to_send()
    assert p.a.send_capacity(sid) == 4 * KiB and not p.a.has_data_to_send
    assert p.a.send_capacity(999) == 0
