"""``relay connect`` on one multiplexed session (issue 14, item 2; docs/PROTOCOL.md 14.1).

``relay gateway``, ``relay agent`` and ``relay connect --mode mux`` run as real processes;
the targets are blocking sockets served by threads of the test process. What holds:

* bytes arrive whole and in order both ways over many concurrent local connections,
  with random sizes, random chunking and random pauses on both sides;
* half-close both ways (the client's end first, or the target's end first) and resets
  both ways (a target that resets: the client reads ECONNRESET; the client's reset is
  tests/gateway/test_stream_edges.py, which runs every edge through both forms);
* a local client that does not read stalls none of the other connections;
* one WebSocket carries every connection (the gateway counts one session) and outlives
  idle time; the session is opened again after the gateway restarts; a closed tunnel
  ends it and ``relay connect`` stops with the gateway's 404;
* against a gateway without the multiplexed form (a stand-in speaking only the plain
  one), ``--mode auto`` falls back to one WebSocket per connection and ``--mode mux``
  stops with a clear error.

No test measures speed: every wait is a bound on correctness, not a rate.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import psutil
import pytest

from tests.gateway.test_faults import RelayProcs, wait_for
from tests.gateway.test_stream_edges import LINGER_ZERO, Outcome, RecordingTargets, RelayConnect, _read_until_failure

pytestmark = pytest.mark.timeout(240)

MiB = 1024 * 1024


class MuxTargets(RecordingTargets):
    """TCP servers on 127.0.0.1, a thread per connection:

    * ``echo``: sends back every byte; at EOF ends its side too;
    * ``greet``: sends :attr:`GREETING`, shuts down its write side first, then reads to
      the end (recorded);
    * ``rst``: reads 5 bytes, then closes with a RST;
    * ``source``: sends random bytes until the connection fails.
    """

    GREETING = os.urandom(MiB + 12345)

    def __init__(self) -> None:
        super().__init__(("echo", "greet", "rst", "source"))

    @staticmethod
    def _echo(conn: socket.socket, outcome: Outcome) -> None:
        with conn:
            try:
                while data := conn.recv(256 * 1024):
                    outcome.received += len(data)
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
                outcome.ended = "eof"
            except OSError:
                outcome.ended = "reset"
        outcome.done.set()

    def _greet(self, conn: socket.socket, outcome: Outcome) -> None:
        with conn:
            try:
                conn.sendall(self.GREETING)
                conn.shutdown(socket.SHUT_WR)
                while data := conn.recv(MiB):
                    outcome.received += len(data)
                    outcome.digest.update(data)
                outcome.ended = "eof"
            except OSError:
                outcome.ended = "reset"
        outcome.done.set()

    @staticmethod
    def _rst(conn: socket.socket, outcome: Outcome) -> None:
        got = b""
        while len(got) < 5:
            data = conn.recv(5 - len(got))
            if not data:
                break
            got += data
        outcome.received = len(got)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
        conn.close()
        outcome.ended = "reset-sent"
        outcome.done.set()

    @staticmethod
    def _source(conn: socket.socket, outcome: Outcome) -> None:
        chunk = os.urandom(256 * 1024)
        with conn:
            try:
                while True:
                    conn.sendall(chunk)
            except OSError:
                outcome.ended = "gone"
        outcome.done.set()


class Rig:
    """Gateway + agent, the targets, one tcp tunnel to each and a ``relay connect --mode
    mux`` on each tunnel URL."""

    def __init__(self, workdir: Path) -> None:
        self.targets = MuxTargets()
        self.relay = RelayProcs(workdir)
        self.session_id: dict[str, str] = {}
        self.tunnel_url: dict[str, str] = {}
        self.connect: dict[str, RelayConnect] = {}
        for kind, port in self.targets.ports.items():
            body = self.relay.open_tunnel(port)
            self.session_id[kind] = body["session_id"]
            self.tunnel_url[kind] = body["tunnel_url"]
            self.connect[kind] = RelayConnect(body["tunnel_url"], workdir / f"connect-{kind}.log", "mux")

    def port(self, kind: str) -> int:
        return self.connect[kind].port

    def connect_sessions(self, kind: str) -> int:
        """The gateway's count of relay connect sessions on the tunnel ``kind``."""
        status, body = self.relay.api("GET", f"/api/v1/agents/{self.relay.agent_id}")
        assert status == 200, body
        [tunnel] = [t for t in body["tunnels"] if t["session_id"] == self.session_id[kind]]
        return tunnel["connect_sessions"]

    def close(self) -> None:
        for proc in self.connect.values():
            proc.close()
        self.relay.close()
        self.targets.close()


