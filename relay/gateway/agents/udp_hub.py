"""UDP hub ports: a tunnel's datagrams from clients, one mux stream per client flow.

A udp tunnel (seed 000 session with ``tunnel_protocol: "udp"``, or a Tunnels API tunnel
with ``protocol: "udp"``) listens on a UDP hub port on ``hub_host``. The first datagram
from a client address (IP and port) opens a *flow*: a mux stream to the agent with the
metadata ``{"protocol": "udp", "target": "HOST:PORT"}`` carrying datagram records
(relay.mux.datagrams, docs/PROTOCOL.md section 16); every later datagram of that
address goes into the same stream, and every datagram the target answers on it goes
back to that address from the hub port. So each client sees one UDP server, and
clients are kept apart as by a NAT.

Per flow (relay.aio.datagrams.DatagramPipe): an idle timeout (no datagram either way
for ``udp_idle_timeout`` seconds ends the flow: FIN, the agent closes its socket; the
next datagram opens a new flow), and a bounded queue that drops the oldest datagram
while the stream's window is spent. Datagrams dropped, delivered, and flows opened are
counted per hub (:meth:`UdpHub.stats`: the tunnel's stats and the gateway's metrics).

The agent may refuse a flow (its allowlist: NOT_ALLOWED; a target that cannot be
resolved: CONNECT_FAILED): the reason is kept as the hub's ``last_error`` and the
datagram is lost, as a UDP client expects. A hub port carries at most
:data:`MAX_UDP_FLOWS` flows at once; datagrams opening more are dropped (counted).

``relay connect --udp`` reaches a udp session through the gateway's HTTP port instead:
one WebSocket per local flow, one binary message per datagram (:func:`serve_websocket`).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, cast

from relay.aio import WebSocketTransport
from relay.aio.datagrams import DatagramPipe, send_datagram, size_socket_buffers
from relay.aio.session import MuxSession, SessionClosedError
from relay.mux.datagrams import DEFAULT_IDLE_TIMEOUT, DEFAULT_QUEUE_BYTES, MAX_DATAGRAM, UDP_PROTOCOL
from relay.ws.tcp_tunnel import CLOSE_RESET, reset_reason

if TYPE_CHECKING:
    from relay.gateway.agents.tunnel_sessions import HubListener, TunnelManager

__all__ = ["MAX_UDP_FLOWS", "UdpHubProtocol", "UdpStats", "serve_websocket"]

log = logging.getLogger("relay.gateway.agents.udp_hub")

#: Flows one UDP hub port carries at once (each holds a stream here and a socket at
#: the agent); a datagram that would open one more is dropped.
MAX_UDP_FLOWS = 1024


@dataclass
class UdpStats:
    """Counters of a UDP hub, over its flows past and present."""

    flows: int = 0
    datagrams_in: int = 0
    datagrams_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped: int = 0
    #: Datagrams that opened no flow (agent offline, too many flows, refused target).
    refused: int = 0
    live: set[DatagramPipe] = field(default_factory=set)

    def add(self, pipe: DatagramPipe) -> None:
        """Fold the counters of a flow that ended into the totals."""
        flow = pipe.flow
        self.datagrams_in += flow.datagrams_in
        self.datagrams_out += flow.datagrams_out
        self.bytes_in += flow.bytes_in
        self.bytes_out += flow.bytes_out
        self.dropped += flow.dropped + flow.too_large

    def as_dict(self) -> dict[str, int]:
        """The totals with the live flows' counters included."""
        result = {"flows": self.flows, "active_flows": len(self.live), "datagrams_in": self.datagrams_in,
                  "datagrams_out": self.datagrams_out, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                  "datagrams_dropped": self.dropped, "datagrams_refused": self.refused}
        for pipe in self.live:
            flow = pipe.flow
            result["datagrams_in"] += flow.datagrams_in
            result["datagrams_out"] += flow.datagrams_out
            result["bytes_in"] += flow.bytes_in
            result["bytes_out"] += flow.bytes_out
            result["datagrams_dropped"] += flow.dropped + flow.too_large
        return result


