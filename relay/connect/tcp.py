"""``relay connect`` for tcp tunnels: local TCP connections carried to a tunnel's
``ws(s)://HOST/tunnel/TOKEN/tcp`` URL, in one of two forms (docs/PROTOCOL.md section 14).

* **Multiplexed** (``--mode mux``; what ``auto``, the default, uses): one WebSocket to the
  URL, offered the subprotocol ``relay.mux.v1``, carries one mux session; every local
  connection is one stream on it, spliced with :class:`~relay.aio.StreamSplice` exactly
  as a hub port connection is at the gateway: per-stream flow control and backpressure,
  half-close both ways (FIN), resets both ways (RESET; a local RST, and an RST towards
  the local client when the stream is reset or the session ends). The session is
  opened at start and opened again whenever it drops (backoff from 0.1 s to 5 s); while
  there is none, a new local connection waits, unread, up to :data:`SESSION_WAIT`
  seconds for it and is then reset. Connections whose streams ran on a session that
  dropped are reset (their bytes may be cut short).
* **Plain** (``--mode plain``): one WebSocket per local connection, with the text
  ``EOF`` / close 4000 convention of relay.ws.tcp_tunnel, the form third-party WebSocket
  clients use. ``auto`` falls back to it, with one warning, when the gateway upgrades
  without the subprotocol (a gateway older than the multiplexed form): that probe's
  WebSocket is closed with 1000 at once, which the old gateway relays as one empty
  connection to the target.

A gateway answering 401, 403 or 404 (a wrong token, or a tunnel that was closed) stops
``relay connect`` with that error (:class:`TunnelUnavailable`); other failures (gateway
unreachable, agent offline: 503) are retried.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, Optional
from urllib.parse import urlsplit

from relay.aio.stream import StreamRefused, StreamSplice, abort_with_reset

__all__ = ["CONNECT_MODES", "SESSION_WAIT", "MuxConnector", "TunnelUnavailable", "run_connect"]

log = logging.getLogger("relay.connect")

#: ``--mode`` values: auto (multiplexed, plain against an older gateway), mux, plain.
CONNECT_MODES = ("auto", "mux", "plain")
#: Seconds a new local connection waits for the multiplexed session (while it is being
#: opened, at start or again) before it is reset: as long as opening one may take.
SESSION_WAIT = 15.0
#: Reconnection backoff of the multiplexed session: first delay, then doubled up to this.
RECONNECT_INITIAL = 0.1
RECONNECT_MAX = 5.0
#: A session that lasted this long starts the backoff over; one the gateway ends sooner
#: is retried with the growing delay (a gateway that drops it at once is not hammered).
STABLE_SESSION = 5.0
#: How long opening the session (TCP, TLS, upgrade, SETTINGS) may take.
HANDSHAKE_TIMEOUT = SESSION_WAIT
#: Metadata of every stream: one TCP connection to the tunnel's target.
STREAM_METADATA = {"protocol": "tcp"}


class TunnelUnavailable(Exception):
    """The gateway refused the tunnel URL for good (401, 403, 404), or the multiplexed
    form was required and the gateway does not speak it."""


#: Largest WebSocket message accepted from the gateway by ``relay connect``.
CONNECT_MAX_MESSAGE = 16 * 1024 * 1024
#: How long a finished connection waits for the gateway's closing handshake, and for
#: its local client to take the last bytes.
CONNECT_CLOSE_TIMEOUT = 5.0


class _TunnelReset(Exception):
    """The byte stream was cut: the gateway reset it, or the WebSocket failed."""


class _LocalReset(Exception):
    """The local connection was reset (or writing to it failed)."""


async def _ws_bridge(url: str, ssl_context: Any, local_reader: asyncio.StreamReader,
                     local_writer: asyncio.StreamWriter) -> None:
    """Carry one local TCP connection over one WebSocket to a TCP tunnel's URL, with
    the convention of relay.ws.tcp_tunnel (docs/PROTOCOL.md section 14.2):

    * bytes both ways as binary messages, with backpressure both ways (a side is read
      only while the other takes what was read);
    * local EOF is the text message ``EOF`` (the gateway ends the stream after the
      bytes before it, and the reply keeps coming); ``EOF`` from the gateway is
      ``shutdown(SHUT_WR)`` of the local connection;
    * the gateway's close 1000 (once both directions ended) closes the local connection
      after its last byte;
    * a reset, either way, is never a clean end: a local reset (or a failed local write)
      is close 4000 to the gateway, which resets the stream; close 4000 (or any other
      code, a close 1000 before our upload ended, or a WebSocket that breaks without a
      closing handshake) aborts the local connection with a TCP RST.
    """
    from urllib.parse import urlsplit

    from relay.aio.stream import abort_with_reset
    from relay.ws import (
        CloseCode,
        FrameParser,
        Opcode,
        WebSocketProtocolError,
        encode_close_payload,
        encode_frame,
        parse_close,
    )
    from relay.ws.handshake import ClientHandshake
    from relay.ws.tcp_tunnel import CLOSE_RESET, EOF_MESSAGE

    split = urlsplit(url)
    tls = split.scheme == "wss"
    port = split.port or (443 if tls else 80)
    handshake = ClientHandshake(split.netloc, split.path or "/")
    try:
        ws_reader, ws_writer = await asyncio.open_connection(
            split.hostname, port, ssl=(ssl_context or True) if tls else None)
    except BaseException:
        abort_with_reset(local_writer.transport)  # no tunnel: the client must not see an end
        raise
    eof_sent = False
    close_sent = False
    clean = False

    def send_close(code: int, reason: str = "") -> None:
        nonlocal close_sent
        if not close_sent and not ws_writer.is_closing():
            close_sent = True
            ws_writer.write(encode_frame(Opcode.CLOSE, encode_close_payload(code, reason), mask=True))

    try:
        ws_writer.write(handshake.request_bytes())
        accepted = None
        while accepted is None:
            accepted = handshake.receive_data(await ws_reader.read(65536))
        parser = FrameParser(CONNECT_MAX_MESSAGE, False)

        async def upstream() -> None:  # local -> WebSocket
            nonlocal eof_sent
            while True:
                try:
                    data = await local_reader.read(256 * 1024)
                except ConnectionError as exc:
                    raise _LocalReset(str(exc) or type(exc).__name__) from None
                if not data:
                    break
                ws_writer.write(encode_frame(Opcode.BINARY, data, mask=True))
                await ws_writer.drain()
            eof_sent = True  # before the drain: the gateway may answer before it returns
            ws_writer.write(encode_frame(Opcode.TEXT, EOF_MESSAGE, mask=True))
            await ws_writer.drain()

        async def write_local(data: Any) -> None:
            try:
                local_writer.write(data)
                await local_writer.drain()
            except ConnectionError as exc:
                raise _LocalReset(str(exc) or type(exc).__name__) from None

        async def downstream() -> None:  # WebSocket -> local; returns at a clean end
            messages = parser.feed(accepted.leftover)
            while True:
                for opcode, payload in messages:
                    if opcode == Opcode.BINARY:
                        if payload:
                            await write_local(payload)
                    elif opcode == Opcode.TEXT:
                        if bytes(payload) != EOF_MESSAGE:
                            send_close(CloseCode.UNSUPPORTED_DATA)
                            raise _TunnelReset("unexpected text message from the gateway")
                        if local_writer.can_write_eof() and not local_writer.is_closing():
                            try:
                                local_writer.write_eof()
                            except OSError as exc:
                                raise _LocalReset(str(exc)) from None
                    elif opcode == Opcode.PING:
                        ws_writer.write(encode_frame(Opcode.PONG, payload, mask=True))
                    elif opcode == Opcode.CLOSE:
                        code, reason = parse_close(payload)
                        send_close(CloseCode.NORMAL if code == CloseCode.NORMAL else code, reason)
                        if code == CloseCode.NORMAL and eof_sent:
                            return
                        raise _TunnelReset(f"the gateway closed the tunnel with {code}"
                                           f"{': ' + reason if reason else ''}")
                try:
                    data = await ws_reader.read(256 * 1024)
                except ConnectionError as exc:
                    raise _TunnelReset(f"the gateway connection failed: {exc}") from None
                if not data:
                    raise _TunnelReset("the gateway connection ended without a closing handshake")
                messages = parser.feed(data)

        up = asyncio.ensure_future(upstream())
        down = asyncio.ensure_future(downstream())
        try:
            pending: set[asyncio.Future] = {up, down}
            while down in pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if up in done:
                    up.result()  # an upload that failed ends the connection at once
            down.result()
            clean = True
        finally:
            up.cancel()
            down.cancel()
    except _LocalReset as exc:
        send_close(CLOSE_RESET, f"local connection reset: {exc}")
        abort_with_reset(local_writer.transport)
        raise
    except BaseException as exc:  # _TunnelReset, a broken WebSocket, cancellation (stopping)
        if isinstance(exc, WebSocketProtocolError):
            send_close(exc.close_code, str(exc))
        elif isinstance(exc, asyncio.CancelledError):
            send_close(CloseCode.GOING_AWAY, "relay connect stopping")
        abort_with_reset(local_writer.transport)
        raise
    finally:
        if clean:
            local_writer.close()  # after the last byte
            try:
                async with asyncio.timeout(CONNECT_CLOSE_TIMEOUT):
                    await local_writer.wait_closed()
            except (TimeoutError, ConnectionError):
                abort_with_reset(local_writer.transport)
        ws_writer.close()




# ----------------------------------------------------------------------------- multiplexed


class _LocalSplice(StreamSplice):
    """A local connection's splice that says why the gateway refused its stream (a
    method, not a task per connection: connections should cost little)."""

    __slots__ = ()  # no instance dict per connection

    def _mux_reset(self, exc: BaseException) -> None:
        if isinstance(exc, StreamRefused):
            log.warning("connection refused: %s", exc)
        super()._mux_reset(exc)


class _Waiting:
    """Protocol of a local connection accepted while no session is up: nothing is read
    until :meth:`hand_over` gives it its real protocol, or :data:`SESSION_WAIT` passes
    (then it is reset)."""

    def __init__(self, connector: MuxConnector) -> None:
        self._connector = connector
        self.transport: Any = None
        self._early: list[bytes] = []  # only if the loop delivered before pause_reading took
        self._eof = False
        self._lost = False
        self._timer: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.pause_reading()
        self._connector._waiting.add(self)
        self._timer = asyncio.get_running_loop().call_later(SESSION_WAIT, self.give_up)
        # The loop calls this an iteration after the factory: the session may have come
        # up in between, and its release of the waiting connections did not see us.
        if self._connector.ready():
            self._connector._release_waiting()

    def data_received(self, data: bytes) -> None:
        self._early.append(data)

    def eof_received(self) -> bool:
        self._eof = True
        return True  # stay open: the reply may still come

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._lost = True
        self._done()

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def _done(self) -> None:
        self._connector._waiting.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def give_up(self) -> None:
        """No session in time (or none coming): reset the local connection."""
        self._done()
        if not self._lost:
            log.warning("no session to the gateway within %.0fs: local connection reset", SESSION_WAIT)
            abort_with_reset(self.transport)

    def hand_over(self, protocol: Any) -> None:
        """Make ``protocol`` the connection's protocol and start reading."""
        self._done()
        transport = self.transport
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        transport.resume_reading()
        for data in self._early:
            protocol.data_received(data)
        if self._eof and not protocol.eof_received():
            transport.close()


