"""Floods and stalled readers against real processes (issue 12, items 1 and 2).

``relay gateway`` and ``relay agent`` run as subprocesses (tests/gateway/test_faults.py's
RelayProcs); the flooding peers are raw sockets in this process that never read:

* a fake agent (real ak- key) flooding mux PINGs, and one flooding OPENs the gateway
  refuses: the gateway ends that session (GOAWAY OVERLOADED, and a log line), its RSS stays within
  FLOOD_RSS_LIMIT_MIB of the warmed-up baseline, comes back once the peer leaves, and the
  real agent serves throughout;
* WebSocket pings at a TCP tunnel's URL (no key needed): only the latest is answered
  while the gateway cannot write, so its RSS stays within the same limit;
* 1,000 hub clients that read nothing, beside one that reads: the one that reads gets
  its whole download (before the receive budget, a few hundred stalled readers took the
  agent session's whole window and froze every stream).

Throughput and memory are printed (``pytest -s``); nothing asserts on speed.
"""
from __future__ import annotations

import itertools
import resource
import socket
import struct
import time
from collections.abc import Iterable

import msgpack
import psutil
import pytest

from tests.gateway.test_faults import (
    FRAME,
    OPEN,
    FakeAgent,
    RelayProcs,
    download,
    echo_once,
    relay_fixtures,
    rss_mib,
    wait_for,
)

pytestmark = pytest.mark.timeout(300)

MiB = 1024 * 1024
PING = 5
#: The most a flood may add to the gateway's RSS: the control-queue cap (1 MiB), the
#: socket buffers, and the allocator's slack, with room to spare. Before the caps, these
#: floods grew the gateway by about as much as the peer sent (hundreds of MiB here).
FLOOD_RSS_LIMIT_MIB = 48
#: What each flood sends at most, and for at most how long.
FLOOD_BYTES = 256 * MiB
FLOOD_SECONDS = 20.0


targets_fixture, relay_fixture = relay_fixtures("module")


@pytest.fixture(scope="module")
def warm(relay, targets) -> int:
    """A hub port to the echo target, used until the gateway's RSS has settled."""
    hub = relay.open_tcp(targets.echo_port)
    for _ in range(50):
        assert echo_once(hub, b"x" * 65536) == b"x" * 65536
    return hub


def settled_rss(proc: psutil.Process) -> float:
    time.sleep(0.5)
    return rss_mib(proc)


def flood(sock: socket.socket, messages: Iterable[bytes], gateway: psutil.Process) -> tuple[int, float]:
    """Send ``messages`` until the gateway stops taking them (it closed the session, or
    stopped reading), they run out, or FLOOD_BYTES / FLOOD_SECONDS are spent. Returns the
    bytes sent and the gateway's peak RSS seen meanwhile."""
    sock.settimeout(5.0)
    sent = 0
    peak = 0.0
    deadline = time.monotonic() + FLOOD_SECONDS
    for message in messages:
        if sent >= FLOOD_BYTES or time.monotonic() >= deadline:
            break
        try:
            sock.sendall(message)
        except (socket.timeout, ConnectionError):
            break
        sent += len(message)
        peak = max(peak, rss_mib(gateway))
    return sent, max(peak, rss_mib(gateway))


def overload_logged(relay: RelayProcs, before: int) -> bool:
    """Whether the gateway logged one more OVERLOADED session end since ``before`` lines.

    The GOAWAY itself is sent, but rarely seen here: the gateway closes a socket whose
    receive buffer still holds our unread flood, and the kernel turns that close into
    a RST that discards what it had queued for us."""
    return OVERLOAD_LOG in b"".join(gateway_log(relay)[before:])


OVERLOAD_LOG = b"the peer provokes answers faster than it reads them"


def gateway_log(relay: RelayProcs) -> list[bytes]:
    return (relay.workdir / "gateway.log").read_bytes().splitlines()


def fake_agent_not_reading(relay: RelayProcs) -> FakeAgent:
    fake = FakeAgent(relay.port, relay.keys["ak"])
    # A small receive buffer: the gateway's writes back up after a few KiB, as they
    # would behind any peer that does not read.
    fake.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return fake


def ws_message(payload: bytes) -> bytes:
    from relay.ws import Opcode, encode_frame

    return encode_frame(Opcode.BINARY, payload, mask=True)


def check_flood(relay: RelayProcs, hub: int, what: str, messages: Iterable[bytes]) -> None:
    """A fake agent that reads nothing sends ``messages`` (WebSocket messages of mux
    frames): the session ends OVERLOADED, the gateway's RSS stays bounded and comes back,
    and the real agent serves throughout."""
    gw = relay.gateway_process
    baseline = settled_rss(gw)
    logged = len(gateway_log(relay))
    fake = fake_agent_not_reading(relay)
    sent, peak = flood(fake.sock, messages, gw)
    wait_for(lambda: overload_logged(relay, logged), timeout=10, what="session ended OVERLOADED")
    assert fake.closed()
    fake.sock.close()
    after = wait_for(lambda: (r := rss_mib(gw)) <= baseline + 8 and r, timeout=15, what="RSS back near baseline")
    print(f"\n{what}: {sent / MiB:.0f} MiB sent; gateway RSS baseline {baseline:.1f}, "
          f"peak {peak:.1f}, after {after:.1f} MiB")
    assert peak <= baseline + FLOOD_RSS_LIMIT_MIB, (baseline, peak)
    # The real agent was never disturbed.
    assert relay.online_agent() == relay.agent_id
    assert echo_once(hub) == b"ping through the relay"


