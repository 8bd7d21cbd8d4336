"""The frame codec, both twins: round trips, split input, limits, and agreement."""
from __future__ import annotations

import importlib
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.mux import _codec_py
from relay.mux.errors import FrameSizeError, ProtocolError

PURE = bool(os.environ.get("RELAY_NO_EXTENSIONS"))


def _codecs():
    params = [pytest.param(_codec_py, id="pure")]
    if PURE:
        params.append(pytest.param(None, id="compiled", marks=pytest.mark.skip("RELAY_NO_EXTENSIONS=1")))
    else:  # a missing compiled module must fail, not skip
        params.append(pytest.param(importlib.import_module("relay.mux._codec"), id="compiled"))
    return params


CODECS = _codecs()
FRAMES = [
    (0, 0, 1, b""),
    (0, 1, 3, b"hello"),
    (1, 0, 0, struct.pack(">I", 65536)),
    (2, 0, 0xFFFFFFFF, b"\x80"),
    (8, 0xFFFF, 7, b"z" * 4095),
    (0, 0, 9, bytes(range(256)) * 16),  # 4096: the first zero-copy size
    (0, 0, 11, b"q" * 70000),
]


def _wire(codec, frames=FRAMES):
    return b"".join(codec.encode_frame(*frame) for frame in frames)


def _normalise(frames):
    return [(t, f, s, bytes(p)) for t, f, s, p in frames]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("mode", ["whole", "bytewise", "trailing"])
def test_round_trip(codec, mode):
    wire = _wire(codec)
    decoder = codec.FrameDecoder(1 << 20)
    if mode == "whole":
        out = decoder.feed(wire)
    elif mode == "bytewise":
        out = []
        for i in range(len(wire)):
            out += decoder.feed(wire[i:i + 1])
    else:  # a partial frame trails the complete ones
        partial = codec.encode_frame(0, 0, 13, b"tail-data")
        out = decoder.feed(wire + partial[:7])
        assert decoder.buffered == 7
        out += decoder.feed(partial[7:])
        out = out[:-1] if _normalise(out[-1:]) == [(0, 0, 13, b"tail-data")] else out
    assert _normalise(out) == FRAMES
    assert decoder.buffered == 0


@pytest.mark.parametrize("codec", CODECS)
def test_large_payloads_are_zero_copy_views_small_ones_bytes(codec):
    out = codec.FrameDecoder(1 << 20).feed(_wire(codec))
    for (_, _, _, payload) in out:
        if len(payload) >= codec.ZERO_COPY_THRESHOLD:
            assert isinstance(payload, memoryview) and payload.readonly
        else:
            assert type(payload) is bytes


@pytest.mark.parametrize("codec", CODECS)
def test_header_layout_is_big_endian_bbhii(codec):
    assert codec.encode_header(3, 0x0102, 0x0A0B0C0D, 0x01020304) == bytes(
        [1, 3, 1, 2, 0x0A, 0x0B, 0x0C, 0x0D, 1, 2, 3, 4])
    assert codec.encode_frame(0, 1, 5, b"ab") == codec.encode_header(0, 1, 5, 2) + b"ab"
    assert codec.encode_frame(0, 0, 5, memoryview(b"xyz")) == codec.encode_header(0, 0, 5, 3) + b"xyz"


@pytest.mark.parametrize("codec", CODECS)
def test_oversized_frame_is_refused_before_buffering(codec):
    decoder = codec.FrameDecoder(1000)
    with pytest.raises(FrameSizeError):
        decoder.feed(codec.encode_header(0, 0, 1, 1001))
    assert decoder.buffered == 0


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("header", [bytes([2, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]),  # version 2
                                    bytes([1, 9, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0])])  # type 9
def test_bad_version_or_type_is_a_protocol_error(codec, header):
    with pytest.raises(ProtocolError):
        codec.FrameDecoder(1000).feed(header)


@pytest.mark.parametrize("codec", CODECS)
def test_out_of_range_header_fields_raise(codec):
    with pytest.raises(struct.error):
        codec.encode_header(0, 0, 1 << 32, 0)
    with pytest.raises(struct.error):
        codec.encode_header(0, 1 << 16, 1, 0)


@pytest.mark.parametrize("codec", CODECS)
def test_mutable_input_is_not_aliased(codec):
    buffer = bytearray(codec.encode_frame(0, 0, 1, b"x" * 5000))
    (frame,) = codec.FrameDecoder(1 << 20).feed(buffer)
    buffer[20:30] = b"y" * 10
    assert bytes(frame[3]) == b"x" * 5000


@pytest.mark.skipif(PURE, reason="compares the compiled twin with the pure one")
@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(1, 50), max_size=20))
def test_twins_agree_on_any_input(data, cuts):
    compiled = importlib.import_module("relay.mux._codec")
    results = []
    for codec in (_codec_py, compiled):
        decoder, out, error = codec.FrameDecoder(300), [], None
        pos = 0
        try:
            for cut in cuts + [len(data)]:
                out += decoder.feed(data[pos:pos + cut])
                pos += cut
        except ProtocolError as exc:
            error = (type(exc), str(exc))
        results.append((_normalise(out), error, decoder.buffered if error is None else None))
    assert results[0] == results[1]
