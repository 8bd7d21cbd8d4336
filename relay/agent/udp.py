"""The agent's end of a datagram stream (stream protocol ``udp``): one connected UDP
socket per stream, towards the stream's target (docs/PROTOCOL.md section 16).

A connected socket (``connect()`` on a UDP socket) sends only to the target and the
kernel delivers only the target's datagrams to it, so a flow cannot be used to spray
other hosts or to receive from strangers. The caller has checked the target against
the agent's allowlist. The gateway owns the flow's idle timeout (it knows the client);
this end closes its socket when the stream ends or is reset, and when its agent's
session ends (every stream is reset then).

:func:`serve_datagram_stream` serves the asyncio agent, :func:`serve_datagram_stream_trio`
the trio one; the flow's rules (records, the drop-oldest queue, counters) are
relay.mux.datagrams' for both.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any, Optional, cast

import trio

from relay.aio.datagrams import DatagramPipe, send_datagram
from relay.aio.stream import MuxStream
from relay.mux.datagrams import DEFAULT_QUEUE_BYTES, MAX_DATAGRAM, DatagramFlow
from relay.mux.errors import ErrorCode

if TYPE_CHECKING:
    from relay.trio import MuxStream as TrioMuxStream

__all__ = ["serve_datagram_stream", "serve_datagram_stream_trio"]

log = logging.getLogger("relay.agent.udp")

#: Receive buffer of a target socket: room for a burst of replies while the loop is busy.
TARGET_RECEIVE_BUFFER = 4 * 1024 * 1024


class _TargetProtocol(asyncio.DatagramProtocol):
    """The connected socket towards the target: its datagrams go into the stream."""

    def __init__(self) -> None:
        self.pipe: Optional[DatagramPipe] = None
        self.transport: Optional[asyncio.DatagramTransport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # create_datagram_endpoint's transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.pipe is not None:
            self.pipe.send(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like, reported on a later send: a UDP client
        # sees loss, not an error, so the flow goes on (the target may start later).
        log.debug("udp target socket: %s", exc)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self.pipe is not None and exc is not None:
            self.pipe.abort(exc)


async def serve_datagram_stream(stream: MuxStream, host: str, port: int) -> DatagramPipe:
    """Open a connected UDP socket to ``host:port`` and carry ``stream``'s datagrams to
    and from it. The stream is accepted once the socket exists, or refused with
    CONNECT_FAILED (and the OSError re-raised) when it cannot be made (a name that does
    not resolve, no route)."""
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.create_datagram_endpoint(_TargetProtocol, remote_addr=(host, port))
    except OSError as exc:
        stream.refuse(ErrorCode.CONNECT_FAILED, f"cannot reach {host}:{port} over udp: {exc}")
        raise
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            import socket

            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TARGET_RECEIVE_BUFFER)
        except OSError:
            pass  # the default buffer only loses more datagrams in a burst

    def deliver(datagram: bytes) -> None:
        # asyncio buffers a datagram the socket could not take (EAGAIN) without bound:
        # past the flow's queue size, lose it instead, as a full socket buffer would.
        # (asyncio's datagram transports have the method; typeshed's base class lacks it)
        if transport.get_write_buffer_size() > DEFAULT_QUEUE_BYTES:  # type: ignore[attr-defined]  # not in typeshed
            pipe.flow.lost(len(datagram))
            return
        send_datagram(transport, datagram)

    def closed(_pipe: DatagramPipe, exc: Optional[BaseException]) -> None:
        protocol.pipe = None
        transport.close()

    pipe = DatagramPipe(stream, deliver, closed)
    protocol.pipe = pipe
    return pipe


async def serve_datagram_stream_trio(stream: "TrioMuxStream", host: str, port: int) -> DatagramFlow:
    """:func:`serve_datagram_stream` on trio, until the flow ends: the peer's FIN ends it
    (and ours follows), a reset or the session's end cuts it. Refuses the stream with
    CONNECT_FAILED when the socket cannot be made; returns the flow (its counters).

    Datagrams from the target wait in the flow's drop-oldest queue while the stream's
    window is spent, so a slow stream loses the oldest ones instead of stalling the
    socket; what the stream delivers goes to the target at once."""
    from relay.trio import StreamRefused

    try:
        [(family, kind, proto, _, address), *_] = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        sock = trio.socket.socket(family, kind, proto)
    except OSError as exc:
        raise StreamRefused(ErrorCode.CONNECT_FAILED, f"cannot reach {host}:{port} over udp: {exc}") from None
    with sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TARGET_RECEIVE_BUFFER)
        except OSError:
            pass  # the default buffer only loses more datagrams in a burst
        try:
            await sock.connect(address)
        except OSError as exc:
            raise StreamRefused(ErrorCode.CONNECT_FAILED, f"cannot reach {host}:{port} over udp: {exc}") from None
        stream.accept()
        flow = DatagramFlow(trio.current_time())
        queued = trio.Event()  # something waits in flow.to_stream

        async def from_target() -> None:
            nonlocal queued
            while True:
                try:
                    datagram = await sock.recv(MAX_DATAGRAM)
                except OSError as exc:  # ICMP port unreachable and the like: loss, not an end
                    log.debug("udp target socket: %s", exc)
                    continue
                flow.from_local(datagram, trio.current_time())
                queued.set()

        async def to_stream() -> None:
            nonlocal queued
            while True:
                record = flow.take_record()
                if record is None:
                    queued = trio.Event()
                    await queued.wait()
                    continue
                await stream.send_all(record)  # waits for window; the queue drops meanwhile

        async def from_stream(scope: trio.CancelScope) -> None:
            while data := await stream.receive_some():
                for datagram in flow.from_stream(data, trio.current_time()):
                    try:
                        await sock.send(datagram)
                    except OSError as exc:  # lost, as in UDP
                        flow.lost(len(datagram))
                        log.debug("stream %d: datagram not delivered: %s", stream.stream_id, exc)
            await stream.send_eof()  # the peer ended the flow: end ours too
            scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(from_target)
                nursery.start_soon(to_stream)
                nursery.start_soon(from_stream, nursery.cancel_scope)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # reset, or the session ended: the socket closes below
    return flow
