"""RFC 6455 framing: both twins (pure ``py`` and compiled ``c``) run every test.

The compiled param is skipped only when RELAY_NO_EXTENSIONS is set; otherwise a missing
compiled module fails, so a silently broken build cannot pass as "pure only".
"""
from __future__ import annotations

import importlib
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol

NO_EXTENSIONS = bool(os.environ.get("RELAY_NO_EXTENSIONS"))
PURE = "relay.ws._framing_py"
COMPILED = "relay.ws._framing"
IMPLEMENTATIONS = [
    pytest.param(PURE, id="py"),
    pytest.param(COMPILED, id="c", marks=pytest.mark.skipif(
        NO_EXTENSIONS, reason="RELAY_NO_EXTENSIONS is set")),
]

TEXT, BINARY, CLOSE, PING, PONG, CONT = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0
MiB = 1 << 20
HYPOTHESIS = settings(max_examples=150, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture,
                                             HealthCheck.too_slow])


@pytest.fixture(params=IMPLEMENTATIONS)
def ws(request):
    return importlib.import_module(request.param)


def payload_of(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def feed_whole(parser, data):
    return parser.feed(data)


def feed_bytewise(parser, data):
    out = []
    for i in range(len(data)):
        out += parser.feed(data[i:i + 1])
    return out


def feed_with_trailing(parser, data):
    # The first bytes of a further frame must stay buffered, not disturb the messages.
    trailing = b"\x82\xfe\x01" if parser.require_mask else b"\x82\x7e\x01"
    out = parser.feed(data + trailing)
    assert parser.buffered == len(trailing)
    return out


FEEDS = [feed_whole, feed_bytewise, feed_with_trailing]


def normalize(messages):
    return [(opcode, bytes(payload)) for opcode, payload in messages]


# --- the selector --------------------------------------------------------------------

def test_selector_uses_compiled_module_unless_disabled():
    import relay.ws

    assert relay.ws.COMPILED is (not NO_EXTENSIONS)
    expected = PURE if NO_EXTENSIONS else COMPILED
    assert relay.ws.FrameParser.__module__ == expected
    assert relay.ws.WebSocketProtocolError is importlib.import_module(PURE).WebSocketProtocolError


# --- RFC 6455 section 5.7 examples ---------------------------------------------------

RFC_EXAMPLES = [
    (bytes.fromhex("810548656c6c6f"), False, [(TEXT, b"Hello")]),
    (bytes.fromhex("818537fa213d7f9f4d5158"), True, [(TEXT, b"Hello")]),
    (bytes.fromhex("010348656c80026c6f"), False, [(TEXT, b"Hello")]),
    (bytes.fromhex("890548656c6c6f"), False, [(PING, b"Hello")]),
    (bytes.fromhex("8a8537fa213d7f9f4d5158"), True, [(PONG, b"Hello")]),
    (bytes.fromhex("827e0100") + bytes(256), False, [(BINARY, bytes(256))]),
    (bytes.fromhex("827f0000000000010000") + bytes(65536), False, [(BINARY, bytes(65536))]),
]


@pytest.mark.parametrize("raw, masked, expected", RFC_EXAMPLES, ids=[
    "text", "masked-text", "fragmented", "ping", "masked-pong", "256-bytes", "64-KiB"])
@pytest.mark.parametrize("feed", FEEDS)
def test_rfc_examples(ws, raw, masked, expected, feed):
    assert normalize(feed(ws.FrameParser(MiB, masked), raw)) == expected


def test_encoder_matches_rfc_examples(ws):
    assert ws.encode_frame(TEXT, b"Hello") == bytes.fromhex("810548656c6c6f")
    assert ws.encode_frame(TEXT, b"Hel", fin=False) + ws.encode_frame(CONT, b"lo") == \
        bytes.fromhex("010348656c80026c6f")
    assert ws.encode_frame(BINARY, bytes(256))[:4] == bytes.fromhex("827e0100")
    assert ws.encode_frame(BINARY, bytes(65536))[:10] == bytes.fromhex("827f0000000000010000")
    assert ws.encode_header(BINARY, 65536) == bytes.fromhex("827f0000000000010000")
    assert ws.encode_header(BINARY, 65535, fin=False) == bytes.fromhex("027effff")
    assert ws.mask(b"Hello", bytes.fromhex("37fa213d")) == bytes.fromhex("7f9f4d5158")


# --- round trips ---------------------------------------------------------------------

@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("feed", FEEDS)
@pytest.mark.parametrize("opcode, payload", [
    (TEXT, "héllo wörld ✓".encode()), (BINARY, b"\x00\xff" * 40), (PING, b"ping!"),
    (PONG, b""), (CLOSE, b"\x03\xe8bye"), (TEXT, b""), (BINARY, b""),
])
def test_round_trip_every_opcode(ws, opcode, payload, masked, feed):
    frame = ws.encode_frame(opcode, payload, mask=masked)
    assert bool(frame[1] & 0x80) is masked
    assert normalize(feed(ws.FrameParser(MiB, masked), frame)) == [(opcode, payload)]


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("feed", FEEDS)
@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, MiB])
def test_round_trip_sizes(ws, size, masked, feed):
    # Byte-by-byte feeding of 1 MiB also guards linearity: re-joining the pending bytes
    # on every call would copy ~500 GB and time out.
    payload = payload_of(size, size)
    frame = ws.encode_frame(BINARY, payload, mask=masked)
    header = 2 if size < 126 else 4 if size < 65536 else 10
    assert len(frame) == header + (4 if masked else 0) + size
    assert normalize(feed(ws.FrameParser(MiB, masked), frame)) == [(BINARY, payload)]


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_accepts_any_bytes_like_input(ws, masked):
    frame = ws.encode_frame(BINARY, bytearray(b"abc"), mask=masked)
    frame += ws.encode_frame(BINARY, memoryview(b"defg"), mask=masked)
    parser = ws.FrameParser(100, masked)
    out = parser.feed(bytearray(frame[:5])) + parser.feed(memoryview(frame)[5:])
    assert normalize(out) == [(BINARY, b"abc"), (BINARY, b"defg")]


