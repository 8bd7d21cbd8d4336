"""Tasks (seed 001): dispatch by labels and status, queueing, the SSE event stream, errors.

In-process gateway and agents on one loop; handlers that wait on events the test sets,
so nothing sleeps longer than it must. Every wait is bounded.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

import pytest

from relay.agent import Agent
from relay.gateway.api import tasks as gateway_tasks
from tests.gateway.test_gateway_e2e import gateway_and_team, http, run, running_agent, wait_until

pytestmark = pytest.mark.timeout(60)


async def sse(port: int, path: str, token: str, timeout: float = 10.0) -> list[tuple[str, Any]]:
    """Read a whole Server-Sent Events response; returns [(event, data), ...]."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    async with asyncio.timeout(timeout):
        raw = await reader.read()  # the server closes after the final event
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"text/event-stream" in head
    events = []
    for block in body.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


async def submit(port: int, key: str, kind: str, task_input: Any = None,
                 labels: Optional[list[str]] = None) -> dict[str, Any]:
    status, body = await http(port, "POST", "/api/v1/tasks", key,
                              {"kind": kind, "input": task_input, "labels": labels or []})
    assert status == 202, body
    return body


async def task_status(port: int, key: str, task_id: str) -> dict[str, Any]:
    status, body = await http(port, "GET", f"/api/v1/tasks/{task_id}", key)
    assert status == 200, body
    return body


def gated(agent: Any, kind: str = "wait") -> dict[str, asyncio.Event]:
    """Register a handler that reports progress, then waits until the test releases it
    (``gates[task_id].set()``); returns the dict of gates, filled as tasks start."""
    gates: dict[str, asyncio.Event] = {}

    @agent.tasks.handler(kind)
    async def wait(task):
        gates[task.task_id] = asyncio.Event()
        await task.progress("started")
        await gates[task.task_id].wait()
        return {"done_by": agent.name}

    return gates


def test_dispatch_by_labels_result_and_sse_order(tmp_path, store_url):
    async def body():
        async with gateway_and_team(tmp_path, store_url) as (gw, keys):
            sk = str(keys["sk"])
            async with running_agent(gw, str(keys["ak"]), name="cpu", labels=["linux"]) as cpu, \
                    running_agent(gw, str(keys["ak"]), name="gpu", labels=["linux", "gpu"]) as gpu:
                for agent in (cpu, gpu):
                    agent.tasks.register_builtins()
                answer = await submit(gw.port, sk, "echo", {"x": [1, 2]}, ["gpu"])
                assert answer["status"] == "dispatched" and answer["agent_id"] == gpu.agent_id
                events = await sse(gw.port, f"/api/v1/tasks/{answer['task_id']}/events", sk)
                assert events[-1] == ("result", {"type": "result", "result": {"x": [1, 2]}})
                info = await task_status(gw.port, sk, answer["task_id"])
                assert info["status"] == "succeeded" and info["result"] == {"x": [1, 2]}

                # Progress and partial outputs arrive in order, before the result.
                answer = await submit(gw.port, sk, "count", {"to": 4}, ["linux"])
                events = await sse(gw.port, f"/api/v1/tasks/{answer['task_id']}/events", sk)
                kinds = [e[0] for e in events]
                assert kinds[:2] == ["status", "status"]
                assert [e[1]["status"] for e in events[:2]] == ["queued", "dispatched"]
                assert [e[1]["output"] for e in events if e[0] == "output"] == [1, 2, 3, 4]
                assert [e[1]["progress"]["done"] for e in events if e[0] == "progress"] == [0, 1, 2, 3]
                assert kinds[-1] == "result" and events[-1][1]["result"] == {"count": 4}
                assert kinds.index("progress") < kinds.index("output") < kinds.index("result")
                # Replaying after the end gives the same stream; Last-Event-ID resumes.
                assert await sse(gw.port, f"/api/v1/tasks/{answer['task_id']}/events", sk) == events

                # Labels nobody has: the task waits in the queue.
                answer = await submit(gw.port, sk, "echo", 1, ["arm64"])
                assert answer == {"task_id": answer["task_id"], "status": "queued", "agent_id": None}
                # An unknown kind fails with a message naming the known ones.
                answer = await submit(gw.port, sk, "nope", None, ["gpu"])
                events = await sse(gw.port, f"/api/v1/tasks/{answer['task_id']}/events", sk)
                assert events[-1][0] == "error" and "no handler for task kind 'nope'" in events[-1][1]["error"]
                await wait_until(lambda: gw.registry.get(gpu_team(gw, gpu), gpu.agent_id).status == "idle")

    run(body)


