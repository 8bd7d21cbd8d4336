"""The SQLite backend of the gateway's state: an embedded database in the data directory.

One file, ``relay.db``, in WAL mode, so a restart loses nothing but live connections.
The schema is created and migrated on open from :data:`MIGRATIONS`, an ordered list;
the ``schema_version`` table records how many of them have run. Later features append
migrations, here and in relay.gateway.store.postgres alike; never edit old ones.

Every method is one short local transaction, run inline on the caller's thread (the
coroutines never wait: a call costs what the synchronous one did). One internal lock
serialises use of the single connection, so any one thread at a time may call in. The
rules themselves are relay.gateway.store.sql's; rows, errors and the handling of secrets
are relay.gateway.store.base's.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from relay.gateway.store.base import ConflictError, Row, StoreError, _reason
from relay.gateway.store.sql import SqlStore
from relay.gateway.store.wal_index import WalIndexHeader

__all__ = ["DB_FILENAME", "MIGRATIONS", "SqliteStore"]

DB_FILENAME = "relay.db"

# --------------------------------------------------------------------------- migrations

#: Ordered schema migrations; migration ``i`` moves the schema from version ``i`` to
#: ``i + 1``. Each is a sequence of SQL statements run in one transaction.
MIGRATIONS: list[Sequence[str]] = [
    # 1: teams, credentials, agents, tunnel sessions.
    (
        """CREATE TABLE teams (
            id          TEXT PRIMARY KEY,
            name        TEXT NOT NULL,
            created_at  REAL NOT NULL
        )""",
        """CREATE TABLE credentials (
            id          TEXT PRIMARY KEY,
            team_id     TEXT NOT NULL REFERENCES teams(id),
            kind        TEXT NOT NULL CHECK (kind IN ('ak', 'sk', 'dk')),
            token_hash  TEXT NOT NULL UNIQUE,
            prefix      TEXT NOT NULL,
            created_at  REAL NOT NULL,
            revoked_at  REAL
        )""",
        "CREATE INDEX credentials_by_team ON credentials(team_id)",
        """CREATE TABLE agents (
            id          TEXT PRIMARY KEY,
            team_id     TEXT NOT NULL REFERENCES teams(id),
            name        TEXT NOT NULL,
            labels      TEXT NOT NULL DEFAULT '{}',
            version     TEXT NOT NULL DEFAULT '',
            status      TEXT NOT NULL,
            first_seen  REAL NOT NULL,
            last_seen   REAL NOT NULL
        )""",
        "CREATE INDEX agents_by_team ON agents(team_id)",
        """CREATE TABLE tunnel_sessions (
            session_id        TEXT PRIMARY KEY,
            team_id           TEXT NOT NULL REFERENCES teams(id),
            agent_id          TEXT NOT NULL REFERENCES agents(id),
            target_port       INTEGER NOT NULL,
            protocol          TEXT NOT NULL,
            token_hash        TEXT NOT NULL UNIQUE,
            admin_token_hash  TEXT NOT NULL,
            hub_port          INTEGER,
            metadata          TEXT NOT NULL DEFAULT '{}',
            created_at        REAL NOT NULL,
            closed_at         REAL
        )""",
        "CREATE INDEX tunnel_sessions_by_team_agent ON tunnel_sessions(team_id, agent_id)",
    ),
    # 2: the Tunnels API (seed 002): named tunnels, their shares, webhooks.
    (
        """CREATE TABLE tunnels (
            id           TEXT PRIMARY KEY,
            team_id      TEXT NOT NULL REFERENCES teams(id),
            agent_id     TEXT NOT NULL REFERENCES agents(id),
            name         TEXT NOT NULL,
            target_host  TEXT NOT NULL,
            target_port  INTEGER NOT NULL,
            protocol     TEXT NOT NULL,
            public       INTEGER NOT NULL DEFAULT 0,
            hub_port     INTEGER,
            status       TEXT NOT NULL CHECK (status IN ('active', 'paused')),
            metadata     TEXT NOT NULL DEFAULT '{}',
            created_at   REAL NOT NULL,
            updated_at   REAL NOT NULL
        )""",
        "CREATE INDEX tunnels_by_team ON tunnels(team_id)",
        """CREATE TABLE tunnel_shares (
            id               TEXT PRIMARY KEY,
            team_id          TEXT NOT NULL REFERENCES teams(id),
            tunnel_id        TEXT NOT NULL REFERENCES tunnels(id) ON DELETE CASCADE,
            name             TEXT NOT NULL,
            description      TEXT NOT NULL DEFAULT '',
            token_hash       TEXT NOT NULL UNIQUE,
            token_prefix     TEXT NOT NULL,
            expires_at       REAL,
            allowed_methods  TEXT,
            rate_limit       INTEGER,
            created_at       REAL NOT NULL
        )""",
        "CREATE INDEX tunnel_shares_by_tunnel ON tunnel_shares(tunnel_id)",
        """CREATE TABLE webhooks (
            id          TEXT PRIMARY KEY,
            team_id     TEXT NOT NULL REFERENCES teams(id),
            url         TEXT NOT NULL,
            events      TEXT NOT NULL,
            secret      TEXT NOT NULL,
            created_at  REAL NOT NULL
        )""",
        "CREATE INDEX webhooks_by_team ON webhooks(team_id)",
    ),
    # 3: container services (seeds 003, 004; relay.gateway.api.services). ``spec`` is the
    # JSON of the latest declaration (port, health path, prompt, openapi, labels, url).
    (
        """CREATE TABLE services (
            team_id       TEXT NOT NULL REFERENCES teams(id),
            slug          TEXT NOT NULL,
            service_type  TEXT NOT NULL CHECK (service_type IN ('deployed', 'external')),
            spec          TEXT NOT NULL DEFAULT '{}',
            status        TEXT NOT NULL,
            created_at    REAL NOT NULL,
            updated_at    REAL NOT NULL,
            PRIMARY KEY (team_id, slug)
        )""",
    ),
    # 4: webhook deliveries not finished yet (relay.gateway.api.webhooks), so a restart
    # resumes them. ``attempts`` already made; a deleted webhook takes its own along.
    (
        """CREATE TABLE webhook_deliveries (
            id          TEXT PRIMARY KEY,
            webhook_id  TEXT NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
            event       TEXT NOT NULL,
            body        BLOB NOT NULL,
            attempts    INTEGER NOT NULL DEFAULT 0,
            created_at  REAL NOT NULL
        )""",
        "CREATE INDEX webhook_deliveries_by_age ON webhook_deliveries(created_at)",
    ),
    # 5: the Tunnels API's connect, made durable (relay.gateway.agents.bindings): which agent
    # listens on which loopback port for which tunnel, re-sent when that agent connects
    # again. A deleted tunnel takes its bindings along.
    (
        """CREATE TABLE tunnel_bindings (
            tunnel_id   TEXT NOT NULL REFERENCES tunnels(id) ON DELETE CASCADE,
            team_id     TEXT NOT NULL REFERENCES teams(id),
            agent_id    TEXT NOT NULL REFERENCES agents(id),
            local_port  INTEGER NOT NULL,
            created_at  REAL NOT NULL,
            PRIMARY KEY (tunnel_id, agent_id)
        )""",
        "CREATE INDEX tunnel_bindings_by_agent ON tunnel_bindings(team_id, agent_id)",
    ),
    # 6: tasks (seed 001; relay.gateway.api.tasks): what was asked and how it ended, so a
    # task acknowledged with 202 survives a restart. ``owner``: the gateway that runs it
    # (its restart queues its queued tasks again and fails those that were running).
    (
        """CREATE TABLE tasks (
            id           TEXT PRIMARY KEY,
            team_id      TEXT NOT NULL REFERENCES teams(id),
            owner        TEXT NOT NULL DEFAULT '',
            kind         TEXT NOT NULL,
            input        TEXT NOT NULL,
            labels       TEXT NOT NULL DEFAULT '[]',
            status       TEXT NOT NULL,
            agent_id     TEXT,
            result       TEXT,
            error        TEXT,
            created_at   REAL NOT NULL,
            updated_at   REAL NOT NULL,
            finished_at  REAL
        )""",
        "CREATE INDEX tasks_by_team_status ON tasks(team_id, status)",
        "CREATE INDEX tasks_by_owner_status ON tasks(owner, status)",
    ),
    # 7: a task's ``expose`` (the port tunnelled while it runs: relay.gateway.api.tasks),
    # so a task queued again after a restart still gets its tunnel. JSON, NULL for none.
    ("ALTER TABLE tasks ADD COLUMN expose TEXT",),
    # 8: a hub port belongs to one tunnel across the whole fleet: the unique index makes
    # the reservation atomic between gateways (relay.gateway.api.tunnels). Any duplicate
    # an older fleet recorded keeps its oldest holder; the others get a new port.
    (
        "UPDATE tunnels SET hub_port = NULL WHERE hub_port IS NOT NULL AND id NOT IN"
        " (SELECT MIN(id) FROM tunnels WHERE hub_port IS NOT NULL GROUP BY hub_port)",
        "CREATE UNIQUE INDEX tunnels_by_hub_port ON tunnels(hub_port)",
    ),
    # 9: who submitted a task (``KIND:SUBJECT`` of its credential or user), so its
    # tunnel's admin_token still goes to them alone after a restart
    # (relay.gateway.api.tasks). NULL for tasks recorded before.
    ("ALTER TABLE tasks ADD COLUMN submitted_by TEXT",),
    # 10: the hub port of an open tunnel session (seed 000, tcp and udp) is reserved
    # across the whole fleet too (relay.gateway.agents.tunnel_sessions): every gateway
    # listens on it. Closed sessions keep their old port for the record, so the index
    # covers open ones only. Any duplicate an older fleet left open is closed, the
    # oldest kept (its URL would reach another session's agent at some gateways).
    (
        "UPDATE tunnel_sessions SET closed_at = created_at WHERE closed_at IS NULL AND hub_port IS NOT NULL"
        " AND session_id NOT IN (SELECT MIN(session_id) FROM tunnel_sessions"
        " WHERE closed_at IS NULL AND hub_port IS NOT NULL GROUP BY hub_port)",
        "CREATE UNIQUE INDEX tunnel_sessions_by_hub_port ON tunnel_sessions(hub_port)"
        " WHERE closed_at IS NULL",
    ),
]


class _Tx:
    """:class:`~relay.gateway.store.sql.Tx` over the sqlite3 connection: each call runs
    the statement at once (nothing here ever waits on I/O of the event loop)."""

    __slots__ = ("_db",)

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        return self._db.execute(sql, args).fetchone()

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return self._db.execute(sql, args).fetchall()

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._db.execute(sql, args).rowcount

    async def executemany(self, sql: str, args: Iterable[Sequence[Any]]) -> None:
        self._db.executemany(sql, args)


class SqliteStore(SqlStore):
    """The SQLite-backed state of one gateway. Create with :meth:`SqliteStore.open`
    (a data directory) or :meth:`SqliteStore.open_file` (a database file)."""

    MIGRATIONS = MIGRATIONS

    def __init__(self, db: sqlite3.Connection, path: Path,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock)
        self._db = db
        self._tx = _Tx(db)
        self._lock = threading.RLock()
        self._generation_memo: tuple[int, int] | None = None
        #: The WAL-index header once the database is open (None: ask the pragma).
        self._wal_index: WalIndexHeader | None = None
        #: Path of the database file.
        self.path = path
        self.location = str(path)

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str], *,
             clock: Callable[[], float] = time.time) -> SqliteStore:
        """Open (creating if needed) the store in ``data_dir`` (its ``relay.db``) and
        migrate its schema.

        Raises :class:`StoreError` with a one-line reason if the directory or database
        cannot be created, opened or written.
        """
        directory = Path(data_dir).expanduser()
        return cls._open(directory / DB_FILENAME, f"data directory {directory}", clock)

    @classmethod
    def open_file(cls, path: str | os.PathLike[str], *,
                  clock: Callable[[], float] = time.time) -> SqliteStore:
        """Open (creating if needed, with its directory) the database file ``path``."""
        path = Path(path).expanduser()
        return cls._open(path, f"database {path}", clock)

    @classmethod
    def _open(cls, path: Path, what: str, clock: Callable[[], float]) -> SqliteStore:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Create the file owner-only before SQLite does (it would use the umask);
            # the -wal/-shm files inherit these permissions.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                 timeout=10.0)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open {what}: {_reason(exc)}") from None
        db.row_factory = sqlite3.Row
        store = cls(db, path, clock)
        try:
            store._configure()
            _run_now(store._migrate())
            store._wal_index = WalIndexHeader.open(path)  # (the -shm file exists now)
        except sqlite3.Error as exc:
            db.close()
            raise StoreError(f"cannot use database {path}: {_reason(exc)}") from None
        except StoreError:
            db.close()
            raise
        return store

    def _configure(self) -> None:
        db = self._db
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"cannot use database {self.path}: WAL mode unavailable ({mode})")
        db.execute("PRAGMA synchronous=NORMAL")  # durable across crashes in WAL mode
        db.execute("PRAGMA foreign_keys=ON")

    async def close(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        """:meth:`close`, from code that is not a coroutine."""
        with self._lock:
            self._db.close()
            if self._wal_index is not None:
                self._wal_index.close()
                self._wal_index = None

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[_Tx]:
        """One write transaction. IMMEDIATE takes the write lock up front, so two
        processes (gateway + ``relay admin``) never deadlock upgrading a read lock."""
        with self._lock, self._sqlite_errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._tx
                self._db.execute("COMMIT")
                self._own_writes += 1
                self._generation_memo = None
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[_Tx]:
        """A consistent read: a single statement in autocommit mode is its own snapshot."""
        with self._lock, self._sqlite_errors():
            yield self._tx

    def generation(self) -> tuple[int, int | bytes]:
        """A counter bumped per write transaction of this store, and what tells of any
        other connection's commit (another process included: ``relay admin`` revoking a
        key while the gateway runs), so a revoked key or a deleted service stops working
        on the very next request.

        That is the WAL-index header's bytes (relay.gateway.store.wal_index: a read of
        shared memory, no statement), or where it cannot be mapped, SQLite's ``PRAGMA
        data_version``: a statement under the store's lock (about 10 µs here), so within
        one turn of the event loop its answer is remembered, and forgotten at the next
        turn or at this store's next commit."""
        wal = self._wal_index
        if wal is not None:
            return (self._own_writes, wal.read())
        memo = self._generation_memo
        if memo is not None:
            return memo
        with self._lock:
            try:  # (_sqlite_errors, spelled out: a generator context costs as much as the pragma)
                value = (self._own_writes, self._db.execute("PRAGMA data_version").fetchone()[0])
            except sqlite3.OperationalError as exc:
                raise StoreError(f"database {self.path}: {exc}") from None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not in an event loop (relay admin): nothing to remember it for
            return value
        self._generation_memo = value
        loop.call_soon(self._forget_generation)
        return value

    def _forget_generation(self) -> None:
        self._generation_memo = None

    @contextlib.contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        # Operational failures (database locked too long, disk full, file gone) become
        # one-line StoreErrors; programming errors (sqlite3.ProgrammingError ...) do not.
        try:
            yield
        except sqlite3.OperationalError as exc:
            raise StoreError(f"database {self.path}: {exc}") from None
        except sqlite3.IntegrityError as exc:  # a row another transaction removed meanwhile ...
            raise ConflictError(f"database {self.path}: {exc}") from None

    # -- what SQLite spells its own way --------------------------------------------------

    async def _revoked_among(self, tx: Any, ids: list[str]) -> list[Row]:
        # json_each: one bound parameter however many ids (no SQLite variable limit).
        return await tx.fetchall("SELECT id FROM credentials WHERE revoked_at IS NOT NULL"
                                 " AND id IN (SELECT value FROM json_each(?))", (json.dumps(ids),))


def _run_now(coro: Any) -> Any:
    """Run a coroutine of this backend to its end without an event loop: its calls
    never wait on anything (sqlite3 is synchronous), so one ``send`` finishes it."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("a SQLite store coroutine waited on something")
