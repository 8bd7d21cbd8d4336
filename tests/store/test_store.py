"""The SQLite backend of the store: its file, WAL, migrations, locking, and what reaches
the disk. What every backend must do is tests/store/test_store_contract.py (run against
SQLite and PostgreSQL)."""
from __future__ import annotations

import asyncio
import hmac
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.gateway.store import (
    DB_FILENAME,
    MIGRATIONS,
    ConflictError,
    SqliteStore,
    Store,
    StoreError,
    hash_token,
    open_store,
    store_location,
)
from relay.gateway.store import base as store_mod
from relay.gateway.store.wal_index import WalIndexHeader
from tests.support.store_fixtures import now


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path):
    s = Store.open(data_dir)
    yield s
    now(s.close())


def _all_bytes(directory: Path) -> bytes:
    """Every byte SQLite wrote: the database file and its -wal/-shm companions."""
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())


# --------------------------------------------------------------------------- open / schema


def test_open_creates_wal_database_with_current_schema(data_dir: Path) -> None:
    s = Store.open(data_dir)
    assert isinstance(s, SqliteStore)
    assert s.path == data_dir / DB_FILENAME
    assert now(s.schema_version()) == len(MIGRATIONS)
    now(s.close())
    db = sqlite3.connect(data_dir / DB_FILENAME)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"schema_version", "teams", "credentials", "agents", "tunnel_sessions", "tunnels",
            "tunnel_shares", "webhooks", "services", "webhook_deliveries", "tunnel_bindings"} <= tables
    db.close()


def test_database_file_is_owner_only(data_dir: Path) -> None:
    now(Store.open(data_dir).close())
    assert (data_dir / DB_FILENAME).stat().st_mode & 0o077 == 0
    assert data_dir.stat().st_mode & 0o077 == 0


def test_store_urls_name_a_file_or_a_directory(tmp_path: Path) -> None:
    async def opened(url: str) -> Path:
        store = await open_store(url, tmp_path / "default")
        await store.close()
        assert isinstance(store, SqliteStore)
        return store.path

    (tmp_path / "dir").mkdir()
    assert asyncio.run(opened("")) == tmp_path / "default" / DB_FILENAME  # --data
    assert asyncio.run(opened(f"sqlite://{tmp_path}/x/state.db")) == tmp_path / "x" / "state.db"
    assert asyncio.run(opened(str(tmp_path / "y.db"))) == tmp_path / "y.db"
    assert asyncio.run(opened(str(tmp_path / "dir"))) == tmp_path / "dir" / DB_FILENAME
    assert asyncio.run(opened(f"sqlite://{tmp_path}/z/")) == tmp_path / "z" / DB_FILENAME
    assert (tmp_path / "x").stat().st_mode & 0o077 == 0
    assert store_location(None, tmp_path / "d") == str(tmp_path / "d" / DB_FILENAME)
    for bad in ("mysql://localhost/db", "sqlite://"):
        with pytest.raises(StoreError) as info:
            asyncio.run(opened(bad))
        assert "\n" not in str(info.value)


def test_migration_8_keeps_one_tunnel_per_hub_port(data_dir: Path) -> None:
    """A database of schema 7 (no unique hub port) with two tunnels on one port, as an
    older fleet could record: after the migration the first keeps the port, the other
    has none (its gateway binds a new one), and the index holds from then on."""
    store = Store.open(data_dir)

    async def fill() -> tuple[str, str]:
        team = await store.create_team("t")
        agent = await store.upsert_agent(team.id, None, "box")
        one = await store.create_tunnel(team.id, agent.id, "one", "127.0.0.1", 22, "tcp", hub_port=22001)
        two = await store.create_tunnel(team.id, agent.id, "two", "127.0.0.1", 22, "tcp")
        return one.id, two.id

    one, two = now(fill())
    now(store.close())
    db = sqlite3.connect(data_dir / DB_FILENAME)
    db.execute("DROP INDEX tunnels_by_hub_port")
    db.execute("DROP INDEX tunnel_sessions_by_hub_port")  # (schema 10)
    db.execute("UPDATE schema_version SET version = 7")
    db.execute("ALTER TABLE tasks DROP COLUMN submitted_by")  # migration 9 adds it again
    db.execute("UPDATE tunnels SET hub_port = 22001")
    db.commit()
    db.close()
    store = Store.open(data_dir)
    try:
        ports = {t.id: t.hub_port for t in now(store.list_tunnels(None))}
        keeper = min(one, two)
        assert ports == {keeper: 22001, max(one, two): None}
        assert now(store.schema_version()) == len(MIGRATIONS)
    finally:
        now(store.close())
    db = sqlite3.connect(data_dir / DB_FILENAME)
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("UPDATE tunnels SET hub_port = 22001")
    db.close()


