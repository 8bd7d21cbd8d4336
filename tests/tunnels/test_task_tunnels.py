"""Task-bound tunnels and tunnel session lifetimes (seed 001, seed 000), task list and
cancel.

In-process gateway and real agents on one loop, real services behind the agent (an HTTP
app, a TCP echo service), real HTTP and TCP clients. Handlers wait on events the test
sets; every wait is bounded.
"""
from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import pytest

from relay.agent import Agent
from relay.gateway.agents import session_lifetime
from tests.gateway.test_gateway_e2e import first_team_id, gateway_and_team, http, run, running_agent, wait_until
from tests.support.webapps import WebApp
from tests.tunnels.test_tasks import sse, submit, task_status
from tests.tunnels.test_tunnels_api import echo_server, echo_through, refused

pytestmark = pytest.mark.timeout(90)


def _path(url: str) -> str:
    return urlsplit(url).path


async def _agent(gw: Any, sk: str, agent_id: str) -> dict[str, Any]:
    status, body = await http(gw.port, "GET", f"/api/v1/agents/{agent_id}", sk)
    assert status == 200, body
    return body


def gate(agent: Any, kind: str = "serve") -> tuple[dict[str, asyncio.Event], dict[str, str]]:
    """A handler that waits until the test sets ``gates[task_id]``; ``seen[task_id]`` says
    how it ended on the agent (``done`` or ``cancelled``)."""
    gates: dict[str, asyncio.Event] = {}
    seen: dict[str, str] = {}

    @agent.tasks.handler(kind)
    async def serve(task):
        gates[task.task_id] = asyncio.Event()
        try:
            await gates[task.task_id].wait()
        except asyncio.CancelledError:
            seen[task.task_id] = "cancelled"
            raise
        seen[task.task_id] = "done"
        return {"served": True}

    return gates, seen


async def _task_tunnel(gw: Any, sk: str, task_id: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def has_tunnel() -> bool:
        found.update(await task_status(gw.port, sk, task_id))
        return found.get("tunnel") is not None

    await wait_until(has_tunnel)
    return found["tunnel"]


def test_task_exposes_an_http_port_for_its_lifetime(tmp_path):
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), WebApp() as app:
            sk = str(keys["sk"])
            async with running_agent(gw, str(keys["ak"]), name="gpu") as agent:
                gates, seen = gate(agent)
                answer = await submit(gw.port, sk, "serve")
                assert answer["status"] == "dispatched"
                # expose is part of the body (the helper does not send it): submit again with it.
                status, answer = await http(gw.port, "POST", "/api/v1/tasks", sk,
                                            {"kind": "serve", "expose": {"port": app.port}})
                assert status == 202 and answer["status"] == "queued"  # the agent is busy
                first = next(iter(gates))
                gates[first].set()
                tunnel = await _task_tunnel(gw, sk, answer["task_id"])
                assert "admin_token" not in tunnel and tunnel["tunnel_protocol"] == "http"
                # The service answers through the task's tunnel while the task runs.
                status, echo = await http(gw.port, "GET", _path(tunnel["tunnel_url"]) + "echo/x?y=1")
                assert status == 200 and echo["target"] == "/echo/x?y=1"
                # The agent stays busy (not "tunnel"); the session is listed as the task's.
                info = await _agent(gw, sk, agent.agent_id)
                assert info["status"] == "busy"
                assert [(t["session_id"], t["task_id"]) for t in info["tunnels"]] == \
                    [(tunnel["session_id"], answer["task_id"])]
                await wait_until(lambda: answer["task_id"] in gates)
                gates[answer["task_id"]].set()
                events = await sse(gw.port, f"/api/v1/tasks/{answer['task_id']}/events", sk)
                kinds = [kind for kind, _ in events]
                assert kinds[-1] == "result" and "tunnel" in kinds
                event = dict(events)["tunnel"]
                assert event["tunnel_url"] == tunnel["tunnel_url"] and event["admin_token"]
                # Ended with the task: the URL is gone, the agent idle, no session left.
                async def no_sessions() -> bool:
                    return (await _agent(gw, sk, agent.agent_id))["tunnels"] == []

                await wait_until(no_sessions)
                status, _ = await http(gw.port, "GET", _path(tunnel["tunnel_url"]) + "echo/x")
                assert status == 404
                info = await _agent(gw, sk, agent.agent_id)
                assert info["tunnels"] == []
                await wait_until(lambda: _agent_idle(gw, agent))
                assert seen[answer["task_id"]] == "done"

    run(main)