class MuxConnector:
    """The local connections of one ``relay connect`` and the session carrying them
    (module docstring). :meth:`protocol` is the local server's protocol factory;
    :meth:`run` keeps the session up."""

    def __init__(self, url: str, *, ssl_context: Any = None, mode: str = "auto") -> None:
        if mode not in CONNECT_MODES:
            raise ValueError(f"mode must be one of {', '.join(CONNECT_MODES)}")
        self.url = url
        self.mode = mode
        self._split = urlsplit(url)
        self._ssl = ssl_context
        self.session: Any = None  # the MuxSession while it is up
        #: True once connections go one WebSocket each (``--mode plain``, or the fallback).
        self.plain = mode == "plain"
        #: Sessions opened so far (1 while the first one lasts).
        self.sessions_opened = 0
        self._waiting: set[_Waiting] = set()
        self._tasks: set[asyncio.Task] = set()

    # -- local connections

    def protocol(self) -> Any:
        """A protocol for a new local connection: a splice to a new stream when the
        session is up, else a waiting one (or, in the plain form, a WebSocket bridge)."""
        if self.plain:
            return self._plain_protocol()
        stream = self._open_stream()
        if stream is None:
            return _Waiting(self)
        return _LocalSplice(stream)

    def ready(self) -> bool:
        """Can a new local connection get its protocol now (a session, or the plain form)?"""
        session = self.session
        return self.plain or (session is not None and not session.is_closed and session.goaway_received is None)

    def _open_stream(self) -> Any:
        session = self.session
        if session is None or session.is_closed or session.goaway_received is not None:
            return None
        try:
            return session.open_stream_nowait(STREAM_METADATA)
        except ConnectionError:
            return None

    def _plain_protocol(self) -> Any:
        reader = asyncio.StreamReader()
        return asyncio.StreamReaderProtocol(reader, self._plain_connection)

    async def _plain_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await _ws_bridge(self.url, self._ssl, reader, writer)
        except _LocalReset as exc:
            log.info("local connection reset: %s", exc)
        except Exception as exc:  # one failed connection must not end the others
            # (the local connection was reset already: a failure is never a clean end)
            log.warning("tunnel connection failed: %s", exc)
        finally:
            if task is not None:
                self._tasks.discard(task)

    def _release_waiting(self) -> None:
        """The session is up, or the form is decided: hand the waiting connections over."""
        for waiting in list(self._waiting):
            if waiting._lost:
                waiting._done()
                continue
            if self.plain:
                waiting.hand_over(self._plain_protocol())
                continue
            stream = self._open_stream()
            if stream is None:
                return  # the session went again: they keep waiting
            waiting.hand_over(_LocalSplice(stream))

    # -- the session

    async def dial(self) -> Any:
        """Open one multiplexed session to the tunnel URL and return it once established.
        Raises SubprotocolDeclined (an older gateway), HandshakeRejected, OSError,
        TimeoutError or ConnectionError."""
        from relay import __version__
        from relay.aio import MuxSession
        from relay.aio.dial import dial_session
        from relay.mux.connection import MuxConfig
        from relay.mux.errors import ErrorCode
        from relay.ws.handshake import ClientHandshake
        from relay.ws.tcp_tunnel import MUX_SUBPROTOCOL

        split = self._split
        tls = split.scheme == "wss"
        port = split.port or (443 if tls else 80)
        config = MuxConfig(info={"client": "relay connect", "version": __version__})
        session = MuxSession(True, config,
                             on_stream=lambda stream: stream.refuse(ErrorCode.REFUSED, "relay connect serves no streams"),
                             on_control=lambda message: None)
        handshake = ClientHandshake(split.netloc, split.path or "/", subprotocols=[MUX_SUBPROTOCOL])
        await dial_session(session, handshake, split.hostname or "", port, timeout=HANDSHAKE_TIMEOUT,
                           ssl_context=(self._ssl or ssl.create_default_context()) if tls else None,
                           require_subprotocol=MUX_SUBPROTOCOL)
        return session

    async def run(self) -> None:
        """Keep the multiplexed session up until cancelled; returns at once in the plain
        form, and when ``auto`` falls back to it. Raises :class:`TunnelUnavailable`."""
        from relay.aio.dial import SubprotocolDeclined
        from relay.ws.handshake import HandshakeError, HandshakeRejected

        attempt = 0
        try:
            while not self.plain:
                try:
                    session = await self.dial()
                except SubprotocolDeclined:
                    if self.mode == "mux":
                        raise TunnelUnavailable("the gateway does not offer multiplexed sessions "
                                                "(an older gateway): use --mode plain") from None
                    log.warning("the gateway does not offer multiplexed sessions (an older gateway): "
                                "one WebSocket per connection")
                    self.plain = True
                    self._release_waiting()
                    return
                except HandshakeRejected as exc:
                    if exc.status_code in (401, 403, 404):
                        why = ": the tunnel is closed or the token wrong" if exc.status_code == 404 else ""
                        raise TunnelUnavailable(f"the gateway refused the tunnel URL "
                                                f"(HTTP {exc.status_code}{why})") from None
                    reason = str(exc)
                except (OSError, HandshakeError, TimeoutError, ConnectionError) as exc:
                    reason = str(exc) or type(exc).__name__
                else:
                    self.session = session
                    self.sessions_opened += 1
                    opened_at = asyncio.get_running_loop().time()
                    if self.sessions_opened > 1:
                        log.warning("session to the gateway open again")
                    self._release_waiting()
                    try:
                        await session.wait_closed()
                    finally:
                        self.session = None
                    goaway = session.goaway_received
                    reason = f"the gateway ended it: {goaway.message}" if goaway is not None and goaway.message \
                        else "connection lost"
                    log.warning("session to the gateway ended (%s); its connections were reset", reason)
                    if asyncio.get_running_loop().time() - opened_at >= STABLE_SESSION:
                        attempt = 0
                        continue  # at once: the first retry after a good session needs no delay
                delay = min(RECONNECT_MAX, RECONNECT_INITIAL * 2 ** attempt)
                attempt += 1
                log.warning("no session to the gateway (%s); retrying in %.1fs", reason, delay)
                await asyncio.sleep(delay)
        except BaseException:
            for waiting in list(self._waiting):
                waiting.give_up()
            raise

    def stop(self) -> None:
        """Stop: the session's streams and every plain connection are reset."""
        from relay.mux.errors import ErrorCode

        session = self.session
        if session is not None:
            session.abort(ErrorCode.GOING_AWAY, "relay connect stopping")
        for waiting in list(self._waiting):
            waiting.give_up()
        for task in list(self._tasks):
            task.cancel()


async def run_connect(url: str, host: str, port: int, *, ssl_context: Any = None,
                      echo: Any = print, stop: Optional[asyncio.Event] = None, mode: str = "auto") -> None:
    """Listen on ``host:port``; every local connection becomes one stream to the tunnel's
    target through the TCP tunnel URL ``url`` (module docstring). Runs until ``stop`` or
    SIGINT/SIGTERM; raises :class:`TunnelUnavailable` if the gateway refuses the URL."""
    import signal

    connector = MuxConnector(url, ssl_context=ssl_context, mode=mode)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(connector.protocol, host, port)
    bound = server.sockets[0].getsockname()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    form = "one WebSocket per connection" if connector.plain else "multiplexed"
    echo(f"relay connect listening on {bound[0]}:{bound[1]} -> {url.split('/tunnel/')[0]}/tunnel/… ({form})")
    session_task = loop.create_task(connector.run())
    stop_task = loop.create_task(stop.wait())
    try:
        await asyncio.wait({session_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if session_task.done() and not connector.plain:
            session_task.result()  # TunnelUnavailable
        if not stop_task.done():
            await stop_task  # the plain form: nothing to keep up
    finally:
        server.close()
        session_task.cancel()
        stop_task.cancel()
        connector.stop()
