"""Seed 000 tunnel sessions and tasks across a fleet (issue 13, items 3 and 5), on the
fleet of tests/fleet/test_fleet.py (gateways a, b, c; ``on-a`` held by a, ``on-b`` by
b; SQLite shared by the three, then PostgreSQL):

* a tcp session's hub port is reserved in the store and listens on every gateway,
  those started before it was opened and after: bytes checked at a gateway that
  neither opened it nor holds its agent; closed at a third, it closes everywhere, and
  the agent is ``tunnel`` meanwhile at the gateway holding it, ``idle`` after;
* a session's idle timeout is enforced in a fleet: traffic through a gateway that
  neither opened it nor holds its agent keeps it open; once traffic stops it expires
  (everywhere) and the agent is ``idle`` again;
* a task with ``expose`` submitted at b runs on an agent held by a, with its tunnel
  event and a tunnel URL that answers through every gateway; cancelled at b, the
  handler on the agent is cancelled (its log says so) and the tunnel closes;
* a task submitted at b, running on an agent held by a, cancelled at c: the handler
  is cancelled and the task is ``cancelled`` at b;
* the agent APIs say which gateways hold each agent (``gateways``).
"""
from __future__ import annotations

import http.client
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fleet import test_fleet
from tests.fleet.test_fleet import (
    Fleet,
    HttpTarget,
    MiB,
    _stop,
    echo_checked,
    echo_works,
    http_get,
    refused,
    sse_events,
)
from tests.gateway.test_faults import wait_for

pytestmark = pytest.mark.timeout(180)

# The fleet of tests/fleet/test_fleet.py (a fleet of this module's own: module scope).
redis, fleet = test_fleet.redis, test_fleet.fleet


def _agent(fleet: Fleet, gateway: str, agent_id: str) -> dict[str, Any]:
    status, body = fleet.api(gateway, "GET", f"/api/v1/agents/{agent_id}")
    assert status == 200, body
    return body


def _open_sessions(fleet: Fleet, gateway: str, agent_id: str) -> list[str]:
    return [t["session_id"] for t in _agent(fleet, gateway, agent_id)["tunnels"]]


def _echo_task_runs(fleet: Fleet, gateway: str, label: str, n: int) -> None:
    """An echo task submitted at ``gateway`` for agents labelled ``label`` runs to its result."""
    status, answer = fleet.api(gateway, "POST", "/api/v1/tasks", {"kind": "echo", "input": {"n": n}, "labels": [label]})
    assert status == 202, answer
    events = sse_events(fleet, gateway, f"/api/v1/tasks/{answer['task_id']}/events")
    assert events[-1] == ("result", {"type": "result", "result": {"n": n}}), events


def test_a_tcp_session_hub_port_listens_on_every_gateway_and_closes_everywhere(fleet, targets):
    """Opened at b for on-a (held by a): x (hub host 127.0.0.2, started before) and y
    (127.0.0.3, started after) listen on its hub port too and carry checked bytes;
    closed at c, the port is refused on every host."""
    fleet.start_gateway("x", extra=("--hub-host", "127.0.0.2"))
    try:
        agent_id = fleet.agent_id("b", "on-a")
        status, body = fleet.api("b", "POST", f"/api/v1/agents/{agent_id}/tunnel",
                                 {"target_port": targets.echo_port, "tunnel_protocol": "tcp"})
        assert status == 200, body
        hub = body["hub_port"]
        wait_for(lambda: echo_works(hub, "127.0.0.2"), timeout=10, what="the session's hub port at x")
        echo_checked(hub, 2 * MiB, "127.0.0.2")
        fleet.start_gateway("y", extra=("--hub-host", "127.0.0.3"))
        wait_for(lambda: echo_works(hub, "127.0.0.3"), timeout=10, what="the session's hub port at y")
        echo_checked(hub, 2 * MiB, "127.0.0.3")
        echo_checked(hub, MiB)  # a, b and c share 127.0.0.1
        # The gateway holding the agent learnt of the session opened elsewhere.
        wait_for(lambda: _agent(fleet, "a", agent_id)["status"] == "tunnel", timeout=5, what="on-a in tunnel at a")

        status, closed = fleet.api("c", "DELETE", f"/api/v1/agents/{agent_id}/tunnel?session_id={body['session_id']}")
        assert status == 200 and closed["closed"] == [body["session_id"]], closed
        for host in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
            wait_for(lambda h=host: refused(hub, h), timeout=5, what=f"hub port closed on {host}")
        wait_for(lambda: _agent(fleet, "a", agent_id)["status"] == "idle", timeout=5, what="on-a idle again at a")
    finally:
        for name in ("x", "y"):
            if name in fleet.gateways:
                _stop(fleet.gateways.pop(name)[0])


