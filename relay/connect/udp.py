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
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional, cast
from urllib.parse import urlsplit

from relay.aio.datagrams import send_datagram
from relay.mux.datagrams import DEFAULT_IDLE_TIMEOUT, DEFAULT_QUEUE_BYTES, MAX_DATAGRAM, DatagramFlow

__all__ = ["UdpConnect", "run_connect_udp"]

log = logging.getLogger("relay.connect")

#: How long opening one flow's WebSocket may take.
OPEN_TIMEOUT = 15.0


class _Flow:
    """One local client address and its WebSocket."""

    def __init__(self, addr: Any, now: float, idle_timeout: float) -> None:
        self.addr = addr
        self.state = DatagramFlow(now, idle_timeout=idle_timeout)
        self.writer: Optional[asyncio.StreamWriter] = None
        self.task: Optional[asyncio.Task] = None


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

    def datagram_received(self, data: bytes, addr: Any) -> None:
        flow = self.flows.get(addr)
        if flow is None:
            flow = self.flows[addr] = _Flow(addr, self._loop.time(), self.idle_timeout)
            self.flows_total += 1
            flow.task = self._loop.create_task(self._run(flow))
        writer = flow.writer
        if writer is None:  # still opening: wait in the flow's queue
            self.dropped += flow.state.from_local(data, self._loop.time())
            return
        from relay.ws import Opcode, encode_frame

        state = flow.state
        if len(data) > MAX_DATAGRAM:
            state.too_large += 1
            return
        state.last_activity = self._loop.time()
        state.datagrams_in += 1
        state.bytes_in += len(data)
        if writer.transport.get_write_buffer_size() > DEFAULT_QUEUE_BYTES:
            state.to_stream.count_drop(len(data))  # the gateway is slower than the client
            self.dropped += 1
            return
        writer.write(encode_frame(Opcode.BINARY, data, mask=True))

    def error_received(self, exc: Exception) -> None:
        log.debug("local udp socket: %s", exc)

    def close(self) -> None:
        for flow in list(self.flows.values()):
            if flow.task is not None:
                flow.task.cancel()
        if self.transport is not None:
            self.transport.close()

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        from relay.ws.handshake import ClientHandshake

        split = self._split
        tls = split.scheme == "wss"
        port = split.port or (443 if tls else 80)
        handshake = ClientHandshake(split.netloc, split.path or "/")
        async with asyncio.timeout(OPEN_TIMEOUT):
            reader, writer = await asyncio.open_connection(
                split.hostname, port, ssl=(self._ssl or True) if tls else None)
            writer.write(handshake.request_bytes())
            accepted = None
            while accepted is None:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("the gateway closed the connection during the upgrade")
                accepted = handshake.receive_data(data)
        return reader, writer, accepted.leftover

    async def _run(self, flow: _Flow) -> None:
        from relay.ws import CloseCode, FrameParser, Opcode, encode_close_payload, encode_frame, parse_close

        writer: Optional[asyncio.StreamWriter] = None
        try:
            reader, writer, leftover = await self._open()
            state = flow.state
            while True:  # what waited for the WebSocket goes first
                datagram = state.to_stream.pop()
                if datagram is None:
                    break
                writer.write(encode_frame(Opcode.BINARY, datagram, mask=True))
            flow.writer = writer
            parser = FrameParser(MAX_DATAGRAM, False)
            messages = parser.feed(leftover)
            while True:
                for opcode, payload in messages:
                    if opcode == Opcode.BINARY:
                        state.last_activity = self._loop.time()
                        state.datagrams_out += 1
                        state.bytes_out += len(payload)
                        if self.transport is not None and not self.transport.is_closing():
                            send_datagram(self.transport, bytes(payload), flow.addr)
                    elif opcode == Opcode.PING:
                        writer.write(encode_frame(Opcode.PONG, payload, mask=True))
                    elif opcode == Opcode.CLOSE:
                        code, reason = parse_close(payload)
                        if code != CloseCode.NORMAL:
                            log.info("udp flow from %s: the gateway closed it: %s %s", flow.addr, code, reason)
                        writer.write(encode_frame(Opcode.CLOSE, encode_close_payload(CloseCode.NORMAL), mask=True))
                        return
                remaining = state.deadline - self._loop.time()
                if remaining <= 0:
                    writer.write(encode_frame(Opcode.CLOSE, encode_close_payload(CloseCode.NORMAL, "idle"),
                                              mask=True))
                    return
                try:
                    async with asyncio.timeout(remaining):
                        data = await reader.read(256 * 1024)
                except TimeoutError:
                    messages = []
                    continue
                if not data:
                    return
                messages = parser.feed(data)
        except asyncio.CancelledError:
            if writer is not None and not writer.is_closing():
                writer.write(encode_frame(Opcode.CLOSE, encode_close_payload(CloseCode.GOING_AWAY), mask=True))
            raise
        except Exception as exc:  # one failed flow must not end the others
            log.warning("udp flow from %s failed: %s", flow.addr, exc)
        finally:
            if self.flows.get(flow.addr) is flow:
                del self.flows[flow.addr]
            if writer is not None:
                writer.close()


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
