"""Drive relay.mux from your own I/O loop: two MuxConnections over a socketpair.

The multiplexer is sans-IO: it never touches a socket or a clock. Your loop feeds it
received bytes (``receive_data``), writes what it has to send (``data_to_send``), calls
``handle_timer`` at ``next_deadline()``, and reacts to the events it returns. Here that
loop is ``selectors`` over two non-blocking sockets in one thread: the "client" opens a
stream and sends 1 MiB; the "server" accepts it and echoes every byte back; both
acknowledge what they consume (that is what grants the peer window: flow control).

    python examples/mux_own_loop.py [--selftest] [--size BYTES]
"""
from __future__ import annotations

import argparse
import hashlib
import selectors
import socket
import sys
import time

from relay.mux.connection import MuxConnection
from relay.mux.errors import LocalProtocolError
from relay.mux.events import DataReceived, StreamAccepted, StreamEnded, StreamOpened


class Peer:
    """One side: a socket, its MuxConnection, and what its application does."""

    def __init__(self, sock: socket.socket, client: bool) -> None:
        self.sock = sock
        self.conn = MuxConnection(client)
        self.outgoing = b""  # bytes the socket did not take yet
        self.received = bytearray()
        self.pending: dict[int, bytearray] = {}  # echo data the send queue had no room for
        self.ended: set[int] = set()

    def on_events(self, events: list) -> None:
        conn = self.conn
        for event in events:
            if isinstance(event, StreamOpened):  # server: accept, then echo
                conn.accept_stream(event.stream_id)
                self.pending[event.stream_id] = bytearray()
            elif isinstance(event, DataReceived):
                if self.conn.client:
                    self.received += event.data
                else:
                    self.pending[event.stream_id] += event.data
                # Consumed: this grants the peer more window.
                conn.acknowledge_received_data(event.stream_id, event.flow_controlled_length)
            elif isinstance(event, StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, StreamAccepted):
                pass
        self.pump_echo()

    def pump_echo(self) -> None:
        """Server: move echo data into the stream's send queue while it has room."""
        for stream_id, data in self.pending.items():
            while data and self.conn.writable(stream_id):
                chunk = bytes(data[:65536])
                try:
                    self.conn.send_data(stream_id, chunk)
                except LocalProtocolError:
                    break
                del data[:len(chunk)]
            if not data and stream_id in self.ended:
                self.conn.end_stream(stream_id)
                self.ended.discard(stream_id)

    def flush(self) -> None:
        self.outgoing += self.conn.data_to_send()
        if self.outgoing:
            try:
                sent = self.sock.send(self.outgoing)
            except BlockingIOError:
                sent = 0
            self.outgoing = self.outgoing[sent:]


def run(size: int, timeout: float = 30.0) -> bytes:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
    client, server = Peer(a, client=True), Peer(b, client=False)
    payload = hashlib.sha256(b"seed").digest() * (size // 32) + b"x" * (size % 32)

    stream_id = client.conn.open_stream({"protocol": "echo"})
    to_send = memoryview(payload)

    sel = selectors.DefaultSelector()
    sel.register(a, selectors.EVENT_READ, client)
    sel.register(b, selectors.EVENT_READ, server)
    deadline = time.monotonic() + timeout
    while len(client.received) < len(payload):
        if time.monotonic() > deadline:
            raise TimeoutError("the echo did not complete in time")
        # The client's application: write while the stream's send queue has room.
        while to_send and client.conn.writable(stream_id):
            client.conn.send_data(stream_id, to_send[:65536], end_stream=len(to_send) <= 65536)
            to_send = to_send[65536:]
        for peer in (client, server):
            peer.pump_echo()
            peer.flush()
        now = time.monotonic()
        timers = [d for d in (client.conn.next_deadline(), server.conn.next_deadline()) if d is not None]
        wait = max(0.0, min(timers) - now) if timers else 0.5
        for key, _ in sel.select(min(wait, 0.5)):
            peer = key.data
            data = peer.sock.recv(256 * 1024)
            peer.on_events(peer.conn.receive_data(data, time.monotonic()))
        for peer in (client, server):  # keepalives and timeouts
            peer.on_events(peer.conn.handle_timer(time.monotonic()))
    sel.close()
    a.close()
    b.close()
    assert bytes(client.received) == payload, "echo mismatch"
    return payload


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--selftest", action="store_true", help="run once, check and exit")
    parser.add_argument("--size", type=int, default=1024 * 1024)
    args = parser.parse_args()
    started = time.monotonic()
    payload = run(args.size)
    elapsed = time.monotonic() - started
    print(f"echoed {len(payload)} bytes through one mux stream in {elapsed:.3f}s "
          f"(sha256 {hashlib.sha256(payload).hexdigest()[:16]})")
    if args.selftest:
        print("selftest ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
