"""The Tunnels API (seed 002) end to end: an in-process gateway and real agents on
127.0.0.1, real HTTP requests, and a real TCP echo service behind an agent to prove the
hub port carries bytes (and stops carrying them when paused)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import uuid
from typing import Any, Optional

import pytest

from relay.gateway.api.tunnels import auto_protocol, connection_string, parse_target
from relay.gateway.app import Gateway
from relay.gateway.http.server import HttpError
from relay.gateway.store import open_store
from tests.gateway.test_gateway_e2e import gateway_and_team, run, running_agent, wait_until

pytestmark = pytest.mark.timeout(120)

NAME_RE = re.compile(r"[a-z]+-[a-z]+-[0-9a-f]{4}")


async def api(gw: Gateway, method: str, path: str, token: Optional[str] = None, body: Any = None,
              headers: Optional[dict[str, str]] = None, raw: Optional[bytes] = None,
              ) -> tuple[int, dict[str, str], Any]:
    """One HTTP/1.1 request; returns (status, lower-case headers, parsed JSON or None)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{gw.port}", "Connection: close",
             f"Content-Length: {len(data)}"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
    async with asyncio.timeout(10):
        response = await reader.read()
    writer.close()
    head, _, payload = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    found = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    return int(status_line.split(" ", 2)[1]), found, json.loads(payload) if payload else None


@contextlib.asynccontextmanager
async def echo_server():
    """A TCP echo service on 127.0.0.1; yields its port."""
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def echo_through(port: int, payload: bytes = b"hello relay") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.readexactly(len(payload))
    finally:
        writer.close()


