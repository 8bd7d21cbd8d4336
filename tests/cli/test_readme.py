"""README.md, run: every ``sh`` block, in order, against a real gateway and agent.

The rules a reader follows, made mechanical:

* ``scripts/run`` (the gateway, in its own terminal) runs ``.venv/bin/relay gateway``
  with the arguments scripts/run gives it, on a free port instead of 8080 and a
  temporary data directory instead of ./data; a second ``scripts/run`` replaces the
  first (the README restarts the gateway with a new setting).
* ``.venv/bin/relay agent ...`` and ``.venv/bin/relay http|tcp ...`` (their own
  terminals) and a command ending in ``&`` keep running in the background; what they
  print fills placeholders too.
* Every other command runs in bash with the environment the ``export`` lines before it
  built, and must exit 0.
* Placeholders are filled in from what the commands before printed: ``sk-...``,
  ``dk-...`` and ``ak-...`` from the gateway's first start, ``AGENT_ID``, ``TOKEN``,
  ``ADMIN_TOKEN`` and ``HUB_PORT`` from the latest answer that carried one. Port 8188
  (the sample web app) moves to a free port too.

``sh`` blocks are commands to run; ``text``, ``toml`` and the like are reference.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

import pytest

from tests.support.servers import free_port

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS_RUN_DEFAULT = "gateway --listen 127.0.0.1:8080 --data data"


def sh_blocks(text: str) -> list[list[str]]:
    """The commands of each ``sh`` fenced block (continuation lines joined, comments and
    blank lines dropped)."""
    blocks = []
    for body in re.findall(r"^```sh\n(.*?)^```$", text, re.M | re.S):
        commands: list[str] = []
        pending = ""
        for line in body.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            line = pending + line
            pending = ""
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
        blocks.append(commands)
    return blocks


class Walkthrough:
    """The reader's terminals: background processes, the shell environment, what was
    printed so far."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data = tmp / "data"
        self.port = free_port()
        self.web_port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_") or k == "RELAY_NO_EXTENSIONS"}
        self.env["PYTHONUNBUFFERED"] = "1"
        self.values: dict[str, str] = {}
        self.background: list[subprocess.Popen] = []
        self.gateway: Optional[subprocess.Popen] = None
        self.logs = 0
        relay = Path(sys.executable).parent / "relay"
        self.relay = str(relay) if relay.exists() else f"{sys.executable} -m relay"

    # -- substitution

    def fill(self, command: str) -> str:
        command = command.replace("127.0.0.1:8080", f"127.0.0.1:{self.port}")
        command = command.replace("8188", str(self.web_port))
        command = command.replace("--data data", f"--data {self.data}")
        command = command.replace(".venv/bin/relay", self.relay)
        command = re.sub(r"(?<![\w/])\.venv/bin/python", sys.executable, command)
        for kind in ("sk", "dk", "ak"):
            if f"{kind}-..." in command:
                command = command.replace(f"{kind}-...", self.values[kind])
        for name in ("AGENT_ID", "ADMIN_TOKEN", "HUB_PORT", "TOKEN"):
            if re.search(rf"\b{name}\b", command):
                command = re.sub(rf"\b{name}\b", self.values[name], command)
        return command

    def learn(self, output: str) -> None:
        for kind, key in re.findall(r"^  (sk|dk|ak)  (\S+)$", output, re.M):
            self.values.setdefault(kind, key)
        patterns = {"AGENT_ID": r'"agent_id":\s*"([0-9a-f-]{36})"',
                    "TOKEN": r"/tunnel/([A-Za-z0-9_-]{20,})/",
                    "ADMIN_TOKEN": r'(?:"admin_token":\s*"|admin_token  )([A-Za-z0-9_-]{20,})',
                    "HUB_PORT": r'(?:"hub_port":\s*|hub port +\S+:)(\d+)'}
        for name, pattern in patterns.items():
            found = re.findall(pattern, output)
            if found:
                self.values[name] = found[-1]

    # -- running

    def _log(self) -> Path:
        self.logs += 1
        return self.tmp / f"bg{self.logs}.log"

    def start(self, command: str, log: Path) -> subprocess.Popen:
        with log.open("wb") as out:
            proc = subprocess.Popen(["/bin/bash", "-c", "exec " + command], cwd=ROOT, env=self.env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.background.append(proc)
        return proc

    def wait_for(self, proc: subprocess.Popen, log: Path, what: str, done) -> str:
        deadline = time.monotonic() + 60
        while True:
            text = log.read_text(errors="replace")
            if done(text):
                return text
            assert proc.poll() is None, f"{what} ended: {text}"
            assert time.monotonic() < deadline, f"{what} did not get ready: {text}"
            time.sleep(0.05)

    def run_gateway(self, command: str) -> None:
        args = command[len("scripts/run"):].strip() or SCRIPTS_RUN_DEFAULT
        if self.gateway is not None:  # Ctrl-C in its terminal
            self.gateway.send_signal(signal.SIGINT)
            self.gateway.wait(20)
        log = self._log()
        self.gateway = self.start(self.fill(f".venv/bin/relay {args}"), log)
        self.learn(self.wait_for(self.gateway, log, "the gateway", lambda t: "listening on" in t))

    def run_agent(self, command: str) -> None:
        log = self._log()
        proc = self.start(self.fill(command), log)
        self.wait_for(proc, log, "the agent", lambda t: "registered as agent" in t)

    def run_expose(self, command: str) -> None:
        log = self._log()
        proc = self.start(self.fill(command), log)
        self.learn(self.wait_for(proc, log, command, lambda t: re.search(r"^  url ", t, re.M)))

    def run_background(self, command: str) -> None:
        log = self._log()
        proc = self.start(self.fill(command.rstrip("& ")), log)
        port = self.web_port if str(self.web_port) in self.fill(command) else None
        if port is not None:  # the sample web app: wait until it answers
            self.wait_for(proc, log, command, lambda _: _answers(f"http://127.0.0.1:{port}/"))

    def run(self, command: str) -> str:
        env_dump = self.tmp / "env"
        # As typed at a prompt (no set -e, no pipefail): the line's own status counts.
        # set -a: a plain assignment (JWT=...) lives on in the reader's shell; here it
        # must reach the environment dump to reach the next line.
        script = f"set -a\n{self.fill(command)}\nstatus=$?\nenv -0 >{env_dump}\nexit $status\n"
        done = subprocess.run(["/bin/bash", "-c", script], cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, (command, self.fill(command), done.stdout, done.stderr, self.debug())
        self.env = dict(item.split("=", 1) for item in env_dump.read_text().split("\0") if "=" in item)
        self.learn(done.stdout)
        return done.stdout

    def debug(self) -> str:
        """What the background processes printed (for a failure's message)."""
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
                         for log in sorted(self.tmp.glob("bg*.log")))

    def close(self) -> None:
        for proc in reversed(self.background):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.background:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def test_scripts_run_default_is_what_the_walkthrough_runs() -> None:
    assert f"set -- {SCRIPTS_RUN_DEFAULT}" in (ROOT / "scripts" / "run").read_text()


def test_readme_sh_blocks_run_in_order(tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl is missing (scripts/bootstrap --system-deps installs it)", pytrace=False)
    text = (ROOT / "README.md").read_text()
    blocks = sh_blocks(text)
    assert len(blocks) >= 8, blocks
    walk = Walkthrough(tmp_path)
    outputs: list[tuple[str, str]] = []
    browsed = False
    try:
        for block in blocks:
            for command in block:
                if command == "scripts/run" or command.startswith("scripts/run gateway"):
                    walk.run_gateway(command)
                elif command.startswith(".venv/bin/relay agent"):
                    walk.run_agent(command)
                elif command.startswith((".venv/bin/relay http ", ".venv/bin/relay tcp ")):
                    walk.run_expose(command)
                elif command.endswith("&"):
                    walk.run_background(command)
                else:
                    outputs.append((command, walk.run(command)))
                    if command.endswith("tunnel open box1 --port 8188"):
                        # The browser's view, at once (later the README restarts the
                        # gateway, and the agent takes a moment to come back).
                        url = re.search(r"tunnel_url +(http://\S+)", outputs[-1][1]).group(1)
                        with urllib.request.urlopen(url, timeout=10) as resp:
                            assert resp.status == 200 and b"Directory listing" in resp.read()
                        browsed = True
        # What the reader was promised along the way.
        assert browsed
        assert any('"ok"' in out for command, out in outputs if command.endswith("/healthz"))
        assert any("relay_agents_online" in out for command, out in outputs if "/metrics" in command)
        served = [out for command, out in outputs if command.startswith("curl -s http://127.0.0.1:8080/tunnel/TOKEN/ |")]
        assert served and "Directory listing" in served[0], outputs  # through relay http
        [jwt_call] = [out for command, out in outputs if "Bearer $JWT" in command]
        assert '"name": "box1"' in jwt_call or '"name":"box1"' in jwt_call, jwt_call
    finally:
        walk.close()
