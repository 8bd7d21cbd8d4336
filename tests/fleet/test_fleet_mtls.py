"""Mutual TLS between a fleet's gateways (issue 13: "authenticated with a fleet secret
... or mutual TLS"): two gateways serving TLS with certificates of one fleet CA, started
with ``--fleet-ca`` and no secret. A hub port at one carries bytes to an agent held by
the other over a peer session both certificates opened; a peer upgrade without a
certificate, or with one of another CA, is refused; clients without a certificate
(API calls, the agent) are served as before."""
from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
import trustme

from tests.fleet.test_fleet import _spawn, _stop, echo_checked, echo_works
from tests.gateway.test_faults import Targets, wait_for
from tests.support.servers import free_port, start_redis

PEER_PATH = "/api/v1/fleet/peer"


class TlsFleet:
    def __init__(self, workdir: Path, redis_url: str) -> None:
        self.workdir = workdir
        self.redis_url = redis_url
        self.ca = trustme.CA()
        self.ca_file = workdir / "fleet-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.context = ssl.create_default_context(cafile=str(self.ca_file))
        self.procs: list[subprocess.Popen] = []
        self.ports: dict[str, int] = {}
        self.keys: dict[str, str] = {}

    def issue(self, name: str, ca: Optional[trustme.CA] = None) -> tuple[Path, Path]:
        leaf = (ca or self.ca).issue_cert("127.0.0.1", common_name=name)
        cert, key = self.workdir / f"{name}.pem", self.workdir / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key

    def start_gateway(self, name: str) -> None:
        cert, key = self.issue(f"gateway-{name}")
        port = free_port()
        log = self.workdir / f"gateway-{name}.log"
        proc = _spawn(["gateway", "--listen", f"127.0.0.1:{port}", "--data", str(self.workdir / "data"),
                       "--redis", self.redis_url, "--gateway-id", name, "--tls-cert", str(cert), "--tls-key",
                       str(key), "--fleet-ca", str(self.ca_file), "--log-level", "info"], log,
                      env={"RELAY_FLEET_SECRET": ""})
        self.procs.append(proc)
        wait_for(lambda: b"in the fleet, advertised at" in log.read_bytes() or proc.poll() is not None,
                 what=f"gateway {name}")
        assert proc.poll() is None, log.read_text()[-3000:]
        self.ports[name] = port
        if not self.keys:
            self.keys = dict(re.findall(r"^  (sk|dk|ak)  (\S+)$", log.read_text(), re.M))

    def api(self, gateway: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        request = urllib.request.Request(f"https://127.0.0.1:{self.ports[gateway]}{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {self.keys['sk']}"})
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.context) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def close(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)


@pytest.fixture(scope="module")
def tls_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TlsFleet, Targets]]:
    workdir = tmp_path_factory.mktemp("fleet-mtls")
    targets = Targets()
    with start_redis(tmp_path_factory.mktemp("fleet-mtls-redis")) as redis:
        fleet = TlsFleet(workdir, f"redis://127.0.0.1:{redis.port}/0")
        try:
            fleet.start_gateway("a")
            fleet.start_gateway("b")
            agent = _spawn(["agent", "--gateway", f"https://127.0.0.1:{fleet.ports['a']}", "--ca-cert",
                            str(fleet.ca_file), "--name", "held-by-a", "--allow", f"127.0.0.1:{targets.echo_port}"],
                           workdir / "agent.log", env={"RELAY_AGENT_KEY": fleet.keys["ak"]})
            fleet.procs.append(agent)
            yield fleet, targets
        finally:
            fleet.close()
            targets.close()


def _online(fleet: TlsFleet, gateway: str) -> Optional[str]:
    status, body = fleet.api(gateway, "GET", "/api/v1/agents")
    online = [a["agent_id"] for a in body["agents"] if a["online"]] if status == 200 else []
    return online[0] if online else None


def test_a_hub_port_at_one_gateway_reaches_an_agent_held_by_the_other_over_mutual_tls(tls_fleet):
    fleet, targets = tls_fleet
    agent_id = wait_for(lambda: _online(fleet, "b"), what="the agent seen by b")
    status, body = fleet.api("b", "POST", f"/api/v1/agents/{agent_id}/tunnel",
                             {"target_port": targets.echo_port, "tunnel_protocol": "tcp"})
    assert status == 200, body
    hub = int(body["hub_port"])
    wait_for(lambda: echo_works(hub), what="echo through b's hub port (peer session to a)")
    echo_checked(hub, 4 * 1024 * 1024)
    logs = (fleet.workdir / "gateway-a.log").read_text() + (fleet.workdir / "gateway-b.log").read_text()
    assert "peer session from gateway b accepted" in logs or "peer session from gateway a accepted" in logs
    assert "refused a peer session" not in logs


def _peer_upgrade(port: int, context: ssl.SSLContext) -> bytes:
    """A WebSocket upgrade on the peer path over TLS; the answer's head."""
    request = (f"GET {PEER_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\nX-Relay-Gateway-Id: intruder\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                return answer
            answer += chunk
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", answer)
        while length and len(answer.partition(b"\r\n\r\n")[2]) < int(length.group(1)):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer


def test_a_peer_upgrade_without_a_fleet_certificate_is_refused(tls_fleet):
    fleet, _ = tls_fleet
    port = fleet.ports["a"]
    # No client certificate: TLS is fine (browsers and agents connect so), the peer path is not.
    answer = _peer_upgrade(port, fleet.context)
    assert answer.startswith(b"HTTP/1.1 401"), answer
    assert b"fleet_certificate_required" in answer
    # A certificate of another CA: the server's side of the handshake fails (with TLS 1.3
    # the client learns it at its first read: an alert, or the connection closed).
    stranger = trustme.CA()
    cert, key = fleet.issue("stranger", ca=stranger)
    context = ssl.create_default_context(cafile=str(fleet.ca_file))
    context.load_cert_chain(cert, key)
    try:
        answer = _peer_upgrade(port, context)
    except (ssl.SSLError, ConnectionError):
        answer = b""
    assert answer == b"", answer
    # A certificate the fleet's CA signed opens it (101).
    cert, key = fleet.issue("gateway-test")
    context = ssl.create_default_context(cafile=str(fleet.ca_file))
    context.load_cert_chain(cert, key)
    assert _peer_upgrade(port, context).startswith(b"HTTP/1.1 101"), "a fleet certificate must be accepted"
    log = (fleet.workdir / "gateway-a.log").read_text()
    assert "refused a peer session: no client certificate signed by the fleet's CA" in log


def test_fleet_ca_needs_tls_and_redis(tmp_path):
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    env = {**os.environ, "RELAY_FLEET_SECRET": ""}
    base = [sys.executable, "-m", "relay", "gateway", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "d")]
    out = subprocess.run([*base, "--redis", "redis://127.0.0.1:1/0", "--fleet-ca", str(ca_file)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2 and "--fleet-ca needs --tls-cert and --tls-key" in out.stderr
    out = subprocess.run([*base, "--fleet-ca", str(ca_file)], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2 and "need --redis" in out.stderr