def gpu_team(gw: Any, agent: Any) -> str:
    return next(a.team_id for a in gw.registry.connected() if a.agent_id == agent.agent_id)


def test_busy_agent_skipped_then_queue_drains_when_idle(tmp_path, store_url):
    async def body():
        async with gateway_and_team(tmp_path, store_url) as (gw, keys):
            sk = str(keys["sk"])
            async with running_agent(gw, str(keys["ak"]), name="a") as a, \
                    running_agent(gw, str(keys["ak"]), name="b") as b:
                gates = {a.agent_id: gated(a), b.agent_id: gated(b)}
                first = await submit(gw.port, sk, "wait")
                second = await submit(gw.port, sk, "wait")
                # The first agent is busy: the second task goes to the other one.
                assert first["status"] == second["status"] == "dispatched"
                assert {first["agent_id"], second["agent_id"]} == {a.agent_id, b.agent_id}
                agents = (await http(gw.port, "GET", "/api/v1/agents", sk))[1]["agents"]
                assert {x["agent_id"]: x["status"] for x in agents} == {a.agent_id: "busy", b.agent_id: "busy"}
                third = await submit(gw.port, sk, "wait")
                assert third["status"] == "queued"
                # Releasing the first agent's task hands it the queued one.
                mine = gates[first["agent_id"]]
                await wait_until(lambda: first["task_id"] in mine)
                mine[first["task_id"]].set()
                await wait_until(lambda: third["task_id"] in mine)
                info = await task_status(gw.port, sk, third["task_id"])
                assert info["agent_id"] == first["agent_id"] and info["status"] in ("dispatched", "running")
                assert (await task_status(gw.port, sk, first["task_id"]))["status"] == "succeeded"
                mine[third["task_id"]].set()
                theirs = gates[second["agent_id"]]
                await wait_until(lambda: second["task_id"] in theirs)
                theirs[second["task_id"]].set()
                team = gpu_team(gw, a)
                await wait_until(lambda: all(gw.tasks.get(team, t["task_id"]).status == "succeeded"
                                             for t in (first, second, third)))
                assert (await task_status(gw.port, sk, third["task_id"]))["result"] == {"done_by": info_name(gw, first)}

    run(body)


def info_name(gw: Any, answer: dict[str, Any]) -> str:
    return next(a.name for a in gw.registry.connected() if a.agent_id == answer["agent_id"])


def test_agents_with_a_tunnel_open_or_unhealthy_take_no_tasks(tmp_path):
    async def body():
        async with gateway_and_team(tmp_path) as (gw, keys):
            sk = str(keys["sk"])
            async with running_agent(gw, str(keys["ak"]), name="a") as a, \
                    running_agent(gw, str(keys["ak"]), name="b") as b:
                a.tasks.register_builtins()
                b.tasks.register_builtins()
                team = gpu_team(gw, a)
                b.report_status("unhealthy")
                await wait_until(lambda: gw.registry.get(team, b.agent_id).status == "unhealthy")
                status, tunnel = await http(gw.port, "POST", f"/api/v1/agents/{a.agent_id}/tunnel", sk,
                                            {"target_port": 9, "tunnel_protocol": "tcp"})
                assert status == 200, tunnel
                answer = await submit(gw.port, sk, "echo", "hi")
                assert answer["status"] == "queued"
                await asyncio.sleep(0.1)
                assert (await task_status(gw.port, sk, answer["task_id"]))["status"] == "queued"
                # Closing the tunnel makes the agent idle: the queued task runs there.
                status, _ = await http(gw.port, "DELETE", f"/api/v1/agents/{a.agent_id}/tunnel", sk)
                assert status == 200
                events = await sse(gw.port, f"/api/v1/tasks/{answer['task_id']}/events", sk)
                assert events[-1] == ("result", {"type": "result", "result": "hi"})
                assert events[1][1] == {"type": "status", "status": "dispatched", "agent_id": a.agent_id}
                # The unhealthy agent takes work again once it reports idle.
                b.report_status("idle")
                await wait_until(lambda: gw.registry.get(team, b.agent_id).status == "idle")
                assert (await submit(gw.port, sk, "echo", 2))["agent_id"] == b.agent_id

    run(body)


