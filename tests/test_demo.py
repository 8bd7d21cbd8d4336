"""``relay demo`` as a real process: it prints URLs that work while it runs."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.timeout(90)


def test_demo_prints_working_urls_and_exits(tmp_path):
    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "relay", "demo", "--exit-after", "8"],
                                stdout=out, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 30
        while "Try:" not in out_path.read_text() or not out_path.read_text().rstrip().endswith("tunnel list"):
            assert proc.poll() is None, err_path.read_text()
            assert time.monotonic() < deadline, out_path.read_text() + err_path.read_text()
            time.sleep(0.05)
        text = out_path.read_text()
        assert "[4/4] tunnels open" in err_path.read_text()  # start-up progress on stderr

        gateway = re.search(r"gateway +(http://127\.0\.0\.1:\d+)", text).group(1)
        key = re.search(r"API key +(sk-\S+)", text).group(1)
        hub = int(re.search(r"hub port 127\.0\.0\.1:(\d+)", text).group(1))
        page = re.search(r"http tunnel +(http://\S+/tunnel/\S+/)", text).group(1)
        assert re.search(r"ws://127\.0\.0\.1:\d+/tunnel/\S+/tcp", text)

        # The printed key works against the API and shows the demo agent online.
        request = urllib.request.Request(gateway + "/api/v1/agents", headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            [agent] = json.loads(resp.read())["agents"]
        assert agent["name"] == "demo-agent" and agent["online"] is True

        # The hub port reaches the echo service through the agent.
        with socket.create_connection(("127.0.0.1", hub), timeout=10) as sock:
            sock.sendall(b"hello relay")
            received = b""
            while len(received) < 11:
                chunk = sock.recv(64)
                assert chunk, "closed before the echo"
                received += chunk
        assert received == b"hello relay"

        # The http tunnel URL serves the hello page.
        with urllib.request.urlopen(page, timeout=10) as resp:
            assert b"hello from relay demo" in resp.read()

        assert proc.wait(20) == 0, err_path.read_text()  # --exit-after ends it cleanly
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
