"""Random and garbled bytes into receive_data: only ProtocolError, with a GOAWAY queued."""
from __future__ import annotations

import struct

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.mux import frames as F
from relay.mux.connection import MuxConfig, MuxConnection
from relay.mux.errors import ProtocolError


def _established_server() -> tuple[MuxConnection, bytes]:
    client = MuxConnection(client=True)
    server = MuxConnection(client=False, config=MuxConfig(max_frame_size=1024, max_metadata_size=512,
                                                          max_control_size=4096))
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    return server, client.data_to_send()


def _goaway_codes(output: bytes) -> list[int]:
    decoder = F.FrameDecoder(1 << 24)
    return [struct.unpack_from(">II", bytes(p))[1] for t, _, _, p in decoder.feed(output) if t == F.FrameType.GOAWAY]


def _feed_expecting_only_protocol_errors(conn: MuxConnection, chunks: list[bytes]) -> None:
    for chunk in chunks:
        try:
            conn.receive_data(chunk)
        except ProtocolError as exc:
            codes = _goaway_codes(conn.data_to_send())
            assert codes == [int(exc.error_code)], (codes, exc)
            assert conn.terminated
            assert conn.receive_data(b"more") == []  # a dead session ignores input
            return


frame_header = st.builds(
    lambda t, f, s, payload: F.encode_frame(t, f, s, payload),
    st.integers(0, 9).map(lambda t: min(t, 8)),
    st.integers(0, 3),
    st.sampled_from([0, 1, 2, 3, 4, 5, 0xFFFFFFFF]),
    st.one_of(
        st.binary(max_size=64),
        st.builds(msgpack.packb, st.dictionaries(st.text(max_size=4), st.integers(-(2**63), 2**63 - 1), max_size=3)),
        st.integers(0, 2**32 - 1).map(lambda n: struct.pack(">I", n)),
        st.integers(0, 2**64 - 1).map(lambda n: struct.pack(">Q", n)),
    ),
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_random_bytes_before_the_handshake(chunks):
    _feed_expecting_only_protocol_errors(MuxConnection(client=False), chunks)


@SETTINGS
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_random_bytes_after_the_handshake(chunks):
    server, _ = _established_server()
    _feed_expecting_only_protocol_errors(server, chunks)


@SETTINGS
@given(st.lists(frame_header, max_size=12), st.data())
def test_well_formed_frames_with_garbled_contents(frames, data):
    server, _ = _established_server()
    wire = b"".join(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=5)))
    pieces, last = [], 0
    for cut in cuts + [len(wire)]:
        pieces.append(wire[last:cut])
        last = cut
    _feed_expecting_only_protocol_errors(server, [p for p in pieces if p])


def test_a_known_violation_queues_goaway_with_its_code():
    server, _ = _established_server()
    try:
        server.receive_data(F.encode_frame(F.FrameType.DATA, 0, 2, b"x" * 2000))
    except ProtocolError as exc:
        assert _goaway_codes(server.data_to_send()) == [int(exc.error_code)]
        assert exc.error_code == 5  # FRAME_SIZE_ERROR: larger than the advertised 1024
    else:
        raise AssertionError("an oversized DATA frame was accepted")