def test_agent_killed_mid_task_fails_it(tmp_path):
    async def body():
        async with gateway_and_team(tmp_path) as (gw, keys):
            sk = str(keys["sk"])
            async with running_agent(gw, str(keys["ak"]), name="a") as a:
                gates = gated(a)
                answer = await submit(gw.port, sk, "wait")
                reader = asyncio.ensure_future(sse(gw.port, f"/api/v1/tasks/{answer['task_id']}/events", sk))
                await wait_until(lambda: answer["task_id"] in gates)
                await wait_until(lambda: gw.tasks.get(gpu_team(gw, a), answer["task_id"]).status == "running")
                a.session.abort()  # the connection dies mid-task
                events = await reader
                assert [e[0] for e in events] == ["status", "status", "progress", "error"]
                assert events[-1][1] == {"type": "error", "error": "agent disconnected"}
                info = await task_status(gw.port, sk, answer["task_id"])
                assert info["status"] == "failed" and info["error"] == "agent disconnected"

    run(body)


def test_other_team_404_validation_and_queue_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(gateway_tasks, "QUEUE_LIMIT", 2)

    async def body():
        async with gateway_and_team(tmp_path) as (gw, keys):
            sk, dk = str(keys["sk"]), str(keys["dk"])
            _, other = await gw.store.create_team_with_keys("team-b")
            answer = await submit(gw.port, dk, "echo", 1)  # dk- keys may submit (runtime)
            assert answer["status"] == "queued"
            path = f"/api/v1/tasks/{answer['task_id']}"
            for p in (path, path + "/events", "/api/v1/tasks/not-a-task"):
                status, err = await http(gw.port, "GET", p, str(other["sk"]))
                assert status == 404 and err["error"]["code"] == "task_not_found", (p, err)
            assert (await http(gw.port, "GET", path, sk))[0] == 200
            assert (await http(gw.port, "GET", path, str(keys["ak"])))[0] == 403
            assert (await http(gw.port, "POST", "/api/v1/tasks", None, {"kind": "echo"}))[0] == 401
            for bad, code in [([1], "invalid_request"), ({}, "invalid_kind"), ({"kind": ""}, "invalid_kind"),
                              ({"kind": 5}, "invalid_kind"), ({"kind": "x", "labels": "gpu"}, "invalid_labels"),
                              ({"kind": "x", "labels": [""]}, "invalid_labels"),
                              ({"kind": "x", "labels": [1]}, "invalid_labels"),
                              ({"kind": "x", "extra": 1}, "unknown_field"),
                              ({"kind": "x", "input": "a" * 300_000}, "input_too_large")]:
                status, err = await http(gw.port, "POST", "/api/v1/tasks", sk, bad)
                assert status == 400 and err["error"]["code"] == code, (bad, err)
            assert (await submit(gw.port, sk, "echo", 2))["status"] == "queued"
            status, err = await http(gw.port, "POST", "/api/v1/tasks", sk, {"kind": "echo"})
            assert status == 503 and err["error"]["code"] == "queue_full"
            # Another team's queue is its own.
            assert (await submit(gw.port, str(other["sk"]), "echo", 3))["status"] == "queued"
            status, doc = await http(gw.port, "GET", "/api/v1/openapi.json")
            assert status == 200 and {"/tasks", "/tasks/{taskId}", "/tasks/{taskId}/events"} <= set(doc["paths"])

    run(body)


def test_task_events_are_bounded_but_the_final_one_is_kept(monkeypatch):
    monkeypatch.setattr(gateway_tasks, "MAX_TASK_BYTES", 10_000)

    async def body():
        task = gateway_tasks.Task("t", "team", "k", None, [])
        kept = [task.add_event("output", output="x" * 1000) for _ in range(20)]
        assert kept.count(True) == 9 and task.events_dropped == 11  # ~1 KiB each, 10 KB budget
        assert task.add_event("result", result="y" * 50_000)  # never dropped
        assert task.events[-1]["type"] == "result" and task.size > 50_000

    asyncio.run(body())


