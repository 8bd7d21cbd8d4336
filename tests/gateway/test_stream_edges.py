"""How an end and a reset travel from one socket to the other (issue 12, findings 6 and 8).

``relay gateway``, ``relay agent`` and ``relay connect`` run as real processes (so they can
be SIGKILLed); the targets are plain blocking sockets served by threads of the test
process, which record how each connection ended: a clean EOF or ECONNRESET.

* half-close through ``relay connect``: the client sends, shuts down its write side and
  still reads the whole reply (as through the hub port);
* an upload through ``relay connect`` to a target that is slow to start reading arrives
  whole, every time, when the client closes right after sending;
* a client that resets its connection to ``relay connect`` gets the agent's connection to
  the target reset within seconds;
* a plain WebSocket client that sends close 1000 right after its upload loses nothing;
* a reset is never a clean end: the agent killed mid-download is ECONNRESET at the hub
  port client and at the ``relay connect`` client; the gateway killed mid-upload is
  ECONNRESET at the target (asyncio and trio agents).

docs/PROTOCOL.md section 14 describes the convention these tests hold. Every test runs
through both forms of ``relay connect`` (``--mode mux``: one multiplexed session;
``--mode plain``: one WebSocket per connection).
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest

from tests.gateway.test_faults import RelayProcs, wait_for

pytestmark = pytest.mark.timeout(240)

MiB = 1024 * 1024
#: SO_LINGER {on, 0 s}: close() sends a RST instead of a FIN.
LINGER_ZERO = struct.pack("ii", 1, 0)


# ----------------------------------------------------------------------------- targets


class Outcome:
    """What one target connection saw: bytes received, their digest, and how it ended."""

    def __init__(self) -> None:
        self.received = 0
        self.digest = hashlib.sha256()
        self.ended: Optional[str] = None  # "eof" or "reset"
        self.done = threading.Event()

    def __repr__(self) -> str:
        return f"<Outcome {self.received} bytes, {self.ended}>"


class RecordingTargets:
    """TCP servers on 127.0.0.1, one per kind, a thread per connection running the
    method ``_KIND(conn, outcome)`` of the subclass; ``outcomes[kind]`` records each."""

    def __init__(self, kinds: tuple[str, ...], backlog: int = 128) -> None:
        self.outcomes: dict[str, list[Outcome]] = {kind: [] for kind in kinds}
        self.ports: dict[str, int] = {}
        self._listeners: list[socket.socket] = []
        for kind in kinds:
            sock = socket.create_server(("127.0.0.1", 0), backlog=backlog)
            self._listeners.append(sock)
            self.ports[kind] = sock.getsockname()[1]
            threading.Thread(target=self._accept, args=(sock, kind), daemon=True).start()

    def _accept(self, listener: socket.socket, kind: str) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            outcome = Outcome()
            self.outcomes[kind].append(outcome)
            threading.Thread(target=getattr(self, "_" + kind), args=(conn, outcome), daemon=True).start()

    def close(self) -> None:
        for sock in self._listeners:
            sock.close()


class EdgeTargets(RecordingTargets):
    """Three TCP servers on 127.0.0.1, one thread per connection, recording outcomes:

    * ``reply``: reads until EOF, then answers ``sha256(received) + count (u64)`` followed
      by ``REPLY_EXTRA`` bytes, and closes (a client that half-closes gets it all);
    * ``sink``: waits ``sink_delay`` seconds before reading (so the bytes pile up in the
      relay's queues), then reads until EOF or a reset;
    * ``source``: sends random bytes until the connection fails, while reading (to see a
      reset or EOF from the other side).
    """

    REPLY_EXTRA = 2 * MiB

    def __init__(self) -> None:
        self.sink_delay = 0.0
        self._extra = os.urandom(self.REPLY_EXTRA)
        super().__init__(("reply", "sink", "source"))

    @staticmethod
    def _read_to_end(conn: socket.socket, outcome: Outcome) -> bool:
        try:
            while data := conn.recv(1 << 20):
                outcome.received += len(data)
                outcome.digest.update(data)
        except ConnectionResetError:
            outcome.ended = "reset"
            return False
        outcome.ended = "eof"
        return True

    def _reply(self, conn: socket.socket, outcome: Outcome) -> None:
        with conn:
            if self._read_to_end(conn, outcome):
                try:
                    conn.sendall(outcome.digest.digest() + struct.pack(">Q", outcome.received) + self._extra)
                except OSError:
                    pass
        outcome.done.set()

    def _sink(self, conn: socket.socket, outcome: Outcome) -> None:
        with conn:
            time.sleep(self.sink_delay)
            self._read_to_end(conn, outcome)
        outcome.done.set()

    def _source(self, conn: socket.socket, outcome: Outcome) -> None:
        chunk = os.urandom(256 * 1024)

        def pump() -> None:
            try:
                while True:
                    conn.sendall(chunk)
            except OSError:
                pass

        with conn:
            threading.Thread(target=pump, daemon=True).start()
            self._read_to_end(conn, outcome)
        outcome.done.set()

    def expected_reply(self, data: bytes) -> bytes:
        return hashlib.sha256(data).digest() + struct.pack(">Q", len(data)) + self._extra


class RelayConnect:
    """A ``relay connect TUNNEL_URL --listen 127.0.0.1:0 --mode MODE`` process and its
    local port."""

    def __init__(self, tunnel_url: str, log: Path, mode: str = "auto") -> None:
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "relay", "connect", tunnel_url, "--listen",
                                      "127.0.0.1:0", "--log-level", "warning", "--mode", mode],
                                     stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = wait_for(lambda: re.search(rb"listening on 127\.0\.0\.1:(\d+)", log.read_bytes()),
                        what="relay connect listening")
        self.port = int(line.group(1))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Stack:
    """Gateway + agent processes, the targets, one tcp tunnel to each target (its hub port
    and a ``relay connect`` on its tunnel URL, in the form ``mode``)."""

    def __init__(self, workdir: Path, backend: str = "asyncio", mode: str = "auto") -> None:
        self.workdir = workdir
        self.targets = EdgeTargets()
        self.relay = RelayProcs.__new__(RelayProcs)
        self._start_relay(backend)
        self.hub: dict[str, int] = {}
        self.tunnel_url: dict[str, str] = {}
        self.connect: dict[str, RelayConnect] = {}
        for kind, port in self.targets.ports.items():
            body = self.relay.open_tunnel(port)
            self.hub[kind] = body["hub_port"]
            self.tunnel_url[kind] = body["tunnel_url"]
            self.connect[kind] = RelayConnect(body["tunnel_url"], workdir / f"connect-{kind}.log", mode)

    def _start_relay(self, backend: str) -> None:
        relay = self.relay
        if backend == "asyncio":
            relay.__init__(self.workdir)
            return
        # RelayProcs.__init__ with the agent on another backend (RELAY_AGENT_BACKEND).
        spawn = relay._spawn

        def spawn_backend(*args: str, log: Path, env: Optional[dict[str, str]] = None) -> subprocess.Popen:
            if args and args[0] == "agent":
                env = {**(env or {}), "RELAY_AGENT_BACKEND": backend}
            return spawn(*args, log=log, env=env)

        relay._spawn = spawn_backend  # type: ignore[method-assign]
        relay.__init__(self.workdir)

    def close(self) -> None:
        for proc in self.connect.values():
            proc.close()
        self.relay.close()
        self.targets.close()


@pytest.fixture(scope="module", params=["mux", "plain"])
def stack(tmp_path_factory, request) -> Iterator[Stack]:
    """Both forms of ``relay connect``: one multiplexed session, one WebSocket each."""
    running = Stack(tmp_path_factory.mktemp("edges"), mode=request.param)
    try:
        yield running
    finally:
        running.close()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=20)


def _recv_to_end(sock: socket.socket) -> bytes:
    parts = []
    while data := sock.recv(1 << 20):
        parts.append(data)
    return b"".join(parts)


def _next_outcome(targets: EdgeTargets, kind: str, before: int) -> Outcome:
    return wait_for(lambda: len(targets.outcomes[kind]) > before and targets.outcomes[kind][before],
                    timeout=10, what=f"a connection to the {kind} target")


def _read_until_failure(sock: socket.socket, limit: float) -> str:
    """Read until the connection ends; ``"eof"`` or ``"reset"``. Fails after ``limit`` s."""
    started = time.monotonic()
    try:
        while sock.recv(1 << 20):
            assert time.monotonic() - started < limit, f"still receiving {limit}s after the kill"
    except ConnectionResetError:
        return "reset"
    except socket.timeout:
        pytest.fail("neither EOF nor a reset within the socket timeout")
    return "eof"


# ----------------------------------------------------------------------------- finding 6


def test_half_close_reply_through_relay_connect_and_hub_port(stack):
    """Send, shut down the write side, read the reply: the same through both entries."""
    data = os.urandom(300 * 1024)
    expected = stack.targets.expected_reply(data)
    for port in (stack.hub["reply"], stack.connect["reply"].port):
        with _connect(port) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            reply = _recv_to_end(sock)
        assert len(reply) == len(expected) and reply == expected, (port, len(reply))


def test_upload_through_relay_connect_arrives_whole(stack):
    """The client sends 6 MiB and closes at once; the target starts reading only 1 s
    later, so most of it is still queued in the relay when the client's end arrives."""
    targets = stack.targets
    targets.sink_delay = 1.0
    try:
        for attempt in range(3):
            data = os.urandom(6 * MiB)
            before = len(targets.outcomes["sink"])
            with _connect(stack.connect["sink"].port) as sock:
                sock.sendall(data)
            outcome = _next_outcome(targets, "sink", before)
            assert outcome.done.wait(60), f"attempt {attempt}: the target never saw the end"
            assert outcome.ended == "eof" and outcome.received == len(data), (attempt, outcome)
            assert outcome.digest.digest() == hashlib.sha256(data).digest()
    finally:
        targets.sink_delay = 0.0


def _ws_open(url: str) -> tuple[socket.socket, bytes]:
    """A raw WebSocket client connection to a tunnel URL: ``(socket, leftover)``."""
    from urllib.parse import urlsplit

    from relay.ws.handshake import ClientHandshake

    split = urlsplit(url)
    sock = socket.create_connection((split.hostname, split.port), timeout=20)
    handshake = ClientHandshake(split.netloc, split.path)
    sock.sendall(handshake.request_bytes())
    accepted = None
    while accepted is None:
        accepted = handshake.receive_data(sock.recv(65536))
    return sock, accepted.leftover


def test_websocket_client_closing_after_its_upload_loses_nothing(stack):
    """A plain WebSocket client (no ``EOF`` message) that sends close 1000 right after
    its last byte: the gateway ends the stream after the queued bytes, it does not reset
    it (the target starts reading 1 s later)."""
    from relay.ws import CloseCode, FrameParser, Opcode, encode_close_payload, encode_frame

    targets = stack.targets
    targets.sink_delay = 1.0
    try:
        data = os.urandom(6 * MiB)
        before = len(targets.outcomes["sink"])
        sock, leftover = _ws_open(stack.tunnel_url["sink"])
        with sock:
            for offset in range(0, len(data), 256 * 1024):
                sock.sendall(encode_frame(Opcode.BINARY, data[offset:offset + 256 * 1024], mask=True))
            sock.sendall(encode_frame(Opcode.CLOSE, encode_close_payload(CloseCode.NORMAL), mask=True))
            parser = FrameParser(64 * MiB, False)
            messages = parser.feed(leftover)
            while not any(op == Opcode.CLOSE for op, _ in messages):
                chunk = sock.recv(65536)
                assert chunk, "no close frame from the gateway"
                messages = parser.feed(chunk)
        outcome = _next_outcome(targets, "sink", before)
        assert outcome.done.wait(60), "the target never saw the end"
        assert outcome.ended == "eof" and outcome.received == len(data), outcome
        assert outcome.digest.digest() == hashlib.sha256(data).digest()
    finally:
        targets.sink_delay = 0.0


@pytest.mark.parametrize("entry", ["relay_connect", "hub_port"])
def test_local_reset_resets_the_target_connection(stack, entry):
    """A client that closes with a RST: the agent's connection to the target is reset
    promptly, not left open until the target closes."""
    targets = stack.targets
    port = stack.connect["sink"].port if entry == "relay_connect" else stack.hub["sink"]
    before = len(targets.outcomes["sink"])
    sock = _connect(port)
    sock.sendall(b"hello")
    outcome = _next_outcome(targets, "sink", before)
    wait_for(lambda: outcome.received == 5, what="the first bytes at the target")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
    reset_at = time.monotonic()
    sock.close()
    assert outcome.done.wait(5), "the target connection is still open 5 s after the client's reset"
    elapsed = time.monotonic() - reset_at
    assert outcome.ended == "reset", outcome
    assert elapsed < 2.5, elapsed


# ----------------------------------------------------------------------------- finding 8


@pytest.mark.parametrize("entry", ["relay_connect", "hub_port"])
def test_agent_killed_mid_download_is_a_reset(stack, entry):
    """SIGKILL the agent while a client downloads: the client reads ECONNRESET, never a
    clean EOF that would look like a complete transfer."""
    port = stack.connect["source"].port if entry == "relay_connect" else stack.hub["source"]
    relay = stack.relay
    sock = _connect(port)
    try:
        got = 0
        while got < 4 * MiB:
            chunk = sock.recv(1 << 20)
            assert chunk, f"closed after {got} bytes"
            got += len(chunk)
        relay.agent.kill()
        relay.agent.wait(10)
        ended = _read_until_failure(sock, 10)
    finally:
        sock.close()
        if relay.agent.poll() is not None:  # the same identity: the tunnels serve again
            wait_for(lambda: relay.online_agent() is None, what="agent offline")
            relay.start_agent()
    assert ended == "reset"
    data = b"after the restart"
    with _connect(stack.hub["reply"]) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert _recv_to_end(sock) == stack.targets.expected_reply(data)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_gateway_killed_mid_upload_is_a_reset_at_the_target(tmp_path, backend):
    """SIGKILL the gateway while a client uploads through a hub port: the target reads
    ECONNRESET (the agent resets its connection), not an EOF after a truncated upload."""
    stack = Stack(tmp_path, backend)
    try:
        targets = stack.targets
        sock = _connect(stack.hub["sink"])
        stop = threading.Event()

        def upload() -> None:
            chunk = os.urandom(256 * 1024)
            try:
                while not stop.is_set():
                    sock.sendall(chunk)
            except OSError:
                pass

        sender = threading.Thread(target=upload, daemon=True)
        sender.start()
        outcome = _next_outcome(targets, "sink", 0)
        wait_for(lambda: outcome.received >= 8 * MiB, what="8 MiB at the target")
        stack.relay.gateway.kill()
        stack.relay.gateway.wait(10)
        assert outcome.done.wait(10), "the target connection is still open 10 s after the gateway died"
        stop.set()
        sock.close()
        sender.join(10)
        assert outcome.ended == "reset", outcome
    finally:
        stack.close()