def test_idle_timeout_counts_traffic_through_any_gateway_and_closes_everywhere(fleet, targets):
    """A session with a 3 s idle timeout, opened at b for on-a (held by a): connections
    every half second through x2's hub host (x2 neither opened it nor holds the agent)
    keep it open for three timeouts; once they stop, it expires everywhere and on-a is
    idle again."""
    fleet.start_gateway("x2", extra=("--hub-host", "127.0.0.2"))
    try:
        agent_id = fleet.agent_id("b", "on-a")
        status, body = fleet.api("b", "POST", f"/api/v1/agents/{agent_id}/tunnel",
                                 {"target_port": targets.echo_port, "tunnel_protocol": "tcp", "idle_timeout": 3})
        assert status == 200, body
        assert body["idle_timeout"] == 3, body  # enforced in a fleet too, so said
        hub, session_id = body["hub_port"], body["session_id"]
        wait_for(lambda: echo_works(hub, "127.0.0.2"), timeout=10, what="the session's hub port at x2")
        wait_for(lambda: _agent(fleet, "a", agent_id)["status"] == "tunnel", timeout=5, what="on-a in tunnel at a")
        end = time.monotonic() + 9
        while time.monotonic() < end:
            echo_checked(hub, 1024, "127.0.0.2")
            time.sleep(0.5)
        for gateway in ("a", "b", "c"):
            assert session_id in _open_sessions(fleet, gateway, agent_id), gateway
        stopped = time.monotonic()
        wait_for(lambda: session_id not in _open_sessions(fleet, "b", agent_id), timeout=20,
                 what="the idle session closed")
        print(f"\nidle session closed {time.monotonic() - stopped:.1f} s after its last traffic (timeout 3 s)")
        for host in ("127.0.0.1", "127.0.0.2"):
            wait_for(lambda h=host: refused(hub, h), timeout=5, what=f"hub port closed on {host}")
        wait_for(lambda: _agent(fleet, "a", agent_id)["status"] == "idle", timeout=5, what="on-a idle again at a")
    finally:
        _stop(fleet.gateways.pop("x2")[0])


def _task(fleet: Fleet, gateway: str, task_id: str) -> dict[str, Any]:
    status, body = fleet.api(gateway, "GET", f"/api/v1/tasks/{task_id}")
    assert status == 200, body
    return body


def _sse_until(fleet: Fleet, gateway: str, path: str, kind: str, timeout: float = 20) -> list[tuple[str, Any]]:
    """The events of a Server-Sent Events response read until one of ``kind``."""
    conn = http.client.HTTPConnection("127.0.0.1", fleet.port(gateway), timeout=timeout)
    events: list[tuple[str, Any]] = []
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {fleet.keys['sk']}"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        fields: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = resp.fp.readline().decode()
            assert line, f"the stream ended before a {kind} event: {events}"
            line = line.rstrip("\n")
            if line:
                if not line.startswith(":"):
                    name, _, value = line.partition(": ")
                    fields[name] = value
                continue
            if fields:
                events.append((fields["event"], json.loads(fields["data"])))
                if fields["event"] == kind:
                    return events
            fields = {}
    finally:
        conn.close()
    raise AssertionError(f"no {kind} event within {timeout} s: {events}")


def test_a_task_with_expose_runs_on_an_agent_held_elsewhere_with_its_tunnel(fleet):
    """``exposer`` (held by a) alone has the label. A task with ``expose`` submitted at b
    is dispatched to it; its tunnel event comes at b and its URL answers through every
    gateway. Cancelled at b, the agent's handler is cancelled too (its log says so), the
    tunnel closes everywhere and the agent takes the next task at once."""
    web = HttpTarget()
    fleet.start_agent("exposer", ["a"], extra=("--label", "fleet-exposer"))
    log = Path(fleet.workdir) / "agent-exposer.log"
    try:
        agent_id = wait_for(lambda: fleet.agent_id("b", "exposer"), what="exposer seen at b")
        assert fleet.holder(agent_id)[0] == "a"
        status, answer = fleet.api("b", "POST", "/api/v1/tasks", {
            "kind": "sleep", "input": {"seconds": 30}, "labels": ["fleet-exposer"],
            "expose": {"port": web.port, "protocol": "http"}})
        assert status == 202, answer
        task_id = answer["task_id"]
        events = _sse_until(fleet, "b", f"/api/v1/tasks/{task_id}/events", "tunnel")
        assert ("status", {"type": "status", "status": "dispatched", "agent_id": agent_id}) in events, events
        tunnel = events[-1][1]
        assert tunnel["tunnel_protocol"] == "http" and tunnel["admin_token"], tunnel
        path = tunnel["tunnel_url"].split(f":{fleet.port('b')}", 1)[1]
        for gateway in ("c", "a", "b"):
            status, got = http_get(f"http://127.0.0.1:{fleet.port(gateway)}{path}page")
            assert status == 200 and got == b"hello from behind the agent /page", (gateway, status, got)
        assert _task(fleet, "c", task_id)["status"] in ("dispatched", "running")

        status, cancelled = fleet.api("b", "POST", f"/api/v1/tasks/{task_id}/cancel")
        assert status == 200 and cancelled["status"] == "cancelled", cancelled
        wait_for(lambda: f"task {task_id} cancelled by the gateway" in log.read_text(), timeout=5,
                 what="the handler on the agent cancelled")
        events = sse_events(fleet, "b", f"/api/v1/tasks/{task_id}/events")
        assert events[-1][1] == {"type": "error", "error": "task cancelled", "cancelled": True}, events
        for gateway in ("a", "b", "c"):
            wait_for(lambda g=gateway: http_get(f"http://127.0.0.1:{fleet.port(g)}{path}page")[0] == 404,
                     timeout=5, what=f"the task's tunnel closed at {gateway}")
        # The agent is free at once: the next task runs on it.
        _echo_task_runs(fleet, "c", "fleet-exposer", 1)
    finally:
        _stop(fleet.agents.pop("exposer", None))
        web.close()


