"""WebSocket data-path micro benchmarks: compiled vs pure twin vs wsproto's frame layer.

Run: ``.venv/bin/python -m pytest bench/bench_ws.py --benchmark-only``
(add ``--benchmark-json=out.json`` to keep the numbers). Each benchmark records in
``extra_info`` how many frames and payload bytes one round handles, so frames/s and MB/s
are ``frames / median`` and ``bytes / median``.
"""
from __future__ import annotations

import importlib
import os

import pytest
from wsproto.frame_protocol import FrameProtocol, XorMaskerSimple

IMPLEMENTATIONS = ["c", "py", "wsproto"]
MODULES = {"c": "relay.ws._framing", "py": "relay.ws._framing_py"}
BINARY = 0x2
KEY = bytes.fromhex("37fa213d")


def framing(impl: str):
    return importlib.import_module(MODULES[impl])


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request) -> str:
    if request.param == "c" and os.environ.get("RELAY_NO_EXTENSIONS"):
        pytest.skip("RELAY_NO_EXTENSIONS is set")
    return request.param


@pytest.mark.parametrize("size", [64, 64 * 1024], ids=["64B", "64KiB"])
def test_mask(benchmark, impl, size):
    data = os.urandom(size)
    benchmark.extra_info.update(frames=1, bytes=size)
    if impl == "wsproto":
        benchmark(lambda: XorMaskerSimple(KEY).process(bytearray(data)))
    else:
        benchmark(framing(impl).mask, data, KEY)


# (frame payload size, frames per round): about 64 KiB and 1 MiB of payload per round.
PARSE_CASES = [(64, 1000), (16 * 1024, 64)]


@pytest.mark.parametrize("size, count", PARSE_CASES, ids=["64B", "16KiB"])
def test_parse_masked(benchmark, impl, size, count):
    """Server side: a buffer of masked client frames in, unmasked messages out."""
    payload = os.urandom(size)
    wire = b"".join(framing("py").encode_frame(BINARY, payload, mask=True)
                    for _ in range(count))
    benchmark.extra_info.update(frames=count, bytes=size * count)
    if impl == "wsproto":
        def parse():
            protocol = FrameProtocol(client=False, extensions=[])
            protocol.receive_bytes(wire)
            return list(protocol.received_frames())
    else:
        parser_class = framing(impl).FrameParser

        def parse():
            return parser_class(1 << 20, True).feed(wire)
    frames = benchmark(parse)
    assert len(frames) == count


@pytest.mark.parametrize("size, count", PARSE_CASES, ids=["64B", "16KiB"])
def test_encode_masked(benchmark, impl, size, count):
    """Client side: encode (and mask) a batch of binary frames."""
    payload = os.urandom(size)
    benchmark.extra_info.update(frames=count, bytes=size * count)
    if impl == "wsproto":
        protocol = FrameProtocol(client=True, extensions=[])

        def encode():
            return [protocol.send_data(payload) for _ in range(count)]
    else:
        encode_frame = framing(impl).encode_frame

        def encode():
            return [encode_frame(BINARY, payload, True) for _ in range(count)]
    benchmark(encode)