@pytest.fixture(scope="module")
def rig(tmp_path_factory) -> Iterator[Rig]:
    running = Rig(tmp_path_factory.mktemp("connect-mux"))
    try:
        yield running
    finally:
        running.close()


def _connect(port: int, timeout: float = 30) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _gateway_websockets(connect: RelayConnect, gateway_port: int) -> list[Any]:
    """The established TCP connections of a relay connect process to the gateway."""
    return [c for c in psutil.Process(connect.proc.pid).net_connections(kind="tcp")
            if c.raddr and c.raddr.port == gateway_port and c.status == psutil.CONN_ESTABLISHED]


# ----------------------------------------------------------------------------- bytes


def _echo_exchange(port: int, seed: int) -> tuple[int, int]:
    """One connection to the echo target: random total size, random write chunks and
    pauses, a reader thread with random read sizes; the client half-closes after its
    last byte and must read back exactly what it sent, then EOF."""
    rng = random.Random(seed)
    total = rng.choice([0, 1, rng.randrange(2, 4096), rng.randrange(4096, 256 * 1024),
                        rng.randrange(256 * 1024, 3 * MiB)])
    data = rng.randbytes(total)
    received = bytearray()
    failure: list[BaseException] = []
    with _connect(port) as sock:
        def read() -> None:
            reads = random.Random(seed + 1)
            try:
                while chunk := sock.recv(reads.choice([1, 7, 1000, 65536, MiB])):
                    received.extend(chunk)
                    if reads.random() < 0.02:
                        time.sleep(reads.random() * 0.01)
            except OSError as exc:
                failure.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        offset = 0
        while offset < total:
            size = rng.choice([1, 13, 512, 16 * 1024, 100_000, 300_000])
            sock.sendall(data[offset:offset + size])
            offset += size
            if rng.random() < 0.05:
                time.sleep(rng.random() * 0.01)
        sock.shutdown(socket.SHUT_WR)
        reader.join(90)
        assert not reader.is_alive(), f"seed {seed}: no EOF after the echo"
    assert not failure, (seed, failure)
    assert len(received) == total and bytes(received) == data, (seed, total, len(received))
    return total, len(received)


def test_many_connections_random_sizes_and_interleavings(rig):
    """32 concurrent connections on one session, each with its own random sizes and
    timing; every byte comes back, in order, followed by a clean end."""
    port = rig.port("echo")
    before = len(rig.targets.outcomes["echo"])
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda seed: _echo_exchange(port, seed), range(1000, 1032)))
    assert len(results) == 32
    outcomes = rig.targets.outcomes["echo"][before:]
    assert len(outcomes) == 32
    for outcome in outcomes:
        assert outcome.done.wait(10) and outcome.ended == "eof", outcome
    assert sorted(o.received for o in outcomes) == sorted(sent for sent, _ in results)


# ----------------------------------------------------------------------------- ends and resets


def test_target_half_closes_first(rig):
    """The target sends, ends its side, and still reads: the client gets every byte and
    then EOF, and what it sends afterwards reaches the target whole."""
    before = len(rig.targets.outcomes["greet"])
    upload = os.urandom(700 * 1024)
    with _connect(rig.port("greet")) as sock:
        got = bytearray()
        while chunk := sock.recv(MiB):
            got.extend(chunk)
        assert bytes(got) == MuxTargets.GREETING
        sock.sendall(upload)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    outcome = wait_for(lambda: len(rig.targets.outcomes["greet"]) > before
                       and rig.targets.outcomes["greet"][before], what="the greet target's connection")
    assert outcome.done.wait(30), "the target never saw the client's end"
    assert outcome.ended == "eof" and outcome.received == len(upload), outcome
    assert outcome.digest.digest() == hashlib.sha256(upload).digest()