def test_cancel_at_c_reaches_the_handler_of_a_task_submitted_at_b_on_an_agent_held_by_a(fleet):
    """A task submitted at b runs on ``canceller`` (held by a); cancelled at c (which
    neither accepted it nor holds its agent): the answer is the cancelled task, the
    handler on the agent is cancelled, the task is ``cancelled`` at b, and the agent
    takes the next task at once."""
    fleet.start_agent("canceller", ["a"], extra=("--label", "fleet-canceller"))
    log = Path(fleet.workdir) / "agent-canceller.log"
    try:
        agent_id = wait_for(lambda: fleet.agent_id("c", "canceller"), what="canceller seen at c")
        assert fleet.holder(agent_id)[0] == "a"
        status, answer = fleet.api("b", "POST", "/api/v1/tasks",
                                   {"kind": "sleep", "input": {"seconds": 30}, "labels": ["fleet-canceller"]})
        assert status == 202, answer
        task_id = answer["task_id"]
        wait_for(lambda: _task(fleet, "c", task_id)["status"] == "running", what="the task running, read at c")
        status, cancelled = fleet.api("c", "POST", f"/api/v1/tasks/{task_id}/cancel")
        assert status == 200 and cancelled["status"] == "cancelled" and cancelled["agent_id"] == agent_id, cancelled
        wait_for(lambda: f"task {task_id} cancelled by the gateway" in log.read_text(), timeout=5,
                 what="the handler on the agent cancelled")
        assert _task(fleet, "b", task_id)["status"] == "cancelled"
        wait_for(lambda: _task(fleet, "c", task_id)["status"] == "cancelled", timeout=5, what="the row, read at c")
        status, again = fleet.api("c", "POST", f"/api/v1/tasks/{task_id}/cancel")
        assert status == 409 and again["error"]["code"] == "task_finished", again
        _echo_task_runs(fleet, "b", "fleet-canceller", 2)
    finally:
        _stop(fleet.agents.pop("canceller", None))


def test_agents_say_which_gateways_hold_them(fleet):
    """``gateways`` in the agent list and detail, the same at every gateway: one
    gateway for an agent with one connection, two for one with two, none offline."""
    on_a = fleet.agent_id("c", "on-a")
    for gateway in ("a", "b", "c"):
        assert _agent(fleet, gateway, on_a)["gateways"] == ["a"], gateway
        status, listed = fleet.api(gateway, "GET", "/api/v1/agents")
        assert status == 200
        held = {a["name"]: a["gateways"] for a in listed["agents"] if a["online"]}
        assert held["on-a"] == ["a"] and held["on-b"] == ["b"], held
    proc = fleet.start_agent("twice", ["a", "c"], connections=2)
    try:
        agent_id = wait_for(lambda: fleet.agent_id("b", "twice"), what="twice seen at b")
        for gateway in ("a", "b", "c"):
            wait_for(lambda g=gateway: _agent(fleet, g, agent_id)["gateways"] == ["a", "c"], timeout=10,
                     what=f"both gateways of twice at {gateway}")
    finally:
        _stop(proc)
        fleet.agents.pop("twice", None)
    wait_for(lambda: _agent(fleet, "b", agent_id)["gateways"] == [], timeout=20, what="twice offline at b")
    assert _agent(fleet, "b", agent_id)["online"] is False