#: Receive and send buffers of a hub port's socket, which every flow of the tunnel
#: shares: room for a burst from many clients while the loop is busy (the kernel's
#: default, ~200 KiB, holds a few dozen large datagrams).
HUB_SOCKET_BUFFER = 4 * 1024 * 1024


def size_buffers(transport: asyncio.BaseTransport) -> None:
    """Give a hub port's socket :data:`HUB_SOCKET_BUFFER` each way (capped by the
    system's ``rmem_max``/``wmem_max``)."""
    size_socket_buffers(transport, HUB_SOCKET_BUFFER)


def _target(hub: HubListener) -> str:
    host = f"[{hub.target_host}]" if ":" in hub.target_host else hub.target_host
    return f"{host}:{hub.target_port}"


def open_flow(manager: TunnelManager, hub: HubListener, deliver: Any,
              on_closed: Any = None) -> Optional[DatagramPipe]:
    """Open one flow of ``hub`` (a stream to the agent); None, with ``last_error``, if
    the agent is offline, the hub is full or the target loops into the gateway."""
    stats = cast(UdpStats, hub.udp)  # a udp hub always has its stats
    agent = manager._registry.get(hub.team_id, hub.agent_id)
    if agent is None:
        hub.last_error = "agent offline"
        return None
    if len(stats.live) >= MAX_UDP_FLOWS:
        hub.last_error = f"more than {MAX_UDP_FLOWS} udp flows at once"
        return None
    loop = manager.loop_refusal(hub.team_id, hub.agent_id, hub.target_host, hub.target_port)
    if loop is not None:
        hub.last_error = f"refused: {loop}"
        return None
    session: MuxSession = agent.session
    try:
        stream = session.open_stream_nowait({"protocol": UDP_PROTOCOL, "target": _target(hub)})
    except (SessionClosedError, ConnectionError) as exc:
        hub.last_error = str(exc)
        return None

    def closed(pipe: DatagramPipe, exc: Optional[BaseException]) -> None:
        stats.live.discard(pipe)
        hub.splices.discard(pipe)
        stats.add(pipe)
        if on_closed is not None:
            on_closed(pipe, exc)

    pipe = DatagramPipe(stream, deliver, closed, idle_timeout=manager.udp_idle_timeout)
    if pipe.closed:
        return None
    stats.flows += 1
    stats.live.add(pipe)
    hub.splices.add(pipe)  # type: ignore[arg-type]  # aborted with the hub like a splice
    hub.connections += 1
    manager.connections_total += 1
    manager._watch(hub, stream)
    return pipe


