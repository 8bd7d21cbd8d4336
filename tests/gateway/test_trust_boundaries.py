"""Who may do what to tunnels, and which targets a tunnel may have (issue 12: 7, 9a, 9f).

An in-process gateway and real agents on 127.0.0.1 (real sockets, real echo targets);
every wait is bounded.
"""
from __future__ import annotations

import asyncio
import socket

import pytest

from relay.agent import Agent
from relay.mux.connection import MuxConfig
from tests.gateway.test_gateway_e2e import echo_server, gateway_and_team, http, run, running_agent

pytestmark = pytest.mark.timeout(120)


def test_closing_tunnel_sessions_needs_a_management_key(tmp_path):
    """``DELETE /api/v1/agents/{id}/tunnel`` is management: a dk- (runtime only) key gets
    403 and the session stays open; sk- closes it. Opening stays a runtime operation."""

    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), echo_server() as echo_port:
            async with running_agent(gw, keys["ak"], name="box") as agent:
                base = f"/api/v1/agents/{agent.agent_id}/tunnel"
                status, opened = await http(gw.port, "POST", base, keys["dk"],
                                            {"target_port": echo_port, "tunnel_protocol": "tcp"})
                assert status == 200, opened
                for path in (base, f"{base}?session_id={opened['session_id']}"):
                    status, body = await http(gw.port, "DELETE", path, keys["dk"])
                    assert status == 403 and body["error"]["code"] == "forbidden", body
                status, info = await http(gw.port, "GET", f"/api/v1/agents/{agent.agent_id}", keys["sk"])
                assert [t["session_id"] for t in info["tunnels"]] == [opened["session_id"]]
                reader, writer = await asyncio.open_connection("127.0.0.1", opened["hub_port"])
                writer.write(b"still open")
                async with asyncio.timeout(5):
                    assert await reader.readexactly(10) == b"still open"
                writer.close()
                status, body = await http(gw.port, "DELETE", base, keys["sk"])
                assert status == 200 and body == {"closed": [opened["session_id"]]}

    run(main)


async def api_post(gw, path: str, token: str, body: dict) -> tuple[int, dict]:
    return await http(gw.port, "POST", path, token, body)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def reporting(*allow: str) -> dict:
    """Agent arguments for an agent whose hello reports its allowlist (``allow`` in the
    hello, as relay.gateway.agents.tunnel_sessions reads it; the hello's info comes from MuxConfig)."""
    return {"allow": list(allow), "mux_config": MuxConfig(info={"allow": list(allow)})}


def test_a_target_the_agent_does_not_allow_is_refused_when_the_tunnel_opens(tmp_path):
    """With the agent's policy in its hello, the gateway refuses at open a target the
    agent would refuse on every connection: 403 target_not_allowed with the agent's
    reason, nothing created, for seed 000 sessions (http and tcp) and Tunnels API
    tunnels; allowed targets (listed, a declared service's, loopback for an empty list)
    open even when nothing listens on them yet. An agent that reports no policy decides
    alone, on every connection, as before."""

    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), echo_server() as echo_port:
            sk = keys["sk"]
            async with running_agent(gw, keys["ak"], name="strict", **reporting(f"127.0.0.1:{echo_port}")) as agent:
                base = f"/api/v1/agents/{agent.agent_id}/tunnel"
                for protocol in ("http", "tcp"):
                    status, body = await api_post(gw, base, keys["dk"], {"target_port": 8188, "tunnel_protocol": protocol})
                    assert status == 403 and body["error"]["code"] == "target_not_allowed", body
                    assert "127.0.0.1:8188" in body["error"]["message"]
                status, body = await api_post(gw, "/api/v1/tunnels", sk,
                                              {"target": "10.9.9.9:22", "agent_id": agent.agent_id})
                assert status == 403 and body["error"]["code"] == "target_not_allowed", body
                status, info = await http(gw.port, "GET", f"/api/v1/agents/{agent.agent_id}", sk)
                assert info["tunnels"] == []
                assert (await http(gw.port, "GET", "/api/v1/tunnels", sk))[1] == {"tunnels": []}
                # Allowed: opens, and works.
                status, opened = await api_post(gw, base, sk, {"target_port": echo_port, "tunnel_protocol": "tcp"})
                assert status == 200, opened
                reader, writer = await asyncio.open_connection("127.0.0.1", opened["hub_port"])
                writer.write(b"ping")
                async with asyncio.timeout(5):
                    assert await reader.readexactly(4) == b"ping"
                writer.close()
            async with running_agent(gw, keys["ak"], name="loopback", **reporting()) as agent:
                status, body = await api_post(gw, "/api/v1/tunnels", sk,
                                              {"target": f"127.0.0.1:{_free_port()}", "agent_id": agent.agent_id})
                assert status == 201, body  # nothing listens yet: allowed, it may start later
                status, body = await api_post(gw, "/api/v1/tunnels", sk,
                                              {"target": "db.internal:5432", "agent_id": agent.agent_id})
                assert status == 403 and body["error"]["code"] == "target_not_allowed", body
            # The stock agent reports its --allow list (README: --allow 127.0.0.1:22, then
            # a tunnel to 8188 used to answer 200 and fail every request with 502).
            async with running_agent(gw, keys["ak"], name="stock", allow=["127.0.0.1:22"]) as agent:
                status, body = await api_post(gw, f"/api/v1/agents/{agent.agent_id}/tunnel", sk,
                                              {"target_port": 8188, "tunnel_protocol": "http"})
                assert status == 403 and body["error"]["code"] == "target_not_allowed", body
                status, body = await api_post(gw, f"/api/v1/agents/{agent.agent_id}/tunnel", sk,
                                              {"target_port": 22, "tunnel_protocol": "tcp"})
                assert status == 200, body

            class OwnRules(Agent):  # decides by its own rules: reports no allowlist
                def is_allowed(self, host: str, port: int) -> bool:
                    return port == 1

            async with running_agent(gw, keys["ak"], OwnRules, name="silent") as agent:
                status, body = await api_post(gw, "/api/v1/tunnels", sk,
                                              {"target": "10.9.9.9:22", "agent_id": agent.agent_id})
                assert status == 201, body  # no policy in its hello: it refuses per connection

    run(main)


