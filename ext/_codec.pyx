# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled frame codec: the twin of ``relay/mux/_codec_py.py``; same API, same behaviour.

The header is read and written with explicit big-endian byte arithmetic on C pointers;
payloads below ZERO_COPY_THRESHOLD are copied straight into new bytes objects, larger ones
are memoryview slices of the received chunk.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy

from relay.mux.errors import FrameSizeError, ProtocolError

DEF _HEADER_SIZE = 12
DEF _FRAME_VERSION = 1
DEF _ZERO_COPY_THRESHOLD = 4096
DEF _MAX_FRAME_TYPE = 8

FRAME_VERSION = _FRAME_VERSION
HEADER_SIZE = _HEADER_SIZE
ZERO_COPY_THRESHOLD = _ZERO_COPY_THRESHOLD
MAX_FRAME_TYPE = _MAX_FRAME_TYPE


cdef inline void _write_header(char* out, uint8_t frame_type, uint16_t flags,
                               uint32_t stream_id, uint32_t length) noexcept:
    cdef uint8_t* p = <uint8_t*>out
    p[0] = _FRAME_VERSION
    p[1] = frame_type
    p[2] = <uint8_t>(flags >> 8)
    p[3] = <uint8_t>flags
    p[4] = <uint8_t>(stream_id >> 24)
    p[5] = <uint8_t>(stream_id >> 16)
    p[6] = <uint8_t>(stream_id >> 8)
    p[7] = <uint8_t>stream_id
    p[8] = <uint8_t>(length >> 24)
    p[9] = <uint8_t>(length >> 16)
    p[10] = <uint8_t>(length >> 8)
    p[11] = <uint8_t>length


cdef inline uint32_t _read_u32(const uint8_t* p) noexcept:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


def _check_fields(frame_type, flags, stream_id, length):
    # Raised as the same exceptions struct.pack gives the twin for out-of-range values.
    if not (0 <= frame_type <= 0xFF and 0 <= flags <= 0xFFFF
            and 0 <= stream_id <= 0xFFFFFFFF and 0 <= length <= 0xFFFFFFFF):
        import struct
        raise struct.error("frame header field out of range")


def encode_header(frame_type, flags, stream_id, length):
    """Return the 12-byte header of a frame whose payload is sent separately."""
    _check_fields(frame_type, flags, stream_id, length)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _HEADER_SIZE)
    _write_header(PyBytes_AS_STRING(out), frame_type, flags, stream_id, length)
    return out


def encode_frame(frame_type, flags, stream_id, payload=b""):
    """Return a whole frame: header and payload."""
    cdef const unsigned char[::1] view
    cdef Py_ssize_t n
    cdef bytes out
    if type(payload) is bytes:
        n = PyBytes_GET_SIZE(payload)
        _check_fields(frame_type, flags, stream_id, n)
        out = PyBytes_FromStringAndSize(NULL, _HEADER_SIZE + n)
        _write_header(PyBytes_AS_STRING(out), frame_type, flags, stream_id, <uint32_t>n)
        if n:
            memcpy(PyBytes_AS_STRING(out) + _HEADER_SIZE, PyBytes_AS_STRING(payload), n)
        return out
    view = payload
    n = view.shape[0]
    _check_fields(frame_type, flags, stream_id, n)
    out = PyBytes_FromStringAndSize(NULL, _HEADER_SIZE + n)
    _write_header(PyBytes_AS_STRING(out), frame_type, flags, stream_id, <uint32_t>n)
    if n:
        memcpy(PyBytes_AS_STRING(out) + _HEADER_SIZE, &view[0], n)
    return out


cdef class FrameDecoder:
    """Split a byte stream into frames, buffering at most one partial frame.

    ``feed(data)`` returns every complete frame as ``(type, flags, stream_id, payload)``.
    A header announcing more than ``max_payload`` bytes raises FrameSizeError before
    anything is buffered.
    """

    cdef public Py_ssize_t max_payload
    cdef list _pending
    cdef Py_ssize_t _pending_len
    cdef Py_ssize_t _need

    def __init__(self, Py_ssize_t max_payload):
        self.max_payload = max_payload
        self._pending = []
        self._pending_len = 0
        self._need = _HEADER_SIZE

    @property
    def buffered(self):
        """Bytes held back waiting for the rest of a frame."""
        return self._pending_len

    def feed(self, data):
        cdef bytes buf
        if type(data) is bytes:
            buf = <bytes>data
        else:
            buf = bytes(data)
        if self._pending_len:
            self._pending.append(buf)
            self._pending_len += PyBytes_GET_SIZE(buf)
            if self._pending_len < self._need:
                return []
            buf = b"".join(self._pending)
            self._pending = []
            self._pending_len = 0

        cdef list frames = []
        cdef const uint8_t* base = <const uint8_t*>PyBytes_AS_STRING(buf)
        cdef Py_ssize_t end = PyBytes_GET_SIZE(buf)
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t start, stop
        cdef const uint8_t* h
        cdef uint32_t length, stream_id
        cdef uint8_t frame_type
        cdef uint16_t flags
        cdef object view = None
        cdef object payload
        cdef Py_ssize_t max_payload = self.max_payload
        self._need = _HEADER_SIZE
        while end - pos >= _HEADER_SIZE:
            h = base + pos
            if h[0] != _FRAME_VERSION:
                raise ProtocolError(f"unsupported frame version {h[0]}")
            frame_type = h[1]
            if frame_type > _MAX_FRAME_TYPE:
                raise ProtocolError(f"unknown frame type {frame_type}")
            flags = (<uint16_t>h[2] << 8) | h[3]
            stream_id = _read_u32(h + 4)
            length = _read_u32(h + 8)
            if length > max_payload:
                raise FrameSizeError(
                    f"frame of {length} bytes exceeds the limit of {max_payload}")
            start = pos + _HEADER_SIZE
            stop = start + length
            if stop > end:
                self._need = stop - pos
                break
            if length >= _ZERO_COPY_THRESHOLD:
                if view is None:
                    view = memoryview(buf).toreadonly()
                payload = view[start:stop]
            else:
                payload = PyBytes_FromStringAndSize(<const char*>base + start, length)
            frames.append((frame_type, flags, stream_id, payload))
            pos = stop
        if pos < end:
            self._pending = [buf[pos:]]
            self._pending_len = end - pos
        return frames