class UdpHubProtocol(asyncio.DatagramProtocol):
    """The hub port's socket: datagrams from clients, demultiplexed by source address."""

    def __init__(self, manager: TunnelManager, hub: HubListener) -> None:
        self._manager = manager
        self._hub = hub
        self._flows: dict[Any, DatagramPipe] = {}
        self.transport: Optional[asyncio.DatagramTransport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # create_datagram_endpoint's transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        pipe = self._flows.get(addr)
        if pipe is None or pipe.closed:
            pipe = self._open(addr)
            if pipe is None:
                if self._hub.udp is not None:
                    self._hub.udp.refused += 1
                return
        pipe.send(data)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp hub %d: %s", self._hub.port, exc)  # e.g. ICMP from a client gone away

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        for pipe in list(self._flows.values()):
            pipe.abort()
        self._flows.clear()

    def _open(self, addr: Any) -> Optional[DatagramPipe]:
        transport = self.transport
        if transport is None or transport.is_closing():
            return None

        def deliver(datagram: bytes) -> None:
            # One socket serves every flow: while asyncio holds datagrams the kernel would
            # not take, more of them are lost rather than buffered without bound. (asyncio's
            # datagram transports have the method; typeshed's base class lacks it.)
            if transport.get_write_buffer_size() > DEFAULT_QUEUE_BYTES:  # type: ignore[attr-defined]  # not in typeshed
                if pipe is not None:
                    pipe.flow.lost(len(datagram))
                return
            send_datagram(transport, datagram, addr)

        def closed(closed_pipe: DatagramPipe, exc: Optional[BaseException]) -> None:
            if self._flows.get(addr) is closed_pipe:
                del self._flows[addr]

        pipe = open_flow(self._manager, self._hub, deliver, closed)
        if pipe is None:
            log.info("udp tunnel %s: datagram from %s dropped: %s", self._hub.session_id, addr,
                     self._hub.last_error)
            return None
        self._flows[addr] = pipe
        return pipe


class _WsDatagrams:
    """The "session" of a WebSocketTransport for one ``relay connect --udp`` flow: each
    binary message is one datagram each way (docs/PROTOCOL.md section 16.2)."""

    def __init__(self, manager: TunnelManager, hub: HubListener) -> None:
        self._manager = manager
        self._hub = hub
        self.ws: Any = None
        self.pipe: Optional[DatagramPipe] = None
        self._paused = False

    def connection_made(self, ws: Any) -> None:
        self.ws = ws
        self.pipe = open_flow(self._manager, self._hub, self._deliver, self._closed)
        if self.pipe is None:
            self._close(CLOSE_RESET, f"no flow: {self._hub.last_error}")

    def data_received(self, payload: Any) -> None:
        if self.pipe is not None:
            self.pipe.send(bytes(payload))

    def eof_received(self) -> None:
        return None

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self.pipe is not None:
            self.pipe.end()  # a datagram flow has nothing to truncate: any end is an end

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        pipe = self.pipe
        if pipe is None:
            return
        queue = pipe.flow.to_local
        while queue and not self._paused and not self.ws.is_closing():
            self.ws.write(queue.pop())

    def _deliver(self, datagram: bytes) -> None:
        # A client that reads slowly: its datagrams wait in a bounded queue, the oldest
        # dropped first (counted), instead of in an ever growing socket buffer.
        if self._paused:
            self.pipe.flow.to_local.push(datagram)  # type: ignore[union-attr]  # a paused pipe has its flow
        else:
            self.ws.write(datagram)

    def _closed(self, pipe: DatagramPipe, exc: Optional[BaseException]) -> None:
        if exc is None:
            # An end, not a loss: what waits for a slow client goes before the close
            # (at most one queue's worth, past the socket's high-water mark).
            queue = pipe.flow.to_local
            while queue and self.ws is not None and not self.ws.is_closing():
                self.ws.write(queue.pop())
            self._close(1000, "flow ended")
        else:
            self._close(CLOSE_RESET, reset_reason(exc))

    def _close(self, code: int, reason: str) -> None:
        ws = self.ws
        if ws is None or ws._close_sent:
            return
        transport = ws._transport
        if not transport.is_closing():
            from relay import ws as wsproto

            transport.write(wsproto.encode_frame(wsproto.Opcode.CLOSE,
                                                 wsproto.encode_close_payload(code, reason)))
            transport.close()
        ws._close_sent = True


#: Largest WebSocket message accepted from a ``relay connect --udp`` client: one datagram.
WS_MAX_DATAGRAM_MESSAGE = MAX_DATAGRAM


def serve_websocket(manager: TunnelManager, hub: HubListener, transport: asyncio.Transport,
                    leftover: bytes) -> None:
    """Run one ``relay connect --udp`` flow on a WebSocket (its 101 already sent)."""
    WebSocketTransport.attach(transport, _WsDatagrams(manager, hub), client=False,
                              initial=leftover, max_message_size=WS_MAX_DATAGRAM_MESSAGE)
    transport.resume_reading()


__all__ += ["DEFAULT_IDLE_TIMEOUT", "open_flow"]