def test_target_reset_reaches_the_client_as_a_reset(rig):
    """A target that closes with a RST: the local client reads ECONNRESET, not an EOF;
    the session and the other connections go on."""
    for _ in range(3):
        with _connect(rig.port("rst"), timeout=10) as sock:
            sock.sendall(b"hello")
            assert _read_until_failure(sock, 10) == "reset"
    total, _ = _echo_exchange(rig.port("echo"), 7)
    assert rig.connect_sessions("rst") == 1


def test_client_reset_while_the_target_sends_resets_the_target(rig):
    """The client of a downloading connection resets it: the target's send fails soon
    (its connection was reset by the agent), the session goes on."""
    before = len(rig.targets.outcomes["source"])
    sock = _connect(rig.port("source"))
    assert len(sock.recv(65536)) > 0
    outcome = wait_for(lambda: len(rig.targets.outcomes["source"]) > before
                       and rig.targets.outcomes["source"][before], what="the source target's connection")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
    sock.close()
    assert outcome.done.wait(10), "the target still sends 10 s after the client's reset"
    _echo_exchange(rig.port("echo"), 8)


# ----------------------------------------------------------------------------- isolation


def test_a_client_that_does_not_read_stalls_no_other(rig):
    """One connection to the endless source is never read; 8 others on the same session
    each read 8 MiB to completion meanwhile (the stalled one holds its own window only)."""
    port = rig.port("source")
    stalled = _connect(port)
    try:
        time.sleep(1.0)  # its window fills, and the session's queue behind it if it could

        def download(_: int) -> int:
            got = 0
            with _connect(port, timeout=60) as sock:
                while got < 8 * MiB:
                    chunk = sock.recv(MiB)
                    assert chunk, f"ended after {got} bytes"
                    got += len(chunk)
            return got

        with ThreadPoolExecutor(8) as pool:
            assert all(n >= 8 * MiB for n in pool.map(download, range(8)))
        # The stalled one is still there, and reads what is waiting for it.
        stalled.settimeout(10)
        assert len(stalled.recv(65536)) > 0
    finally:
        stalled.close()


