"""Per-stream state: a table of legal transitions plus the stream's queues and windows.

A stream has two directions. Its *state* says which are still open, as in HTTP/2:
OPEN -> HALF_CLOSED_LOCAL / HALF_CLOSED_REMOTE -> CLOSED, and any state -> CLOSED on a
reset. Whether the open was answered (ACCEPT) is orthogonal and kept as a flag, because
data may flow before the answer arrives.
"""
from __future__ import annotations

from collections import deque
from enum import Enum
from typing import Optional, Union

from relay.mux.flow import ReceiveWindow

#: A queued outgoing buffer: what ``send_data`` queued, or a view of its unsent rest.
Chunk = Union[bytes, memoryview]


class StreamState(Enum):
    # Members are singletons compared by identity: hashing by identity too keeps the
    # TRANSITIONS lookup in C (Enum's own __hash__ is a Python function).
    __hash__ = object.__hash__

    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"  # we sent FIN; the peer may still send
    HALF_CLOSED_REMOTE = "half-closed (remote)"  # the peer sent FIN; we may still send
    CLOSED = "closed"


class StreamInput(Enum):
    __hash__ = object.__hash__  # as StreamState's

    SEND_FIN = "send FIN"
    RECV_FIN = "receive FIN"
    RESET = "reset"


_S = StreamState
_I = StreamInput
#: (state, input) -> new state. A pair missing here is illegal for that state.
TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (_S.OPEN, _I.SEND_FIN): _S.HALF_CLOSED_LOCAL,
    (_S.OPEN, _I.RECV_FIN): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_FIN): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_FIN): _S.CLOSED,
    (_S.OPEN, _I.RESET): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.RESET): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.RESET): _S.CLOSED,
    (_S.CLOSED, _I.RESET): _S.CLOSED,
}


class Stream:
    """Book-keeping for one stream; owned and mutated only by MuxConnection."""

    __slots__ = (
        "stream_id", "state", "local", "answered", "send_credit", "chunks", "queued",
        "fin_pending", "fin_sent", "in_ready", "blocked", "recv", "unacked", "reading_stopped",
    )

    def __init__(self, stream_id: int, local: bool, send_credit: int, recv: ReceiveWindow) -> None:
        self.stream_id = stream_id
        self.state = StreamState.OPEN
        #: True when this side opened the stream.
        self.local = local
        #: For local streams: the peer accepted. For remote ones: we accepted or refused.
        self.answered = False
        #: How many bytes the peer's window still lets us send.
        self.send_credit = send_credit
        #: Queued outgoing buffers (allocated on first send: an idle stream stays small).
        self.chunks: Optional[deque[Chunk]] = None
        self.queued = 0
        #: FIN is to ride on the last queued DATA frame.
        self.fin_pending = False
        self.fin_sent = False
        #: Member of the connection's round-robin deque of streams with sendable data.
        self.in_ready = False
        #: The send queue passed its limit; report when it drains below it.
        self.blocked = False
        self.recv = recv
        #: Bytes handed to the application and not yet acknowledged.
        self.unacked = 0
        #: The application will read no more: further DATA resets the stream.
        self.reading_stopped = False

    def transition(self, event: StreamInput) -> StreamState:
        """Apply ``event``; returns the new state or raises KeyError if it is illegal."""
        self.state = TRANSITIONS[(self.state, event)]
        return self.state

    @property
    def can_send(self) -> bool:
        return self.state is StreamState.OPEN or self.state is StreamState.HALF_CLOSED_REMOTE

    @property
    def can_receive(self) -> bool:
        return self.state is StreamState.OPEN or self.state is StreamState.HALF_CLOSED_LOCAL

    def take(self, n: int) -> list[Chunk]:
        """Remove and return the first ``n`` queued bytes as a list of buffers (no copy).
        The caller knows that many are queued."""
        chunks = self.chunks
        assert chunks is not None  # bytes are queued, so the queue exists
        pieces: list[Chunk] = []
        while n:
            chunk = chunks[0]
            size = len(chunk)
            if size <= n:
                pieces.append(chunks.popleft())
                n -= size
            else:
                view = chunk if type(chunk) is memoryview else memoryview(chunk)
                pieces.append(view[:n])
                chunks[0] = view[n:]
                n = 0
        return pieces

    def __repr__(self) -> str:
        return f"<Stream {self.stream_id} {self.state.value} queued={self.queued}>"
