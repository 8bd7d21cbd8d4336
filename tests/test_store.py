"""The gateway's SQLite store: persistence, hashing of secrets, and team scoping."""
from __future__ import annotations

import hmac
import sqlite3
import threading
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.gateway.store import (
    DB_FILENAME,
    MIGRATIONS,
    ConflictError,
    NotFoundError,
    SecretToken,
    Store,
    StoreError,
    ensure_default_team,
    hash_token,
    normalize_uuid,
)
from relay.gateway.store import base as store_mod


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path):
    with Store.open(data_dir) as s:
        yield s


def _all_bytes(directory: Path) -> bytes:
    """Every byte SQLite wrote: the database file and its -wal/-shm companions."""
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())


# --------------------------------------------------------------------------- open / schema


def test_open_creates_wal_database_with_current_schema(data_dir: Path) -> None:
    with Store.open(data_dir) as s:
        assert s.path == data_dir / DB_FILENAME
        assert s.schema_version == len(MIGRATIONS)
    db = sqlite3.connect(data_dir / DB_FILENAME)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"schema_version", "teams", "credentials", "agents", "tunnel_sessions"} <= tables
    db.close()


def test_database_file_is_owner_only(data_dir: Path) -> None:
    Store.open(data_dir).close()
    assert (data_dir / DB_FILENAME).stat().st_mode & 0o077 == 0


def test_reopen_does_not_rerun_migrations(data_dir: Path) -> None:
    Store.open(data_dir).close()
    with Store.open(data_dir) as s:  # a second CREATE TABLE teams would raise
        assert s.schema_version == len(MIGRATIONS)


def test_newer_schema_is_refused(data_dir: Path) -> None:
    Store.open(data_dir).close()
    db = sqlite3.connect(data_dir / DB_FILENAME)
    db.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS) + 5,))
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer than this relay"):
        Store.open(data_dir)


def test_unusable_data_dir_is_a_one_line_store_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(StoreError) as info:
        Store.open(not_a_dir / "data")
    assert "cannot open data directory" in str(info.value)
    assert "\n" not in str(info.value)


def test_restart_keeps_teams_credentials_agents_and_sessions(data_dir: Path) -> None:
    with Store.open(data_dir) as s:
        team, keys = s.create_team_with_keys("acme")
        revoked, revoked_key = s.create_credential(team.id, "dk")
        s.revoke_credential(team.id, revoked.id)
        agent = s.upsert_agent(team.id, None, "box", {"gpu": "a100"}, "1.2.3", "idle")
        session, access, admin = s.create_tunnel_session(team.id, agent.id, 5432, "tcp",
                                                         hub_port=15432)
    with Store.open(data_dir) as s:
        assert s.list_teams() == [team]
        assert s.lookup_credential(keys["sk"]).team_id == team.id
        assert s.lookup_credential(keys["ak"]).kind == "ak"
        assert s.lookup_credential(revoked_key) is None
        assert s.get_credential(team.id, revoked.id).revoked
        assert s.get_agent(team.id, agent.id) == agent
        assert s.get_tunnel_session(team.id, session.session_id) == session
        assert s.get_tunnel_session_by_token(access) == session
        assert s.check_tunnel_admin_token(session.session_id, admin) == session
        assert s.get_tunnel_session(team.id, session.session_id).hub_port == 15432


def test_usable_from_another_thread(store: Store) -> None:
    team = store.create_team("t")
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(store.get_team(team.id)))
    thread.start()
    thread.join()
    assert result == [team]


# --------------------------------------------------------------------------- teams


def test_teams(store: Store) -> None:
    a = store.create_team("  alpha ")
    b = store.create_team("beta")
    assert a.name == "alpha"
    assert uuid.UUID(a.id).version == 4
    assert store.get_team(a.id) == a
    assert store.get_team(a.id.upper()) == a
    assert store.get_team("not-a-uuid") is None
    assert store.get_team(str(uuid.uuid4())) is None
    assert store.list_teams() == [a, b]


