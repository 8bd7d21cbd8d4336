"""``relay gateway`` and ``relay agent`` raise their RLIMIT_NOFILE soft limit to the hard
limit at start (10,000 streams are 10,000 sockets in each), real processes."""
from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

LOW = 256  # a soft limit far below what 10,000 idle streams need


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    def lower_soft_limit() -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (LOW, hard))

    return subprocess.Popen([sys.executable, "-m", "relay", *args], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                            start_new_session=True, preexec_fn=lower_soft_limit)


def _limits(pid: int) -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of a running process, from /proc."""
    text = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(r"^Max open files\s+(\S+)\s+(\S+)", text, re.M)
    assert match, text
    return int(match.group(1)), int(match.group(2))


def _wait(predicate: Callable[[], object], proc: subprocess.Popen, log: Path, timeout: float = 20.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {log.read_text(errors='replace')[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc/PID/limits")
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_gateway_and_agent_raise_their_soft_nofile_limit_to_the_hard_limit(tmp_path: Path, backend: str) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard <= LOW:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise")
    gw_log, agent_log = tmp_path / "gateway.log", tmp_path / "agent.log"
    procs = []
    try:
        gw = _start(["gateway", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "data")], gw_log, {})
        procs.append(gw)
        listening = _wait(lambda: re.search(rb"listening on \S*?:(\d+)", gw_log.read_bytes()), gw, gw_log)
        port = int(listening.group(1))
        keys = dict(re.findall(r"^  (sk|dk|ak)  (\S+)$", gw_log.read_text(), re.M))
        assert _limits(gw.pid) == (hard, hard)

        agent = _start(["agent", "--gateway", f"http://127.0.0.1:{port}", "--name", "nofile",
                        "--backend", backend], agent_log, {"RELAY_AGENT_KEY": keys["ak"]})
        procs.append(agent)
        # Raised before it dials out; checked once it is connected (so surely started).
        _wait(lambda: b"nofile" in gw_log.read_bytes() or _limits(agent.pid)[0] == hard, agent, agent_log)
        assert _limits(agent.pid) == (hard, hard)
    finally:
        for proc in reversed(procs):
            _stop(proc)