async def refused(port: int) -> bool:
    """True if a TCP connection to the port is refused (nothing listening)."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    return False


async def create(gw: Gateway, token: str, **body: Any) -> dict[str, Any]:
    status, _, result = await api(gw, "POST", "/api/v1/tunnels", token, body)
    assert status == 201, result
    return result


# ----------------------------------------------------------------------------- pure helpers


def test_target_parsing_auto_protocol_and_connection_strings():
    assert parse_target("127.0.0.1:5432") == ("127.0.0.1", 5432)
    assert parse_target("DB.lan:80") == ("db.lan", 80)
    assert parse_target("[::1]:6379") == ("::1", 6379)
    assert parse_target({"host": "localhost", "port": 22}) == ("localhost", 22)
    for bad in ("5432", "host:", ":80", "host:0", "host:65536", "host:x", "::1:80", "bad host:1",
                {"host": "h"}, {"port": 1}, {"host": "h", "port": "80"}, {"host": "", "port": 1},
                {"host": "h", "port": True}, 80, None, ["h", 1]):
        with pytest.raises(HttpError) as info:
            parse_target(bad)
        assert info.value.status == 400 and info.value.message.startswith("target:")
    assert auto_protocol(443) == "https"
    assert all(auto_protocol(p) == "http" for p in (80, 3000, 5000, 7860, 8000, 8080, 8188, 8888))
    assert auto_protocol(22) == auto_protocol(5432) == "tcp"
    host = "127.0.0.1"
    assert connection_string(5432, "tcp", host, 15432) == "postgresql://user@127.0.0.1:15432/dbname"
    assert connection_string(3306, "tcp", host, 3306) == "mysql://user@127.0.0.1:3306/"
    assert connection_string(6379, "tcp", host, 6380) == "redis://127.0.0.1:6380"
    assert connection_string(27017, "tcp", host, 27017) == "mongodb://127.0.0.1:27017"
    assert connection_string(8188, "http", host, 9000) == "http://127.0.0.1:9000/"
    assert connection_string(443, "https", host, 8443) == "https://127.0.0.1:8443/"
    assert connection_string(22, "tcp", host, 2222) == "tcp://127.0.0.1:2222"
    assert connection_string(22, "tcp", "::1", 2222) == "tcp://[::1]:2222"


# ----------------------------------------------------------------------------- CRUD


def test_tunnel_lifecycle_through_a_real_echo_service(tmp_path, store_url):
    async def main():
        async with gateway_and_team(tmp_path, store_url) as (gw, keys), echo_server() as echo_port:
            sk = keys["sk"]
            async with running_agent(gw, keys["ak"], name="box") as agent:
                tunnel = await create(gw, sk, target=f"127.0.0.1:{echo_port}", agent_id=agent.agent_id,
                                      name="staging-echo", protocol="tcp")
                assert tunnel["name"] == "staging-echo" and tunnel["protocol"] == "tcp"
                assert tunnel["status"] == "active" and tunnel["error"] is None
                assert tunnel["target"] == f"127.0.0.1:{echo_port}" and tunnel["agent_id"] == agent.agent_id
                assert tunnel["public"] is False and tunnel["metadata"] == {}
                assert uuid.UUID(tunnel["id"]) and tunnel["hub_host"] == "127.0.0.1"
                hub_port = tunnel["hub_port"]
                assert await echo_through(hub_port) == b"hello relay"
                tid = tunnel["id"]

                status, _, listed = await api(gw, "GET", "/api/v1/tunnels", sk)
                assert status == 200 and [t["id"] for t in listed["tunnels"]] == [tid]
                status, _, got = await api(gw, "GET", f"/api/v1/tunnels/{tid}", sk)
                assert status == 200 and got["connections"] == 1 and got["hub_port"] == hub_port

                meta = {"owner": "ci", "nested": {"list": [1, 2, None]}}
                status, _, updated = await api(gw, "PATCH", f"/api/v1/tunnels/{tid}", sk,
                                               {"name": "renamed", "metadata": meta})
                assert status == 200 and updated["name"] == "renamed" and updated["metadata"] == meta
                assert updated["status"] == "active"

                # Pause: the hub port refuses new connections; the record stays.
                status, _, paused = await api(gw, "PATCH", f"/api/v1/tunnels/{tid}", sk, {"status": "paused"})
                assert status == 200 and paused["status"] == "paused"
                assert await refused(hub_port)
                assert (await api(gw, "GET", f"/api/v1/tunnels/{tid}", sk))[2]["status"] == "paused"
                # Resume: same port, bytes flow again.
                status, _, resumed = await api(gw, "PATCH", f"/api/v1/tunnels/{tid}", sk, {"status": "active"})
                assert status == 200 and resumed["status"] == "active" and resumed["hub_port"] == hub_port
                assert await echo_through(hub_port, b"again") == b"again"
                # Active again while active: nothing changes.
                status, _, same = await api(gw, "PATCH", f"/api/v1/tunnels/{tid}", sk, {"status": "active"})
                assert status == 200 and same["status"] == "active"
                assert await echo_through(hub_port, b"still") == b"still"

                status, _, body = await api(gw, "DELETE", f"/api/v1/tunnels/{tid}", sk)
                assert status == 204 and body is None
                assert (await api(gw, "GET", f"/api/v1/tunnels/{tid}", sk))[0] == 404
                assert (await api(gw, "DELETE", f"/api/v1/tunnels/{tid}", sk))[0] == 404
                assert await refused(hub_port)
                assert (await api(gw, "GET", "/api/v1/tunnels", sk))[2] == {"tunnels": []}

    run(main)


def test_generated_names_auto_protocol_target_object_and_public(tmp_path):
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys):
            async with running_agent(gw, keys["ak"], name="box") as agent:
                a = await create(gw, keys["sk"], target={"host": "127.0.0.1", "port": 8188},
                                 agent_id=agent.agent_id)
                b = await create(gw, keys["sk"], target="localhost:443", agent_id=agent.agent_id,
                                 protocol="auto", public=True)
                c = await create(gw, keys["sk"], target="127.0.0.1:5432", agent_id=agent.agent_id.upper(),
                                 name=None)
                assert NAME_RE.fullmatch(a["name"]) and NAME_RE.fullmatch(b["name"])
                assert NAME_RE.fullmatch(c["name"]) and len({a["name"], b["name"], c["name"]}) == 3
                assert (a["protocol"], b["protocol"], c["protocol"]) == ("http", "https", "tcp")
                assert b["public"] is True and c["agent_id"] == agent.agent_id
                assert len({a["hub_port"], b["hub_port"], c["hub_port"]}) == 3
                d = await create(gw, keys["sk"], target="127.0.0.1:22", agent_id=agent.agent_id,
                                 protocol="http", name="x" * 100)
                assert d["protocol"] == "http" and d["name"] == "x" * 100

    run(main)


def test_every_validation_error_names_its_field(tmp_path):
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys):
            sk = keys["sk"]
            async with running_agent(gw, keys["ak"], name="box") as agent:
                good = {"target": "127.0.0.1:22", "agent_id": agent.agent_id}
                cases = [
                    ({"agent_id": agent.agent_id}, "invalid_target", "target:"),
                    ({**good, "target": "nope"}, "invalid_target", "target:"),
                    ({**good, "target": {"host": "h", "port": 70000}}, "invalid_target", "target:"),
                    ({"target": "127.0.0.1:22"}, "invalid_agent_id", "agent_id:"),
                    ({**good, "agent_id": "not-a-uuid"}, "invalid_agent_id", "agent_id:"),
                    ({**good, "name": ""}, "invalid_name", "name:"),
                    ({**good, "name": "x" * 101}, "invalid_name", "name:"),
                    ({**good, "name": 7}, "invalid_name", "name:"),
                    ({**good, "name": "tab\there"}, "invalid_name", "name:"),
                    ({**good, "name": "\ud800"}, "invalid_name", "name:"),
                    ({**good, "protocol": "ftp"}, "invalid_protocol", "protocol:"),
                    ({**good, "public": "yes"}, "invalid_public", "public:"),
                    ({**good, "hub_port": 80}, "invalid_hub_port", "hub_port:"),
                    ({**good, "hub_port": 65536}, "invalid_hub_port", "hub_port:"),
                    ({**good, "hub_port": "20000"}, "invalid_hub_port", "hub_port:"),
                    ({**good, "colour": "red"}, "unknown_field", "unknown field 'colour'"),
                ]
                for body, code, message in cases:
                    status, _, answer = await api(gw, "POST", "/api/v1/tunnels", sk, body)
                    assert status == 400, (body, answer)
                    assert answer["error"]["code"] == code, (body, answer)
                    assert answer["error"]["message"].startswith(message), (body, answer)
                status, _, answer = await api(gw, "POST", "/api/v1/tunnels", sk, raw=b"{nope")
                assert status == 400 and answer["error"]["code"] == "invalid_json"
                # Nested past the JSON parser's recursion limit (was a 500).
                status, _, answer = await api(gw, "POST", "/api/v1/tunnels", sk, raw=b"[" * 100000 + b"]" * 100000)
                assert status == 400 and answer["error"]["code"] == "invalid_json", (status, answer)
                status, _, answer = await api(gw, "POST", "/api/v1/tunnels", sk, [good])
                assert status == 400 and answer["error"]["code"] == "invalid_request"
                status, _, answer = await api(gw, "POST", "/api/v1/tunnels", sk,
                                              {**good, "agent_id": str(uuid.uuid4())})
                assert status == 404 and answer["error"]["code"] == "agent_not_found"
                assert (await api(gw, "GET", "/api/v1/tunnels", sk))[2] == {"tunnels": []}  # nothing created

                # A requested hub port another tunnel holds: 409.
                port = _free_port()
                first = await create(gw, sk, **good, hub_port=port)
                assert first["hub_port"] == port and first["status"] == "active"
                status, _, answer = await api(gw, "POST", "/api/v1/tunnels", sk, {**good, "hub_port": port})
                assert status == 409 and answer["error"]["code"] == "hub_port_taken"

                path = f"/api/v1/tunnels/{first['id']}"
                updates = [
                    ({}, "invalid_request"),
                    ({"status": "connecting"}, "invalid_status"),
                    ({"status": "error"}, "invalid_status"),
                    ({"name": ""}, "invalid_name"),
                    ({"name": "y" * 101}, "invalid_name"),
                    ({"metadata": [1]}, "invalid_metadata"),
                    ({"metadata": "x"}, "invalid_metadata"),
                    ({"metadata": {"blob": "z" * 16 * 1024}}, "invalid_metadata"),
                    ({"agent_id": agent.agent_id}, "unknown_field"),
                ]
                for body, code in updates:
                    status, _, answer = await api(gw, "PATCH", path, sk, body)
                    assert status == 400 and answer["error"]["code"] == code, (body, answer)
                status, _, same = await api(gw, "GET", path, sk)
                assert same["name"] == first["name"] and same["metadata"] == {}  # nothing half-applied
                status, _, ok = await api(gw, "PATCH", path, sk, {"metadata": {"blob": "z" * 15000}})
                assert status == 200
                assert (await api(gw, "PATCH", f"/api/v1/tunnels/{uuid.uuid4()}", sk, {"name": "n"}))[0] == 404
                assert (await api(gw, "GET", "/api/v1/tunnels/not-a-uuid", sk))[0] == 404

    run(main)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_status_connecting_while_agent_offline_and_error_when_port_is_busy(tmp_path):
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), echo_server() as echo_port:
            sk = keys["sk"]
            async with running_agent(gw, keys["ak"], name="flaky") as agent:
                agent_id = agent.agent_id
            await wait_until(lambda: not gw.registry.is_online(agent_id))
            # The agent is known but offline: created, and connecting; the hub port listens
            # but closes connections at once.
            tunnel = await create(gw, sk, target=f"127.0.0.1:{echo_port}", agent_id=agent_id)
            assert tunnel["status"] == "connecting"
            path = f"/api/v1/tunnels/{tunnel['id']}"
            with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
                await echo_through(tunnel["hub_port"])
            # The agent comes back: active by itself, bytes flow.
            async with running_agent(gw, keys["ak"], name="flaky"):
                status, _, now = await api(gw, "GET", path, sk)
                assert now["status"] == "active"
                assert await echo_through(tunnel["hub_port"]) == b"hello relay"

                # A hub port something else holds: the tunnel is created in "error".
                blocker = socket.socket()
                blocker.bind(("127.0.0.1", 0))
                blocker.listen()
                busy = blocker.getsockname()[1]
                try:
                    broken = await create(gw, sk, target=f"127.0.0.1:{echo_port}", agent_id=agent_id,
                                          hub_port=busy)
                    assert broken["status"] == "error" and str(busy) in broken["error"]
                    bpath = f"/api/v1/tunnels/{broken['id']}"
                    status, _, again = await api(gw, "PATCH", bpath, sk, {"status": "active"})
                    assert again["status"] == "error"  # still busy
                finally:
                    blocker.close()
                status, _, fixed = await api(gw, "PATCH", bpath, sk, {"status": "active"})
                assert fixed["status"] == "active" and fixed["error"] is None
                assert await echo_through(busy) == b"hello relay"

    run(main)


# ----------------------------------------------------------------------------- auth


def test_dk_cannot_manage_and_other_teams_get_404(tmp_path, store_url):
    async def main():
        async with gateway_and_team(tmp_path, store_url) as (gw, keys):
            _, other = await gw.store.create_team_with_keys("team-b")
            async with running_agent(gw, keys["ak"], name="box") as agent:
                tunnel = await create(gw, keys["sk"], target="127.0.0.1:8188", agent_id=agent.agent_id)
                path = f"/api/v1/tunnels/{tunnel['id']}"
                dk = keys["dk"]
                for method, url, body in [
                    ("POST", "/api/v1/tunnels", {"target": "127.0.0.1:1", "agent_id": agent.agent_id}),
                    ("PATCH", path, {"name": "x"}),
                    ("DELETE", path, None),
                    ("POST", path + "/shares", {"name": "s"}),
                    ("POST", "/api/v1/webhooks", {"url": "http://127.0.0.1:1/"}),
                    ("GET", "/api/v1/webhooks", None),
                ]:
                    status, _, answer = await api(gw, method, url, dk, body)
                    assert status == 403 and answer["error"]["code"] == "forbidden", (method, url)
                # Runtime keys may read and use tunnels.
                assert (await api(gw, "GET", "/api/v1/tunnels", dk))[0] == 200
                assert (await api(gw, "GET", path, dk))[0] == 200
                assert (await api(gw, "GET", path + "/shares", dk))[0] == 200
                assert (await api(gw, "GET", "/api/v1/tunnels", keys["ak"]))[0] == 403
                assert (await api(gw, "GET", "/api/v1/tunnels"))[0] == 401

                osk = other["sk"]
                assert (await api(gw, "GET", "/api/v1/tunnels", osk))[2] == {"tunnels": []}
                for method, url, body in [
                    ("GET", path, None),
                    ("PATCH", path, {"status": "paused"}),
                    ("DELETE", path, None),
                    ("POST", path + "/connect", {"agent_id": agent.agent_id}),
                    ("POST", path + "/shares", {"name": "s"}),
                    ("GET", path + "/shares", None),
                ]:
                    status, _, answer = await api(gw, method, url, osk, body)
                    assert status == 404 and answer["error"]["code"] == "tunnel_not_found", (method, url)
                # Another team's agent cannot be used in a create.
                status, _, answer = await api(gw, "POST", "/api/v1/tunnels", osk,
                                              {"target": "127.0.0.1:1", "agent_id": agent.agent_id})
                assert status == 404 and answer["error"]["code"] == "agent_not_found"
                status, _, still = await api(gw, "GET", path, keys["sk"])
                assert status == 200 and still["status"] == "active"

    run(main)


# ----------------------------------------------------------------------------- connect


def test_connect_sends_bind_to_the_second_agent_and_formats_the_connection_string(tmp_path, store_url):
    async def main():
        async with gateway_and_team(tmp_path, store_url) as (gw, keys):
            _, other = await gw.store.create_team_with_keys("team-b")
            received: list[Any] = []
            async with running_agent(gw, keys["ak"], name="db-host") as exposer:
                second = _recording_agent(gw, keys["ak"], "laptop", received)
                async with second as reacher:
                    pg = await create(gw, keys["sk"], target="127.0.0.1:5432", agent_id=exposer.agent_id)
                    path = f"/api/v1/tunnels/{pg['id']}/connect"
                    local = _free_port()
                    status, _, conn = await api(gw, "POST", path, keys["dk"],
                                                {"agent_id": reacher.agent_id, "local_port": local})
                    assert status == 200, conn
                    assert conn["connection_string"] == f"postgresql://user@127.0.0.1:{local}/dbname"
                    assert conn["local_port"] == local and conn["agent_id"] == reacher.agent_id
                    await wait_until(lambda: any(m.get("type") == "bind" for m in received))
                    [bind] = [m for m in received if m.get("type") == "bind"]
                    assert bind == {"type": "bind", "request_id": bind["request_id"], "tunnel_id": pg["id"],
                                    "local_port": local,
                                    "hub": {"host": "127.0.0.1", "port": pg["hub_port"]}, "protocol": "tcp"}
                    await wait_until(lambda: reacher.binder.bound.get(pg["id"]) == local)

                    # The bound port really reaches the target: a TCP echo service behind the
                    # first agent, used from the second agent's loopback port.
                    async with echo_server() as echo_port:
                        echo = await create(gw, keys["sk"], target=f"127.0.0.1:{echo_port}",
                                            agent_id=exposer.agent_id)
                        local_echo = _free_port()
                        status, _, conn = await api(gw, "POST", f"/api/v1/tunnels/{echo['id']}/connect",
                                                    keys["sk"], {"agent_id": reacher.agent_id,
                                                                 "local_port": local_echo})
                        assert conn["connection_string"] == f"tcp://127.0.0.1:{local_echo}"
                        await wait_until(lambda: reacher.binder.bound.get(echo["id"]) == local_echo)
                        assert await echo_through(local_echo, b"via the second agent") == b"via the second agent"

                    web = await create(gw, keys["sk"], target="127.0.0.1:8188", agent_id=exposer.agent_id)
                    status, _, conn = await api(gw, "POST", f"/api/v1/tunnels/{web['id']}/connect", keys["sk"],
                                                {"agent_id": reacher.agent_id})
                    assert status == 200 and conn["connection_string"] == "http://127.0.0.1:8188/"

                    for body, code in [({}, "invalid_agent_id"), ({"agent_id": "x"}, "invalid_agent_id"),
                                       ({"agent_id": reacher.agent_id, "local_port": 0}, "invalid_local_port"),
                                       ({"agent_id": reacher.agent_id, "local_port": "80"}, "invalid_local_port"),
                                       ({"agent_id": reacher.agent_id, "x": 1}, "unknown_field")]:
                        status, _, answer = await api(gw, "POST", path, keys["sk"], body)
                        assert status == 400 and answer["error"]["code"] == code, body
                    status, _, answer = await api(gw, "POST", path, keys["sk"], {"agent_id": str(uuid.uuid4())})
                    assert status == 404 and answer["error"]["code"] == "agent_not_found"
                    async with running_agent(gw, other["ak"], name="foreign") as foreign:
                        status, _, answer = await api(gw, "POST", path, keys["sk"], {"agent_id": foreign.agent_id})
                        assert status == 404
                    reacher_id = reacher.agent_id
                await wait_until(lambda: not gw.registry.is_online(reacher_id))
                status, _, answer = await api(gw, "POST", path, keys["sk"], {"agent_id": reacher_id})
                assert status == 409 and answer["error"]["code"] == "agent_offline"

    run(main)


@contextlib.asynccontextmanager
async def _recording_agent(gw: Gateway, key: str, name: str, received: list[Any]):
    """A running agent whose control messages are also appended to ``received``."""
    from relay.agent import Agent

    agent = Agent(gw.url, key, name=name, backoff_initial=0.05)
    original = agent.on_control

    def record(message: Any, session: Any = None) -> None:  # the agent passes the session it came on
        received.append(message)
        original(message, session)

    agent.on_control = record  # type: ignore[method-assign]
    task = asyncio.get_running_loop().create_task(agent.run())
    try:
        await wait_until(lambda: agent.agent_id is not None)
        yield agent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        agent.close()


# ----------------------------------------------------------------------------- shares


def test_shares_api_and_enforcement_at_the_share_url(tmp_path, store_url):
    from tests.support.webapps import WebApp

    async def main():
        async with gateway_and_team(tmp_path, store_url) as (gw, keys), WebApp() as app:
            sk = keys["sk"]
            clock = [1_700_000_040.0]  # a window boundary; moved by hand below
            gw.tunnels_api.clock = lambda: clock[0]
            async with running_agent(gw, keys["ak"], name="web") as agent:
                web = await create(gw, sk, target=f"127.0.0.1:{app.port}", agent_id=agent.agent_id,
                                   protocol="http")
                base = f"/api/v1/tunnels/{web['id']}/shares"
                status, _, share = await api(gw, "POST", base, sk, {
                    "name": "demo for acme", "description": "read-only demo", "expires_in": "1h",
                    "allowed_methods": ["GET"], "rate_limit": 2})
                assert status == 201, share
                match = re.fullmatch(re.escape(gw.url) + r"/s/([\w-]+)/", share["share_url"])
                assert match, share["share_url"]
                assert share["shareUrl"] == share["share_url"]  # seed 002's name, and the earlier one
                token = match.group(1)
                assert share["allowed_methods"] == ["GET"] and share["rate_limit"] == 2
                assert share["expires_at"] == "2023-11-14T23:14:00Z" and share["expired"] is False
                assert token.startswith(share["token_prefix"])

                status, _, listed = await api(gw, "GET", base, keys["dk"])
                assert status == 200 and [s["id"] for s in listed["shares"]] == [share["id"]]
                assert "share_url" not in listed["shares"][0]  # shown once: only a hash is kept
                status, _, got = await api(gw, "GET", f"{base}/{share['id']}", sk)
                assert status == 200 and got["name"] == "demo for acme"
                assert (await api(gw, "GET", f"{base}/{uuid.uuid4()}", sk))[0] == 404

                # Through the share to the web app behind the agent; the prefix is stripped.
                url = f"/s/{token}/echo/page?x=1"
                status, _, echo = await api(gw, "GET", url)
                assert status == 200 and echo["method"] == "GET" and echo["target"] == "/echo/page?x=1"
                assert dict(echo["headers"])["x-forwarded-prefix"] == f"/s/{token}"
                # Method not allowed: 405 with Allow; it does not use the budget.
                status, headers, answer = await api(gw, "POST", url, body={"a": 1})
                assert status == 405 and headers["allow"] == "GET, HEAD"
                assert answer["error"]["code"] == "method_not_allowed"
                # Rate limit 2/min: the second passes, the third is 429 with Retry-After.
                clock[0] += 20
                assert (await api(gw, "GET", url))[0] == 200
                status, headers, answer = await api(gw, "GET", url)
                assert status == 429 and headers["retry-after"] == "40"
                assert answer["error"]["code"] == "rate_limited"
                clock[0] += 40  # the next window: recovered
                assert (await api(gw, "GET", url))[0] == 200
                # Without the slash: redirected (relative links need it).
                status, headers, _ = await api(gw, "GET", f"/s/{token}?a=b")
                assert status == 308 and headers["location"] == f"/s/{token}/?a=b"
                # Expired: 410 Gone, whatever the method.
                clock[0] += 3600
                status, _, answer = await api(gw, "GET", url)
                assert status == 410 and answer["error"]["code"] == "share_expired"
                assert (await api(gw, "GET", f"/s/{token}"))[0] == 410
                assert (await api(gw, "GET", f"{base}/{share['id']}", sk))[2]["expired"] is True
                assert (await api(gw, "GET", "/s/not-a-token/"))[0] == 404
                assert (await api(gw, "GET", "/s/not-a-token"))[0] == 404

                # A never-expiring share without restrictions; paused tunnel -> 503.
                status, _, free = await api(gw, "POST", base, sk, {"name": "open", "expires_in": "never"})
                assert status == 201 and free["expires_at"] is None and free["allowed_methods"] is None
                free_path = "/s/" + free["share_url"].rsplit("/s/", 1)[1]
                status, _, echo = await api(gw, "DELETE", free_path + "echo")
                assert status == 200 and echo["method"] == "DELETE"
                await api(gw, "PATCH", f"/api/v1/tunnels/{web['id']}", sk, {"status": "paused"})
                status, _, answer = await api(gw, "GET", free_path)
                assert status == 503 and answer["error"]["code"] == "tunnel_paused"
                await api(gw, "PATCH", f"/api/v1/tunnels/{web['id']}", sk, {"status": "active"})
                assert (await api(gw, "GET", free_path + "echo"))[0] == 200

                for body, code in [({"name": ""}, "invalid_name"),
                                   ({"name": "n", "expires_in": "2d"}, "invalid_expires_in"),
                                   ({"name": "n", "allowed_methods": ["BREW"]}, "invalid_allowed_methods"),
                                   ({"name": "n", "rate_limit": 0}, "invalid_rate_limit"),
                                   ({"name": "n", "description": "d" * 501}, "invalid_description")]:
                    status, _, answer = await api(gw, "POST", base, sk, body)
                    assert status == 400 and answer["error"]["code"] == code, body
                # Shares go through the HTTP proxy: not on tcp (or udp) tunnels.
                for target in ("127.0.0.1:5432",):
                    other = await create(gw, sk, target=target, agent_id=agent.agent_id)
                    status, _, answer = await api(gw, "POST", f"/api/v1/tunnels/{other['id']}/shares", sk,
                                                  {"name": "n"})
                    assert status == 400 and answer["error"]["code"] == "invalid_tunnel_protocol"

                # public: true on an http tunnel = an unrestricted share, URL returned once.
                pub = await create(gw, sk, target=f"127.0.0.1:{app.port}", agent_id=agent.agent_id,
                                   protocol="http", public=True)
                assert pub["public"] is True and pub["public_url"].startswith(gw.url + "/s/")
                status, _, echo = await api(gw, "PUT", "/s/" + pub["public_url"].rsplit("/s/", 1)[1] + "echo")
                assert status == 200 and echo["method"] == "PUT"
                status, _, shares = await api(gw, "GET", f"/api/v1/tunnels/{pub['id']}/shares", sk)
                [auto] = shares["shares"]
                assert auto["name"] == "public" and auto["expires_at"] is None and auto["rate_limit"] is None
                assert "public_url" not in (await api(gw, "GET", f"/api/v1/tunnels/{pub['id']}", sk))[2]

                # Delete one share; deleting the tunnel deletes the rest.
                assert (await api(gw, "DELETE", f"{base}/{share['id']}", keys["dk"]))[0] == 403
                assert (await api(gw, "DELETE", f"{base}/{share['id']}", sk))[0] == 204
                assert (await api(gw, "DELETE", f"{base}/{share['id']}", sk))[0] == 404
                assert (await api(gw, "GET", url))[0] == 404
                assert (await api(gw, "DELETE", f"/api/v1/tunnels/{web['id']}", sk))[0] == 204
                assert (await api(gw, "GET", free_path))[0] == 404
                assert await gw.store.get_share_by_token(free_path.split("/")[2]) is None

    run(main)


def test_every_request_on_a_kept_alive_share_connection_is_checked(tmp_path, store_url):
    from tests.http.test_http_tunnel import Client
    from tests.support.webapps import WebApp

    async def main():
        async with gateway_and_team(tmp_path, store_url) as (gw, keys), WebApp() as app:
            sk = keys["sk"]
            clock = [1_700_000_040.0]
            gw.tunnels_api.clock = lambda: clock[0]
            async with running_agent(gw, keys["ak"], name="web") as agent:
                web = await create(gw, sk, target=f"127.0.0.1:{app.port}", agent_id=agent.agent_id,
                                   protocol="http")
                status, _, share = await api(gw, "POST", f"/api/v1/tunnels/{web['id']}/shares", sk,
                                             {"name": "s", "allowed_methods": ["GET"], "rate_limit": 3})
                prefix = "/s/" + share["share_url"].rsplit("/s/", 1)[1]
                client = await Client.connect(gw.port)
                try:
                    for i in range(3):  # one connection, three requests: all proxied
                        status, _, body = await client.request("GET", prefix + f"echo/{i}")
                        assert status == 200 and json.loads(body)["target"] == f"/echo/{i}"
                    assert app.connections == 1  # and the upstream connection was reused
                    # The fourth on the same connection is over the limit: 429, Retry-After.
                    status, headers, body = await client.request("GET", prefix + "echo/3")
                    assert status == 429 and headers["retry-after"] == "60"
                    assert json.loads(body)["error"]["code"] == "rate_limited"
                finally:
                    await client.close()
                clock[0] += 60
                client = await Client.connect(gw.port)
                try:
                    assert (await client.request("GET", prefix + "echo/a"))[0] == 200
                    # A method the share refuses, on a connection the proxy already owns.
                    status, headers, _ = await client.request("DELETE", prefix + "echo/b")
                    assert status == 405 and headers["allow"] == "GET, HEAD"
                finally:
                    await client.close()
                stats = gw.tunnels_api.share_proxy.stats(share["id"])
                assert stats is not None and stats.requests == 4

    run(main)


# ----------------------------------------------------------------------------- restart


def test_tunnels_shares_and_webhooks_survive_a_restart(tmp_path, store_url):
    async def main():
        store = await open_store(store_url)
        _, keys = await store.create_team_with_keys("team-a")
        gw = Gateway(store, allow_private_egress=True)  # its webhook is on 127.0.0.1
        await gw.start("127.0.0.1", 0)
        try:
            async with running_agent(gw, keys["ak"], name="box") as agent:
                agent_id = agent.agent_id
                tcp = await create(gw, keys["sk"], target="127.0.0.1:22", agent_id=agent_id, name="ssh")
                web = await create(gw, keys["sk"], target="127.0.0.1:8188", agent_id=agent_id)
                await api(gw, "PATCH", f"/api/v1/tunnels/{web['id']}", keys["sk"],
                          {"status": "paused", "metadata": {"k": "v"}})
                status, _, share = await api(gw, "POST", f"/api/v1/tunnels/{web['id']}/shares", keys["sk"],
                                             {"name": "s", "expires_in": "never"})
                status, _, hook = await api(gw, "POST", "/api/v1/webhooks", keys["sk"],
                                            {"url": "http://127.0.0.1:9/hook"})
                assert status == 201
        finally:
            await gw.close()
            await store.close()
        assert await refused(tcp["hub_port"])

        store = await open_store(store_url)
        gw = Gateway(store, allow_private_egress=True)  # its webhook is on 127.0.0.1
        await gw.start("127.0.0.1", 0)
        try:
            sk = keys["sk"]
            status, _, listed = await api(gw, "GET", "/api/v1/tunnels", sk)
            by_name = {t["name"]: t for t in listed["tunnels"]}
            assert set(by_name) == {"ssh", web["name"]}
            assert by_name["ssh"]["hub_port"] == tcp["hub_port"]
            assert by_name["ssh"]["status"] == "connecting"  # its agent has not reconnected yet
            assert not await refused(tcp["hub_port"])  # listening again, on the same port
            assert by_name[web["name"]]["status"] == "paused"
            assert by_name[web["name"]]["metadata"] == {"k": "v"}
            status, _, shares = await api(gw, "GET", f"/api/v1/tunnels/{web['id']}/shares", sk)
            assert [s["id"] for s in shares["shares"]] == [share["id"]]
            token = share["share_url"].rsplit("/s/", 1)[1].strip("/")
            assert (await api(gw, "GET", f"/s/{token}/"))[0] == 503  # the share is valid; its tunnel paused
            status, _, hooks = await api(gw, "GET", "/api/v1/webhooks", sk)
            assert [h["id"] for h in hooks["webhooks"]] == [hook["id"]]
            async with running_agent(gw, keys["ak"], name="box"):
                status, _, tunnel = await api(gw, "GET", f"/api/v1/tunnels/{tcp['id']}", sk)
                assert tunnel["status"] == "active"
        finally:
            await gw.close()
            await store.close()

    run(main)


def test_concurrent_pause_and_resume_leave_status_and_listener_in_agreement(tmp_path):
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), echo_server() as echo_port:
            sk = keys["sk"]
            async with running_agent(gw, keys["ak"], name="box") as agent:
                tunnel = await create(gw, sk, target=f"127.0.0.1:{echo_port}", agent_id=agent.agent_id)
                path = f"/api/v1/tunnels/{tunnel['id']}"
                for _ in range(3):
                    answers = await asyncio.gather(*(
                        api(gw, "PATCH", path, sk, {"status": "paused" if i % 2 else "active"})
                        for i in range(10)))
                    assert all(status == 200 for status, _, _ in answers)
                    status, _, final = await api(gw, "GET", path, sk)
                    if final["status"] == "paused":
                        assert await refused(tunnel["hub_port"])
                    else:
                        assert final["status"] == "active"
                        assert await echo_through(tunnel["hub_port"]) == b"hello relay"

    run(main)


def test_openapi_describes_every_tunnels_api_route(tmp_path):
    from relay.gateway.api.tunnels import TunnelsApi

    class Recorder:
        def __init__(self) -> None:
            self.routes: list[tuple[str, str]] = []

        def add(self, method: str, pattern: str, handler: Any, **_: Any) -> None:
            self.routes.append((method.lower(), pattern))

    recorder = Recorder()
    TunnelsApi(None).register(recorder)  # type: ignore[arg-type]

    async def main():
        async with gateway_and_team(tmp_path) as (gw, _):
            status, _, doc = await api(gw, "GET", "/api/v1/openapi.json")
            assert status == 200
            return doc

    doc = run(main)
    described = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    registered = set()
    for method, pattern in recorder.routes:
        if pattern.startswith("/s/"):
            continue  # share links are not part of the control API
        path = pattern.removeprefix("/api/v1")
        path = re.sub(r"\{(\w+)_id\}", lambda m: "{" + m.group(1) + "Id}", path)
        registered.add((method, path))
    assert registered <= described, registered - described
    assert {p for _, p in registered} == {p for p in doc["paths"] if p.startswith(("/tunnels", "/webhooks"))}

    def refs(node: Any):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in refs(doc):  # every reference resolves
        target = doc
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]


def test_agent_binder_validates_replaces_and_closes():
    from relay.agent.bind import Binder

    async def main():
        binder = Binder()
        assert await binder.bind({"type": "bind"}) is None
        assert await binder.bind({"tunnel_id": "t", "local_port": "x", "hub": {}}) is None
        async with echo_server() as echo_port:
            hub = {"host": "127.0.0.1", "port": echo_port}  # an echo service stands in for a hub port
            first = _free_port()
            assert await binder.bind({"tunnel_id": "t", "local_port": first, "hub": hub}) == first
            assert await echo_through(first) == b"hello relay"
            second = _free_port()
            assert await binder.bind({"tunnel_id": "t", "local_port": second, "hub": hub}) == second
            assert binder.bound == {"t": second} and await refused(first)  # replaced
            # A port something else holds: logged, nothing bound.
            assert await binder.bind({"tunnel_id": "u", "local_port": second, "hub": hub}) is None
            binder.close()
            assert binder.bound == {} and await refused(second)
        # Nothing listening at the hub: the local connection is closed, not hung.
        dead_hub = {"host": "127.0.0.1", "port": _free_port()}
        port = await binder.bind({"tunnel_id": "v", "local_port": _free_port(), "hub": dead_hub})
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
        binder.close()

    run(main)


def test_random_bodies_never_get_a_5xx(tmp_path):
    import random

    rng = random.Random(2026)

    def value(depth: int = 0) -> Any:
        kind = rng.randrange(10 if depth < 3 else 7)
        return [lambda: None, lambda: rng.choice([True, False]), lambda: rng.randint(-2, 70000),
                lambda: rng.choice(["", "x", "127.0.0.1:22", "[::1]:80", "\ud800", "a\x00", "é" * 120,
                                    "http://127.0.0.1:1/", "GET", "udp", "auto", "paused", "1h", "never"]),
                lambda: rng.random() * 1e6, lambda: str(uuid.uuid4()), lambda: "A" * rng.randrange(3000),
                lambda: [value(depth + 1) for _ in range(rng.randrange(4))],
                lambda: {rng.choice(FIELDS): value(depth + 1) for _ in range(rng.randrange(5))},
                lambda: {"host": value(depth + 1), "port": value(depth + 1)}][kind]()

    FIELDS = ["target", "agent_id", "name", "protocol", "public", "hub_port", "status", "metadata",
              "local_port", "description", "expires_in", "allowed_methods", "rate_limit", "url", "events"]

    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys):
            async with running_agent(gw, keys["ak"], name="fuzz") as agent:
                tunnel = await create(gw, keys["sk"], target="127.0.0.1:8188", agent_id=agent.agent_id)
                tid = tunnel["id"]
                endpoints = [("POST", "/api/v1/tunnels"), ("PATCH", f"/api/v1/tunnels/{tid}"),
                             ("POST", f"/api/v1/tunnels/{tid}/connect"), ("POST", f"/api/v1/tunnels/{tid}/shares"),
                             ("POST", "/api/v1/webhooks")]
                for i in range(400):
                    method, path = endpoints[i % len(endpoints)]
                    body = {rng.choice(FIELDS): value() for _ in range(rng.randrange(6))}
                    if rng.random() < 0.3:  # mostly valid bodies with one field disturbed
                        body = {"target": "127.0.0.1:22", "agent_id": agent.agent_id, "name": "n",
                                rng.choice(FIELDS): value()}
                    status, _, answer = await api(gw, method, path, keys["sk"], body)
                    assert status < 500, (method, path, body, answer)
                    if status >= 400:
                        assert set(answer["error"]) == {"code", "message"}
                # Whatever was created is still readable.
                status, _, listed = await api(gw, "GET", "/api/v1/tunnels", keys["sk"])
                assert status == 200 and all(t["status"] in ("active", "paused", "connecting", "error")
                                             for t in listed["tunnels"])

    run(main, timeout=120)