@pytest.mark.parametrize("name", ["", "   ", "x" * 101])
def test_bad_team_name(store: Store, name: str) -> None:
    with pytest.raises(StoreError, match="1 to 100"):
        store.create_team(name)


def test_ensure_default_team_only_on_empty_store(data_dir: Path) -> None:
    with Store.open(data_dir) as s:
        first = ensure_default_team(s)
        assert first is not None
        team, keys = first
        assert team.name == "default"
        assert set(keys) == {"sk", "dk", "ak"}
        for kind, key in keys.items():
            assert key.startswith(f"{kind}-")
            assert s.lookup_credential(key).team_id == team.id
        assert ensure_default_team(s) is None
    with Store.open(data_dir) as s:  # and not again after a restart
        assert ensure_default_team(s) is None
        assert [t.name for t in s.list_teams()] == ["default"]


# --------------------------------------------------------------------------- credentials


def test_credential_token_shape_and_prefix(store: Store) -> None:
    team = store.create_team("t")
    for kind in ("ak", "sk", "dk"):
        cred, token = store.create_credential(team.id, kind)
        assert isinstance(token, SecretToken)
        assert token.startswith(f"{kind}-")
        assert len(token) == 3 + 43  # 32 random bytes, URL-safe base64
        assert cred.kind == kind
        assert cred.prefix == token[:9]
        assert cred.display == token[:9] + "…"
        assert cred.token_hash == hash_token(token)
        assert store.lookup_credential(token) == cred


def test_bad_kind_and_unknown_team(store: Store) -> None:
    team = store.create_team("t")
    with pytest.raises(StoreError, match="kind"):
        store.create_credential(team.id, "xk")
    with pytest.raises(NotFoundError, match="unknown team"):
        store.create_credential(str(uuid.uuid4()), "sk")


def test_only_hashes_reach_the_disk(data_dir: Path) -> None:
    with Store.open(data_dir) as s:
        team, keys = s.create_team_with_keys("t")
        agent = s.upsert_agent(team.id, None, "a")
        _, access, admin = s.create_tunnel_session(team.id, agent.id)
        secrets = [*keys.values(), access, admin]
        written = _all_bytes(data_dir)
        for secret in secrets:
            assert secret.encode() not in written
        assert hash_token(keys["sk"]).encode() in written
    written = _all_bytes(data_dir)  # after checkpoint on close, too
    for secret in secrets:
        assert secret.encode() not in written


def test_token_differing_in_last_character_is_rejected(store: Store) -> None:
    team = store.create_team("t")
    _, token = store.create_credential(team.id, "sk")
    last = token[-1]
    for replacement in "AaZz09-_":
        if replacement != last:
            assert store.lookup_credential(token[:-1] + replacement) is None
    assert store.lookup_credential(token[:-1]) is None
    assert store.lookup_credential(token + "x") is None
    assert store.lookup_credential(token.upper()) is None
    assert store.lookup_credential(token) is not None


def test_lookup_uses_constant_time_compare(store: Store, monkeypatch) -> None:
    team = store.create_team("t")
    _, token = store.create_credential(team.id, "dk")
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(store_mod.hmac, "compare_digest", spy)
    assert store.lookup_credential(token) is not None
    assert calls and calls[-1][0] == calls[-1][1] == hash_token(token).encode()


def test_revoke_is_team_scoped_and_final(store: Store) -> None:
    a, b = store.create_team("a"), store.create_team("b")
    cred, token = store.create_credential(a.id, "sk")
    assert not store.revoke_credential(b.id, cred.id)  # another team cannot revoke it
    assert store.lookup_credential(token) is not None
    assert store.revoke_credential(a.id, cred.id)
    assert store.lookup_credential(token) is None
    assert not store.revoke_credential(a.id, cred.id)  # already revoked
    assert store.list_credentials(a.id) == []
    assert [c.id for c in store.list_credentials(a.id, include_revoked=True)] == [cred.id]


