"""Events returned by :meth:`MuxConnection.receive_data`.

Each event is a frozen, keyword-only dataclass; the binding reacts to them and never to
raw frames.

Compiled (``events.pxd``), each is an extension type built by Cython's dataclass support:
same keyword constructor, repr, equality, hash, ``dataclasses.fields``/``replace``/
``asdict`` and pickling, and its fields are read-only (assigning one raises
AttributeError, as the frozen dataclass's FrozenInstanceError is one). Uncompiled, they
are standard-library dataclasses with ``__slots__``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:  # mypy checks the pure-Python twin: cython's no-op declarations
    from relay.mux import _cython_shim as cython
else:
    try:
        import cython
    except ImportError:  # the pure-Python core runs without Cython installed
        from relay.mux import _cython_shim as cython
    if not cython.compiled:
        # The shim's dataclass adds slots=True, which Cython's decorator does not accept
        # (an extension type has fixed fields anyway).
        from relay.mux import _cython_shim as cython

Buffer = Union[bytes, memoryview]


@cython.dataclasses.dataclass(frozen=True, kw_only=True)
class Event:
    """Base class of all multiplexer events."""


@cython.dataclasses.dataclass(frozen=True, kw_only=True)
class HelloReceived(Event):
    """The peer's SETTINGS arrived; streams may be opened and data sent from now on."""

    #: Negotiated protocol version (the highest both sides support).
    version: int
    #: The limits the peer advertised (``max_frame_size``, ``initial_window`` ...).
    settings: dict[str, int]
    #: Free-form application information the peer sent (agent name, labels ...).
    info: dict[str, Any]


@cython.dataclasses.dataclass(frozen=True, kw_only=True)
class StreamOpened(Event):
    """The peer opened a stream; answer with ``accept_stream`` or ``refuse_stream``."""

    stream_id: int
    #: The msgpack-decoded open metadata (protocol, target, headers ...).
    metadata: dict[str, Any]


@cython.dataclasses.dataclass(frozen=True, kw_only=True)
class StreamAccepted(Event):
    """The peer accepted a stream this side opened."""

    stream_id: int


@cython.dataclasses.dataclass(frozen=True, kw_only=True)
class DataReceived(Event):
    """Stream payload. Acknowledge it with ``acknowledge_received_data`` once consumed.

    ``data`` is bytes, or a read-only memoryview for payloads of at least
    ``relay.mux.frames.ZERO_COPY_THRESHOLD`` bytes (zero-copy; call ``bytes()`` to keep).
    """

    stream_id: int
    data: Buffer
    #: Bytes to pass to ``acknowledge_received_data`` (equal to ``len(data)``).
    flow_controlled_length: int
    #: True when this frame also half-closed the peer's side.
    end_stream: bool = False


# mypy checks the pure-Python branch (the compiled one sets read-only fields, which only
# this module's compiled code may).
if not TYPE_CHECKING and cython.compiled:
    @cython.locals(event=DataReceived)
    def data_received(stream_id: int, data: Buffer, n: int, end_stream: bool = False) -> DataReceived:
        """``DataReceived(stream_id=..., data=..., flow_controlled_length=n, end_stream=...)``,
        built the way the core needs it once per DATA frame: the fields filled directly
        (read-only is for Python code; this module's compiled code may set them), not
        through the keyword-parsing ``__init__``."""
        event = DataReceived.__new__(DataReceived)
        event.stream_id = stream_id
        event.data = data
        event.flow_controlled_length = n
        event.end_stream = end_stream
        return event
else:
    _new = object.__new__
    # The slots' member descriptors (class attributes, which mypy types as the fields).
    _slots = vars(DataReceived)
    _set_stream_id = _slots["stream_id"].__set__
    _set_data = _slots["data"].__set__
    _set_length = _slots["flow_controlled_length"].__set__
    _set_end = _slots["end_stream"].__set__

    def data_received(stream_id: int, data: Buffer, n: int, end_stream: bool = False) -> DataReceived:
        """``DataReceived(stream_id=..., data=..., flow_controlled_length=n, end_stream=...)``,
        built the way the core needs it once per DATA frame: a frozen dataclass's
        ``__init__`` goes through ``object.__setattr__`` per field, which costs twice as
        much as filling the slots directly. The result is the same frozen object."""
        event = _new(DataReceived)
        _set_stream_id(event, stream_id)
        _set_data(event, data)
        _set_length(event, n)
        _set_end(event, end_stream)
        return event


@cython.dataclasses.dataclass(frozen=True, kw_only=True)
class StreamEnded(Event):
    """The peer half-closed the stream (it will send no more data).

    There is no separate "closed" event: a stream is finished once this side has ended
    it too (``end_stream``) or once it was reset, exactly as in HTTP/2.

    Emitted alone only for an empty FIN; a FIN that carries data is reported as
    ``DataReceived(end_stream=True)`` followed by this event.
    """

    stream_id: int


@cython.dataclasses.dataclass(frozen=True, kw_only=True)
class StreamReset(Event):
    """The stream was aborted: refused by the peer, reset by it, or timed out here."""

    stream_id: int
    error_code: int
    message: str = ""
    #: True when the peer sent the RESET, False when this side gave up on the stream.
    remote: bool = True


@cython.dataclasses.dataclass(frozen=True, kw_only=True)
class ControlReceived(Event):
    """An application control message (msgpack-decoded) on the session."""

    message: Any


@cython.dataclasses.dataclass(frozen=True, kw_only=True)
class PingAcknowledged(Event):
    """A PING this side sent came back; ``rtt`` is in the caller's clock units."""

    #: The id :meth:`MuxConnection.ping` returned.
    ping_id: int
    #: None when the PING was sent or answered without a clock.
    rtt: Optional[float]


@cython.dataclasses.dataclass(frozen=True, kw_only=True)
class GoAwayReceived(Event):
    """The peer is draining: no new streams; those above ``last_stream_id`` were dropped."""

    last_stream_id: int
    error_code: int
    message: str = ""


@cython.dataclasses.dataclass(frozen=True, kw_only=True)
class ConnectionTerminated(Event):
    """The session is over (peer silent past the timeout, or fatal error)."""

    error_code: int
    message: str = ""
    extra: dict[str, Any] = cython.dataclasses.field(default_factory=dict)
