"""asyncio (and uvloop) binding of the multiplexer: sessions, streams, splices.

``MuxSession`` drives one sans-IO ``MuxConnection`` over one transport (raw TCP/TLS, or
WebSocket messages through ``WebSocketTransport``); ``MuxStream`` is one stream as an
asyncio-style reader/writer; ``StreamSplice`` relays a stream to a local socket at the
Protocol level with end-to-end backpressure.
"""
from relay.aio.session import MuxSession, SessionClosedError
from relay.aio.stream import (
    MuxStream,
    MuxStreamReader,
    MuxStreamWriter,
    StreamRefused,
    StreamResetError,
    StreamSplice,
    connect_stream_to,
)
from relay.aio.transport import MuxTransport, WebSocketTransport, connect_tcp, serve_tcp

__all__ = [
    "MuxSession",
    "MuxStream",
    "MuxStreamReader",
    "MuxStreamWriter",
    "MuxTransport",
    "SessionClosedError",
    "StreamRefused",
    "StreamResetError",
    "StreamSplice",
    "WebSocketTransport",
    "connect_stream_to",
    "connect_tcp",
    "serve_tcp",
]
