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


def _wait_for_tips(proc: subprocess.Popen, out_path, err_path) -> str:
    deadline = time.monotonic() + 30
    while "tunnel list" not in out_path.read_text():
        assert proc.poll() is None, err_path.read_text()
        assert time.monotonic() < deadline, out_path.read_text() + err_path.read_text()
        time.sleep(0.05)
    return out_path.read_text()


def test_demo_tips_run_as_printed_with_relay_off_path(tmp_path):
    """Every command under "Try" runs as pasted into a shell whose PATH has neither relay
    nor curl, nc or telnet: relay is named by a path that works, the clients are the
    Python that runs relay, and ``relay connect`` carries the echo."""
    script = os.path.join(os.path.dirname(sys.executable), "relay")
    if not os.path.exists(script):
        pytest.skip("no relay console script beside this interpreter")
    bare_path = "/usr/bin/nonexistent"  # nothing: every command must name its program
    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": bare_path}
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen([script, "demo", "--exit-after", "40"], stdout=out, stderr=err, env=env)
    try:
        text = _wait_for_tips(proc, out_path, err_path)
        tips = [line.strip() for line in text.split("Try", 1)[1].splitlines()[1:] if line.strip()]
        assert len(tips) == 4, text
        assert not any(word in text for word in (" nc ", "telnet", "curl ")), text
        fetch, talk, connect, listing = tips
        assert connect.startswith(script) and listing.split()[2] == script, text

        def sh(line: str) -> str:
            done = subprocess.run(["/bin/bash", "-c", line], env=env, capture_output=True, timeout=30)
            assert done.returncode == 0, (line, done.stdout, done.stderr)
            return done.stdout.decode()

        assert "hello from relay demo" in sh(fetch)
        assert sh(talk) == "hello\n"
        assert "demo-agent" in sh(listing)

        # relay connect as printed, on a free port instead of 9000, then the echo through it.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            local = probe.getsockname()[1]
        command = connect.split("&")[0].replace("127.0.0.1:9000", f"127.0.0.1:{local}")
        bridge = subprocess.Popen(["/bin/bash", "-c", "exec " + command], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert b"listening" in bridge.stdout.readline()
            assert sh(talk.rsplit(" ", 1)[0] + f" {local}") == "hello\n"
        finally:
            bridge.terminate()
            bridge.wait(10)
    finally:
        proc.kill()
        proc.wait(10)
