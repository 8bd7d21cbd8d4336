"""``relay gateway --store postgresql://...`` as real processes (gateway, agent, ``relay
admin``) against the session's private PostgreSQL: every API family through the gateway,
its state kept across a restart, the store chosen by flag, environment or TOML file.

(In-process tests of the gateway run on both backends too: test_gateway_e2e,
test_tunnels_api, test_tasks, test_services, test_revocation, test_gateway_caches and
test_webhook_persistence take the ``store_url`` fixture.)
"""
from __future__ import annotations

import base64
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.gateway.test_gateway_e2e import _api, _online_agent, _spawn, _stop, _wait
from tests.support.servers import free_port
from tests.support.store_fixtures import with_store

pytestmark = pytest.mark.timeout(180)


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
        body = f"hello {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def _echo_through(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    return received


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_gateway_process_on_postgres(tmp_path: Path, pg_url: str) -> None:
    """Keys from ``relay admin --store``; the gateway from a TOML file's ``store``; an
    agent; then teams/keys, agents, tunnel sessions (tcp and http), the Tunnels API with a
    share and a webhook, an external service with invoke, a task; a restart of the
    gateway (store from ``RELAY_STORE``) keeps it all."""
    admin = subprocess.run([sys.executable, "-m", "relay", "admin", "--store", pg_url, "team", "create",
                            "pg-team", "--json"], capture_output=True, text=True, timeout=60)
    assert admin.returncode == 0, admin.stderr
    keys = json.loads(admin.stdout)["keys"]
    sk = keys["sk"]

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    web_port = web.server_address[1]
    echo, _ = _echo_server()
    echo_port = echo.getsockname()[1]
    port = free_port()
    config = tmp_path / "relay.toml"
    config.write_text(f'[gateway]\nlisten = "127.0.0.1:{port}"\nstore = "{pg_url}"\n'
                      f'allow_private_egress = true\ndata = "{tmp_path / "unused"}"\n')
    gw_log, agent_log = tmp_path / "gateway.log", tmp_path / "agent.log"
    procs: list[subprocess.Popen] = []
    try:
        gw = _spawn("gateway", "--config", str(config), log=gw_log)
        procs.append(gw)
        _wait(lambda: b"listening on" in gw_log.read_bytes())
        log_text = gw_log.read_text()
        assert "(store: postgresql://" in log_text
        assert not re.search(r"^  (sk|dk|ak)  ", log_text, re.M)  # a team exists: no default keys
        assert not (tmp_path / "unused").exists()  # nothing in --data: the state is in PostgreSQL
        agent = _spawn("agent", "--gateway", f"http://127.0.0.1:{port}", "--key", keys["ak"], "--name", "pg-box",
                       "--allow", f"127.0.0.1:{echo_port}", "--allow", f"127.0.0.1:{web_port}", log=agent_log)
        procs.append(agent)
        agent_id = _wait(lambda: _online_agent(port, sk))

        # Agents, and tunnel sessions of seed 000.
        status, body = _api(port, "GET", f"/api/v1/agents/{agent_id}", sk)
        assert status == 200 and body["name"] == "pg-box" and body["online"], body
        # A task, while the agent is idle (one with open tunnel sessions takes none).
        status, task = _api(port, "POST", "/api/v1/tasks", sk, {"kind": "echo", "input": {"n": 1}})
        assert status == 202, task
        finished = _wait(lambda: (lambda t: t if t["status"] == "succeeded" else None)(
            _api(port, "GET", f"/api/v1/tasks/{task['task_id']}", sk)[1]))
        assert finished["result"] == {"n": 1}
        status, tcp = _api(port, "POST", f"/api/v1/agents/{agent_id}/tunnel", sk,
                            {"target_port": echo_port, "tunnel_protocol": "tcp"})
        assert status == 200, tcp
        assert _echo_through(tcp["hub_port"], b"x" * 100_000) == b"x" * 100_000
        status, http_tunnel = _api(port, "POST", f"/api/v1/agents/{agent_id}/tunnel", sk, {"target_port": web_port})
        assert status == 200, http_tunnel
        assert _get(http_tunnel["tunnel_url"] + "page") == (200, b"hello /page")

        # The Tunnels API: a tcp tunnel, an http one with a share, a webhook.
        status, named = _api(port, "POST", "/api/v1/tunnels", sk,
                             {"target": f"127.0.0.1:{echo_port}", "agent_id": agent_id, "name": "echo",
                              "protocol": "tcp"})
        assert status == 201, named
        assert _echo_through(named["hub_port"], b"named") == b"named"
        status, site = _api(port, "POST", "/api/v1/tunnels", sk,
                            {"target": f"127.0.0.1:{web_port}", "agent_id": agent_id, "name": "site",
                             "protocol": "http"})
        assert status == 201, site
        status, share = _api(port, "POST", f"/api/v1/tunnels/{site['id']}/shares", sk,
                             {"name": "demo", "allowed_methods": ["GET"], "rate_limit": 100})
        assert status == 201, share
        assert _get(share["share_url"] + "shared") == (200, b"hello /shared")
        status, hook = _api(port, "POST", "/api/v1/webhooks", sk, {"url": f"http://127.0.0.1:{web_port}/hook"})
        assert status == 201 and hook["secret"].startswith("whsec_"), hook

        # An external service and invoke.
        status, svc = _api(port, "POST", "/api/v1/r/containers", sk,
                           {"service_slug": "hello-svc", "url": f"http://127.0.0.1:{web_port}/base", "health": "/"})
        assert status == 201, svc
        _wait(lambda: _api(port, "GET", "/api/v1/r/containers/hello-svc", sk)[1]["service_status"] == "running")
        status, out = _api(port, "POST", "/api/v1/r/invoke/hello-svc", sk, {"method": "GET", "path": "/x"})
        assert status == 200 and base64.b64decode(out["body_base64"]) == b"hello /base/x", out

        # Everything is in PostgreSQL, hashed where it is a secret.
        async def rows(store):
            team = (await store.list_teams())[0]
            return (await store.list_tunnels(team.id), await store.list_webhooks(team.id),
                    await store.get_service(team.id, "hello-svc"), await store.list_agents(team.id))

        tunnels, hooks, service, agents = with_store(pg_url, rows)
        assert {t.name for t in tunnels} == {"echo", "site"} and [h.id for h in hooks] == [hook["id"]]
        assert service is not None and [a.id for a in agents] == [agent_id]

        # Restart the gateway, its store from the environment this time.
        _stop(gw)
        gw_log.write_bytes(b"")
        env_before = os.environ.get("RELAY_STORE")
        os.environ["RELAY_STORE"] = pg_url
        try:
            gw = _spawn("gateway", "--listen", f"127.0.0.1:{port}", "--allow-private-egress",
                        "--data", str(tmp_path / "unused"), log=gw_log)
        finally:
            if env_before is None:
                del os.environ["RELAY_STORE"]
            else:
                os.environ["RELAY_STORE"] = env_before
        procs.append(gw)
        _wait(lambda: b"listening on" in gw_log.read_bytes())
        assert _wait(lambda: _online_agent(port, sk), timeout=30) == agent_id  # the agent came back
        status, listed = _api(port, "GET", "/api/v1/tunnels", sk)
        assert {t["name"] for t in listed["tunnels"]} == {"echo", "site"}
        _wait(lambda: _echo_through(named["hub_port"], b"again") == b"again", timeout=20)  # the same hub port
        assert _echo_through(tcp["hub_port"], b"session") == b"session"  # and the seed 000 session's
        assert _get(share["share_url"] + "back") == (200, b"hello /back")
        assert _get(http_tunnel["tunnel_url"] + "back") == (200, b"hello /back")

        # relay admin revokes the sk key (another process): the gateway refuses it next.
        team_id = json.loads(admin.stdout)["team_id"]
        revoked = subprocess.run([sys.executable, "-m", "relay", "admin", "--store", pg_url, "key", "revoke",
                                  "--team", team_id, sk], capture_output=True, text=True, timeout=60)
        assert revoked.returncode == 0, revoked.stderr
        deadline = time.monotonic() + 5
        while _api(port, "GET", "/api/v1/agents", sk)[0] != 401:
            assert time.monotonic() < deadline, "the revoked key still works"
            time.sleep(0.02)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        web.shutdown()
        echo.close()


def test_gateway_process_without_a_reachable_postgres_is_a_one_line_error(tmp_path: Path) -> None:
    url = f"postgresql://relay:hidden-pw@127.0.0.1:{free_port()}/relay"
    done = subprocess.run([sys.executable, "-m", "relay", "gateway", "--listen", "127.0.0.1:0", "--store", url],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "cannot connect to PostgreSQL at postgresql://relay@127.0.0.1" in done.stderr
    assert "hidden-pw" not in done.stderr + done.stdout
