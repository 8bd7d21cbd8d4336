"""``relay connect --udp``: a local UDP port whose flows reach a udp tunnel through the
gateway's HTTP port (docs/PROTOCOL.md section 16.2).

Each local flow (one client address and port) becomes one WebSocket to the tunnel's
``ws(s)://HOST/tunnel/TOKEN/udp`` URL, and so one flow at the agent; each datagram is
one binary message each way. Datagrams that arrive while the WebSocket is being opened
wait in the flow's drop-oldest queue (relay.mux.datagrams); once it is open, a datagram
the socket cannot take soon (more than a queue's worth unsent) is dropped, as UDP
would. A flow ends after ``idle_timeout`` seconds without a datagram either way (close
1000), or when the gateway closes the WebSocket (its own idle timeout, or the tunnel's
end); the next datagram from that address opens a new one.

Both sockets are driven by protocol callbacks, not tasks: a datagram costs no task
wake-up and no timer each way. The frames of the datagrams read in one loop turn go to
the WebSocket in one write (one ``send`` for a burst), and the local socket asks for
:data:`SOCKET_BUFFER` so that a burst waits in the kernel rather than being dropped
while the loop is busy with the other direction.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional, cast
from urllib.parse import urlsplit

from relay.aio.datagrams import send_datagram, size_socket_buffers
from relay.mux.datagrams import DEFAULT_IDLE_TIMEOUT, DEFAULT_QUEUE_BYTES, MAX_DATAGRAM, DatagramFlow
from relay.ws import CloseCode, FrameParser, Opcode, encode_close_payload, encode_frame, parse_close
from relay.ws.handshake import ClientHandshake

__all__ = ["SOCKET_BUFFER", "UdpConnect", "run_connect_udp"]

log = logging.getLogger("relay.connect")

#: How long opening one flow's WebSocket may take.
OPEN_TIMEOUT = 15.0

#: Receive and send buffer asked for the local UDP socket, as the gateway's hub port
#: does (relay.gateway.agents.udp_hub): the kernel's default holds a few dozen large
#: datagrams, a few milliseconds of a busy client.
SOCKET_BUFFER = 4 * 1024 * 1024


class _Flow(asyncio.Protocol):
    """One local client address and its WebSocket (the protocol of its TCP connection)."""

    def __init__(self, owner: UdpConnect, addr: Any, now: float) -> None:
        self.owner = owner
        self.addr = addr
        self.state = DatagramFlow(now, idle_timeout=owner.idle_timeout)
        self.transport: Optional[asyncio.Transport] = None
        split = owner._split
        self._handshake: Optional[ClientHandshake] = ClientHandshake(split.netloc, split.path or "/")
        self._parser: Optional[Any] = None
        #: Set once the WebSocket is open (or failed to open).
        self.opened: asyncio.Future[None] = owner._loop.create_future()
        self.task: Optional[asyncio.Task] = None
        #: Frames written at the end of this loop turn, in one write.
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._paused = False
        self._timer: Optional[asyncio.TimerHandle] = None

    @property
    def is_open(self) -> bool:
        return self._parser is not None and self.transport is not None and not self.transport.is_closing()

    # -- the WebSocket's TCP connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        assert self._handshake is not None
        self.transport.write(self._handshake.request_bytes())

    def data_received(self, data: bytes) -> None:
        if self._parser is None:
            if self._handshake is None:
                return
            try:
                accepted = self._handshake.receive_data(data)
            except Exception as exc:  # a refusal (404, 503...) or a broken answer
                self._fail(exc)
                return
            if accepted is None:
                return
            self._handshake = None
            self._start()
            data = accepted.leftover
            if not data:
                return
        try:
            messages = self._parser.feed(data)  # type: ignore[union-attr]  # set by _start
        except Exception as exc:  # a protocol error from the gateway
            log.warning("udp flow from %s: %s", self.addr, exc)
            self._send_close(CloseCode.PROTOCOL_ERROR)
            return
        owner = self.owner
        local = owner.transport
        state = self.state
        for opcode, payload in messages:
            if opcode == Opcode.BINARY:
                state.datagrams_out += 1
                state.bytes_out += len(payload)
                if local is not None and not local.is_closing():
                    send_datagram(local, payload, self.addr)
            elif opcode == Opcode.PING:
                self._write(encode_frame(Opcode.PONG, payload, mask=True))
            elif opcode == Opcode.CLOSE:
                code, reason = parse_close(payload)
                if code != CloseCode.NORMAL:
                    log.info("udp flow from %s: the gateway closed it: %s %s", self.addr, code, reason)
                self._send_close(CloseCode.NORMAL)
                return
        if messages:
            state.last_activity = owner._loop.time()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("the gateway closed the connection during the upgrade"))
        if self._timer is not None:
            self._timer.cancel()
        owner = self.owner
        if owner.flows.get(self.addr) is self:
            del owner.flows[self.addr]

    # -- datagrams from the local client

    def from_local(self, data: bytes) -> None:
        state = self.state
        now = self.owner._loop.time()
        if self._parser is None:  # still opening: wait in the flow's queue
            self.owner.dropped += state.from_local(data, now)
            return
        if len(data) > MAX_DATAGRAM:
            state.too_large += 1
            return
        state.last_activity = now
        state.datagrams_in += 1
        state.bytes_in += len(data)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._paused and transport.get_write_buffer_size() + self._out_bytes > DEFAULT_QUEUE_BYTES:
            state.to_stream.count_drop(len(data))  # the gateway is slower than the client
            self.owner.dropped += 1
            return
        self._write(encode_frame(Opcode.BINARY, data, mask=True))

    # -- internals

    def _write(self, frame: bytes) -> None:
        if not self._out:
            self.owner._loop.call_soon(self._flush)
        self._out.append(frame)
        self._out_bytes += len(frame)

    def _flush(self) -> None:
        out, self._out, self._out_bytes = self._out, [], 0
        transport = self.transport
        if out and transport is not None and not transport.is_closing():
            transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _start(self) -> None:
        self._parser = FrameParser(MAX_DATAGRAM, False)
        queue = self.state.to_stream
        while True:  # what waited for the WebSocket goes first
            datagram = queue.pop()
            if datagram is None:
                break
            self._write(encode_frame(Opcode.BINARY, datagram, mask=True))
        self._timer = self.owner._loop.call_later(self.state.idle_timeout, self._check_idle)
        if not self.opened.done():
            self.opened.set_result(None)

    def _check_idle(self) -> None:
        remaining = self.state.deadline - self.owner._loop.time()
        if remaining > 0:
            self._timer = self.owner._loop.call_later(remaining, self._check_idle)
            return
        self._timer = None
        self._send_close(CloseCode.NORMAL, "idle")

    def _fail(self, exc: BaseException) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def _send_close(self, code: int, reason: str = "") -> None:
        """Our close frame after what is queued, then the end of the connection."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._parser is not None:
            self._out.append(encode_frame(Opcode.CLOSE, encode_close_payload(code, reason), mask=True))
            self._flush()
        transport.close()


