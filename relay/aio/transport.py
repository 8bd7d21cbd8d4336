"""How a MuxSession is attached to a transport: raw TCP/TLS, or WebSocket messages.

A :class:`~relay.aio.session.MuxSession` is an ``asyncio.Protocol``. It needs from its
transport only the surface of :class:`MuxTransport` (which every asyncio stream
transport has) and calls nothing else. In return the transport drives the session
through the Protocol callbacks: ``connection_made``, ``data_received`` (any slicing of
the byte stream), ``eof_received``, ``connection_lost``, ``pause_writing`` and
``resume_writing``.

Over raw TCP the asyncio transport is used as is (:func:`connect_tcp`,
:func:`serve_tcp`). Over WebSocket, :class:`WebSocketTransport` sits between the TCP
transport and the session after the HTTP upgrade: each ``write`` from the session (one
``data_to_send`` output) becomes one binary message, each binary message received is
fed to ``data_received``, and flow control passes straight through.
"""
from __future__ import annotations

import asyncio
import inspect
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Optional, Protocol, Union

from relay.aio.session import MuxSession
from relay.mux.connection import MuxConfig

if TYPE_CHECKING:  # mypy checks the pure-Python twin: cython's no-op declarations
    from relay.mux import _cython_shim as cython
else:
    try:
        import cython
    except ImportError:  # runs uncompiled without Cython installed
        from relay.mux import _cython_shim as cython


class MuxTransport(Protocol):
    """What a MuxSession calls on its transport (asyncio.Transport satisfies it)."""

    def write(self, data: bytes) -> None: ...
    # Optional: ``writelines(buffers)``, used when present to write a list of buffers
    # without joining them first (asyncio transports and WebSocketTransport have it).
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def is_closing(self) -> bool: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


class CarriedProtocol(Protocol):
    """What a :class:`WebSocketTransport` drives: an asyncio stream protocol by its
    callbacks (a MuxSession; relay.gateway.agents.tunnel_sessions carries a StreamSplice)."""

    def connection_made(self, transport: Any) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> Optional[bool]: ...
    def connection_lost(self, exc: Optional[BaseException]) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...


SessionCallback = Callable[[MuxSession], Union[Awaitable[None], None]]
_BINARY = 0x2  # WebSocket binary message opcode (relay.ws.Opcode.BINARY)
#: An unmasked message of at most this many bytes is joined into one buffer to be
#: written; a larger one goes to the socket as its parts (one ``writev``, no copy).
JOIN_BELOW = 4096


async def connect_tcp(host: str, port: int, *, client: bool = True, config: Optional[MuxConfig] = None,
                      **session_kwargs: Any) -> MuxSession:
    """Dial ``host:port`` and run a session over the raw TCP connection.

    Extra keyword arguments go to :class:`MuxSession` (``on_stream``, ``on_control``).
    """
    loop = asyncio.get_running_loop()
    def factory() -> MuxSession:
        return MuxSession(client, config, **session_kwargs)

    # Compiled, MuxSession is an extension type, which cannot subclass asyncio.Protocol.
    _, session = await loop.create_connection(factory, host, port)  # type: ignore[type-var]  # a duck-typed protocol (see above)
    return session


async def serve_tcp(on_session: SessionCallback, host: str, port: int, *, config: Optional[MuxConfig] = None,
                    client: bool = False, **session_kwargs: Any) -> asyncio.Server:
    """Listen on ``host:port``; every connection becomes a MuxSession (``client=False``).

    ``on_session(session)`` is called as each connection arrives; if it returns an
    awaitable, that runs as a task. Extra keyword arguments go to :class:`MuxSession`.
    """
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Future[None]] = set()

    def factory() -> MuxSession:
        session = MuxSession(client, config, **session_kwargs)
        result = on_session(session)
        if inspect.isawaitable(result):
            # Any awaitable, as SessionCallback says (create_task takes only coroutines).
            task = asyncio.ensure_future(result, loop=loop)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        return session

    return await loop.create_server(factory, host, port)  # type: ignore[arg-type]  # a duck-typed protocol (see above)


