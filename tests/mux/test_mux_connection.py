"""MuxConnection, session level: the handshake, every frame kind, flow control, frame
sizes, keepalive and the fairness of the scheduler.

Everything goes through the public API: two connections wired back to back
(:class:`Pair`), or one connection fed hand-built frames for a misbehaving peer. Wire
output is decoded with ``FrameDecoder`` and checked frame by frame. Scenarios that take
``mode`` feed their input whole, byte by byte, and with extra harmless frames appended,
and must see exactly the same events each way (a frame is never split into events).

The helpers here are shared with tests/mux/test_mux_stream_states.py.
"""
from __future__ import annotations

import dataclasses
import struct
from typing import Any, Optional

import msgpack
import pytest

from relay.mux.connection import MuxConfig, MuxConnection
from relay.mux.errors import (
    ErrorCode,
    FlowControlError,
    FrameSizeError,
    LocalProtocolError,
    ProtocolError,
)
from relay.mux.events import (
    ConnectionTerminated,
    ControlReceived,
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    PingAcknowledged,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
)
from relay.mux.frames import Flag, FrameDecoder, FrameType, encode_frame
from relay.mux.stream import StreamState

T = FrameType
FIN = int(Flag.FIN)
ACK = int(Flag.ACK)
KiB = 1024

# ============================================================================ frames


def frames(data: bytes) -> list[tuple[FrameType, int, int, bytes]]:
    """Decode a connection's output into ``(type, flags, stream_id, payload)`` tuples."""
    return [(FrameType(t), f, s, bytes(p)) for t, f, s, p in FrameDecoder(1 << 26).feed(data)]


def kinds(data: bytes) -> list[FrameType]:
    return [f[0] for f in frames(data)]


def data_frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """``(stream_id, flags, payload)`` of every DATA frame in the output."""
    return [(s, f, p) for t, f, s, p in frames(data) if t is T.DATA]


def window_updates(data: bytes) -> list[tuple[int, int]]:
    """``(stream_id, increment)`` of every WINDOW_UPDATE in the output."""
    return [(s, struct.unpack(">I", p)[0]) for t, _, s, p in frames(data) if t is T.WINDOW_UPDATE]


def resets_on_wire(data: bytes) -> dict[int, int]:
    """stream id -> error code of every RESET frame in the output."""
    return {s: struct.unpack_from(">I", p)[0] for t, _, s, p in frames(data) if t is T.RESET}


def goaway_on_wire(data: bytes) -> tuple[int, int]:
    """``(last_stream_id, error_code)`` of the one GOAWAY frame in the output."""
    found = [struct.unpack_from(">II", p) for t, _, _, p in frames(data) if t is T.GOAWAY]
    assert len(found) == 1, f"expected one GOAWAY in {kinds(data)}"
    return found[0]


DROP = object()  # marks a SETTINGS key to leave out


def settings_frame(**overrides: Any) -> bytes:
    settings = MuxConfig().advertised()
    for key, value in overrides.items():
        if value is DROP:
            settings.pop(key, None)
        else:
            settings[key] = value
    return encode_frame(T.SETTINGS, 0, 0, msgpack.packb(settings))


def data_frame(stream_id: int, payload: bytes = b"", fin: bool = False) -> bytes:
    return encode_frame(T.DATA, FIN if fin else 0, stream_id, payload)


def window_update_frame(stream_id: int, increment: int) -> bytes:
    return encode_frame(T.WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def open_frame(stream_id: int, metadata: Any = None, raw: Optional[bytes] = None) -> bytes:
    return encode_frame(T.OPEN, 0, stream_id, raw if raw is not None else msgpack.packb(metadata or {}))


def accept_frame(stream_id: int) -> bytes:
    return encode_frame(T.ACCEPT, 0, stream_id, b"")


def reset_frame(stream_id: int, code: int, message: str = "") -> bytes:
    return encode_frame(T.RESET, 0, stream_id, struct.pack(">I", code) + message.encode())


def ping_frame(payload: bytes = b"\0" * 8, ack: bool = False, stream_id: int = 0) -> bytes:
    return encode_frame(T.PING, ACK if ack else 0, stream_id, payload)


def goaway_frame(last_stream_id: int, code: int, message: str = "") -> bytes:
    return encode_frame(T.GOAWAY, 0, 0, struct.pack(">II", last_stream_id, code) + message.encode())


def control_frame(message: Any = None, raw: Optional[bytes] = None, stream_id: int = 0) -> bytes:
    return encode_frame(T.CONTROL, 0, stream_id, raw if raw is not None else msgpack.packb(message))


# ============================================================================ feeding

MODES = ("whole", "bytewise", "extra")
#: Appended in "extra" mode: a pong for a ping never sent (no event, no output) and a
#: CONTROL message whose event is checked and removed.
EXTRA_MESSAGE = {"extra": True}
EXTRA = ping_frame(struct.pack(">Q", 2**63), ack=True) + control_frame(EXTRA_MESSAGE)


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def norm(events: list[Event]) -> list[Event]:
    """Events with zero-copy memoryview payloads turned into bytes, for comparison."""
    return [
        dataclasses.replace(e, data=bytes(e.data)) if isinstance(e, DataReceived) else e
        for e in events
    ]


def feed(conn: MuxConnection, data: bytes, mode: str = "whole", now: Optional[float] = None) -> list[Event]:
    """Deliver ``data`` whole, byte by byte, or followed by EXTRA; returns its events."""
    assert data, "b'' would mean EOF; call receive_data(b'') explicitly for that"
    if mode == "whole":
        return norm(conn.receive_data(data, now))
    if mode == "bytewise":
        events: list[Event] = []
        for i in range(len(data)):
            events += conn.receive_data(data[i:i + 1], now)
        return norm(events)
    assert mode == "extra"
    events = norm(conn.receive_data(data + EXTRA, now))
    assert events[-1:] == [ControlReceived(message=EXTRA_MESSAGE)]
    return events[:-1]


def received(events: list[Event], stream_id: int) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id)


def of_type(events: list[Event], cls: type) -> list[Any]:
    return [e for e in events if isinstance(e, cls)]


def reset_summary(events: list[Event]) -> list[tuple[int, int, bool]]:
    """``(stream_id, error_code, remote)`` of the StreamReset events (messages vary)."""
    return [(e.stream_id, e.error_code, e.remote) for e in events if isinstance(e, StreamReset)]