def test_payloads_are_bytes(ws):
    parser = ws.FrameParser(MiB, False)
    out = parser.feed(ws.encode_frame(BINARY, b"x" * 70000) + ws.encode_frame(PING, b"p"))
    assert [type(p) for _, p in out] == [bytes, bytes]


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("feed", FEEDS)
def test_fragmented_message_with_interleaved_control_frames(ws, masked, feed):
    text = "zwölf Boxkämpfer ✓".encode()
    cut1, cut2 = 5, 7  # 7 splits the two bytes of "ö": fine as long as the whole is UTF-8
    data = b"".join([
        ws.encode_frame(TEXT, text[:cut1], mask=masked, fin=False),
        ws.encode_frame(PING, b"1", mask=masked),
        ws.encode_frame(CONT, text[cut1:cut2], mask=masked, fin=False),
        ws.encode_frame(PONG, b"2", mask=masked),
        ws.encode_frame(CONT, b"", mask=masked, fin=False),
        ws.encode_frame(CONT, text[cut2:], mask=masked),
        ws.encode_frame(BINARY, b"a", mask=masked, fin=False),
        ws.encode_frame(CONT, b"b", mask=masked),
        ws.encode_frame(CLOSE, b"\x03\xe8", mask=masked),
    ])
    assert normalize(feed(ws.FrameParser(MiB, masked), data)) == [
        (PING, b"1"), (PONG, b"2"), (TEXT, text), (BINARY, b"ab"), (CLOSE, b"\x03\xe8")]


def test_many_messages_in_one_feed(ws):
    payloads = [payload_of(n, n) for n in range(300)]
    data = b"".join(ws.encode_frame(BINARY, p, mask=True) for p in payloads)
    parser = ws.FrameParser(MiB, True)
    assert normalize(parser.feed(data)) == [(BINARY, p) for p in payloads]
    assert parser.buffered == 0


def test_size_limit_is_inclusive(ws):
    parser = ws.FrameParser(10, False)
    data = ws.encode_frame(BINARY, b"12345", fin=False) + ws.encode_frame(CONT, b"67890")
    assert normalize(parser.feed(data)) == [(BINARY, b"1234567890")]
    # The count restarts with each message.
    assert normalize(parser.feed(data)) == [(BINARY, b"1234567890")]


