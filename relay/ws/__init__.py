"""WebSocket on the data path: RFC 6455 framing (compiled, or its pure twin) + handshake.

The framing module is ``relay.ws._framing`` (Cython, ``ext/_framing.pyx``) when built and
not disabled by ``RELAY_NO_EXTENSIONS``, else ``relay.ws._framing_py``; both have the same
API. ``COMPILED`` says which one is in use. The opening handshake (h11 + wsproto) is in
``relay.ws.handshake``; after it, every frame goes through the framing here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from relay._ext import load

if TYPE_CHECKING:  # mypy checks against the pure twin; ext/_framing.pyx has the same API
    from relay.ws import _framing_py as _framing
else:
    _framing = load("relay.ws._framing", "relay.ws._framing_py")

#: ``FrameParser(max_message_size, require_mask)``: ``feed(data) -> [(opcode, payload)]``.
FrameParser = _framing.FrameParser
#: ``encode_frame(opcode, payload, mask=False, fin=True) -> bytes``: one whole frame.
encode_frame = _framing.encode_frame
#: ``encode_frame_parts(opcode, parts, mask=False, fin=True) -> bytes``: one whole frame
#: whose payload is the concatenation of ``parts`` (gathered and masked in one copy).
encode_frame_parts = _framing.encode_frame_parts
#: ``encode_header(opcode, length, fin=True) -> bytes``: an unmasked header, payload apart.
encode_header = _framing.encode_header
#: ``mask(data, key) -> bytes``: XOR with a 4-byte key (masking == unmasking).
mask = _framing.mask
#: ``parse_close(payload) -> (code, reason)``.
parse_close = _framing.parse_close
#: ``encode_close_payload(code=None, reason="") -> bytes``.
encode_close_payload = _framing.encode_close_payload
WebSocketProtocolError = _framing.WebSocketProtocolError
Opcode = _framing.Opcode
CloseCode = _framing.CloseCode
MAX_CONTROL_PAYLOAD: int = _framing.MAX_CONTROL_PAYLOAD
COMPILED: bool = _framing.__name__ == "relay.ws._framing"

__all__ = [
    "COMPILED",
    "MAX_CONTROL_PAYLOAD",
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
