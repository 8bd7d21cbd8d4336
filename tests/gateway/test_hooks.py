"""Gateway and agent hooks (relay.gateway.hooks, relay.agent.tasks): each fires with the
right arguments; stream denial is visible to the client; byte counts are exact.

In-process gateway, agents and targets on one loop; every wait is bounded.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from relay.agent import Agent, AgentAuthError
from relay.gateway.auth import AuthError
from relay.gateway.hooks import agent_principal
from tests.gateway.test_gateway_e2e import gateway_and_team, http, run, running_agent, wait_until

pytestmark = pytest.mark.timeout(60)


async def raw_get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    """GET through an HTTP tunnel; (status, JSON body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    async with asyncio.timeout(10):
        raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def test_connected_disconnected_and_authenticate_hooks(tmp_path):
    async def body():
        async with gateway_and_team(tmp_path) as (gw, keys):
            events: list[tuple[str, str, list[str]]] = []
            gw.hooks.on_agent_connected.append(lambda a: events.append(("up", a.name, a.labels)))

            async def gone(agent):  # coroutine hooks run as tasks
                events.append(("down", agent.name, agent.labels))
            gw.hooks.on_agent_disconnected.append(gone)

            team_id = (await gw.store.list_teams())[0].id
            seen: list[Any] = []

            async def authenticate(request, default):
                seen.append(request.headers.get("authorization"))
                token = request.headers.get("authorization", "").removeprefix("Bearer ")
                if token == "machine-secret":  # our platform's own agent token
                    return agent_principal(team_id, "machine-1")
                if token == "banned":
                    raise AuthError(403, "banned", "this machine is banned")
                return default()  # anything else: the built-in ak- check

            gw.hooks.authenticate = authenticate
            async with running_agent(gw, "machine-secret", name="m1", labels=["x"]) as custom:
                await wait_until(lambda: ("up", "m1", ["x"]) in events)
                assert custom.agent_id == str(gw.registry.get(team_id, custom.agent_id).agent_id)
                async with running_agent(gw, str(keys["ak"]), name="builtin"):
                    await wait_until(lambda: ("up", "builtin", []) in events)
            await wait_until(lambda: ("down", "m1", ["x"]) in events and ("down", "builtin", []) in events)
            assert seen[:2] == ["Bearer machine-secret", f"Bearer {keys['ak']}"]
            for key in ("banned", "ak-unknown"):
                with pytest.raises(AgentAuthError):
                    await asyncio.wait_for(Agent(gw.url, key, name="bad").run(), 10)
            assert [e[0] for e in events].count("up") == 2

    run(body)


def test_allow_stream_denial_and_exact_byte_counts(tmp_path):
    async def body():
        # A TCP target: reads everything, then answers a fixed-size reply and closes.
        received = bytearray()

        async def target(reader, writer):
            received.extend(await reader.read())
            writer.write(b"r" * 54_321)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(target, "127.0.0.1", 0)
        target_port = server.sockets[0].getsockname()[1]
        async with gateway_and_team(tmp_path) as (gw, keys):
            sk = str(keys["sk"])
            closed: list[tuple[str, dict[str, Any], int, int]] = []
            gw.hooks.on_stream_closed.append(lambda a, meta, up, down: closed.append((a.name, meta, up, down)))
            asked: list[tuple[str, dict[str, Any]]] = []

            def policy(agent, meta):
                asked.append((agent.name, meta))
                return "port 22 is off limits" if meta["target"].endswith(":22") else True
            gw.hooks.allow_stream.append(policy)

            async with running_agent(gw, str(keys["ak"]), name="a") as a:
                opened_at_agent: list[Any] = []
                a.allow_stream.append(lambda meta: opened_at_agent.append(meta) or None)

                # Allowed: exact payload byte counts, both directions.
                status, tunnel = await http(gw.port, "POST", f"/api/v1/agents/{a.agent_id}/tunnel", sk,
                                            {"target_port": target_port, "tunnel_protocol": "tcp"})
                assert status == 200, tunnel
                reader, writer = await asyncio.open_connection("127.0.0.1", tunnel["hub_port"])
                writer.write(b"u" * 100_000)
                writer.write_eof()
                async with asyncio.timeout(10):
                    reply = await reader.read()
                writer.close()
                assert len(reply) == 54_321 and len(received) == 100_000
                await wait_until(lambda: closed)
                meta = {"protocol": "tcp", "target": f"127.0.0.1:{target_port}"}
                assert closed == [("a", meta, 100_000, 54_321)]
                assert asked == [("a", meta)]

                # Denied by the gateway: the agent never sees the open; an HTTP tunnel's
                # client gets the reason; a hub port's connection is closed.
                status, http_tunnel = await http(gw.port, "POST", f"/api/v1/agents/{a.agent_id}/tunnel", sk,
                                                 {"target_port": 22})
                assert status == 200
                path = "/" + http_tunnel["tunnel_url"].split("/", 3)[3]
                status, err = await raw_get(gw.port, path)
                assert status == 502 and "NOT_ALLOWED" in err["error"]["message"]
                assert "port 22 is off limits" in err["error"]["message"]
                status, ssh = await http(gw.port, "POST", f"/api/v1/agents/{a.agent_id}/tunnel", sk,
                                         {"target_port": 22, "tunnel_protocol": "tcp"})
                reader, writer = await asyncio.open_connection("127.0.0.1", ssh["hub_port"])
                async with asyncio.timeout(10):
                    with pytest.raises(ConnectionResetError):  # refused: a reset, never an end
                        await reader.read()
                writer.close()
                agent_info = (await http(gw.port, "GET", f"/api/v1/agents/{a.agent_id}", sk))[1]
                [ssh_info] = [t for t in agent_info["tunnels"] if t["session_id"] == ssh["session_id"]]
                assert "port 22 is off limits" in ssh_info["last_error"]
                assert len(opened_at_agent) == 1  # only the allowed stream reached the agent
                assert len(closed) == 1  # denied opens are no streams

                # Denied by the agent's own policy: the reason reaches the client too.
                a.allow_stream.append(lambda meta: "agent says no")
                status, err = await raw_get(gw.port, "/" + (await http(
                    gw.port, "POST", f"/api/v1/agents/{a.agent_id}/tunnel", sk,
                    {"target_port": target_port}))[1]["tunnel_url"].split("/", 3)[3])
                assert status == 502 and "agent says no" in err["error"]["message"]
        server.close()

    run(body)
