"""``POST /api/v1/r/invoke/{slug}`` (seed 004) end to end, and seed 003's gateway-level
status codes, each produced by its real cause.

An in-process gateway and agents (real sockets on 127.0.0.1) in front of
:class:`tests.support.openai_server.OpenAIServer` instances. Every wait is bounded.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.agent import Agent
from relay.agent.services import parse_service
from relay.gateway.api.invoke import headers_json
from relay.gateway.app import Gateway
from tests.gateway.test_gateway_e2e import gateway_and_team, http, run, wait_until
from tests.support.openai_server import OpenAIServer
from tests.support.servers import free_port

pytestmark = pytest.mark.timeout(120)

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


@contextlib.asynccontextmanager
async def serving_agent(gw: Gateway, key: str, name: str, *services: str):
    """An in-process agent named ``name`` declaring ``services`` (``--service`` syntax)."""
    agent = Agent(gw.url, key, name=name, backoff_initial=0.05)
    agent.services = [parse_service(text) for text in services]
    task = asyncio.get_running_loop().create_task(agent.run())
    try:
        await wait_until(lambda: agent.agent_id is not None or task.done())
        if task.done():
            task.result()
        yield agent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def service_info(gw: Gateway, sk: str, slug: str):
    """GET the service (a coroutine giving (status, body))."""
    return http(gw.port, "GET", f"/api/v1/r/containers/{slug}", sk)


async def wait_status(gw: Gateway, sk: str, slug: str, wanted: str, **fields: Any) -> dict[str, Any]:
    """Poll the service until its status (and ``fields``) are as wanted; returns it."""
    body: dict[str, Any] = {}
    for _ in range(200):
        status, body = await service_info(gw, sk, slug)
        if status == 200 and body["service_status"] == wanted and all(body[k] == v for k, v in fields.items()):
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"{slug} never became {wanted} {fields}: {body}")


def invoke(gw: Gateway, token: str, slug: str, **body: Any):
    return http(gw.port, "POST", f"/api/v1/r/invoke/{slug}", token, body)


def fast_probes(gw: Gateway, interval: float = 0.1) -> None:
    gw.services.probe_interval = interval
    gw.services.probe_timeout = 1.0


def test_every_method_binary_body_and_hop_by_hop_headers(tmp_path) -> None:
    async def body() -> None:
        async with gateway_and_team(tmp_path) as (gw, keys):
            fast_probes(gw)
            app = await OpenAIServer("one").start()
            try:
                async with serving_agent(gw, keys["ak"], "box", f"echo=127.0.0.1:{app.port}"):
                    await wait_status(gw, keys["sk"], "echo", "running")
                    payload = bytes(range(256)) * 4
                    hop = {"Connection": "close", "Upgrade": "h2c", "TE": "trailers", "Trailer": "X-T",
                           "Transfer-Encoding": "chunked", "Host": "evil.example", "Keep-Alive": "5"}
                    for method in METHODS:
                        with_body = method in ("POST", "PUT", "PATCH")
                        req: dict[str, Any] = {"method": method, "path": "/echo/x?q=1&r=%20",
                                               "headers": {"X-Custom": "yes", "Authorization": "Bearer inner",
                                                           **hop}}
                        if with_body:
                            req["body_base64"] = base64.b64encode(payload).decode()
                        status, out = await invoke(gw, keys["dk"], "echo", **req)  # dk-: runtime use
                        assert status == 200, out
                        assert out["status_code"] == 200
                        headers = {k.lower(): v for k, v in out["headers"].items()}
                        assert headers["x-echo-method"] == method
                        assert headers["x-echo-target"] == "/echo/x?q=1&r=%20"
                        seen = json.loads(headers["x-echo-headers"])
                        assert seen["x-custom"] == "yes" and seen["authorization"] == "Bearer inner"
                        for name in ("connection", "upgrade", "te", "trailer", "transfer-encoding", "keep-alive"):
                            assert name not in seen, (method, name)
                        assert seen["host"] == f"127.0.0.1:{app.port}"
                        expected = payload if with_body else b""
                        assert base64.b64decode(out["body_base64"]) == expected, method
                    # JWT-less credential kinds: sk- works too; ak- is not an API key; none is 401.
                    assert (await invoke(gw, keys["sk"], "echo", method="GET", path="/echo"))[0] == 200
                    assert (await invoke(gw, keys["ak"], "echo", method="GET", path="/echo"))[0] == 403
                    assert (await invoke(gw, None, "echo", method="GET", path="/echo"))[0] == 401
            finally:
                await app.close()

    run(body)


def test_invoke_validation_and_size_cap(tmp_path, monkeypatch) -> None:
    async def body() -> None:
        async with gateway_and_team(tmp_path) as (gw, keys):
            fast_probes(gw)
            app = await OpenAIServer("one").start()
            try:
                async with serving_agent(gw, keys["ak"], "box", f"echo=127.0.0.1:{app.port}"):
                    await wait_status(gw, keys["sk"], "echo", "running")
                    bad = [
                        {"method": "TRACE", "path": "/echo"},
                        {"path": "/echo"},
                        {"method": "GET"},
                        {"method": "GET", "path": "echo"},
                        {"method": "GET", "path": "http://evil.example/"},
                        {"method": "GET", "path": "//evil.example/x"},
                        {"method": "GET", "path": "/\\evil.example"},
                        {"method": "GET", "path": "/a b"},
                        {"method": "GET", "path": "/" + "a" * 2048},
                        {"method": "POST", "path": "/echo", "body_base64": "not base64!"},
                        {"method": "GET", "path": "/echo", "headers": {"X-A": 1}},
                        {"method": "GET", "path": "/echo", "headers": ["x"]},
                    ]
                    for req in bad:
                        status, out = await invoke(gw, keys["sk"], "echo", **req)
                        assert status == 400, (req, out)
                        assert set(out["error"]) == {"code", "message"}
                    assert (await invoke(gw, keys["sk"], "echo", method="GET", path="/" + "a" * 2047))[0] == 200
                    monkeypatch.setattr("relay.gateway.api.invoke.MAX_RESPONSE", 1000)
                    status, out = await invoke(gw, keys["sk"], "echo", method="GET", path="/big?size=1001")
                    assert status == 502 and out["error"]["code"] == "response_too_large", out
                    status, out = await invoke(gw, keys["sk"], "echo", method="GET", path="/big?size=1000")
                    assert status == 200 and len(base64.b64decode(out["body_base64"])) == 1000
            finally:
                await app.close()

    run(body)


def test_400_404_502_503_by_their_real_causes(tmp_path) -> None:
    async def body() -> None:
        async with gateway_and_team(tmp_path) as (gw, keys):
            fast_probes(gw)
            other_team, other_keys = await gw.store.create_team_with_keys("team-b")
            app = await OpenAIServer("one").start()
            dead_port = free_port()  # nothing listens there
            try:
                async with serving_agent(gw, keys["ak"], "box", f"llm=127.0.0.1:{app.port}",
                                         f"dead=127.0.0.1:{dead_port},health=none",
                                         f"never=127.0.0.1:{dead_port}") as agent:
                    await wait_status(gw, keys["sk"], "llm", "running")
                    ok = await invoke(gw, keys["sk"], "llm", method="GET", path="/v1/models")
                    assert ok[0] == 200 and ok[1]["status_code"] == 200
                    # 404: unknown slug; and another team's slug.
                    status, out = await invoke(gw, keys["sk"], "nope", method="GET", path="/")
                    assert status == 404 and out["error"]["code"] == "service_not_found"
                    assert (await invoke(gw, other_keys["sk"], "llm", method="GET", path="/"))[0] == 404
                    assert (await service_info(gw, other_keys["sk"], "llm"))[0] == 404
                    # 502: running (no health probe), but its target refuses connections.
                    await wait_status(gw, keys["sk"], "dead", "running")
                    status, out = await invoke(gw, keys["sk"], "dead", method="GET", path="/")
                    assert status == 502 and out["error"]["code"] == "target_unreachable", out
                    assert "refused" in out["error"]["message"].lower() or "connect" in out["error"]["message"]
                    # 400: a service whose health probe never passed is failed, not running.
                    await wait_status(gw, keys["sk"], "never", "failed")
                    status, out = await invoke(gw, keys["sk"], "never", method="GET", path="/")
                    assert status == 400 and out["error"]["code"] == "service_not_running"
                    # 503: running, but its only instance turned unhealthy.
                    app.healthy = False
                    await wait_status(gw, keys["sk"], "llm", "running", instances_healthy=0)
                    status, out = await invoke(gw, keys["sk"], "llm", method="GET", path="/v1/models")
                    assert status == 503 and out["error"]["code"] == "no_healthy_instance", out
                    app.healthy = True
                    await wait_status(gw, keys["sk"], "llm", "running", instances_healthy=1)
                    agent_id = agent.agent_id
                # 503: the agent is offline (within the grace period the service stays running).
                await wait_until(lambda: not gw.registry.is_online(agent_id))
                body = await wait_status(gw, keys["sk"], "llm", "running", instances_online=0)
                assert body["instances"][0]["online"] is False
                status, out = await invoke(gw, keys["sk"], "llm", method="GET", path="/v1/models")
                assert status == 503 and out["error"]["code"] == "no_online_agent", out
                # 400: the agent is back without declaring it: stopped, record kept.
                async with serving_agent(gw, keys["ak"], "box"):
                    await wait_status(gw, keys["sk"], "llm", "stopped")
                    status, out = await invoke(gw, keys["sk"], "llm", method="GET", path="/v1/models")
                    assert status == 400 and "stopped" in out["error"]["message"], out
                    status, out = await http(gw.port, "GET", "/api/v1/r/containers/llm/v1/models", keys["sk"])
                    assert status == 400, out
            finally:
                await app.close()

    run(body)


def test_two_agents_share_a_slug_balanced_and_failover(tmp_path) -> None:
    async def body() -> None:
        async with gateway_and_team(tmp_path) as (gw, keys):
            fast_probes(gw, interval=30.0)  # only the first probe: failover must not rely on probes
            s1, s2 = await OpenAIServer("s1").start(), await OpenAIServer("s2").start()
            try:
                async with serving_agent(gw, keys["ak"], "a1", f"pool=127.0.0.1:{s1.port}"), \
                        serving_agent(gw, keys["ak"], "a2", f"pool=127.0.0.1:{s2.port}"):
                    await wait_status(gw, keys["sk"], "pool", "running", instances_healthy=2)
                    served = []
                    for _ in range(6):
                        status, out = await invoke(gw, keys["sk"], "pool", method="GET", path="/echo")
                        assert status == 200
                        served.append({k.lower(): v for k, v in out["headers"].items()}["x-served-by"])
                    assert served.count("s1") == 3 and served.count("s2") == 3, served
                    # Transparent proxy, one connection per request: balanced as well.
                    proxied = set()
                    for _ in range(4):
                        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                        writer.write(f"GET /api/v1/r/containers/pool/echo HTTP/1.1\r\nHost: x\r\n"
                                     f"Authorization: Bearer {keys['sk']}\r\nConnection: close\r\n\r\n".encode())
                        raw = await asyncio.wait_for(reader.read(), 10)
                        writer.close()
                        assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
                        proxied.add(raw.split(b"x-served-by: ")[1].split(b"\r\n")[0].decode())
                    assert proxied == {"s1", "s2"}
                    # s1's target goes down: every request still succeeds, through s2.
                    await s1.close()
                    for _ in range(6):
                        status, out = await invoke(gw, keys["sk"], "pool", method="GET", path="/echo")
                        assert status == 200, out
                        assert {k.lower(): v for k, v in out["headers"].items()}["x-served-by"] == "s2"
                    body = (await service_info(gw, keys["sk"], "pool"))[1]
                    assert body["instances_healthy"] == 1  # the failing one is out of rotation
            finally:
                await s1.close()
                await s2.close()

    run(body)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=12), st.text(max_size=40), max_size=8))
def test_headers_json_is_what_json_dumps_writes(headers: dict[str, str]) -> None:
    """invoke's ``headers`` object, written by hand, is byte for byte json.dumps's
    (non-ASCII, quotes, backslashes and control characters escaped the same way)."""
    assert headers_json(headers) == json.dumps(headers)
    assert json.loads(headers_json(headers)) == headers
