"""Faults and bad input against real processes (issue 4): ``relay gateway`` and ``relay
agent`` run as subprocesses (so the agent can be SIGKILLed and the gateway's RSS and file
descriptors measured with psutil); the targets (an echo service and an endless source)
run on a loop in a background thread of the test process.

* scp of a 100 MiB file through a hub port to the private sshd: checksums equal;
* the agent SIGKILLed mid-download: the client sees EOF/reset within seconds, the
  gateway's RSS returns near its warmed-up baseline, the restarted agent serves again;
* a fake agent (real ak- key, raw WebSocket) sending oversized frames: GOAWAY
  FRAME_SIZE_ERROR and its socket closed, while a real agent keeps serving;
* a burst of 300 connections to a hub port with the agent offline, then online: all
  finish, and the gateway's fd count returns to its baseline.

Measured numbers are printed (``pytest -s`` shows them).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import psutil
import pytest

from relay.aio.stream import limit_unsent
from tests.support.servers import free_port

pytestmark = pytest.mark.timeout(240)

MiB = 1024 * 1024


# ----------------------------------------------------------------------------- helpers


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(0.05)


class Targets:
    """An echo service, an endless source (random bytes until the reader goes) and a
    burst (BURST bytes, then silence) on 127.0.0.1, served by an asyncio loop in a
    daemon thread."""

    #: What the burst target sends before it waits.
    BURST = 6 * 1024 * 1024

    def __init__(self) -> None:
        self.echo_port = 0
        self.source_port = 0
        self.burst_port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        chunk = os.urandom(256 * 1024)

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Little unsent data in the kernel per connection (as relay's own splices keep):
            # with a thousand stalled readers, autotuned send buffers of megabytes each
            # would exhaust this machine's TCP memory, which the relay shares with us here.
            limit_unsent(writer.transport)
            with contextlib.suppress(ConnectionError):
                while True:
                    writer.write(chunk)
                    await writer.drain()
            writer.close()

        async def burst(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # BURST bytes, then nothing until the reader goes: a response its reader
            # stops reading, which fills the relay's windows without filling every
            # kernel buffer on this machine (one kernel serves both ends here).
            limit_unsent(writer.transport)
            with contextlib.suppress(ConnectionError):
                for _ in range(self.BURST // len(chunk)):
                    writer.write(chunk)
                    await writer.drain()
                await reader.read()
            writer.close()

        async def start() -> None:
            self._servers = [await asyncio.start_server(echo, "127.0.0.1", 0, backlog=512),
                             await asyncio.start_server(source, "127.0.0.1", 0),
                             await asyncio.start_server(burst, "127.0.0.1", 0, backlog=2048)]
            self.echo_port = self._servers[0].sockets[0].getsockname()[1]
            self.source_port = self._servers[1].sockets[0].getsockname()[1]
            self.burst_port = self._servers[2].sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def close(self) -> None:
        async def shutdown() -> None:  # end the handlers too, not only the listeners
            for server in self._servers:
                server.close()
            handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class RelayProcs:
    """``relay gateway`` and one ``relay agent`` (name ``faults``) as subprocesses."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.gateway = self._spawn("gateway", "--listen", f"127.0.0.1:{self.port}",
                                   "--data", str(workdir / "data"), "--log-level", "warning",
                                   log=workdir / "gateway.log")
        wait_for(lambda: b"listening on" in (workdir / "gateway.log").read_bytes(), what="gateway start")
        self.keys = dict(re.findall(r"^  (sk|dk|ak)  (\S+)$", (workdir / "gateway.log").read_text(), re.M))
        self.agent: Optional[subprocess.Popen] = None
        self.agent_id = ""
        self.start_agent()

    def _spawn(self, *args: str, log: Path, env: Optional[dict[str, str]] = None) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "relay", *args], stdout=log.open("ab"),
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                         headers={"Authorization": f"Bearer {self.keys['sk']}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def online_agent(self, name: str = "faults") -> Optional[str]:
        status, body = self.api("GET", "/api/v1/agents")
        ids = [a["agent_id"] for a in body["agents"] if a["online"] and a["name"] == name] if status == 200 else []
        return ids[0] if ids else None

    def start_agent(self) -> None:
        self.agent = self._spawn("agent", "--gateway", f"http://127.0.0.1:{self.port}", "--name", "faults",
                                 log=self.workdir / "agent.log", env={"RELAY_AGENT_KEY": self.keys["ak"]})
        agent_id = wait_for(self.online_agent, what="agent online")
        assert not self.agent_id or agent_id == self.agent_id  # same identity after a restart
        self.agent_id = agent_id

    def kill_agent(self, sig: int = signal.SIGKILL) -> None:
        assert self.agent is not None
        self.agent.send_signal(sig)
        self.agent.wait(10)
        wait_for(lambda: self.online_agent() is None, what="agent offline")

    def open_tunnel(self, port: int) -> dict[str, Any]:
        """A tcp tunnel to ``port`` on the agent: the API's answer (hub port, URL, ...)."""
        status, body = self.api("POST", f"/api/v1/agents/{self.agent_id}/tunnel",
                                {"target_port": port, "tunnel_protocol": "tcp"})
        assert status == 200, body
        return body

    def open_tcp(self, port: int) -> int:
        return self.open_tunnel(port)["hub_port"]

    @property
    def gateway_process(self) -> psutil.Process:
        return psutil.Process(self.gateway.pid)

    def close(self) -> None:
        for proc in (self.agent, self.gateway):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def relay_fixtures(scope: str = "function") -> tuple[Any, Any]:
    """The ``targets`` (:class:`Targets`) and ``relay`` (:class:`RelayProcs`) fixtures at
    ``scope``, for a test module to take as its own:
    ``targets_fixture, relay_fixture = relay_fixtures("module")``."""

    @pytest.fixture(scope=scope, name="targets")
    def targets_fixture() -> Iterator[Targets]:
        running = Targets()
        try:
            yield running
        finally:
            running.close()

    @pytest.fixture(scope=scope, name="relay")
    def relay_fixture(tmp_path_factory) -> Iterator[RelayProcs]:
        procs = RelayProcs(tmp_path_factory.mktemp("relay"))
        try:
            yield procs
        finally:
            procs.close()

    return targets_fixture, relay_fixture


targets_fixture, relay_fixture = relay_fixtures("module")


def echo_once(port: int, payload: bytes = b"ping through the relay") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return received


def rss_mib(proc: psutil.Process) -> float:
    return proc.memory_info().rss / MiB


# ----------------------------------------------------------------------------- (a) scp 100 MiB


def test_scp_100_mib_through_hub_port(relay, sshd_server, tmp_path):
    hub = relay.open_tcp(sshd_server.port)
    src, dst = tmp_path / "big.bin", tmp_path / "copy.bin"
    block = os.urandom(MiB)
    digest = hashlib.sha256()
    with src.open("wb") as out:  # 100 distinct MiB (a counter in each), hashed while written
        for i in range(100):
            data = i.to_bytes(4, "big") + block[4:]
            out.write(data)
            digest.update(data)
    started = time.monotonic()
    done = subprocess.run([*sshd_server.scp_args(hub), str(src), sshd_server.remote(dst)],
                          capture_output=True, timeout=180)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr.decode()
    copied = hashlib.sha256()
    with dst.open("rb") as inp:
        while data := inp.read(4 * MiB):
            copied.update(data)
    assert copied.hexdigest() == digest.hexdigest()
    print(f"\nscp 100 MiB through the hub port: {elapsed:.1f}s ({100 / elapsed:.0f} MiB/s)")
    src.unlink()
    dst.unlink()


# ----------------------------------------------------------------------------- (b) agent killed


def download(port: int, nbytes: int, sample: Optional[Callable[[], None]] = None) -> socket.socket:
    """Connect to ``port`` and read ``nbytes`` (calling ``sample`` about every MiB);
    returns the still-open socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    got = sampled = 0
    while got < nbytes:
        chunk = sock.recv(1 << 20)
        assert chunk, f"closed after {got} bytes"
        got += len(chunk)
        if sample is not None and got - sampled >= MiB:
            sampled = got
            sample()
    return sock


def test_agent_killed_mid_download(relay, targets):
    hub = relay.open_tcp(targets.source_port)
    gw = relay.gateway_process
    # Warm up: buffers, the allocator's arenas and lazy imports reach their working size.
    for _ in range(2):
        download(hub, 32 * MiB).close()
    time.sleep(1.0)
    baseline = rss_mib(gw)

    peak = baseline

    def sample() -> None:
        nonlocal peak
        peak = max(peak, rss_mib(gw))

    sock = download(hub, 16 * MiB, sample)
    relay.agent.kill()  # SIGKILL mid-transfer: no GOAWAY, the kernel closes its socket
    killed = time.monotonic()
    ended = "eof"
    try:
        while sock.recv(1 << 20):
            assert time.monotonic() - killed < 5, "the client still receives data 5s after the kill"
    except ConnectionResetError:
        ended = "reset"
    except socket.timeout:
        pytest.fail("the client saw neither EOF nor a reset within 10s of the agent's death")
    sock.close()
    seen_after = time.monotonic() - killed
    assert seen_after < 5
    relay.agent.wait(10)
    wait_for(lambda: relay.online_agent() is None, what="agent offline")

    # Memory: back near the warmed-up baseline once the agent and its streams are gone.
    try:
        after = wait_for(lambda: (r := rss_mib(gw)) <= baseline + 20 and r, timeout=15, what="RSS near baseline")
    except TimeoutError:
        after = rss_mib(gw)
    print(f"\nagent SIGKILLed mid-download: client {ended} after {seen_after:.2f}s; gateway RSS "
          f"baseline {baseline:.1f} MiB, peak {peak:.1f} MiB, after {after:.1f} MiB")
    assert after <= baseline + 20, (baseline, peak, after)

    # The restarted agent comes back as the same agent; the same hub port works again.
    relay.start_agent()
    download(hub, 4 * MiB).close()


# ----------------------------------------------------------------------------- (c) oversized frames

FRAME = struct.Struct(">BBHII")  # version, type, flags, stream id, length (docs/PROTOCOL.md)
OPEN, RESET, GOAWAY, SETTINGS = 2, 4, 6, 7
FRAME_SIZE_ERROR = 5


class FakeAgent:
    """A raw WebSocket client that authenticates with a real ak- key and speaks mux
    frames by hand (only its SETTINGS come from the sans-IO core)."""

    def __init__(self, port: int, key: str) -> None:
        from relay.mux.connection import MuxConfig, MuxConnection
        from relay.ws import FrameParser
        from relay.ws.handshake import ClientHandshake

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        handshake = ClientHandshake(f"127.0.0.1:{port}", "/api/v1/agent/connect",
                                    extra_headers=[("Authorization", f"Bearer {key}")])
        self.sock.sendall(handshake.request_bytes())
        accepted = None
        while accepted is None:
            accepted = handshake.receive_data(self.sock.recv(65536))
        self.parser = FrameParser(64 * MiB, False)
        self.buffer = bytearray()
        self._feed(accepted.leftover)
        hello = MuxConnection(True, MuxConfig(info={"name": "fake", "labels": [], "version": "0"}))
        self.send(hello.data_to_send())
        assert self.next_frame()[0] == SETTINGS

    def send(self, data: bytes) -> None:
        from relay.ws import Opcode, encode_frame

        self.sock.sendall(encode_frame(Opcode.BINARY, data, mask=True))

    def _feed(self, data: bytes) -> bool:
        from relay.ws import Opcode

        for opcode, payload in self.parser.feed(data):
            if opcode == Opcode.BINARY:
                self.buffer += payload
        return bool(data)

    def next_frame(self) -> Optional[tuple[int, int, bytes]]:
        """The next mux frame ``(type, stream id, payload)``; None once the socket closes."""
        while True:
            if len(self.buffer) >= FRAME.size:
                _, kind, _, stream_id, length = FRAME.unpack_from(self.buffer)
                if len(self.buffer) >= FRAME.size + length:
                    payload = bytes(self.buffer[FRAME.size:FRAME.size + length])
                    del self.buffer[:FRAME.size + length]
                    return kind, stream_id, payload
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not self._feed(data):
                return None

    def wait_for(self, kind: int) -> tuple[int, bytes]:
        """Skip frames (CONTROL welcome, PING ...) until one of ``kind``."""
        while (frame := self.next_frame()) is not None:
            if frame[0] == kind:
                return frame[1], frame[2]
        raise AssertionError(f"socket closed before a frame of type {kind}")

    def closed(self) -> bool:
        """True if the gateway closes the socket (within the socket timeout)."""
        while self.next_frame() is not None:
            pass
        return True


def test_oversized_frames_close_only_that_agent(relay, targets):
    import msgpack

    hub = relay.open_tcp(targets.echo_port)
    assert echo_once(hub) == b"ping through the relay"
    limit = 1 * MiB  # max(max_frame_size, max_metadata_size, max_control_size, 64 KiB) by default

    # OPEN metadata over max_metadata_size (16 KiB) but within the frame limit: a stream
    # error (PROTOCOL.md section 3) - RESET FRAME_SIZE_ERROR, and the session lives on.
    fake = FakeAgent(relay.port, relay.keys["ak"])
    metadata = msgpack.packb({"target": "127.0.0.1:1", "pad": "x" * (20 * 1024)})
    fake.send(FRAME.pack(1, OPEN, 0, 1, len(metadata)) + metadata)
    stream_id, payload = fake.wait_for(RESET)
    assert stream_id == 1 and struct.unpack_from(">I", payload)[0] == FRAME_SIZE_ERROR
    # A header announcing more than the frame limit: a session error, refused before the
    # payload is buffered - GOAWAY FRAME_SIZE_ERROR, then the socket is closed.
    fake.send(FRAME.pack(1, 0, 0, 1, limit + 1))
    _, payload = fake.wait_for(GOAWAY)
    assert struct.unpack_from(">II", payload)[1] == FRAME_SIZE_ERROR, payload
    assert fake.closed()
    fake.sock.close()

    # An OPEN whose metadata is beyond every limit (16 MiB announced, nothing sent).
    fake = FakeAgent(relay.port, relay.keys["ak"])
    fake.send(FRAME.pack(1, OPEN, 0, 1, 16 * MiB))
    _, payload = fake.wait_for(GOAWAY)
    assert struct.unpack_from(">II", payload)[1] == FRAME_SIZE_ERROR
    assert b"exceeds" in payload[8:]
    assert fake.closed()
    fake.sock.close()

    # The real agent was never disturbed.
    assert relay.online_agent() == relay.agent_id
    assert echo_once(hub) == b"ping through the relay"
    assert relay.online_agent("fake") is None


# ----------------------------------------------------------------------------- (d) burst


async def burst(port: int, count: int, timeout: float) -> dict[str, int]:
    """``count`` concurrent connections to ``port``: each sends 5 bytes and waits for the
    echo or the end. Returns how many were served, closed, refused or timed out."""
    outcomes: dict[str, int] = {"served": 0, "closed": 0, "refused": 0, "timeout": 0}

    async def one() -> None:
        writer = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"hello")
                data = await reader.read(5)
                while data and len(data) < 5 and (more := await reader.read(5 - len(data))):
                    data += more
                outcomes["served" if data == b"hello" else "closed"] += 1
        except TimeoutError:
            outcomes["timeout"] += 1
        except ConnectionRefusedError:
            outcomes["refused"] += 1
        except ConnectionError:
            outcomes["closed"] += 1
        finally:
            if writer is not None:
                writer.close()

    await asyncio.gather(*(one() for _ in range(count)))
    return outcomes


def test_burst_with_agent_offline_then_online_leaks_nothing(relay, targets):
    hub = relay.open_tcp(targets.echo_port)
    gw = relay.gateway_process
    assert echo_once(hub)
    baseline = gw.num_fds()

    relay.kill_agent(signal.SIGTERM)
    started = time.monotonic()
    offline = asyncio.run(burst(hub, 300, timeout=20))
    offline_s = time.monotonic() - started
    assert offline["timeout"] == 0 and offline["served"] == 0, offline

    relay.start_agent()
    online_baseline = gw.num_fds()
    started = time.monotonic()
    online = asyncio.run(burst(hub, 300, timeout=30))
    online_s = time.monotonic() - started
    assert online["timeout"] == 0 and online["served"] == 300, online

    after = wait_for(lambda: (n := gw.num_fds()) <= max(baseline, online_baseline) + 2 and n,
                     timeout=15, what="gateway fds back at baseline")
    print(f"\nburst of 300 (agent offline): {offline} in {offline_s:.1f}s; (online): {online} in "
          f"{online_s:.1f}s; gateway fds baseline {baseline}, after {after}")
    assert echo_once(hub) == b"ping through the relay"