def test_list_credentials_is_team_scoped(store: Store) -> None:
    a, _ = store.create_team_with_keys("a")
    b, _ = store.create_team_with_keys("b")
    assert {c.team_id for c in store.list_credentials(a.id)} == {a.id}
    assert len(store.list_credentials(b.id)) == 3
    assert store.get_credential(b.id, store.list_credentials(a.id)[0].id) is None


def test_reprs_never_show_secrets(store: Store) -> None:
    team, keys = store.create_team_with_keys("t")
    agent = store.upsert_agent(team.id, None, "a")
    session, access, admin = store.create_tunnel_session(team.id, agent.id)
    cred = store.lookup_credential(keys["sk"])
    text = repr((keys, cred, session, access, admin, store))
    for secret in [*keys.values(), access, admin]:
        assert str(secret) not in text
        assert secret[:6] in text  # masked, but recognisable
    assert cred.token_hash not in text
    assert session.token_hash not in text and session.admin_token_hash not in text
    assert str(keys["sk"]) == keys["sk"]  # the str itself is the plaintext, for printing


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    with Store.open(tmp_path_factory.mktemp("shared")) as s:
        s.create_team_with_keys("t")
        yield s


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80))
def test_arbitrary_text_is_never_a_credential(shared_store: Store, text: str) -> None:
    assert shared_store.lookup_credential(text) is None
    assert shared_store.get_tunnel_session_by_token(text) is None
    assert shared_store.lookup_credential("sk-" + text) is None


# --------------------------------------------------------------------------- agents


def test_agents_are_team_scoped(store: Store) -> None:
    a, b = store.create_team("a"), store.create_team("b")
    agent = store.upsert_agent(a.id, None, "box", {"gpu": "a100"}, "1.0", "idle")
    assert store.get_agent(a.id, agent.id) == agent
    assert store.get_agent(b.id, agent.id) is None
    assert store.list_agents(b.id) == []
    assert store.list_agents(a.id) == [agent]
    assert not store.set_agent_status(b.id, agent.id, "busy")
    assert not store.touch_agent(b.id, agent.id)
    assert store.get_agent(a.id, agent.id).status == "idle"
    with pytest.raises(ConflictError):  # b cannot take over a's agent id
        store.upsert_agent(b.id, agent.id, "evil")
    assert store.get_agent(a.id, agent.id).name == "box"


def test_upsert_agent_inserts_then_updates(data_dir: Path) -> None:
    now = [1000.0]
    with Store.open(data_dir, clock=lambda: now[0]) as s:
        team = s.create_team("t")
        chosen = str(uuid.uuid4()).upper()
        first = s.upsert_agent(team.id, chosen, "box", ["gpu"], "1.0", "idle")
        assert first.id == normalize_uuid(chosen)
        assert (first.first_seen, first.last_seen) == (1000.0, 1000.0)
        now[0] = 2000.0
        again = s.upsert_agent(team.id, first.id, "box2", {"gpu": "h100"}, "1.1", "busy")
        assert again.id == first.id
        assert (again.name, again.labels, again.version, again.status) == (
            "box2", {"gpu": "h100"}, "1.1", "busy")
        assert (again.first_seen, again.last_seen) == (1000.0, 2000.0)
        now[0] = 3000.0
        assert s.touch_agent(team.id, first.id)
        assert s.get_agent(team.id, first.id).last_seen == 3000.0
        assert s.set_agent_status(team.id, first.id, "tunnel")
        assert s.get_agent(team.id, first.id).status == "tunnel"
        assert len(s.list_agents(team.id)) == 1
        assert s.mark_all_agents_offline() == 1
        assert s.get_agent(team.id, first.id).status == "offline"


def test_agent_input_validation(store: Store) -> None:
    team = store.create_team("t")
    with pytest.raises(StoreError, match="status"):
        store.upsert_agent(team.id, None, "a", status="sleeping")
    with pytest.raises(StoreError, match="UUID"):
        store.upsert_agent(team.id, "agent-1", "a")
    with pytest.raises(NotFoundError):
        store.upsert_agent(str(uuid.uuid4()), None, "a")
    agent = store.upsert_agent(team.id, None, "a")
    with pytest.raises(StoreError, match="status"):
        store.set_agent_status(team.id, agent.id, "nope")