def test_masking_keys_are_fresh(ws):
    keys = {ws.encode_frame(BINARY, b"", mask=True)[2:6] for _ in range(3000)}
    assert len(keys) > 2990  # spans several refills of the key pool


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_does_not_reuse_parent_keys(ws):
    ws.encode_frame(BINARY, b"", mask=True)  # make sure the pool is filled before forking
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.write(write_end, ws.encode_frame(BINARY, b"", mask=True)[2:6])
        os._exit(0)
    os.close(write_end)
    child_key = os.read(read_end, 4)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(child_key) == 4
    assert child_key != ws.encode_frame(BINARY, b"", mask=True)[2:6]


# --- masking -------------------------------------------------------------------------

def reference_mask(data: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


@pytest.mark.parametrize("size", [*range(0, 20), 63, 64, 65, 1023, 1024, 1025, 65536 + 3])
def test_mask_matches_reference(ws, size):
    data, key = payload_of(size, 1), bytes.fromhex("a1b2c3d4")
    masked = ws.mask(data, key)
    assert type(masked) is bytes
    assert masked == reference_mask(data, key)
    assert ws.mask(masked, key) == data
    assert ws.mask(bytearray(data), bytearray(key)) == masked
    assert ws.mask(memoryview(data), key) == masked


@pytest.mark.parametrize("key", [b"", b"abc", b"abcde"])
def test_mask_needs_a_4_byte_key(ws, key):
    with pytest.raises(ValueError):
        ws.mask(b"data", key)


# --- encoder errors ------------------------------------------------------------------

@pytest.mark.parametrize("opcode, payload, fin", [
    (3, b"", True), (0xB, b"", True), (0x10, b"", True), (-1, b"", True),
    (PING, bytes(126), True), (CLOSE, bytes(200), True), (PONG, b"", False),
])
def test_encoder_refuses_invalid_frames(ws, opcode, payload, fin):
    with pytest.raises(ValueError):
        ws.encode_frame(opcode, payload, fin=fin)
    with pytest.raises(ValueError):
        ws.encode_header(opcode, len(payload), fin=fin)


def test_encoder_refuses_text_str(ws):
    with pytest.raises(TypeError):
        ws.encode_frame(TEXT, "not bytes")


# --- parser errors -------------------------------------------------------------------

def unmasked(first: int, payload: bytes = b"") -> bytes:
    return bytes((first, len(payload))) + payload


ERRORS = [
    # (name, require_mask, data, close code, message fragment)
    ("rsv1", False, unmasked(0xC2, b"x"), 1002, "reserved bits"),
    ("rsv2", False, unmasked(0xA2, b"x"), 1002, "reserved bits"),
    ("rsv3", False, unmasked(0x92, b"x"), 1002, "reserved bits"),
    *[(f"opcode-{op:#x}", False, unmasked(0x80 | op), 1002, "unknown opcode")
      for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)],
    ("fragmented-ping", False, unmasked(PING, b"x"), 1002, "fragmented control"),
    ("fragmented-close", False, unmasked(CLOSE), 1002, "fragmented control"),
    ("long-ping-16bit", False, bytes((0x89, 126, 0, 126)) + bytes(126), 1002, "exceeds 125"),
    ("long-pong-64bit", False, bytes((0x8A, 127)) + (200).to_bytes(8, "big"), 1002,
     "exceeds 125"),
    ("unmasked-client", True, unmasked(0x82, b"x"), 1002, "unmasked frame"),
    ("masked-server", False, bytes((0x82, 0x81)) + b"keyX", 1002, "masked frame"),
    ("masked-server-ping", False, bytes((0x89, 0x80)) + b"key!", 1002, "masked frame"),
    ("lone-continuation", False, unmasked(0x80, b"x"), 1002, "continuation frame outside"),
    ("data-inside-fragments", False, unmasked(0x02, b"a") + unmasked(0x82, b"b"), 1002,
     "inside a fragmented"),
    ("text-inside-fragments", False, unmasked(0x01, b"a") + unmasked(0x01, b"b"), 1002,
     "inside a fragmented"),
    ("top-bit-length", False, bytes((0x82, 127)) + (1 << 63).to_bytes(8, "big"), 1002,
     "top bit"),
    ("too-big-7bit", False, bytes((0x82, 101)), 1009, "more than 100"),
    ("too-big-16bit", False, bytes((0x82, 126, 0x10, 0)), 1009, "more than 100"),
    ("too-big-64bit", False, bytes((0x82, 127)) + (1 << 62).to_bytes(8, "big"), 1009,
     "more than 100"),
    ("too-big-fragments", False, unmasked(0x02, bytes(60)) + bytes((0x80, 41)), 1009,
     "more than 100"),
    ("bad-utf8", False, unmasked(0x81, b"\xff"), 1007, "UTF-8"),
    ("truncated-utf8", False, unmasked(0x81, "ö".encode()[:1]), 1007, "UTF-8"),
    ("bad-utf8-fragments", False, unmasked(0x01, b"ok") + unmasked(0x80, b"\xc3("), 1007,
     "UTF-8"),
]