class Pair:
    """A client ``a`` and a server ``b`` wired back to back; bytes move only on request."""

    def __init__(self, a_config: Optional[MuxConfig] = None, b_config: Optional[MuxConfig] = None,
                 mode: str = "whole") -> None:
        self.a = MuxConnection(client=True, config=a_config)
        self.b = MuxConnection(client=False, config=b_config)
        self.mode = mode

    def to_b(self, now: Optional[float] = None) -> list[Event]:
        data = self.a.data_to_send()
        return feed(self.b, data, self.mode, now) if data else []

    def to_a(self, now: Optional[float] = None) -> list[Event]:
        data = self.b.data_to_send()
        return feed(self.a, data, self.mode, now) if data else []

    def settle(self, now: Optional[float] = None) -> tuple[list[Event], list[Event]]:
        """Move bytes both ways until neither side has anything to send."""
        a_events: list[Event] = []
        b_events: list[Event] = []
        for _ in range(1000):
            from_a, from_b = self.a.data_to_send(), self.b.data_to_send()
            if not from_a and not from_b:
                return a_events, b_events
            if from_a:
                b_events += feed(self.b, from_a, self.mode, now)
            if from_b:
                a_events += feed(self.a, from_b, self.mode, now)
        raise AssertionError("the pair never settled")

    def handshake(self, now: Optional[float] = None) -> "Pair":
        a_events, b_events = self.settle(now)
        assert of_type(a_events, HelloReceived) and of_type(b_events, HelloReceived)
        return self

    def open_accepted(self, metadata: Optional[dict] = None) -> int:
        """Open a stream from ``a`` and accept it on ``b``; returns its id."""
        sid = self.a.open_stream(metadata)
        _, b_events = self.settle()
        assert b_events == [StreamOpened(stream_id=sid, metadata=metadata or {})]
        self.b.accept_stream(sid)
        a_events, _ = self.settle()
        assert a_events == [StreamAccepted(stream_id=sid)]
        return sid


def established(client: bool = False, config: Optional[MuxConfig] = None, **peer_settings: Any) -> MuxConnection:
    """A connection that has sent its SETTINGS and received a (hand-built) peer's."""
    conn = MuxConnection(client=client, config=config)
    assert kinds(conn.data_to_send()) == [T.SETTINGS]
    assert len(conn.receive_data(settings_frame(**peer_settings))) == 1
    assert conn.data_to_send() == b""
    return conn


def assert_fatal(conn: MuxConnection, data: bytes, error: type, code: ErrorCode, mode: str = "whole") -> None:
    """Feeding ``data`` raises ``error`` with ``code``, queues that GOAWAY, ends the session."""
    with pytest.raises(error) as info:
        feed(conn, data, mode)
    assert info.value.error_code == code
    assert goaway_on_wire(conn.data_to_send())[1] == code
    assert conn.terminated
    assert conn.receive_data(ping_frame()) == []  # nothing is processed any more
    assert conn.data_to_send() == b""


# ============================================================================ session start


@pytest.mark.parametrize("client", [True, False])
def test_first_output_is_settings_with_the_advertised_limits(client: bool) -> None:
    config = MuxConfig(max_frame_size=4 * KiB, initial_window=8 * KiB, info={"agent": "t"})
    conn = MuxConnection(client=client, config=config)
    [(kind, flags, sid, payload)] = frames(conn.data_to_send())
    assert (kind, flags, sid) == (T.SETTINGS, 0, 0)
    assert msgpack.unpackb(payload) == config.advertised()
    assert conn.data_to_send() == b""
    assert not conn.established


def test_nothing_but_settings_leaves_before_the_peer_settings_then_all_in_order() -> None:
    a, b = MuxConnection(client=True), MuxConnection(client=False)
    assert kinds(a.data_to_send()) == [T.SETTINGS]
    sid = a.open_stream({"target": "db:5432"})
    a.send_data(sid, b"early bytes", end_stream=True)
    a.send_control({"hello": 1})
    a.ping()
    second = a.open_stream()
    a.end_stream(second)
    assert a.data_to_send() == b""  # still waiting for b's SETTINGS

    assert of_type(a.receive_data(b.data_to_send()), HelloReceived)
    out = frames(a.data_to_send())
    assert [(t, s) for t, _, s, _ in out] == [
        (T.OPEN, sid), (T.CONTROL, 0), (T.PING, 0), (T.OPEN, second), (T.DATA, second), (T.DATA, sid),
    ]
    assert out[1][3] == msgpack.packb({"hello": 1})
    assert out[4][1:] == (FIN, second, b"")
    assert out[5][1:] == (FIN, sid, b"early bytes")


def test_hello_received_carries_version_settings_and_info(mode: str) -> None:
    b = MuxConnection(client=False, config=MuxConfig(
        max_frame_size=4 * KiB, initial_window=8 * KiB, max_streams=7, info={"agent": "probe", "labels": ["x"]},
    ))
    a = MuxConnection(client=True)
    events = feed(a, b.data_to_send(), mode)
    assert events == [HelloReceived(
        version=1,
        settings={
            "max_frame_size": 4 * KiB, "initial_window": 8 * KiB, "session_window": 64 * KiB * KiB,
            "max_streams": 7, "max_metadata_size": 16 * KiB, "max_control_size": KiB * KiB,
        },
        info={"agent": "probe", "labels": ["x"]},
    )]
    assert a.established and a.version == 1 and a.peer_info == {"agent": "probe", "labels": ["x"]}


@pytest.mark.parametrize("frame", [ping_frame(), open_frame(1), control_frame({})], ids=["ping", "open", "control"])
def test_a_first_frame_other_than_settings_is_a_protocol_error(frame: bytes, mode: str) -> None:
    conn = MuxConnection(client=False)
    conn.data_to_send()
    assert_fatal(conn, frame + settings_frame(), ProtocolError, ErrorCode.PROTOCOL_ERROR, mode)
    assert not conn.established


def test_settings_twice_is_a_protocol_error() -> None:
    conn = established()
    assert_fatal(conn, settings_frame(), ProtocolError, ErrorCode.PROTOCOL_ERROR)


_RANGES = {
    "max_frame_size": (1024, 16 * KiB * KiB),
    "initial_window": (1024, 0x7FFFFFFF),
    "session_window": (64 * KiB, 0x7FFFFFFF),
    "max_streams": (1, 0xFFFFFFFF),
    "max_metadata_size": (256, 16 * KiB * KiB),
    "max_control_size": (256, 64 * KiB * KiB),
}
_BAD_SETTINGS = [
    pytest.param(settings_frame(versions=DROP), ErrorCode.PROTOCOL_ERROR, id="missing-versions"),
    pytest.param(settings_frame(versions=1), ErrorCode.PROTOCOL_ERROR, id="versions-not-a-list"),
    pytest.param(settings_frame(versions=[2, 3]), ErrorCode.UNSUPPORTED_VERSION, id="no-common-version"),
    pytest.param(settings_frame(versions=[]), ErrorCode.UNSUPPORTED_VERSION, id="empty-versions"),
    pytest.param(encode_frame(T.SETTINGS, 0, 0, msgpack.packb([1, 2])), ErrorCode.PROTOCOL_ERROR, id="not-a-map"),
    pytest.param(encode_frame(T.SETTINGS, 0, 0, b"\xc1\xc1"), ErrorCode.PROTOCOL_ERROR, id="garbage-msgpack"),
    pytest.param(encode_frame(T.SETTINGS, 0, 0, b"\x85\xa1"), ErrorCode.PROTOCOL_ERROR, id="truncated-msgpack"),
    *[
        pytest.param(settings_frame(**{key: value}), ErrorCode.PROTOCOL_ERROR, id=f"{key}={label}")
        for key, (low, high) in _RANGES.items()
        for label, value in (("below", low - 1), ("above", high + 1))
    ],
    pytest.param(settings_frame(max_streams=DROP), ErrorCode.PROTOCOL_ERROR, id="max_streams=missing"),
    pytest.param(settings_frame(initial_window="65536"), ErrorCode.PROTOCOL_ERROR, id="initial_window=text"),
    pytest.param(settings_frame(max_frame_size=True), ErrorCode.PROTOCOL_ERROR, id="max_frame_size=bool"),
]


