"""Gateway and agent end to end: API, auth, agent WebSocket, raw TCP tunnels via hub ports.

Most tests run an in-process gateway and agent on one uvloop loop (real sockets on
127.0.0.1); ``test_cli_processes_*`` runs ``python -m relay gateway`` and ``python -m
relay agent`` as subprocesses. Real clients: OpenSSH (ssh, scp) against the private sshd
fixture. Every wait is bounded.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import pytest
import uvloop

from relay.agent import Agent, AgentAuthError
from relay.gateway.app import Gateway
from relay.gateway.store import open_store
from tests.support.servers import free_port

pytestmark = pytest.mark.timeout(180)


# ----------------------------------------------------------------------------- helpers


def run(fn, timeout: float = 60.0) -> Any:
    """Run an async test body on uvloop (the loop the CLI uses), bounded in time."""

    async def bounded():
        async with asyncio.timeout(timeout):
            return await fn()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(bounded())


def make_team(data_dir: Path, name: str, store_url: Optional[str] = None) -> dict[str, str]:
    """Create team ``name`` in the store of ``data_dir`` (or ``store_url``) from code that
    is not a coroutine (before a gateway process starts); its keys by kind."""

    async def create() -> dict[str, str]:
        store = await open_store(store_url, data_dir, listen=False)
        try:
            created = await store.create_team_with_keys(name)
        finally:
            await store.close()
        assert created is not None
        return {kind: str(key) for kind, key in created[1].items()}

    return asyncio.run(create())


def store_call(data_dir: Path, call: Any, store_url: Optional[str] = None) -> Any:
    """``await call(store)`` on the store of ``data_dir`` (or ``store_url``), opened for
    this call only, from code that is not a coroutine."""

    async def once() -> Any:
        store = await open_store(store_url, data_dir, listen=False)
        try:
            return await call(store)
        finally:
            await store.close()

    return asyncio.run(once())


async def http(port: int, method: str, path: str, token: Optional[str] = None,
               body: Any = None, headers: Optional[dict[str, str]] = None,
               ssl_context: Any = None) -> tuple[int, Any]:
    """One HTTP/1.1 request to 127.0.0.1:port; returns (status, parsed JSON body or None)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_context)
    data = b"" if body is None else json.dumps(body).encode()
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close",
             f"Content-Length: {len(data)}"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
    async with asyncio.timeout(10):
        raw = await reader.read()
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(payload) if payload else None


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll ``predicate()`` (a value, or an awaitable of one: a coroutine function works
    too) until it is true."""
    deadline = time.monotonic() + timeout
    while not await _truth(predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(interval)


async def run_cmd(*argv: str, timeout: float = 60.0) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out, err


async def _truth(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


@contextlib.asynccontextmanager
async def gateway_and_team(tmp_path: Path, store_url: Optional[str] = None, **kwargs: Any):
    """An in-process gateway with one team; yields (gateway, keys). Its egress may reach
    private addresses (the tests' targets are on 127.0.0.1) unless the caller passes
    ``allow_private_egress=False``. The state is SQLite in ``tmp_path``, or the store
    ``store_url`` names (a PostgreSQL database of tests/support/store_fixtures.py)."""
    store = await open_store(store_url, tmp_path / "data")
    _, keys = await store.create_team_with_keys("team-a")
    kwargs.setdefault("allow_private_egress", True)
    gw = Gateway(store, **kwargs)
    await gw.start("127.0.0.1", 0)
    try:
        yield gw, keys
    finally:
        await gw.close()
        await store.close()


async def first_team_id(gw: Gateway) -> str:
    """The id of the gateway's oldest team (gateway_and_team's own)."""
    return (await gw.store.list_teams())[0].id


@contextlib.asynccontextmanager
async def running_agent(gw: Gateway, key: str, agent_class: type = Agent, **kwargs: Any):
    """An in-process agent (``agent_class``) connected to ``gw``; yields it once registered."""
    agent = agent_class(gw.url, key, backoff_initial=0.05, **kwargs)
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
        agent.close()


# ----------------------------------------------------------------------------- units


def test_agent_allowlist_and_backoff():
    async def main():
        loopback = Agent("http://127.0.0.1:1", "ak-x")
        assert loopback.is_allowed("127.0.0.1", 22) and loopback.is_allowed("LOCALHOST", 5432)
        assert loopback.is_allowed("::1", 6379)
        assert not loopback.is_allowed("10.0.0.1", 22)
        listed = Agent("http://127.0.0.1:1", "ak-x", allow=["127.0.0.1:22", "[::1]:80", "db.lan:5432"])
        assert listed.is_allowed("127.0.0.1", 22) and listed.is_allowed("db.lan", 5432)
        assert listed.is_allowed("::1", 80)
        assert not listed.is_allowed("127.0.0.1", 23)
        assert "ak-x" not in repr(listed)
        delays = [listed.backoff_delay(i) for i in range(12)]
        assert 0.4 <= delays[0] <= 0.6
        assert 0.8 <= delays[1] <= 1.2
        assert all(24 <= d <= 36 for d in delays[8:])
        assert Agent("https://gw.example.com", "ak-x").gateway_url == \
            "https://gw.example.com/api/v1/agent/connect"

    run(main)


# ----------------------------------------------------------------------------- API and auth


def test_healthz_and_agents_api_auth(tmp_path, store_url):
    async def main():
        async with gateway_and_team(tmp_path, store_url) as (gw, keys):
            status, body = await http(gw.port, "GET", "/healthz")
            assert status == 200 and body["status"] == "ok"
            assert (await http(gw.port, "GET", "/api/v1/agents"))[0] == 401
            status, body = await http(gw.port, "GET", "/api/v1/agents", "sk-wrong")
            assert status == 401 and body["error"]["code"] == "invalid_credentials"
            assert (await http(gw.port, "GET", "/api/v1/agents", keys["ak"]))[0] == 403
            status, body = await http(gw.port, "GET", "/api/v1/agents", keys["dk"])
            assert status == 200 and body == {"agents": []}
            status, body = await http(gw.port, "GET", "/nowhere")
            assert status == 404 and body["error"]["code"] == "not_found"
            assert (await http(gw.port, "POST", "/healthz"))[0] == 405
            status, spec = await http(gw.port, "GET", "/api/v1/openapi.json")
            assert status == 200 and spec["openapi"].startswith("3.")
            assert "/agents/{agentId}/tunnel" in spec["paths"]

            async with running_agent(gw, keys["ak"], name="box", labels=["gpu"]) as agent:
                status, body = await http(gw.port, "GET", "/api/v1/agents", keys["sk"])
                assert status == 200
                [listed] = body["agents"]
                assert listed["agent_id"] == agent.agent_id
                assert listed["name"] == "box" and listed["labels"] == ["gpu"]
                assert listed["status"] == "idle" and listed["online"] is True
                assert "gateways" not in listed  # a fleet's field (docs/FLEET.md)
                status, body = await http(gw.port, "GET", f"/api/v1/agents/{agent.agent_id}", keys["sk"])
                assert status == 200 and body["agent_id"] == agent.agent_id and body["tunnels"] == []
                agent_id = agent.agent_id
            await wait_until(lambda: not gw.registry.is_online(agent_id))
            status, body = await http(gw.port, "GET", f"/api/v1/agents/{agent_id}", keys["sk"])
            assert status == 200 and body["status"] == "offline" and body["online"] is False

    run(main)


def test_agent_endpoint_rejects_missing_and_wrong_keys(tmp_path):
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys):
            upgrade = {"Upgrade": "websocket", "Connection": "Upgrade",
                       "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}
            status, body = await http(gw.port, "GET", "/api/v1/agent/connect", headers=upgrade)
            assert status == 401 and body["error"]["code"] == "missing_credentials"
            status, body = await http(gw.port, "GET", "/api/v1/agent/connect", "ak-wrong", headers=upgrade)
            assert status == 401 and body["error"]["code"] == "invalid_credentials"
            status, body = await http(gw.port, "GET", "/api/v1/agent/connect", keys["sk"], headers=upgrade)
            assert status == 403
            # A valid key but no upgrade: a JSON 400, not a hang.
            status, body = await http(gw.port, "GET", "/api/v1/agent/connect", keys["ak"])
            assert status == 400 and "error" in body
            with pytest.raises(AgentAuthError, match="401"):
                await Agent(gw.url, "ak-wrong").run()
            assert gw.registry.connected() == []

    run(main)


def test_other_teams_agent_is_404_and_tunnel_validation(tmp_path, store_url):
    async def main():
        async with gateway_and_team(tmp_path, store_url) as (gw, keys):
            _, other = await gw.store.create_team_with_keys("team-b")
            async with running_agent(gw, keys["ak"], name="a") as agent:
                base = f"/api/v1/agents/{agent.agent_id}"
                assert (await http(gw.port, "GET", base, other["sk"]))[0] == 404
                assert (await http(gw.port, "POST", base + "/tunnel", other["sk"], {}))[0] == 404
                assert (await http(gw.port, "DELETE", base + "/tunnel", other["sk"]))[0] == 404
                status, body = await http(gw.port, "GET", "/api/v1/agents", other["sk"])
                assert status == 200 and body == {"agents": []}
                for bad in ({"target_port": 0}, {"target_port": 65536}, {"target_port": "22"},
                            {"target_port": True}, {"tunnel_protocol": "quic"}):
                    status, body = await http(gw.port, "POST", base + "/tunnel", keys["sk"], bad)
                    assert status == 400, bad
                    assert set(body["error"]) == {"code", "message"}
                status, body = await http(gw.port, "POST", base + "/tunnel", keys["sk"], [1])
                assert status == 400
                # The defaults and the exact seed 000 response for http (with the session's
                # lifetime: relay.gateway.agents.session_lifetime).
                status, body = await http(gw.port, "POST", base + "/tunnel", keys["sk"], {})
                assert status == 200
                assert set(body) == {"session_id", "tunnel_url", "admin_token", "tunnel_protocol",
                                     "expires_at", "idle_timeout"}
                assert body["tunnel_protocol"] == "http"
                assert body["tunnel_url"].startswith(gw.url + "/tunnel/") and body["tunnel_url"].endswith("/")
                [row] = await gw.store.list_tunnel_sessions(await first_team_id(gw))
                assert row.target_port == 8188 and row.session_id == body["session_id"]
                status, info = await http(gw.port, "GET", base, keys["sk"])
                assert info["status"] == "tunnel" and len(info["tunnels"]) == 1
                status, closed = await http(gw.port, "DELETE", base + "/tunnel?session_id=nope", keys["sk"])
                assert status == 404
                status, closed = await http(gw.port, "DELETE", base + "/tunnel", keys["sk"])
                assert status == 200 and closed == {"closed": [body["session_id"]]}
                status, info = await http(gw.port, "GET", base, keys["sk"])
                assert info["status"] == "idle" and info["tunnels"] == []
                agent_id = agent.agent_id
            await wait_until(lambda: not gw.registry.is_online(agent_id))
            status, body = await http(gw.port, "POST", f"/api/v1/agents/{agent_id}/tunnel", keys["sk"],
                                      {"tunnel_protocol": "tcp", "target_port": 22})
            assert status == 409 and body["error"]["code"] == "agent_offline"

    run(main)


def test_bad_http_and_a_burst_of_bad_agents_leave_nothing_behind(tmp_path):
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys):
            # Malformed request line -> 400 JSON, connection closed.
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            async with asyncio.timeout(5):
                raw = await reader.read()
            assert raw.startswith(b"HTTP/1.1 400") and b'"error"' in raw
            writer.close()
            # Oversized body -> 413.
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            size = 2 * 1024 * 1024
            writer.write(f"POST /api/v1/agents/x/tunnel HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
            with contextlib.suppress(ConnectionError):
                writer.write(b"{" * size)
                await writer.drain()
            async with asyncio.timeout(5):
                raw = await reader.read()
            assert raw.startswith(b"HTTP/1.1 413")
            writer.close()
            # Keep-alive: several requests on one connection, answered in order.
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
            async with asyncio.timeout(5):
                for _ in range(3):
                    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
                    head = await reader.readuntil(b"}")
                    assert b"ok" in head
            writer.close()

            # 100 agents with a wrong key at once: all refused with 401, nothing registered.
            async def bad_agent():
                with pytest.raises(AgentAuthError):
                    await Agent(gw.url, "ak-wrong").connect()

            await asyncio.gather(*(bad_agent() for _ in range(100)))
            assert gw.registry.connected() == []
            await wait_until(lambda: not gw._connections)
            status, body = await http(gw.port, "GET", "/healthz")
            assert status == 200 and body["agents_online"] == 0

    run(main)


def test_tunnels_close_when_the_agent_is_gone_for_good(tmp_path, store_url):
    async def main():
        async with gateway_and_team(tmp_path, store_url, agent_gone_grace=0.3) as (gw, keys):
            async with running_agent(gw, keys["ak"], name="brief") as agent:
                tunnel = await open_tcp_tunnel(gw, keys["sk"], agent.agent_id, 22)
                agent_id = agent.agent_id
            team_id = await first_team_id(gw)
            assert await gw.store.list_tunnel_sessions(team_id, agent_id)  # kept during the grace

            async def closed() -> bool:
                return not await gw.store.list_tunnel_sessions(team_id, agent_id)

            await wait_until(closed, timeout=5)
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", tunnel["hub_port"])

    run(main)


def test_agent_controls_and_streams_towards_the_gateway(tmp_path, store_url):
    from relay.aio import StreamRefused

    async def main():
        async with gateway_and_team(tmp_path, store_url) as (gw, keys), echo_server() as echo_port:
            async with running_agent(gw, keys["ak"], name="chatty") as agent:
                path = f"/api/v1/agents/{agent.agent_id}"
                agent.report_status("busy")
                async def busy() -> bool:
                    return (await gw.store.get_agent(await first_team_id(gw), agent.agent_id)).status == "busy"

                await wait_until(busy)
                assert (await http(gw.port, "GET", path, keys["sk"]))[1]["status"] == "busy"
                # Many control messages: handled, never queued until the session stalls.
                for _ in range(1000):
                    agent.session.send_control({"type": "noise"})
                agent.report_status("idle")
                with pytest.raises(StreamRefused):
                    await agent.session.open_stream({"target": "x:1"})
                tunnel = await open_tcp_tunnel(gw, keys["sk"], agent.agent_id, echo_port)
                assert (await http(gw.port, "GET", path, keys["sk"]))[1]["status"] == "tunnel"
                reader, writer = await asyncio.open_connection("127.0.0.1", tunnel["hub_port"])
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                writer.close()

    run(main)


def test_user_jwt_needs_x_team_id(tmp_path):
    import jwt as pyjwt

    secret = "s" * 32

    async def main():
        async with gateway_and_team(tmp_path, jwt_key=secret) as (gw, keys):
            team_id = await first_team_id(gw)
            token = pyjwt.encode({"sub": "u1", "exp": int(time.time()) + 60, "teams": [team_id]},
                                 secret, algorithm="HS256")
            status, body = await http(gw.port, "GET", "/api/v1/agents", token)
            assert status == 400 and body["error"]["code"] == "missing_team_id"
            status, body = await http(gw.port, "GET", "/api/v1/agents", token, headers={"X-Team-ID": team_id})
            assert status == 200 and body == {"agents": []}
            # Credential callers: any X-Team-ID is ignored.
            status, _ = await http(gw.port, "GET", "/api/v1/agents", keys["sk"], headers={"X-Team-ID": "junk"})
            assert status == 200

    run(main)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA), and its key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_gateway_and_agent(tmp_path, sshd_server):
    import ssl

    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def main():
        async with gateway_and_team(tmp_path, ssl_context=server_ctx) as (gw, keys):
            assert gw.url.startswith("https://")
            status, _ = await http(gw.port, "GET", "/healthz", ssl_context=client_ctx)
            assert status == 200
            # An agent that does not trust the certificate cannot connect.
            with pytest.raises(ssl.SSLError):
                await Agent(gw.url, keys["ak"]).connect()
            async with running_agent(gw, keys["ak"], name="tls", ssl_context=client_ctx) as agent:
                status, tunnel = await http(gw.port, "POST", f"/api/v1/agents/{agent.agent_id}/tunnel",
                                            keys["sk"], {"target_port": sshd_server.port, "tunnel_protocol": "tcp"},
                                            ssl_context=client_ctx)
                assert status == 200 and tunnel["tunnel_url"].startswith("wss://")
                code, out, err = await run_cmd(*sshd_server.ssh_args(tunnel["hub_port"]), "echo ok")
                assert code == 0 and out.strip() == b"ok", err
                # relay connect over wss://, trusting the test CA.
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "relay", "connect", tunnel["tunnel_url"], "--ca-cert", str(cert),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
                try:
                    async with asyncio.timeout(15):
                        line = (await proc.stdout.readline()).decode()
                    port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
                    code, out, err = await run_cmd(*sshd_server.ssh_args(port), "echo ok")
                    assert code == 0 and out.strip() == b"ok", err
                finally:
                    if proc.returncode is None:
                        proc.terminate()
                    async with asyncio.timeout(10):
                        await proc.wait()

    run(main)


# ----------------------------------------------------------------------------- TCP tunnels


async def open_tcp_tunnel(gw: Gateway, token: str, agent_id: str, port: int) -> dict[str, Any]:
    status, body = await http(gw.port, "POST", f"/api/v1/agents/{agent_id}/tunnel", token,
                              {"target_port": port, "tunnel_protocol": "tcp"})
    assert status == 200, body
    assert body["tunnel_protocol"] == "tcp"
    assert re.fullmatch(r"ws://127\.0\.0\.1:\d+/tunnel/[\w-]+/tcp", body["tunnel_url"])
    return body


def test_ssh_and_scp_through_hub_port(tmp_path, sshd_server):
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys):
            async with running_agent(gw, keys["ak"], name="ssh-box") as agent:
                tunnel = await open_tcp_tunnel(gw, keys["sk"], agent.agent_id, sshd_server.port)
                hub = tunnel["hub_port"]
                code, out, err = await run_cmd(*sshd_server.ssh_args(hub), "echo ok")
                assert code == 0, err
                assert out.strip() == b"ok"

                src = tmp_path / "blob.bin"
                src.write_bytes(os.urandom(20 * 1024 * 1024))
                dst = tmp_path / "copy.bin"
                code, _, err = await run_cmd(*sshd_server.scp_args(hub), str(src),
                                             sshd_server.remote(dst), timeout=120)
                assert code == 0, err
                assert hashlib.sha256(dst.read_bytes()).hexdigest() == \
                    hashlib.sha256(src.read_bytes()).hexdigest()

                # Closing the tunnel closes the hub port.
                status, _ = await http(gw.port, "DELETE",
                                       f"/api/v1/agents/{agent.agent_id}/tunnel?session_id={tunnel['session_id']}",
                                       keys["sk"])
                assert status == 200
                with pytest.raises(OSError):
                    await asyncio.open_connection("127.0.0.1", hub)

    run(main, timeout=150)


def test_psql_pgbench_and_redis_benchmark_through_hub_ports(tmp_path, postgres_server, redis_server):
    """Many concurrent streams through one agent: psql, pgbench -c 16 -T 10 and
    redis-benchmark -c 50 -n 100000 (SET and GET; the full default suite of twenty
    commands would add minutes per run without exercising the tunnel differently)."""

    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys):
            async with running_agent(gw, keys["ak"], name="db") as agent:
                pg = await open_tcp_tunnel(gw, keys["sk"], agent.agent_id, postgres_server.port)
                env = postgres_server.env(pg["hub_port"])
                proc = await asyncio.create_subprocess_exec(
                    postgres_server.tool("psql"), "-XAtc", "select 40 + 2", env=env,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                out, err = await proc.communicate()
                assert proc.returncode == 0 and out.strip() == b"42", err
                for argv in (["-i", "-q", "-s", "1"], ["-c", "16", "-j", "2", "-T", "10", "-n"]):
                    proc = await asyncio.create_subprocess_exec(
                        postgres_server.tool("pgbench"), *argv, env=env,
                        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                    async with asyncio.timeout(90):
                        out, err = await proc.communicate()
                    assert proc.returncode == 0, err.decode()[-2000:]
                assert b"number of failed transactions: 0" in out, out

                rd = await open_tcp_tunnel(gw, keys["sk"], agent.agent_id, redis_server.port)
                code, out, err = await run_cmd("redis-benchmark", "-h", "127.0.0.1", "-p", str(rd["hub_port"]),
                                               "-c", "50", "-n", "100000", "-t", "set,get", "-q",
                                               timeout=180)
                assert code == 0, err
                assert out.count(b"requests per second") == 2, out

    run(main, timeout=300)


def test_target_not_on_allowlist_is_refused(tmp_path, sshd_server, caplog):
    caplog.set_level(logging.WARNING, logger="relay")

    class OwnRules(Agent):
        """Decides by its own rules, so its hello reports no allowlist and the gateway
        cannot refuse the tunnel up front: every connection is refused by the agent."""

        def is_allowed(self, host: str, port: int) -> bool:
            return port == 1

    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys):
            # A stock agent reports its allowlist: the tunnel is refused when it opens.
            async with running_agent(gw, keys["ak"], name="stock", allow=["127.0.0.1:1"]) as agent:
                status, body = await http(gw.port, "POST", f"/api/v1/agents/{agent.agent_id}/tunnel", keys["sk"],
                                          {"target_port": sshd_server.port, "tunnel_protocol": "tcp"})
                assert status == 403 and body["error"]["code"] == "target_not_allowed", body
            async with running_agent(gw, keys["ak"], OwnRules, name="strict") as agent:
                tunnel = await open_tcp_tunnel(gw, keys["sk"], agent.agent_id, sshd_server.port)
                started = time.monotonic()
                reader, writer = await asyncio.open_connection("127.0.0.1", tunnel["hub_port"])
                with contextlib.suppress(ConnectionError):
                    async with asyncio.timeout(5):
                        assert await reader.read() == b""  # closed: no sshd banner
                writer.close()
                assert time.monotonic() - started < 5
                await wait_until(lambda: "NOT_ALLOWED" in caplog.text)
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                async with asyncio.timeout(5):
                    metrics = (await reader.read()).decode()
                writer.close()
                assert 'relay_tunnel_streams_refused_total{code="NOT_ALLOWED"} 1.0' in metrics
                assert "relay_agents_online 1.0" in metrics
                status, info = await http(gw.port, "GET", f"/api/v1/agents/{agent.agent_id}", keys["sk"])
                [session] = info["tunnels"]
                assert session["last_error"].startswith("NOT_ALLOWED")
                assert f"127.0.0.1:{sshd_server.port}" in session["last_error"]

    run(main)


@contextlib.asynccontextmanager
async def echo_server():
    """A TCP echo server on 127.0.0.1; yields its port."""

    async def echo(reader, writer):
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def ws_connect(url: str, headers=()) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Any, list]:
    """A minimal WebSocket client: returns reader, writer, a frame parser and the
    messages that arrived with the 101."""
    from relay.ws import FrameParser
    from relay.ws.handshake import ClientHandshake

    hostport, _, path = url.removeprefix("ws://").partition("/")
    host, _, port = hostport.partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    handshake = ClientHandshake(hostport, "/" + path, extra_headers=list(headers))
    writer.write(handshake.request_bytes())
    accepted = None
    while accepted is None:
        accepted = handshake.receive_data(await reader.read(65536))
    parser = FrameParser(64 * 1024 * 1024, False)
    return reader, writer, parser, parser.feed(accepted.leftover)


def test_tcp_over_websocket_tunnel_url(tmp_path, sshd_server):
    from relay.ws import Opcode, encode_frame
    from relay.ws.handshake import HandshakeRejected

    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), echo_server() as echo_port:
            async with running_agent(gw, keys["ak"], name="ws") as agent:
                # An SSH banner arrives through the tunnel_url of a tunnel to sshd.
                ssh_tunnel = await open_tcp_tunnel(gw, keys["sk"], agent.agent_id, sshd_server.port)
                reader, writer, parser, messages = await ws_connect(ssh_tunnel["tunnel_url"])
                while not messages:
                    messages = parser.feed(await reader.read(65536))
                assert messages[0][0] == Opcode.BINARY and messages[0][1].startswith(b"SSH-2.0")
                writer.close()

                # 4 MiB both ways through an echo target, in 64 KiB messages.
                tunnel = await open_tcp_tunnel(gw, keys["sk"], agent.agent_id, echo_port)
                reader, writer, parser, messages = await ws_connect(tunnel["tunnel_url"])
                payload = os.urandom(4 * 1024 * 1024)
                received = bytearray(b"".join(p for op, p in messages if op == Opcode.BINARY))

                async def send():
                    for i in range(0, len(payload), 65536):
                        writer.write(encode_frame(Opcode.BINARY, payload[i:i + 65536], mask=True))
                        await writer.drain()

                sender = asyncio.get_running_loop().create_task(send())
                while len(received) < len(payload):
                    data = await reader.read(1 << 20)
                    assert data, "connection closed early"
                    for op, p in parser.feed(data):
                        assert op == Opcode.BINARY
                        received += p
                await sender
                assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
                # Client close -> the stream ends -> the echo target ends -> close echoed.
                writer.write(encode_frame(Opcode.CLOSE, b"\x03\xe8", mask=True))
                closes = []
                while not closes:
                    data = await reader.read(65536)
                    if not data:
                        break
                    closes = [m for m in parser.feed(data) if m[0] == Opcode.CLOSE]
                writer.close()

                base = tunnel["tunnel_url"].rsplit("/", 2)[0]
                for bad in (base + "/nope/tcp", ssh_tunnel["tunnel_url"].replace("/tcp", "/x")):
                    with pytest.raises(HandshakeRejected) as info:
                        await ws_connect(bad)
                    assert info.value.status_code == 404
                status, http_tunnel = await http(gw.port, "POST", f"/api/v1/agents/{agent.agent_id}/tunnel",
                                                 keys["sk"], {"target_port": echo_port})
                token = http_tunnel["tunnel_url"].rstrip("/").rsplit("/", 1)[1]
                # An http tunnel's /tcp is its own path, not the relay: the upgrade goes to its
                # target, here the raw echo server, which does not answer HTTP (502).
                with pytest.raises(HandshakeRejected) as info:
                    await ws_connect(f"{base}/{token}/tcp")
                assert info.value.status_code == 502 and "bad_upstream_response" in str(info.value)

    run(main)


def test_relay_connect_carries_ssh_and_scp(tmp_path, sshd_server):
    """``relay connect TUNNEL_URL --listen``: each local connection is one WebSocket."""

    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys):
            async with running_agent(gw, keys["ak"], name="c") as agent:
                tunnel = await open_tcp_tunnel(gw, keys["sk"], agent.agent_id, sshd_server.port)
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "relay", "connect", tunnel["tunnel_url"], "--listen", "127.0.0.1:0",
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
                try:
                    async with asyncio.timeout(15):
                        line = (await proc.stdout.readline()).decode()
                    assert "listening on" in line and tunnel["tunnel_url"] not in line  # no token shown
                    port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
                    code, out, err = await run_cmd(*sshd_server.ssh_args(port), "echo ok")
                    assert code == 0 and out.strip() == b"ok", err
                    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
                    src.write_bytes(os.urandom(8 * 1024 * 1024))
                    code, _, err = await run_cmd(*sshd_server.scp_args(port), str(src), sshd_server.remote(dst))
                    assert code == 0, err
                    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
                finally:
                    if proc.returncode is None:
                        proc.terminate()
                    async with asyncio.timeout(10):
                        await proc.wait()

    run(main)


def test_agent_drop_mid_transfer_closes_clients_and_garbage_kills_only_that_agent(tmp_path):
    from relay.ws import Opcode, encode_frame

    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), echo_server() as echo_port:
            async with running_agent(gw, keys["ak"], name="victim") as victim, \
                    running_agent(gw, keys["ak"], name="bystander") as bystander:
                tunnel = await open_tcp_tunnel(gw, keys["sk"], victim.agent_id, echo_port)
                reader, writer = await asyncio.open_connection("127.0.0.1", tunnel["hub_port"])
                writer.write(b"x" * 65536)
                assert len(await reader.readexactly(65536)) == 65536
                writer.write(b"y" * (1 << 20))
                victim.close()  # the agent's connection drops mid-transfer
                started = time.monotonic()
                with contextlib.suppress(ConnectionError):
                    async with asyncio.timeout(5):
                        while await reader.read(65536):
                            pass
                assert time.monotonic() - started < 5
                writer.close()

                # Garbage from an agent (valid key, valid WebSocket, not mux frames):
                # that connection is closed; the other agent keeps working.
                reader, writer, parser, _ = await ws_connect(
                    gw.url.replace("http://", "ws://") + "/api/v1/agent/connect",
                    [("Authorization", f"Bearer {keys['ak']}")])
                writer.write(encode_frame(Opcode.BINARY, b"\xff" * 64, mask=True))
                async with asyncio.timeout(5):
                    while await reader.read(65536):
                        pass
                writer.close()
                tunnel = await open_tcp_tunnel(gw, keys["sk"], bystander.agent_id, echo_port)
                reader, writer = await asyncio.open_connection("127.0.0.1", tunnel["hub_port"])
                writer.write(b"still here")
                assert await reader.readexactly(10) == b"still here"
                writer.close()

    run(main)


# ----------------------------------------------------------------------------- real processes


def _api(port: int, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _wait(predicate, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def _spawn(*args: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "relay", *args], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _online_agent(port: int, sk: str) -> Optional[str]:
    status, body = _api(port, "GET", "/api/v1/agents", sk)
    online = [a for a in body["agents"] if a["online"]] if status == 200 else []
    return online[0]["agent_id"] if online else None


def _ssh_echo(sshd_server, port: int) -> None:
    done = subprocess.run([*sshd_server.ssh_args(port), "echo ok"], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == b"ok"


def test_cli_processes_agent_restart_and_gateway_restart(tmp_path, sshd_server):
    """relay gateway + relay agent as processes: tunnel, kill -9 the agent, restart it,
    a new tunnel works; restart the gateway: the agent comes back by itself."""
    data = tmp_path / "data"
    port = free_port()
    gw_log, agent_log = tmp_path / "gateway.log", tmp_path / "agent.log"
    procs: list[subprocess.Popen] = []
    try:
        gw = _spawn("gateway", "--listen", f"127.0.0.1:{port}", "--data", str(data), log=gw_log)
        procs.append(gw)
        _wait(lambda: b"listening on" in gw_log.read_bytes())
        keys = dict(re.findall(r"^  (sk|dk|ak)  (\S+)$", gw_log.read_text(), re.M))
        assert set(keys) == {"sk", "dk", "ak"}

        def start_agent() -> subprocess.Popen:
            proc = _spawn("agent", "--gateway", f"http://127.0.0.1:{port}", "--name", "proc-agent",
                          "--label", "ssh", log=agent_log)
            procs.append(proc)
            return proc

        # The key goes through the environment, as the help text recommends.
        os.environ["RELAY_AGENT_KEY"] = keys["ak"]
        try:
            agent = start_agent()
        finally:
            del os.environ["RELAY_AGENT_KEY"]
        agent_id = _wait(lambda: _online_agent(port, keys["sk"]))
        status, tunnel = _api(port, "POST", f"/api/v1/agents/{agent_id}/tunnel", keys["sk"],
                              {"target_port": sshd_server.port, "tunnel_protocol": "tcp"})
        assert status == 200, tunnel
        _ssh_echo(sshd_server, tunnel["hub_port"])

        _stop(agent, signal.SIGKILL)
        _wait(lambda: _online_agent(port, keys["sk"]) is None)
        status, body = _api(port, "POST", f"/api/v1/agents/{agent_id}/tunnel", keys["sk"],
                            {"target_port": sshd_server.port, "tunnel_protocol": "tcp"})
        assert status == 409, body
        os.environ["RELAY_AGENT_KEY"] = keys["ak"]
        try:
            agent = start_agent()
        finally:
            del os.environ["RELAY_AGENT_KEY"]
        assert _wait(lambda: _online_agent(port, keys["sk"])) == agent_id  # same identity
        status, tunnel2 = _api(port, "POST", f"/api/v1/agents/{agent_id}/tunnel", keys["sk"],
                               {"target_port": sshd_server.port, "tunnel_protocol": "tcp"})
        assert status == 200, tunnel2
        _ssh_echo(sshd_server, tunnel2["hub_port"])
        _ssh_echo(sshd_server, tunnel["hub_port"])  # the first hub port outlives the reconnect

        # Gateway restart: no new keys printed, the agent reconnects by itself, and the
        # open tcp tunnel's hub port is back.
        _stop(gw)
        gw_log.write_bytes(b"")
        gw = _spawn("gateway", "--listen", f"127.0.0.1:{port}", "--data", str(data), log=gw_log)
        procs.append(gw)
        _wait(lambda: b"listening on" in gw_log.read_bytes())
        assert keys["sk"] not in gw_log.read_text()
        assert _wait(lambda: _online_agent(port, keys["sk"]), timeout=20) == agent_id
        _ssh_echo(sshd_server, tunnel2["hub_port"])
        assert keys["ak"] not in agent_log.read_text()  # the key is never logged
    finally:
        for proc in reversed(procs):
            _stop(proc)


def test_cli_errors_are_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "relay", "agent", "--gateway", "http://127.0.0.1:1",
                           "--key", "sk-nope"], capture_output=True, timeout=30)
    assert done.returncode != 0 and b"ak-" in done.stderr
    make_team(tmp_path / "d", "t")
    gw = _spawn("gateway", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "d"),
                log=tmp_path / "gw.log")
    try:
        _wait(lambda: b"listening on" in (tmp_path / "gw.log").read_bytes())
        log_text = (tmp_path / "gw.log").read_text()
        port = int(re.search(r"listening on http://127\.0\.0\.1:(\d+)", log_text).group(1))
        assert "Its keys" not in log_text  # a team existed: no default team, no keys printed
        done = subprocess.run([sys.executable, "-m", "relay", "agent", "--gateway", f"http://127.0.0.1:{port}",
                               "--key", "ak-wrong"], capture_output=True, timeout=30)
        assert done.returncode == 1
        last = done.stderr.decode().strip().splitlines()[-1]
        assert last.startswith("Error: the gateway rejected the agent key") and "401" in last
        assert "ak-wrong" not in done.stderr.decode()
        # A second gateway on the same address: one clear line, non-zero exit.
        done = subprocess.run([sys.executable, "-m", "relay", "gateway", "--listen", f"127.0.0.1:{port}",
                               "--data", str(tmp_path / "d")], capture_output=True, timeout=30)
        assert done.returncode == 1
        assert done.stderr.decode().strip().splitlines()[-1].startswith("Error: cannot listen on")
    finally:
        _stop(gw)


def test_hub_port_connections_cap_their_unsent_bytes(tmp_path):
    """Every connection accepted on a hub port keeps little unsent data in the kernel
    (TCP_NOTSENT_LOWAT, as every spliced socket): on Linux set once on the hub's
    listener and inherited by what it accepts, not set again per connection."""
    import socket

    from relay.aio.stream import _TCP_NOTSENT_LOWAT, UNSENT_LIMIT

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def main():
        target = await asyncio.start_server(echo, "127.0.0.1", 0)
        async with target, gateway_and_team(tmp_path) as (gw, keys):
            async with running_agent(gw, keys["ak"]) as agent:
                tunnel = await open_tcp_tunnel(gw, keys["sk"], agent.agent_id, target.sockets[0].getsockname()[1])
                [hub] = gw.tunnels.hubs()
                assert hub.unsent_limited is (sys.platform == "linux")
                reader, writer = await asyncio.open_connection("127.0.0.1", tunnel["hub_port"])
                writer.write(b"ping")
                async with asyncio.timeout(5):
                    assert await reader.readexactly(4) == b"ping"
                [splice] = hub.splices
                assert splice.unsent_limited is hub.unsent_limited
                sock = splice.transport.get_extra_info("socket")
                assert sock.getsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT) == UNSENT_LIMIT
                writer.close()

    run(main)