@pytest.mark.parametrize("feed", [feed_whole, feed_bytewise])
@pytest.mark.parametrize("require_mask, data, code, fragment",
                         [pytest.param(*e[1:], id=e[0]) for e in ERRORS])
def test_protocol_errors(ws, require_mask, data, code, fragment, feed):
    parser = ws.FrameParser(100, require_mask)
    with pytest.raises(ws.WebSocketProtocolError) as info:
        feed(parser, data)
    assert info.value.close_code == code
    assert fragment in info.value.message
    assert str(code) in str(info.value)
    # A failed parser stays failed.
    with pytest.raises(ws.WebSocketProtocolError) as again:
        parser.feed(ws.encode_frame(PING, b"", mask=require_mask))
    assert again.value.close_code == code


def test_too_big_is_refused_before_the_payload_arrives(ws):
    parser = ws.FrameParser(1000, True)
    with pytest.raises(ws.WebSocketProtocolError) as info:
        parser.feed(bytes((0x82, 0xFE, 0x03, 0xE9)) + b"key!")  # header only, 1001 bytes
    assert info.value.close_code == 1009


def test_control_frames_ignore_the_message_size_limit(ws):
    parser = ws.FrameParser(0, False)
    assert normalize(parser.feed(ws.encode_frame(PING, b"x" * 125))) == [(PING, b"x" * 125)]
    assert normalize(parser.feed(ws.encode_frame(BINARY, b""))) == [(BINARY, b"")]


def test_negative_limit_is_refused(ws):
    with pytest.raises(ValueError):
        ws.FrameParser(-1, False)


# --- close payloads ------------------------------------------------------------------

@pytest.mark.parametrize("payload, expected", [
    (b"", (1005, "")),
    (b"\x03\xe8", (1000, "")),
    (b"\x03\xe9going away", (1001, "going away")),
    ((1011).to_bytes(2, "big") + "¡oops!".encode(), (1011, "¡oops!")),
    ((1014).to_bytes(2, "big"), (1014, "")),
    ((3000).to_bytes(2, "big"), (3000, "")),
    ((4999).to_bytes(2, "big") + b"app", (4999, "app")),
])
def test_parse_close(ws, payload, expected):
    assert ws.parse_close(payload) == expected
    assert ws.parse_close(memoryview(payload)) == expected


@pytest.mark.parametrize("payload, code", [
    (b"\x03", 1002),
    *[(c.to_bytes(2, "big"), 1002) for c in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999,
                                             5000, 65535)],
    (b"\x03\xe8\xff", 1007),
])
def test_parse_close_errors(ws, payload, code):
    with pytest.raises(ws.WebSocketProtocolError) as info:
        ws.parse_close(payload)
    assert info.value.close_code == code


def test_encode_close_payload(ws):
    assert ws.encode_close_payload() == b""
    assert ws.encode_close_payload(1000) == b"\x03\xe8"
    long = ws.encode_close_payload(1001, "ö" * 100)  # 200 bytes, cut to 122 (whole chars)
    assert len(long) <= 125
    assert ws.parse_close(long) == (1001, "ö" * 61)
    for bad in ((1005, ""), (1006, ""), (999, ""), (None, "reason without code")):
        with pytest.raises(ValueError):
            ws.encode_close_payload(*bad)


# --- cross-checks against wsproto ----------------------------------------------------

def wsproto_messages(fp: FrameProtocol, data: bytes):
    """Decode with wsproto, joining partial frames into (opcode, bytes) messages."""
    fp.receive_bytes(data)
    out, parts = [], []
    for frame in fp.received_frames():
        if frame.opcode == CLOSE:
            code, reason = frame.payload
            out.append((CLOSE, code, reason))
            continue
        payload = frame.payload.encode() if isinstance(frame.payload, str) else frame.payload
        if frame.opcode in (PING, PONG):
            out.append((int(frame.opcode), bytes(payload)))
            continue
        parts.append(bytes(payload))
        if frame.message_finished:
            out.append((int(frame.opcode), b"".join(parts)))
            parts = []
    return out


