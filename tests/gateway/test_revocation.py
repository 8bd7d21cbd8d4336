"""Revoking an agent key ends what it authorised (issue 12, finding 5).

Real processes: ``relay gateway`` and ``relay agent`` as subprocesses, the key revoked by
``relay admin key revoke`` as a third process on the same data directory (the gateway
must notice a revocation committed by another process), an echo service in a thread of
the test process. Within about a second of the revocation the open tunnel connection is
cut and the agent is offline; the agent logs why at ERROR and backs off instead of
hammering the gateway with a key that no longer works.
"""
from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.gateway.test_faults import RelayProcs, Targets, relay_fixtures, wait_for

pytestmark = pytest.mark.timeout(120)


targets_fixture, relay_fixture = relay_fixtures()


def _admin(data: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay", "admin", "--data", str(data), *args],
                          capture_output=True, timeout=30)


def _closed_within(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the peer ends ``sock`` (EOF or reset), or None if it stays open."""
    started = time.monotonic()
    sock.settimeout(0.05)
    while time.monotonic() - started < timeout:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:  # reset
            return time.monotonic() - started
    return None


def test_revoked_agent_key_ends_its_session_and_streams(relay: RelayProcs, targets: Targets) -> None:
    hub_port = relay.open_tcp(targets.echo_port)
    client = socket.create_connection(("127.0.0.1", hub_port), timeout=5)
    try:
        client.sendall(b"before revocation")
        assert client.recv(100) == b"before revocation"

        done = _admin(relay.workdir / "data", "key", "revoke", "--team", "default", relay.keys["ak"])
        assert done.returncode == 0, done.stderr
        # The open stream is reset and the client's connection cut promptly (the gateway
        # polls every 0.25 s; the bound leaves room for a loaded machine).
        elapsed = _closed_within(client, 5.0)
        assert elapsed is not None, "the tunnel connection outlived the revocation of its agent key"
        print(f"tunnel connection cut {elapsed:.2f}s after the revocation")
    finally:
        client.close()

    wait_for(lambda: relay.online_agent() is None, timeout=5, what="agent offline")
    status, body = relay.api("POST", f"/api/v1/agents/{relay.agent_id}/tunnel",
                             {"target_port": targets.echo_port, "tunnel_protocol": "tcp"})
    assert status == 409 and body["error"]["code"] == "agent_offline", body
    with pytest.raises(OSError):  # the old hub port no longer reaches the target
        with socket.create_connection(("127.0.0.1", hub_port), timeout=5) as again:
            again.sendall(b"after")
            again.settimeout(5)
            if again.recv(10) == b"":
                raise ConnectionResetError("closed")

    # The agent says why, at ERROR, and backs off (no reconnect storm) but keeps running.
    log = relay.workdir / "agent.log"
    wait_for(lambda: "credential revoked" in log.read_text(), timeout=5, what="agent logs the reason")
    time.sleep(4.0)
    text = log.read_text()
    assert re.search(r"ERROR.*credential revoked", text), text
    rejections = re.findall(r"ERROR.*rejected the agent key.*retrying in ([0-9.]+)s", text)
    assert 1 <= len(rejections) <= 4, text  # 0.5 s doubling: a handful in 4 s, not hundreds
    delays = [float(d) for d in rejections]
    assert delays == sorted(delays), text
    assert relay.agent is not None and relay.agent.poll() is None
    assert relay.keys["ak"] not in text
    gateway_log = (relay.workdir / "gateway.log").read_text()
    assert "credential revoked" in gateway_log, gateway_log


def test_revocation_in_the_gateways_own_process_and_hook_agents(tmp_path: Path, store_url: str) -> None:
    """A key revoked through the gateway's own store (no other process) ends its agent's
    session too; an agent admitted by an ``authenticate`` hook (an id the store does not
    know) and an agent with another key are left alone."""

    from relay.agent import Agent
    from relay.gateway.hooks import agent_principal
    from tests.gateway.test_gateway_e2e import gateway_and_team, run, running_agent, wait_until

    async def main() -> None:
        async with gateway_and_team(tmp_path, store_url) as (gw, keys):
            team_id = (await gw.store.lookup_credential(keys["ak"])).team_id
            _, second = await gw.store.create_credential(team_id, "ak")

            def authenticate(request, default):
                if request.header("authorization") == "Bearer ak-platform-machine-7":
                    return agent_principal(team_id, "machine-7")
                return default()

            gw.hooks.authenticate = authenticate
            async with running_agent(gw, keys["ak"], name="doomed") as doomed, \
                    running_agent(gw, second, name="other") as other, \
                    running_agent(gw, "ak-platform-machine-7", name="hooked") as hooked:
                assert len(gw.registry.connected()) == 3
                credential = await gw.store.lookup_credential(keys["ak"])
                assert await gw.store.revoked_credentials([credential.id, "not-an-id"]) == set()
                assert await gw.store.revoke_credential(team_id, credential.id)
                assert await gw.store.revoked_credentials([credential.id, "not-an-id"]) == {credential.id}
                await wait_until(lambda: not gw.registry.is_online(doomed.agent_id), timeout=3)
                await wait_until(lambda: doomed.state == "refused", timeout=3)
                await asyncio.sleep(0.6)  # several polls later: the others are still there
                assert gw.registry.is_online(other.agent_id) and gw.registry.is_online(hooked.agent_id)
                assert isinstance(doomed, Agent) and doomed.ever_connected

    run(main)


async def proxied_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: str) -> None:
    """One GET of svc-a's echo through the service proxy on a kept connection, answered 200."""
    writer.write(f"GET /api/v1/r/containers/svc-a/echo HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Bearer {key}\r\n\r\n".encode())
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
        await reader.readexactly(length)


async def cut(reader: asyncio.StreamReader) -> str:
    """How the connection ends within 2 s, read to its end: "eof" or "reset"."""
    try:
        async with asyncio.timeout(2):
            while await reader.read(65536):
                pass
        return "eof"
    except ConnectionResetError:
        return "reset"


def test_revoking_an_api_key_cuts_what_it_opened_beyond_one_request(tmp_path: Path, store_url: str) -> None:
    """A dk- key holds a task's event stream and a keep-alive connection through the
    service proxy; an sk- key holds another proxied connection. Revoking the dk- key cuts
    its two connections with a reset within a second; the sk- key's goes on serving."""
    from tests.gateway.test_gateway_e2e import gateway_and_team, run
    from tests.http.test_invoke import serving_agent, wait_status
    from tests.support.openai_server import OpenAIServer
    from tests.tunnels.test_tasks import submit

    async def proxied(port: int, key: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A keep-alive connection through the service proxy, after one answered request."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await proxied_echo(reader, writer, key)
        return reader, writer

    async def main() -> None:
        async with gateway_and_team(tmp_path, store_url) as (gw, keys):
            app = await OpenAIServer("one").start()
            try:
                async with serving_agent(gw, keys["ak"], "box", f"svc-a=127.0.0.1:{app.port}"):
                    await wait_status(gw, keys["sk"], "svc-a", "running")
                    task = await submit(gw.port, keys["dk"], "nobody-runs-this", labels=["absent"])
                    events_r, events_w = await asyncio.open_connection("127.0.0.1", gw.port)
                    events_w.write(f"GET /api/v1/tasks/{task['task_id']}/events HTTP/1.1\r\nHost: x\r\n"
                                   f"Authorization: Bearer {keys['dk']}\r\n\r\n".encode())
                    async with asyncio.timeout(5):
                        assert (await events_r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
                    doomed_r, doomed_w = await proxied(gw.port, keys["dk"])
                    kept_r, kept_w = await proxied(gw.port, keys["sk"])

                    credential = await gw.store.lookup_credential(keys["dk"])
                    assert await gw.store.revoke_credential(credential.team_id, credential.id)
                    assert await cut(events_r) == "reset"
                    assert await cut(doomed_r) == "reset"
                    # The sk- key's connection still serves, on the same keep-alive socket.
                    kept_w.write(b"GET /api/v1/r/containers/svc-a/echo HTTP/1.1\r\nHost: x\r\n"
                                 + f"Authorization: Bearer {keys['sk']}\r\n\r\n".encode())
                    async with asyncio.timeout(5):
                        assert (await kept_r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
                    for w in (events_w, doomed_w, kept_w):
                        w.close()
            finally:
                await app.close()

    run(main)


def test_a_key_used_later_on_a_kept_proxy_connection_cuts_it_when_revoked(tmp_path: Path, store_url: str) -> None:
    """The service proxy holds a kept connection for each key it served, also when the
    answers come from memory (the connection is held once per key, not per request):
    an sk- key's requests, then a dk- key's (remembered from another connection) on the
    same socket, each repeated; revoking the dk- key cuts the connection with a reset."""
    from tests.gateway.test_gateway_e2e import gateway_and_team, run
    from tests.http.test_invoke import serving_agent, wait_status
    from tests.support.openai_server import OpenAIServer

    async def main() -> None:
        async with gateway_and_team(tmp_path, store_url) as (gw, keys):
            app = await OpenAIServer("one").start()
            try:
                async with serving_agent(gw, keys["ak"], "box", f"svc-a=127.0.0.1:{app.port}"):
                    await wait_status(gw, keys["sk"], "svc-a", "running")
                    warm_r, warm_w = await asyncio.open_connection("127.0.0.1", gw.port)
                    for _ in range(3):  # the dk- key's answer is remembered from here on
                        await proxied_echo(warm_r, warm_w, keys["dk"])
                    warm_w.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                    for key in ("sk", "sk", "sk", "dk", "dk", "dk", "sk", "dk"):
                        await proxied_echo(reader, writer, keys[key])
                    credential = await gw.store.lookup_credential(keys["dk"])
                    assert await gw.store.revoke_credential(credential.team_id, credential.id)
                    ended = await cut(reader)
                    assert ended == "reset"
                    writer.close()
            finally:
                await app.close()

    run(main)
