"""``relay admin``: teams and keys, through click's runner and real subprocesses, against
both store backends (``--data DIR`` for SQLite, ``--store postgresql://...``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from relay.cli import main
from relay.gateway.store import Store
from tests.support.servers import free_port
from tests.support.store_fixtures import BACKENDS, with_store

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Where:
    """Where ``relay admin`` keeps the state: its options, and the store URL to check."""

    args: list[str]
    url: str


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture(params=BACKENDS)
def where(request: pytest.FixtureRequest, data_dir: Path) -> Where:
    if request.param == "sqlite":
        return Where(["--data", str(data_dir)], f"sqlite://{data_dir}/relay.db")
    url = request.getfixturevalue("pg_url")
    return Where(["--store", url], url)


def run(where: Where | Path, *args: str, env: dict[str, str] | None = None):
    options = where.args if isinstance(where, Where) else ["--data", str(where)]
    return CliRunner().invoke(main, ["admin", *options, *args], env=env)


def run_json(where: Where | Path, *args: str):
    result = run(where, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def check(where: Where, call: Callable[[Store], Awaitable[Any]]) -> Any:
    """``await call(store)`` on the store ``relay admin`` wrote."""
    return with_store(where.url, call)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_team_create_json_keys_work(where: Where) -> None:
    out = run_json(where, "team", "create", "acme")
    assert set(out) == {"team_id", "name", "keys"}
    assert out["name"] == "acme"
    assert str(uuid.UUID(out["team_id"])) == out["team_id"]
    assert set(out["keys"]) == {"sk", "dk", "ak"}
    for kind, key in out["keys"].items():
        assert key.startswith(f"{kind}-")
        cred = check(where, lambda s, key=key: s.lookup_credential(key))
        assert (cred.team_id, cred.kind) == (out["team_id"], kind)


def test_team_create_text_prints_keys_once(where: Where) -> None:
    result = run(where, "team", "create", "acme")
    assert result.exit_code == 0

    async def team_and_credentials(store: Store) -> Any:
        team = (await store.list_teams())[0]
        return team, await store.list_credentials(team.id)

    team, creds = check(where, team_and_credentials)
    assert team.id in result.stdout
    keys = [w for w in result.stdout.split() if w[:3] in ("sk-", "dk-", "ak-")]
    assert len(keys) == 3

    async def ids(store: Store) -> set[str]:
        return {(await store.lookup_credential(k)).id for k in keys}

    assert check(where, ids) == {c.id for c in creds}
    # later listings show only the display prefixes
    listing = run(where, "key", "list", "--team", team.id)
    for key in keys:
        assert key not in listing.stdout
        assert key[:9] + "…" in listing.stdout


def test_team_list(where: Where) -> None:
    assert run_json(where, "team", "list") == []
    a = run_json(where, "team", "create", "a")
    b = run_json(where, "team", "create", "b")
    listed = run_json(where, "team", "list")
    assert [(t["team_id"], t["name"]) for t in listed] == [(a["team_id"], "a"),
                                                            (b["team_id"], "b")]
    assert all(t["created_at"].endswith("Z") for t in listed)
    text = run(where, "team", "list")
    assert a["team_id"] in text.stdout and b["team_id"] in text.stdout


def test_key_create_list_revoke(where: Where) -> None:
    team = run_json(where, "team", "create", "acme")
    created = run_json(where, "key", "create", "--team", team["team_id"], "--kind", "dk")
    assert set(created) == {"team_id", "kind", "key"}
    assert created["team_id"] == team["team_id"] and created["kind"] == "dk"
    assert created["key"].startswith("dk-")

    listed = run_json(where, "key", "list", "--team", team["team_id"])
    assert listed["team_id"] == team["team_id"]
    assert sorted(k["kind"] for k in listed["keys"]) == ["ak", "dk", "dk", "sk"]
    assert created["key"] not in json.dumps(listed)
    new = [k for k in listed["keys"] if k["prefix"] == created["key"][:9] + "…"]
    assert len(new) == 1

    # revoke by id
    revoked = run_json(where, "key", "revoke", "--team", team["team_id"], new[0]["id"])
    assert revoked["revoked"] == new[0]["id"]
    assert check(where, lambda s: s.lookup_credential(created["key"])) is None
    assert check(where, lambda s: s.lookup_credential(team["keys"]["dk"])) is not None
    assert len(run_json(where, "key", "list", "--team", team["team_id"])["keys"]) == 3
    everything = run_json(where, "key", "list", "--team", team["team_id"], "--all")["keys"]
    assert [k["revoked_at"] is not None for k in everything].count(True) == 1

    # revoke by full key, and by display prefix
    result = run(where, "key", "revoke", "--team", team["team_id"], team["keys"]["sk"])
    assert result.exit_code == 0 and team["keys"]["sk"] not in result.output
    result = run(where, "key", "revoke", "--team", "acme", team["keys"]["ak"][:9] + "…")
    assert result.exit_code == 0
    assert check(where, lambda s: s.lookup_credential(team["keys"]["sk"])) is None
    assert check(where, lambda s: s.lookup_credential(team["keys"]["ak"])) is None
    assert check(where, lambda s: s.lookup_credential(team["keys"]["dk"])) is not None


def test_key_revoke_is_team_scoped(where: Where) -> None:
    a = run_json(where, "team", "create", "a")
    b = run_json(where, "team", "create", "b")
    result = run(where, "key", "revoke", "--team", b["team_id"], a["keys"]["sk"])
    assert_one_line_error(result, "no such active key")
    assert a["keys"]["sk"] not in result.output
    assert check(where, lambda s: s.lookup_credential(a["keys"]["sk"])) is not None


def test_team_by_unique_name(where: Where) -> None:
    team = run_json(where, "team", "create", "acme")
    assert run_json(where, "key", "create", "--team", "acme", "--kind", "sk")[
        "team_id"] == team["team_id"]
    run_json(where, "team", "create", "acme")
    assert_one_line_error(run(where, "key", "list", "--team", "acme"), "2 teams")


def test_data_dir_from_environment(data_dir: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["admin", "team", "create", "envteam", "--json"],
                           env={"RELAY_DATA": str(data_dir)})
    assert result.exit_code == 0, result.output
    teams = with_store(f"sqlite://{data_dir}/relay.db", lambda s: s.list_teams())
    assert [t.name for t in teams] == ["envteam"]


def test_store_from_environment(pg_url: str) -> None:
    result = CliRunner().invoke(main, ["admin", "team", "create", "envteam", "--json"],
                                env={"RELAY_STORE": pg_url})
    assert result.exit_code == 0, result.output
    assert [t.name for t in with_store(pg_url, lambda s: s.list_teams())] == ["envteam"]


def test_unreachable_postgres_is_a_one_line_error_without_the_password(tmp_path: Path) -> None:
    url = f"postgresql://relay:pw-secret@127.0.0.1:{free_port()}/relay"
    result = CliRunner().invoke(main, ["admin", "--store", url, "team", "list"])
    assert_one_line_error(result, "cannot connect to PostgreSQL", "postgresql://relay@127.0.0.1")
    assert "pw-secret" not in result.output


@pytest.mark.parametrize("args, fragments", [
    (["key", "create", "--team", str(uuid.uuid4()), "--kind", "sk"], ["unknown team"]),
    (["key", "list", "--team", "nope"], ["unknown team: nope"]),
    (["key", "create", "--team", "TEAM", "--kind", "xk"], ["bad key kind", "ak"]),
    (["key", "revoke", "--team", "TEAM", "sk-doesnotexist"], ["no such active key"]),
    (["team", "create", " "], ["team name"]),
])
def test_errors_are_one_line_and_nonzero(where: Where, args, fragments) -> None:
    team = run_json(where, "team", "create", "TEAM")
    args = [team["team_id"] if a == "TEAM" else a for a in args]
    assert_one_line_error(run(where, *args), *fragments)


def test_unwritable_data_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run(blocker / "data", "team", "list")
    assert_one_line_error(result, "cannot open data directory")


def test_help_does_not_create_data_dir(data_dir: Path) -> None:
    result = run(data_dir, "team", "create", "--help")
    assert result.exit_code == 0
    assert not data_dir.exists()


def test_subprocess_python_m_relay_json(where: Where) -> None:
    """The real entry point, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RELAY_DATA", None)
    env.pop("RELAY_STORE", None)
    cmd = [sys.executable, "-m", "relay", "admin", *where.args]
    done = subprocess.run([*cmd, "team", "create", "sub", "--json"], capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["name"] == "sub" and set(out["keys"]) == {"sk", "dk", "ak"}
    assert check(where, lambda s: s.lookup_credential(out["keys"]["sk"])).team_id == out["team_id"]

    listed = subprocess.run([*cmd, "team", "list", "--json"], capture_output=True, text=True,
                            env=env, timeout=60, check=False)
    assert json.loads(listed.stdout)[0]["team_id"] == out["team_id"]

    bad = subprocess.run([*cmd, "key", "create", "--team", out["team_id"], "--kind", "zz"],
                         capture_output=True, text=True, env=env, timeout=60, check=False)
    assert bad.returncode == 1
    assert bad.stdout == ""
    assert bad.stderr.strip().splitlines() == ["Error: bad key kind 'zz': must be one of sk, dk, ak"]