def test_a_tunnel_cannot_target_the_gateways_own_ports_and_a_loop_is_bounded(tmp_path, monkeypatch):
    """An agent on the gateway's host (its peer address is loopback) and targets that are
    the gateway itself: its own hub port, the listening port, another tunnel's hub port
    (400 target_is_gateway at creation; no tunnel made). A hub port that starts
    listening after a tunnel aimed at it was created is refused at connection time:
    the client's connection closes at once, nothing reaches the other hub. And a hub port
    carries at most MAX_HUB_CONNECTIONS connections at once."""
    import relay.gateway.agents.tunnel_sessions as tunnels_module

    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), echo_server() as echo_port:
            sk = keys["sk"]
            async with running_agent(gw, keys["ak"], name="local") as agent:
                aid = agent.agent_id
                hub = _free_port()
                status, other = await api_post(gw, "/api/v1/tunnels", sk,
                                               {"target": f"127.0.0.1:{echo_port}", "agent_id": aid})
                assert status == 201, other
                for target, extra in ((f"127.0.0.1:{hub}", {"hub_port": hub}), (f"localhost:{gw.port}", {}),
                                      (f"127.0.0.1:{other['hub_port']}", {}), (f"[::1]:{gw.port}", {}),
                                      (f"0.0.0.0:{other['hub_port']}", {})):
                    status, body = await api_post(gw, "/api/v1/tunnels", sk, {"target": target, "agent_id": aid, **extra})
                    assert status == 400 and body["error"]["code"] == "target_is_gateway", (target, body)
                status, body = await api_post(gw, f"/api/v1/agents/{aid}/tunnel", sk,
                                              {"target_port": gw.port, "tunnel_protocol": "tcp"})
                assert status == 400 and body["error"]["code"] == "target_is_gateway", body
                # A name that resolves to this host (the machine's own name: loopback or
                # one of its addresses), aimed at the gateway's port.
                name = socket.gethostname()
                assert socket.getaddrinfo(name, gw.port, type=socket.SOCK_STREAM)
                async with running_agent(gw, keys["ak"], name="named", allow=[f"{name}:{gw.port}"]) as named:
                    status, body = await api_post(gw, "/api/v1/tunnels", sk,
                                                  {"target": f"{name}:{gw.port}", "agent_id": named.agent_id})
                    assert status == 400 and body["error"]["code"] == "target_is_gateway", body
                    assert f"{name.lower()} resolves to" in body["error"]["message"], body
                status, listed = await http(gw.port, "GET", "/api/v1/tunnels", sk)
                assert [t["id"] for t in listed["tunnels"]] == [other["id"]]
                # A hub port bound after the tunnel aimed at it was created.
                later = _free_port()
                status, first = await api_post(gw, "/api/v1/tunnels", sk,
                                               {"target": f"127.0.0.1:{later}", "agent_id": aid})
                assert status == 201, first
                status, second = await api_post(gw, "/api/v1/tunnels", sk, {"target": f"127.0.0.1:{echo_port}",
                                                                            "agent_id": aid, "hub_port": later})
                assert status == 201 and second["hub_port"] == later, second
                reader, writer = await asyncio.open_connection("127.0.0.1", first["hub_port"])
                async with asyncio.timeout(5):
                    assert await reader.read() == b""  # closed at once
                writer.close()
                status, info = await http(gw.port, "GET", f"/api/v1/tunnels/{first['id']}", sk)
                assert "own listening or hub port" in info["last_error"], info
                status, info = await http(gw.port, "GET", f"/api/v1/tunnels/{second['id']}", sk)
                assert info["connections"] == 0
                # The bound: a small cap, one connection past it is closed at once.
                monkeypatch.setattr(tunnels_module, "MAX_HUB_CONNECTIONS", 3)
                clients = []
                for _ in range(3):
                    reader, writer = await asyncio.open_connection("127.0.0.1", other["hub_port"])
                    writer.write(b"x")
                    async with asyncio.timeout(5):
                        assert await reader.readexactly(1) == b"x"
                    clients.append(writer)
                reader, writer = await asyncio.open_connection("127.0.0.1", other["hub_port"])
                async with asyncio.timeout(5):
                    assert await reader.read() == b""
                writer.close()
                for client in clients:
                    client.close()

    run(main)
