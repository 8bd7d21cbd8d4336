"""Pure-Python WebSocket framing (RFC 6455): the twin of the compiled ``ext/_framing.pyx``.

Sans-IO: bytes in, messages out; bytes out from ``encode_frame``. Both twins must behave
identically on every input (same messages, same errors with the same close codes and
messages); ``tests/mux/test_ws_framing.py`` runs against each. The handshake lives in
``relay/ws/handshake.py``; only the data path is here. No extension (permessage-deflate)
is supported, so every RSV bit must be 0.

The non-hot helpers (``Opcode``, ``CloseCode``, ``WebSocketProtocolError``,
``parse_close``, ``encode_close_payload``) are defined here once and imported by the
compiled module.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from enum import IntEnum
from struct import Struct

__all__ = [
    "CloseCode",
    "FrameParser",
    "Opcode",
    "WebSocketProtocolError",
    "encode_close_payload",
    "encode_frame",
    "encode_frame_parts",
    "encode_header",
    "mask",
    "parse_close",
]


class Opcode(IntEnum):
    """Frame opcodes (RFC 6455 section 5.2). 0x3-0x7 and 0xB-0xF are reserved: an error."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(IntEnum):
    """Close status codes (RFC 6455 section 7.4.1, and the IANA registry for 1012-1014)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS_RECEIVED = 1005  # never on the wire: "the close frame had no code"
    ABNORMAL_CLOSURE = 1006  # never on the wire: "the socket closed without a close frame"
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014


class WebSocketProtocolError(Exception):
    """The peer broke RFC 6455; close the connection with ``close_code``.

    ``close_code`` is 1002 (protocol error), 1007 (invalid UTF-8) or 1009 (message too
    big). After raising it a ``FrameParser`` stays failed: every later ``feed`` raises
    the same error again, so a caller cannot go on parsing from a corrupt position.
    """

    def __init__(self, message: str, close_code: int = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(message, close_code)
        self.message = message
        self.close_code = close_code

    def __str__(self) -> str:
        return f"{self.message} (close code {self.close_code})"


#: Largest payload of a control frame (RFC 6455 section 5.5): it fits the 7-bit length.
MAX_CONTROL_PAYLOAD = 125
_DATA_OPCODES = frozenset((0x0, 0x1, 0x2))
_KNOWN_OPCODES = frozenset((0x0, 0x1, 0x2, 0x8, 0x9, 0xA))

_pack_short = Struct(">BBH").pack
_pack_long = Struct(">BBQ").pack
_unpack_u16 = Struct(">H").unpack_from
_unpack_u64 = Struct(">Q").unpack_from


# --- masking -------------------------------------------------------------------------

#: XOR tables for bytes.translate: _XOR_TABLES[k] maps every byte b to b ^ k.
_XOR_TABLES = [bytes(b ^ k for b in range(256)) for k in range(256)]
#: Below this size one big-integer XOR is fastest; above it the four strided
#: bytes.translate calls win (measured: 2x faster at 64 KiB, 2x slower at 64 B).
_TRANSLATE_THRESHOLD = 1024


def mask(data: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """Return ``data`` XORed with the 4-byte ``key`` repeated (RFC 6455 section 5.3).

    Masking and unmasking are the same operation.
    """
    if len(key) != 4:
        raise ValueError("a masking key is exactly 4 bytes")
    n = len(data)
    if n < _TRANSLATE_THRESHOLD:
        if not n:
            return b""
        stream = (key * (n // 4 + 1))[:n]
        return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(
            n, "little")
    out = bytearray(data)
    for i in range(4):
        out[i::4] = out[i::4].translate(_XOR_TABLES[key[i]])
    return bytes(out)


_mask = mask  # encode_frame's ``mask`` argument hides the function's name inside it


# Masking keys come from the kernel CSPRNG, as RFC 6455 section 5.3 demands ("derived from
# a strong source of entropy" so no script can predict them), but are fetched 1024 at a
# time: os.urandom(4) per frame costs ~0.9 us, more than encoding a small frame. The pool
# is thrown away in a forked child so parent and child never reuse each other's keys.
_KEY_POOL_SIZE = 4096
_key_pool = b""
_key_pos = 0


def _reset_key_pool() -> None:
    global _key_pool, _key_pos
    _key_pool = b""
    _key_pos = 0


os.register_at_fork(after_in_child=_reset_key_pool)


def _next_key() -> bytes:
    global _key_pool, _key_pos
    if _key_pos >= len(_key_pool):
        _key_pool = os.urandom(_KEY_POOL_SIZE)
        _key_pos = 0
    key = _key_pool[_key_pos:_key_pos + 4]
    _key_pos += 4
    return key


# --- encoding ------------------------------------------------------------------------

def _check_frame(opcode: int, length: int, fin: bool) -> None:
    if opcode not in _KNOWN_OPCODES:
        raise ValueError(f"unknown WebSocket opcode {opcode!r}")
    if opcode >= 0x8:
        if length > MAX_CONTROL_PAYLOAD:
            raise ValueError(f"control frame payload of {length} bytes exceeds 125")
        if not fin:
            raise ValueError("control frames cannot be fragmented")


def _header(opcode: int, length: int, fin: bool, mask_bit: int) -> bytes:
    first = opcode | 0x80 if fin else opcode
    if length < 126:
        return bytes((first, mask_bit | length))
    if length < 0x10000:
        return _pack_short(first, mask_bit | 126, length)
    return _pack_long(first, mask_bit | 127, length)


def encode_header(opcode: int, length: int, fin: bool = True) -> bytes:
    """Return the header of an unmasked (server-to-client) frame of ``length`` bytes.

    Lets a server send a large payload without copying it:
    ``transport.writelines([encode_header(Opcode.BINARY, len(p)), p])``.
    """
    _check_frame(opcode, length, fin)
    return _header(opcode, length, fin, 0)


def encode_frame(opcode: int, payload: bytes | bytearray | memoryview, mask: bool = False,
                 fin: bool = True) -> bytes:
    """Return one whole frame. ``mask=True`` (client-to-server) masks with a fresh key.

    ``fin=False`` starts or continues a fragmented message (send the later fragments
    with ``Opcode.CONTINUATION``). Raises ValueError for an unknown opcode or an
    oversized or fragmented control frame.
    """
    n = len(payload)
    _check_frame(opcode, n, fin)
    if mask:
        key = _next_key()
        return _header(opcode, n, fin, 0x80) + key + _mask(payload, key)
    return _header(opcode, n, fin, 0) + payload


def encode_frame_parts(opcode: int, parts: Iterable[bytes | bytearray | memoryview], mask: bool = False,
                       fin: bool = True) -> bytes:
    """Return one whole frame whose payload is the concatenation of ``parts`` (buffers).

    The compiled twin gathers and masks in one pass; here it is a join and
    :func:`encode_frame`.
    """
    return encode_frame(opcode, b"".join(parts), mask, fin)


# --- close frames --------------------------------------------------------------------

_LOCAL_ONLY_CODES = frozenset((1004, 1005, 1006, 1015))


def parse_close(payload: bytes | bytearray | memoryview) -> tuple[int, str]:
    """Return ``(code, reason)`` of a close frame's payload; (1005, "") when it is empty.

    Raises WebSocketProtocolError (1002) for a 1-byte payload or a code that may not be
    sent (RFC 6455 section 7.4), and (1007) for a reason that is not UTF-8.
    """
    if not payload:
        return CloseCode.NO_STATUS_RECEIVED, ""
    if len(payload) == 1:
        raise WebSocketProtocolError("close frame with a 1-byte payload")
    code = (payload[0] << 8) | payload[1]
    if not (1000 <= code < 5000) or code in _LOCAL_ONLY_CODES or (
            code < 3000 and code not in CloseCode._value2member_map_):
        raise WebSocketProtocolError(f"close frame with invalid code {code}")
    try:
        reason = bytes(payload[2:]).decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketProtocolError(
            "close reason is not valid UTF-8", CloseCode.INVALID_PAYLOAD) from None
    return code, reason


def encode_close_payload(code: int | None = None, reason: str = "") -> bytes:
    """Return a close frame payload: the code and the reason cut to fit 125 bytes.

    ``code=None`` gives an empty payload (no status). The reason is cut on a character
    boundary so the result stays valid UTF-8.
    """
    if code is None:
        if reason:
            raise ValueError("a close reason needs a close code")
        return b""
    if not (1000 <= code < 5000) or code in _LOCAL_ONLY_CODES:
        raise ValueError(f"close code {code} may not be sent")
    data = reason.encode("utf-8")[:MAX_CONTROL_PAYLOAD - 2]
    # Drop a multi-byte character the cut split in half.
    data = data.decode("utf-8", "ignore").encode("utf-8")
    return code.to_bytes(2, "big") + data


# --- parsing -------------------------------------------------------------------------

class FrameParser:
    """Turn a byte stream into whole messages: ``feed(data) -> [(opcode, payload), ...]``.

    Data messages (TEXT, BINARY) come out once their last fragment arrives, with the
    fragments joined and the opcode of the first; control frames (CLOSE, PING, PONG) come
    out at once, even between the fragments of a data message. Payloads are unmasked
    ``bytes``; a CLOSE payload can be read with ``parse_close``.

    ``require_mask=True`` is the server side (every client frame must be masked);
    ``False`` the client side (a masked server frame is an error). A data message longer
    than ``max_message_size`` is refused from its frame header, before its payload is
    buffered, so at most one frame of at most ``max_message_size`` bytes (plus a 14-byte
    header) is ever held. TEXT messages must be valid UTF-8.

    Errors raise WebSocketProtocolError; checks run in this order, in both twins:
    RSV bits, opcode, control frame FIN and length, mask bit, fragmentation state,
    64-bit length top bit, message size, then (on a whole message) UTF-8.
    """

    def __init__(self, max_message_size: int, require_mask: bool) -> None:
        if max_message_size < 0:
            raise ValueError("max_message_size cannot be negative")
        self.max_message_size = max_message_size
        self.require_mask = require_mask
        # Received bytes not yet parsed, as a list so byte-by-byte feeding stays linear:
        # they are joined only once ``_need`` bytes (the next parse step) are present.
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._need = 2
        # The data message being reassembled from fragments (opcode 0 = none).
        self._message_opcode = 0
        self._fragments: list[bytes] = []
        self._message_size = 0
        self._error: WebSocketProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return self._pending_len

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
        """Consume ``data``; return every message it completes, in order."""
        if self._error is not None:
            raise WebSocketProtocolError(self._error.message, self._error.close_code)
        if type(data) is not bytes:
            data = bytes(data)
        try:
            return self._feed(data)
        except WebSocketProtocolError as exc:
            self._error = exc
            self._pending = []
            self._pending_len = 0
            self._fragments = []
            raise

    def _feed(self, data: bytes) -> list[tuple[int, bytes]]:
        messages: list[tuple[int, bytes]] = []
        pos = 0
        end = len(data)
        # First finish the partial frame held back, joining only the prefix of ``data``
        # it needs, so the rest of ``data`` is parsed in place instead of being copied.
        while self._pending:
            if self._pending_len + end - pos < self._need:
                self._pending.append(data[pos:] if pos else data)
                self._pending_len += end - pos
                return messages
            take = self._need - self._pending_len
            self._pending.append(data[pos:pos + take])
            pos += take
            buf = b"".join(self._pending)
            used = self._parse(buf, 0, messages)
            if used < len(buf):
                self._pending = [buf[used:] if used else buf]
                self._pending_len = len(buf) - used
            else:
                self._pending = []
                self._pending_len = 0
        used = self._parse(data, pos, messages)
        if used < end:
            self._pending = [data[used:]]
            self._pending_len = end - used
        return messages

    def _parse(self, buf: bytes, pos: int, messages: list[tuple[int, bytes]]) -> int:
        """Parse whole frames from ``buf[pos:]``; return where the first partial one starts.

        Sets ``_need`` to the bytes (from that position) the next step requires.
        """
        end = len(buf)
        max_size = self.max_message_size
        while True:
            if end - pos < 2:
                self._need = 2
                return pos
            first = buf[pos]
            second = buf[pos + 1]
            opcode = first & 0x0F
            fin = first & 0x80
            if first & 0x70:
                raise WebSocketProtocolError("reserved bits set in frame header")
            if opcode not in _KNOWN_OPCODES:
                raise WebSocketProtocolError(f"unknown opcode {opcode:#x}")
            length = second & 0x7F
            if opcode >= 0x8:
                if not fin:
                    raise WebSocketProtocolError("fragmented control frame")
                if length > MAX_CONTROL_PAYLOAD:
                    raise WebSocketProtocolError("control frame payload exceeds 125 bytes")
            masked = second & 0x80
            if masked and not self.require_mask:
                raise WebSocketProtocolError("masked frame from the server")
            if not masked and self.require_mask:
                raise WebSocketProtocolError("unmasked frame from the client")
            if opcode == 0x0:
                if not self._message_opcode:
                    raise WebSocketProtocolError("continuation frame outside a message")
            elif opcode < 0x8 and self._message_opcode:
                raise WebSocketProtocolError("new data frame inside a fragmented message")

            header = 2
            if length == 126:
                header = 4
            elif length == 127:
                header = 10
            if masked:
                header += 4
            if end - pos < header:
                self._need = header
                return pos
            if length == 126:
                length = _unpack_u16(buf, pos + 2)[0]
            elif length == 127:
                length = _unpack_u64(buf, pos + 2)[0]
                if length >> 63:
                    raise WebSocketProtocolError("64-bit frame length has its top bit set")
            if opcode < 0x8 and self._message_size + length > max_size:
                raise WebSocketProtocolError(
                    f"message of more than {max_size} bytes", CloseCode.MESSAGE_TOO_BIG)
            start = pos + header
            stop = start + length
            if stop > end:
                self._need = stop - pos
                return pos

            if masked:
                payload = _mask(buf[start:stop], buf[start - 4:start])
            else:
                payload = buf[start:stop]
            pos = stop

            if opcode >= 0x8:
                messages.append((opcode, payload))
            elif fin:
                if opcode:
                    message_opcode = opcode
                else:
                    self._fragments.append(payload)
                    payload = b"".join(self._fragments)
                    message_opcode = self._message_opcode
                    self._fragments = []
                    self._message_opcode = 0
                    self._message_size = 0
                if message_opcode == 0x1:
                    _check_utf8(payload)
                messages.append((message_opcode, payload))
            else:
                if opcode:
                    self._message_opcode = opcode
                self._fragments.append(payload)
                self._message_size += length


def _check_utf8(payload: bytes) -> None:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketProtocolError(
            "text message is not valid UTF-8", CloseCode.INVALID_PAYLOAD) from None