def test_relay_agent_on_trio_runs_the_built_in_tasks(tmp_path):
    """``relay agent --backend trio`` registers the same built-in handlers as the asyncio
    agent: a task handed to it runs and succeeds (tests/conformance runs the task tests
    on both agents). The agent runs as a real ``relay agent`` process."""
    import sys

    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys):
            agent = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay", "agent", "--backend", "trio", "--gateway", gw.url,
                "--key", keys["ak"], "--name", "trio-box", stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            try:
                async def online() -> bool:
                    _, body = await http(gw.port, "GET", "/api/v1/agents", keys["sk"])
                    return any(a["online"] for a in body["agents"])

                for _ in range(300):
                    if await online():
                        break
                    await asyncio.sleep(0.05)
                answer = await submit(gw.port, keys["sk"], "count", {"to": 2})
                assert answer["status"] == "dispatched"
                for _ in range(300):
                    info = await task_status(gw.port, keys["sk"], answer["task_id"])
                    if info["status"] in gateway_tasks.FINAL:
                        break
                    await asyncio.sleep(0.05)
                assert info["status"] == "succeeded" and info["result"] == {"count": 2}, info
                assert info["outputs"] == [1, 2]
            finally:
                agent.terminate()
                await agent.wait()

    run(main, timeout=60)


def test_tasks_are_kept_in_the_store_across_a_restart(tmp_path, store_url):
    """Every task is a row of the store: a finished one is still answered after a restart
    (from the store), a queued one is queued again and runs when an agent that fits
    connects, and one an agent was running when the gateway died has failed."""
    import uuid

    from relay.gateway.app import Gateway
    from relay.gateway.store import open_store

    async def body():
        async with gateway_and_team(tmp_path, store_url) as (gw, keys):
            sk, ak = str(keys["sk"]), str(keys["ak"])
            async with running_agent(gw, ak, name="cpu", labels=["linux"]) as cpu:
                cpu.tasks.register_builtins()
                done = await submit(gw.port, sk, "echo", {"kept": True})
                assert (await sse(gw.port, f"/api/v1/tasks/{done['task_id']}/events", sk))[-1][0] == "result"
                team_id = gpu_team(gw, cpu)
            waiting = await submit(gw.port, sk, "echo", {"later": 1}, ["gpu"])
            assert waiting["status"] == "queued"
            # The task store holds both, already (the queued one before its 202).
            assert (await gw.store.get_task(team_id, waiting["task_id"])).status == "queued"
        # A task an agent was running when the gateway was killed (no chance to fail it).
        lost = str(uuid.uuid4())
        store = await open_store(store_url)
        try:
            await store.create_task(team_id, lost, "sleep", {"seconds": 60}, [], owner=gateway_tasks.TASK_OWNER)
            await store.update_task(team_id, lost, status="running", agent_id=str(uuid.uuid4()))
            gw = Gateway(store, allow_private_egress=True)
            await gw.start("127.0.0.1", 0)
            try:
                info = await task_status(gw.port, sk, done["task_id"])  # from the store
                assert (info["status"], info["result"]) == ("succeeded", {"kept": True})
                events = await sse(gw.port, f"/api/v1/tasks/{done['task_id']}/events", sk)
                assert events[-1] == ("result", {"type": "result", "result": {"kept": True}})
                assert (await task_status(gw.port, sk, lost))["error"] == gateway_tasks.RESTARTED
                assert (await task_status(gw.port, sk, waiting["task_id"]))["status"] == "queued"
                async with running_agent(gw, ak, agent_class=_BuiltinsAgent, name="gpu", labels=["gpu"]):
                    events = await sse(gw.port, f"/api/v1/tasks/{waiting['task_id']}/events", sk)
                    assert events[-1] == ("result", {"type": "result", "result": {"later": 1}})
                await wait_until(lambda: _stored_status(store, team_id, waiting["task_id"], "succeeded"))
                status, _ = await http(gw.port, "GET", f"/api/v1/tasks/{uuid.uuid4()}", sk)
                assert status == 404
            finally:
                await gw.close()
        finally:
            await store.close()

    run(body)


class _BuiltinsAgent(Agent):
    """An agent that can run the built-in tasks from its first moment online."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tasks.register_builtins()


async def _stored_status(store: Any, team_id: str, task_id: str, status: str) -> bool:
    return (await store.get_task(team_id, task_id)).status == status
