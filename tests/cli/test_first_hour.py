"""The first hour with relay (issue 16): a failed first start keeps no unseen keys, every
option's environment variable is in ``--help``, the agent reads its key from the same
variable as every other command. Real processes (``python -m relay``), real sockets."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from relay.cli import main
from tests.support.servers import free_port

pytestmark = pytest.mark.timeout(120)


def _relay(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def _wait(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_first_start_on_a_taken_port_creates_no_keys_then_the_next_start_prints_them(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        failed = _relay("gateway", "--listen", f"127.0.0.1:{port}", "--data", str(data))
    assert failed.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in failed.stderr
    assert "sk-" not in failed.stdout + failed.stderr and "Its keys" not in failed.stdout
    teams = _relay("admin", "--data", str(data), "team", "list", "--json")
    assert teams.returncode == 0 and json.loads(teams.stdout) == [], teams.stdout  # nothing made, nothing lost

    log = tmp_path / "gw.log"
    port = free_port()
    with log.open("wb") as out:
        gw = subprocess.Popen([sys.executable, "-m", "relay", "gateway", "--listen", f"127.0.0.1:{port}",
                               "--data", str(data)], stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        text = _wait(lambda: "listening on" in log.read_text() and log.read_text(), "the gateway's start")
        keys = dict(re.findall(r"^  (sk|dk|ak)  (\S+)$", text, re.M))
        assert set(keys) == {"sk", "dk", "ak"}, text
        # The keys come once the address is bound, and the hub ports' reach is said.
        assert text.index("Its keys") < text.index("listening on")
        assert "hub ports listen on 127.0.0.1 (this machine only; --hub-host 0.0.0.0" in text
    finally:
        gw.terminate()
        gw.wait(20)


def _options(command: click.Command, path: str = "relay"):
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _options(sub, f"{path} {name}")
        return
    for param in command.params:
        if isinstance(param, click.Option):
            yield path, command, param


def test_every_environment_variable_is_shown_in_help() -> None:
    """click's show_envvar on every option that reads one, and --help prints it."""
    seen = 0
    for path, _command, param in _options(main):
        if param.envvar:
            seen += 1
            assert param.show_envvar, f"{path} {param.opts[0]} reads {param.envvar} but --help hides it"
    assert seen >= 20
    shown = _relay("agent", "--help").stdout
    for name in ("RELAY_GATEWAY", "RELAY_AGENT_KEY", "RELAY_KEY", "RELAY_CONFIG", "RELAY_AGENT_ALLOW"):
        assert name in shown, shown
    shown = _relay("gateway", "--help").stdout
    for name in ("RELAY_LISTEN", "RELAY_DATA", "RELAY_JWT_KEY", "RELAY_HUB_HOST", "RELAY_TLS_CERT", "RELAY_PUBLIC_URL"):
        assert name in shown, shown


def test_agent_key_from_relay_key_and_a_wrong_kind_is_named_by_its_source_not_its_value(tmp_path: Path) -> None:
    data = tmp_path / "data"
    made = _relay("admin", "--data", str(data), "team", "create", "t", "--json")
    keys = json.loads(made.stdout)["keys"]
    env = {"RELAY_GATEWAY": "http://127.0.0.1:1"}
    for name in ("RELAY_AGENT_KEY", "RELAY_KEY"):
        os.environ.pop(name, None)
    wrong = _relay("agent", env={**env, "RELAY_KEY": keys["sk"]})
    assert wrong.returncode == 2 and "(from RELAY_KEY)" in wrong.stderr, wrong.stderr
    assert keys["sk"] not in wrong.stderr

    port = free_port()
    log = tmp_path / "gw.log"
    with log.open("wb") as out:
        gw = subprocess.Popen([sys.executable, "-m", "relay", "gateway", "--listen", f"127.0.0.1:{port}",
                               "--data", str(data)], stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    agent = None
    try:
        _wait(lambda: "listening on" in log.read_text(), "the gateway's start")
        # RELAY_KEY alone (the name every command reads) runs the agent; its own name,
        # RELAY_AGENT_KEY, still works and wins over RELAY_KEY (an sk- key for the API).
        for extra in ({"RELAY_KEY": keys["ak"]}, {"RELAY_AGENT_KEY": keys["ak"], "RELAY_KEY": keys["sk"]}):
            agent = subprocess.Popen([sys.executable, "-m", "relay", "agent", "--name", "box1"],
                                     env={**os.environ, "RELAY_GATEWAY": f"http://127.0.0.1:{port}", **extra},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            listed = _wait(lambda: _online(port, keys["sk"]), "the agent online")
            assert listed == ["box1"]
            agent.terminate()
            agent.wait(20)
            _wait(lambda: not _online(port, keys["sk"]), "the agent offline")
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
        gw.terminate()
        gw.wait(20)


def _online(port: int, sk: str) -> list[str]:
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/agents", headers={"Authorization": f"Bearer {sk}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return [a["name"] for a in json.loads(resp.read())["agents"] if a["online"]]


def test_readme_lists_every_gateway_and_agent_option_with_its_variable_and_toml_key() -> None:
    from relay.config import _aliases

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = {line.split("|")[2].strip().strip("`").split()[0]: line
            for line in readme.splitlines() if line.startswith("| ") and "`--" in line}
    for name in ("gateway", "agent"):
        for param in main.commands[name].params:
            if not isinstance(param, click.Option) or param.name == "help":
                continue
            row = rows.get(param.opts[0])
            assert row is not None, f"README's configuration table lacks relay {name} {param.opts[0]}"
            envvars = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
            for envvar in envvars:
                assert f"`{envvar}`" in row, (param.opts[0], envvar)
            if param.expose_value and param.name != "config":
                toml_key = row.split("|")[4].strip().strip("`")
                assert toml_key in _aliases(param), (param.opts[0], toml_key)