def test_cancel_reaches_the_handler_closes_the_tcp_tunnel_and_frees_the_agent(tmp_path):
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), echo_server() as echo_port:
            sk, dk = str(keys["sk"]), str(keys["dk"])
            async with running_agent(gw, str(keys["ak"]), name="box") as agent:
                agent.tasks.register_builtins()
                gates, seen = gate(agent)
                status, answer = await http(gw.port, "POST", "/api/v1/tasks", dk,
                                            {"kind": "serve", "expose": {"port": echo_port, "protocol": "tcp"}})
                assert status == 202, answer
                task_id = answer["task_id"]
                tunnel = await _task_tunnel(gw, sk, task_id)
                assert tunnel["tunnel_protocol"] == "tcp" and tunnel["hub_port"]
                assert await echo_through(tunnel["hub_port"]) == b"hello relay"
                # A connection held open through the tunnel is cut by the cancel.
                reader, writer = await asyncio.open_connection("127.0.0.1", tunnel["hub_port"])
                status, cancelled = await http(gw.port, "POST", f"/api/v1/tasks/{task_id}/cancel", dk)
                assert status == 200 and cancelled["status"] == "cancelled"
                await wait_until(lambda: seen.get(task_id) == "cancelled")  # the handler saw it
                async with asyncio.timeout(5):  # cut: reset (as hub ports cut) or closed
                    try:
                        assert await reader.read() == b""
                    except ConnectionResetError:
                        pass
                writer.close()
                await wait_until(lambda: refused(tunnel["hub_port"]))
                events = await sse(gw.port, f"/api/v1/tasks/{task_id}/events", sk)
                assert events[-1] == ("error", {"type": "error", "error": "task cancelled", "cancelled": True})
                # Cancelling again: 409; an unknown task: 404.
                status, body = await http(gw.port, "POST", f"/api/v1/tasks/{task_id}/cancel", sk)
                assert status == 409 and body["error"]["code"] == "task_finished"
                status, _ = await http(gw.port, "POST", "/api/v1/tasks/nope/cancel", sk)
                assert status == 404
                # The agent is free at once: the next task runs on it.
                answer = await submit(gw.port, sk, "echo", {"after": "cancel"})
                events = await sse(gw.port, f"/api/v1/tasks/{answer['task_id']}/events", sk)
                assert events[-1][1]["result"] == {"after": "cancel"}

    run(main)


def test_list_tasks_cancel_a_queued_one_and_refused_exposure(tmp_path):
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys):
            sk = str(keys["sk"])
            queued = await submit(gw.port, sk, "echo", 1, ["nobody-has-this"])
            other = await submit(gw.port, sk, "echo", 2, ["nobody-has-this"])
            status, listed = await http(gw.port, "GET", "/api/v1/tasks?status=queued", sk)
            assert status == 200
            assert [t["task_id"] for t in listed["tasks"]] == [queued["task_id"], other["task_id"]]
            status, body = await http(gw.port, "POST", f"/api/v1/tasks/{queued['task_id']}/cancel", sk)
            assert status == 200 and body["status"] == "cancelled"
            status, listed = await http(gw.port, "GET", "/api/v1/tasks?status=queued", sk)
            assert [t["task_id"] for t in listed["tasks"]] == [other["task_id"]]
            status, listed = await http(gw.port, "GET", "/api/v1/tasks?status=cancelled,succeeded", sk)
            assert [t["task_id"] for t in listed["tasks"]] == [queued["task_id"]]
            status, listed = await http(gw.port, "GET", "/api/v1/tasks", sk)
            assert {t["task_id"]: t["status"] for t in listed["tasks"]} == {
                queued["task_id"]: "cancelled", other["task_id"]: "queued"}
            status, body = await http(gw.port, "GET", "/api/v1/tasks?status=lost", sk)
            assert status == 400 and body["error"]["code"] == "invalid_status"
            for bad in ({"port": 0}, {"port": 80, "protocol": "udp"}, {"port": 80, "x": 1}, 80):
                status, body = await http(gw.port, "POST", "/api/v1/tasks", sk, {"kind": "k", "expose": bad})
                assert status == 400 and body["error"]["code"] == "invalid_expose", bad
            # A port the agent does not allow: the task fails, saying why, and the agent is free.
            async with running_agent(gw, str(keys["ak"]), name="strict", allow=["127.0.0.1:1"]) as agent:
                agent.tasks.register_builtins()
                status, answer = await http(gw.port, "POST", "/api/v1/tasks", sk,
                                            {"kind": "sleep", "input": {"seconds": 30}, "expose": {"port": 8188}})
                assert status == 202
                events = await sse(gw.port, f"/api/v1/tasks/{answer['task_id']}/events", sk)
                assert events[-1][0] == "error" and "cannot expose port 8188" in events[-1][1]["error"]
                assert (await task_status(gw.port, sk, answer["task_id"]))["status"] == "failed"
                answer = await submit(gw.port, sk, "echo", "next")
                events = await sse(gw.port, f"/api/v1/tasks/{answer['task_id']}/events", sk)
                assert events[-1][1]["result"] == "next"

    run(main)


