"""Container services (seed 003): declarations, the records' fields, external services,
the transparent proxy's path/query/header handling, management rules.

In-process gateway and agents on real sockets, as in tests/http/test_invoke.py.
"""
from __future__ import annotations

import asyncio
import json

import pytest

from relay.agent.services import parse_service
from relay.gateway.api.services import _declarations
from tests.gateway.test_gateway_e2e import gateway_and_team, http, run
from tests.http.test_invoke import fast_probes, invoke, serving_agent, wait_status
from tests.support.openai_server import OpenAIServer

pytestmark = pytest.mark.timeout(120)


def test_parse_service_option() -> None:
    spec = parse_service("my-llm=127.0.0.1:8000,health=/healthz,prompt=Chat with llama3,"
                         "openapi=/openapi.json,label=gpu,label=a100")
    assert (spec.slug, spec.host, spec.port, spec.health) == ("my-llm", "127.0.0.1", 8000, "/healthz")
    assert spec.prompt == "Chat with llama3" and spec.openapi == "/openapi.json"
    assert spec.labels == ("gpu", "a100")
    assert parse_service("abc=localhost:1").health == "/health"  # the default
    assert parse_service("abc=localhost:1,health=none").health is None
    for bad in ("ab=127.0.0.1:1", "-ab=127.0.0.1:1", "Abc=127.0.0.1:1", "abc", "abc=127.0.0.1",
                "abc=127.0.0.1:1,health=x", "abc=127.0.0.1:1,openapi=//x", "abc=127.0.0.1:1,color=red",
                "abc=127.0.0.1:1,prompt"):
        with pytest.raises(ValueError):
            parse_service(bad)
    # The gateway drops malformed declarations of a hello (an odd agent still connects).
    hello = {"services": [spec.to_info(), {"slug": "Bad_Slug", "target": "127.0.0.1:1"},
                          {"slug": "no-target"}, "junk", {"slug": "ok1", "target": "h:2", "health": "//x"}]}
    declared = _declarations(hello)
    assert sorted(declared) == ["my-llm", "ok1"] and declared["ok1"]["health"] is None
    assert _declarations({"services": "nope"}) == {} and _declarations(None) == {}