def test_migration_10_keeps_one_open_session_per_hub_port(data_dir: Path) -> None:
    """A database of schema 9 with two open tcp sessions on one hub port (an older fleet
    could record that): after the migration the oldest stays open, the other is closed,
    a closed session's old port does not count, and a new open one on the port, or a
    tunnel on it, is refused."""
    store = Store.open(data_dir)

    async def fill() -> tuple[str, str, str]:
        team = await store.create_team("t")
        agent = await store.upsert_agent(team.id, None, "box")
        one, _, _ = await store.create_tunnel_session(team.id, agent.id, 22, "tcp", hub_port=22002)
        two, _, _ = await store.create_tunnel_session(team.id, agent.id, 22, "tcp", hub_port=22003)
        old, _, _ = await store.create_tunnel_session(team.id, agent.id, 22, "tcp", hub_port=22004)
        await store.close_tunnel_session(team.id, old.session_id)
        return one.session_id, two.session_id, team.id

    one, two, team_id = now(fill())
    now(store.close())
    db = sqlite3.connect(data_dir / DB_FILENAME)
    db.execute("DROP INDEX tunnel_sessions_by_hub_port")
    db.execute("UPDATE schema_version SET version = 9")
    db.execute("UPDATE tunnel_sessions SET hub_port = 22002")
    db.commit()
    db.close()
    store = Store.open(data_dir)
    try:
        open_now = [s.session_id for s in now(store.list_tunnel_sessions(team_id))]
        assert open_now == [min(one, two)]
        assert now(store.schema_version()) == len(MIGRATIONS)
        agent_id = now(store.list_agents(team_id))[0].id
        with pytest.raises(ConflictError):
            now(store.create_tunnel_session(team_id, agent_id, 22, "tcp", hub_port=22002))
        with pytest.raises(ConflictError):
            now(store.create_tunnel(team_id, agent_id, "t", "127.0.0.1", 22, "tcp", hub_port=22002))
        now(store.create_tunnel_session(team_id, agent_id, 22, "tcp", hub_port=22005))  # free
    finally:
        now(store.close())


def test_newer_schema_is_refused(data_dir: Path) -> None:
    now(Store.open(data_dir).close())
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


def test_usable_from_another_thread(store: Store) -> None:
    team = now(store.create_team("t"))
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(now(store.get_team(team.id))))
    thread.start()
    thread.join()
    assert result == [team]


def test_calls_never_wait_on_the_event_loop(store: Store) -> None:
    """Every SQLite call finishes without suspending (one send() runs it to its end), so
    the gateway's calls cost what the synchronous store's did."""
    team, keys = now(store.create_team_with_keys("t"))
    assert now(store.lookup_credential(keys["sk"])).team_id == team.id
    assert now(store.list_teams()) == [team]


# --------------------------------------------------------------------------- secrets on disk


def test_only_hashes_reach_the_disk(data_dir: Path) -> None:
    s = Store.open(data_dir)
    team, keys = now(s.create_team_with_keys("t"))
    agent = now(s.upsert_agent(team.id, None, "a"))
    _, access, admin = now(s.create_tunnel_session(team.id, agent.id))
    tunnel = now(s.create_tunnel(team.id, agent.id, "w", "127.0.0.1", 80, "http"))
    _, share_token = now(s.create_share(team.id, tunnel.id, "s"))
    secrets = [*keys.values(), access, admin, share_token]
    written = _all_bytes(data_dir)
    for secret in secrets:
        assert secret.encode() not in written
    assert hash_token(keys["sk"]).encode() in written
    now(s.close())
    written = _all_bytes(data_dir)  # after the checkpoint on close, too
    for secret in secrets:
        assert secret.encode() not in written