def ours_with_close_parsed(ws, messages):
    return [(CLOSE, *ws.parse_close(p)) if op == CLOSE else (op, bytes(p))
            for op, p in messages]


@pytest.mark.parametrize("client_to_server", [True, False], ids=["masked", "unmasked"])
def test_wsproto_encodes_we_decode(ws, client_to_server):
    sender = FrameProtocol(client=client_to_server, extensions=[])
    data = b"".join([
        sender.send_data(b"binary"), sender.send_data("té", fin=False),
        sender.ping(b"p"), sender.send_data("xt"), sender.pong(b""),
        sender.send_data(payload_of(70000)), sender.send_data(b""),
        sender.close(1001, "bye"),
    ])
    parser = ws.FrameParser(MiB, require_mask=client_to_server)
    assert ours_with_close_parsed(ws, parser.feed(bytes(data))) == [
        (BINARY, b"binary"), (PING, b"p"), (TEXT, "téxt".encode()), (PONG, b""),
        (BINARY, payload_of(70000)), (BINARY, b""), (CLOSE, 1001, "bye")]


@pytest.mark.parametrize("client_to_server", [True, False], ids=["masked", "unmasked"])
def test_we_encode_wsproto_decodes(ws, client_to_server):
    m = client_to_server
    data = b"".join([
        ws.encode_frame(BINARY, b"binary", mask=m),
        ws.encode_frame(TEXT, "té".encode(), mask=m, fin=False),
        ws.encode_frame(PING, b"p", mask=m),
        ws.encode_frame(CONT, b"xt", mask=m),
        ws.encode_frame(BINARY, payload_of(70000), mask=m),
        ws.encode_frame(CLOSE, ws.encode_close_payload(1000, "done"), mask=m),
    ])
    receiver = FrameProtocol(client=not client_to_server, extensions=[])
    assert wsproto_messages(receiver, data) == [
        (BINARY, b"binary"), (PING, b"p"), (TEXT, "téxt".encode()),
        (BINARY, payload_of(70000)), (CLOSE, 1000, "done")]


# --- property tests ------------------------------------------------------------------

LENGTHS = st.one_of(st.integers(0, 130), st.sampled_from([65535, 65536, 70000]))


@st.composite
def message_streams(draw):
    """(messages expected, frames as (opcode, payload, fin)) with controls interleaved."""
    expected, frames = [], []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from([TEXT, BINARY, PING, PONG, CLOSE]))
        if kind in (PING, PONG):
            payload = draw(st.binary(max_size=125))
            expected.append((kind, payload))
            frames.append((kind, payload, True))
            continue
        if kind == CLOSE:
            payload = draw(st.sampled_from([b"", b"\x03\xe8", b"\x0b\xb8why"]))
            expected.append((kind, payload))
            frames.append((kind, payload, True))
            continue
        if kind == TEXT:
            payload = draw(st.text(max_size=40)).encode()
        else:
            payload = payload_of(draw(LENGTHS), draw(st.integers(0, 9)))
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
        pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
        for i, piece in enumerate(pieces):
            frames.append((kind if i == 0 else CONT, piece, i == len(pieces) - 1))
            if i < len(pieces) - 1 and draw(st.booleans()):
                ping = draw(st.binary(max_size=10))
                frames.append((PING, ping, True))
                expected.append((PING, ping))
        expected.append((kind, payload))
    return expected, frames


def feed_in_chunks(parser, data, cuts):
    out, last = [], 0
    for cut in sorted(cuts) + [len(data)]:
        out += parser.feed(data[last:cut])
        last = cut
    return out


@HYPOTHESIS
@given(stream=message_streams(), masked=st.booleans(), data=st.data())
def test_random_streams_split_anywhere_round_trip(ws, stream, masked, data):
    expected, frames = stream
    raw = b"".join(ws.encode_frame(op, p, mask=masked, fin=fin) for op, p, fin in frames)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=8))
    parser = ws.FrameParser(MiB, masked)
    assert normalize(feed_in_chunks(parser, raw, cuts)) == expected
    assert parser.buffered == 0


