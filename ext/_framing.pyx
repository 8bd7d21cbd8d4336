# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled WebSocket framing (RFC 6455): the twin of ``relay/ws/_framing_py.py``.

Same API, same behaviour (same messages, same errors in the same order); the tests run
against both. Headers are read and written byte by byte through C pointers, payloads are
copied straight from the receive buffer into new bytes objects, and masking XORs 8 bytes
at a time as one uint64 (unmasking happens during that single copy). The non-hot
helpers (enums, the error type, close payloads) are imported from the pure module so
there is one definition of each.
"""
import os

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

from relay.ws._framing_py import (
    MAX_CONTROL_PAYLOAD,
    CloseCode,
    Opcode,
    WebSocketProtocolError,
    _check_utf8,
    encode_close_payload,
    parse_close,
)

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

cdef enum:
    _MAX_CONTROL = 125
    _MAX_HEADER = 14
    _KEY_POOL_SIZE = 4096
    _MESSAGE_TOO_BIG = 1009
    # A held-back frame at least this large is assembled piece by piece (one copy);
    # smaller ones are joined and parsed (cheaper for a handful of bytes).
    _ASSEMBLE_MIN = 4096


# --- masking -------------------------------------------------------------------------

cdef inline void _xor_into(uint8_t* dst, const uint8_t* src, Py_ssize_t n,
                           const uint8_t* key) noexcept nogil:
    """dst[i] = src[i] ^ key[i % 4]; dst may be src. Eight bytes per step as a uint64."""
    cdef uint32_t key32
    cdef uint64_t key64, word
    cdef Py_ssize_t i = 0
    memcpy(&key32, key, 4)
    # Both halves hold the key's 4 bytes in memory order, whatever the endianness.
    key64 = (<uint64_t>key32 << 32) | key32
    # memcpy in and out is how C spells an unaligned load/store; compilers emit one mov.
    while i + 8 <= n:
        memcpy(&word, src + i, 8)
        word ^= key64
        memcpy(dst + i, &word, 8)
        i += 8
    while i < n:
        dst[i] = src[i] ^ key[i & 3]
        i += 1


def mask(data, key):
    """Return ``data`` XORed with the 4-byte ``key`` repeated (RFC 6455 section 5.3).

    Masking and unmasking are the same operation.
    """
    cdef const uint8_t[::1] view
    cdef const uint8_t* src = NULL
    cdef Py_ssize_t n
    cdef bytes out
    if len(key) != 4:
        raise ValueError("a masking key is exactly 4 bytes")
    if type(key) is not bytes:
        key = bytes(key)
    if type(data) is bytes:
        src = <const uint8_t*>PyBytes_AS_STRING(data)
        n = PyBytes_GET_SIZE(data)
    else:
        view = data
        n = view.shape[0]
        if n:
            src = &view[0]
    out = PyBytes_FromStringAndSize(NULL, n)
    _xor_into(<uint8_t*>PyBytes_AS_STRING(out), src, n,
              <const uint8_t*>PyBytes_AS_STRING(key))
    return out


# Masking keys come from the kernel CSPRNG (RFC 6455 section 5.3: unpredictable, from a
# strong entropy source) but 1024 at a time, since os.urandom(4) per frame would cost
# more than encoding a small frame. A forked child throws the pool away so parent and
# child never share keys. See the pure twin for the same scheme.
cdef bytes _key_pool = b""
cdef Py_ssize_t _key_pos = _KEY_POOL_SIZE


def _reset_key_pool():
    global _key_pos
    _key_pos = _KEY_POOL_SIZE


os.register_at_fork(after_in_child=_reset_key_pool)


cdef const uint8_t* _next_key() except NULL:
    """A pointer to 4 fresh key bytes, valid until the next call."""
    global _key_pool, _key_pos
    cdef const uint8_t* key
    if _key_pos >= _KEY_POOL_SIZE:
        _key_pool = os.urandom(_KEY_POOL_SIZE)
        _key_pos = 0
    key = <const uint8_t*>PyBytes_AS_STRING(_key_pool) + _key_pos
    _key_pos += 4
    return key


# --- encoding ------------------------------------------------------------------------

cdef inline bint _known_opcode(int opcode) noexcept:
    return 0 <= opcode <= 2 or 8 <= opcode <= 10


cdef int _check_frame(int opcode, Py_ssize_t length, bint fin) except -1:
    if not _known_opcode(opcode):
        raise ValueError(f"unknown WebSocket opcode {opcode!r}")
    if opcode >= 8:
        if length > _MAX_CONTROL:
            raise ValueError(f"control frame payload of {length} bytes exceeds 125")
        if not fin:
            raise ValueError("control frames cannot be fragmented")
    return 0


cdef inline Py_ssize_t _write_header(uint8_t* p, int opcode, uint64_t length, bint fin,
                                     uint8_t mask_bit) noexcept:
    cdef int i
    p[0] = (0x80 | opcode) if fin else opcode
    if length < 126:
        p[1] = mask_bit | <uint8_t>length
        return 2
    if length < 0x10000:
        p[1] = mask_bit | 126
        p[2] = <uint8_t>(length >> 8)
        p[3] = <uint8_t>length
        return 4
    p[1] = mask_bit | 127
    for i in range(8):
        p[2 + i] = <uint8_t>(length >> (56 - 8 * i))
    return 10


def encode_header(int opcode, Py_ssize_t length, bint fin=True):
    """Return the header of an unmasked (server-to-client) frame of ``length`` bytes."""
    cdef uint8_t header[_MAX_HEADER]
    cdef Py_ssize_t size
    _check_frame(opcode, length, fin)
    size = _write_header(header, opcode, <uint64_t>length, fin, 0)
    return PyBytes_FromStringAndSize(<char*>header, size)


def encode_frame(int opcode, payload, bint mask=False, bint fin=True):
    """Return one whole frame. ``mask=True`` (client-to-server) masks with a fresh key."""
    cdef const uint8_t[::1] view
    cdef const uint8_t* src = NULL
    cdef const uint8_t* key
    cdef Py_ssize_t n, size
    cdef uint8_t header[_MAX_HEADER]
    cdef bytes out
    cdef uint8_t* p
    if type(payload) is bytes:
        src = <const uint8_t*>PyBytes_AS_STRING(payload)
        n = PyBytes_GET_SIZE(payload)
    else:
        view = payload
        n = view.shape[0]
        if n:
            src = &view[0]
    _check_frame(opcode, n, fin)
    size = _write_header(header, opcode, <uint64_t>n, fin, 0x80 if mask else 0)
    if mask:
        key = _next_key()
        out = PyBytes_FromStringAndSize(NULL, size + 4 + n)
        p = <uint8_t*>PyBytes_AS_STRING(out)
        memcpy(p, header, size)
        memcpy(p + size, key, 4)
        _xor_into(p + size + 4, src, n, key)
    else:
        out = PyBytes_FromStringAndSize(NULL, size + n)
        p = <uint8_t*>PyBytes_AS_STRING(out)
        memcpy(p, header, size)
        if n:
            memcpy(p + size, src, n)
    return out


def encode_frame_parts(int opcode, parts, bint mask=False, bint fin=True):
    """Return one whole frame whose payload is the concatenation of ``parts`` (buffers).

    Gathering and masking are one pass over the payload: a sender holding its payload as
    pieces (a mux ``data_to_send_parts``) copies it once instead of joining it first.
    """
    cdef const uint8_t[::1] view
    cdef const uint8_t* src
    cdef const uint8_t* key = NULL
    cdef Py_ssize_t n = 0, m, size, off = 0
    cdef uint8_t header[_MAX_HEADER]
    cdef uint8_t rotated[4]
    cdef bytes out
    cdef uint8_t* p
    cdef int i
    parts = list(parts)
    for part in parts:
        n += len(part)
    _check_frame(opcode, n, fin)
    size = _write_header(header, opcode, <uint64_t>n, fin, 0x80 if mask else 0)
    if mask:
        key = _next_key()
        out = PyBytes_FromStringAndSize(NULL, size + 4 + n)
        p = <uint8_t*>PyBytes_AS_STRING(out)
        memcpy(p, header, size)
        memcpy(p + size, key, 4)
        p += size + 4
    else:
        out = PyBytes_FromStringAndSize(NULL, size + n)
        p = <uint8_t*>PyBytes_AS_STRING(out)
        memcpy(p, header, size)
        p += size
    for part in parts:
        if type(part) is bytes:
            src = <const uint8_t*>PyBytes_AS_STRING(part)
            m = PyBytes_GET_SIZE(part)
        else:
            view = part
            m = view.shape[0]
            if not m:
                continue
            src = &view[0]
        if m > n - off:  # a part changed size since it was counted
            raise ValueError("a part changed size while the frame was built")
        if mask:
            # The key continues where the previous part left it.
            for i in range(4):
                rotated[i] = key[(off + i) & 3]
            _xor_into(p + off, src, m, rotated)
        elif m:
            memcpy(p + off, src, m)
        off += m
    if off != n:
        raise ValueError("a part changed size while the frame was built")
    return out


# --- parsing -------------------------------------------------------------------------

cdef class FrameParser:
    """Turn a byte stream into whole messages: ``feed(data) -> [(opcode, payload), ...]``.

    See the pure twin's docstring for the full contract; this one behaves identically.
    """

    cdef readonly Py_ssize_t max_message_size
    cdef readonly bint require_mask
    cdef list _pending
    cdef Py_ssize_t _pending_len
    cdef Py_ssize_t _need
    cdef int _message_opcode
    cdef list _fragments
    cdef uint64_t _message_size
    cdef object _error
    # True when ``_need`` is a whole frame (its header is parsed and in ``_pending``).
    cdef bint _need_frame

    def __init__(self, Py_ssize_t max_message_size, bint require_mask):
        if max_message_size < 0:
            raise ValueError("max_message_size cannot be negative")
        self.max_message_size = max_message_size
        self.require_mask = require_mask
        self._pending = []
        self._pending_len = 0
        self._need = 2
        self._message_opcode = 0
        self._fragments = []
        self._message_size = 0
        self._error = None
        self._need_frame = False

    @property
    def buffered(self):
        """Bytes held back waiting for the rest of a frame."""
        return self._pending_len

    def feed(self, data):
        """Consume ``data``; return every message it completes, in order."""
        if self._error is not None:
            raise WebSocketProtocolError(self._error.message, self._error.close_code)
        if type(data) is not bytes:
            data = bytes(data)
        try:
            return self._feed(<bytes>data)
        except WebSocketProtocolError as exc:
            self._error = exc
            self._pending = []
            self._pending_len = 0
            self._fragments = []
            raise

    cdef list _feed(self, bytes data):
        cdef list messages = []
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t end = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t take, used, size
        cdef bytes buf
        # First finish the partial frame held back. Pieces are kept as they came (a
        # memoryview for a tail, never a copy); a whole large frame is assembled
        # straight into its payload (unmasked on the way): one copy, where joining the
        # pieces first and then slicing the payload out of the join took two or three.
        while self._pending:
            if self._pending_len + end - pos < self._need:
                self._pending.append(memoryview(data)[pos:] if pos else data)
                self._pending_len += end - pos
                return messages
            take = self._need - self._pending_len
            if self._need_frame and self._need > _ASSEMBLE_MIN:
                self._assemble(data, pos, take, messages)
                pos += take
                continue
            self._pending.append(data[pos:pos + take])
            pos += take
            buf = b"".join(self._pending)
            size = PyBytes_GET_SIZE(buf)
            used = self._parse(buf, 0, messages)
            if used < size:
                self._pending = [buf[used:] if used else buf]
                self._pending_len = size - used
            else:
                self._pending = []
                self._pending_len = 0
        used = self._parse(data, pos, messages)
        if used < end:
            self._pending = [memoryview(data)[used:] if used else data]
            self._pending_len = end - used
        return messages

    cdef int _assemble(self, bytes data, Py_ssize_t pos, Py_ssize_t take, list messages) except -1:
        """Complete the held-back frame with ``data[pos:pos + take]``: its header (already
        checked by ``_parse``) is at the start of ``_pending``."""
        cdef uint8_t head[_MAX_HEADER]
        cdef const uint8_t[::1] view
        cdef const uint8_t* src
        cdef const uint8_t* key = NULL
        cdef uint8_t rotated[4]
        cdef Py_ssize_t got = 0, m, skip, off = 0, header, i
        cdef uint64_t length
        cdef bint masked, fin
        cdef int opcode
        cdef bytes payload
        cdef uint8_t* dst
        cdef list pieces = self._pending
        pieces.append(memoryview(data)[pos:pos + take])
        # The header: at most 14 bytes, possibly spread over the first pieces.
        for piece in pieces:
            view = piece
            m = min(view.shape[0], _MAX_HEADER - got)
            if m > 0:
                memcpy(head + got, &view[0], m)
                got += m
            if got == _MAX_HEADER:
                break
        opcode = head[0] & 0x0F
        fin = head[0] & 0x80
        masked = head[1] & 0x80
        length = head[1] & 0x7F
        header = 2
        if length == 126:
            length = (<uint64_t>head[2] << 8) | head[3]
            header = 4
        elif length == 127:
            length = 0
            for i in range(2, 10):
                length = (length << 8) | head[i]
            header = 10
        if masked:
            key = head + header
            header += 4
        if <Py_ssize_t>length + header != self._need:  # cannot happen: _parse set _need
            raise AssertionError("frame assembly out of step with the parser")
        payload = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>length)
        dst = <uint8_t*>PyBytes_AS_STRING(payload)
        skip = header
        for piece in pieces:
            view = piece
            m = view.shape[0]
            if skip >= m:
                skip -= m
                continue
            src = &view[0] + skip
            m -= skip
            skip = 0
            if m > <Py_ssize_t>length - off:
                m = <Py_ssize_t>length - off
            if masked:
                for i in range(4):  # the key continues where the previous piece left it
                    rotated[i] = key[(off + i) & 3]
                _xor_into(dst + off, src, m, rotated)
            else:
                memcpy(dst + off, src, m)
            off += m
        self._pending = []
        self._pending_len = 0
        self._need = 2
        self._need_frame = False
        if opcode < 8:
            self._message_size_check(length)
        self._emit(opcode, fin, payload, length, messages)
        return 0

    cdef int _message_size_check(self, uint64_t length) except -1:
        # Already checked by _parse when it read this header; kept as a guard.
        if self._message_size + length > <uint64_t>self.max_message_size:
            raise WebSocketProtocolError(
                f"message of more than {self.max_message_size} bytes",
                CloseCode.MESSAGE_TOO_BIG)
        return 0

    cdef int _emit(self, int opcode, bint fin, bytes payload, uint64_t length, list messages) except -1:
        """A whole frame's payload: a control message, a whole data message, or a
        fragment to keep until its message ends."""
        cdef int message_opcode
        if opcode >= 8:
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
            if message_opcode == 1:
                _check_utf8(payload)
            messages.append((message_opcode, payload))
        else:
            if opcode:
                self._message_opcode = opcode
            self._fragments.append(payload)
            self._message_size += length
        return 0

    cdef Py_ssize_t _parse(self, bytes buf, Py_ssize_t pos, list messages) except -1:
        """Parse whole frames from ``buf[pos:]``; return where the first partial one starts.

        Sets ``_need`` to the bytes (from that position) the next step requires.
        """
        cdef const uint8_t* base = <const uint8_t*>PyBytes_AS_STRING(buf)
        cdef Py_ssize_t end = PyBytes_GET_SIZE(buf)
        cdef uint64_t max_size = <uint64_t>self.max_message_size
        cdef const uint8_t* p
        cdef uint8_t first, second
        cdef int opcode, message_opcode, i
        cdef bint fin, masked
        cdef uint64_t length
        cdef Py_ssize_t header, start
        cdef bytes payload
        while True:
            if end - pos < 2:
                self._need = 2
                self._need_frame = False
                return pos
            p = base + pos
            first = p[0]
            second = p[1]
            opcode = first & 0x0F
            fin = first & 0x80
            if first & 0x70:
                raise WebSocketProtocolError("reserved bits set in frame header")
            if not _known_opcode(opcode):
                raise WebSocketProtocolError(f"unknown opcode {opcode:#x}")
            length = second & 0x7F
            if opcode >= 8:
                if not fin:
                    raise WebSocketProtocolError("fragmented control frame")
                if length > _MAX_CONTROL:
                    raise WebSocketProtocolError("control frame payload exceeds 125 bytes")
            masked = second & 0x80
            if masked and not self.require_mask:
                raise WebSocketProtocolError("masked frame from the server")
            if not masked and self.require_mask:
                raise WebSocketProtocolError("unmasked frame from the client")
            if opcode == 0:
                if not self._message_opcode:
                    raise WebSocketProtocolError("continuation frame outside a message")
            elif opcode < 8 and self._message_opcode:
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
                self._need_frame = False
                return pos
            if length == 126:
                length = (<uint64_t>p[2] << 8) | p[3]
            elif length == 127:
                length = 0
                for i in range(2, 10):
                    length = (length << 8) | p[i]
                if length >> 63:
                    raise WebSocketProtocolError("64-bit frame length has its top bit set")
            # Cannot overflow: _message_size <= max_size < 2**63 and length < 2**63.
            if opcode < 8 and self._message_size + length > max_size:
                raise WebSocketProtocolError(
                    f"message of more than {self.max_message_size} bytes",
                    CloseCode.MESSAGE_TOO_BIG)
            start = pos + header
            # length <= max_message_size here (or <= 125), so it fits a Py_ssize_t.
            if <Py_ssize_t>length > end - start:
                self._need = header + <Py_ssize_t>length
                self._need_frame = True
                return pos

            if masked:
                payload = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>length)
                _xor_into(<uint8_t*>PyBytes_AS_STRING(payload), base + start,
                          <Py_ssize_t>length, base + start - 4)
            else:
                payload = PyBytes_FromStringAndSize(<const char*>base + start,
                                                    <Py_ssize_t>length)
            pos = start + <Py_ssize_t>length
            self._emit(opcode, fin, payload, length, messages)