async def raw_request(port: int, head: str) -> bytes:
    """Send a request head as is; return the whole answer (the request says close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


def test_declared_service_fields_and_transparent_proxy(tmp_path, store_url) -> None:
    async def body() -> None:
        async with gateway_and_team(tmp_path, store_url) as (gw, keys):
            fast_probes(gw)
            app = await OpenAIServer("one").start()
            try:
                declaration = (f"my-llm=127.0.0.1:{app.port},prompt=Chat completions,"
                               f"openapi=/openapi.json,label=gpu")
                async with serving_agent(gw, keys["ak"], "gpu-box", declaration) as agent:
                    svc = await wait_status(gw, keys["sk"], "my-llm", "running")
                    assert svc["service_slug"] == "my-llm" and svc["service_type"] == "deployed"
                    assert svc["exposed_port"] == app.port and svc["usage_prompt"] == "Chat completions"
                    assert svc["openapi_url"] == "/openapi.json" and svc["labels"] == ["gpu"]
                    assert svc["health_path"] == "/health"
                    assert svc["instances_online"] == 1 and svc["instances_healthy"] == 1
                    assert svc["instances"][0]["agent_id"] == agent.agent_id
                    status, listing = await http(gw.port, "GET", "/api/v1/r/containers", keys["dk"])
                    assert status == 200 and [s["service_slug"] for s in listing["services"]] == ["my-llm"]
                    # The path after the slug and the query go as they are; the gateway
                    # credential does not.
                    raw = await raw_request(gw.port, (
                        "POST /api/v1/r/containers/my-llm/echo/a%20b/c?x=1&y=%2F HTTP/1.1\r\nHost: gw\r\n"
                        f"Authorization: Bearer {keys['sk']}\r\nX-App: 1\r\nContent-Length: 5\r\n"
                        "Connection: close\r\n\r\nhello"))
                    head, _, payload = raw.partition(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 200") and payload == b"hello", raw[:300]
                    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
                    assert headers["x-echo-target"] == "/echo/a%20b/c?x=1&y=%2F"
                    seen = json.loads(headers["x-echo-headers"])
                    assert "authorization" not in seen and seen["x-app"] == "1"
                    # The container's own statuses pass through.
                    assert (await http(gw.port, "GET", "/api/v1/r/containers/my-llm/nowhere", keys["sk"]))[0] == 404
                    # Keep-alive: two requests on one connection, both proxied.
                    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                    for i in range(2):
                        writer.write((f"GET /api/v1/r/containers/my-llm/echo/{i} HTTP/1.1\r\nHost: gw\r\n"
                                      f"Authorization: Bearer {keys['sk']}\r\n\r\n").encode())
                        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                        assert head.startswith(b"HTTP/1.1 200") and f"/echo/{i}".encode() in head
                    writer.close()
                    # Auth: none -> 401, ak- -> 403; an unknown slug -> 404, all JSON errors.
                    assert (await http(gw.port, "GET", "/api/v1/r/containers/my-llm/echo", None))[0] == 401
                    assert (await http(gw.port, "GET", "/api/v1/r/containers/my-llm/echo", keys["ak"]))[0] == 403
                    status, out = await http(gw.port, "GET", "/api/v1/r/containers/other/echo", keys["sk"])
                    assert status == 404 and out["error"]["code"] == "service_not_found"
                    # A service agents still declare cannot be deleted; dk- cannot manage.
                    assert (await http(gw.port, "DELETE", "/api/v1/r/containers/my-llm", keys["dk"]))[0] == 403
                    assert (await http(gw.port, "DELETE", "/api/v1/r/containers/my-llm", keys["sk"]))[0] == 409
                # Once stopped (agent gone past the grace), the record can be deleted.
                gw.services.offline_grace = 0.0
                await wait_status(gw, keys["sk"], "my-llm", "stopped")
                assert (await http(gw.port, "DELETE", "/api/v1/r/containers/my-llm", keys["sk"]))[0] == 204
                assert (await http(gw.port, "GET", "/api/v1/r/containers/my-llm", keys["sk"]))[0] == 404
            finally:
                await app.close()

    run(body)


def test_external_service(tmp_path, store_url) -> None:
    async def body() -> None:
        async with gateway_and_team(tmp_path, store_url) as (gw, keys):
            fast_probes(gw)
            app = await OpenAIServer("ext").start()
            try:
                path = "/api/v1/r/containers"
                for bad in ({"service_slug": "x", "url": app.url}, {"service_slug": "ext-1"},
                            {"service_slug": "ext-1", "url": "https://"},  # no host
                            {"service_slug": "ext-1", "url": "ftp://x"},
                            {"service_slug": "ext-1", "url": app.url, "health": "nope"}):
                    assert (await http(gw.port, "POST", path, keys["sk"], bad))[0] == 400, bad
                create = {"service_slug": "ext-1", "url": app.url + "/echo", "usage_prompt": "echoes"}
                assert (await http(gw.port, "POST", path, keys["dk"], create))[0] == 403
                status, svc = await http(gw.port, "POST", path, keys["sk"], create)
                assert status == 201 and svc["service_type"] == "external", svc
                assert svc["service_status"] == "running" and svc["url"] == app.url + "/echo"
                assert (await http(gw.port, "POST", path, keys["sk"], create))[0] == 409
                # Proxy: the URL's path is the prefix; Host is the external one.
                raw = await raw_request(gw.port, (
                    f"GET /api/v1/r/containers/ext-1/x?q=1 HTTP/1.1\r\nHost: gw\r\n"
                    f"Authorization: Bearer {keys['sk']}\r\nConnection: close\r\n\r\n"))
                head = raw.partition(b"\r\n\r\n")[0].decode()
                assert head.startswith("HTTP/1.1 200"), head
                headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:])
                assert headers["x-echo-target"] == "/echo/x?q=1"
                assert json.loads(headers["x-echo-headers"])["host"] == f"127.0.0.1:{app.port}"
                status, out = await invoke(gw, keys["sk"], "ext-1", method="GET", path="/y")
                assert status == 200 and out["headers"]["x-echo-target"] == "/echo/y"
                # An agent declaring the external slug is ignored.
                async with serving_agent(gw, keys["ak"], "box", f"ext-1=127.0.0.1:{app.port}"):
                    status, svc = await http(gw.port, "GET", f"{path}/ext-1", keys["sk"])
                    assert svc["service_type"] == "external" and svc["instances"][0]["agent_id"] is None
                # With a health path: probed like any instance.
                status, svc = await http(gw.port, "POST", path, keys["sk"],
                                         {"service_slug": "ext-2", "url": app.url, "health": "/health"})
                assert status == 201
                await wait_status(gw, keys["sk"], "ext-2", "running", instances_healthy=1)
                await app.close()  # the target refuses connections now
                status, out = await invoke(gw, keys["sk"], "ext-1", method="GET", path="/y")
                assert status == 502 and out["error"]["code"] == "target_unreachable"
                assert (await http(gw.port, "DELETE", f"{path}/ext-1", keys["sk"]))[0] == 204
                assert (await invoke(gw, keys["sk"], "ext-1", method="GET", path="/y"))[0] == 404
            finally:
                await app.close()

    run(body)


def test_user_jwt_with_x_team_id_on_proxy_and_invoke(tmp_path) -> None:
    import time

    import jwt as pyjwt

    secret = "s" * 32

    async def body() -> None:
        async with gateway_and_team(tmp_path, jwt_key=secret) as (gw, keys):
            fast_probes(gw)
            team_id = (await gw.store.list_teams())[0].id
            other, _ = await gw.store.create_team_with_keys("team-b")
            token = pyjwt.encode({"sub": "u1", "exp": int(time.time()) + 60, "teams": [team_id, other.id]},
                                 secret, algorithm="HS256")
            app = await OpenAIServer("one").start()
            try:
                async with serving_agent(gw, keys["ak"], "box", f"svc-a=127.0.0.1:{app.port}"):
                    await wait_status(gw, keys["sk"], "svc-a", "running")
                    mine, theirs = {"X-Team-ID": team_id}, {"X-Team-ID": other.id}
                    path = "/api/v1/r/containers/svc-a/echo"
                    assert (await http(gw.port, "GET", path, token))[0] == 400  # X-Team-ID missing
                    assert (await http(gw.port, "GET", path, token, headers=mine))[0] == 200
                    assert (await http(gw.port, "GET", path, token, headers=theirs))[0] == 404
                    status, out = await http(gw.port, "POST", "/api/v1/r/invoke/svc-a", token,
                                             {"method": "GET", "path": "/echo"}, headers=mine)
                    assert status == 200 and out["status_code"] == 200
                    assert (await http(gw.port, "POST", "/api/v1/r/invoke/svc-a", token,
                                       {"method": "GET", "path": "/echo"}, headers=theirs))[0] == 404
            finally:
                await app.close()

    run(body)


def test_a_kept_proxy_connection_follows_the_service_as_it_changes(tmp_path) -> None:
    """The proxy remembers its answer for a keep-alive client's repeated request (one
    instance, an API key; shared by all connections): the same request is refused (503)
    as soon as the instance fails its probe, served again once it passes, served after
    a fleet's invalidations (the answer built again), and refused (401) once the key is
    revoked. A refusal closes the connection (the route's answer): then a new one."""

    async def body() -> None:
        async with gateway_and_team(tmp_path) as (gw, keys):
            fast_probes(gw)
            healthy = [True]

            async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                try:
                    for _ in range(10_000):
                        head = await reader.readuntil(b"\r\n\r\n")
                        ok = healthy[0] or not head.startswith(b"GET /health ")
                        writer.write(b"HTTP/1.1 %s\r\nContent-Length: 2\r\n\r\nok" % (b"200 OK" if ok else b"503 No"))
                        await writer.drain()
                except (asyncio.IncompleteReadError, ConnectionError):
                    writer.close()

            server = await asyncio.start_server(serve, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            team_id = (await gw.store.list_teams())[0].id
            cred, dk = await gw.store.create_credential(team_id, "dk")
            try:
                async with serving_agent(gw, keys["ak"], "box", f"kept=127.0.0.1:{port},health=/health"):
                    await wait_status(gw, keys["sk"], "kept", "running")
                    request = (f"GET /api/v1/r/containers/kept/x HTTP/1.1\r\nHost: t\r\n"
                               f"Authorization: Bearer {dk}\r\n\r\n").encode()
                    conn: list = []

                    async def status() -> int:
                        if not conn:
                            conn[:] = await asyncio.open_connection("127.0.0.1", gw.port)
                        reader, writer = conn
                        writer.write(request)
                        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                        await asyncio.wait_for(reader.readexactly(length), 10)
                        if b"\r\nconnection: close" in head.lower():
                            writer.close()
                            conn.clear()
                        return int(head.split(b" ")[1])

                    async def becomes(wanted: int) -> None:
                        seen = []
                        for _ in range(100):
                            seen.append(await status())
                            if seen[-1] == wanted:
                                return
                            await asyncio.sleep(0.05)
                        raise AssertionError(f"never {wanted}: {seen[-5:]}")

                    assert [await status() for _ in range(3)] == [200, 200, 200]
                    healthy[0] = False
                    await becomes(503)
                    healthy[0] = True
                    await becomes(200)
                    # Another gateway deleted and re-created things: told so, this one
                    # asks again (the row is still there: served).
                    gw.invalidate("services", {})
                    assert await status() == 200
                    gw.invalidate("credentials", {})
                    assert await status() == 200
                    assert await gw.store.revoke_credential(team_id, cred.id)
                    assert await status() == 401
            finally:
                server.close()

    run(body)
