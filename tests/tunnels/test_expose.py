"""One-command expose (issue 16): ``relay http PORT``, ``relay tcp PORT`` and ``relay agent
--tunnel`` as real processes against a real gateway process: the printed URL works, the
counters move, Ctrl-C closes the tunnel."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from relay.cli.expose import TunnelSpec, parse_tunnel_spec
from tests.gateway.test_observability import _get
from tests.support.servers import free_port

pytestmark = pytest.mark.timeout(150)


def test_parse_tunnel_spec():
    assert parse_tunnel_spec("http:8080") == TunnelSpec("http", 8080)
    assert parse_tunnel_spec("TCP:22") == TunnelSpec("tcp", 22)
    assert parse_tunnel_spec("3000") == TunnelSpec("http", 3000)
    for bad in ("udp:53", "http:0", "http:x", "http:70000", ""):
        with pytest.raises(ValueError):
            parse_tunnel_spec(bad)


def _wait(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 40) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace")
        match = re.search(pattern, text, re.M)
        if match:
            return match
        assert proc.poll() is None, text
        assert time.monotonic() < deadline, text
        time.sleep(0.05)


class Procs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_") or k == "RELAY_NO_EXTENSIONS"}
        self.env["PYTHONUNBUFFERED"] = "1"

    def start(self, name: str, *args: str, env: dict | None = None, cwd: Path | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.tmp / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
                                    env={**self.env, **(env or {})}, cwd=cwd)
        self.procs.append(proc)
        return proc, log

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _gateway(procs: Procs) -> tuple[str, dict[str, str]]:
    port = free_port()
    gw, log = procs.start("gateway", "-m", "relay", "gateway", "--listen", f"127.0.0.1:{port}",
                          "--data", str(procs.tmp / "data"))
    _wait(log, r"listening on", gw)
    keys = dict(re.findall(r"^  (sk|dk|ak)  (\S+)$", log.read_text(), re.M))
    return f"http://127.0.0.1:{port}", keys


def test_relay_http_prints_a_working_url_live_counters_and_closes_on_ctrl_c(tmp_path):
    procs = Procs(tmp_path)
    try:
        gateway, keys = _gateway(procs)
        web_port = free_port()
        (tmp_path / "index.html").write_text("exposed!")
        web, _ = procs.start("web", "-m", "http.server", str(web_port), "--bind", "127.0.0.1", cwd=tmp_path)
        env = {"RELAY_GATEWAY": gateway, "RELAY_AGENT_KEY": keys["ak"], "RELAY_KEY": keys["dk"]}
        exposer, log = procs.start("http", "-m", "relay", "http", str(web_port), "--name", "laptop", env=env)
        url = _wait(log, r"^  url +(http://\S+)$", exposer).group(1)
        deadline = time.monotonic() + 20
        while True:  # the web server may still be starting
            status, _, body = _get(url + "index.html")
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status == 200 and body == b"exposed!"
        _wait(log, rf"^{web_port}: [1-9]\d* requests \(0 active\), ", exposer)  # live counters
        # Only the exposed port is allowed: the agent is no open door to the machine.
        status, _, body = _get(gateway + "/api/v1/agents", {"Authorization": f"Bearer {keys['sk']}"})
        [agent] = json.loads(body)["agents"]
        other = free_port()
        status, _, body = _get(f"{gateway}/api/v1/agents/{agent['agent_id']}/tunnel",
                               {"Authorization": f"Bearer {keys['sk']}", "Content-Type": "application/json"},
                               json.dumps({"target_port": other}).encode())
        assert status == 403 and b"target_not_allowed" in body
        exposer.send_signal(signal.SIGINT)
        assert exposer.wait(20) == 0, log.read_text()
        assert re.search(r"^closed \S+$", log.read_text(), re.M), log.read_text()  # a dk- key: by its admin token
        status, _, _ = _get(url + "index.html")
        assert status == 404  # the tunnel is gone
        assert keys["dk"] not in log.read_text() and keys["ak"] not in log.read_text()
        web.terminate()
    finally:
        procs.close()


def test_relay_tcp_and_agent_tunnels_from_a_config_file(tmp_path):
    procs = Procs(tmp_path)
    try:
        gateway, keys = _gateway(procs)
        echo = socket.create_server(("127.0.0.1", 0))
        echo_port = echo.getsockname()[1]
        env = {"RELAY_GATEWAY": gateway, "RELAY_AGENT_KEY": keys["ak"], "RELAY_KEY": keys["sk"]}
        exposer, log = procs.start("tcp", "-m", "relay", "tcp", str(echo_port), "--name", "tcp-box", env=env)
        hub = int(_wait(log, r"^  hub port +127\.0\.0\.1:(\d+)$", exposer).group(1))
        assert re.search(r"^  url +ws://\S+/tcp$", log.read_text(), re.M)
        with socket.create_connection(("127.0.0.1", hub), timeout=10) as client:
            echo.settimeout(10)
            served, _ = echo.accept()
            with served:
                client.sendall(b"ping")
                assert served.recv(4) == b"ping"
                _wait(log, rf"^{echo_port}: 1 connections \(1 open\)$", exposer)
        exposer.send_signal(signal.SIGINT)
        assert exposer.wait(20) == 0, log.read_text()
        assert re.search(r"^closed \S+$", log.read_text(), re.M)  # an sk- key: through the API
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", hub), timeout=5).close()

        # relay agent with tunnels = [...] in its config file: opened once it connects.
        web_port = free_port()
        (tmp_path / "index.html").write_text("from config")
        procs.start("web", "-m", "http.server", str(web_port), "--bind", "127.0.0.1", cwd=tmp_path)
        config = tmp_path / "relay.toml"
        config.write_text(f'[agent]\nname = "configured"\ntunnels = ["http:{web_port}"]\n'
                          f'allow = ["127.0.0.1:1"]\n')
        agent, log = procs.start("agent", "-m", "relay", "agent", "--config", str(config), env=env)
        url = _wait(log, r"^  url +(http://\S+)$", agent).group(1)
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(url + "index.html", timeout=5) as resp:
                    body = resp.read()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert body == b"from config"  # allowed implicitly beside the file's allow list
        echo.close()
    finally:
        procs.close()