def test_mux_ping_flood_from_a_peer_that_never_reads(relay, warm):
    pings = b"".join(FRAME.pack(1, PING, 0, 0, 8) + struct.pack(">Q", i) for i in range(12000))
    check_flood(relay, warm, "mux PING flood", itertools.repeat(ws_message(pings)))


def test_refused_open_flood_from_a_peer_that_never_reads(relay, warm):
    # The gateway refuses every stream an agent opens; each refusal is a RESET it owes.
    empty = msgpack.packb({})
    opens = bytearray()
    stream_id = 1
    batches = []
    for _ in range(64):  # distinct, increasing ids across the whole flood
        opens.clear()
        for _ in range(8000):
            opens += FRAME.pack(1, OPEN, 0, stream_id, len(empty)) + empty
            stream_id += 2
        batches.append(ws_message(bytes(opens)))
    check_flood(relay, warm, "refused-OPEN flood", batches)


def test_websocket_ping_flood_at_a_tcp_tunnel_url(relay, targets, warm):
    from relay.ws import Opcode, encode_frame
    from relay.ws.handshake import ClientHandshake

    status, body = relay.api("POST", f"/api/v1/agents/{relay.agent_id}/tunnel",
                             {"target_port": targets.echo_port, "tunnel_protocol": "tcp"})
    assert status == 200, body
    path = "/" + body["tunnel_url"].split("/", 3)[3]  # ws://host:port/tunnel/TOKEN/tcp
    gw = relay.gateway_process
    baseline = settled_rss(gw)

    # (A default receive buffer: with a tiny one, loopback TCP's retransmission backoff
    # stalls our own sending for seconds, and the flood would prove little.)
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    handshake = ClientHandshake(f"127.0.0.1:{relay.port}", path)  # no credential: the URL is it
    sock.sendall(handshake.request_bytes())
    while handshake.receive_data(sock.recv(4096)) is None:
        pass
    pings = b"".join(encode_frame(Opcode.PING, b"p" * 125, mask=True) for _ in range(2000))
    sent, peak = flood(sock, itertools.repeat(pings), gw)
    sock.close()
    after = wait_for(lambda: (r := rss_mib(gw)) <= baseline + 8 and r, timeout=15, what="RSS back near baseline")
    print(f"\nWebSocket PING flood: {sent / MiB:.0f} MiB sent; gateway RSS baseline {baseline:.1f}, "
          f"peak {peak:.1f}, after {after:.1f} MiB")
    assert sent >= 16 * MiB  # the gateway kept reading: the pings were parsed, not left in a buffer
    assert peak <= baseline + FLOOD_RSS_LIMIT_MIB, (baseline, peak)
    assert echo_once(warm) == b"ping through the relay"


STALLED = 1000
#: What the healthy reader fetches beside them, and alone before them.
#: Long enough to see the healthy stream's steady rate: beside stalled readers that hold
#: the open half of the growth budget it earns its window by reading (its first MiBs run
#: at smaller windows), so a short download measures mostly that ramp.
BESIDE_MIB = 256


def test_a_thousand_stalled_readers_beside_a_healthy_download(relay, targets, warm):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * STALLED:  # our clients, and the target's ends of the agent's connections
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8 * STALLED), hard))
    hub = relay.open_tcp(targets.source_port)
    # The stalled readers get a 6 MiB response each: more than their windows and socket
    # buffers take, but finite. With an endless source this one machine's kernel, which
    # serves the targets, the agent, the gateway and the clients at once, runs out of
    # TCP memory (tcp_mem) first, and every connection on it crawls.
    stalled_hub = relay.open_tcp(targets.burst_port)
    gw = relay.gateway_process
    started = time.monotonic()
    download(hub, BESIDE_MIB * MiB).close()
    alone = time.monotonic() - started
    baseline = settled_rss(gw)

    stalled: list[socket.socket] = []
    try:
        for _ in range(STALLED):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", stalled_hub))
            stalled.append(sock)
        # Every stalled stream is open and full: its window and socket buffers are spent.
        wait_for(lambda: len(targets_connections(relay)) >= STALLED, timeout=60, what="every stream open")
        time.sleep(2.0)
        peak = rss_mib(gw)

        started = time.monotonic()
        download(hub, BESIDE_MIB * MiB).close()  # 10s socket timeout: a frozen stream fails here
        beside = time.monotonic() - started
        peak = max(peak, rss_mib(gw))
        print(f"\n{BESIDE_MIB} MiB download alone {BESIDE_MIB / alone:.0f} MiB/s, beside {STALLED} stalled readers "
              f"{BESIDE_MIB / beside:.1f} MiB/s; gateway RSS {baseline:.1f} -> {peak:.1f} MiB")
        # The gateway holds at most each stream's window (the budget: 64 MiB in all) plus
        # its socket's write buffer for a reader that does not read.
        assert peak <= baseline + 64 + STALLED * 0.2, (baseline, peak)
    finally:
        for sock in stalled:
            sock.close()
    # All gone: the hub port and the agent serve as before.
    wait_for(lambda: len(targets_connections(relay)) <= 1, timeout=30, what="stalled streams closed")
    download(hub, 4 * MiB).close()


def targets_connections(relay: RelayProcs) -> list:
    """The agent's established TCP connections to targets (one per open stream)."""
    return [c for c in psutil.Process(relay.agent.pid).net_connections("tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port != relay.port]
