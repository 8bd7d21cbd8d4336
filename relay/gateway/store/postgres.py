"""The PostgreSQL backend of the gateway's state, on asyncpg: one database that several
gateways (and ``relay admin`` from anywhere) share.

``relay gateway --store postgresql://USER:PASSWORD@HOST:PORT/DBNAME`` (``RELAY_STORE``,
``store`` in the TOML file). Needs asyncpg: ``pip install 'relay[postgres]'``.

* **Same rules, same schema versions.** The statements are relay.gateway.store.sql's,
  shared with SQLite (``?`` parameters become ``$n`` here); :data:`MIGRATIONS` has the
  same versions as SQLite's, in PostgreSQL's dialect (``DOUBLE PRECISION`` times,
  ``BYTEA`` bodies, an identity column ordering webhook deliveries where SQLite has its
  ``rowid``). Migrations, and the check-then-insert of the first team, take an advisory
  transaction lock, so gateways starting together migrate once and create one default
  team.
* **Never blocks the event loop.** Every call is a coroutine on an asyncpg pool; a
  transaction holds one pooled connection for its few statements. A call that cannot
  reach the server raises :class:`~relay.gateway.store.base.StoreUnavailable` (after at
  most :data:`COMMAND_TIMEOUT` seconds), and the pool reconnects by itself.
* **No round trip per request.** :meth:`PostgresStore.generation` is answered from
  memory: a counter of this store's own commits and of the ``relay_changes``
  notifications a trigger on every table sends (LISTEN/NOTIFY, on one connection of its
  own), so the gateway's caches (credentials, services, shares, tunnel sessions) are
  dropped when anyone commits, as SQLite's ``data_version`` does. The one difference:
  a commit of another process is seen when its notification arrives, a few
  milliseconds later, not at the very next request. While that connection is down,
  :meth:`~PostgresStore.generation` changes on every call, so no cache is trusted until
  it is back (reconnected in the background).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
import zlib
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any, Optional
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from relay.gateway.store.base import ConflictError, Row, StoreError, StoreUnavailable
from relay.gateway.store.sql import SqlStore

__all__ = ["CHANNEL", "MIGRATIONS", "PostgresStore", "redact_dsn"]

#: The NOTIFY channel every table's trigger signals a commit on.
CHANNEL = "relay_changes"
#: Seconds a statement (and a connection attempt) may take before StoreUnavailable.
COMMAND_TIMEOUT = 10.0
#: Connections the pool keeps at least and at most.
POOL_MIN = 1
POOL_MAX = 10
#: Delays between attempts to bring the LISTEN connection back (the last one repeats).
LISTEN_RETRY = (0.2, 0.5, 1.0, 2.0, 5.0)


def _notify_trigger(table: str) -> str:
    return (f"CREATE TRIGGER {table}_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table}"
            " FOR EACH STATEMENT EXECUTE FUNCTION relay_notify_change()")


#: Ordered schema migrations, the same versions as relay.gateway.store.sqlite.MIGRATIONS
#: (same tables, columns and constraints after each); PostgreSQL's dialect.
MIGRATIONS: list[Sequence[str]] = [
    # 1: teams, credentials, agents, tunnel sessions; the change notification.
    (
        f"""CREATE FUNCTION relay_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_notify('{CHANNEL}', TG_TABLE_NAME);
                RETURN NULL;
            END $$""",
        """CREATE TABLE teams (
            id          TEXT PRIMARY KEY,
            name        TEXT NOT NULL,
            created_at  DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE credentials (
            id          TEXT PRIMARY KEY,
            team_id     TEXT NOT NULL REFERENCES teams(id),
            kind        TEXT NOT NULL CHECK (kind IN ('ak', 'sk', 'dk')),
            token_hash  TEXT NOT NULL UNIQUE,
            prefix      TEXT NOT NULL,
            created_at  DOUBLE PRECISION NOT NULL,
            revoked_at  DOUBLE PRECISION
        )""",
        "CREATE INDEX credentials_by_team ON credentials(team_id)",
        """CREATE TABLE agents (
            id          TEXT PRIMARY KEY,
            team_id     TEXT NOT NULL REFERENCES teams(id),
            name        TEXT NOT NULL,
            labels      TEXT NOT NULL DEFAULT '{}',
            version     TEXT NOT NULL DEFAULT '',
            status      TEXT NOT NULL,
            first_seen  DOUBLE PRECISION NOT NULL,
            last_seen   DOUBLE PRECISION NOT NULL
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
            created_at        DOUBLE PRECISION NOT NULL,
            closed_at         DOUBLE PRECISION
        )""",
        "CREATE INDEX tunnel_sessions_by_team_agent ON tunnel_sessions(team_id, agent_id)",
        *(_notify_trigger(t) for t in ("teams", "credentials", "agents", "tunnel_sessions")),
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
            created_at   DOUBLE PRECISION NOT NULL,
            updated_at   DOUBLE PRECISION NOT NULL
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
            expires_at       DOUBLE PRECISION,
            allowed_methods  TEXT,
            rate_limit       INTEGER,
            created_at       DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX tunnel_shares_by_tunnel ON tunnel_shares(tunnel_id)",
        """CREATE TABLE webhooks (
            id          TEXT PRIMARY KEY,
            team_id     TEXT NOT NULL REFERENCES teams(id),
            url         TEXT NOT NULL,
            events      TEXT NOT NULL,
            secret      TEXT NOT NULL,
            created_at  DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX webhooks_by_team ON webhooks(team_id)",
        *(_notify_trigger(t) for t in ("tunnels", "tunnel_shares", "webhooks")),
    ),
    # 3: container services (seeds 003, 004).
    (
        """CREATE TABLE services (
            team_id       TEXT NOT NULL REFERENCES teams(id),
            slug          TEXT NOT NULL,
            service_type  TEXT NOT NULL CHECK (service_type IN ('deployed', 'external')),
            spec          TEXT NOT NULL DEFAULT '{}',
            status        TEXT NOT NULL,
            created_at    DOUBLE PRECISION NOT NULL,
            updated_at    DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (team_id, slug)
        )""",
        _notify_trigger("services"),
    ),
    # 4: webhook deliveries not finished yet. ``seq`` orders deliveries of one instant
    # (SQLite's rowid). No notification: no cache holds them.
    (
        """CREATE TABLE webhook_deliveries (
            id          TEXT PRIMARY KEY,
            webhook_id  TEXT NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
            event       TEXT NOT NULL,
            body        BYTEA NOT NULL,
            attempts    INTEGER NOT NULL DEFAULT 0,
            created_at  DOUBLE PRECISION NOT NULL,
            seq         BIGINT GENERATED ALWAYS AS IDENTITY
        )""",
        "CREATE INDEX webhook_deliveries_by_age ON webhook_deliveries(created_at)",
    ),
    # 5: the Tunnels API's connect, made durable.
    (
        """CREATE TABLE tunnel_bindings (
            tunnel_id   TEXT NOT NULL REFERENCES tunnels(id) ON DELETE CASCADE,
            team_id     TEXT NOT NULL REFERENCES teams(id),
            agent_id    TEXT NOT NULL REFERENCES agents(id),
            local_port  INTEGER NOT NULL,
            created_at  DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (tunnel_id, agent_id)
        )""",
        "CREATE INDEX tunnel_bindings_by_agent ON tunnel_bindings(team_id, agent_id)",
        _notify_trigger("tunnel_bindings"),
    ),
    # 6: tasks (seed 001). No notification: no cache holds them.
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
            created_at   DOUBLE PRECISION NOT NULL,
            updated_at   DOUBLE PRECISION NOT NULL,
            finished_at  DOUBLE PRECISION
        )""",
        "CREATE INDEX tasks_by_team_status ON tasks(team_id, status)",
        "CREATE INDEX tasks_by_owner_status ON tasks(owner, status)",
    ),
    # 7: a task's ``expose`` (relay.gateway.api.tasks), JSON or NULL.
    ("ALTER TABLE tasks ADD COLUMN expose TEXT",),
    # 8: one tunnel per hub port across the fleet (as SQLite's 8; NULLs do not collide).
    (
        "UPDATE tunnels SET hub_port = NULL WHERE hub_port IS NOT NULL AND id NOT IN"
        " (SELECT MIN(id) FROM tunnels WHERE hub_port IS NOT NULL GROUP BY hub_port)",
        "CREATE UNIQUE INDEX tunnels_by_hub_port ON tunnels(hub_port)",
    ),
    # 9: who submitted a task (as SQLite's 9).
    ("ALTER TABLE tasks ADD COLUMN submitted_by TEXT",),
    # 10: one open tunnel session per hub port across the fleet (as SQLite's 10).
    (
        "UPDATE tunnel_sessions SET closed_at = created_at WHERE closed_at IS NULL AND hub_port IS NOT NULL"
        " AND session_id NOT IN (SELECT MIN(session_id) FROM tunnel_sessions"
        " WHERE closed_at IS NULL AND hub_port IS NOT NULL GROUP BY hub_port)",
        "CREATE UNIQUE INDEX tunnel_sessions_by_hub_port ON tunnel_sessions(hub_port)"
        " WHERE closed_at IS NULL",
    ),
]


# --------------------------------------------------------------------------- helpers


def redact_dsn(dsn: str) -> str:
    """``dsn`` without its password (in the authority or a ``password=`` parameter)."""
    try:
        parts = urlsplit(dsn)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostinfo = netloc.rpartition("@")
            netloc = userinfo.partition(":")[0] + ("@" if userinfo else "") + hostinfo
        query = urlencode([(k, "***" if k.lower() == "password" else v)
                           for k, v in parse_qsl(parts.query, keep_blank_values=True)])
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return "postgresql://…"


_PARAM = re.compile(r"\?")
_translated: dict[str, str] = {}


def _dollar_params(sql: str) -> str:
    """``?`` parameters -> ``$1, $2, ...`` (the shared statements have no ``?`` inside
    literals). Memoised: the statements are a fixed set."""
    out = _translated.get(sql)
    if out is None:
        counter = itertools.count(1)
        out = _translated[sql] = _PARAM.sub(lambda _: f"${next(counter)}", sql)
    return out


def _changed(status: str) -> int:
    """Rows changed, from a command status such as ``UPDATE 3`` or ``INSERT 0 1``."""
    last = status.rpartition(" ")[2]
    return int(last) if last.isdigit() else 0


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class _Tx:
    """:class:`~relay.gateway.store.sql.Tx` over one asyncpg connection."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        return await self._conn.fetchrow(_dollar_params(sql), *args)

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return await self._conn.fetch(_dollar_params(sql), *args)

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        if args:
            return _changed(await self._conn.execute(_dollar_params(sql), *args))
        return _changed(await self._conn.execute(sql))  # DDL: the simple protocol

    async def executemany(self, sql: str, args: Iterable[Sequence[Any]]) -> None:
        rows = [tuple(a) for a in args]
        if rows:
            await self._conn.executemany(_dollar_params(sql), rows)