class WebSocketTransport:
    """Carry a MuxSession over WebSocket binary messages (after the HTTP upgrade).

    An asyncio protocol by its methods, not by its base: compiled, it is an extension
    type, which cannot subclass ``asyncio.Protocol`` (event loops only duck-type it).

    It is the Protocol of the underlying TCP/TLS transport, and the transport of the
    session. ``client=True`` masks outgoing frames and expects unmasked ones, as
    RFC 6455 requires of the side that opened the WebSocket. Pings are answered, a
    close frame is echoed and ends the session; text messages are a protocol error.
    While the socket's write buffer is above its high-water mark only the latest ping
    is remembered and answered once it drains (RFC 6455 §5.5.3 allows answering only
    the most recent): a peer that sends pings and reads nothing cannot grow our buffer.

    Use :meth:`attach` to switch an already connected transport over (bytes read past
    the handshake are passed as ``initial``).
    """

    def __init__(self, session: CarriedProtocol, *, client: bool, max_message_size: int = 16 * 1024 * 1024) -> None:
        from relay import ws  # imported here: the raw TCP path must not need relay.ws

        self._ws = ws
        self.session = session
        self._client = client
        self._parser = ws.FrameParser(max_message_size, not client)
        self._transport: Any = None
        self._close_sent = False
        self._write_paused = False
        self._unanswered_ping: Optional[bytes] = None  # the latest, while writing is paused

    @classmethod
    def attach(cls, transport: asyncio.Transport, session: CarriedProtocol, *, client: bool,
               initial: bytes = b"", **kwargs: Any) -> "WebSocketTransport":
        """Make ``transport`` (handshake already done) carry ``session``."""
        adapter = cls(session, client=client, **kwargs)
        # Compiled, WebSocketTransport is an extension type, which cannot subclass asyncio.Protocol.
        transport.set_protocol(adapter)  # type: ignore[arg-type]  # a duck-typed protocol (see above)
        adapter.connection_made(transport)
        if initial:
            adapter.data_received(initial)
        return adapter

    # -- the session's transport

    def write(self, data: bytes) -> None:
        if self._close_sent:
            return
        self._transport.write(self._ws.encode_frame(_BINARY, data, mask=self._client))

    @cython.locals(total=cython.longlong)
    def writelines(self, parts: Iterable[Any]) -> None:
        """Several buffers (a session's ``data_to_send_parts``) as one binary message,
        with no copy of the payload of our own when unmasked (the header and the parts go
        to the socket in one ``writev``), and one copy that also masks when masked."""
        if self._close_sent:
            return
        ws = self._ws
        if self._client:
            self._transport.write(ws.encode_frame_parts(_BINARY, parts, mask=True))
            return
        parts = tuple(parts)
        total = 0
        for part in parts:
            total += len(part)
        header = ws.encode_header(_BINARY, total)
        if total <= JOIN_BELOW:
            # A small message (a request, an answer): one joined buffer costs less than
            # the transport's per-buffer bookkeeping of a gathered write.
            self._transport.write(b"".join((header, *parts)))
        else:
            self._transport.writelines((header, *parts))

    def close(self) -> None:
        self._send_close(self._ws.CloseCode.NORMAL)
        self._transport.close()

    def abort(self) -> None:
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._close_sent or self._transport.is_closing()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_write_buffer_limits(self, high: Optional[int] = None, low: Optional[int] = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    # -- the TCP transport's protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self.session.connection_made(self)

    def data_received(self, data: bytes) -> None:
        ws = self._ws
        try:
            messages = self._parser.feed(data)
        except ws.WebSocketProtocolError as exc:
            self._send_close(getattr(exc, "close_code", ws.CloseCode.PROTOCOL_ERROR))
            self._transport.close()
            return
        session = self.session
        for opcode, payload in messages:
            if opcode == _BINARY:
                session.data_received(payload)
            elif opcode == ws.Opcode.PING:
                if self._write_paused:
                    self._unanswered_ping = bytes(payload)
                else:
                    self._transport.write(ws.encode_frame(ws.Opcode.PONG, payload, mask=self._client))
            elif opcode == ws.Opcode.CLOSE:
                self._close_received(payload)
                return
            elif opcode == ws.Opcode.TEXT:
                if not self._text_received(payload):
                    return
            # PONG: nothing to do (liveness is the mux's PING)

    def eof_received(self) -> None:
        self.session.eof_received()
        return None

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._unanswered_ping = None
        self.session.connection_lost(exc)

    def pause_writing(self) -> None:
        self._write_paused = True
        self.session.pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        ping = self._unanswered_ping
        if ping is not None:
            self._unanswered_ping = None
            if not self._close_sent:
                ws = self._ws
                self._transport.write(ws.encode_frame(ws.Opcode.PONG, ping, mask=self._client))
        self.session.resume_writing()

    def _close_received(self, payload: Any) -> None:
        """A close frame: answer it and close. A subclass may read the peer's code first
        (the TCP-over-WebSocket tunnel tells a clean end from a reset by it)."""
        self._send_close(self._ws.CloseCode.NORMAL)
        self._transport.close()

    def _text_received(self, payload: Any) -> bool:
        """A text message, which the mux does not define: close with 1003. A subclass may
        give some a meaning; returns whether to go on with the messages received."""
        self._send_close(self._ws.CloseCode.UNSUPPORTED_DATA)
        self._transport.close()
        return False

    def _send_close(self, code: int) -> None:
        if not self._close_sent and not self._transport.is_closing():
            ws = self._ws
            self._transport.write(ws.encode_frame(ws.Opcode.CLOSE, ws.encode_close_payload(code), mask=self._client))
        self._close_sent = True