@HYPOTHESIS
@given(stream=message_streams(), masked=st.booleans())
def test_random_streams_agree_with_wsproto(ws, stream, masked):
    expected, frames = stream
    # Both directions: ours -> wsproto and wsproto's bytes (same frames) -> ours.
    raw = b"".join(ws.encode_frame(op, p, mask=masked, fin=fin) for op, p, fin in frames)
    theirs = wsproto_messages(FrameProtocol(client=not masked, extensions=[]), raw)
    close_at = next((i for i, (op, _) in enumerate(expected) if op == CLOSE), None)
    ours = ours_with_close_parsed(ws, expected[:None if close_at is None else close_at + 1])
    assert theirs == ours  # wsproto stops at the first close

    wire = wsproto_wire(frames, masked)
    assert normalize(ws.FrameParser(MiB, masked).feed(wire)) == expected


def wsproto_wire(frames, masked: bool) -> bytes:
    """The same frames, encoded by wsproto."""
    parse_close = importlib.import_module(PURE).parse_close
    sender = FrameProtocol(client=masked, extensions=[])
    out = []
    for op, p, fin, text in _with_text_flag(frames):
        if op == PING:
            out.append(sender.ping(p))
        elif op == PONG:
            out.append(sender.pong(p))
        elif op == CLOSE:
            code, reason = parse_close(p)
            out.append(sender.close(None if code == 1005 else code, reason))
        else:
            out.append(sender.send_data(p.decode() if text else p, fin))
    return bytes(b"".join(out))


def _with_text_flag(frames):
    """Yield frames with whether their message is TEXT (wsproto's send_data needs str).

    Text fragments cut inside a character cannot be sent as str through wsproto, so
    they are rejoined here: the frame boundaries differ but the messages are the same.
    """
    text = False
    pending: list[bytes] = []
    for op, p, fin in frames:
        if op in (TEXT, BINARY):
            text = op == TEXT
        if text and op in (TEXT, CONT):
            pending.append(p)
            if fin:
                yield TEXT, b"".join(pending), True, True
                pending = []
            continue
        yield op, p, fin, text


FRAME_LIKE = st.lists(st.tuples(
    st.integers(0, 255),                      # FIN/RSV/opcode byte
    st.booleans(),                            # mask bit
    st.sampled_from([0, 1, 5, 125, 126, 127]),  # 7-bit length (126/127: extended)
    st.integers(0, (1 << 64) - 1),            # extended length, truncated to its size
    st.binary(max_size=40),                   # the bytes that follow
), max_size=6).map(lambda frames: b"".join(
    bytes((first, (0x80 if m else 0) | n7))
    + (ext.to_bytes(8, "big")[6:] if n7 == 126 else ext.to_bytes(8, "big") if n7 == 127
       else b"")
    + rest for first, m, n7, ext, rest in frames))


def outcome(parser_factory, data, cuts):
    parser = parser_factory()
    try:
        return "ok", normalize(feed_in_chunks(parser, data, cuts)), parser.buffered
    except Exception as exc:  # noqa: BLE001 - the test checks which kind it was
        return "error", type(exc).__name__, getattr(exc, "close_code", None), str(exc)


@HYPOTHESIS
@given(garbage=st.one_of(st.binary(max_size=300), FRAME_LIKE), require_mask=st.booleans(),
       data=st.data())
def test_garbage_raises_only_protocol_errors(ws, garbage, require_mask, data):
    cuts = data.draw(st.lists(st.integers(0, len(garbage)), max_size=5))
    result = outcome(lambda: ws.FrameParser(200, require_mask), garbage, cuts)
    if result[0] == "error":
        assert result[1] == "WebSocketProtocolError", result


@pytest.mark.skipif(NO_EXTENSIONS, reason="needs the compiled twin")
@HYPOTHESIS
@given(garbage=st.one_of(st.binary(max_size=300), FRAME_LIKE), require_mask=st.booleans(),
       data=st.data())
def test_twins_agree_on_any_input(garbage, require_mask, data):
    pure, compiled = importlib.import_module(PURE), importlib.import_module(COMPILED)
    cuts = data.draw(st.lists(st.integers(0, len(garbage)), max_size=5))
    assert outcome(lambda: pure.FrameParser(200, require_mask), garbage, cuts) == \
        outcome(lambda: compiled.FrameParser(200, require_mask), garbage, cuts)
