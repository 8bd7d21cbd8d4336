"""Who may do what to tunnels, and which targets a tunnel may have (issue 12: 7, 9a, 9f).

An in-process gateway and real agents on 127.0.0.1 (real sockets, real echo targets);
every wait is bounded.
"""
from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.test_gateway_e2e import echo_server, gateway_and_team, http, run, running_agent, wait_until

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
