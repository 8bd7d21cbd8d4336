"""UDP tunnels end to end: datagrams over the mux with their boundaries, one flow per
client address, idle expiry, drop-oldest under a slow reader, the agent's allowlist,
``relay connect --udp``; and the sans-IO rules of relay.mux.datagrams.

Real processes (``relay gateway``, ``relay agent``, ``relay connect --udp``) and real
sockets on 127.0.0.1: the targets are UDP servers on threads of this process (an echo
that can also flood, and a DNS server answering A queries in the DNS wire format).
"""
from __future__ import annotations

import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from relay.gateway.api.tunnels import auto_protocol
from relay.mux.datagrams import (
    MAX_DATAGRAM,
    DatagramDecoder,
    DatagramFlow,
    DatagramTooLarge,
    DropOldestQueue,
    encode_datagram,
    encode_datagrams,
)
from relay.ws import FrameParser, Opcode, encode_close_payload, encode_frame
from relay.ws.handshake import ClientHandshake
from tests.gateway.test_faults import RelayProcs, wait_for
from tests.support.servers import free_port, require_binary

pytestmark = pytest.mark.timeout(180)

#: The gateway's flow idle timeout in these tests (RELAY_UDP_IDLE_TIMEOUT).
IDLE = 1.5

# ----------------------------------------------------------------------------- sans-IO