def test_session_ttl_and_idle_timeout_return_the_agent_to_idle_and_tasks_flow_again(tmp_path):
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), echo_server() as echo_port, WebApp() as app:
            sk = str(keys["sk"])
            gw.tunnels.sweep_interval = 0.1
            async with running_agent(gw, str(keys["ak"]), name="box") as agent:
                agent.tasks.register_builtins()
                base = f"/api/v1/agents/{agent.agent_id}/tunnel"
                for bad in ({"ttl": -1}, {"ttl": "1h"}, {"idle_timeout": session_lifetime.MAX_SECONDS + 1}):
                    status, body = await http(gw.port, "POST", base, sk, {"target_port": echo_port, **bad})
                    assert status == 400 and body["error"]["code"].startswith("invalid_"), bad
                # Defaults: no TTL, the gateway's idle timeout.
                status, plain = await http(gw.port, "POST", base, sk, {"target_port": echo_port,
                                                                       "tunnel_protocol": "tcp"})
                assert status == 200 and plain["expires_at"] is None
                assert plain["idle_timeout"] == session_lifetime.DEFAULT_IDLE_TIMEOUT
                status, closed = await http(gw.port, "DELETE", f"{base}?session_id={plain['session_id']}", sk)
                assert status == 200 and closed["closed"] == [plain["session_id"]]

                # TTL: the session closes even while in use; the queued task then runs.
                status, timed = await http(gw.port, "POST", base, sk, {
                    "target_port": echo_port, "tunnel_protocol": "tcp", "ttl": 1.5, "idle_timeout": 0})
                assert status == 200 and timed["expires_at"] is not None and timed["idle_timeout"] == 0
                assert (await _agent(gw, sk, agent.agent_id))["status"] == "tunnel"
                queued = await submit(gw.port, sk, "echo", "after ttl")
                assert queued["status"] == "queued"  # an agent in status tunnel gets no task
                assert await echo_through(timed["hub_port"]) == b"hello relay"
                events = await sse(gw.port, f"/api/v1/tasks/{queued['task_id']}/events", sk, timeout=15)
                assert events[-1][1]["result"] == "after ttl"
                assert await refused(timed["hub_port"])
                assert (await _agent(gw, sk, agent.agent_id))["tunnels"] == []

                # Idle timeout: an HTTP session used once, then left alone, closes.
                status, idle = await http(gw.port, "POST", base, sk, {"target_port": app.port, "idle_timeout": 1})
                assert status == 200
                status, _ = await http(gw.port, "GET", _path(idle["tunnel_url"]) + "echo/a")
                assert status == 200
                await wait_until(lambda: _agent_idle(gw, agent), timeout=15)
                status, _ = await http(gw.port, "GET", _path(idle["tunnel_url"]) + "echo/a")
                assert status == 404
                # A tcp session with a connection open through it is not idle, however quiet;
                # once the connection ends, it idles out.
                status, held = await http(gw.port, "POST", base, sk, {
                    "target_port": echo_port, "tunnel_protocol": "tcp", "idle_timeout": 0.5})
                reader, writer = await asyncio.open_connection("127.0.0.1", held["hub_port"])
                writer.write(b"x")
                assert await reader.readexactly(1) == b"x"
                swept_before = await gw.tunnels.sweep()
                await asyncio.sleep(1.0)
                assert swept_before == [] and await gw.tunnels.sweep() == []
                assert (await _agent(gw, sk, agent.agent_id))["status"] == "tunnel"
                writer.close()
                await wait_until(lambda: _agent_idle(gw, agent), timeout=15)
                answer = await submit(gw.port, sk, "echo", "idle again")
                events = await sse(gw.port, f"/api/v1/tasks/{answer['task_id']}/events", sk)
                assert events[-1][1]["result"] == "idle again"

    run(main)