class UdpConnect(asyncio.DatagramProtocol):
    """The local UDP socket of ``relay connect --udp`` and its flows."""

    def __init__(self, url: str, *, ssl_context: Any = None, idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        self.url = url
        self._split = urlsplit(url)
        self._ssl = ssl_context
        self.idle_timeout = idle_timeout
        self.flows: dict[Any, _Flow] = {}
        self.transport: Optional[asyncio.DatagramTransport] = None
        self._loop = asyncio.get_running_loop()
        #: Flows opened, and datagrams dropped (queue full, or a slow WebSocket) so far.
        self.flows_total = 0
        self.dropped = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # create_datagram_endpoint's transport
        size_socket_buffers(transport, SOCKET_BUFFER)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        flow = self.flows.get(addr)
        if flow is None:
            flow = self.flows[addr] = _Flow(self, addr, self._loop.time())
            self.flows_total += 1
            flow.task = self._loop.create_task(self._open(flow))
        flow.from_local(data)

    def error_received(self, exc: Exception) -> None:
        log.debug("local udp socket: %s", exc)

    def close(self) -> None:
        for flow in list(self.flows.values()):
            if flow.task is not None:
                flow.task.cancel()
            flow._send_close(CloseCode.GOING_AWAY)
        if self.transport is not None:
            self.transport.close()

    async def _open(self, flow: _Flow) -> None:
        """Connect ``flow``'s WebSocket; a failure ends that flow only."""
        split = self._split
        tls = split.scheme == "wss"
        port = split.port or (443 if tls else 80)
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                await self._loop.create_connection(lambda: flow, split.hostname or "", port,
                                                   ssl=(self._ssl or True) if tls else None)
                await flow.opened
        except asyncio.CancelledError:
            if flow.transport is not None:
                flow.transport.abort()
            raise
        except Exception as exc:  # one failed flow must not end the others
            log.warning("udp flow from %s failed: %s", flow.addr, exc or type(exc).__name__)
            if flow.transport is not None:
                flow.transport.abort()
            if self.flows.get(flow.addr) is flow:
                del self.flows[flow.addr]


async def run_connect_udp(url: str, host: str, port: int, *, ssl_context: Any = None,
                          idle_timeout: float = DEFAULT_IDLE_TIMEOUT, echo: Any = print,
                          stop: Optional[asyncio.Event] = None) -> None:
    """Listen for datagrams on ``host:port``; each local flow becomes one WebSocket to the
    udp tunnel URL ``url``. Runs until ``stop``/SIGINT."""
    import signal

    loop = asyncio.get_running_loop()
    transport, relay = await loop.create_datagram_endpoint(
        lambda: UdpConnect(url, ssl_context=ssl_context, idle_timeout=idle_timeout), local_addr=(host, port))
    bound = transport.get_extra_info("sockname")
    stop = stop or asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    echo(f"relay connect listening on udp {bound[0]}:{bound[1]} -> {url.split('/tunnel/')[0]}/tunnel/…")
    try:
        await stop.wait()
    finally:
        relay.close()