# --------------------------------------------------------------------------- tunnel sessions


def test_tunnel_sessions(store: Store) -> None:
    a, b = store.create_team("a"), store.create_team("b")
    agent = store.upsert_agent(a.id, None, "box")
    other = store.upsert_agent(a.id, None, "box2")
    s1, access1, admin1 = store.create_tunnel_session(a.id, agent.id)
    s2, access2, _ = store.create_tunnel_session(a.id, agent.id, 22, "tcp")
    s3, _, _ = store.create_tunnel_session(a.id, other.id, 8888)
    assert (s1.target_port, s1.protocol, s1.is_open) == (8188, "http", True)
    assert len({s1.session_id, s2.session_id, s3.session_id}) == 3
    assert access1 != admin1

    # team scoping
    assert store.get_tunnel_session(b.id, s1.session_id) is None
    assert store.list_tunnel_sessions(b.id) == []
    assert not store.close_tunnel_session(b.id, s1.session_id)
    with pytest.raises(NotFoundError):
        store.create_tunnel_session(b.id, agent.id)

    # tokens: access token finds the session, admin token is not an access token
    assert store.get_tunnel_session_by_token(access1) == s1
    assert store.get_tunnel_session_by_token(admin1) is None
    assert store.get_tunnel_session_by_token(access1[:-1] + ("A" if access1[-1] != "A" else "B")) is None
    assert store.check_tunnel_admin_token(s1.session_id, admin1) == s1
    assert store.check_tunnel_admin_token(s1.session_id, access1) is None
    assert store.check_tunnel_admin_token(s2.session_id, admin1) is None

    assert store.list_tunnel_sessions(a.id) == [s1, s2, s3]
    assert store.list_tunnel_sessions(a.id, agent.id) == [s1, s2]

    # close one, then all of an agent's
    assert store.close_tunnel_session(a.id, s1.session_id)
    assert not store.close_tunnel_session(a.id, s1.session_id)
    assert store.get_tunnel_session_by_token(access1) is None
    assert store.get_tunnel_session_by_token(access1, open_only=False).closed_at is not None
    assert store.list_tunnel_sessions(a.id, agent.id) == [s2]
    assert len(store.list_tunnel_sessions(a.id, agent.id, open_only=False)) == 2
    assert store.close_tunnel_sessions(a.id, agent.id) == [s2.session_id]
    assert store.get_tunnel_session_by_token(access2) is None
    assert store.list_tunnel_sessions(a.id) == [s3]
    assert store.close_tunnel_sessions(b.id, other.id) == []
    assert store.list_tunnel_sessions(a.id) == [s3]


@pytest.mark.parametrize("port, protocol", [(0, "http"), (65536, "http"), (22, "udp"),
                                            (True, "tcp"), ("80", "http")])
def test_tunnel_session_validation(store: Store, port, protocol) -> None:
    team = store.create_team("t")
    agent = store.upsert_agent(team.id, None, "a")
    with pytest.raises(StoreError):
        store.create_tunnel_session(team.id, agent.id, port, protocol)
    assert store.list_tunnel_sessions(team.id, open_only=False) == []


def test_failed_transaction_rolls_back_and_store_stays_usable(store: Store) -> None:
    team = store.create_team("t")
    agent = store.upsert_agent(team.id, None, "a")
    with pytest.raises(ConflictError):
        store.upsert_agent(store.create_team("u").id, agent.id, "steal")
    assert store.get_agent(team.id, agent.id).name == "a"
    assert store.create_team("after").name == "after"


def test_locked_database_is_a_store_error(data_dir: Path) -> None:
    with Store.open(data_dir) as s:
        other = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None, timeout=0)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        s._db.execute("PRAGMA busy_timeout = 50")
        try:
            with pytest.raises(StoreError, match="locked"):
                s.create_team("blocked")
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert s.create_team("unblocked").name == "unblocked"