@pytest.mark.parametrize("frame, code", _BAD_SETTINGS)
def test_bad_settings_is_a_protocol_error_with_goaway(frame: bytes, code: ErrorCode) -> None:
    conn = MuxConnection(client=True)
    conn.data_to_send()
    assert_fatal(conn, frame, ProtocolError, code)
    assert not conn.established


@pytest.mark.parametrize("frame", [
    pytest.param(encode_frame(T.CONTROL, 0, 0, b"")[:1] + b"\x09" + encode_frame(T.CONTROL, 0, 0, b"")[2:], id="unknown-type"),
    pytest.param(b"\x02" + encode_frame(T.PING, 0, 0, b"\0" * 8)[1:], id="wrong-frame-version"),
])
def test_malformed_header_is_a_protocol_error(frame: bytes, mode: str) -> None:
    assert_fatal(established(), frame, ProtocolError, ErrorCode.PROTOCOL_ERROR, mode)


# ============================================================================ DATA


def test_data_with_and_without_fin(mode: str) -> None:
    p = Pair(mode=mode).handshake()
    sid = p.a.open_stream({"target": "x"})
    p.a.send_data(sid, b"hello ")
    p.a.send_data(sid, bytearray(b"world"), end_stream=True)
    _, b_events = p.settle()
    assert b_events == [
        StreamOpened(stream_id=sid, metadata={"target": "x"}),
        DataReceived(stream_id=sid, data=b"hello world", flow_controlled_length=11, end_stream=True),
        StreamEnded(stream_id=sid),
    ]


def test_send_data_keeps_views_of_bytes_and_copies_what_may_change() -> None:
    """A relayed payload (a read-only view of received bytes) is queued as it is; a
    buffer its owner may change, or a view pinning far more than it carries, is copied:
    what goes out is what was sent at the time."""
    p = Pair().handshake()
    sid = p.a.open_stream()
    p.to_b()
    received = bytes(range(256)) * 8  # within the first window
    whole = memoryview(received).toreadonly()[12:]  # most of the buffer: passes through
    small = memoryview(received)[:100]  # pins 2 KiB for 100 bytes: copied
    changing = bytearray(b"abcd")
    p.a.send_data(sid, whole)
    p.a.send_data(sid, small)
    p.a.send_data(sid, memoryview(changing))
    changing[:] = b"ZZZZ"
    parts = p.a.data_to_send_parts()
    assert any(part is whole for part in parts)
    assert not any(type(part) is memoryview and part.obj is received and part.nbytes == 100 for part in parts)
    sent = data_frames(b"".join(parts))
    assert {stream for stream, _, _ in sent} == {sid}
    assert b"".join(payload for _, _, payload in sent) == received[12:] + received[:100] + b"abcd"


def test_separate_sends_become_separate_frames_and_events(mode: str) -> None:
    p = Pair(mode=mode).handshake()
    sid = p.a.open_stream()
    p.to_b()
    p.a.send_data(sid, b"one")
    assert data_frames(p.a.data_to_send()) == [(sid, 0, b"one")]
    p.a.send_data(sid, b"two")
    p.a.send_data(sid, b"three", end_stream=True)
    out = p.a.data_to_send()
    assert data_frames(out) == [(sid, FIN, b"twothree")]
    assert feed(p.b, out, mode) == [
        DataReceived(stream_id=sid, data=b"twothree", flow_controlled_length=8, end_stream=True),
        StreamEnded(stream_id=sid),
    ]


def test_empty_fin_gives_only_stream_ended(mode: str) -> None:
    p = Pair(mode=mode).handshake()
    sid = p.a.open_stream()
    p.a.end_stream(sid)
    out = p.a.data_to_send()
    assert data_frames(out) == [(sid, FIN, b"")]
    assert feed(p.b, out, mode) == [StreamOpened(stream_id=sid, metadata={}), StreamEnded(stream_id=sid)]


def test_a_frame_is_never_split_into_several_events(mode: str) -> None:
    p = Pair(mode=mode).handshake()
    sid = p.a.open_stream()
    payload = bytes(range(256)) * 24  # 6144 bytes: one frame, above the zero-copy threshold
    p.a.send_data(sid, payload)
    out = p.a.data_to_send()
    assert [len(d) for _, _, d in data_frames(out)] == [len(payload)]
    events = feed(p.b, out, mode)
    assert events == [
        StreamOpened(stream_id=sid, metadata={}),
        DataReceived(stream_id=sid, data=payload, flow_controlled_length=len(payload)),
    ]


def test_data_on_stream_zero_is_a_protocol_error() -> None:
    assert_fatal(established(), data_frame(0, b"x"), ProtocolError, ErrorCode.PROTOCOL_ERROR)


def test_data_for_a_stream_the_peer_never_opened_is_a_protocol_error() -> None:
    assert_fatal(established(), data_frame(5, b"x"), ProtocolError, ErrorCode.PROTOCOL_ERROR)


# ============================================================================ WINDOW_UPDATE


def test_stream_window_update_resumes_a_blocked_sender() -> None:
    p = Pair(b_config=MuxConfig(initial_window=4 * KiB)).handshake()
    sid = p.open_accepted()
    p.a.send_data(sid, b"x" * 6000)
    b_events = p.to_b()
    assert len(received(b_events, sid)) == 4 * KiB
    assert p.a.send_window(sid) == 0
    p.b.acknowledge_received_data(sid, 4 * KiB)
    out = p.b.data_to_send()
    assert window_updates(out) == [(sid, 4 * KiB)]
    assert p.a.receive_data(out) == []
    assert p.a.send_window(sid) == 4 * KiB
    assert [len(d) for _, _, d in data_frames(p.a.data_to_send())] == [6000 - 4 * KiB]