def test_lookup_uses_constant_time_compare(store: Store, monkeypatch) -> None:
    team = now(store.create_team("t"))
    _, token = now(store.create_credential(team.id, "dk"))
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(store_mod.hmac, "compare_digest", spy)
    assert now(store.lookup_credential(token)) is not None
    assert calls and calls[-1][0] == calls[-1][1] == hash_token(token).encode()


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    s = Store.open(tmp_path_factory.mktemp("shared"))
    now(s.create_team_with_keys("t"))
    yield s
    now(s.close())


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80))
def test_arbitrary_text_is_never_a_credential(shared_store: Store, text: str) -> None:
    assert now(shared_store.lookup_credential(text)) is None
    assert now(shared_store.get_tunnel_session_by_token(text)) is None
    assert now(shared_store.lookup_credential("sk-" + text)) is None
    assert now(shared_store.get_share_by_token(text)) is None


# --------------------------------------------------------------------------- concurrency


def test_locked_database_is_a_store_error(data_dir: Path) -> None:
    s = Store.open(data_dir)
    other = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    s._db.execute("PRAGMA busy_timeout = 50")
    try:
        with pytest.raises(StoreError, match="locked"):
            now(s.create_team("blocked"))
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert now(s.create_team("unblocked")).name == "unblocked"
    now(s.close())


def test_generation_sees_another_process_at_once(data_dir: Path) -> None:
    """SQLite's data_version: a commit by another connection (``relay admin`` in another
    process) changes the generation before the next request, with no waiting."""
    s = Store.open(data_dir)
    before = s.generation()
    other = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    other.execute("INSERT INTO teams (id, name, created_at) VALUES ('x', 'x', 0)")
    other.close()
    assert s.generation() != before
    now(s.close())


def test_generation_reads_the_wal_index_header_and_sees_every_commit(data_dir: Path) -> None:
    """The generation comes from the WAL-index header in shared memory (no statement),
    and still moves on another process's commit, on one after another connection
    restarted the log (TRUNCATE checkpoint), and never on reads alone."""
    s = Store.open(data_dir)
    assert s._wal_index is not None  # the cheap path is the one in use
    path = data_dir / DB_FILENAME
    before = s.generation()
    now(s.list_teams())
    assert s.generation() == before
    script = ("import sqlite3, sys; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
              "db.execute(\"INSERT INTO teams (id, name, created_at) VALUES (?, 'p', 0)\", (sys.argv[2],)); "
              "db.close()")
    subprocess.run([sys.executable, "-c", script, str(path), "p1"], check=True, timeout=30)
    after_process = s.generation()
    assert after_process != before
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("SELECT count(*) FROM teams").fetchone()
    assert s.generation() == after_process  # another connection's read commits nothing
    other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    checkpointed = s.generation()
    other.execute("INSERT INTO teams (id, name, created_at) VALUES ('p2', 'p', 0)")
    other.close()
    assert s.generation() != checkpointed
    now(s.close())


def test_generation_asks_the_pragma_without_a_usable_header(data_dir: Path, tmp_path: Path) -> None:
    """No ``-shm`` file, or one of an unknown format: no header (None), and a store
    without one answers from ``PRAGMA data_version``, which sees commits as well."""
    assert WalIndexHeader.open(tmp_path / "absent.db") is None
    (tmp_path / "odd.db-shm").write_bytes(b"\x01" * 64)
    assert WalIndexHeader.open(tmp_path / "odd.db") is None
    (tmp_path / "short.db-shm").write_bytes(b"")
    assert WalIndexHeader.open(tmp_path / "short.db") is None
    s = Store.open(data_dir)
    s._wal_index.close()
    s._wal_index = None
    before = s.generation()
    assert isinstance(before[1], int)
    other = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    other.execute("INSERT INTO teams (id, name, created_at) VALUES ('x', 'x', 0)")
    other.close()
    assert s.generation() != before
    now(s.close())
