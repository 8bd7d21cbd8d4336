"""Pure-Python frame codec: the twin of the compiled ``ext/_codec.pyx``.

Both must behave identically; tests run against each. A frame is a 12-byte big-endian
header ``>BBHII`` (version, type, flags, stream id, length) and ``length`` payload bytes.
"""
from __future__ import annotations

from struct import Struct
from typing import Optional, Union

from relay.mux.errors import FrameSizeError, ProtocolError

FRAME_VERSION = 1
HEADER_SIZE = 12
#: Payloads at least this long come out as memoryview slices of the received chunk
#: (zero-copy); shorter ones are copied into bytes, which is cheaper than a view.
ZERO_COPY_THRESHOLD = 4096
#: Highest frame type number the decoder accepts (see FrameType).
MAX_FRAME_TYPE = 8

_HEADER = Struct(">BBHII")
_pack_header = _HEADER.pack
_unpack_header = _HEADER.unpack_from

#: (type, flags, stream_id, payload); the payload is bytes, or a read-only memoryview of
#: at least ZERO_COPY_THRESHOLD bytes.
Frame = tuple[int, int, int, Union[bytes, memoryview]]


def encode_header(frame_type: int, flags: int, stream_id: int, length: int) -> bytes:
    """Return the 12-byte header of a frame whose payload is sent separately."""
    return _pack_header(FRAME_VERSION, frame_type, flags, stream_id, length)


def encode_frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """Return a whole frame: header and payload."""
    return _pack_header(FRAME_VERSION, frame_type, flags, stream_id, len(payload)) + payload


class FrameDecoder:
    """Split a byte stream into frames, buffering at most one partial frame.

    ``feed(data)`` returns every complete frame as ``(type, flags, stream_id, payload)``.
    A header announcing more than ``max_payload`` bytes raises :class:`FrameSizeError`
    before anything is buffered, so a peer cannot make us hold more than one frame.
    After an error the decoder is unusable (the session is over).
    """

    __slots__ = ("max_payload", "_pending", "_pending_len", "_need")

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload
        self._pending: list[bytes] = []
        self._pending_len = 0
        # Bytes needed before parsing is worth retrying; keeps byte-by-byte feeding linear.
        self._need = HEADER_SIZE

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return self._pending_len

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if type(data) is not bytes:
            data = bytes(data)  # payload slices must not alias a buffer the caller reuses
        if self._pending:
            self._pending.append(data)
            self._pending_len += len(data)
            if self._pending_len < self._need:
                return []
            data = b"".join(self._pending)
            self._pending = []
            self._pending_len = 0
        frames: list[Frame] = []
        end = len(data)
        pos = 0
        view: Optional[memoryview] = None
        payload: Union[bytes, memoryview]
        max_payload = self.max_payload
        while end - pos >= HEADER_SIZE:
            version, frame_type, flags, stream_id, length = _unpack_header(data, pos)
            if version != FRAME_VERSION:
                raise ProtocolError(f"unsupported frame version {version}")
            if frame_type > MAX_FRAME_TYPE:
                raise ProtocolError(f"unknown frame type {frame_type}")
            if length > max_payload:
                raise FrameSizeError(f"frame of {length} bytes exceeds the limit of {max_payload}")
            start = pos + HEADER_SIZE
            stop = start + length
            if stop > end:
                self._need = stop - pos
                break
            if length >= ZERO_COPY_THRESHOLD:
                if view is None:
                    view = memoryview(data).toreadonly()
                payload = view[start:stop]
            else:
                payload = data[start:stop]
            frames.append((frame_type, flags, stream_id, payload))
            pos = stop
        else:
            self._need = HEADER_SIZE
        if pos < end:
            tail = data[pos:]
            self._pending = [tail if type(tail) is bytes else bytes(tail)]
            self._pending_len = end - pos
        return frames
