"""``relay tunnel open|list|close`` against a real gateway and agent.

The gateway, an agent named ``alpha`` and a TCP echo target run on a uvloop loop in a
background thread (real sockets on 127.0.0.1); the CLI runs in-process through click's
CliRunner, so its synchronous urllib client talks to them like any other process would.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop
from click.testing import CliRunner

from relay.cli import main

pytestmark = pytest.mark.timeout(90)


class Stack:
    """Gateway + agent ``alpha`` + echo target in a thread; ``url``, ``keys``, ``agent_id``."""

    def __init__(self, data_dir: Any, *, tls: Any = None, twins: bool = False,
                 jwt_key: str | None = None) -> None:
        self._data_dir = data_dir
        self._jwt_key = jwt_key  # verify user JWTs with this HMAC secret
        self.team_id = ""
        self._tls = tls  # (certificate, key) paths: serve https
        self._twins = twins  # also two agents named "twin" (different ak- keys)
        self.twin_ids: list[str] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop = uvloop.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self.url = ""
        self.keys: dict[str, str] = {}
        self.agent_id = ""
        self.echo_port = 0

    def __enter__(self) -> "Stack":
        self._thread.start()
        assert self._ready.wait(30), "the gateway stack did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _main(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced by __enter__
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        from relay.agent import Agent
        from relay.gateway.app import Gateway
        from relay.gateway.store import Store

        self._stop = asyncio.Event()

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        echo_server = await asyncio.start_server(echo, "127.0.0.1", 0)
        self.echo_port = echo_server.sockets[0].getsockname()[1]
        store = Store.open(self._data_dir)
        _, keys = await store.create_team_with_keys("cli")
        self.keys = {kind: str(key) for kind, key in keys.items()}
        server_ctx = client_ctx = None
        if self._tls is not None:
            server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            server_ctx.load_cert_chain(*self._tls)
            client_ctx = ssl.create_default_context(cafile=str(self._tls[0]))
        self.team_id = (await store.list_teams())[0].id
        gateway = Gateway(store, ssl_context=server_ctx, jwt_key=self._jwt_key)
        await gateway.start("127.0.0.1", 0)
        self.url = gateway.url
        agents = [Agent(gateway.url, self.keys["ak"], name="alpha", backoff_initial=0.05, ssl_context=client_ctx)]
        if self._twins:  # the name is unique per key, not per team
            for _ in range(2):
                _, twin_key = await store.create_credential((await store.list_teams())[0].id, "ak")
                agents.append(Agent(gateway.url, str(twin_key), name="twin", backoff_initial=0.05))
        tasks = [asyncio.get_running_loop().create_task(agent.run()) for agent in agents]
        try:
            async with asyncio.timeout(20):
                while not all(a.agent_id and gateway.registry.is_online(a.agent_id) for a in agents):
                    await asyncio.sleep(0.02)
            self.agent_id = agents[0].agent_id
            self.twin_ids = [a.agent_id for a in agents[1:]]
            self._ready.set()
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await gateway.close()
            await store.close()
            echo_server.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("cli-tunnel") / "data", twins=True) as running:
        yield running


def relay(stack: Stack, *args: str, key: str | None = None) -> Any:
    """Run ``relay tunnel ARGS`` in-process with the gateway and key in the environment."""
    env = {"RELAY_GATEWAY": stack.url, "RELAY_KEY": key or stack.keys["sk"], "RELAY_CA_CERT": None}
    return CliRunner().invoke(main, ["tunnel", *args], env=env, catch_exceptions=False)


def echo_through(port: int, payload: bytes = b"through the hub port") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def test_open_list_close_json_by_name_and_id(stack):
    result = relay(stack, "open", "alpha", "--port", str(stack.echo_port), "--protocol", "tcp", "--json")
    assert result.exit_code == 0, result.output
    opened = json.loads(result.stdout)
    assert opened["agent_id"] == stack.agent_id and opened["agent_name"] == "alpha"
    assert opened["tunnel_protocol"] == "tcp" and opened["tunnel_url"].startswith("ws://")
    assert echo_through(opened["hub_port"]) == b"through the hub port"

    # By name and by id: the same session, with the connection just made counted.
    for ref in ("alpha", stack.agent_id):
        result = relay(stack, "list", ref, "--json")
        assert result.exit_code == 0, result.output
        [row] = json.loads(result.stdout)["tunnels"]
        assert row["session_id"] == opened["session_id"] and row["hub_port"] == opened["hub_port"]
        assert row["agent_name"] == "alpha" and row["connections"] == 1
    result = relay(stack, "list", "--json")  # every agent of the team
    assert [r["session_id"] for r in json.loads(result.stdout)["tunnels"]] == [opened["session_id"]]

    result = relay(stack, "close", stack.agent_id, "--session", opened["session_id"], "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"agent_id": stack.agent_id, "closed": [opened["session_id"]]}
    assert json.loads(relay(stack, "list", "--json").stdout) == {"tunnels": []}
    with pytest.raises(OSError):
        echo_through(opened["hub_port"])


def test_open_list_close_human(stack):
    result = relay(stack, "open", "alpha", "--port", str(stack.echo_port))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Opened http tunnel ")
    assert f"tunnel_url   {stack.url}/tunnel/" in result.stdout and "admin_token" in result.stdout
    session_id = result.stdout.split()[3]
    result = relay(stack, "open", "alpha", "--port", str(stack.echo_port), "--protocol", "tcp")
    assert result.exit_code == 0 and "hub port     127.0.0.1:" in result.stdout

    listing = relay(stack, "list").stdout.splitlines()
    assert listing[0].split() == ["SESSION", "AGENT", "PROTO", "TARGET", "HUB", "CONNS", "CREATED"]
    assert len(listing) == 3 and any(line.startswith(session_id) for line in listing)
    assert stack.keys["sk"] not in result.stdout + "".join(listing)  # the key is never printed

    result = relay(stack, "close", "alpha")
    assert result.exit_code == 0 and result.stdout.count("Closed ") == 2
    assert relay(stack, "list").stdout.strip() == "No open tunnels."
    assert relay(stack, "close", "alpha").stdout.startswith("No open tunnels on alpha")


@pytest.mark.parametrize("args, key, message", [
    (["list"], "sk-wrong", "unknown or revoked credential (HTTP 401 invalid_credentials)"),
    (["open", "alpha", "--port", "22"], "ak", "(HTTP 403"),
    (["open", "ghost", "--port", "22"], None, "no agent 'ghost' in this team"),
    (["close", "alpha", "--session", "nope"], None, "no open tunnel session nope on this agent (HTTP 404"),
])
def test_errors_are_one_line(stack, args, key, message):
    secret = stack.keys.get(key, key) if key else None
    result = relay(stack, *args, key=secret)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines
    assert not secret or secret not in result.stderr


def test_unreachable_gateway_and_missing_key_from_a_real_process(stack):
    done = subprocess.run([sys.executable, "-m", "relay", "tunnel", "list", "--gateway", "http://127.0.0.1:1",
                           "--key", "sk-secret"], capture_output=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.decode().strip() == \
        "Error: cannot reach the gateway at http://127.0.0.1:1: Connection refused"
    result = CliRunner().invoke(main, ["tunnel", "list", "--gateway", stack.url], env={"RELAY_KEY": None})
    assert result.exit_code == 2 and "Missing option '--key'" in result.stderr


def test_ambiguous_name_needs_the_id(stack):
    result = relay(stack, "open", "twin", "--port", str(stack.echo_port))
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: 2 agents are named 'twin'") and "give the agent id" in result.stderr
    result = relay(stack, "open", stack.twin_ids[1], "--port", str(stack.echo_port), "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["agent_id"] == stack.twin_ids[1]
    result = relay(stack, "close", stack.twin_ids[1], "--json")
    assert result.exit_code == 0 and len(json.loads(result.stdout)["closed"]) == 1


def test_https_gateway_with_ca_cert(tmp_path):
    from tests.gateway.test_gateway_e2e import _self_signed

    cert, key = _self_signed(tmp_path)
    with Stack(tmp_path / "data", tls=(cert, key)) as tls_stack:
        assert tls_stack.url.startswith("https://")
        result = relay(tls_stack, "list", "--json")  # the test CA is not trusted
        assert result.exit_code == 1 and "CERTIFICATE_VERIFY_FAILED" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        result = relay(tls_stack, "open", "alpha", "--port", "22", "--protocol", "tcp", "--ca-cert", str(cert),
                       "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["tunnel_url"].startswith("wss://")
