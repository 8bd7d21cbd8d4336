"""Two agents with the same key and name (cloned machines) do not flap (issue 12, 9e).

Real processes: ``relay gateway`` and two ``relay agent`` processes started with the
same key and ``--name`` but different allowlists; an echo service in a thread of the
test process. The first agent keeps the name and every connection through its tunnel;
the second is refused with a clear reason (its log, at ERROR, with growing delays; a
WARNING on the gateway) and takes over only once the first is gone.
"""
from __future__ import annotations

import re
import signal
import socket
import time

import pytest

from tests.gateway.test_faults import RelayProcs, Targets, relay_fixtures, wait_for

pytestmark = pytest.mark.timeout(120)


targets_fixture, relay_fixture = relay_fixtures()


def echo_or_nothing(port: int, payload: bytes) -> bytes:
    """Send ``payload`` on a new connection; what comes back (b"" if it is refused)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(5)
        sock.sendall(payload)
        received = b""
        try:
            while len(received) < len(payload):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except OSError:
            pass
        return received


def test_clone_with_same_key_and_name_is_refused_and_does_not_flap(relay: RelayProcs, targets: Targets) -> None:
    first_log = relay.workdir / "agent.log"
    hub_port = relay.open_tcp(targets.echo_port)
    assert echo_or_nothing(hub_port, b"first") == b"first"
    status, before = relay.api("GET", f"/api/v1/agents/{relay.agent_id}")
    assert status == 200 and before["online"]

    # The clone: same key, same name, an allowlist that does not include the echo service,
    # so a connection routed to it would be refused instead of echoed.
    clone_log = relay.workdir / "clone.log"
    clone = relay._spawn("agent", "--gateway", f"http://127.0.0.1:{relay.port}", "--name", "faults",
                         "--allow", "127.0.0.1:1", log=clone_log, env={"RELAY_AGENT_KEY": relay.keys["ak"]})
    try:
        wait_for(lambda: "already connected" in clone_log.read_text(), timeout=15,
                 what="the clone is told why it is refused")
        # For several seconds every connection goes through the first agent, which is never
        # knocked off (one connection in its log, the same connected_at).
        deadline = time.monotonic() + 4.0
        rounds = 0
        while time.monotonic() < deadline:
            assert echo_or_nothing(hub_port, b"round %d" % rounds) == b"round %d" % rounds, clone_log.read_text()
            rounds += 1
            time.sleep(0.1)
        status, after = relay.api("GET", f"/api/v1/agents/{relay.agent_id}")
        assert after["online"] and after["connected_at"] == before["connected_at"], after
        assert first_log.read_text().count("connected to http") == 1, first_log.read_text()
        assert clone.poll() is None  # still running, waiting for the name

        text = clone_log.read_text()
        refusals = re.findall(r"ERROR.*agent name 'faults' is already connected.*retrying in ([0-9.]+)s", text)
        assert 1 <= len(refusals) <= 5, text  # backing off, not hammering
        delays = [float(d) for d in refusals]
        assert delays == sorted(delays) and delays[-1] > delays[0] or len(delays) == 1, text
        assert "--name" in text  # says what to do about it
        gateway_log = (relay.workdir / "gateway.log").read_text()
        assert re.search(r"WARNING.*refused a second connection", gateway_log), gateway_log
        assert relay.keys["ak"] not in text

        # Once the first agent is gone for real, the clone takes the name over.
        assert relay.agent is not None
        relay.agent.send_signal(signal.SIGKILL)
        relay.agent.wait(10)
        wait_for(lambda: "registered as agent" in clone_log.read_text(), timeout=40,
                 what="the clone takes over once the first agent is gone")
        assert echo_or_nothing(hub_port, b"to the clone") == b""  # its allowlist refuses the echo port
    finally:
        if clone.poll() is None:
            clone.terminate()
            clone.wait(10)


def test_a_dead_holder_of_the_name_is_replaced(relay: RelayProcs) -> None:
    """A connection that holds the name but no longer answers (a half-open socket of a
    crashed machine: here a raw WebSocket client that sent its hello and went silent) does
    not lock its agent out: the newcomer's PING probe gets no answer, so it is replaced."""
    from tests.gateway.test_faults import FakeAgent

    silent = FakeAgent(relay.port, relay.keys["ak"])  # name "fake"; never answers a PING
    try:
        wait_for(lambda: relay.online_agent("fake"), timeout=10, what="the silent agent registered")
        log = relay.workdir / "fake.log"
        real = relay._spawn("agent", "--gateway", f"http://127.0.0.1:{relay.port}", "--name", "fake",
                            log=log, env={"RELAY_AGENT_KEY": relay.keys["ak"]})
        try:
            wait_for(lambda: "registered as agent" in log.read_text(), timeout=20,
                     what="the newcomer replaces the silent holder")
            assert "already connected" not in log.read_text()
            assert silent.closed()  # the dead connection was dropped
            status, body = relay.api("GET", "/api/v1/agents")
            assert [a["online"] for a in body["agents"] if a["name"] == "fake"] == [True]
        finally:
            real.terminate()
            real.wait(10)
    finally:
        silent.sock.close()


def test_one_agent_dialling_the_same_gateway_twice_keeps_one_session(relay: RelayProcs, targets: Targets) -> None:
    """An agent given two URLs of one gateway (``--connections 2``): its second
    connection is the same agent process, not a clone and not a reconnect. The gateway
    keeps the first session and refuses the second with GOAWAY REFUSED; the agent says
    so, keeps serving through the first and backs off; nothing flaps."""
    log = relay.workdir / "twice.log"
    proc = relay._spawn("agent", "--gateway", f"http://127.0.0.1:{relay.port}", "--gateway",
                        f"http://localhost:{relay.port}", "--connections", "2", "--name", "twice",
                        "--allow", f"127.0.0.1:{targets.echo_port}", log=log,
                        env={"RELAY_AGENT_KEY": relay.keys["ak"]})
    try:
        wait_for(lambda: "is a gateway this agent is connected to already" in log.read_text(), timeout=20,
                 what="the second connection is told the gateway holds the agent already")
        agent_id = wait_for(lambda: relay.online_agent("twice"), timeout=10, what="agent online")
        status, before = relay.api("GET", f"/api/v1/agents/{agent_id}")
        assert status == 200 and before["online"]
        status, body = relay.api("POST", f"/api/v1/agents/{agent_id}/tunnel",
                                 {"target_port": targets.echo_port, "tunnel_protocol": "tcp"})
        assert status == 200, body
        hub_port = body["hub_port"]
        deadline = time.monotonic() + 4.0
        rounds = 0
        while time.monotonic() < deadline:
            assert echo_or_nothing(hub_port, b"twice %d" % rounds) == b"twice %d" % rounds, log.read_text()
            rounds += 1
            time.sleep(0.1)
        status, after = relay.api("GET", f"/api/v1/agents/{agent_id}")
        assert after["online"] and after["connected_at"] == before["connected_at"], after
        text = log.read_text()
        assert "ERROR" not in text, text  # nothing is wrong with this agent
        assert 1 <= text.count("is a gateway this agent is connected to already") <= 5, text  # backing off
    finally:
        proc.terminate()
        proc.wait(10)
