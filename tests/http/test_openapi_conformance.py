"""schemathesis against a live gateway's ``/api/v1/openapi.json``: no 5xx, and every
response conforms to the schema.

Real processes: ``relay gateway`` (fresh data directory: it prints the default team's
keys), a ``python -m tests.support.openai_server`` container behind ``relay agent --service my-llm=...``
(``my-llm`` is the documented example slug, so the examples and coverage phases reach a
running service through the proxy and invoke), an external service created through the
API, and the ``schemathesis run`` CLI. Bounded: a few examples per operation, a
per-request timeout, a timeout on the whole run. ``GET /tasks/{taskId}/events`` is left
out: it is a stream that only ends with its task, and no agent here runs tasks.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.servers import free_port

pytestmark = pytest.mark.timeout(300)

MAX_EXAMPLES = 8


def _get(url: str, key: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_schemathesis_no_5xx_and_conforming_responses(tmp_path: Path) -> None:
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if cli is None:
        pytest.fail("schemathesis is not installed (pip install -e '.[test]')", pytrace=False)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen] = []
    port, web_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        gateway = subprocess.Popen([sys.executable, "-m", "relay", "gateway", "--listen", f"127.0.0.1:{port}",
                                    "--data", str(tmp_path / "data"),
                                    # the external service below is a server on 127.0.0.1
                                    "--allow-private-egress"], env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(gateway)
        keys: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while "listening" not in keys and time.monotonic() < deadline:
            line = gateway.stdout.readline()
            if not line:
                break
            match = re.match(r"\s+(sk|dk|ak)\s+(\S+)", line)
            if match:
                keys[match.group(1)] = match.group(2)
            elif "listening on" in line:
                keys["listening"] = line
        assert {"sk", "ak", "listening"} <= set(keys), "the gateway did not start"
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.support.openai_server", "--port", str(web_port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([sys.executable, "-m", "relay", "agent", "--gateway", base,
                                       "--name", "conformance", "--service",
                                       f"my-llm=127.0.0.1:{web_port},prompt=an OpenAI-compatible test server"],
                                      env={**env, "RELAY_AGENT_KEY": keys["ak"]},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        body: dict = {}
        while time.monotonic() < deadline + 30:
            status, body = _get(f"{base}/api/v1/r/containers/my-llm", keys["sk"])
            if status == 200 and body["service_status"] == "running":
                break
            time.sleep(0.2)
        assert body.get("service_status") == "running", body
        request = urllib.request.Request(
            f"{base}/api/v1/r/containers", method="POST",
            data=json.dumps({"service_slug": "ext-web", "url": f"http://127.0.0.1:{web_port}"}).encode(),
            headers={"Authorization": f"Bearer {keys['sk']}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 201

        run = subprocess.run(
            [cli, "run", f"{base}/api/v1/openapi.json", "-H", f"Authorization: Bearer {keys['sk']}",
             "--checks", "not_a_server_error,response_schema_conformance",
             "--phases", "examples,coverage,fuzzing", "-n", str(MAX_EXAMPLES), "-w", "2",
             "--request-timeout", "10", "--generation-database", "none", "--no-color",
             "--exclude-path-regex", "/events$"],
            capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-6000:]
        assert re.search(r"\d+ passed", output), output[-3000:]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if procs and procs[0].stdout is not None:
            procs[0].stdout.close()
