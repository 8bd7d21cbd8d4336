"""``encode_frame_parts``: one frame from a list of buffers, in both twins (the compiled
one gathers and masks in one pass, so the key must continue across parts of any size),
and the mux's ``data_to_send_parts`` it is fed with."""
from __future__ import annotations

import importlib
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.mux.connection import MuxConfig, MuxConnection
from relay.mux.events import DataReceived, StreamOpened

NO_EXTENSIONS = bool(os.environ.get("RELAY_NO_EXTENSIONS"))
IMPLEMENTATIONS = [
    pytest.param("relay.ws._framing_py", id="py"),
    pytest.param("relay.ws._framing", id="c", marks=pytest.mark.skipif(
        NO_EXTENSIONS, reason="RELAY_NO_EXTENSIONS is set")),
]
BINARY = 0x2


@pytest.fixture(params=IMPLEMENTATIONS)
def ws(request):
    return importlib.import_module(request.param)


def _as_buffers(sizes: list[int], seed: int) -> list:
    """Buffers of the given sizes: bytes and (read-only) memoryview slices, as the mux
    hands them out."""
    rng = random.Random(seed)
    parts = []
    for i, size in enumerate(sizes):
        data = rng.randbytes(size + 3)
        parts.append(data[:size] if i % 2 else memoryview(data)[3:3 + size])
    return parts


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), max_size=12), seed=st.integers(0, 1000),
       mask=st.booleans())
def test_a_frame_from_parts_is_the_frame_of_their_concatenation(sizes: list[int], seed: int, mask: bool) -> None:
    for name in ("relay.ws._framing_py",) + (() if NO_EXTENSIONS else ("relay.ws._framing",)):
        ws = importlib.import_module(name)
        parts = _as_buffers(sizes, seed)
        whole = b"".join(bytes(p) for p in parts)
        frame = ws.encode_frame_parts(BINARY, parts, mask=mask)
        parser = ws.FrameParser(1 << 20, mask)
        assert parser.feed(frame) == [(BINARY, whole)]
        if not mask:
            assert frame == ws.encode_frame(BINARY, whole)
        else:  # same header, a 4-byte key, then the payload masked with it
            key = frame[len(frame) - len(whole) - 4:len(frame) - len(whole)]
            assert frame[len(frame) - len(whole):] == ws.mask(whole, key)


def test_large_parts_and_extended_lengths(ws) -> None:
    parts = _as_buffers([70_000, 1, 2, 3, 65_536, 5], seed=7)
    whole = b"".join(bytes(p) for p in parts)
    for mask in (False, True):
        parser = ws.FrameParser(1 << 20, mask)
        assert parser.feed(ws.encode_frame_parts(BINARY, parts, mask=mask)) == [(BINARY, whole)]


def test_control_frame_limits_apply_to_the_total(ws) -> None:
    with pytest.raises(ValueError):
        ws.encode_frame_parts(0x9, [b"x" * 100, b"y" * 26])  # PING of 126 bytes
    assert ws.encode_frame_parts(0x9, [b"x" * 100, b"y" * 25]) == ws.encode_frame(0x9, b"x" * 100 + b"y" * 25)


def test_mux_parts_are_what_data_to_send_would_join() -> None:
    a, b = MuxConnection(client=True, config=MuxConfig(max_frame_size=1024)), MuxConnection(client=False)
    b.receive_data(a.data_to_send())
    a.receive_data(b.data_to_send())
    sid = a.open_stream({"x": 1})
    a.send_data(sid, bytes(range(256)) * 10)  # 2560 bytes: frames of 1024, 1024, 512
    parts = a.data_to_send_parts()
    assert len(parts) > 3 and any(type(p) is memoryview for p in parts)
    events = b.receive_data(b"".join(bytes(p) for p in parts))
    assert isinstance(events[0], StreamOpened)
    assert b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived)) == bytes(range(256)) * 10
    assert a.data_to_send_parts() == [] and a.data_to_send() == b""


def _stream_of_frames(py, rng: random.Random, masked: bool) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Large and small frames (some fragmented, a PING between fragments) as one wire
    stream, and the messages they make."""
    wire, messages = [], []
    for _ in range(6):
        size = rng.choice([0, 3, 125, 126, 4095, 4096, 4097, 5000, 65_535, 65_536, 70_001])
        payload = rng.randbytes(size)
        if rng.random() < 0.3:  # three fragments with a PING in the middle
            a, b = sorted(rng.sample(range(size + 1), 2)) if size > 1 else (0, size)
            wire.append(py.encode_frame(BINARY, payload[:a], mask=masked, fin=False))
            wire.append(py.encode_frame(0x9, b"ping", mask=masked))
            messages.append((0x9, b"ping"))
            wire.append(py.encode_frame(0x0, payload[a:b], mask=masked, fin=False))
            wire.append(py.encode_frame(0x0, payload[b:], mask=masked, fin=True))
        else:
            wire.append(py.encode_frame(BINARY, payload, mask=masked))
        messages.append((BINARY, payload))
    return b"".join(wire), messages


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_large_frames_cut_anywhere_come_out_whole(ws, masked: bool, seed: int) -> None:
    """Frames held back over several reads (the compiled parser assembles the large ones
    straight from the pieces, unmasking on the way), with cuts inside headers, masking
    keys and payloads."""
    py = importlib.import_module("relay.ws._framing_py")
    rng = random.Random(seed)
    wire, expected = _stream_of_frames(py, rng, masked)
    cuts = sorted(rng.sample(range(1, len(wire)), min(len(wire) - 1, rng.choice([3, 20, 200]))))
    cuts += [c + d for c in cuts[:5] for d in (1, 2, 3) if c + d < len(wire)]  # tiny pieces
    cuts = sorted(set(cuts))
    parser = ws.FrameParser(1 << 20, masked)
    got = []
    for start, stop in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        got += parser.feed(wire[start:stop])
    assert got == expected
    assert parser.buffered == 0


def test_an_oversized_message_is_refused_from_its_header_in_pieces(ws) -> None:
    py = importlib.import_module("relay.ws._framing_py")
    frame = py.encode_frame(BINARY, b"z" * 10_000, mask=True)
    parser = ws.FrameParser(9_999, True)
    with pytest.raises(ws.WebSocketProtocolError):
        parser.feed(frame[:1])
        parser.feed(frame[1:5000])
