"""Frame kinds, flags and wire constants, and the selector of the frame codec.

Every frame is a 12-byte big-endian header ``>BBHII`` (version, type, flags, stream id,
payload length) followed by ``length`` payload bytes; docs/PROTOCOL.md is the full
description. The codec that turns bytes into frames comes from the compiled module
``relay.mux._codec`` when available and from its pure-Python twin otherwise.
"""
from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import TYPE_CHECKING

from relay._ext import load

#: Version of the framing carried in every header; a different value is a protocol error.
FRAME_VERSION = 1
#: Session-protocol versions this implementation can speak, negotiated in SETTINGS.
SUPPORTED_VERSIONS = (1,)
HEADER_SIZE = 12


class FrameType(IntEnum):
    DATA = 0
    WINDOW_UPDATE = 1
    OPEN = 2
    ACCEPT = 3
    RESET = 4
    PING = 5
    GOAWAY = 6
    SETTINGS = 7
    CONTROL = 8


class Flag(IntFlag):
    NONE = 0
    FIN = 0x1  # DATA: the sender will send no more on this stream
    ACK = 0x2  # PING: this is the echo of the peer's PING


if TYPE_CHECKING:  # mypy checks against the pure twin; ext/_codec.pyx has the same API
    from relay.mux import _codec_py as _codec
else:
    _codec = load("relay.mux._codec", "relay.mux._codec_py")

#: ``FrameDecoder(max_payload)``: ``feed(data) -> list[(type, flags, stream_id, payload)]``.
FrameDecoder = _codec.FrameDecoder
#: ``encode_frame(type, flags, stream_id, payload) -> bytes``: one whole frame.
encode_frame = _codec.encode_frame
#: ``encode_header(type, flags, stream_id, length) -> bytes``: a header, payload sent apart.
encode_header = _codec.encode_header
#: Payloads at least this long are handed out as zero-copy memoryview slices.
ZERO_COPY_THRESHOLD: int = _codec.ZERO_COPY_THRESHOLD
COMPILED: bool = _codec is not None and _codec.__name__ == "relay.mux._codec"