def test_records_keep_boundaries_however_the_bytes_are_cut() -> None:
    rng = random.Random(7)
    sizes = [0, 1, 2, 3, 255, 256, 1200, 16383, 16384, 16385, 60000, MAX_DATAGRAM]
    datagrams = [bytes(rng.getrandbits(8) for _ in range(min(n, 64))) * (n // 64) + bytes(n % 64)
                 for n in sizes]
    assert [len(d) for d in datagrams] == sizes
    wire = encode_datagrams(datagrams)
    assert len(wire) == sum(sizes) + 2 * len(sizes)
    for _ in range(20):
        decoder = DatagramDecoder()
        out: list[bytes] = []
        i = 0
        while i < len(wire):
            step = rng.choice([1, 2, 3, 7, 1000, 16384, 70000])
            out += decoder.feed(memoryview(wire)[i:i + step])
            i += step
        assert out == datagrams
        assert decoder.pending == 0
    with pytest.raises(DatagramTooLarge):
        encode_datagram(bytes(MAX_DATAGRAM + 1))


def test_decoder_holds_at_most_one_partial_record() -> None:
    decoder = DatagramDecoder()
    assert decoder.feed(b"\xff\xff" + bytes(1000)) == []
    assert decoder.pending == 1002
    assert decoder.feed(bytes(MAX_DATAGRAM - 1000) + b"\x00\x01x") == [bytes(MAX_DATAGRAM), b"x"]
    assert decoder.pending == 0


def test_queue_drops_the_oldest_and_counts() -> None:
    queue = DropOldestQueue(max_datagrams=3, max_bytes=MAX_DATAGRAM)
    assert [queue.push(bytes([i])) for i in range(5)] == [0, 0, 0, 1, 1]
    assert queue.dropped == 2 and queue.dropped_bytes == 2
    assert [queue.pop() for _ in range(4)] == [b"\x02", b"\x03", b"\x04", None]
    by_bytes = DropOldestQueue(max_datagrams=100, max_bytes=MAX_DATAGRAM)
    by_bytes.push(bytes(40000))
    by_bytes.push(bytes(20000))
    assert by_bytes.push(bytes(10000)) == 1  # 70000 > 65535: the 40000 goes
    assert len(by_bytes) == 2 and by_bytes.queued_bytes == 30000
    assert by_bytes.push(bytes(MAX_DATAGRAM)) == 2  # the largest datagram always fits alone
    assert len(by_bytes) == 1 and by_bytes.dropped == 3
    with pytest.raises(ValueError):
        DropOldestQueue(max_bytes=100)


def test_flow_idle_deadline_moves_with_datagrams_either_way() -> None:
    flow = DatagramFlow(100.0, idle_timeout=10.0)
    assert flow.deadline == 110.0 and not flow.expired(109.9) and flow.expired(110.0)
    flow.from_local(b"q", 105.0)
    assert flow.deadline == 115.0
    assert flow.take_record() == b"\x00\x01q" and flow.take_record() is None
    assert flow.from_stream(b"\x00\x02ok\x00", 112.0) == [b"ok"]
    assert flow.deadline == 122.0
    assert flow.from_stream(b"", 121.0) == [] and flow.deadline == 122.0  # a partial record is no datagram
    assert flow.from_local(bytes(MAX_DATAGRAM + 1), 121.0) == 0 and flow.too_large == 1
    assert (flow.datagrams_in, flow.datagrams_out, flow.bytes_in, flow.bytes_out) == (1, 1, 1, 2)


def test_auto_picks_udp_for_udp_service_ports() -> None:
    for port in (53, 123, 514, 8125, 51820):
        assert auto_protocol(port) == "udp"
    assert auto_protocol(5432) == "tcp" and auto_protocol(8080) == "http" and auto_protocol(443) == "https"


# ----------------------------------------------------------------------------- targets


class UdpTarget:
    """A UDP server on a thread. ``echo``: every datagram back to its sender, and
    ``FLOOD n size`` answered with n datagrams of ``size`` bytes, each starting with its
    number (u32). ``dns``: answers A queries with 192.0.2.<len(name)>. ``peers`` keeps
    every source address seen (one per agent-side flow)."""

    def __init__(self, kind: str, host: str = "127.0.0.1") -> None:
        self.kind = kind
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.peers: list[Any] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(70000)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr not in self.peers:
                self.peers.append(addr)
            if self.kind == "dns":
                self.sock.sendto(dns_answer(data), addr)
            elif data.startswith(b"FLOOD "):
                _, n, size = data.split()
                for i in range(int(n)):
                    self.sock.sendto(struct.pack(">I", i) + bytes(int(size) - 4), addr)
                    if i % 32 == 31:
                        time.sleep(0.001)  # a fast sender, not one the agent's kernel drops
            else:
                self.sock.sendto(data, addr)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def dns_query(qid: int, name: str) -> bytes:
    """A DNS query (RFC 1035 wire format): one question, ``name`` IN A, recursion desired."""
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\x00"
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack(">HH", 1, 1)


def dns_answer(query: bytes) -> bytes:
    """The answer to :func:`dns_query`'s query: the question echoed and one A record."""
    qid = struct.unpack(">H", query[:2])[0]
    end = 12
    labels = []
    while query[end]:
        labels.append(query[end + 1:end + 1 + query[end]].decode())
        end += 1 + query[end]
    question = query[12:end + 5]
    name = ".".join(labels)
    answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, len(name)])
    return struct.pack(">HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question + answer


def parse_dns_answer(reply: bytes) -> tuple[int, str]:
    """(id, the A record's address) of :func:`dns_answer`'s reply."""
    qid, flags, _, ancount = struct.unpack(">HHHH", reply[:8])
    assert flags & 0x8000 and ancount == 1
    return qid, socket.inet_ntoa(reply[-4:])


@pytest.fixture(scope="module")
def echo() -> Iterator[UdpTarget]:
    target = UdpTarget("echo")
    yield target
    target.close()


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcs]:
    """``relay gateway`` (flows idle after IDLE seconds) and ``relay agent`` (loopback
    targets only) as processes."""
    patch = pytest.MonkeyPatch()
    patch.setenv("RELAY_UDP_IDLE_TIMEOUT", str(IDLE))
    try:
        procs = RelayProcs(tmp_path_factory.mktemp("udp"))
    finally:
        patch.undo()
    yield procs
    procs.close()


def open_udp_session(relay: RelayProcs, port: int) -> dict[str, Any]:
    status, body = relay.api("POST", f"/api/v1/agents/{relay.agent_id}/tunnel",
                             {"target_port": port, "tunnel_protocol": "udp"})
    assert status == 200, body
    assert body["tunnel_protocol"] == "udp" and body["tunnel_url"].endswith("/udp")
    return body


def session_stats(relay: RelayProcs, session_id: str) -> dict[str, Any]:
    status, body = relay.api("GET", f"/api/v1/agents/{relay.agent_id}")
    assert status == 200, body
    return next(t for t in body["tunnels"] if t["session_id"] == session_id)