def _agent_idle(gw: Any, agent: Any) -> bool:
    entry = next((a for a in gw.registry.connected() if a.agent_id == agent.agent_id), None)
    return entry is not None and entry.status == "idle"


def test_sessions_survive_a_restart_with_their_ttl_and_task_sessions_do_not(tmp_path):
    from relay.gateway.app import Gateway
    from relay.gateway.store import open_store

    async def main():
        async with echo_server() as echo_port:
            async with gateway_and_team(tmp_path) as (gw, keys):
                sk = str(keys["sk"])
                async with running_agent(gw, str(keys["ak"]), name="box") as agent:
                    gate(agent)
                    agent_id = agent.agent_id
                    status, answer = await http(gw.port, "POST", "/api/v1/tasks", sk, {
                        "kind": "serve", "expose": {"port": echo_port, "protocol": "tcp"}})
                    assert status == 202
                    task_tunnel = await _task_tunnel(gw, sk, answer["task_id"])
                    base = f"/api/v1/agents/{agent_id}/tunnel"
                    status, kept = await http(gw.port, "POST", base, sk, {
                        "target_port": echo_port, "tunnel_protocol": "tcp", "ttl": 600})
                    assert status == 200
                    status, short = await http(gw.port, "POST", base, sk, {
                        "target_port": echo_port, "tunnel_protocol": "tcp", "ttl": 3})
                    assert status == 200
            # A new gateway on the same store: the sessions are back (same hub port), the
            # TTL goes on; the task's session ended with the task.
            store = await open_store(None, tmp_path / "data")
            gw = Gateway(store, allow_private_egress=True)
            await gw.start("127.0.0.1", 0)
            try:
                gw.tunnels.sweep_interval = 0.1
                info = await _agent(gw, sk, agent_id)
                ids = {t["session_id"]: t for t in info["tunnels"]}
                assert task_tunnel["session_id"] not in ids
                assert ids[kept["session_id"]]["expires_at"] == kept["expires_at"]
                assert ids[kept["session_id"]]["hub_port"] == kept["hub_port"]

                async def short_gone() -> bool:
                    found = await _agent(gw, sk, agent_id)
                    return short["session_id"] not in {t["session_id"] for t in found["tunnels"]}

                await wait_until(short_gone, timeout=15)
                assert kept["session_id"] in {t["session_id"] for t in (await _agent(gw, sk, agent_id))["tunnels"]}
            finally:
                await gw.close()
                await store.close()

    run(main)


