"""A fleet of gateways on one machine (issue 13, items 2 and 3), against a real
redis-server and real processes: three ``relay gateway --redis`` processes sharing one
store and one private Redis, with ``relay agent`` processes spread over them. Every test
runs twice: the gateways share one SQLite file in one data directory (multi-process safe
on one machine), then one database of the session's private PostgreSQL (``--store``).

* a TCP tunnel's hub port at gateway B carries an echo to an agent held by gateway A
  (checksums, several connections at once);
* an HTTP tunnel opened at one gateway answers GET and POST through another one;
* a key revoked with ``relay admin key revoke --redis`` is refused at every gateway at
  once, and the agent using it is expelled by the gateway holding it;
* a peer session with a wrong (or no) fleet secret is refused before any upgrade; a
  forward or a control request naming another team for an agent is refused NOT_ALLOWED;
* control messages cross the fleet: a task submitted at b or c runs on an agent held by
  a (dispatch, progress, outputs and result streamed at the gateway it was submitted to,
  its status at every gateway); a Tunnels API tunnel created at c, bound by connect at b
  on an agent held by a (bytes flow through the binding), deleted at a; a service
  declared by an agent held by a answers the proxy (with the OpenAI SDK) and invoke at
  every gateway;
* kill -9 of the gateway holding an agent with one connection: the agent connects to
  the next gateway of its list and requests made at a third gateway work again;
* an agent with two connections is leased at both gateways; kill -9 of one breaks only
  the streams it carried (the others keep their bytes flowing, checked), requests made
  at a third gateway go on at once, and the agent dials another gateway in its place;
* with two connections, a gateway frozen while the agent process was replaced never
  reappears in the registry when it resumes;
* a gateway frozen (SIGSTOP) while its agent reconnected elsewhere never takes the
  agent back when it resumes (the epoch rule), and ends its stale session;
* a gateway that loses Redis keeps serving its own agents, says so in /healthz and
  /metrics, and restores its leases when Redis is back;
* a Tunnels API tunnel's hub port (TCP and UDP) listens on every gateway, including
  gateways started before it was created, and closes everywhere when paused or deleted
  anywhere; concurrent creations never share a port; a port busy on one host is that
  gateway's error only;
* ``relay gateway --workers 2``: one port, both workers serve it and reach each other's
  agents; a killed worker is restarted; SIGTERM stops everything;
* PostgreSQL stopped and started again under two gateways: 503 JSON for writes, live
  tunnels go on, everything converges without a restart.

Numbers (failover and revocation times) are printed, never asserted beyond generous
bounds (``pytest -s`` shows them).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from tests.gateway.test_faults import Targets, wait_for
from tests.support.servers import PostgresServer, free_port, require_binary, start_postgres, start_redis

pytestmark = pytest.mark.timeout(180)

SECRET = "fleet-secret-for-tests"
MiB = 1024 * 1024


class HttpTarget:
    """A small HTTP/1.1 server in a thread: GET /hello, POST /sum (sha256 of the body)."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                self._answer(b"hello from behind the agent " + self.path.encode())

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self._answer(hashlib.sha256(body).hexdigest().encode())

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _spawn(args: list[str], log: Path, env: Optional[dict[str, str]] = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "relay", *args], stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def _stop(proc: Optional[subprocess.Popen]) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGCONT)  # a frozen one must be able to stop
    except ProcessLookupError:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class Fleet:
    """Gateways (by name) sharing one data directory and one Redis; agents by name."""

    def __init__(self, workdir: Path, redis_url: str, store_url: Optional[str] = None) -> None:
        self.workdir = workdir
        self.data = workdir / "data"
        self.redis_url = redis_url
        #: None: SQLite in the shared data directory; else every gateway's --store.
        self.store_url = store_url
        self.gateways: dict[str, tuple[subprocess.Popen, int]] = {}
        self.agents: dict[str, subprocess.Popen] = {}
        self.keys: dict[str, str] = {}

    def start_gateway(self, name: str, redis_url: Optional[str] = None, secret: str = SECRET,
                      extra: tuple[str, ...] = ()) -> int:
        port = free_port()
        log = self.workdir / f"gateway-{name}.log"
        store = ["--store", self.store_url] if self.store_url else []
        proc = _spawn(["gateway", "--listen", f"127.0.0.1:{port}", "--data", str(self.data), *store,
                       "--redis", redis_url or self.redis_url, "--gateway-id", name, "--log-level", "info",
                       *extra], log, env={"RELAY_FLEET_SECRET": secret})
        self.gateways[name] = (proc, port)
        # The line after the default keys (the fleet logs "in the fleet" before they are printed).
        wait_for(lambda: b"in the fleet, advertised at" in log.read_bytes() or proc.poll() is not None,
                 what=f"gateway {name}")
        assert proc.poll() is None, log.read_text()[-3000:]
        if not self.keys:
            self.keys = dict(re.findall(r"^  (sk|dk|ak)  (\S+)$", log.read_text(), re.M))
        return port

    def restart_gateway(self, name: str) -> int:
        """Stop gateway ``name`` and start it again (same id, a new port); wait until it
        sees the fixture's agents and has peer sessions again."""
        _stop(self.gateways[name][0])
        log = self.workdir / f"gateway-{name}.log"
        log.rename(log.with_suffix(f".{time.monotonic_ns()}.log"))
        port = self.start_gateway(name)
        for agent in ("on-a", "on-b"):
            wait_for(lambda a=agent: self.agent_id(name, a), what=f"{agent} seen by {name} after its restart")
        wait_for(lambda: self.health(name)["fleet"]["peers_connected"] >= 2, what=f"peer sessions of {name}")
        return port

    def port(self, name: str) -> int:
        return self.gateways[name][1]

    def api(self, gateway: str, method: str, path: str, body: Any = None,
            key: Optional[str] = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port(gateway)}{path}", data=data,
                                         method=method,
                                         headers={"Authorization": f"Bearer {key or self.keys['sk']}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def health(self, gateway: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port(gateway)}/healthz", timeout=10) as resp:
            return json.loads(resp.read())

    def start_agent(self, name: str, gateways: list[str], key: Optional[str] = None,
                    allow: tuple[str, ...] = (), extra: tuple[str, ...] = (),
                    connections: Optional[int] = None) -> subprocess.Popen:
        args = ["agent", "--name", name, *extra]
        if connections is not None:
            args += ["--connections", str(connections)]
        for gateway in gateways:
            args += ["--gateway", f"http://127.0.0.1:{self.port(gateway)}"]
        for entry in allow:
            args += ["--allow", entry]
        proc = _spawn(args, self.workdir / f"agent-{name}.log", env={"RELAY_AGENT_KEY": key or self.keys["ak"]})
        self.agents[name] = proc
        return proc

    def agent_id(self, gateway: str, name: str, key: Optional[str] = None) -> Optional[str]:
        """The agent's id if ``gateway`` sees it online (held there or elsewhere)."""
        status, body = self.api(gateway, "GET", "/api/v1/agents", key=key)
        if status != 200:
            return None
        ids = [a["agent_id"] for a in body["agents"] if a["online"] and a["name"] == name]
        return ids[0] if ids else None

    def holders(self, agent_id: str) -> dict[str, int]:
        """gateway id -> epoch of every session of the agent leased in Redis."""
        out = subprocess.run([require_binary("redis-cli"), "-u", self.redis_url, "HGETALL", f"relay:agent:{agent_id}"],
                             capture_output=True, text=True, timeout=10).stdout.split()
        return {gateway: int(value.split("|")[0]) for gateway, value in zip(out[::2], out[1::2], strict=True)}

    def holder(self, agent_id: str) -> Optional[tuple[str, int]]:
        """(gateway id, epoch) of the agent's newest session leased in Redis."""
        found = self.holders(agent_id)
        if not found:
            return None
        gateway = max(found, key=lambda g: found[g])
        return gateway, found[gateway]

    def admin(self, *args: str) -> Any:
        store = ["--store", self.store_url] if self.store_url else []
        out = subprocess.run([sys.executable, "-m", "relay", "admin", "--data", str(self.data), *store, *args],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout) if "--json" in args else out.stdout

    def close(self) -> None:
        for proc in list(self.agents.values()) + [p for p, _ in self.gateways.values()]:
            _stop(proc)


def echo_checked(port: int, size: int, host: str = "127.0.0.1") -> None:
    """Send ``size`` random bytes through ``host:port`` (an echo behind it); compare sha256."""
    payload = os.urandom(size)
    with socket.create_connection((host, port), timeout=20) as sock:
        received = hashlib.sha256()
        got = 0

        def reader() -> None:
            nonlocal got
            try:
                while got < size:
                    chunk = sock.recv(256 * 1024)
                    if not chunk:
                        break
                    received.update(chunk)
                    got += len(chunk)
            except OSError:
                pass  # a cut connection: the count below says so

        thread = threading.Thread(target=reader)
        thread.start()
        sock.sendall(payload)
        thread.join(30)
    assert got == size, f"echoed {got} of {size} bytes"
    assert received.hexdigest() == hashlib.sha256(payload).hexdigest()


def echo_works(port: int, host: str = "127.0.0.1") -> bool:
    try:
        echo_checked(port, 1024, host)
        return True
    except (OSError, AssertionError):
        return False


