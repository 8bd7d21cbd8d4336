"""The PostgreSQL backend of the store, against the session's private PostgreSQL (tests/
servers.py): its schema mirrors SQLite's, what reaches the database, migrations of
gateways starting together, change notifications, and lost connections. What every
backend must do is tests/store/test_store_contract.py."""
from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from relay.gateway.store import Store, StoreError, StoreUnavailable, hash_token, open_store
from relay.gateway.store.postgres import MIGRATIONS, PostgresStore, redact_dsn
from relay.gateway.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from tests.support.servers import free_port
from tests.support.store_fixtures import with_store

pytestmark = pytest.mark.timeout(120)


async def _eventually(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_schema_has_the_same_versions_tables_and_columns_as_sqlite(pg_url: str, tmp_path: Path) -> None:
    assert len(MIGRATIONS) == len(SQLITE_MIGRATIONS)
    with_store(pg_url, lambda s: s.schema_version())
    with_store(f"sqlite://{tmp_path}/s.db", lambda s: s.schema_version())

    async def pg_columns() -> dict[str, set[str]]:
        conn = await asyncpg.connect(pg_url)
        try:
            rows = await conn.fetch("SELECT table_name, column_name FROM information_schema.columns"
                                    " WHERE table_schema = 'public'")
        finally:
            await conn.close()
        out: dict[str, set[str]] = {}
        for row in rows:
            out.setdefault(row["table_name"], set()).add(row["column_name"])
        return out

    db = sqlite3.connect(tmp_path / "s.db")
    sqlite_columns = {name: {c[1] for c in db.execute(f"PRAGMA table_info({name})")}
                      for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.close()
    pg = asyncio.run(pg_columns())
    # The same tables and columns, but for the column that orders webhook deliveries
    # (SQLite has its implicit rowid).
    pg["webhook_deliveries"].discard("seq")
    assert pg == sqlite_columns


def test_newer_schema_is_refused(pg_url: str) -> None:
    with_store(pg_url, lambda s: s.schema_version())

    async def bump() -> None:
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute("UPDATE schema_version SET version = $1", len(MIGRATIONS) + 1)
        finally:
            await conn.close()

    asyncio.run(bump())
    with pytest.raises(StoreError, match="newer than this relay"):
        with_store(pg_url, lambda s: s.schema_version())


def test_gateways_starting_together_migrate_once(pg_url: str) -> None:
    async def main() -> None:
        stores = await asyncio.gather(*(open_store(pg_url) for _ in range(4)))
        try:
            assert {await s.schema_version() for s in stores} == {len(MIGRATIONS)}
        finally:
            for s in stores:
                await s.close()

    asyncio.run(main())


def test_only_hashes_reach_the_database(pg_url: str) -> None:
    async def body(s: Store) -> list[str]:
        team, keys = await s.create_team_with_keys("t")
        agent = await s.upsert_agent(team.id, None, "a")
        _, access, admin = await s.create_tunnel_session(team.id, agent.id)
        tunnel = await s.create_tunnel(team.id, agent.id, "w", "127.0.0.1", 80, "http")
        _, share_token = await s.create_share(team.id, tunnel.id, "s")
        return [*keys.values(), access, admin, share_token]

    secrets = with_store(pg_url, body)

    async def dump() -> str:
        conn = await asyncpg.connect(pg_url)
        try:
            tables = [r[0] for r in await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]
            rows = [await conn.fetch(f"SELECT row_to_json(t)::text FROM {table} t") for table in tables]
        finally:
            await conn.close()
        return "\n".join(r[0] for table_rows in rows for r in table_rows)

    everything = asyncio.run(dump())
    for secret in secrets:
        assert secret not in everything
    assert hash_token(secrets[0]) in everything


def test_unreachable_server_is_a_one_line_error_without_the_password() -> None:
    url = f"postgresql://relay:s3cret-pw@127.0.0.1:{free_port()}/relay"
    with pytest.raises(StoreUnavailable) as info:
        asyncio.run(open_store(url))
    message = str(info.value)
    assert "\n" not in message and "s3cret-pw" not in message
    assert "cannot connect to PostgreSQL at postgresql://relay@127.0.0.1:" in message


def test_a_database_that_does_not_exist_is_a_store_error(pg_databases) -> None:
    with pytest.raises(StoreError) as info:
        asyncio.run(open_store(pg_databases.url("no_such_database")))
    assert "no_such_database" in str(info.value) and "\n" not in str(info.value)


def test_redact_dsn() -> None:
    assert redact_dsn("postgresql://u:pw@h:5/db?sslmode=require") == "postgresql://u@h:5/db?sslmode=require"
    assert redact_dsn("postgresql://h/db?password=pw&user=u") == "postgresql://h/db?password=%2A%2A%2A&user=u"
    assert redact_dsn("postgres://h/db") == "postgres://h/db"


def test_lost_connections_are_unavailable_for_one_call_and_then_come_back(pg_url: str) -> None:
    """The server ends every connection of the store (as a restart would): the call that
    meets a dead connection raises StoreUnavailable (the API's 503), the pool connects
    again for the next, and the change notifications (LISTEN) come back: meanwhile the
    generation changes on every call, so no cache is trusted while commits of others
    could be missed."""

    async def body(s: Store) -> None:
        assert isinstance(s, PostgresStore)
        team = await s.create_team("t")
        stable = s.generation()
        assert s.generation() == stable

        admin = await asyncpg.connect(pg_url)
        try:
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        finally:
            await admin.close()
        await _eventually(lambda: s.generation() != s.generation())  # the listener is gone
        failures = 0
        for _ in range(3):  # the pool's one idle connection was cut: at most one failure
            try:
                assert await s.get_team(team.id) == team
            except StoreUnavailable as exc:
                failures += 1
                assert "\n" not in str(exc)
        assert failures <= 1
        await _eventually(lambda: s.generation() == s.generation())  # listening again
        seen = s.generation()
        other = await open_store(pg_url, listen=False)
        try:
            await other.create_team("u")
        finally:
            await other.close()
        await _eventually(lambda: s.generation() != seen)

    with_store(pg_url, body)


def test_a_stopped_store_answers_unavailable_not_hangs(pg_url: str) -> None:
    async def body(s: Store) -> None:
        await s.close()
        with pytest.raises(StoreError):
            await s.list_teams()

    async def main() -> None:
        await body(await open_store(pg_url))

    asyncio.run(main())