def test_session_window_update_resumes_a_blocked_sender() -> None:
    # A peer whose stream window is larger than its session window (relay never
    # advertises that: it reserves every stream window out of the session's, but another
    # implementation may), so the session is what blocks.
    a = established(client=True, session_window=64 * KiB, initial_window=256 * KiB)
    sid = a.open_stream()
    a.send_data(sid, b"x" * 100 * KiB)
    assert sum(len(p) for t, _, s, p in frames(a.data_to_send()) if t is T.DATA) == 64 * KiB
    assert a.data_to_send() == b""
    a.receive_data(window_update_frame(0, 64 * KiB))
    assert sum(len(p) for t, _, s, p in frames(a.data_to_send()) if t is T.DATA) == 36 * KiB


@pytest.mark.parametrize("stream_level", [True, False], ids=["stream", "session"])
def test_window_update_with_zero_increment_is_a_protocol_error(stream_level: bool) -> None:
    conn = established(client=True)
    sid = conn.open_stream()
    conn.data_to_send()
    frame = window_update_frame(sid if stream_level else 0, 0)
    assert_fatal(conn, frame, ProtocolError, ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("stream_level", [True, False], ids=["stream", "session"])
def test_window_update_overflow_is_a_flow_control_error(stream_level: bool) -> None:
    conn = established(client=True)
    sid = conn.open_stream()
    conn.data_to_send()
    frame = window_update_frame(sid if stream_level else 0, 0x7FFFFFFF)
    assert_fatal(conn, frame, FlowControlError, ErrorCode.FLOW_CONTROL_ERROR)


def test_window_update_with_a_short_payload_is_a_frame_size_error() -> None:
    frame = encode_frame(T.WINDOW_UPDATE, 0, 0, b"\0\0\1")
    assert_fatal(established(), frame, FrameSizeError, ErrorCode.FRAME_SIZE_ERROR)


def test_window_update_for_a_stream_never_opened_is_a_protocol_error() -> None:
    assert_fatal(established(client=True), window_update_frame(1, 10), ProtocolError, ErrorCode.PROTOCOL_ERROR)


# ============================================================================ OPEN


def test_open_metadata_round_trip(mode: str) -> None:
    metadata = {"protocol": "tcp", "target": "db:5432", "headers": [["x", "y"]], "blob": b"\x00\xff", "n": 2**40}
    p = Pair(mode=mode).handshake()
    sid = p.a.open_stream(metadata)
    assert sid == 1 and p.a.open_stream() == 3  # the client allocates odd ids
    _, b_events = p.settle()
    assert b_events == [StreamOpened(stream_id=1, metadata=metadata), StreamOpened(stream_id=3, metadata={})]
    assert p.b.open_stream() == 2 and p.b.open_stream() == 4  # the server even ones
    a_events, _ = p.settle()
    assert a_events == [StreamOpened(stream_id=2, metadata={}), StreamOpened(stream_id=4, metadata={})]


@pytest.mark.parametrize("client, stream_id", [(False, 2), (False, 0), (True, 1)],
                         ids=["even-to-server", "zero", "odd-to-client"])
def test_open_with_the_wrong_parity_is_a_protocol_error(client: bool, stream_id: int) -> None:
    assert_fatal(established(client=client), open_frame(stream_id), ProtocolError, ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("second", [5, 3], ids=["reused", "decreasing"])
def test_open_with_a_reused_or_decreasing_id_is_a_protocol_error(second: int) -> None:
    conn = established()
    assert conn.receive_data(open_frame(5)) == [StreamOpened(stream_id=5, metadata={})]
    assert_fatal(conn, open_frame(second), ProtocolError, ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("payload, code", [
    pytest.param(msgpack.packb({"pad": "x" * 300}), ErrorCode.FRAME_SIZE_ERROR, id="oversized"),
    pytest.param(b"\xc1", ErrorCode.PROTOCOL_ERROR, id="invalid-msgpack"),
    pytest.param(msgpack.packb(["not", "a", "map"]), ErrorCode.PROTOCOL_ERROR, id="not-a-map"),
])
def test_bad_open_metadata_refuses_the_stream_and_the_session_survives(payload: bytes, code: ErrorCode, mode: str) -> None:
    conn = established(config=MuxConfig(max_metadata_size=256))
    assert feed(conn, open_frame(1, raw=payload), mode) == []
    out = conn.data_to_send()
    assert kinds(out) == [T.RESET] and resets_on_wire(out) == {1: code}
    assert conn.open_streams == 0 and not conn.terminated
    # Data the peer sent before it saw the RESET is dropped silently.
    assert feed(conn, data_frame(1, b"late"), mode) == []
    assert feed(conn, open_frame(3, {"ok": 1}), mode) == [StreamOpened(stream_id=3, metadata={"ok": 1})]


def test_opens_beyond_max_streams_are_refused_with_too_many_streams(mode: str) -> None:
    p = Pair(b_config=MuxConfig(max_streams=2), mode=mode)
    # Opened before b's SETTINGS, so a cannot know b's limit yet.
    ids = [p.a.open_stream() for _ in range(3)]
    a_events, b_events = p.settle()
    assert of_type(b_events, StreamOpened) == [StreamOpened(stream_id=i, metadata={}) for i in ids[:2]]
    assert reset_summary(a_events) == [(ids[2], ErrorCode.TOO_MANY_STREAMS, True)]
    assert p.b.open_streams == 2 and p.a.open_streams == 2
    # Now a knows the limit and refuses locally.
    with pytest.raises(LocalProtocolError):
        p.a.open_stream()


def test_data_beyond_the_stream_window_resets_only_that_stream(mode: str) -> None:
    conn = established(config=MuxConfig(initial_window=1024))
    feed(conn, open_frame(1) + open_frame(3) + data_frame(1, b"x" * 1024), mode)
    events = feed(conn, data_frame(1, b"y"), mode)
    assert reset_summary(events) == [(1, ErrorCode.FLOW_CONTROL_ERROR, False)] and len(events) == 1
    assert resets_on_wire(conn.data_to_send()) == {1: ErrorCode.FLOW_CONTROL_ERROR}
    assert conn.buffered_received == 0 and not conn.terminated
    assert feed(conn, data_frame(3, b"fine"), mode)[0].data == b"fine"


def test_data_beyond_the_session_window_is_a_flow_control_error() -> None:
    conn = established(config=MuxConfig(session_window=64 * KiB, initial_window=64 * KiB))
    conn.receive_data(open_frame(1) + open_frame(3))
    for _ in range(4):
        conn.receive_data(data_frame(1, b"x" * 16 * KiB))
    assert_fatal(conn, data_frame(3, b"y"), FlowControlError, ErrorCode.FLOW_CONTROL_ERROR)


def test_open_metadata_over_the_peer_limit_is_refused_locally() -> None:
    p = Pair(b_config=MuxConfig(max_metadata_size=256)).handshake()
    with pytest.raises(LocalProtocolError):
        p.a.open_stream({"pad": "x" * 300})
    assert p.a.data_to_send() == b"" and p.a.open_streams == 0
    assert p.a.open_stream({"pad": "x" * 100}) == 1  # the failed attempt used no id


def test_before_the_handshake_open_and_control_are_held_to_the_smallest_legal_limit() -> None:
    conn = MuxConnection(client=True)
    with pytest.raises(LocalProtocolError):
        conn.open_stream({"pad": "x" * 300})
    with pytest.raises(LocalProtocolError):
        conn.send_control({"pad": "x" * 300})
    with pytest.raises(LocalProtocolError):
        conn.send_control({"not msgpack": object()})
    assert conn.open_streams == 0 and kinds(conn.data_to_send()) == [T.SETTINGS]


# ============================================================================ ACCEPT


def test_accept_produces_stream_accepted(mode: str) -> None:
    p = Pair(mode=mode).handshake()
    sid = p.a.open_stream()
    p.settle()
    p.b.accept_stream(sid)
    out = p.b.data_to_send()
    assert frames(out) == [(T.ACCEPT, 0, sid, b"")]
    assert feed(p.a, out, mode) == [StreamAccepted(stream_id=sid)]


def test_accept_for_a_stream_never_opened_is_a_protocol_error() -> None:
    assert_fatal(established(client=True), accept_frame(1), ProtocolError, ErrorCode.PROTOCOL_ERROR)


def test_duplicate_accept_is_a_protocol_error() -> None:
    conn = established(client=True)
    sid = conn.open_stream()
    conn.data_to_send()
    assert conn.receive_data(accept_frame(sid)) == [StreamAccepted(stream_id=sid)]
    assert_fatal(conn, accept_frame(sid), ProtocolError, ErrorCode.PROTOCOL_ERROR)


def test_accept_for_a_stream_the_peer_opened_is_a_protocol_error() -> None:
    conn = established()
    conn.receive_data(open_frame(1))
    assert_fatal(conn, accept_frame(1), ProtocolError, ErrorCode.PROTOCOL_ERROR)


def test_accept_for_a_stream_already_reset_here_is_ignored() -> None:
    conn = established(client=True)
    sid = conn.open_stream()
    conn.reset_stream(sid)
    conn.data_to_send()
    assert conn.receive_data(accept_frame(sid)) == []
    assert not conn.terminated and conn.data_to_send() == b""


# ============================================================================ RESET


def test_reset_carries_code_and_message(mode: str) -> None:
    p = Pair(mode=mode).handshake()
    sid = p.open_accepted()
    p.b.reset_stream(sid, ErrorCode.CONNECT_FAILED, "connection refused by db:5432")
    out = p.b.data_to_send()
    assert resets_on_wire(out) == {sid: ErrorCode.CONNECT_FAILED}
    assert feed(p.a, out, mode) == [StreamReset(
        stream_id=sid, error_code=ErrorCode.CONNECT_FAILED, message="connection refused by db:5432", remote=True,
    )]


def test_reset_for_a_finished_stream_is_ignored(mode: str) -> None:
    p = Pair(mode=mode).handshake()
    sid = p.open_accepted()
    p.a.end_stream(sid)
    p.b.end_stream(sid)
    p.settle()
    assert p.a.open_streams == 0 and p.b.open_streams == 0
    assert feed(p.a, reset_frame(sid, ErrorCode.CANCEL, "late"), mode) == []
    assert not p.a.terminated and p.a.data_to_send() == b""


def test_reset_for_a_stream_never_opened_is_a_protocol_error() -> None:
    assert_fatal(established(), reset_frame(7, ErrorCode.CANCEL), ProtocolError, ErrorCode.PROTOCOL_ERROR)


def test_reset_without_an_error_code_is_a_frame_size_error() -> None:
    conn = established()
    conn.receive_data(open_frame(1))
    assert_fatal(conn, encode_frame(T.RESET, 0, 1, b"\0\0"), FrameSizeError, ErrorCode.FRAME_SIZE_ERROR)


# ============================================================================ PING


def test_ping_is_echoed_with_ack(mode: str) -> None:
    conn = established()
    assert feed(conn, ping_frame(b"12345678"), mode) == []
    assert frames(conn.data_to_send()) == [(T.PING, ACK, 0, b"12345678")]


def test_ping_acknowledged_reports_the_rtt_when_now_is_passed(mode: str) -> None:
    p = Pair(mode=mode).handshake()
    ping_id = p.a.ping(now=10.0)
    out = p.a.data_to_send()
    assert [(t, f) for t, f, _, _ in frames(out)] == [(T.PING, 0)]
    p.b.receive_data(out)
    assert feed(p.a, p.b.data_to_send(), mode, now=10.25) == [PingAcknowledged(ping_id=ping_id, rtt=0.25)]
    assert p.a.rtt == 0.25


def test_pong_for_an_unknown_ping_is_ignored() -> None:
    conn = established()
    assert conn.receive_data(ping_frame(b"\0" * 7 + b"\x09", ack=True), now=1.0) == []
    assert conn.data_to_send() == b"" and conn.rtt is None


@pytest.mark.parametrize("frame", [
    pytest.param(ping_frame(b"\0" * 7), id="7-bytes"),
    pytest.param(ping_frame(b"\0" * 9), id="9-bytes"),
    pytest.param(ping_frame(b"\0" * 7, ack=True), id="short-ack"),
    pytest.param(ping_frame(stream_id=1), id="on-a-stream"),
])
def test_malformed_ping_is_a_protocol_error(frame: bytes) -> None:
    assert_fatal(established(), frame, ProtocolError, ErrorCode.PROTOCOL_ERROR)


# ============================================================================ GOAWAY


def test_goaway_refuses_our_streams_above_last_stream_id(mode: str) -> None:
    p = Pair(mode=mode).handshake()
    first = p.open_accepted()
    p.b.goaway(ErrorCode.GOING_AWAY, "maintenance")
    late = p.a.open_stream()  # crosses b's GOAWAY on the wire
    out = p.b.data_to_send()
    assert goaway_on_wire(out) == (first, ErrorCode.GOING_AWAY)
    events = feed(p.a, out, mode)
    assert events[0] == GoAwayReceived(last_stream_id=first, error_code=ErrorCode.GOING_AWAY, message="maintenance")
    assert reset_summary(events[1:]) == [(late, ErrorCode.REFUSED, True)] and len(events) == 2
    assert p.a.stream_state(first) is StreamState.OPEN
    assert p.a.stream_state(late) is StreamState.CLOSED
    with pytest.raises(LocalProtocolError):
        p.a.open_stream()
    # b refuses the OPEN that crossed its GOAWAY; a ignores that RESET for a closed stream.
    b_events = p.to_b()
    assert b_events == []
    assert resets_on_wire(p.b.data_to_send()) == {late: ErrorCode.REFUSED}
    # The stream below the limit still works.
    p.a.send_data(first, b"still here", end_stream=True)
    _, b_events = p.settle()
    assert received(b_events, first) == b"still here"


def test_after_our_goaway_new_peer_opens_are_refused(mode: str) -> None:
    conn = established()
    conn.receive_data(open_frame(1))
    conn.goaway(ErrorCode.NO_ERROR, "draining")
    assert goaway_on_wire(conn.data_to_send()) == (1, ErrorCode.NO_ERROR)
    assert feed(conn, open_frame(3), mode) == []
    assert resets_on_wire(conn.data_to_send()) == {3: ErrorCode.REFUSED}
    assert conn.stream_state(1) is StreamState.OPEN and conn.open_streams == 1
    with pytest.raises(LocalProtocolError):
        conn.open_stream()


def test_goaway_with_a_short_payload_is_a_frame_size_error() -> None:
    frame = encode_frame(T.GOAWAY, 0, 0, b"\0\0\0\0")
    assert_fatal(established(), frame, FrameSizeError, ErrorCode.FRAME_SIZE_ERROR)


# ============================================================================ CONTROL


def test_control_round_trip(mode: str) -> None:
    message = {"type": "metrics", "values": [1, 2.5, None], "nested": {"ok": True}}
    p = Pair(mode=mode).handshake()
    p.a.send_control(message)
    out = p.a.data_to_send()
    assert frames(out) == [(T.CONTROL, 0, 0, msgpack.packb(message))]
    assert feed(p.b, out, mode) == [ControlReceived(message=message)]


def test_control_over_the_peer_limit_is_refused_locally() -> None:
    p = Pair(b_config=MuxConfig(max_control_size=256)).handshake()
    with pytest.raises(LocalProtocolError):
        p.a.send_control({"pad": "x" * 300})
    assert p.a.data_to_send() == b"" and not p.a.terminated
    p.a.send_control({"pad": "x" * 200})
    assert kinds(p.a.data_to_send()) == [T.CONTROL]


@pytest.mark.parametrize("frame, error, code", [
    pytest.param(control_frame(raw=b"\xc1"), ProtocolError, ErrorCode.PROTOCOL_ERROR, id="garbage"),
    pytest.param(control_frame({}, stream_id=1), ProtocolError, ErrorCode.PROTOCOL_ERROR, id="on-a-stream"),
    pytest.param(control_frame("x" * 70_000), FrameSizeError, ErrorCode.FRAME_SIZE_ERROR, id="over-our-limit"),
])
def test_bad_control_is_fatal(frame: bytes, error: type, code: ErrorCode) -> None:
    conn = established(config=MuxConfig(max_control_size=1024))
    assert_fatal(conn, frame, error, code)


# ============================================================================ flow control


def test_sender_stops_at_exactly_the_peer_initial_window() -> None:
    p = Pair(b_config=MuxConfig(initial_window=4 * KiB)).handshake()
    sid = p.a.open_stream()
    p.a.send_data(sid, b"x" * 10_000)
    _, b_events = p.settle()  # b never acknowledges
    assert len(received(b_events, sid)) == 4 * KiB
    assert p.a.send_window(sid) == 0 and p.a.queued_bytes(sid) == 10_000 - 4 * KiB
    assert p.b.buffered_received == 4 * KiB
    assert p.a.data_to_send() == b"" and p.b.data_to_send() == b""


def test_window_update_only_after_a_quarter_of_the_window_is_acknowledged() -> None:
    p = Pair(b_config=MuxConfig(initial_window=4 * KiB)).handshake()
    sid = p.open_accepted()
    p.a.send_data(sid, b"x" * 2 * KiB)
    assert len(received(p.to_b(), sid)) == 2 * KiB
    p.b.acknowledge_received_data(sid, KiB - 1)
    assert p.b.data_to_send() == b""
    p.b.acknowledge_received_data(sid, 1)
    out = p.b.data_to_send()
    assert frames(out) == [(T.WINDOW_UPDATE, 0, sid, struct.pack(">I", KiB))]
    p.a.receive_data(out)
    assert p.a.send_window(sid) == 4 * KiB - 2 * KiB + KiB


def test_session_window_update_only_after_a_quarter_of_the_session_window() -> None:
    config = MuxConfig(session_window=64 * KiB, initial_window=64 * KiB)
    p = Pair(b_config=config).handshake()
    sid = p.open_accepted()
    p.a.send_data(sid, b"x" * (16 * KiB - 1))
    p.to_b()
    p.b.acknowledge_received_data(sid, 16 * KiB - 1)
    assert p.b.data_to_send() == b""
    p.a.send_data(sid, b"x")
    p.to_b()
    p.b.acknowledge_received_data(sid, 1)
    assert sorted(window_updates(p.b.data_to_send())) == [(0, 16 * KiB), (sid, 16 * KiB)]


def test_at_zero_credit_any_acknowledgement_updates_at_once() -> None:
    p = Pair(b_config=MuxConfig(initial_window=4 * KiB)).handshake()
    sid = p.open_accepted()
    p.a.send_data(sid, b"x" * 4 * KiB)
    p.to_b()
    p.b.acknowledge_received_data(sid, 1)
    assert window_updates(p.b.data_to_send()) == [(sid, 1)]
    p.b.acknowledge_received_data(sid, 1)  # credit is 1 now, and 2 bytes < a quarter
    assert p.b.data_to_send() == b""


def test_acknowledging_more_than_outstanding_is_a_local_error() -> None:
    p = Pair().handshake()
    sid = p.open_accepted()
    p.a.send_data(sid, b"abc")
    p.to_b()
    with pytest.raises(LocalProtocolError):
        p.b.acknowledge_received_data(sid, 4)
    with pytest.raises(LocalProtocolError):
        p.b.acknowledge_received_data(sid, -1)
    p.b.acknowledge_received_data(sid, 3)  # the failed calls consumed nothing
    assert p.b.buffered_received == 0


@pytest.mark.parametrize("who_resets", ["receiver", "sender", "receiver-before-data-arrives"])
def test_data_of_a_reset_stream_is_credited_back_to_the_session(who_resets: str) -> None:
    config = MuxConfig(session_window=64 * KiB, initial_window=64 * KiB)
    p = Pair(a_config=config, b_config=config).handshake()
    first = p.a.open_stream()
    if who_resets == "receiver-before-data-arrives":
        p.to_b()
        p.b.reset_stream(first, ErrorCode.CANCEL)  # its RESET is not delivered yet
        p.a.send_data(first, b"x" * 64 * KiB)
        assert received(p.to_b(), first) == b""
    else:
        p.a.send_data(first, b"x" * 64 * KiB)
        assert len(received(p.to_b(), first)) == 64 * KiB  # the whole session window, unread
        (p.b if who_resets == "receiver" else p.a).reset_stream(first, ErrorCode.CANCEL)
    p.settle()
    assert p.b.buffered_received == 0

    second = p.a.open_stream()
    p.a.send_data(second, b"y" * 64 * KiB)
    _, b_events = p.settle()
    assert len(received(b_events, second)) == 64 * KiB
    assert p.a.queued_bytes(second) == 0


def _tuned_pair(**b_config: Any) -> Pair:
    """A pair whose receiver ``b`` has measured an RTT of 0.1 (both clocks start at 0)."""
    p = Pair(b_config=MuxConfig(**b_config))
    p.to_b(now=0.0)
    p.to_a(now=0.0)  # b's SETTINGS and the PING b sent on HelloReceived
    p.to_b(now=0.1)  # a's pong
    p.to_a(now=0.1)
    assert p.b.rtt == pytest.approx(0.1)
    return p


def _rounds(p: Pair, sids: list[int], count: int, times: list[float]) -> list[dict[int, int]]:
    """Each round: a sends all it may, b reads it at ``times[i]`` and acknowledges it."""
    sizes = []
    for i in range(count):
        events = p.to_b(now=times[i])
        sizes.append({sid: len(received(events, sid)) for sid in sids})
        for event in of_type(events, DataReceived):
            p.b.acknowledge_received_data(event.stream_id, event.flow_controlled_length)
        p.to_a(now=times[i])
    return sizes


def test_fast_consumption_doubles_the_window_up_to_max_window() -> None:
    p = _tuned_pair(initial_window=4 * KiB, max_window=12 * KiB)
    sid = p.a.open_stream()
    p.a.send_data(sid, b"x" * 256 * KiB)
    sizes = _rounds(p, [sid], 5, [1.0] * 5)
    assert [s[sid] for s in sizes] == [4 * KiB, 8 * KiB, 12 * KiB, 12 * KiB, 12 * KiB]


def test_slow_consumption_does_not_grow_the_window() -> None:
    p = _tuned_pair(initial_window=4 * KiB, max_window=16 * KiB)
    sid = p.a.open_stream()
    p.a.send_data(sid, b"x" * 64 * KiB)
    p.to_b(now=1.0)
    # A quarter per acknowledgement, each more than 4 x RTT after the previous one.
    for i in range(12):
        p.b.handle_timer(1.0 + i)  # the receiver's clock moves on
        p.to_b(now=1.0 + i)
        p.b.acknowledge_received_data(sid, KiB)
        out = p.b.data_to_send()
        assert window_updates(out) == [(sid, KiB)]
        p.a.receive_data(out)
        assert p.a.send_window(sid) <= 4 * KiB


def _slow_reader_rounds(ack_per_frame: bool) -> list[int]:
    """A reader that gets to each batch 5 s (50 x RTT) after it arrived."""
    p = _tuned_pair(initial_window=4 * KiB, max_window=KiB * KiB, max_frame_size=KiB)
    sid = p.a.open_stream()
    p.a.send_data(sid, b"x" * KiB * KiB)
    sizes = []
    for i in range(5):
        arrival = 10.0 * (i + 1)
        events = p.to_b(now=arrival)
        sizes.append(len(received(events, sid)))
        p.b.handle_timer(arrival + 5.0)
        if ack_per_frame:
            for event in of_type(events, DataReceived):
                p.b.acknowledge_received_data(sid, event.flow_controlled_length)
        else:
            p.b.acknowledge_received_data(sid, sizes[-1])
        p.to_a(now=arrival + 5.0)
    return sizes


def test_auto_tuning_does_not_depend_on_how_acknowledgements_are_split() -> None:
    per_frame = _slow_reader_rounds(ack_per_frame=True)
    assert per_frame == _slow_reader_rounds(ack_per_frame=False)
    # The reader, not the window, is the bottleneck: growing would only add memory.
    assert per_frame == [4 * KiB] * len(per_frame)


def test_no_auto_tuning_without_a_clock() -> None:
    p = Pair(b_config=MuxConfig(initial_window=4 * KiB, max_window=16 * KiB)).handshake()
    sid = p.a.open_stream()
    p.a.send_data(sid, b"x" * 64 * KiB)
    assert p.b.rtt is None
    for _ in range(4):
        events = p.to_b()
        assert len(received(events, sid)) == 4 * KiB
        p.b.acknowledge_received_data(sid, 4 * KiB)
        p.to_a()


def test_auto_tuning_growth_never_exceeds_half_the_session_window() -> None:
    session = 64 * KiB
    p = _tuned_pair(initial_window=4 * KiB, max_window=KiB * KiB, session_window=session)
    sids = [p.a.open_stream() for _ in range(3)]
    for sid in sids:
        p.a.send_data(sid, b"x" * KiB * KiB)
    sizes = _rounds(p, sids, 10, [1.0] * 10)
    assert sizes[0] == {sid: 4 * KiB for sid in sids}
    final = sizes[-1]
    assert sizes[-2] == final  # growth has stopped
    growth = sum(final[sid] - 4 * KiB for sid in sids)
    assert growth <= session // 2
    # Half the budget is shared equally among the receiving streams (the other half is
    # headroom while a stream above its share repays; integer division leaves a few bytes).
    assert session // 4 - len(sids) < growth
    assert len(set(final.values())) == 1


# ============================================================================ max frame size


@pytest.mark.parametrize("a_max, b_max", [(4 * KiB, 2 * KiB), (2 * KiB, 4 * KiB), (1 * KiB, 1 * KiB)])
def test_data_frames_never_exceed_the_smaller_max_frame_size(a_max: int, b_max: int) -> None:
    p = Pair(a_config=MuxConfig(max_frame_size=a_max), b_config=MuxConfig(max_frame_size=b_max)).handshake()
    sid = p.open_accepted()
    limit = min(a_max, b_max)
    for sender in (p.a, p.b):
        sender.send_data(sid, b"z" * 10_000)
        sizes = [len(d) for _, _, d in data_frames(sender.data_to_send())]
        assert sum(sizes) == 10_000
        assert max(sizes) == limit


def test_incoming_data_larger_than_our_max_frame_size_is_a_frame_size_error(mode: str) -> None:
    conn = established(config=MuxConfig(max_frame_size=2 * KiB))
    conn.receive_data(open_frame(1))
    assert feed(conn, data_frame(1, b"x" * 2 * KiB), mode)[0].flow_controlled_length == 2 * KiB
    assert_fatal(conn, data_frame(1, b"x" * (2 * KiB + 1)), FrameSizeError, ErrorCode.FRAME_SIZE_ERROR, mode)


# ============================================================================ keepalive


def _quiet_pair(**a_config: Any) -> Pair:
    p = Pair(a_config=MuxConfig(**a_config))
    p.settle(now=0.0)  # handshake, and the first PINGs answered
    assert p.a.rtt == 0.0
    return p


def test_keepalive_pings_after_silence_and_times_out() -> None:
    p = _quiet_pair(keepalive_interval=10.0, keepalive_timeout=30.0)
    sid = p.a.open_stream()
    p.settle(now=0.0)
    assert p.a.next_deadline() == 10.0
    assert p.a.handle_timer(9.9) == [] and p.a.data_to_send() == b""
    assert p.a.handle_timer(10.0) == []
    assert [(t, f) for t, f, _, _ in frames(p.a.data_to_send())] == [(T.PING, 0)]
    assert p.a.next_deadline() == 30.0
    assert p.a.handle_timer(20.0) == [] and p.a.data_to_send() == b""  # one PING at a time
    assert p.a.handle_timer(29.9) == []
    events = p.a.handle_timer(30.0)
    assert reset_summary(events) == [(sid, ErrorCode.TIMEOUT, False)]
    assert of_type(events, ConnectionTerminated)[0].error_code == ErrorCode.TIMEOUT
    assert p.a.terminated and p.a.next_deadline() is None and p.a.handle_timer(99.0) == []


def test_the_pong_moves_the_keepalive_deadline() -> None:
    p = _quiet_pair(keepalive_interval=10.0, keepalive_timeout=30.0)
    p.a.handle_timer(10.0)
    p.to_b(now=10.0)
    (pong,) = p.to_a(now=12.0)
    assert isinstance(pong, PingAcknowledged) and pong.rtt == 2.0 and pong.ping_id >= 1
    assert p.a.next_deadline() == 22.0
    assert p.a.handle_timer(21.0) == [] and p.a.data_to_send() == b""


def test_any_received_bytes_postpone_the_keepalive() -> None:
    p = _quiet_pair(keepalive_interval=10.0, keepalive_timeout=30.0)
    p.b.send_control({"tick": 1})
    p.to_a(now=8.0)
    assert p.a.next_deadline() == 18.0
    assert p.a.handle_timer(17.0) == [] and p.a.data_to_send() == b""


def test_next_deadline_moves_forward_before_the_handshake() -> None:
    conn = MuxConnection(client=True, config=MuxConfig(keepalive_interval=10.0, keepalive_timeout=30.0))
    conn.handle_timer(0.0)
    assert conn.next_deadline() == 30.0  # no PING is possible yet: only the timeout is due
    assert conn.handle_timer(10.0) == []
    assert conn.next_deadline() > 10.0


def test_transport_eof_terminates_and_resets_open_streams() -> None:
    p = Pair().handshake()
    first = p.open_accepted()
    second = p.a.open_stream()
    p.a.end_stream(second)
    events = p.a.receive_data(b"")
    assert reset_summary(events) == [(first, ErrorCode.CANCEL, False), (second, ErrorCode.CANCEL, False)]
    assert events[-1] == ConnectionTerminated(error_code=ErrorCode.CANCEL, message="the transport closed")
    assert p.a.terminated and p.a.open_streams == 0
    assert p.a.receive_data(b"") == []
    with pytest.raises(LocalProtocolError):
        p.a.open_stream()
    with pytest.raises(LocalProtocolError):
        p.a.ping()
    with pytest.raises(LocalProtocolError):
        p.a.send_control({})


def test_half_closed_stream_is_reset_when_the_peer_never_finishes() -> None:
    p = _quiet_pair(half_closed_timeout=5.0, keepalive_interval=100.0, keepalive_timeout=300.0)
    sid = p.open_accepted()
    finished = p.open_accepted()
    p.a.handle_timer(1.0)  # end_stream takes no clock: the last time seen counts
    p.a.end_stream(sid)
    p.a.end_stream(finished)
    p.settle(now=1.0)
    assert p.a.next_deadline() == 6.0
    p.b.end_stream(finished)  # b finishes this one in time
    p.settle(now=2.0)
    assert p.a.handle_timer(5.9) == []
    assert p.a.handle_timer(6.0) == [StreamReset(
        stream_id=sid, error_code=ErrorCode.TIMEOUT, message="half-closed stream timed out", remote=False,
    )]
    out = p.a.data_to_send()
    assert resets_on_wire(out) == {sid: ErrorCode.TIMEOUT}
    assert reset_summary(p.b.receive_data(out)) == [(sid, ErrorCode.TIMEOUT, True)]
    assert p.a.open_streams == 0 and p.b.open_streams == 0
    assert p.a.next_deadline() == 2.0 + 100.0


# ============================================================================ fairness


def _three_busy_streams() -> tuple[Pair, list[int]]:
    p = Pair(b_config=MuxConfig(max_frame_size=KiB)).handshake()
    sids = [p.a.open_stream() for _ in range(3)]
    p.to_b()
    for sid in sids:
        p.a.send_data(sid, b"x" * 5 * KiB)
    return p, sids


def test_data_frames_rotate_among_streams() -> None:
    p, sids = _three_busy_streams()
    out = data_frames(p.a.data_to_send())
    assert [s for s, _, _ in out] == sids * 5
    assert all(len(d) == KiB for _, _, d in out)


def test_control_frames_queued_after_data_leave_before_it() -> None:
    p, sids = _three_busy_streams()
    first = p.a.data_to_send(max_bytes=4 * KiB)
    assert [s for s, _, _ in data_frames(first)] == [sids[0], sids[1], sids[2], sids[0]]
    p.a.ping()
    p.a.send_control({"after": "data"})
    out = frames(p.a.data_to_send())
    assert [t for t, _, _, _ in out[:2]] == [T.PING, T.CONTROL]
    assert all(t is T.DATA for t, _, _, _ in out[2:])
    # The rotation carries on where it stopped.
    assert [s for _, _, s, _ in out[2:5]] == [sids[1], sids[2], sids[0]]


def test_max_bytes_bounds_the_data_payload_per_call() -> None:
    p, sids = _three_busy_streams()
    total = 0
    while True:
        chunk = data_frames(p.a.data_to_send(max_bytes=2500))
        if not chunk:
            break
        payload = sum(len(d) for _, _, d in chunk)
        assert 0 < payload <= 2500
        total += payload
    assert total == 15 * KiB


@pytest.mark.parametrize("key,value", [("initial_window", 1e6), ("send_queue_limit", 65536.0),
                                       ("max_window", True), ("max_streams", "8")])
def test_config_byte_counts_must_be_integers(key, value) -> None:
    # Both builds refuse them the same way (the compiled core holds them in C integers).
    with pytest.raises(TypeError, match=key):
        MuxConfig(**{key: value})


def test_config_out_of_range_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="initial_window"):
        MuxConfig(initial_window=100)
