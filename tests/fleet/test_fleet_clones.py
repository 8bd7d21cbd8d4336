"""Two agent processes with the same key and name on two gateways of a fleet (cloned
machines) do not take the agent from each other (relay.gateway.fleet.clones).

Real processes: gateways a and b (one Redis, one shared SQLite store), ``relay agent``
processes, an echo service in a thread of the test process. The rule is the one gateway's
(tests/gateway/test_duplicate_agents.py): the first live process keeps the agent and every
connection through its tunnel; the other is refused with a clear reason, backs off, and
takes over only once the first is gone. An agent holding two sessions (``--connections
2``, one process) is not a clone: it keeps both.
"""
from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fleet.test_fleet import Fleet, _spawn, _stop, echo_works
from tests.gateway.test_duplicate_agents import echo_or_nothing
from tests.gateway.test_faults import Targets, wait_for
from tests.support.servers import start_redis

pytestmark = pytest.mark.timeout(180)

REFUSAL = re.compile(r"ERROR.*agent name '(\w+)' is already connected.*retrying in ([0-9.]+)s")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Gateways a and b, no agents."""
    with start_redis(tmp_path_factory.mktemp("clones-redis")) as server:
        running = Fleet(tmp_path_factory.mktemp("clones"), f"redis://127.0.0.1:{server.port}/0")
        try:
            running.start_gateway("a")
            running.start_gateway("b")
            yield running
        finally:
            running.close()


def _clone(fleet: Fleet, name: str, gateway: str, log: Path, allow: str) -> subprocess.Popen:
    """A ``relay agent`` with the fleet's agent key, not recorded in ``fleet.agents``
    (several processes of one name run at once here)."""
    return _spawn(["agent", "--name", name, "--allow", allow, "--gateway",
                   f"http://127.0.0.1:{fleet.port(gateway)}"], log, env={"RELAY_AGENT_KEY": fleet.keys["ak"]})


def _refusals(log: Path, name: str) -> list[float]:
    return [float(delay) for who, delay in REFUSAL.findall(log.read_text()) if who == name]


def test_a_clone_on_another_gateway_is_refused_and_an_agent_with_two_connections_is_not(
        fleet: Fleet, targets: Targets) -> None:
    first_log = fleet.workdir / "first.log"
    first = _clone(fleet, "cloned", "a", first_log, f"127.0.0.1:{targets.echo_port}")
    # One process with sessions to both gateways, started at the same time as the clone below.
    twin = fleet.start_agent("twin", ["a", "b"], allow=(f"127.0.0.1:{targets.echo_port}",), connections=2)
    clone: Any = None
    try:
        agent_id = wait_for(lambda: fleet.agent_id("b", "cloned"), what="the first agent seen at b")
        wait_for(lambda: fleet.holders(agent_id).keys() == {"a"}, what="the first agent leased at a")
        held = fleet.holders(agent_id)
        status, body = fleet.api("b", "POST", f"/api/v1/agents/{agent_id}/tunnel",
                                 {"target_port": targets.echo_port, "tunnel_protocol": "tcp"})
        assert status == 200, body
        hub = body["hub_port"]  # at b: every connection is forwarded to a
        wait_for(lambda: echo_works(hub), timeout=10, what="echo through b to the first agent")

        # The clone: same key and name, at b, with an allowlist without the echo service
        # (a connection routed to it would be refused, not echoed).
        clone_log = fleet.workdir / "clone.log"
        clone = _clone(fleet, "cloned", "b", clone_log, "127.0.0.1:1")
        wait_for(lambda: _refusals(clone_log, "cloned"), timeout=20, what="the clone is told why it is refused")
        twin_id = wait_for(lambda: fleet.agent_id("a", "twin"), what="the twin seen at a")
        wait_for(lambda: fleet.holders(twin_id).keys() == {"a", "b"}, what="the twin leased at a and b")
        twin_held = fleet.holders(twin_id)

        # For several seconds nothing moves: the first agent keeps its one session (the
        # same epoch) and every connection; the twin keeps both of its sessions.
        deadline = time.monotonic() + 4.0
        rounds = 0
        while time.monotonic() < deadline:
            assert echo_or_nothing(hub, b"round %d" % rounds) == b"round %d" % rounds, clone_log.read_text()
            assert fleet.holders(agent_id) == held
            assert fleet.holders(twin_id) == twin_held
            rounds += 1
            time.sleep(0.1)
        assert first_log.read_text().count("connected to http") == 1, first_log.read_text()
        assert clone.poll() is None  # still running, waiting for the name
        twin_log = (fleet.workdir / "agent-twin.log").read_text()
        assert "ERROR" not in twin_log and "already connected" not in twin_log, twin_log

        text = clone_log.read_text()
        delays = _refusals(clone_log, "cloned")
        assert 1 <= len(delays) <= 5, text  # backing off, not hammering
        assert delays == sorted(delays), text
        assert "through gateway a" in text and "--name" in text, text  # says where and what to do
        assert "registered as agent" not in text, text  # never admitted
        assert fleet.keys["ak"] not in text
        gateway_log = (fleet.workdir / "gateway-b.log").read_text()
        assert re.search(r"WARNING.*refused a second connection", gateway_log), gateway_log

        # Once the first agent is gone for real, the clone takes the agent over.
        first.kill()
        first.wait(10)
        wait_for(lambda: fleet.holders(agent_id).keys() == {"b"}, timeout=60,
                 what="the clone takes over once the first agent is gone")
        wait_for(lambda: "registered as agent" in clone_log.read_text(), timeout=10, what="the clone is welcomed")
    finally:
        _stop(first)
        _stop(clone)
        _stop(fleet.agents.pop("twin", twin))


def test_clones_started_at_once_on_two_gateways_settle_on_one(fleet: Fleet, targets: Targets) -> None:
    """Neither lease exists when the other gateway asks: both may be admitted, the later
    claim wins once, and from then on the other process is refused; nothing flaps."""
    logs = {g: fleet.workdir / f"at-once-{g}.log" for g in ("a", "b")}
    procs = {g: _clone(fleet, "atonce", g, logs[g], f"127.0.0.1:{targets.echo_port}") for g in ("a", "b")}
    try:
        wait_for(lambda: any(_refusals(log, "atonce") for log in logs.values()), timeout=30,
                 what="one of the two is refused")
        agent_id = wait_for(lambda: fleet.agent_id("a", "atonce"), what="the agent online")
        held = wait_for(lambda: fleet.holders(agent_id), what="the agent leased")
        assert len(held) == 1, held
        winner = next(iter(held))
        loser = "b" if winner == "a" else "a"
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            assert fleet.holders(agent_id) == held
            assert procs[winner].poll() is None and procs[loser].poll() is None
            time.sleep(0.2)
        assert not _refusals(logs[winner], "atonce"), logs[winner].read_text()
        assert logs[winner].read_text().count("connected to http") == 1, logs[winner].read_text()
        assert "through gateway " + winner in logs[loser].read_text()
    finally:
        for proc in procs.values():
            _stop(proc)