class _BuiltinsAgent(Agent):
    """An agent with the built-in handlers from the start (a queued task can reach it
    the moment it connects)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tasks.register_builtins()


def test_a_queued_task_keeps_its_expose_across_a_restart(tmp_path):
    from relay.gateway.app import Gateway
    from relay.gateway.store import open_store

    async def main():
        async with echo_server() as echo_port:
            async with gateway_and_team(tmp_path) as (gw, keys):
                sk = str(keys["sk"])
                status, answer = await http(gw.port, "POST", "/api/v1/tasks", sk, {
                    "kind": "sleep", "input": {"seconds": 30}, "labels": ["late"],
                    "expose": {"port": echo_port, "protocol": "tcp"}})
                assert status == 202 and answer["status"] == "queued"
            store = await open_store(None, tmp_path / "data")
            gw = Gateway(store, allow_private_egress=True)
            await gw.start("127.0.0.1", 0)
            try:
                async with running_agent(gw, str(keys["ak"]), agent_class=_BuiltinsAgent, name="late",
                                         labels=["late"]):
                    tunnel = await _task_tunnel(gw, sk, answer["task_id"])
                    assert await echo_through(tunnel["hub_port"]) == b"hello relay"
                    status, _ = await http(gw.port, "POST", f"/api/v1/tasks/{answer['task_id']}/cancel", sk)
                    assert status == 200
                    await wait_until(lambda: refused(tunnel["hub_port"]))
            finally:
                await gw.close()
                await store.close()

    run(main)


def _tunnel_event(events: list[tuple[str, Any]]) -> dict[str, Any]:
    [event] = [data for kind, data in events if kind == "tunnel"]
    return event


def test_the_tunnel_admin_token_goes_to_the_submitter_and_managers_only(tmp_path):
    """Seed 000: the tunnel_url can be shared, the admin_token must be kept secret; seed
    001: a task's events go back to the client that submitted it. Another dk- key of
    the team follows the task and reaches its service, without the token."""
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), WebApp() as app:
            sk, submitter = str(keys["sk"]), str(keys["dk"])
            _, other = await gw.store.create_credential(await first_team_id(gw), "dk")
            other = str(other)
            async with running_agent(gw, str(keys["ak"]), name="gpu") as agent:
                gates, _ = gate(agent)
                status, answer = await http(gw.port, "POST", "/api/v1/tasks", submitter,
                                            {"kind": "serve", "expose": {"port": app.port}})
                assert status == 202, answer
                tunnel = await _task_tunnel(gw, other, answer["task_id"])
                assert "admin_token" not in tunnel  # the task itself never carries it
                # The URL is the shareable part: the other key reaches the service.
                status, echo = await http(gw.port, "GET", _path(tunnel["tunnel_url"]) + "echo/shared")
                assert status == 200 and echo["target"] == "/echo/shared"
                await wait_until(lambda: answer["task_id"] in gates)
                gates[answer["task_id"]].set()
                path = f"/api/v1/tasks/{answer['task_id']}/events"
                mine, managers, others = [_tunnel_event(await sse(gw.port, path, key))
                                          for key in (submitter, sk, other)]
                assert mine["admin_token"] and managers["admin_token"] == mine["admin_token"]
                assert "admin_token" not in others
                assert {k: v for k, v in mine.items() if k != "admin_token"} == others
                assert others["tunnel_url"] == tunnel["tunnel_url"]
                # Resuming from an event id does not change who sees what.
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {other}\r\n"
                             f"Last-Event-ID: 1\r\n\r\n".encode())
                async with asyncio.timeout(10):
                    raw = await reader.read()
                writer.close()
                assert b"event: tunnel" in raw and mine["admin_token"].encode() not in raw

    run(main)


def test_the_submitter_keeps_the_admin_token_across_a_restart(tmp_path):
    from relay.gateway.app import Gateway
    from relay.gateway.store import open_store

    async def main():
        async with echo_server() as echo_port:
            async with gateway_and_team(tmp_path) as (gw, keys):
                team_id = await first_team_id(gw)
                _, other = await gw.store.create_credential(team_id, "dk")
                submitter, other = str(keys["dk"]), str(other)
                status, answer = await http(gw.port, "POST", "/api/v1/tasks", submitter, {
                    "kind": "sleep", "input": {"seconds": 30}, "labels": ["late"],
                    "expose": {"port": echo_port, "protocol": "tcp"}})
                assert status == 202 and answer["status"] == "queued"
            store = await open_store(None, tmp_path / "data")
            record = await store.get_task(team_id, answer["task_id"])
            assert record is not None and record.submitted_by is not None and record.submitted_by.startswith("dk:")
            gw = Gateway(store, allow_private_egress=True)
            await gw.start("127.0.0.1", 0)
            try:
                async with running_agent(gw, str(keys["ak"]), agent_class=_BuiltinsAgent, name="late",
                                         labels=["late"]):
                    tunnel = await _task_tunnel(gw, other, answer["task_id"])
                    status, _ = await http(gw.port, "POST", f"/api/v1/tasks/{answer['task_id']}/cancel",
                                           str(keys["sk"]))
                    assert status == 200
                    path = f"/api/v1/tasks/{answer['task_id']}/events"
                    mine = _tunnel_event(await sse(gw.port, path, submitter))
                    others = _tunnel_event(await sse(gw.port, path, other))
                    assert mine["admin_token"] and "admin_token" not in others
                    assert mine["hub_port"] == others["hub_port"] == tunnel["hub_port"]
            finally:
                await gw.close()
                await store.close()

    run(main)
