"""The Tunnels API's connect reports the agent's bind result and survives reconnects
(issue 12, finding 9d).

Real processes: ``relay gateway`` with an exposing agent (``faults``) and a receiving
agent (``laptop``) as subprocesses, an echo service in a thread of the test process.
``connect`` answers only once the receiver reported its bind: a port it cannot listen on
is an error naming the reason, not a 200 with a connection string that leads nowhere.
A binding that worked comes back by itself when the receiver restarts.
"""
from __future__ import annotations

import signal
import socket
import subprocess

import pytest

from tests.gateway.test_faults import RelayProcs, Targets, echo_once, relay_fixtures, wait_for
from tests.support.servers import free_port

pytestmark = pytest.mark.timeout(120)


targets_fixture, relay_fixture = relay_fixtures()


def _start_receiver(relay: RelayProcs) -> subprocess.Popen:
    return relay._spawn("agent", "--gateway", f"http://127.0.0.1:{relay.port}", "--name", "laptop",
                        log=relay.workdir / "laptop.log", env={"RELAY_AGENT_KEY": relay.keys["ak"]})


def _online(relay: RelayProcs, name: str) -> bool:
    try:  # the gateway may not listen yet
        return relay.online_agent(name) is not None
    except OSError:
        return False


def _echoes(port: int) -> bool:
    try:
        return echo_once(port, b"are you there") == b"are you there"
    except OSError:
        return False


def test_connect_reports_a_failed_bind_and_rebinds_after_the_agent_restarts(
        relay: RelayProcs, targets: Targets) -> None:
    status, tunnel = relay.api("POST", "/api/v1/tunnels", {"target": f"127.0.0.1:{targets.echo_port}",
                                                          "agent_id": relay.agent_id, "name": "echo"})
    assert status == 201, tunnel
    receiver = _start_receiver(relay)
    try:
        laptop = wait_for(lambda: relay.online_agent("laptop"), what="receiver online")
        connect = f"/api/v1/tunnels/{tunnel['id']}/connect"

        # A port the receiver cannot listen on (something else holds it): a clear error.
        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen()
            taken = blocker.getsockname()[1]
            status, body = relay.api("POST", connect, {"agent_id": laptop, "local_port": taken})
            assert status == 502, body
            assert body["error"]["code"] == "bind_failed", body
            assert f"127.0.0.1:{taken}" in body["error"]["message"]
            assert "in use" in body["error"]["message"], body

        # A free port: 200 once it really listens, and it reaches the target.
        local = free_port()
        status, body = relay.api("POST", connect, {"agent_id": laptop, "local_port": local})
        assert status == 200, body
        assert body["connection_string"] == f"tcp://127.0.0.1:{local}"
        assert echo_once(local, b"via the laptop") == b"via the laptop"

        # The receiver restarts (its listeners die with it): the gateway re-sends the
        # binding when it is back, and the same local port works again.
        receiver.send_signal(signal.SIGKILL)
        receiver.wait(10)
        wait_for(lambda: relay.online_agent("laptop") is None, what="receiver offline")
        assert not _echoes(local)
        receiver = _start_receiver(relay)
        wait_for(lambda: _echoes(local), timeout=20, what="the binding re-established after the restart")
        assert relay.online_agent("laptop") == laptop  # the same agent

        # A gateway restart: the receiver reconnects and keeps (or regains) its binding.
        relay.gateway.terminate()
        relay.gateway.wait(10)
        relay.gateway = relay._spawn("gateway", "--listen", f"127.0.0.1:{relay.port}",
                                     "--data", str(relay.workdir / "data"), "--log-level", "info",
                                     log=relay.workdir / "gateway2.log")
        wait_for(lambda: _online(relay, "laptop") and _online(relay, "faults"), timeout=30,
                 what="both agents back after the gateway restart")
        wait_for(lambda: _echoes(local), timeout=20, what="the binding works after the gateway restart")
        assert "re-sent binding" in (relay.workdir / "gateway2.log").read_text()
    finally:
        if receiver.poll() is None:
            receiver.terminate()
            receiver.wait(10)


def test_a_reset_through_a_binding_arrives_as_a_reset(relay: RelayProcs, targets: Targets) -> None:
    """The exposing agent is killed mid-download: the client of the receiver's bound port
    reads a reset (ECONNRESET), not a clean end it could take for the whole file."""
    status, tunnel = relay.api("POST", "/api/v1/tunnels", {"target": f"127.0.0.1:{targets.source_port}",
                                                          "agent_id": relay.agent_id, "name": "source"})
    assert status == 201, tunnel
    receiver = _start_receiver(relay)
    try:
        laptop = wait_for(lambda: relay.online_agent("laptop"), what="receiver online")
        local = free_port()
        status, body = relay.api("POST", f"/api/v1/tunnels/{tunnel['id']}/connect",
                                 {"agent_id": laptop, "local_port": local})
        assert status == 200, body
        with socket.create_connection(("127.0.0.1", local), timeout=10) as sock:
            got = 0
            while got < 4 * 1024 * 1024:
                chunk = sock.recv(1 << 20)
                assert chunk, f"ended after {got} bytes"
                got += len(chunk)
            relay.agent.send_signal(signal.SIGKILL)  # the exposing agent, mid-transfer
            with pytest.raises(ConnectionResetError):
                while sock.recv(1 << 20):
                    pass
    finally:
        if receiver.poll() is None:
            receiver.terminate()
            receiver.wait(10)
