"""Frame codec speed, compiled against pure Python: frames per second by payload size."""
from __future__ import annotations

import importlib

import pytest

from relay.mux import _codec_py

FRAMES_PER_ROUND = 2000
SIZES = [64, 1024, 16384]


def _implementations():
    impls = [("pure", _codec_py)]
    try:
        impls.insert(0, ("compiled", importlib.import_module("relay.mux._codec")))
    except ImportError:
        pass
    return impls


IMPLS = _implementations()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name,codec", IMPLS, ids=[n for n, _ in IMPLS])
def test_decode(benchmark, record_rate, name, codec, size):
    buffer = codec.encode_frame(0, 0, 1, b"x" * size) * FRAMES_PER_ROUND
    decoder = codec.FrameDecoder(1 << 20)
    frames = benchmark(decoder.feed, buffer)
    assert len(frames) == FRAMES_PER_ROUND
    record_rate(benchmark, f"decode {size} B", name, FRAMES_PER_ROUND, "frames/s")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name,codec", IMPLS, ids=[n for n, _ in IMPLS])
def test_encode(benchmark, record_rate, name, codec, size):
    payload = b"x" * size
    encode = codec.encode_frame

    def run():
        for _ in range(FRAMES_PER_ROUND):
            encode(0, 0, 1, payload)

    benchmark(run)
    record_rate(benchmark, f"encode {size} B", name, FRAMES_PER_ROUND, "frames/s")
