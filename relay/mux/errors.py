"""The one error tree of the multiplexer.

A :class:`ProtocolError` means the peer broke the protocol: the connection queues a GOAWAY
carrying :attr:`ProtocolError.error_code` before raising it, so the binding only has to
flush :meth:`MuxConnection.data_to_send` and close the transport. A
:class:`LocalProtocolError` means *this* side's application misused the API; nothing is
sent and the connection stays usable.
"""
from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.mux.events import Event


class ErrorCode(IntEnum):
    """Wire error codes carried by RESET and GOAWAY frames (docs/PROTOCOL.md)."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    FLOW_CONTROL_ERROR = 3
    STREAM_CLOSED = 4
    FRAME_SIZE_ERROR = 5
    REFUSED = 6
    CANCEL = 7
    CONNECT_FAILED = 8
    NOT_ALLOWED = 9
    TOO_MANY_STREAMS = 10
    UNSUPPORTED_VERSION = 11
    TIMEOUT = 12
    GOING_AWAY = 13
    OVERLOADED = 14


class MuxError(Exception):
    """Base class of every error the multiplexer raises."""


class ProtocolError(MuxError):
    """The peer violated the protocol; a GOAWAY with :attr:`error_code` is queued."""

    error_code: ErrorCode = ErrorCode.PROTOCOL_ERROR
    #: Set when :meth:`MuxConnection.receive_data` raises it: the events produced before
    #: and by the failure (StreamReset for every open stream, ConnectionTerminated).
    events: list[Event]

    def __init__(self, message: str, error_code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if error_code is not None:
            self.error_code = error_code


class FrameSizeError(ProtocolError):
    """A frame or its metadata was larger than the advertised limit."""

    error_code = ErrorCode.FRAME_SIZE_ERROR


class FlowControlError(ProtocolError):
    """The peer sent more than the window it was granted."""

    error_code = ErrorCode.FLOW_CONTROL_ERROR


class LocalProtocolError(MuxError):
    """This side used the API wrongly (unknown stream, send after close, ...)."""


class StreamClosedError(LocalProtocolError):
    """The stream is closed (or reset) for the operation attempted."""

    def __init__(self, stream_id: int, message: str = "stream is closed") -> None:
        super().__init__(f"stream {stream_id}: {message}")
        self.stream_id = stream_id


class StreamLimitError(LocalProtocolError):
    """No stream can be opened now: the peer's stream limit or this side's receive budget
    (every open stream's window is reserved out of ``session_window``) is reached.
    Retrying after other streams finish or drain may succeed."""
