"""Configuration by flags, environment variables and a TOML file, in that precedence
(relay/config.py). The commands run in-process with their long-running part replaced by
a recorder, so each case costs milliseconds."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from click.testing import CliRunner

from relay.cli import main

pytestmark = pytest.mark.timeout(60)

_ENV = ("RELAY_CONFIG", "RELAY_LISTEN", "RELAY_DATA", "RELAY_PUBLIC_URL", "RELAY_HUB_HOST",
        "RELAY_JWT_KEY", "RELAY_LOG_LEVEL", "RELAY_GATEWAY", "RELAY_AGENT_KEY", "RELAY_CA_CERT",
        "RELAY_ALLOW_PRIVATE_EGRESS")


@pytest.fixture
def recorded(monkeypatch) -> dict[str, Any]:
    """Replace run_gateway and Agent with recorders; returns what they were given."""
    import relay.agent.client
    import relay.gateway.app

    seen: dict[str, Any] = {}

    async def fake_run_gateway(host: str, port: int, data_dir: Path, **kwargs: Any) -> None:
        seen["gateway"] = {"listen": f"{host}:{port}", "data_dir": data_dir, **kwargs}

    class FakeAgent:
        def __init__(self, gateway_url: str, key: str, **kwargs: Any) -> None:
            seen["agent"] = {"gateway_url": gateway_url, "key": key, **kwargs}

        async def run(self) -> None:
            return None

        def __getattr__(self, name: str) -> Any:  # whatever else the command sets up
            return mock.MagicMock()

    monkeypatch.setattr(relay.gateway.app, "run_gateway", fake_run_gateway)
    monkeypatch.setattr(relay.agent.client, "Agent", FakeAgent)
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    return seen


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_gateway_precedence_flag_env_file_default(tmp_path, recorded):
    cfg = write(tmp_path, f"""
[gateway]
listen = "127.0.0.1:1111"
public-url = "https://file.example"
data = "{tmp_path / 'from-file'}"
log_level = "warning"
""")
    result = invoke("gateway", "--config", str(cfg))
    assert result.exit_code == 0, result.output
    got = recorded["gateway"]
    assert got["listen"] == "127.0.0.1:1111"  # file beats the default
    assert got["public_url"] == "https://file.example"
    assert got["data_dir"] == tmp_path / "from-file"
    assert got["hub_host"] == "127.0.0.1"  # not in the file: the built-in default

    result = invoke("gateway", "--config", str(cfg), env={"RELAY_LISTEN": "127.0.0.1:2222"})
    assert result.exit_code == 0 and recorded["gateway"]["listen"] == "127.0.0.1:2222"  # env beats file

    result = invoke("gateway", "--config", str(cfg), "--listen", "127.0.0.1:3333",
                    env={"RELAY_LISTEN": "127.0.0.1:2222"})
    assert result.exit_code == 0 and recorded["gateway"]["listen"] == "127.0.0.1:3333"  # flag beats env
    assert recorded["gateway"]["public_url"] == "https://file.example"

    # RELAY_CONFIG names the file as well as --config does.
    result = invoke("gateway", env={"RELAY_CONFIG": str(cfg)})
    assert result.exit_code == 0 and recorded["gateway"]["listen"] == "127.0.0.1:1111"


def test_gateway_private_egress_is_off_unless_asked_for_by_flag_env_or_file(tmp_path, recorded):
    assert invoke("gateway").exit_code == 0
    assert recorded["gateway"]["allow_private_egress"] is False
    assert invoke("gateway", "--allow-private-egress").exit_code == 0
    assert recorded["gateway"]["allow_private_egress"] is True
    assert invoke("gateway", env={"RELAY_ALLOW_PRIVATE_EGRESS": "1"}).exit_code == 0
    assert recorded["gateway"]["allow_private_egress"] is True
    cfg = write(tmp_path, "[gateway]\nallow_private_egress = true\n")
    assert invoke("gateway", "--config", str(cfg)).exit_code == 0
    assert recorded["gateway"]["allow_private_egress"] is True


def test_agent_lists_and_a_key_in_a_readable_file_warns(tmp_path, recorded):
    text = """
[gateway]
listen = "127.0.0.1:9"

[agent]
gateway = "http://gw.example:8080"
name = "box1"
labels = ["gpu", "ssh"]
allow = ["127.0.0.1:22"]
key = "ak-from-file"
"""
    cfg = write(tmp_path, text, mode=0o644)
    result = invoke("agent", "--config", str(cfg))
    assert result.exit_code == 0, result.output
    got = recorded["agent"]
    assert got["gateway_url"] == "http://gw.example:8080" and got["name"] == "box1"
    assert list(got["labels"]) == ["gpu", "ssh"] and list(got["allow"]) == ["127.0.0.1:22"]
    assert got["key"] == "ak-from-file"
    assert "readable by other users" in result.stderr and "ak-from-file" not in result.stderr

    os.chmod(cfg, 0o600)  # private file: no warning; the environment still wins
    result = invoke("agent", "--config", str(cfg), "--label", "cli",
                    env={"RELAY_AGENT_KEY": "ak-from-env"})
    assert result.exit_code == 0 and "warning" not in result.stderr
    assert recorded["agent"]["key"] == "ak-from-env"
    assert list(recorded["agent"]["labels"]) == ["cli"]  # a flag replaces the file's list


@pytest.mark.parametrize("text, message", [
    ("[gateway]\nlisen = '127.0.0.1:1'\n", "unknown key 'lisen' in [gateway]"),
    ("[gatway]\nlisten = '127.0.0.1:1'\n", "unknown table [gatway]"),
    ("[gateway]\nlisten = \n", "is not valid TOML"),
    ("[gateway]\nlisten = ['a', 'b']\n", "must be a string or a number"),
    ("[agent]\nlabels = [{x = 1}]\n", "must be a list of strings"),
])
def test_bad_config_is_one_line_error(tmp_path, recorded, text, message):
    cfg = write(tmp_path, text)
    command = "agent" if text.startswith("[agent]") else "gateway"
    result = invoke(command, "--config", str(cfg), "--key", "ak-x", "--gateway", "http://x") \
        if command == "agent" else invoke(command, "--config", str(cfg))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: config file") and message in lines[0], lines
    assert command not in recorded


def test_missing_config_file(tmp_path, recorded):
    result = invoke("gateway", "--config", str(tmp_path / "nope.toml"))
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: cannot read config file {tmp_path / 'nope.toml'}: No such file or directory"