def refused(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing listens on ``host:port`` (the connection is refused)."""
    try:
        with socket.create_connection((host, port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # accepted by a listener that was closing: ask again
        return False


def http_get(url: str, data: Optional[bytes] = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (ConnectionError, http.client.HTTPException):
        # A connection cut while the tunnel closes (its live connections are cut): no answer.
        return 0, b""


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with start_redis(tmp_path_factory.mktemp("fleet-redis")) as server:
        yield server


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis: Any,
          targets: Targets) -> Iterator[Fleet]:
    """Gateways a, b, c; agent ``on-a`` held by a (its list: a, b, c; one connection, so
    the others forward to it), ``on-b`` by b. The gateways share one SQLite file (one
    machine), or one PostgreSQL database."""
    store_url = request.getfixturevalue("pg_databases").create() if request.param == "postgres" else None
    running = Fleet(tmp_path_factory.mktemp("fleet"), f"redis://127.0.0.1:{redis.port}/0", store_url)
    try:
        for name in ("a", "b", "c"):
            running.start_gateway(name)
        running.start_agent("on-a", ["a", "b", "c"], allow=(f"127.0.0.1:{targets.echo_port}",
                                                               f"127.0.0.1:{targets.source_port}"), connections=1)
        running.start_agent("on-b", ["b", "c", "a"], connections=1)
        for gateway in ("a", "b", "c"):
            for agent in ("on-a", "on-b"):
                wait_for(lambda g=gateway, a=agent: running.agent_id(g, a), what=f"{agent} seen by {gateway}")
        wait_for(lambda: all(running.health(g)["fleet"]["peers_connected"] >= 1 for g in "abc"),
                 what="peer sessions")
        yield running
    finally:
        running.close()


# ----------------------------------------------------------------------------- tests


def test_registry_leases_and_health(fleet):
    agent_id = fleet.agent_id("c", "on-a")
    assert fleet.holders(agent_id).keys() == {"a"}
    health = fleet.health("b")
    assert health["status"] == "ok" and health["fleet"]["redis"] == "ok"
    assert set(health["fleet"]["gateways"]) >= {"a", "b", "c"}
    with urllib.request.urlopen(f"http://127.0.0.1:{fleet.port('a')}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert "relay_fleet_redis_up 1.0" in metrics
    assert "relay_fleet_lease_claims_total" in metrics and "relay_fleet_peers_connected" in metrics


def test_tcp_hub_port_at_b_reaches_an_agent_held_by_a(fleet, targets):
    """The session's hub port listens on every gateway; at hb (a hub host of its own, so
    every connection below lands there) it carries checked bytes to the agent held by a,
    five connections, four at once, all forwarded."""
    fleet.start_gateway("hb", extra=("--hub-host", "127.0.0.6"))
    try:
        agent_id = fleet.agent_id("b", "on-a")
        status, body = fleet.api("b", "POST", f"/api/v1/agents/{agent_id}/tunnel",
                                 {"target_port": targets.echo_port, "tunnel_protocol": "tcp"})
        assert status == 200, body
        hub = body["hub_port"]
        wait_for(lambda: echo_works(hub, "127.0.0.6"), timeout=10, what="the hub port at hb")
        with urllib.request.urlopen(f"http://127.0.0.1:{fleet.port('a')}/metrics", timeout=10) as resp:
            before = resp.read().decode()
        echo_checked(hub, 4 * MiB, "127.0.0.6")
        threads = [threading.Thread(target=echo_checked, args=(hub, 256 * 1024, "127.0.0.6")) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        with urllib.request.urlopen(f"http://127.0.0.1:{fleet.port('a')}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()

        def grew(pattern: str) -> float:
            found = [re.search(pattern, text) for text in (before, metrics)]
            assert found[1] is not None, pattern
            return float(found[1].group(1)) - (float(found[0].group(1)) if found[0] else 0.0)

        assert grew(r'relay_fleet_forwarded_streams_in_total\{result="joined"\} (\S+)') >= 5
        assert grew(r'relay_fleet_forwarded_bytes_total\{direction="to_agent"\} (\S+)') >= 5 * MiB
    finally:
        _stop(fleet.gateways.pop("hb")[0])


def test_relay_connect_at_c_reaches_an_agent_held_by_a_and_ends_with_the_tunnel(fleet, targets, tmp_path):
    """relay connect's multiplexed session on gateway c, for a tunnel opened at b to an
    agent held by a: its streams are forwarded like any; closing the tunnel at b ends
    the session at c, and relay connect stops with the 404."""
    from tests.gateway.test_stream_edges import RelayConnect

    agent_id = fleet.agent_id("b", "on-a")
    status, body = fleet.api("b", "POST", f"/api/v1/agents/{agent_id}/tunnel",
                             {"target_port": targets.echo_port, "tunnel_protocol": "tcp"})
    assert status == 200, body
    url = body["tunnel_url"].replace(f":{fleet.port('b')}/", f":{fleet.port('c')}/")
    connect = RelayConnect(url, tmp_path / "connect.log", "mux")
    try:
        echo_checked(connect.port, 2 * MiB)
        threads = [threading.Thread(target=echo_checked, args=(connect.port, 256 * 1024)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        status, _ = fleet.api("b", "DELETE", f"/api/v1/agents/{agent_id}/tunnel?session_id={body['session_id']}")
        assert status == 200
        assert connect.proc.wait(20) != 0
        assert "HTTP 404" in connect.log.read_text()
    finally:
        connect.close()


def _from_agent_bytes(fleet: Fleet, gateway: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{fleet.port(gateway)}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    found = re.search(r'relay_fleet_forwarded_bytes_total\{direction="from_agent"\} (\S+)', metrics)
    return float(found.group(1)) if found else 0.0


def _listens(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def test_a_client_that_stops_reading_stops_the_agent_across_both_hops(fleet, targets):
    """An endless source behind the agent on a, read through a hub port at b by a client
    that reads a little and then nothing: what a passes towards b stops growing (the
    windows of both hops are full), and a reader that resumes gets the stream going.
    The reader connects to hs, a gateway with a hub host of its own: the session's hub
    port listens on every gateway, and at 127.0.0.1 the kernel may hand the connection
    to a itself, which forwards nothing."""
    fleet.start_gateway("hs", extra=("--hub-host", "127.0.0.7"))
    try:
        _stops_reading_across_both_hops(fleet, targets, "127.0.0.7")
    finally:
        _stop(fleet.gateways.pop("hs")[0])


def _stops_reading_across_both_hops(fleet: Fleet, targets: Targets, host: str) -> None:
    agent_id = fleet.agent_id("b", "on-a")
    status, body = fleet.api("b", "POST", f"/api/v1/agents/{agent_id}/tunnel",
                             {"target_port": targets.source_port, "tunnel_protocol": "tcp"})
    assert status == 200, body
    wait_for(lambda: _listens(host, body["hub_port"]), timeout=10, what="the hub port at hs")
    before = _from_agent_bytes(fleet, "a")
    with socket.create_connection((host, body["hub_port"]), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        assert len(sock.recv(65536)) > 0  # flowing
        time.sleep(2.0)  # reading nothing: both hops fill up and stop
        stalled = _from_agent_bytes(fleet, "a")
        time.sleep(1.5)
        still = _from_agent_bytes(fleet, "a")
        print(f"\n[fleet] a stalled reader held {(stalled - before) / MiB:.1f} MiB in flight across both hops; "
              f"{still - stalled:.0f} bytes more in the next 1.5 s")
        assert still - stalled < 256 * 1024, "the agent's data kept flowing to a reader that reads nothing"
        assert stalled - before < 48 * MiB  # one stream window per hop plus socket buffers
        sock.settimeout(10)
        deadline = time.monotonic() + 20
        while _from_agent_bytes(fleet, "a") <= still:  # reading again: the agent sends again
            for _ in range(64):
                assert sock.recv(1024 * 1024)
            assert time.monotonic() < deadline, "the stream did not resume"


def test_http_tunnel_opened_at_a_answers_through_c(fleet):
    web = HttpTarget()
    try:
        agent_id = fleet.agent_id("a", "on-b")  # held by b
        status, body = fleet.api("a", "POST", f"/api/v1/agents/{agent_id}/tunnel", {"target_port": web.port})
        assert status == 200, body
        path = body["tunnel_url"].split(f":{fleet.port('a')}", 1)[1]
        for gateway in ("c", "a", "b"):
            base = f"http://127.0.0.1:{fleet.port(gateway)}{path}"
            status, got = http_get(base + "page?x=1")
            assert status == 200 and got == b"hello from behind the agent /page?x=1", (gateway, status, got)
            payload = os.urandom(300_000)
            status, got = http_get(base + "sum", payload)
            assert status == 200 and got.decode() == hashlib.sha256(payload).hexdigest()
        # Closed at c (admin token): the URL stops working at every gateway at once.
        request = urllib.request.Request(f"http://127.0.0.1:{fleet.port('c')}{path.rstrip('/')}", method="DELETE",
                                         headers={"X-Admin-Token": body["admin_token"]})
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200
        for gateway in ("a", "b"):
            wait_for(lambda g=gateway: http_get(f"http://127.0.0.1:{fleet.port(g)}{path}page")[0] == 404,
                     timeout=3, what=f"tunnel closed at {gateway}")
    finally:
        web.close()


def test_sse_and_websocket_through_an_http_tunnel_forwarded_to_another_gateway(fleet):
    """Server-Sent Events arrive one by one and a WebSocket echoes both ways through c,
    the tunnel opened at a, its agent held by b."""
    from tests.http.test_http_tunnel import WsClient
    from tests.support.webapps import WebApp

    async def main() -> None:
        async with WebApp() as app:
            agent_id = fleet.agent_id("a", "on-b")
            status, body = await asyncio.to_thread(fleet.api, "a", "POST", f"/api/v1/agents/{agent_id}/tunnel",
                                                   {"target_port": app.port})
            assert status == 200, body
            path = body["tunnel_url"].split(f":{fleet.port('a')}", 1)[1]
            port = fleet.port("c")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path}sse?n=3&interval=0.2 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            received = b""
            async with asyncio.timeout(20):
                while received.count(b"data:") < 3:
                    chunk = await reader.read(65536)
                    assert chunk, received
                    received += chunk
            writer.close()
            head = received.split(b"\r\n\r\n", 1)[0].lower()
            assert head.startswith(b"http/1.1 200") and b"text/event-stream" in head, head
            ws = await WsClient.connect(port, f"{path}ws")
            try:
                await ws.send("through three gateways")
                assert await ws.receive() == "echo: through three gateways"
                blob = os.urandom(200_000)
                await ws.send(blob)
                assert await ws.receive() == blob
            finally:
                await ws.close()

    asyncio.run(main())


def test_web_terminal_of_an_agent_held_by_b_opens_at_a(fleet):
    """relay agent --terminal held by b: the session opened at b carries terminal_url;
    its WebSocket at a is forwarded to b like any tunnel stream; so is one opened at a
    (terminal_url there once a has the agent's hello: mirrored, not waited for here)."""
    from tests.gateway.test_gateway_e2e import run
    from tests.tunnels.test_terminal import open_terminal

    wrapper = fleet.workdir / "quiet-bash"  # bash without this machine's rc files
    wrapper.write_text("#!/bin/sh\nexec /bin/bash --norc --noprofile\n")
    wrapper.chmod(0o755)
    proc = _spawn(["agent", "--name", "term-b", "--gateway", f"http://127.0.0.1:{fleet.port('b')}"],
                  fleet.workdir / "agent-term-b.log",
                  env={"RELAY_AGENT_KEY": fleet.keys["ak"], "RELAY_AGENT_TERMINAL": str(wrapper)})
    fleet.agents["term-b"] = proc
    try:
        agent_id = wait_for(lambda: fleet.agent_id("a", "term-b"), what="term-b seen by a")
        # Each gateway says it serves a terminal: b from its session, a from the hello it mirrors.
        assert fleet.api("b", "GET", f"/api/v1/agents/{agent_id}")[1]["terminal"] is True
        wait_for(lambda: fleet.api("a", "GET", f"/api/v1/agents/{agent_id}")[1]["terminal"] is True,
                 what="a to say term-b serves a terminal")
        plain = fleet.agent_id("a", "on-b")
        assert fleet.api("a", "GET", f"/api/v1/agents/{plain}")[1]["terminal"] is False
        status, at_b = fleet.api("b", "POST", f"/api/v1/agents/{agent_id}/tunnel", {"tunnel_protocol": "tcp"})
        assert status == 200 and at_b["terminal_url"].endswith("/_relay/terminal"), at_b
        status, at_a = fleet.api("a", "POST", f"/api/v1/agents/{agent_id}/tunnel", {"tunnel_protocol": "tcp"})
        assert status == 200, at_a
        token_of = {"b": at_b["tunnel_url"].split("/")[4], "a": at_a["tunnel_url"].split("/")[4]}

        async def main() -> None:
            for session, answer in (("b", at_b), ("a", at_a)):
                path = f"/tunnel/{token_of[session]}/_relay/terminal/ws"
                term, status, error = await open_terminal(fleet.port("a"), path,
                                                          {"X-Admin-Token": answer["admin_token"]})
                assert status == 101, (session, status, error)
                await term.send(b"echo fleet-$((20+2))\r")
                await term.expect(rb"fleet-22")
                await term.send(b"exit 4\r")
                code, _ = await term.until_closed()
                assert (code, term.texts) == (1000, ['{"exit": 4}'])

        run(main, timeout=60)
    finally:
        _stop(fleet.agents.pop("term-b"))


def test_share_rate_limit_counts_across_the_fleet(fleet):
    """A share limited to 5 requests a minute allows 5 through a and b together."""
    web = HttpTarget()
    try:
        agent_id = fleet.agent_id("a", "on-b")
        status, tunnel = fleet.api("a", "POST", "/api/v1/tunnels", {
            "target": f"127.0.0.1:{web.port}", "agent_id": agent_id, "protocol": "http", "name": "shared"})
        assert status == 201, tunnel
        status, share = fleet.api("b", "POST", f"/api/v1/tunnels/{tunnel['id']}/shares",
                                  {"name": "limited", "rate_limit": 5})
        assert status == 201, share
        path = "/" + share["share_url"].split("/", 3)[3]
        # Just inside a minute window, so the five are counted in one.
        if time.time() % 60 > 50:
            time.sleep(61 - time.time() % 60)
        answers = [http_get(f"http://127.0.0.1:{fleet.port(g)}{path}x")[0] for g in "aaabbbc"]
        assert answers == [200] * 5 + [429] * 2, answers
        status, _ = fleet.api("c", "DELETE", f"/api/v1/tunnels/{tunnel['id']}")
        assert status == 204
        wait_for(lambda: http_get(f"http://127.0.0.1:{fleet.port('a')}{path}x")[0] == 404, timeout=3,
                 what="share gone at a")
    finally:
        web.close()


def test_revoked_key_is_refused_at_every_gateway_at_once(fleet, targets):
    team_id = [t["team_id"] for t in fleet.admin("team", "list", "--json") if t["name"] == "default"][0]
    dk = fleet.admin("key", "create", "--team", team_id, "--kind", "dk", "--json")["key"]
    ak = fleet.admin("key", "create", "--team", team_id, "--kind", "ak", "--json")["key"]
    fleet.start_agent("revoked", ["a"], key=ak)
    wait_for(lambda: fleet.agent_id("c", "revoked"), what="agent with its own key seen at c")
    for gateway in ("a", "b", "c"):
        assert fleet.api(gateway, "GET", "/api/v1/agents", key=dk)[0] == 200
    fleet.admin("key", "revoke", "--team", team_id, dk, "--redis", fleet.redis_url)
    started = time.monotonic()  # the command returned: the store and Redis have it
    for gateway in ("b", "c", "a"):
        wait_for(lambda g=gateway: fleet.api(g, "GET", "/api/v1/agents", key=dk)[0] == 401, timeout=2,
                 what=f"dk- key refused at {gateway}")
    print(f"\n[fleet] dk- key refused at all three gateways {time.monotonic() - started:.3f}s after the revoke")
    fleet.admin("key", "revoke", "--team", team_id, ak, "--redis", fleet.redis_url)
    started = time.monotonic()
    wait_for(lambda: fleet.agent_id("c", "revoked") is None, timeout=3, what="revoked agent gone at c")
    print(f"[fleet] agent of a revoked ak- key offline at c {time.monotonic() - started:.3f}s after the revoke")
    _stop(fleet.agents.pop("revoked"))


def _raw_upgrade(port: int, headers: dict[str, str]) -> bytes:
    request = (f"GET /api/v1/fleet/peer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request.encode())
        return sock.recv(4096)


def test_peer_session_needs_the_fleet_secret(fleet):
    port = fleet.port("a")
    for headers in ({}, {"X-Relay-Fleet-Secret": "wrong"}, {"X-Relay-Fleet-Secret": SECRET + "x"}):
        answer = _raw_upgrade(port, {"X-Relay-Gateway-Id": "intruder", **headers})
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        assert SECRET.encode() not in answer
    answer = _raw_upgrade(port, {"X-Relay-Gateway-Id": "tester", "X-Relay-Fleet-Secret": SECRET})
    assert answer.startswith(b"HTTP/1.1 101"), answer[:200]
    log = (fleet.workdir / "gateway-a.log").read_text()
    assert "wrong or missing fleet secret" in log and SECRET not in log


def test_forward_naming_another_team_is_refused(fleet, targets):
    team2 = fleet.admin("team", "create", "other", "--json")
    ak2, sk2 = team2["keys"]["ak"], team2["keys"]["sk"]
    fleet.start_agent("team2", ["a"], key=ak2, allow=(f"127.0.0.1:{targets.echo_port}",))
    other_agent = wait_for(lambda: fleet.agent_id("a", "team2", key=sk2), what="team2 agent")
    default_id = [t["team_id"] for t in fleet.admin("team", "list", "--json") if t["name"] == "default"][0]

    from relay.aio import StreamRefused
    from relay.gateway.fleet.control import encode, read_frame
    from relay.gateway.fleet.peers import PeerPool
    from relay.mux.errors import ErrorCode

    async def forge() -> tuple[Any, bytes]:
        pool = PeerPool("forger", SECRET, lambda stream: stream.refuse())
        session = await pool._dial("a", f"http://127.0.0.1:{fleet.port('a')}")
        meta = {"protocol": "tcp", "target": f"127.0.0.1:{targets.echo_port}"}
        forged = session.open_stream_nowait({"agent": other_agent, "team": default_id, "meta": meta})
        try:
            await forged.wait_accepted()
            refusal = None
        except StreamRefused as exc:
            refusal = exc
        honest = session.open_stream_nowait({"agent": other_agent, "team": team2["team_id"], "meta": meta})
        honest.write(b"same team")
        echoed = await asyncio.wait_for(honest.readexactly(9), 10)
        # Control requests obey the same check: another team's agent is NOT_ALLOWED.
        bind = {"type": "bind", "request_id": "r1", "tunnel_id": "t1", "local_port": free_port(),
                "hub": {"host": "127.0.0.1", "port": targets.echo_port}, "protocol": "tcp"}
        for kind, body in (("bind", bind), ("hello", {})):
            forged = session.open_stream_nowait({"ctl": kind, "team": default_id, "agent": other_agent})
            forged.write(encode(body))
            try:
                await forged.wait_accepted()
                refusals[kind] = None
            except StreamRefused as exc:
                refusals[kind] = exc
        # The same hello for the right team is answered.
        honest_hello = session.open_stream_nowait({"ctl": "hello", "team": team2["team_id"], "agent": other_agent})
        honest_hello.write(encode({}))
        hello = await asyncio.wait_for(read_frame(honest_hello), 10)
        session.close()
        return refusal, echoed, hello

    refusals: dict[str, Any] = {}
    refusal, echoed, hello = asyncio.run(forge())
    assert refusal is not None and refusal.error_code == ErrorCode.NOT_ALLOWED
    assert echoed == b"same team"
    for kind in ("bind", "hello"):
        assert refusals[kind] is not None and refusals[kind].error_code == ErrorCode.NOT_ALLOWED, kind
    assert hello["info"]["name"] == "team2"
    assert "a bind control request forwarded by a peer" in (fleet.workdir / "gateway-a.log").read_text()
    assert "in another team" in (fleet.workdir / "gateway-a.log").read_text()
    # Nor does any API route another team's agent: 404 at every gateway.
    for gateway in ("b", "c"):
        status, _ = fleet.api(gateway, "POST", f"/api/v1/agents/{other_agent}/tunnel",
                              {"target_port": targets.echo_port, "tunnel_protocol": "tcp"})
        assert status == 404
    _stop(fleet.agents.pop("team2"))


def control_requests(fleet: Fleet, gateway: str, kind: str) -> float:
    """Control requests of ``kind`` the gateway served for the others (its /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{fleet.port(gateway)}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    found = re.search(r'relay_fleet_control_requests_in_total\{kind="%s"\} (\S+)' % kind, metrics)
    return float(found.group(1)) if found else 0.0


def sse_events(fleet: Fleet, gateway: str, path: str, timeout: float = 30) -> list[tuple[str, Any]]:
    """A whole Server-Sent Events response (the server closes after the final event)."""
    conn = http.client.HTTPConnection("127.0.0.1", fleet.port(gateway), timeout=timeout)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {fleet.keys['sk']}"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        body = resp.read().decode()
    finally:
        conn.close()
    events = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_a_task_submitted_anywhere_runs_on_an_agent_held_elsewhere(fleet):
    """Only ``worker`` (held by a) has the label: tasks submitted at b and at c are
    offered to a, dispatched there, and their progress, outputs and result stream at the
    gateway they were submitted to; every gateway answers their status."""
    fleet.start_agent("worker", ["a"], extra=("--label", "fleet-worker"))
    worker = wait_for(lambda: fleet.agent_id("c", "worker"), what="worker seen at c")
    assert fleet.holder(worker)[0] == "a"
    try:
        for gateway, other in (("b", "c"), ("c", "a")):
            status, answer = fleet.api(gateway, "POST", "/api/v1/tasks",
                                       {"kind": "count", "input": {"to": 3, "delay": 0.05}, "labels": ["fleet-worker"]})
            assert status == 202, answer
            events = sse_events(fleet, gateway, f"/api/v1/tasks/{answer['task_id']}/events")
            kinds = [kind for kind, _ in events]
            assert kinds[0] == "status" and events[0][1]["status"] == "queued", events
            assert ("status", {"type": "status", "status": "dispatched", "agent_id": worker}) in events, events
            assert [data["output"] for kind, data in events if kind == "output"] == [1, 2, 3], events
            assert "progress" in kinds and kinds[-1] == "result", events
            assert events[-1][1]["result"] == {"count": 3}
            assert control_requests(fleet, "a", "task") >= 1  # offered to a, not run anywhere else
            path = f"/api/v1/tasks/{answer['task_id']}"
            for where in (gateway, other):  # from memory, then from the row (written just after)
                wait_for(lambda w=where, p=path: fleet.api(w, "GET", p)[1].get("status") == "succeeded",
                         timeout=5, what=f"task succeeded, read at {where}")
                status, task = fleet.api(where, "GET", path)
                assert status == 200 and task["agent_id"] == worker and task["result"] == {"count": 3}, task
        # Events read at a gateway that does not hold the task follow its row to the end.
        status, answer = fleet.api("b", "POST", "/api/v1/tasks",
                                   {"kind": "sleep", "input": {"seconds": 1}, "labels": ["fleet-worker"]})
        assert status == 202, answer
        events = sse_events(fleet, "c", f"/api/v1/tasks/{answer['task_id']}/events")
        assert events[-1] == ("result", {"type": "result", "result": {"slept": 1}}), events
        # Another gateway restarting leaves a running task alone (it recovers only its
        # own tasks); then the worker goes away mid-task: the task fails, at b.
        status, answer = fleet.api("b", "POST", "/api/v1/tasks",
                                   {"kind": "sleep", "input": {"seconds": 30}, "labels": ["fleet-worker"]})
        assert status == 202, answer
        wait_for(lambda: fleet.api("b", "GET", f"/api/v1/tasks/{answer['task_id']}")[1]["status"] == "running",
                 what="long task running")
        fleet.restart_gateway("c")
        status, task = fleet.api("c", "GET", f"/api/v1/tasks/{answer['task_id']}")
        assert status == 200 and task["status"] == "running", task
        _stop(fleet.agents.pop("worker"))
        wait_for(lambda: fleet.api("b", "GET", f"/api/v1/tasks/{answer['task_id']}")[1]["status"] == "failed",
                 what="task failed when its agent left")
        assert fleet.api("b", "GET", f"/api/v1/tasks/{answer['task_id']}")[1]["error"] == "agent disconnected"
    finally:
        _stop(fleet.agents.pop("worker", None))


def test_a_task_fails_when_the_gateway_holding_its_agent_dies(fleet):
    """kill -9 of the gateway holding the agent that runs a task submitted at b: the
    control stream breaks, and b fails the task ("agent disconnected") at once."""
    fleet.start_gateway("f")
    fleet.start_agent("doomed", ["f"], extra=("--label", "fleet-doomed"))
    agent_id = wait_for(lambda: fleet.agent_id("b", "doomed"), what="doomed seen at b")
    try:
        status, answer = fleet.api("b", "POST", "/api/v1/tasks",
                                   {"kind": "sleep", "input": {"seconds": 30}, "labels": ["fleet-doomed"]})
        assert status == 202, answer
        path = f"/api/v1/tasks/{answer['task_id']}"
        wait_for(lambda: fleet.api("b", "GET", path)[1]["status"] == "running", what="task running on f")
        assert fleet.api("b", "GET", path)[1]["agent_id"] == agent_id
        proc, _ = fleet.gateways.pop("f")
        proc.kill()
        proc.wait(10)
        wait_for(lambda: fleet.api("b", "GET", path)[1]["status"] == "failed", timeout=10, what="task failed at b")
        assert fleet.api("b", "GET", path)[1]["error"] == "agent disconnected"
        wait_for(lambda: fleet.api("c", "GET", path)[1]["status"] == "failed", timeout=5,
                 what="the row failed too (read at c)")
    finally:
        _stop(fleet.agents.pop("doomed", None))


def test_tunnels_api_connect_at_b_binds_an_agent_held_by_a(fleet, targets):
    """A tunnel created at c (to the echo behind on-b, held by b), bound by connect at b
    on on-a (held by a): bytes flow through the binding; deleted at a, it is gone at
    every gateway."""
    on_a, on_b = fleet.agent_id("b", "on-a"), fleet.agent_id("b", "on-b")
    status, tunnel = fleet.api("c", "POST", "/api/v1/tunnels", {
        "target": f"127.0.0.1:{targets.echo_port}", "agent_id": on_b, "protocol": "tcp", "name": "bound"})
    assert status == 201, tunnel
    local_port = free_port()
    status, bound = fleet.api("b", "POST", f"/api/v1/tunnels/{tunnel['id']}/connect",
                              {"agent_id": on_a, "local_port": local_port})
    assert status == 200, bound
    assert bound["agent_id"] == on_a and bound["local_port"] == local_port
    assert control_requests(fleet, "a", "bind") >= 1
    wait_for(lambda: echo_works(local_port), timeout=10, what="echo through the binding")
    echo_checked(local_port, MiB)
    # A port the agent cannot take is the agent's own refusal, through the fleet too.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        status, error = fleet.api("b", "POST", f"/api/v1/tunnels/{tunnel['id']}/connect",
                                  {"agent_id": on_a, "local_port": taken.getsockname()[1]})
    assert status == 502 and error["error"]["code"] == "bind_failed", error
    for gateway in ("a", "b", "c"):
        status, seen = fleet.api(gateway, "GET", f"/api/v1/tunnels/{tunnel['id']}")
        assert status == 200 and seen["name"] == "bound", (gateway, seen)
    status, _ = fleet.api("a", "DELETE", f"/api/v1/tunnels/{tunnel['id']}")
    assert status == 204
    for gateway in ("a", "b", "c"):  # the others' caches are told at once (and poll the store)
        wait_for(lambda g=gateway: fleet.api(g, "GET", f"/api/v1/tunnels/{tunnel['id']}")[0] == 404, timeout=3,
                 what=f"tunnel gone at {gateway}")


class ThreadedOpenAI:
    """tests.support.openai_server.OpenAIServer on its own event loop in a thread."""

    def __init__(self, name: str) -> None:
        from tests.support.openai_server import OpenAIServer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(OpenAIServer(name, chunks=4, delay=0.05).start(),
                                                       self.loop).result(10)
        self.port = self.server.port

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_service_proxy_and_invoke_through_every_gateway(fleet):
    """A service declared by an agent held by a: every gateway knows its instance (from
    the agent's hello, asked of a), probes it, and answers the proxy (the OpenAI SDK,
    plain and streamed) and invoke."""
    openai = pytest.importorskip("openai")
    app = ThreadedOpenAI("behind-a")
    try:
        fleet.start_agent("llm-box", ["a"], extra=("--service", f"fleet-llm=127.0.0.1:{app.port}"))
        agent_id = wait_for(lambda: fleet.agent_id("c", "llm-box"), what="llm-box seen at c")
        assert fleet.holder(agent_id)[0] == "a"
        for gateway in ("b", "c", "a"):
            wait_for(lambda g=gateway: fleet.api(g, "GET", "/api/v1/r/containers/fleet-llm")[1]
                     .get("service_status") == "running", timeout=20, what=f"service running at {gateway}")
            status, service = fleet.api(gateway, "GET", "/api/v1/r/containers/fleet-llm")
            assert [(i["agent_id"], i["online"], i["healthy"]) for i in service["instances"]] == \
                [(agent_id, True, True)], (gateway, service)
            payload = os.urandom(2000)
            status, out = fleet.api(gateway, "POST", "/api/v1/r/invoke/fleet-llm",
                                    {"method": "POST", "path": "/echo/x?q=1",
                                     "body_base64": base64.b64encode(payload).decode()})
            assert status == 200 and out["status_code"] == 200, (gateway, out)
            assert base64.b64decode(out["body_base64"]) == payload
            headers = {k.lower(): v for k, v in out["headers"].items()}
            assert headers["x-served-by"] == "behind-a" and headers["x-echo-target"] == "/echo/x?q=1"
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{fleet.port(gateway)}/api/v1/r/containers/fleet-llm/v1",
                                   api_key=fleet.keys["sk"], max_retries=0, timeout=30)
            assert [m.id for m in client.models.list().data] == ["relay-test"]
            reply = client.chat.completions.create(model="relay-test", messages=[{"role": "user", "content": gateway}])
            assert reply.choices[0].message.content == f"echo: {gateway}"
            stream = client.chat.completions.create(model="relay-test", stream=True,
                                                    messages=[{"role": "user", "content": "count"}])
            assert [chunk.choices[0].delta.content for chunk in stream] == [f"w{i} " for i in range(4)]
            client.close()
        assert control_requests(fleet, "a", "hello") >= 2  # b and c asked a for the agent's hello
        # The agent leaves: no gateway routes to it any more.
        _stop(fleet.agents.pop("llm-box"))
        for gateway in ("b", "c"):
            wait_for(lambda g=gateway: fleet.api(g, "POST", "/api/v1/r/invoke/fleet-llm",
                                                 {"method": "GET", "path": "/v1/models"})[0] == 503,
                     timeout=10, what=f"service offline at {gateway}")
    finally:
        _stop(fleet.agents.pop("llm-box", None))
        app.close()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_kill9_of_the_holding_gateway_agent_with_one_connection_moves_to_a_survivor(fleet, targets, backend):
    d, mover = ("d", "mover") if backend == "asyncio" else ("d-trio", "mover-trio")
    fleet.start_gateway(d)
    fleet.start_agent(mover, [d, "a"], allow=(f"127.0.0.1:{targets.echo_port}",), connections=1,
                      extra=("--backend", backend))
    agent_id = wait_for(lambda: fleet.agent_id("b", mover), what="mover seen at b")
    assert fleet.holder(agent_id)[0] == d
    status, body = fleet.api("b", "POST", f"/api/v1/agents/{agent_id}/tunnel",
                             {"target_port": targets.echo_port, "tunnel_protocol": "tcp"})
    assert status == 200, body
    hub = body["hub_port"]
    wait_for(lambda: echo_works(hub), timeout=10, what="echo through b to d")
    proc, _ = fleet.gateways[d]
    started = time.monotonic()
    proc.kill()
    proc.wait(10)
    wait_for(lambda: echo_works(hub), timeout=20, what="echo through b after d died")
    print(f"\n[fleet] requests through b work again {time.monotonic() - started:.2f}s after kill -9 of "
          f"the gateway holding the agent")
    holder = fleet.holder(agent_id)
    assert holder is not None and holder[0] == "a"
    echo_checked(hub, MiB)
    _stop(fleet.agents.pop(mover))


def test_a_frozen_gateway_never_takes_its_agent_back(fleet, targets):
    fleet.start_gateway("e")
    first = fleet.start_agent("sticky", ["e"], allow=(f"127.0.0.1:{targets.echo_port}",))
    agent_id = wait_for(lambda: fleet.agent_id("c", "sticky"), what="sticky seen at c")
    gateway_e, _ = fleet.gateways["e"]
    old = fleet.holder(agent_id)
    assert old is not None and old[0] == "e"
    os.kill(gateway_e.pid, signal.SIGSTOP)
    try:
        first.kill()
        first.wait(10)
        # The same agent (key and name) connects again, through b, while e is frozen.
        fleet.start_agent("sticky", ["b"], allow=(f"127.0.0.1:{targets.echo_port}",))
        wait_for(lambda: (fleet.holder(agent_id) or ("", 0))[0] == "b", what="lease moved to b")
        new = fleet.holder(agent_id)
        assert new[1] > old[1]
        time.sleep(1.0)
    finally:
        os.kill(gateway_e.pid, signal.SIGCONT)
    # e wakes up with its old session and lease: its renewals must lose, every time.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert fleet.holder(agent_id) == new
        time.sleep(0.2)
    status, body = fleet.api("c", "POST", f"/api/v1/agents/{agent_id}/tunnel",
                             {"target_port": targets.echo_port, "tunnel_protocol": "tcp"})
    assert status == 200, body
    wait_for(lambda: echo_works(body["hub_port"]), timeout=10, what="echo through c to b")
    status, body = fleet.api("e", "POST", f"/api/v1/agents/{agent_id}/tunnel",
                             {"target_port": targets.echo_port, "tunnel_protocol": "tcp"})
    assert status == 200, body
    wait_for(lambda: echo_works(body["hub_port"]), timeout=10, what="echo through e to b")
    assert fleet.holder(agent_id) == new
    _stop(fleet.agents.pop("sticky"))


def test_a_gateway_without_redis_serves_its_own_agents_and_recovers(tmp_path, targets):
    redis_bin = require_binary("redis-server")
    port = free_port()

    def start_redis_on_port() -> subprocess.Popen:
        proc = subprocess.Popen([redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(tmp_path)],
                                stdout=(tmp_path / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        wait_for(lambda: _pong(port), what="redis up")
        return proc

    redis_proc = start_redis_on_port()
    alone = Fleet(tmp_path, f"redis://127.0.0.1:{port}/0")
    try:
        alone.start_gateway("solo")
        alone.start_agent("local", ["solo"], allow=(f"127.0.0.1:{targets.echo_port}",))
        agent_id = wait_for(lambda: alone.agent_id("solo", "local"), what="agent online")
        wait_for(lambda: alone.holder(agent_id), what="lease written")
        status, body = alone.api("solo", "POST", f"/api/v1/agents/{agent_id}/tunnel",
                                 {"target_port": targets.echo_port, "tunnel_protocol": "tcp"})
        assert status == 200, body
        hub = body["hub_port"]
        redis_proc.kill()
        redis_proc.wait(10)
        wait_for(lambda: alone.health("solo")["fleet"]["redis"] == "unreachable", timeout=15,
                 what="health says Redis is unreachable")
        assert alone.health("solo")["status"] == "degraded"
        echo_checked(hub, MiB)  # its own agent is still served
        with urllib.request.urlopen(f"http://127.0.0.1:{alone.port('solo')}/metrics", timeout=10) as resp:
            assert "relay_fleet_redis_up 0.0" in resp.read().decode()
        redis_proc = start_redis_on_port()  # empty: the registry is rebuilt from live sessions
        wait_for(lambda: alone.health("solo")["fleet"]["redis"] == "ok", timeout=15, what="Redis back")
        wait_for(lambda: alone.holder(agent_id), timeout=10, what="lease restored")
        assert alone.holder(agent_id)[0] == "solo"
        log = (tmp_path / "gateway-solo.log").read_text()
        assert "Redis unreachable" in log and "Redis reachable again" in log
        echo_checked(hub, MiB)
    finally:
        alone.close()
        redis_proc.kill()
        redis_proc.wait(10)


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _joined_at(fleet: Fleet, gateway: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{fleet.port(gateway)}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    found = re.search(r'relay_fleet_forwarded_streams_in_total\{result="joined"\} (\S+)', metrics)
    return float(found.group(1)) if found else 0.0


class PingPong(threading.Thread):
    """One connection through a hub port exchanging 4 KiB messages with the echo behind
    it, each checked byte for byte, until stopped; records whether it broke."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection((host, port), timeout=10)
        self.stop = threading.Event()
        self.rounds = 0
        self.broken = False
        self.wrong = False

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                payload = os.urandom(4096)
                self.sock.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    chunk = self.sock.recv(len(payload) - len(got))
                    if not chunk:
                        raise ConnectionError("closed")
                    got += chunk
                if got != payload:
                    self.wrong = True
                    return
                self.rounds += 1
                time.sleep(0.02)
        except OSError:
            self.broken = True
        finally:
            self.sock.close()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_two_connections_kill9_of_one_gateway_breaks_only_its_streams(fleet, targets, backend):
    """An agent holding sessions to g and c: both are in the registry; streams opened at
    b go to either; kill -9 of g breaks only the streams g carried, requests through b
    keep working at once, and the agent dials its third gateway (a) in g's place. Both
    agents (``--backend``) do this alike. (The session's hub port listens on every
    gateway: the streams are opened at gateway h, whose hub host, like g's, is an
    address of its own, so they all land at h and g's own listener dies with g unseen.)"""
    g, twin = ("g", "twin") if backend == "asyncio" else ("g-trio", "twin-trio")
    h = f"h-{backend}"
    fleet.start_gateway(g, extra=("--hub-host", "127.0.0.4"))
    fleet.start_gateway(h, extra=("--hub-host", "127.0.0.5"))
    at_h = "127.0.0.5"
    fleet.start_agent(twin, [g, "c", "a"], allow=(f"127.0.0.1:{targets.echo_port}",), connections=2,
                      extra=("--backend", backend))
    agent_id = wait_for(lambda: fleet.agent_id("b", twin), what="twin seen at b")
    wait_for(lambda: fleet.holders(agent_id).keys() == {g, "c"}, what="twin leased at g and c")
    status, body = fleet.api("b", "POST", f"/api/v1/agents/{agent_id}/tunnel",
                             {"target_port": targets.echo_port, "tunnel_protocol": "tcp"})
    assert status == 200, body
    hub = body["hub_port"]
    wait_for(lambda: echo_works(hub, at_h), timeout=10, what="echo through h")
    wait_for(lambda: fleet.health(h)["fleet"]["peers_connected"] >= 4, what="h's peer sessions to c and g")
    at_c = _joined_at(fleet, "c")
    streams = [PingPong(hub, at_h) for _ in range(6)]
    for stream in streams:
        stream.start()
    wait_for(lambda: all(s.rounds > 2 for s in streams), timeout=20, what="streams flowing")
    to_c = int(_joined_at(fleet, "c") - at_c)
    assert 0 < to_c < len(streams), f"{to_c} of {len(streams)} streams went to c"  # both carry some
    proc, _ = fleet.gateways[g]
    proc.kill()
    proc.wait(10)
    started = time.monotonic()
    wait_for(lambda: echo_works(hub, at_h), timeout=10, what="echo through h after g died")
    print(f"\n[fleet] two connections: requests through h work again {time.monotonic() - started:.2f}s after "
          f"kill -9 of one of the agent's gateways")
    rounds = [s.rounds for s in streams]
    wait_for(lambda: all(s.broken or s.rounds > r + 5 for s, r in zip(streams, rounds, strict=True)), timeout=20,
             what="every stream either broke or kept going")
    for stream in streams:
        stream.stop.set()
    for stream in streams:
        stream.join(10)
    assert not any(s.wrong for s in streams)
    survivors = [s for s in streams if not s.broken]
    assert len(survivors) == to_c, f"{len(survivors)} streams survived, c carried {to_c}"
    echo_checked(hub, MiB, at_h)
    # g's own field stays until its deadline (g died without releasing it; nobody uses it).
    wait_for(lambda: fleet.holders(agent_id).keys() >= {"c", "a"}, timeout=20,
             what="the agent's lost connection dialled a in g's place")
    _stop(fleet.agents.pop(twin))
    _stop(fleet.gateways.pop(h)[0])


def test_two_connections_a_frozen_gateway_never_comes_back_in_the_registry(fleet, targets):
    """An agent holding sessions to h and a; h is frozen (SIGSTOP); the agent process is
    replaced by a new one (same key and name) on b and c. When h resumes, its renewals
    lose, it ends its stale session, and the registry never lists h again."""
    fleet.start_gateway("h")
    first = fleet.start_agent("pair", ["h", "a"], allow=(f"127.0.0.1:{targets.echo_port}",))  # 2 by default
    agent_id = wait_for(lambda: fleet.agent_id("c", "pair"), what="pair seen at c")
    wait_for(lambda: fleet.holders(agent_id).keys() == {"h", "a"}, what="pair leased at h and a")
    gateway_h, _ = fleet.gateways["h"]
    os.kill(gateway_h.pid, signal.SIGSTOP)
    try:
        first.kill()
        first.wait(10)
        fleet.start_agent("pair", ["b", "c"], allow=(f"127.0.0.1:{targets.echo_port}",))
        wait_for(lambda: fleet.holders(agent_id).keys() == {"b", "c"}, what="the new process leased at b and c")
        new = fleet.holders(agent_id)
        time.sleep(1.0)
    finally:
        os.kill(gateway_h.pid, signal.SIGCONT)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert fleet.holders(agent_id) == new
        time.sleep(0.2)
    wait_for(lambda: "is stale" in (fleet.workdir / "gateway-h.log").read_text(), timeout=10,
             what="h ends its stale session")
    for gateway in ("h", "a"):
        status, body = fleet.api(gateway, "POST", f"/api/v1/agents/{agent_id}/tunnel",
                                 {"target_port": targets.echo_port, "tunnel_protocol": "tcp"})
        assert status == 200, body
        wait_for(lambda p=body["hub_port"]: echo_works(p), timeout=10, what=f"echo through {gateway}")
    assert fleet.holders(agent_id) == new
    _stop(fleet.agents.pop("pair"))


# ----------------------------------------------------------------------------- hub ports (item 5)


def test_a_tunnel_created_at_a_listens_on_every_gateway_and_stops_everywhere(fleet, targets):
    """Gateways x and y, started before the tunnel exists, put their hub ports on
    127.0.0.2 and 127.0.0.3 (as if on hosts of their own): the tunnel created at a
    listens on all of them at once and carries checksummed bytes to the agent held by a;
    paused at b, then deleted at c, its port closes on every gateway."""
    fleet.start_gateway("x", extra=("--hub-host", "127.0.0.2"))
    fleet.start_gateway("y", extra=("--hub-host", "127.0.0.3"))
    hosts = {"a": "127.0.0.1", "x": "127.0.0.2", "y": "127.0.0.3"}
    try:
        agent_id = fleet.agent_id("a", "on-a")
        status, tunnel = fleet.api("a", "POST", "/api/v1/tunnels", {
            "target": f"127.0.0.1:{targets.echo_port}", "agent_id": agent_id, "protocol": "tcp", "name": "everywhere"})
        created = time.monotonic()
        assert status == 201, tunnel
        hub = tunnel["hub_port"]
        wait_for(lambda: echo_works(hub, "127.0.0.3"), timeout=10, what="hub port at y")
        print(f"\nhub port of a tunnel created at a carries bytes at y after {time.monotonic() - created:.3f} s")
        for gateway, host in hosts.items():
            wait_for(lambda h=host: echo_works(hub, h), timeout=10, what=f"hub port at {gateway}")
            echo_checked(hub, 2 * MiB, host)
        for gateway in ("x", "y"):  # each counted connections of its own, through the fleet to a
            status, seen = fleet.api(gateway, "GET", f"/api/v1/tunnels/{tunnel['id']}")
            assert status == 200 and seen["status"] == "active" and seen["connections"] >= 2, seen

        status, paused = fleet.api("b", "PATCH", f"/api/v1/tunnels/{tunnel['id']}", {"status": "paused"})
        assert status == 200 and paused["status"] == "paused", paused
        for gateway, host in hosts.items():
            wait_for(lambda h=host: refused(hub, h), timeout=3, what=f"hub port closed at {gateway}")
        status, resumed = fleet.api("y", "PATCH", f"/api/v1/tunnels/{tunnel['id']}", {"status": "active"})
        assert status == 200 and resumed["hub_port"] == hub, resumed
        for gateway, host in hosts.items():
            wait_for(lambda h=host: echo_works(hub, h), timeout=10, what=f"hub port open again at {gateway}")

        status, _ = fleet.api("c", "DELETE", f"/api/v1/tunnels/{tunnel['id']}")
        deleted = time.monotonic()
        assert status == 204
        for gateway, host in hosts.items():
            wait_for(lambda h=host: refused(hub, h), timeout=3, what=f"hub port closed at {gateway}")
        print(f"deleted at c: hub port closed at a, x and y within {time.monotonic() - deleted:.3f} s")
    finally:
        for name in ("x", "y"):
            _stop(fleet.gateways.pop(name)[0])


def test_a_hub_port_busy_on_one_host_is_that_gateways_error_only(fleet, targets):
    """The port asked for is taken on z's hub host by another program: z says so in the
    tunnel's status (naming itself), a serves it; once freed, z listens too."""
    fleet.start_gateway("z", extra=("--hub-host", "127.0.0.2"))
    squatter = socket.create_server(("127.0.0.2", 0))
    port = squatter.getsockname()[1]
    try:
        agent_id = fleet.agent_id("a", "on-a")
        status, tunnel = fleet.api("b", "POST", "/api/v1/tunnels", {
            "target": f"127.0.0.1:{targets.echo_port}", "agent_id": agent_id, "protocol": "tcp",
            "hub_port": port, "name": "busy-on-d"})
        assert status == 201 and tunnel["status"] == "active", tunnel
        seen = wait_for(lambda: (lambda t: t if "on gateway z" in (t["error"] or "") else None)(
            fleet.api("z", "GET", f"/api/v1/tunnels/{tunnel['id']}")[1]), timeout=10, what="z reports the bind failure")
        assert seen["status"] == "error" and f"hub port {port} on gateway z" in seen["error"], seen
        assert "in use" in seen["error"], seen
        echo_checked(port, MiB)  # 127.0.0.1: the other gateways serve it
        squatter.close()
        wait_for(lambda: echo_works(port, "127.0.0.2"), timeout=15, what="z listens once the port is free")
        assert fleet.api("z", "GET", f"/api/v1/tunnels/{tunnel['id']}")[1]["status"] == "active"
        status, _ = fleet.api("a", "DELETE", f"/api/v1/tunnels/{tunnel['id']}")
        assert status == 204
    finally:
        squatter.close()
        _stop(fleet.gateways.pop("z")[0])


def test_a_udp_tunnel_hub_port_is_shared_by_every_gateway(fleet):
    """A udp tunnel created at a: b and c bind its port too (SO_REUSEPORT for datagrams:
    each client address stays on one gateway), and datagrams from several clients come
    back from the agent held by b; deleted at c, no gateway keeps it."""
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.settimeout(0.5)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = echo.recvfrom(65536)
            except OSError:
                continue
            echo.sendto(b"echo:" + data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    clients: list[socket.socket] = []
    try:
        fleet.start_agent("udp-agent", ["b"], allow=(f"127.0.0.1:{echo.getsockname()[1]}",))
        agent_id = wait_for(lambda: fleet.agent_id("a", "udp-agent"), what="udp agent seen by a")
        status, tunnel = fleet.api("a", "POST", "/api/v1/tunnels", {
            "target": f"127.0.0.1:{echo.getsockname()[1]}", "agent_id": agent_id, "protocol": "udp"})
        assert status == 201, tunnel
        for gateway in "abc":
            wait_for(lambda g=gateway: fleet.api(g, "GET", f"/api/v1/tunnels/{tunnel['id']}")[1]["status"]
                     == "active", timeout=10, what=f"udp hub port bound at {gateway}")
        for n in range(6):
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.settimeout(1.0)
            clients.append(client)
            payload = f"datagram {n}".encode()
            for _ in range(10):  # datagrams may be lost while the flow opens: bounded retries
                client.sendto(payload, ("127.0.0.1", tunnel["hub_port"]))
                try:
                    if client.recv(65536) == b"echo:" + payload:
                        break
                except TimeoutError:
                    continue
            else:
                raise AssertionError(f"no echo for client {n}")
        status, _ = fleet.api("c", "DELETE", f"/api/v1/tunnels/{tunnel['id']}")
        assert status == 204
        for gateway in "abc":
            status, _ = fleet.api(gateway, "GET", f"/api/v1/tunnels/{tunnel['id']}")
            assert status == 404, gateway
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the port is free again: nobody holds it
        wait_for(lambda: _binds(probe, tunnel["hub_port"]), timeout=5, what="udp hub port released by all")
        probe.close()
    finally:
        stop.set()
        thread.join(5)
        echo.close()
        for client in clients:
            client.close()
        if "udp-agent" in fleet.agents:
            _stop(fleet.agents.pop("udp-agent"))


def _binds(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


def test_concurrent_tunnel_creations_never_share_a_port(fleet, targets):
    """Creations at a, b and c at once: every free port picked is different; the same
    port asked for at all three is given to exactly one (the others: 409)."""
    agent_id = fleet.agent_id("a", "on-a")
    created: list[str] = []

    def create(gateway: str, results: list[tuple[int, Any]], hub_port: Optional[int] = None) -> None:
        body: dict[str, Any] = {"target": f"127.0.0.1:{targets.echo_port}", "agent_id": agent_id,
                                "protocol": "tcp"}
        if hub_port is not None:
            body["hub_port"] = hub_port
        results.append(fleet.api(gateway, "POST", "/api/v1/tunnels", body))

    def at_once(calls: list[tuple[str, Optional[int]]]) -> list[tuple[int, Any]]:
        results: list[tuple[int, Any]] = []
        threads = [threading.Thread(target=create, args=(g, results, p)) for g, p in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        created.extend(body["id"] for status, body in results if status == 201)
        return results

    try:
        results = at_once([(g, None) for g in "abcabcabc"])
        assert [status for status, _ in results] == [201] * 9, results
        ports = [body["hub_port"] for _, body in results]
        assert len(set(ports)) == 9, ports
        for _ in range(3):  # a few rounds: each a race for one port
            wanted = free_port()
            results = at_once([(g, wanted) for g in "abc"])
            assert sorted(status for status, _ in results) == [201, 409, 409], results
            assert all(body["error"]["code"] == "hub_port_taken" for status, body in results if status == 409)
        status, listed = fleet.api("b", "GET", "/api/v1/tunnels")
        recorded = [t["hub_port"] for t in listed["tunnels"] if t["id"] in created]
        assert len(recorded) == len(created) == 12 and len(set(recorded)) == 12, recorded
        port = [t["hub_port"] for t in listed["tunnels"] if t["id"] == created[-1]][0]
        wait_for(lambda: echo_works(port), timeout=10, what="the winner's hub port")
    finally:
        for tunnel_id in created:
            fleet.api("c", "DELETE", f"/api/v1/tunnels/{tunnel_id}")


# ----------------------------------------------------------------------------- --workers (item 7)


def _workers_lines(log: Path) -> dict[int, tuple[int, str, str]]:
    """The newest ``worker I started: pid P, id ID, peers at URL`` line of each worker."""
    found: dict[int, tuple[int, str, str]] = {}
    for index, pid, gateway_id, url in re.findall(
            r"worker (\d+) started: pid (\d+), id (\S+), peers at (\S+)", log.read_text()):
        found[int(index)] = (int(pid), gateway_id, url)
    return found


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_workers_share_one_port_forward_to_each_other_and_are_supervised(request, backend, tmp_path, redis, targets):
    """``relay gateway --workers 2`` (on the shared SQLite file, then on PostgreSQL):
    connections to the one port (API, agents, a hub port) land on both workers, and
    reach agents held by either; a worker killed with SIGKILL is started again; SIGTERM
    to the parent stops everything."""
    import psutil

    port = free_port()
    log = tmp_path / "workers.log"
    store = ["--store", request.getfixturevalue("pg_databases").create()] if backend == "postgres" else []
    parent = _spawn(["gateway", "--workers", "2", "--listen", f"127.0.0.1:{port}", "--data", str(tmp_path / "data"),
                     *store, "--redis", f"redis://127.0.0.1:{redis.port}/{3 if store else 1}",
                     "--log-level", "info"], log)
    agents: list[subprocess.Popen] = []
    try:
        wait_for(lambda: log.read_text().count("in the fleet, advertised at") >= 2 or parent.poll() is not None,
                 timeout=60, what="two workers in the fleet")
        assert parent.poll() is None, log.read_text()[-3000:]
        workers = _workers_lines(log)
        assert sorted(workers) == [1, 2], log.read_text()[-3000:]
        keys = dict(re.findall(r"^  (sk|dk|ak)  (\S+)$", log.read_text(), re.M))
        assert log.read_text().count("  sk  ") == 1  # the default team's keys, printed once
        base = f"http://127.0.0.1:{port}"

        # The API on the one port: answered by both workers.
        seen = set()
        for _ in range(200):
            seen.add(_get_json(f"{base}/healthz")["fleet"]["gateway_id"])
            if len(seen) == 2:
                break
        assert seen == {workers[1][1], workers[2][1]}, seen

        # Agents dial the one port: start some until each worker holds one.
        def held(index: int) -> int:
            return int(_get_json(f"{workers[index][2]}/healthz")["fleet"]["leases"])

        for n in range(12):
            agents.append(_spawn(["agent", "--name", f"w-agent-{n}", "--gateway", base,
                                  "--allow", f"127.0.0.1:{targets.echo_port}"],
                                 tmp_path / f"agent-{n}.log", env={"RELAY_AGENT_KEY": keys["ak"]}))
            wait_for(lambda count=n + 1: held(1) + held(2) >= count, timeout=30, what=f"agent {n} connected")
            if held(1) and held(2):
                break
        assert held(1) >= 1 and held(2) >= 1

        def api(method: str, path: str, body: Any = None, url: str = base) -> tuple[int, Any]:
            request = urllib.request.Request(f"{url}{path}", method=method,
                                             data=None if body is None else json.dumps(body).encode(),
                                             headers={"Authorization": f"Bearer {keys['sk']}"})
            try:
                with urllib.request.urlopen(request, timeout=10) as resp:
                    return resp.status, json.loads(resp.read() or b"null")
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read() or b"null")

        # A tcp tunnel per agent: its hub port is shared by both workers too, so each
        # connection lands on either, and reaches the agent wherever it is held.
        status, listed = api("GET", "/api/v1/agents")
        online = [a["agent_id"] for a in listed["agents"] if a["online"]]
        assert len(online) == len(agents), listed
        tunnels = []
        for agent_id in online:
            status, tunnel = api("POST", "/api/v1/tunnels", {"target": f"127.0.0.1:{targets.echo_port}",
                                                             "agent_id": agent_id, "protocol": "tcp"})
            assert status == 201, tunnel
            tunnels.append(tunnel)
        for tunnel in tunnels:
            for index in (1, 2):
                wait_for(lambda t=tunnel, i=index: api("GET", f"/api/v1/tunnels/{t['id']}", url=workers[i][2])[1]
                         ["status"] == "active", timeout=10, what=f"hub port on worker {index}")
            for _ in range(40):
                echo_checked(tunnel["hub_port"], 64 * 1024)
                counts = [api("GET", f"/api/v1/tunnels/{tunnel['id']}", url=workers[i][2])[1]["connections"]
                          for i in (1, 2)]
                if all(counts):
                    break
            assert all(counts), counts  # both workers took connections to this hub port
            echo_checked(tunnel["hub_port"], 2 * MiB)

        # SIGKILL one worker: the parent starts it again, under a new id, same peer port.
        killed_pid = workers[1][0]
        os.kill(killed_pid, signal.SIGKILL)
        wait_for(lambda: _workers_lines(log)[1][0] != killed_pid, timeout=20, what="worker 1 restarted")
        assert re.search(rf"worker 1 \(pid {killed_pid}\) was killed by SIGKILL; restarting", log.read_text())
        restarted = _workers_lines(log)[1]
        wait_for(lambda: f"relay gateway {restarted[1]} in the fleet" in log.read_text(), timeout=30,
                 what="restarted worker serving")
        for tunnel in tunnels:  # agents of the dead worker come back through the one port
            wait_for(lambda t=tunnel: echo_works(t["hub_port"]), timeout=30, what="tunnel works again")
            for _ in range(10):
                echo_checked(tunnel["hub_port"], 64 * 1024)

        # SIGTERM to the parent: it and every worker stop, nothing is left behind.
        pids = [parent.pid] + [pid for pid, _, _ in _workers_lines(log).values()]
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(30) == 0, log.read_text()[-3000:]
        wait_for(lambda: not any(psutil.pid_exists(pid) for pid in pids), timeout=10, what="no worker left")
        assert "stopped 2 workers (SIGTERM)" in log.read_text()
    finally:
        for proc in agents:
            _stop(proc)
        _stop(parent)


def test_workers_refuse_bad_combinations(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "relay", "gateway", "--data", str(tmp_path), *args],
                              capture_output=True, text=True, timeout=60)

    done = run("--workers", "2", "--listen", "127.0.0.1:0")
    assert done.returncode == 2 and "--workers needs --redis" in done.stderr, done.stderr
    done = run("--workers", "2", "--listen", "127.0.0.1:0", "--redis", "redis://127.0.0.1:1/0",
               "--fleet-ca", __file__)
    assert done.returncode == 2 and "drop --fleet-ca" in done.stderr, done.stderr
    done = run("--workers", "0", "--redis", "redis://127.0.0.1:1/0")
    assert done.returncode == 2 and "--workers" in done.stderr, done.stderr
    with socket.create_server(("127.0.0.1", 0)) as taken:  # no SO_REUSEPORT: the parent says so
        done = run("--workers", "2", "--listen", f"127.0.0.1:{taken.getsockname()[1]}",
                   "--redis", "redis://127.0.0.1:1/0")
    assert done.returncode == 1 and "cannot listen on" in done.stderr, done.stderr
    # Workers that cannot start (no PostgreSQL there): the parent stops, non-zero, once.
    done = run("--workers", "2", "--listen", "127.0.0.1:0", "--redis", "redis://127.0.0.1:1/0",
               "--store", f"postgresql://relay@127.0.0.1:{free_port()}/relay")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "before it listened: stopping the others" in done.stdout, done.stdout
    assert "cannot connect to PostgreSQL" in done.stderr, done.stderr


# ----------------------------------------------------------------------------- PostgreSQL outage (item 6)


def _postgres_again(server: PostgresServer, log: Path) -> subprocess.Popen:
    """Start the stopped ``server`` again: same data directory, same port (as its user)."""
    import pwd

    account = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(server.bin_dir / "postgres"), "-D", str(server.data_dir), "-h", server.host,
             "-p", str(server.port), "-k", str(server.socket_dir), "-c", "fsync=off",
             "-c", "max_connections=200", "-c", "logging_collector=off"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            user=account.pw_uid if account else None, group=account.pw_gid if account else None,
            extra_groups=[] if account else None, cwd=server.data_dir.parent,
            env={"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C", "LANG": "C", "TZ": "UTC"})
    return proc


def test_postgres_outage_writes_503_traffic_flows_then_everything_converges(tmp_path, redis, targets):
    """Two gateways on a private PostgreSQL: stopped, API writes answer 503 JSON at both
    while tunnels in use carry bytes (a tunnel URL a gateway never served needs the
    store, and answers 503 meanwhile); started again, without restarting a gateway, writes work,
    what was acknowledged before is all there, and a tunnel created now listens on both."""
    import psutil

    web = HttpTarget()
    again: Optional[subprocess.Popen] = None
    with start_postgres() as server:
        running = Fleet(tmp_path, f"redis://127.0.0.1:{redis.port}/2", server.dsn)
        try:
            running.start_gateway("pa")
            running.start_gateway("pb", extra=("--hub-host", "127.0.0.2"))
            running.start_agent("pg-agent", ["pa"], allow=(f"127.0.0.1:{targets.echo_port}",
                                                         f"127.0.0.1:{web.port}"))
            agent_id = wait_for(lambda: running.agent_id("pb", "pg-agent"), what="agent seen by pb")
            status, tcp = running.api("pa", "POST", "/api/v1/tunnels", {
                "target": f"127.0.0.1:{targets.echo_port}", "agent_id": agent_id, "protocol": "tcp"})
            assert status == 201, tcp
            hub = tcp["hub_port"]
            wait_for(lambda: echo_works(hub, "127.0.0.2"), timeout=10, what="hub port at pb")
            status, site = running.api("pb", "POST", f"/api/v1/agents/{agent_id}/tunnel", {"target_port": web.port})
            assert status == 200, site
            path = site["tunnel_url"].split(f":{running.port('pb')}", 1)[1]
            for gateway in ("pa", "pb"):  # in use at both: live traffic, its session in memory
                assert http_get(f"http://127.0.0.1:{running.port(gateway)}{path}before")[0] == 200
            status, unused = running.api("pa", "POST", f"/api/v1/agents/{agent_id}/tunnel", {"target_port": web.port})
            assert status == 200, unused
            unused_path = unused["tunnel_url"].split(f":{running.port('pa')}", 1)[1]
            status, last = running.api("pb", "POST", "/api/v1/tunnels", {  # acknowledged just before the stop
                "target": f"127.0.0.1:{targets.echo_port}", "agent_id": agent_id, "protocol": "tcp", "name": "last"})
            assert status == 201, last

            postmaster = psutil.Process(server.pid)
            postmaster.send_signal(signal.SIGINT)  # a fast shutdown: every connection is cut
            postmaster.wait(30)
            for gateway in ("pa", "pb"):
                status, body = running.api(gateway, "POST", "/api/v1/tunnels", {
                    "target": f"127.0.0.1:{targets.echo_port}", "agent_id": agent_id, "protocol": "tcp"})
                assert status == 503 and body["error"]["code"] == "store_unavailable", (gateway, status, body)
                # Live traffic goes on: the hub port at both, the HTTP tunnel through both.
                echo_checked(hub, MiB, "127.0.0.1" if gateway == "pa" else "127.0.0.2")
                status, got = http_get(f"http://127.0.0.1:{running.port(gateway)}{path}during")
                assert status == 200 and got == b"hello from behind the agent /during", (gateway, status, got)
            # A tunnel URL never served needs the store: 503, and the database stays unnamed.
            status, got = http_get(f"http://127.0.0.1:{running.port('pb')}{unused_path}x")
            assert status == 503 and b"store_unavailable" in got, (status, got)
            assert b"postgres" not in got and str(server.port).encode() not in got, got
            assert all(proc.poll() is None for proc, _ in running.gateways.values())

            again = _postgres_again(server, tmp_path / "postgres-again.log")
            restarted = time.monotonic()
            for gateway in ("pa", "pb"):  # no restart of either gateway: they reconnect
                wait_for(lambda g=gateway: running.api(g, "GET", "/api/v1/tunnels")[0] == 200, timeout=60,
                         what=f"{gateway} reads again")
            print(f"\nboth gateways answer from PostgreSQL {time.monotonic() - restarted:.2f} s after its start "
                  "(its own start included)")
            status, after = running.api("pb", "POST", "/api/v1/tunnels", {
                "target": f"127.0.0.1:{targets.echo_port}", "agent_id": agent_id, "protocol": "tcp", "name": "after"})
            assert status == 201, after
            status, listed = running.api("pa", "GET", "/api/v1/tunnels")
            assert {tcp["id"], last["id"], after["id"]} <= {t["id"] for t in listed["tunnels"]}, listed
            for host in ("127.0.0.1", "127.0.0.2"):  # the new tunnel listens on both gateways
                wait_for(lambda h=host: echo_works(after["hub_port"], h), timeout=15, what=f"new hub port at {host}")
                echo_checked(hub, MiB, host)
            status, got = http_get(f"http://127.0.0.1:{running.port('pa')}{path}after")
            assert status == 200 and got == b"hello from behind the agent /after", (status, got)
        finally:
            running.close()
            web.close()
            if again is not None:
                again.send_signal(signal.SIGINT)
                try:
                    again.wait(30)
                except subprocess.TimeoutExpired:
                    again.kill()
                    again.wait(10)