def client(timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(timeout)
    return sock


def exchange(sock: socket.socket, port: int, payload: bytes, tries: int = 3) -> bytes:
    """Send ``payload`` to the hub port and return the reply (resent on a timeout: UDP)."""
    for attempt in range(tries):
        sock.sendto(payload, ("127.0.0.1", port))
        try:
            reply, _ = sock.recvfrom(70000)
            return reply
        except TimeoutError:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- end to end


def test_datagram_boundaries_kept_for_every_size(relay: RelayProcs, echo: UdpTarget) -> None:
    hub = open_udp_session(relay, echo.port)["hub_port"]
    sock = client()
    try:
        sizes = [1, 2, 17, 512, 1200, 1472, 9000, 16383, 16384, 16385, 32768, 50000, 60000, 65507]
        for size in sizes:
            payload = bytes(random.getrandbits(8) for _ in range(64)) * (size // 64) + b"z" * (size % 64)
            assert exchange(sock, hub, payload) == payload, size
        # Many back to back, no waiting: each arrives whole and alone.
        burst = [bytes([i]) * (1 + i * 211) for i in range(40)]
        for payload in burst:
            sock.sendto(payload, ("127.0.0.1", hub))
        got = [sock.recvfrom(70000)[0] for _ in burst]
        assert got == burst
    finally:
        sock.close()


def test_many_flows_at_once_are_kept_apart(relay: RelayProcs, echo: UdpTarget) -> None:
    session = open_udp_session(relay, echo.port)
    hub = session["hub_port"]
    socks = [client() for _ in range(60)]
    try:
        for round_ in range(4):
            for i, sock in enumerate(socks):
                sock.sendto(f"flow {i} round {round_}".encode(), ("127.0.0.1", hub))
        for i, sock in enumerate(socks):
            got = sorted(sock.recvfrom(1000)[0].decode() for _ in range(4))
            assert got == [f"flow {i} round {r}" for r in range(4)]
        stats = session_stats(relay, session["session_id"])["udp"]
        assert stats["flows"] == 60 and stats["active_flows"] == 60
        assert stats["datagrams_in"] == stats["datagrams_out"] == 240
    finally:
        for sock in socks:
            sock.close()


def test_idle_flow_expires_and_the_next_datagram_opens_a_new_one(relay: RelayProcs) -> None:
    target = UdpTarget("echo")
    sock = client()
    try:
        session = open_udp_session(relay, target.port)
        hub = session["hub_port"]
        assert exchange(sock, hub, b"one") == b"one"
        assert exchange(sock, hub, b"two") == b"two"
        assert len(target.peers) == 1  # one flow: one socket at the agent
        wait_for(lambda: session_stats(relay, session["session_id"])["udp"]["active_flows"] == 0,
                 timeout=IDLE + 10, what="the idle flow to end")
        assert exchange(sock, hub, b"three") == b"three"
        assert len(target.peers) == 2  # a new flow, a new socket at the agent
        assert session_stats(relay, session["session_id"])["udp"]["flows"] == 2
    finally:
        sock.close()
        target.close()


class WsFlow:
    """A raw WebSocket client of a udp tunnel URL (what ``relay connect --udp`` does for
    one flow), with a small receive buffer so that not reading is soon felt."""

    def __init__(self, url: str, rcvbuf: Optional[int] = None) -> None:
        rest = url.split("://", 1)[1]
        hostport, path = rest.split("/", 1)
        host, port = hostport.rsplit(":", 1)
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect((host, int(port)))
        self.sock.settimeout(10)
        handshake = ClientHandshake(hostport, "/" + path)
        self.sock.sendall(handshake.request_bytes())
        accepted = None
        while accepted is None:
            accepted = handshake.receive_data(self.sock.recv(65536))
        self.parser = FrameParser(MAX_DATAGRAM, False)
        self.messages = list(self.parser.feed(accepted.leftover))

    def send(self, datagram: bytes) -> None:
        self.sock.sendall(encode_frame(Opcode.BINARY, datagram, mask=True))

    def receive_all(self, quiet: float) -> list[tuple[int, bytes]]:
        """Every message until none came for ``quiet`` seconds (or a close)."""
        self.sock.settimeout(quiet)
        out = []
        while True:
            while self.messages:
                opcode, payload = self.messages.pop(0)
                out.append((opcode, bytes(payload)))
                if opcode == Opcode.CLOSE:
                    return out
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                return out
            if not data:
                return out
            self.messages.extend(self.parser.feed(data))

    def close(self) -> None:
        try:
            self.sock.sendall(encode_frame(Opcode.CLOSE, encode_close_payload(1000), mask=True))
        except OSError:
            pass
        self.sock.close()


def test_a_slow_reader_loses_the_oldest_datagrams_and_they_are_counted(relay: RelayProcs,
                                                                        echo: UdpTarget) -> None:
    session = open_udp_session(relay, echo.port)
    flow = WsFlow(session["tunnel_url"], rcvbuf=8192)
    total, size = 6000, 1000
    try:
        flow.send(f"FLOOD {total} {size}".encode())
        time.sleep(4)  # not reading: the gateway's queue for this client fills and overflows
        messages = flow.receive_all(quiet=1.5)
    finally:
        flow.close()
    numbers = [struct.unpack(">I", payload[:4])[0] for opcode, payload in messages if opcode == Opcode.BINARY]
    assert all(len(p) == size for o, p in messages if o == Opcode.BINARY)
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)  # in order, no duplicate
    assert numbers[-1] == total - 1  # the newest survived: the oldest were the ones dropped
    assert len(numbers) < total
    assert any(b - a > 1 for a, b in zip(numbers, numbers[1:], strict=False))
    stats = session_stats(relay, session["session_id"])["udp"]
    assert stats["datagrams_dropped"] > 0
    assert len(numbers) + stats["datagrams_dropped"] <= total
    with urllib.request.urlopen(f"http://127.0.0.1:{relay.port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    dropped = re.search(r"^relay_udp_datagrams_dropped_total (\S+)$", metrics, re.M)
    assert dropped and float(dropped.group(1)) >= stats["datagrams_dropped"], metrics


def test_a_target_the_agent_does_not_allow_is_refused(relay: RelayProcs) -> None:
    outside = UdpTarget("echo", host="127.0.0.2")  # the agent allows loopback hosts only
    sock = client(timeout=1.0)
    try:
        body = {"target": f"127.0.0.2:{outside.port}", "agent_id": relay.agent_id, "protocol": "udp"}
        status, answer = relay.api("POST", "/api/v1/tunnels", body)
        assert status == 403 and answer["error"]["code"] == "target_not_allowed", answer
        # Created while the agent is away (nobody can tell its policy): the agent refuses
        # the flow when it opens.
        relay.kill_agent()
        status, tunnel = relay.api("POST", "/api/v1/tunnels", body)
        assert status == 201 and tunnel["protocol"] == "udp", tunnel
        relay.start_agent()
        sock.sendto(b"let me in", ("127.0.0.1", tunnel["hub_port"]))
        with pytest.raises(TimeoutError):
            sock.recvfrom(1000)

        def refused() -> bool:
            got = relay.api("GET", f"/api/v1/tunnels/{tunnel['id']}")[1]
            return "NOT_ALLOWED" in (got["last_error"] or "") and got["udp"]["active_flows"] == 0
        wait_for(refused, what="the refusal")
        assert outside.peers == []  # nothing reached the target
        relay.api("DELETE", f"/api/v1/tunnels/{tunnel['id']}")
    finally:
        sock.close()
        outside.close()


def test_tunnels_api_udp_and_auto(relay: RelayProcs, echo: UdpTarget) -> None:
    status, tunnel = relay.api("POST", "/api/v1/tunnels",
                               {"target": f"127.0.0.1:{echo.port}", "agent_id": relay.agent_id,
                                "protocol": "udp", "name": "udp-echo"})
    assert status == 201 and tunnel["status"] == "active", tunnel
    sock = client()
    try:
        assert exchange(sock, tunnel["hub_port"], b"via the tunnels api") == b"via the tunnels api"
    finally:
        sock.close()
    got = relay.api("GET", f"/api/v1/tunnels/{tunnel['id']}")[1]
    assert got["udp"]["flows"] == 1 and got["udp"]["datagrams_out"] == 1
    status, auto = relay.api("POST", "/api/v1/tunnels", {"target": "127.0.0.1:53", "agent_id": relay.agent_id})
    assert status == 201 and auto["protocol"] == "udp", auto
    status, answer = relay.api("POST", f"/api/v1/tunnels/{auto['id']}/connect", {"agent_id": relay.agent_id})
    assert status == 400 and answer["error"]["code"] == "unsupported_protocol"
    for t in (tunnel, auto):
        assert relay.api("DELETE", f"/api/v1/tunnels/{t['id']}")[0] == 204


def test_dns_through_relay_connect_udp(relay: RelayProcs, tmp_path: Path) -> None:
    dns = UdpTarget("dns")
    session = open_udp_session(relay, dns.port)
    port = free_port()
    log = tmp_path / "connect.log"
    proc = subprocess.Popen([sys.executable, "-m", "relay", "connect", "--udp", session["tunnel_url"],
                             "--listen", f"127.0.0.1:{port}"], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    socks = [client() for _ in range(5)]
    try:
        wait_for(lambda: b"listening on udp" in log.read_bytes(), what="relay connect --udp")
        for i, sock in enumerate(socks):  # five resolvers, two queries each: ten answers, each to its asker
            for j, name in enumerate((f"host{i}.example.test", f"www{'w' * i}.example.test")):
                qid = 1000 * i + j
                reply = exchange(sock, port, dns_query(qid, name))
                assert parse_dns_answer(reply) == (qid, f"192.0.2.{len(name)}")
        assert len(dns.peers) == 5  # one flow per local client, each its own socket at the agent
    finally:
        proc.terminate()
        proc.wait(10)
        for sock in socks:
            sock.close()
        dns.close()


def test_an_empty_datagram_is_carried_like_any_other(relay: RelayProcs, echo: UdpTarget, tmp_path: Path) -> None:
    """A zero-length datagram is a UDP message too (a keepalive, a probe): asyncio's
    ``sendto(b"")`` sends nothing, so the hub port, the agent and ``relay connect --udp``
    each have to send it themselves."""
    session = open_udp_session(relay, echo.port)
    port = free_port()
    log = tmp_path / "connect.log"
    proc = subprocess.Popen([sys.executable, "-m", "relay", "connect", "--udp", session["tunnel_url"],
                             "--listen", f"127.0.0.1:{port}"], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    sock = client(timeout=2.0)
    try:
        wait_for(lambda: b"listening on udp" in log.read_bytes(), what="relay connect --udp")
        for target in (session["hub_port"], port):  # the hub port, then relay connect --udp
            assert exchange(sock, target, b"before") == b"before"
            assert exchange(sock, target, b"") == b"", target
            assert exchange(sock, target, b"after") == b"after"
    finally:
        proc.terminate()
        proc.wait(10)
        sock.close()


class ConnectUdp:
    """``relay connect --udp TUNNEL_URL`` as a process, listening on a free local port."""

    def __init__(self, tunnel_url: str, log: Path, *extra: str) -> None:
        self.port = free_port()
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "relay", "connect", "--udp", tunnel_url,
                                      "--listen", f"127.0.0.1:{self.port}", *extra],
                                     stdout=log.open("wb"), stderr=subprocess.STDOUT)
        wait_for(lambda: b"listening on udp" in log.read_bytes(), what="relay connect --udp")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_relay_connect_udp_keeps_bytes_and_boundaries(relay: RelayProcs, echo: UdpTarget, tmp_path: Path) -> None:
    """Every size up to the largest UDP datagram, then bursts sent without waiting: each
    reply is one datagram, byte for byte, in order (the datagrams of one loop turn share
    a WebSocket write each way, and must still come out one message each)."""
    session = open_udp_session(relay, echo.port)
    connect = ConnectUdp(session["tunnel_url"], tmp_path / "connect.log")
    sock = client()
    try:
        for size in (1, 2, 125, 126, 127, 1200, 65535 - 8 - 20 - 1, 16384, 65507):
            payload = random.randbytes(size)
            assert exchange(sock, connect.port, payload) == payload, size
        for round_ in range(5):
            burst = [bytes([round_, i]) + random.randbytes(i * 97) for i in range(64)]
            for payload in burst:
                sock.sendto(payload, ("127.0.0.1", connect.port))
            got = [sock.recvfrom(70000)[0] for _ in burst]
            assert got == burst, round_
        stats = session_stats(relay, session["session_id"])["udp"]
        assert stats["flows"] == 1 and stats["datagrams_dropped"] == 0
    finally:
        sock.close()
        connect.close()


def test_relay_connect_udp_keeps_many_flows_apart(relay: RelayProcs, tmp_path: Path) -> None:
    """32 local clients at once, several datagrams each, sent before any reply is read:
    each gets only its own replies, and each is one flow (one socket) at the agent."""
    target = UdpTarget("echo")
    session = open_udp_session(relay, target.port)
    connect = ConnectUdp(session["tunnel_url"], tmp_path / "connect.log")
    socks = [client() for _ in range(32)]
    try:
        for round_ in range(4):
            for i, sock in enumerate(socks):
                sock.sendto(f"flow {i} round {round_}".encode(), ("127.0.0.1", connect.port))
        for i, sock in enumerate(socks):
            got = [sock.recvfrom(1000)[0].decode() for _ in range(4)]
            assert got == [f"flow {i} round {r}" for r in range(4)]
        assert len(target.peers) == 32
        stats = session_stats(relay, session["session_id"])["udp"]
        assert stats["flows"] == 32 and stats["datagrams_in"] == stats["datagrams_out"] == 128
    finally:
        for sock in socks:
            sock.close()
        connect.close()
        target.close()


def test_relay_connect_udp_flow_ends_when_idle_and_reopens(relay: RelayProcs, tmp_path: Path) -> None:
    """relay connect's own idle timeout (shorter than the gateway's) closes the flow's
    WebSocket; the next datagram opens a new flow."""
    target = UdpTarget("echo")
    session = open_udp_session(relay, target.port)
    connect = ConnectUdp(session["tunnel_url"], tmp_path / "connect.log", "--idle-timeout", "0.5")
    sock = client()
    try:
        assert exchange(sock, connect.port, b"one") == b"one"
        wait_for(lambda: session_stats(relay, session["session_id"])["udp"]["active_flows"] == 0,
                 timeout=IDLE + 10, what="the idle flow to end")
        assert exchange(sock, connect.port, b"two") == b"two"
        assert len(target.peers) == 2
        assert session_stats(relay, session["session_id"])["udp"]["flows"] == 2
    finally:
        sock.close()
        connect.close()
        target.close()


def test_relay_connect_udp_a_refused_websocket_ends_that_flow_only(relay: RelayProcs, echo: UdpTarget,
                                                                   tmp_path: Path) -> None:
    """A URL the gateway refuses (an unknown token: 404 to the upgrade) fails each flow's
    WebSocket with a log line; relay connect keeps running and the next datagram tries
    again."""
    session = open_udp_session(relay, echo.port)
    bad_url = session["tunnel_url"].replace("/tunnel/", "/tunnel/x")
    connect = ConnectUdp(bad_url, tmp_path / "connect.log")
    sock = client(timeout=0.5)
    try:
        for attempt in (1, 2):
            sock.sendto(b"anyone?", ("127.0.0.1", connect.port))
            wait_for(lambda n=attempt: connect.log.read_bytes().count(b"failed") >= n, what=f"failure {attempt}")
            with pytest.raises(TimeoutError):
                sock.recvfrom(1000)
        assert connect.proc.poll() is None
        assert b"404" in connect.log.read_bytes()
    finally:
        sock.close()
        connect.close()


def test_dig_through_the_hub_port_and_relay_connect_to_a_real_dnsmasq(relay: RelayProcs, tmp_path: Path) -> None:
    """dig, a real DNS client, asks dnsmasq, a real DNS server behind the agent, through
    the gateway's UDP hub port and through ``relay connect --udp``: every name gets the
    address dnsmasq serves for it."""
    dns_port = free_port()
    dnsmasq = subprocess.Popen(
        [require_binary("dnsmasq"), "--keep-in-foreground", "--conf-file=/dev/null", "--pid-file=",
         f"--port={dns_port}", "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
         "--address=/example.test/192.0.2.7", "--address=/relay.test/198.51.100.9"],
        stdout=(tmp_path / "dnsmasq.log").open("wb"), stderr=subprocess.STDOUT)
    connect: Optional[subprocess.Popen[bytes]] = None
    try:
        session = open_udp_session(relay, dns_port)
        port = free_port()
        log = tmp_path / "connect.log"
        connect = subprocess.Popen([sys.executable, "-m", "relay", "connect", "--udp", session["tunnel_url"],
                                    "--listen", f"127.0.0.1:{port}"], stdout=log.open("wb"),
                                   stderr=subprocess.STDOUT)
        wait_for(lambda: b"listening on udp" in log.read_bytes(), what="relay connect --udp")
        names = {"www.example.test": "192.0.2.7", "a.b.example.test": "192.0.2.7", "relay.test": "198.51.100.9"}
        for target in (session["hub_port"], port):  # the hub port, then relay connect --udp
            for name, address in names.items():
                answer = subprocess.run([require_binary("dig"), "@127.0.0.1", "-p", str(target), name, "A",
                                         "+short", "+tries=3", "+time=2"],
                                        capture_output=True, text=True, timeout=30)
                assert answer.returncode == 0, answer.stdout + answer.stderr
                assert answer.stdout.split() == [address], (target, name, answer.stdout)
    finally:
        if connect is not None:
            connect.terminate()
            connect.wait(10)
        dnsmasq.terminate()
        dnsmasq.wait(10)
