"""trio binding of the multiplexer (trio + trio-websocket).

``TrioMuxSession`` drives one sans-IO ``MuxConnection`` over one ``trio.abc.Stream``
(TCP, TLS, memory streams, or a trio-websocket connection through ``WebSocketStream``);
each ``MuxStream`` is a ``trio.abc.HalfCloseableStream``. All protocol decisions stay in
``relay.mux``: this package only moves bytes and wakes tasks.
"""
from relay.trio.session import SessionClosedError, TrioMuxSession, WebSocketStream
from relay.trio.stream import MuxStream, StreamRefused, StreamResetError

__all__ = [
    "MuxStream",
    "SessionClosedError",
    "StreamRefused",
    "StreamResetError",
    "TrioMuxSession",
    "WebSocketStream",
]
