"""``relay gateway --workers N --advertise HOST``: workers another machine's gateways can
reach, so several machines' workers and gateways form one fleet (relay.gateway.fleet.workers).

Real processes on loopback, with 127.0.0.2 standing for a second machine's address:
``relay gateway --workers 2 --listen 127.0.0.2:PORT --advertise 127.0.0.2`` and a plain
gateway ``c`` on 127.0.0.1, sharing one Redis and one SQLite store. Each worker's peer
port listens on 127.0.0.2 (not on 127.0.0.1) and is what its lease advertises; a tunnel
opened at c reaches an agent a worker holds (c forwards to the worker's advertised
address), and one opened at the workers reaches an agent c holds.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.fleet.test_fleet import SECRET, Fleet, _spawn, _stop, _workers_lines, echo_works, refused
from tests.gateway.test_faults import Targets, wait_for
from tests.support.servers import require_binary, start_redis

pytestmark = pytest.mark.timeout(180)

HOST = "127.0.0.2"


def test_workers_advertising_a_host_join_a_fleet_with_another_gateway(tmp_path, targets: Targets) -> None:
    (tmp_path / "redis").mkdir()
    with start_redis(tmp_path / "redis") as server:
        redis_url = f"redis://127.0.0.1:{server.port}/0"
        fleet = Fleet(tmp_path, redis_url)
        log = tmp_path / "workers.log"
        parent = None
        try:
            fleet.start_gateway("c")
            parent = _spawn(["gateway", "--workers", "2", "--listen", f"{HOST}:0", "--advertise", HOST,
                             "--data", str(fleet.data), "--redis", redis_url, "--gateway-id", "wk",
                             "--log-level", "info"], log, env={"RELAY_FLEET_SECRET": SECRET})
            wait_for(lambda: log.read_text().count("in the fleet, advertised at") >= 2 or parent.poll() is not None,
                     timeout=60, what="two workers in the fleet")
            assert parent.poll() is None, log.read_text()[-3000:]
            port = int(re.search(rf"2 workers on {re.escape(HOST)}:(\d+)", log.read_text()).group(1))
            workers = _workers_lines(log)
            assert sorted(workers) == [1, 2], log.read_text()[-3000:]
            for _, gateway_id, url in workers.values():
                peer_port = int(url.rsplit(":", 1)[1])
                assert url == f"http://{HOST}:{peer_port}", url
                assert refused(peer_port, "127.0.0.1")  # listening on the advertised host only
                lease = subprocess.run([require_binary("redis-cli"), "-u", redis_url, "GET", f"relay:gw:{gateway_id}"],
                                       capture_output=True, text=True, timeout=10).stdout
                assert json.loads(lease)["url"] == url, lease
            wait_for(lambda: {"wk-w1", "wk-w2"} <= set(fleet.health("c")["fleet"]["gateways"]),
                     what="c sees both workers")

            # An agent on the workers' shared port; a tunnel opened at c (its hub port is c's).
            agent = _spawn(["agent", "--name", "at-workers", "--allow", f"127.0.0.1:{targets.echo_port}",
                            "--gateway", f"http://{HOST}:{port}"], tmp_path / "agent-at-workers.log",
                           env={"RELAY_AGENT_KEY": fleet.keys["ak"]})
            fleet.agents["at-workers"] = agent
            agent_id = wait_for(lambda: fleet.agent_id("c", "at-workers"), what="the workers' agent seen at c")
            holder = fleet.holder(agent_id)
            assert holder is not None and holder[0] in ("wk-w1", "wk-w2"), holder
            status, body = fleet.api("c", "POST", f"/api/v1/agents/{agent_id}/tunnel",
                                     {"target_port": targets.echo_port, "tunnel_protocol": "tcp"})
            assert status == 200, body
            wait_for(lambda: echo_works(body["hub_port"]), timeout=15, what="echo through c to a worker's agent")
            assert _forwarded_out(fleet.port("c")) > 0  # c carried it to the worker, not the kernel

            # The other way: an agent held by c, a tunnel opened at the workers' port.
            fleet.start_agent("at-c", ["c"], allow=(f"127.0.0.1:{targets.echo_port}",))
            other = wait_for(lambda: fleet.agent_id("c", "at-c"), what="c's agent online")
            assert (fleet.holder(other) or ("",))[0] == "c"
            status, body = _api(f"http://{HOST}:{port}", fleet.keys["sk"], f"/api/v1/agents/{other}/tunnel",
                                {"target_port": targets.echo_port, "tunnel_protocol": "tcp"})
            assert status == 200, body
            wait_for(lambda: echo_works(body["hub_port"], HOST) or echo_works(body["hub_port"]), timeout=15,
                     what="echo through a worker to c's agent")
        finally:
            fleet.close()
            _stop(parent)
    assert parent is None or parent.returncode is not None


def _forwarded_out(port: int) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(v) for v in re.findall(r"^relay_fleet_forwarded_streams_out_total(?:\{[^}]*\})? (\S+)$", text, re.M))


def _api(base: str, key: str, path: str, body: object) -> tuple[int, object]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_workers_advertise_is_a_host() -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "relay", "gateway", "--workers", "2", "--listen", "127.0.0.1:0",
                               "--redis", "redis://127.0.0.1:1/0", *args], capture_output=True, text=True, timeout=60)

    done = run("--advertise", "http://example.com:8080")
    assert done.returncode == 2 and "each worker advertises its own peer port" in done.stderr, done.stderr
    done = run("--advertise", "https://example.com")
    assert done.returncode == 2 and "plain HTTP" in done.stderr, done.stderr
    done = run("--advertise", "example.com/x")
    assert done.returncode == 2 and "HOST or http://HOST" in done.stderr, done.stderr