def test_one_websocket_carries_every_connection_and_outlives_idle_time(rig):
    """20 connections at once: relay connect holds one TCP connection to the gateway and
    the gateway counts one session; after idle seconds it is the same connection, and
    connections opened before and after the pause work."""
    connect = rig.connect["echo"]
    gateway_port = rig.relay.port
    socks = [_connect(rig.port("echo")) for _ in range(20)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(b"ping %d" % i)
        for i, sock in enumerate(socks):
            want = b"ping %d" % i
            got = b""
            while len(got) < len(want):
                got += sock.recv(100)
            assert got == want
        [websocket] = _gateway_websockets(connect, gateway_port)
        assert rig.connect_sessions("echo") == 1
        time.sleep(4.0)  # idle: no byte on any connection
        for sock in socks:
            sock.sendall(b"again")
            got = b""
            while len(got) < 5:
                got += sock.recv(100)
            assert got == b"again"
        _echo_exchange(rig.port("echo"), 9)
        assert _gateway_websockets(connect, gateway_port) == [websocket]
        assert rig.connect_sessions("echo") == 1
    finally:
        for sock in socks:
            sock.close()


# ----------------------------------------------------------------------------- the session's life


def test_session_reopens_after_a_gateway_restart_and_ends_with_the_tunnel(tmp_path):
    """SIGKILL the gateway: the live connection is reset; a new gateway on the same port
    and data: relay connect opens its session again and new connections work. Closing the
    tunnel ends the session, and relay connect stops with the gateway's 404."""
    targets = MuxTargets()
    relay = RelayProcs(tmp_path)
    connect: Optional[RelayConnect] = None
    try:
        status, body = relay.api("POST", f"/api/v1/agents/{relay.agent_id}/tunnel",
                                 {"target_port": targets.ports["echo"], "tunnel_protocol": "tcp"})
        assert status == 200, body
        session_id = body["session_id"]
        connect = RelayConnect(body["tunnel_url"], tmp_path / "connect.log", "mux")
        _echo_exchange(connect.port, 11)
        live = _connect(connect.port)
        live.sendall(b"x")
        assert live.recv(1) == b"x"
        relay.gateway.kill()
        relay.gateway.wait(10)
        assert _read_until_failure(live, 10) == "reset"
        live.close()
        relay.gateway = relay._spawn("gateway", "--listen", f"127.0.0.1:{relay.port}", "--data",
                                     str(tmp_path / "data"), "--log-level", "warning", log=tmp_path / "gateway.log")

        def agent_back() -> bool:
            try:
                return relay.online_agent() is not None
            except OSError:  # (urllib's URLError) the new gateway is not listening yet
                return False

        wait_for(agent_back, timeout=30, what="the agent back on the new gateway")

        def works() -> bool:
            try:
                _echo_exchange(connect.port, 12)
            except (OSError, AssertionError):
                return False
            return True

        wait_for(works, timeout=30, what="relay connect working through the new gateway")
        assert "session to the gateway open again" in connect.log.read_text()
        status, _ = relay.api("DELETE", f"/api/v1/agents/{relay.agent_id}/tunnel?session_id={session_id}")
        assert status == 200
        assert connect.proc.wait(20) != 0
        assert "HTTP 404" in connect.log.read_text()
    finally:
        if connect is not None:
            connect.close()
        relay.close()
        targets.close()


# ----------------------------------------------------------------------------- older gateways


class PlainOnlyGateway:
    """A stand-in for a gateway older than the multiplexed form: it upgrades
    ``/tunnel/.../tcp`` without choosing a subprotocol and speaks the plain convention
    (docs/PROTOCOL.md section 14) over an echo: binary back, ``EOF`` answered with
    ``EOF`` and close 1000."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        #: Per WebSocket: the bytes it carried before its end, and how it ended.
        self.seen: list[tuple[bytes, str]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        from wsproto.utilities import generate_accept_token

        from relay.ws import CloseCode, FrameParser, Opcode, encode_close_payload, encode_frame

        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            head, _, rest = request.partition(b"\r\n\r\n")
            key = re.search(rb"(?im)^sec-websocket-key:\s*(\S+)", head).group(1)
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + generate_accept_token(key) + b"\r\n\r\n")
            parser = FrameParser(64 * MiB, True)
            carried = bytearray()
            messages = parser.feed(rest)
            while True:
                for opcode, payload in messages:
                    if opcode == Opcode.BINARY:
                        carried.extend(payload)
                        conn.sendall(encode_frame(Opcode.BINARY, bytes(payload)))
                    elif opcode == Opcode.TEXT:
                        conn.sendall(encode_frame(Opcode.TEXT, b"EOF"))
                        conn.sendall(encode_frame(Opcode.CLOSE, encode_close_payload(CloseCode.NORMAL)))
                    elif opcode == Opcode.CLOSE:
                        code = struct.unpack(">H", bytes(payload[:2]))[0] if len(payload) >= 2 else 0
                        self.seen.append((bytes(carried), f"close {code}"))
                        return
                data = conn.recv(65536)
                if not data:
                    self.seen.append((bytes(carried), "eof"))
                    return
                messages = parser.feed(data)

    def close(self) -> None:
        self.sock.close()


def test_auto_falls_back_to_one_websocket_per_connection_against_an_older_gateway(tmp_path):
    gateway = PlainOnlyGateway()
    url = f"ws://127.0.0.1:{gateway.port}/tunnel/old-token/tcp"
    auto = RelayConnect(url, tmp_path / "auto.log", "auto")
    try:
        wait_for(lambda: b"older gateway" in auto.log.read_bytes(), what="the fallback warning")
        # The probe WebSocket was closed at once with 1000, having carried nothing.
        wait_for(lambda: gateway.seen, what="the probe's end")
        assert gateway.seen[0] == (b"", "close 1000")
        data = os.urandom(200_000)
        with _connect(auto.port) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            got = bytearray()
            while chunk := sock.recv(MiB):
                got.extend(chunk)
        assert bytes(got) == data
    finally:
        auto.close()
    strict = subprocess.run([sys.executable, "-m", "relay", "connect", url, "--mode", "mux",
                             "--log-level", "warning"], capture_output=True, text=True, timeout=60)
    gateway.close()
    assert strict.returncode != 0
    assert "use --mode plain" in strict.stderr, strict.stderr


@pytest.mark.parametrize("mode", ["mux", "auto"])
def test_a_wrong_token_stops_relay_connect_with_the_404(rig, mode):
    url = rig.tunnel_url["echo"].rsplit("/", 2)[0] + "/not-a-token/tcp"
    done = subprocess.run([sys.executable, "-m", "relay", "connect", url, "--mode", mode, "--log-level", "warning"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode != 0 and "HTTP 404" in done.stderr, (done.stdout, done.stderr)


def test_sigterm_resets_the_live_connections(tmp_path, rig):
    """Stopping relay connect cuts its connections with a reset, not a clean end."""
    connect = RelayConnect(rig.tunnel_url["source"], tmp_path / "stop.log", "mux")
    try:
        sock = _connect(connect.port)
        assert len(sock.recv(65536)) > 0
        connect.proc.send_signal(signal.SIGTERM)
        assert _read_until_failure(sock, 20) == "reset"
        sock.close()
    finally:
        connect.close()


def test_a_connection_accepted_just_before_the_session_came_up_is_served_at_once(tmp_path):
    """The loop makes a protocol for an accepted connection one iteration before it calls
    ``connection_made``: a session that comes up in between must serve that connection
    at once, not leave it waiting until SESSION_WAIT resets it (in process: the gateway,
    the agent and relay connect's connector on one loop)."""
    import asyncio

    from relay.connect.tcp import SESSION_WAIT, MuxConnector
    from tests.gateway.test_gateway_e2e import echo_server, gateway_and_team, open_tcp_tunnel, run, running_agent

    async def main() -> None:
        async with gateway_and_team(tmp_path) as (gw, keys), echo_server() as echo_port:
            async with running_agent(gw, keys["ak"], name="race") as agent:
                tunnel = await open_tcp_tunnel(gw, keys["sk"], agent.agent_id, echo_port)
                connector = MuxConnector(tunnel["tunnel_url"], mode="mux")
                waiting = connector.protocol()  # no session yet: a waiting protocol
                connector.session = await connector.dial()  # the session comes up now
                server = await asyncio.get_running_loop().create_server(lambda: waiting, "127.0.0.1", 0)
                try:
                    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
                    writer.write(b"served at once")
                    async with asyncio.timeout(SESSION_WAIT / 3):
                        assert await reader.readexactly(14) == b"served at once"
                    writer.close()
                finally:
                    server.close()
                    connector.stop()

    run(main)


def test_a_target_that_refuses_is_a_reset_and_relay_connect_says_why(rig, tmp_path):
    """Nothing listens at the tunnel's target: the agent refuses the stream
    (CONNECT_FAILED), the gateway passes the refusal on, the local client reads a reset
    and relay connect logs the reason; its session goes on."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # a port nobody listens on
    status, body = rig.relay.api("POST", f"/api/v1/agents/{rig.relay.agent_id}/tunnel",
                                 {"target_port": port, "tunnel_protocol": "tcp"})
    assert status == 200, body
    connect = RelayConnect(body["tunnel_url"], tmp_path / "refused.log", "mux")
    try:
        for _ in range(2):
            with _connect(connect.port, timeout=10) as sock:
                sock.sendall(b"anyone?")
                assert _read_until_failure(sock, 10) == "reset"
        wait_for(lambda: b"CONNECT_FAILED" in connect.log.read_bytes(), timeout=10, what="the refusal logged")
        assert connect.proc.poll() is None
    finally:
        connect.close()
