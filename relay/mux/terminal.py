"""Terminal streams (stream protocol ``terminal``): the framing both ends speak, sans-IO
(docs/PROTOCOL.md section 17).

The gateway opens a stream with the metadata ``{"protocol": "terminal", "cols": C,
"rows": R, "session": SESSION_ID, "client": ADDRESS}`` to an agent started with ``--terminal``; the agent
runs a shell on a pseudo-terminal of that size and the stream carries, in each
direction, a sequence of **records**: a kind (``u8``), a length (``u16`` big-endian),
then that many bytes. Records are independent of DATA frames (a frame may hold several,
a record may span frames), and the kinds are:

* ``DATA`` (0): terminal bytes: keystrokes towards the agent, the shell's output back;
* ``RESIZE`` (1, towards the agent): ``u16 cols, u16 rows``, the window's new size,
  which the agent applies to the pseudo-terminal (the shell gets SIGWINCH);
* ``EXIT`` (2, towards the gateway, last): ``i32`` the shell's exit status (negative:
  killed by that signal), sent before the agent's FIN.

Why a framing and not raw bytes: a resize must arrive in order with the keystrokes
around it (a full-screen program redraws for the size it was told), and a second stream
or a control message would race them. The agent's FIN means "the shell has ended"; the
gateway's FIN or RESET means "the page went away": the agent hangs the shell up
(SIGHUP to its process group). Any other kind is a protocol error of the stream (reset
with PROTOCOL_ERROR).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Union

__all__ = [
    "DEFAULT_SIZE",
    "KIND_DATA",
    "KIND_EXIT",
    "KIND_RESIZE",
    "MAX_SIZE",
    "TERMINAL_PROTOCOL",
    "TerminalData",
    "TerminalDecoder",
    "TerminalExit",
    "TerminalProtocolError",
    "TerminalResize",
    "check_size",
    "encode_data",
    "encode_exit",
    "encode_resize",
    "open_metadata",
    "size_from_metadata",
]

#: The ``protocol`` of a stream's open metadata that selects this framing.
TERMINAL_PROTOCOL = "terminal"
KIND_DATA = 0
KIND_RESIZE = 1
KIND_EXIT = 2
#: Bytes before each record's payload: the kind and the length.
RECORD_HEADER = 3
MAX_PAYLOAD = 0xFFFF
#: A window with no size given (the classic VT100's).
DEFAULT_SIZE = (80, 24)
#: Largest number of columns or rows accepted (a 8K screen with a tiny font is ~2000
#: columns); beyond it a size is refused as nonsense, not clamped.
MAX_SIZE = 4096


class TerminalProtocolError(ValueError):
    """The peer sent a record this framing does not define, or a malformed one."""


class TerminalData(NamedTuple):
    data: bytes


class TerminalResize(NamedTuple):
    cols: int
    rows: int


class TerminalExit(NamedTuple):
    status: int


TerminalEvent = Union[TerminalData, TerminalResize, TerminalExit]


def check_size(cols: Any, rows: Any) -> tuple[int, int]:
    """``(cols, rows)`` if both are integers from 1 to :data:`MAX_SIZE`, else
    :class:`TerminalProtocolError` saying what is wrong."""
    for name, value in (("cols", cols), ("rows", rows)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SIZE:
            raise TerminalProtocolError(f"{name} must be an integer from 1 to {MAX_SIZE}, not {value!r}")
    return cols, rows


def _record(kind: int, payload: bytes) -> bytes:
    return bytes((kind,)) + len(payload).to_bytes(2, "big") + payload


def encode_data(data: Union[bytes, bytearray, memoryview]) -> bytes:
    """Terminal bytes as DATA records (several when over 65535 bytes)."""
    view = memoryview(data)
    if len(view) <= MAX_PAYLOAD:
        return _record(KIND_DATA, bytes(view))
    return b"".join(_record(KIND_DATA, bytes(view[i:i + MAX_PAYLOAD])) for i in range(0, len(view), MAX_PAYLOAD))


def encode_resize(cols: int, rows: int) -> bytes:
    """A RESIZE record (:class:`TerminalProtocolError` for a size out of range)."""
    check_size(cols, rows)
    return _record(KIND_RESIZE, cols.to_bytes(2, "big") + rows.to_bytes(2, "big"))


def encode_exit(status: int) -> bytes:
    """The EXIT record of a shell that ended with ``status`` (negative: a signal)."""
    return _record(KIND_EXIT, status.to_bytes(4, "big", signed=True))


class TerminalDecoder:
    """Reassembles records from a stream's bytes, however they were cut."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: Union[bytes, bytearray, memoryview]) -> list[TerminalEvent]:
        """The records completed by ``data``, in order; :class:`TerminalProtocolError`
        for an unknown kind or a RESIZE/EXIT of the wrong length or values."""
        buffer = self._buffer
        buffer += data
        events: list[TerminalEvent] = []
        start = 0
        while len(buffer) - start >= RECORD_HEADER:
            kind = buffer[start]
            size = int.from_bytes(buffer[start + 1:start + 3], "big")
            end = start + RECORD_HEADER + size
            if len(buffer) < end:
                break
            payload = bytes(buffer[start + RECORD_HEADER:end])
            start = end
            if kind == KIND_DATA:
                if payload:
                    events.append(TerminalData(payload))
            elif kind == KIND_RESIZE:
                if size != 4:
                    raise TerminalProtocolError(f"a RESIZE record carries 4 bytes, not {size}")
                events.append(TerminalResize(*check_size(int.from_bytes(payload[:2], "big"),
                                                         int.from_bytes(payload[2:], "big"))))
            elif kind == KIND_EXIT:
                if size != 4:
                    raise TerminalProtocolError(f"an EXIT record carries 4 bytes, not {size}")
                events.append(TerminalExit(int.from_bytes(payload, "big", signed=True)))
            else:
                raise TerminalProtocolError(f"unknown terminal record kind {kind}")
        del buffer[:start]
        return events


def open_metadata(session_id: str, cols: int = DEFAULT_SIZE[0], rows: int = DEFAULT_SIZE[1],
                  client: str = "") -> dict[str, Any]:
    """The open metadata of a terminal stream for tunnel session ``session_id``, opened
    by ``client`` (its address, for the agent's audit log)."""
    check_size(cols, rows)
    meta: dict[str, Any] = {"protocol": TERMINAL_PROTOCOL, "cols": cols, "rows": rows, "session": session_id}
    if client:
        meta["client"] = client
    return meta


def size_from_metadata(metadata: Any) -> tuple[int, int]:
    """The window size a terminal stream's metadata asks for (the default when absent);
    :class:`TerminalProtocolError` when present and out of range."""
    if not isinstance(metadata, dict) or ("cols" not in metadata and "rows" not in metadata):
        return DEFAULT_SIZE
    return check_size(metadata.get("cols", DEFAULT_SIZE[0]), metadata.get("rows", DEFAULT_SIZE[1]))