# --------------------------------------------------------------------------- the store


class PostgresStore(SqlStore):
    """The state in a PostgreSQL database. Create with :meth:`PostgresStore.connect`."""

    MIGRATIONS = MIGRATIONS
    _DELIVERY_ORDER = "seq"
    _OFFSET = "OFFSET ?"

    def __init__(self, pool: Any, dsn: str, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock)
        self._pool = pool
        self._dsn = dsn
        self.location = redact_dsn(dsn)
        #: Notifications received (and reconnections of the LISTEN connection).
        self._notices = 0
        self._listener: Any = None
        self._relisten: Optional[asyncio.Task] = None
        self._closing = False
        self._volatile = itertools.count()

    @classmethod
    async def connect(cls, dsn: str, *, listen: bool = True, clock: Callable[[], float] = time.time,
                      min_size: int = POOL_MIN, max_size: int = POOL_MAX) -> PostgresStore:
        """Connect to ``dsn``, create or migrate the schema, and (``listen``) follow
        other processes' commits. Raises :class:`StoreError` (:class:`StoreUnavailable`
        when the server cannot be reached) with a one-line reason."""
        try:
            import asyncpg
        except ImportError:
            raise StoreError("the PostgreSQL store needs asyncpg: pip install 'relay[postgres]'") from None
        location = redact_dsn(dsn)
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=min_size, max_size=max_size, timeout=COMMAND_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT, server_settings={"application_name": "relay"})
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL at {location}: {_reason(exc)}") from None
        except (asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
            raise StoreError(f"cannot use PostgreSQL at {location}: {_reason(exc)}") from None
        store = cls(pool, dsn, clock)
        try:
            await store._migrate()
            if listen:
                with store._errors():
                    await store._listen()
        except BaseException:
            await store.close()
            raise
        return store

    def __repr__(self) -> str:
        return f"PostgresStore({self.location!r})"

    async def close(self) -> None:
        self._closing = True
        if self._relisten is not None:
            self._relisten.cancel()
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.close(), COMMAND_TIMEOUT)
        try:
            await asyncio.wait_for(self._pool.close(), COMMAND_TIMEOUT)
        except Exception:  # noqa: BLE001 - a server gone away: drop the connections
            self._pool.terminate()

    # -- transactions ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[_Tx]:
        with self._errors():
            async with self._pool.acquire() as conn, conn.transaction():
                yield _Tx(conn)
            self._own_writes += 1

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[_Tx]:
        with self._errors():
            async with self._pool.acquire() as conn:
                yield _Tx(conn)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """asyncpg's and the network's failures as one-line StoreErrors."""
        import asyncpg

        try:
            yield
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL at {self.location}: {_reason(exc)}") from None
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise ConflictError(f"PostgreSQL at {self.location}: {_reason(exc)}") from None
        except asyncpg.PostgresError as exc:
            raise StoreError(f"PostgreSQL at {self.location}: {_reason(exc)}") from None

    async def _serialize(self, tx: Any, what: str) -> None:
        # A transaction-scoped advisory lock: the second taker waits for the first's commit.
        await tx.fetchone("SELECT pg_advisory_xact_lock(?)", (zlib.crc32(f"relay:{what}".encode()),))

    async def _revoked_among(self, tx: Any, ids: list[str]) -> list[Row]:
        return await tx.fetchall("SELECT id FROM credentials WHERE revoked_at IS NOT NULL"
                                 " AND id = ANY(?::text[])", (ids,))

    # -- other processes' commits ------------------------------------------------------

    def generation(self) -> Hashable:
        """This store's commits and the change notifications received, from memory.
        While the LISTEN connection is down, a new value on every call (see the module
        docstring)."""
        listener = self._listener
        if listener is None or listener.is_closed():
            return (self._own_writes, self._notices, next(self._volatile))
        return (self._own_writes, self._notices)

    async def _listen(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self._dsn, timeout=COMMAND_TIMEOUT,
                                     server_settings={"application_name": "relay-listen"})
        try:
            await conn.add_listener(CHANNEL, self._notified)
        except BaseException:
            await conn.close()
            raise
        conn.add_termination_listener(self._listener_lost)
        self._listener = conn
        self._notices += 1  # whatever changed while nobody listened

    def _notified(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        self._notices += 1

    def _listener_lost(self, conn: Any) -> None:
        if conn is not self._listener:
            return
        self._listener = None
        if not self._closing and (self._relisten is None or self._relisten.done()):
            self._relisten = asyncio.get_running_loop().create_task(self._listen_again())

    async def _listen_again(self) -> None:
        for attempt in itertools.count():
            await asyncio.sleep(LISTEN_RETRY[min(attempt, len(LISTEN_RETRY) - 1)])
            if self._closing:
                return
            try:
                await self._listen()
                return
            except Exception:  # noqa: BLE001 - not back yet; caches stay distrusted meanwhile
                continue


def _unavailable() -> tuple[type[BaseException], ...]:
    try:
        import asyncpg
    except ImportError:
        return (OSError, TimeoutError)
    return (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
            asyncpg.OperatorInterventionError, asyncpg.exceptions.InternalClientError)


#: Errors that mean "the server cannot be reached (now)".
_UNAVAILABLE: tuple[type[BaseException], ...] = _unavailable()
