"""The SQLite backend of the gateway's state: an embedded database in the data directory.

One file, ``relay.db``, in WAL mode, so a restart loses nothing but live connections.
The schema is created and migrated on :meth:`Store.open` from :data:`MIGRATIONS`, an
ordered list; the ``schema_version`` table records how many of them have run. Later
features (tunnels, shares, services, webhooks) append migrations; never edit old ones.

Every method is one short transaction. Calls are small, so they are synchronous: the
asyncio gateway may call them directly or through a worker thread. One internal lock
serialises use of the single connection, so any one thread at a time may call in.
Rows, errors and the handling of secrets are shared by every backend
(:mod:`relay.gateway.store.base`).
"""
from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from relay.gateway.store.base import (
    _TOKEN_BYTES,
    CREDENTIAL_KINDS,
    PREFIX_CHARS,
    TUNNEL_SESSION_PROTOCOLS,
    Agent,
    ConflictError,
    Credential,
    NotFoundError,
    SecretToken,
    Service,
    Share,
    StoreError,
    Team,
    Tunnel,
    TunnelSession,
    Webhook,
    _agent,
    _check_status,
    _credential,
    _hash_matches,
    _new_token,
    _reason,
    _service,
    _session,
    _share,
    _team,
    _tunnel,
    _webhook,
    hash_token,
    normalize_uuid,
    token_kind,
)

__all__ = ["DB_FILENAME", "MIGRATIONS", "Store"]

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
]


class Store:
    """The SQLite-backed state of one gateway. Create with :meth:`Store.open`."""

    def __init__(self, db: sqlite3.Connection, path: Path,
                 clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._lock = threading.RLock()
        self._clock = clock
        #: Path of the database file.
        self.path = path
        #: Bumped whenever tunnel sessions are closed (in-memory token caches compare it).
        self.tunnel_sessions_version = 0
        #: Bumped on every write transaction this Store commits (see :meth:`generation`).
        self._own_writes = 0

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str], *,
             clock: Callable[[], float] = time.time) -> Store:
        """Open (creating if needed) the store in ``data_dir`` and migrate its schema.

        Raises :class:`StoreError` with a one-line reason if the directory or database
        cannot be created, opened or written.
        """
        directory = Path(data_dir).expanduser()
        path = directory / DB_FILENAME
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Create the file owner-only before SQLite does (it would use the umask);
            # the -wal/-shm files inherit these permissions.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                 timeout=10.0)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open data directory {directory}: {_reason(exc)}") from None
        db.row_factory = sqlite3.Row
        store = cls(db, path, clock)
        try:
            store._configure_and_migrate()
        except sqlite3.Error as exc:
            db.close()
            raise StoreError(f"cannot use database {path}: {_reason(exc)}") from None
        except StoreError:
            db.close()
            raise
        return store

    def _configure_and_migrate(self) -> None:
        db = self._db
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"cannot use database {self.path}: WAL mode unavailable ({mode})")
        db.execute("PRAGMA synchronous=NORMAL")  # durable across crashes in WAL mode
        db.execute("PRAGMA foreign_keys=ON")
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                db.execute("INSERT INTO schema_version (version) VALUES (0)")
                version = 0
            else:
                version = row[0]
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"database {self.path} has schema version {version}, newer than this "
                    f"relay understands ({len(MIGRATIONS)}); upgrade relay")
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    db.execute(statement)
            db.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS),))

    @property
    def schema_version(self) -> int:
        """The schema version of the open database."""
        with self._lock:
            return self._db.execute("SELECT version FROM schema_version").fetchone()[0]

    def close(self) -> None:
        """Close the database. The store is unusable afterwards."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. IMMEDIATE takes the write lock up front, so two
        processes (gateway + ``relay admin``) never deadlock upgrading a read lock."""
        with self._lock, self._sqlite_errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
                self._own_writes += 1
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def generation(self) -> tuple[int, int]:
        """A value that changes whenever anything was committed to the database since the
        last call returned it: by this Store (a counter bumped per write transaction) or
        by any other connection, another process included (SQLite's ``PRAGMA
        data_version``, e.g. ``relay admin`` revoking a key while the gateway runs).

        In-memory caches of rows (credentials, services) keep what they hold only while
        this value stays the same, so a revoked key or a deleted service stops working on
        the very next request. The pragma is one cheap statement that reads no table.
        """
        with self._lock, self._sqlite_errors():
            return self._own_writes, self._db.execute("PRAGMA data_version").fetchone()[0]

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent read: a single statement in autocommit mode is its own snapshot."""
        with self._lock, self._sqlite_errors():
            yield self._db

    @contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        # Operational failures (database locked too long, disk full, file gone) become
        # one-line StoreErrors; programming errors (sqlite3.ProgrammingError ...) do not.
        try:
            yield
        except sqlite3.OperationalError as exc:
            raise StoreError(f"database {self.path}: {exc}") from None

    # -- teams -------------------------------------------------------------------------

    def create_team(self, name: str) -> Team:
        """Create a team named ``name`` (1..100 characters) with a new UUID."""
        with self._write() as db:
            return self._insert_team(db, name)

    def create_team_with_keys(
        self, name: str, kinds: Sequence[str] = CREDENTIAL_KINDS, *, only_if_no_teams: bool = False,
    ) -> tuple[Team, dict[str, SecretToken]] | None:
        """Create a team and one credential of each of ``kinds``, atomically.

        Returns the team and ``{kind: plaintext token}`` (shown once, never stored). With
        ``only_if_no_teams`` nothing is created, and None returned, if any team exists.
        """
        with self._write() as db:
            if only_if_no_teams and db.execute("SELECT 1 FROM teams LIMIT 1").fetchone():
                return None
            team = self._insert_team(db, name)
            keys = {kind: self._insert_credential(db, team.id, kind)[1] for kind in kinds}
            return team, keys

    def get_team(self, team_id: str) -> Team | None:
        """The team with this id, or None (also for a malformed id)."""
        tid = normalize_uuid(team_id)
        if tid is None:
            return None
        with self._read() as db:
            row = db.execute("SELECT * FROM teams WHERE id = ?", (tid,)).fetchone()
        return _team(row) if row else None

    def list_teams(self) -> list[Team]:
        """All teams, oldest first."""
        with self._read() as db:
            rows = db.execute("SELECT * FROM teams ORDER BY created_at, id").fetchall()
        return [_team(row) for row in rows]

    def _insert_team(self, db: sqlite3.Connection, name: str) -> Team:
        name = name.strip() if isinstance(name, str) else ""
        if not 1 <= len(name) <= 100:
            raise StoreError("team name must be 1 to 100 characters")
        team = Team(id=str(uuid.uuid4()), name=name, created_at=self._clock())
        db.execute("INSERT INTO teams (id, name, created_at) VALUES (?, ?, ?)",
                   (team.id, team.name, team.created_at))
        return team

    def _require_team(self, db: sqlite3.Connection, team_id: str) -> str:
        canonical = normalize_uuid(team_id)
        if canonical is None or not db.execute(
                "SELECT 1 FROM teams WHERE id = ?", (canonical,)).fetchone():
            raise NotFoundError(f"unknown team: {team_id}")
        return canonical

    # -- credentials -------------------------------------------------------------------

    def create_credential(self, team_id: str, kind: str) -> tuple[Credential, SecretToken]:
        """Issue a new ``kind`` (``ak``/``sk``/``dk``) credential for the team.

        Returns the row and the plaintext token; the token is not stored anywhere.
        """
        with self._write() as db:
            return self._insert_credential(db, team_id, kind)

    def _insert_credential(self, db: sqlite3.Connection, team_id: str,
                           kind: str) -> tuple[Credential, SecretToken]:
        if kind not in CREDENTIAL_KINDS:
            raise StoreError(f"credential kind must be one of {', '.join(CREDENTIAL_KINDS)}")
        team_id = self._require_team(db, team_id)
        token = _new_token(kind)
        cred = Credential(
            id=str(uuid.uuid4()), team_id=team_id, kind=kind,
            prefix=token[:len(kind) + 1 + PREFIX_CHARS], created_at=self._clock(),
            revoked_at=None, token_hash=hash_token(token),
        )
        db.execute(
            "INSERT INTO credentials (id, team_id, kind, token_hash, prefix, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (cred.id, cred.team_id, cred.kind, cred.token_hash, cred.prefix, cred.created_at))
        return cred, token

    def lookup_credential(self, token: str) -> Credential | None:
        """The active (not revoked) credential whose token is ``token``, else None."""
        if not isinstance(token, str) or token_kind(token) is None:
            return None
        with self._read() as db:
            row = db.execute("SELECT * FROM credentials WHERE token_hash = ?",
                             (hash_token(token),)).fetchone()
        if row is None or row["revoked_at"] is not None:
            return None
        if not _hash_matches(row["token_hash"], token):
            return None
        return _credential(row)

    def get_credential(self, team_id: str, credential_id: str) -> Credential | None:
        """The team's credential with this id (revoked or not), or None."""
        with self._read() as db:
            row = db.execute("SELECT * FROM credentials WHERE id = ? AND team_id = ?",
                             (normalize_uuid(credential_id), normalize_uuid(team_id))).fetchone()
        return _credential(row) if row else None

    def list_credentials(self, team_id: str, *, include_revoked: bool = False) -> list[Credential]:
        """The team's credentials, oldest first; revoked ones only if asked."""
        sql = "SELECT * FROM credentials WHERE team_id = ?"
        if not include_revoked:
            sql += " AND revoked_at IS NULL"
        with self._read() as db:
            rows = db.execute(sql + " ORDER BY created_at, id",
                              (normalize_uuid(team_id),)).fetchall()
        return [_credential(row) for row in rows]

    def revoke_credential(self, team_id: str, credential_id: str) -> bool:
        """Revoke one of the team's credentials. False if no such active credential."""
        with self._write() as db:
            cur = db.execute(
                "UPDATE credentials SET revoked_at = ?"
                " WHERE id = ? AND team_id = ? AND revoked_at IS NULL",
                (self._clock(), normalize_uuid(credential_id), normalize_uuid(team_id)))
        return cur.rowcount == 1

    def revoked_credentials(self, credential_ids: Iterable[str]) -> set[str]:
        """Which of ``credential_ids`` are revoked (ids the store does not know, e.g. an
        ``authenticate`` hook's own, are not: the store cannot revoke them)."""
        wanted = json.dumps(sorted({str(i) for i in credential_ids}))
        with self._read() as db:
            # json_each: one bound parameter however many ids (no SQLite variable limit).
            rows = db.execute("SELECT id FROM credentials WHERE revoked_at IS NOT NULL"
                              " AND id IN (SELECT value FROM json_each(?))", (wanted,)).fetchall()
        return {row["id"] for row in rows}

    # -- agents ------------------------------------------------------------------------

    def upsert_agent(self, team_id: str, agent_id: str | None, name: str, labels: Any = None,
                     version: str = "", status: str = "idle") -> Agent:
        """Register an agent that connected, or refresh one seen before.

        ``agent_id=None`` registers a new agent with a fresh UUID. An ``agent_id`` the
        agent chose itself is kept. Raises :class:`ConflictError` if that id belongs to
        another team's agent (one team can never take over another's agent), and
        :class:`NotFoundError` for an unknown team.
        """
        _check_status(status)
        labels_json = json.dumps({} if labels is None else labels, sort_keys=True)
        if agent_id is not None:
            canonical = normalize_uuid(agent_id)
            if canonical is None:
                raise StoreError(f"agent id must be a UUID: {agent_id!r}")
            agent_id = canonical
        now = self._clock()
        with self._write() as db:
            team_id = self._require_team(db, team_id)
            row = None
            if agent_id is not None:
                row = db.execute("SELECT team_id FROM agents WHERE id = ?", (agent_id,)).fetchone()
                if row is not None and row["team_id"] != team_id:
                    raise ConflictError(f"agent id {agent_id} is registered to another team")
            if row is None:
                agent_id = agent_id or str(uuid.uuid4())
                db.execute(
                    "INSERT INTO agents (id, team_id, name, labels, version, status,"
                    " first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (agent_id, team_id, name, labels_json, version, status, now, now))
            else:
                db.execute(
                    "UPDATE agents SET name = ?, labels = ?, version = ?, status = ?,"
                    " last_seen = ? WHERE id = ?",
                    (name, labels_json, version, status, now, agent_id))
            return _agent(db.execute("SELECT * FROM agents WHERE id = ?", (agent_id,)).fetchone())

    def get_agent(self, team_id: str, agent_id: str) -> Agent | None:
        """The team's agent with this id; None if unknown *or another team's*."""
        with self._read() as db:
            row = db.execute("SELECT * FROM agents WHERE id = ? AND team_id = ?",
                             (normalize_uuid(agent_id), normalize_uuid(team_id))).fetchone()
        return _agent(row) if row else None

    def list_agents(self, team_id: str) -> list[Agent]:
        """The team's agents, first seen first."""
        with self._read() as db:
            rows = db.execute("SELECT * FROM agents WHERE team_id = ? ORDER BY first_seen, id",
                              (normalize_uuid(team_id),)).fetchall()
        return [_agent(row) for row in rows]

    def set_agent_status(self, team_id: str, agent_id: str, status: str) -> bool:
        """Set an agent's status and mark it seen now. False if not the team's agent."""
        _check_status(status)
        with self._write() as db:
            cur = db.execute(
                "UPDATE agents SET status = ?, last_seen = ? WHERE id = ? AND team_id = ?",
                (status, self._clock(), normalize_uuid(agent_id), normalize_uuid(team_id)))
        return cur.rowcount == 1

    def touch_agent(self, team_id: str, agent_id: str) -> bool:
        """Record a heartbeat (``last_seen`` = now). False if not the team's agent."""
        with self._write() as db:
            cur = db.execute("UPDATE agents SET last_seen = ? WHERE id = ? AND team_id = ?",
                             (self._clock(), normalize_uuid(agent_id), normalize_uuid(team_id)))
        return cur.rowcount == 1

    def mark_all_agents_offline(self) -> int:
        """Set every agent offline (at gateway start no agent is connected yet).
        Returns how many changed."""
        with self._write() as db:
            cur = db.execute("UPDATE agents SET status = 'offline' WHERE status != 'offline'")
        return cur.rowcount

    # -- tunnel sessions ---------------------------------------------------------------

    def create_tunnel_session(
        self, team_id: str, agent_id: str, target_port: int = 8188, protocol: str = "http",
        *, hub_port: int | None = None, metadata: Any = None,
    ) -> tuple[TunnelSession, SecretToken, SecretToken]:
        """Open a tunnel session on one of the team's agents.

        Returns ``(session, access_token, admin_token)``. The access token goes into the
        shareable ``tunnel_url``; the admin token authorises close/stats/terminal. Both
        are returned only here. Raises :class:`NotFoundError` if the agent is not the
        team's, :class:`StoreError` for a bad port or protocol.
        """
        if not isinstance(target_port, int) or isinstance(target_port, bool) \
                or not 1 <= target_port <= 65535:
            raise StoreError("target_port must be an integer from 1 to 65535")
        if protocol not in TUNNEL_SESSION_PROTOCOLS:
            raise StoreError(f"protocol must be one of {', '.join(TUNNEL_SESSION_PROTOCOLS)}")
        if hub_port is not None and not 1 <= hub_port <= 65535:
            raise StoreError("hub_port must be from 1 to 65535")
        access, admin = _new_token(), _new_token()
        with self._write() as db:
            row = db.execute("SELECT id, team_id FROM agents WHERE id = ? AND team_id = ?",
                             (normalize_uuid(agent_id), normalize_uuid(team_id))).fetchone()
            if row is None:
                raise NotFoundError(f"unknown agent: {agent_id}")
            session = TunnelSession(
                session_id=secrets.token_hex(16), team_id=row["team_id"],
                agent_id=row["id"], target_port=target_port,
                protocol=protocol, hub_port=hub_port,
                metadata={} if metadata is None else metadata, created_at=self._clock(),
                closed_at=None, token_hash=hash_token(access),
                admin_token_hash=hash_token(admin),
            )
            db.execute(
                "INSERT INTO tunnel_sessions (session_id, team_id, agent_id, target_port,"
                " protocol, token_hash, admin_token_hash, hub_port, metadata, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (session.session_id, session.team_id, session.agent_id, target_port,
                 protocol, session.token_hash, session.admin_token_hash, hub_port,
                 json.dumps(session.metadata, sort_keys=True), session.created_at))
        return session, access, admin

    def get_tunnel_session(self, team_id: str, session_id: str) -> TunnelSession | None:
        """The team's tunnel session (open or closed), or None."""
        with self._read() as db:
            row = db.execute("SELECT * FROM tunnel_sessions WHERE session_id = ? AND team_id = ?",
                             (session_id, normalize_uuid(team_id))).fetchone()
        return _session(row) if row else None

    def get_tunnel_session_by_token(self, token: str, *,
                                    open_only: bool = True) -> TunnelSession | None:
        """The session whose *access* token is ``token`` (the one in ``tunnel_url``).
        Closed sessions are not returned unless ``open_only=False``."""
        if not isinstance(token, str) or not token:
            return None
        with self._read() as db:
            row = db.execute("SELECT * FROM tunnel_sessions WHERE token_hash = ?",
                             (hash_token(token),)).fetchone()
        if row is None or not _hash_matches(row["token_hash"], token):
            return None
        if open_only and row["closed_at"] is not None:
            return None
        return _session(row)

    def check_tunnel_admin_token(self, session_id: str, admin_token: str) -> TunnelSession | None:
        """The session if ``admin_token`` is its admin token, else None."""
        if not isinstance(admin_token, str) or not admin_token:
            return None
        with self._read() as db:
            row = db.execute("SELECT * FROM tunnel_sessions WHERE session_id = ?",
                             (session_id,)).fetchone()
        if row is None or not _hash_matches(row["admin_token_hash"], admin_token):
            return None
        return _session(row)

    def list_tunnel_sessions(self, team_id: str, agent_id: str | None = None, *,
                             open_only: bool = True) -> list[TunnelSession]:
        """The team's tunnel sessions (of one agent if given), oldest first."""
        sql = "SELECT * FROM tunnel_sessions WHERE team_id = ?"
        args: list[Any] = [normalize_uuid(team_id)]
        if agent_id is not None:
            sql += " AND agent_id = ?"
            args.append(normalize_uuid(agent_id))
        if open_only:
            sql += " AND closed_at IS NULL"
        with self._read() as db:
            rows = db.execute(sql + " ORDER BY created_at, session_id", args).fetchall()
        return [_session(row) for row in rows]

    def close_tunnel_session(self, team_id: str, session_id: str) -> bool:
        """Close one of the team's open sessions. False if none was open."""
        with self._write() as db:
            cur = db.execute(
                "UPDATE tunnel_sessions SET closed_at = ?"
                " WHERE session_id = ? AND team_id = ? AND closed_at IS NULL",
                (self._clock(), session_id, normalize_uuid(team_id)))
        self.tunnel_sessions_version += 1
        return cur.rowcount == 1

    def close_tunnel_sessions(self, team_id: str, agent_id: str) -> list[str]:
        """Close all of an agent's open sessions; returns the ids that were closed."""
        team, agent = normalize_uuid(team_id), normalize_uuid(agent_id)
        with self._write() as db:
            ids = [row[0] for row in db.execute(
                "SELECT session_id FROM tunnel_sessions"
                " WHERE team_id = ? AND agent_id = ? AND closed_at IS NULL"
                " ORDER BY created_at, session_id", (team, agent))]
            db.execute(
                "UPDATE tunnel_sessions SET closed_at = ?"
                " WHERE team_id = ? AND agent_id = ? AND closed_at IS NULL",
                (self._clock(), team, agent))
        self.tunnel_sessions_version += 1
        return ids


    # -- tunnels (Tunnels API, seed 002) -----------------------------------------------

    def create_tunnel(self, team_id: str, agent_id: str, name: str, target_host: str,
                      target_port: int, protocol: str, *, public: bool = False,
                      hub_port: int | None = None, status: str = "active",
                      metadata: Any = None) -> Tunnel:
        """Record a tunnel of one of the team's agents. Input is validated by the API
        layer; this raises :class:`NotFoundError` if the agent is not the team's."""
        now = self._clock()
        with self._write() as db:
            row = db.execute("SELECT id, team_id FROM agents WHERE id = ? AND team_id = ?",
                             (normalize_uuid(agent_id), normalize_uuid(team_id))).fetchone()
            if row is None:
                raise NotFoundError(f"unknown agent: {agent_id}")
            tunnel = Tunnel(
                id=str(uuid.uuid4()), team_id=row["team_id"], agent_id=row["id"], name=name,
                target_host=target_host, target_port=target_port, protocol=protocol,
                public=bool(public), hub_port=hub_port, status=status,
                metadata={} if metadata is None else metadata, created_at=now, updated_at=now)
            db.execute(
                "INSERT INTO tunnels (id, team_id, agent_id, name, target_host, target_port,"
                " protocol, public, hub_port, status, metadata, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (tunnel.id, tunnel.team_id, tunnel.agent_id, name, target_host, target_port,
                 protocol, int(tunnel.public), hub_port, status,
                 json.dumps(tunnel.metadata, sort_keys=True), now, now))
        return tunnel

    def get_tunnel(self, team_id: str, tunnel_id: str) -> Tunnel | None:
        """The team's tunnel; None if unknown *or another team's*."""
        with self._read() as db:
            row = db.execute("SELECT * FROM tunnels WHERE id = ? AND team_id = ?",
                             (normalize_uuid(tunnel_id), normalize_uuid(team_id))).fetchone()
        return _tunnel(row) if row else None

    def list_tunnels(self, team_id: str | None) -> list[Tunnel]:
        """The team's tunnels, oldest first; ``None``: every team's (gateway start)."""
        with self._read() as db:
            if team_id is None:
                rows = db.execute("SELECT * FROM tunnels ORDER BY created_at, id").fetchall()
            else:
                rows = db.execute("SELECT * FROM tunnels WHERE team_id = ? ORDER BY created_at, id",
                                  (normalize_uuid(team_id),)).fetchall()
        return [_tunnel(row) for row in rows]

    def tunnel_on_hub_port(self, hub_port: int) -> Tunnel | None:
        """The tunnel (of any team) that holds ``hub_port``, if one does."""
        with self._read() as db:
            row = db.execute("SELECT * FROM tunnels WHERE hub_port = ?", (hub_port,)).fetchone()
        return _tunnel(row) if row else None

    def update_tunnel(self, team_id: str, tunnel_id: str, **changes: Any) -> Tunnel | None:
        """Change some of ``name``, ``status``, ``metadata``, ``hub_port`` of the team's
        tunnel; returns the new row, or None if there is no such tunnel."""
        allowed = {"name", "status", "metadata", "hub_port"}
        if not changes or not set(changes) <= allowed:
            raise StoreError(f"update_tunnel takes some of {', '.join(sorted(allowed))}")
        columns = [f"{key} = ?" for key in changes] + ["updated_at = ?"]
        values = [json.dumps(v, sort_keys=True) if k == "metadata" else v for k, v in changes.items()]
        tunnel, team = normalize_uuid(tunnel_id), normalize_uuid(team_id)
        with self._write() as db:
            cur = db.execute(f"UPDATE tunnels SET {', '.join(columns)} WHERE id = ? AND team_id = ?",
                             (*values, self._clock(), tunnel, team))
            if cur.rowcount != 1:
                return None
            return _tunnel(db.execute("SELECT * FROM tunnels WHERE id = ?", (tunnel,)).fetchone())

    def delete_tunnel(self, team_id: str, tunnel_id: str) -> Tunnel | None:
        """Delete the team's tunnel and its shares; returns the deleted row (or None)."""
        tunnel, team = normalize_uuid(tunnel_id), normalize_uuid(team_id)
        with self._write() as db:
            row = db.execute("SELECT * FROM tunnels WHERE id = ? AND team_id = ?",
                             (tunnel, team)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM tunnels WHERE id = ?", (tunnel,))  # shares cascade
        return _tunnel(row)

    # -- tunnel bindings (the Tunnels API's connect) ----------------------------------

    def put_binding(self, team_id: str, tunnel_id: str, agent_id: str, local_port: int) -> None:
        """Record that the team's agent listens on ``local_port`` for the tunnel (one
        port per tunnel and agent: a new one replaces the old)."""
        with self._write() as db:
            db.execute(
                "INSERT INTO tunnel_bindings (tunnel_id, team_id, agent_id, local_port, created_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (tunnel_id, agent_id)"
                " DO UPDATE SET local_port = excluded.local_port, created_at = excluded.created_at",
                (normalize_uuid(tunnel_id), normalize_uuid(team_id), normalize_uuid(agent_id),
                 local_port, self._clock()))

    def list_bindings(self, team_id: str, agent_id: str) -> list[tuple[Tunnel, int]]:
        """The agent's bindings as ``(tunnel, local_port)``, oldest first."""
        with self._read() as db:
            rows = db.execute(
                "SELECT t.*, b.local_port AS bound_port FROM tunnel_bindings b"
                " JOIN tunnels t ON t.id = b.tunnel_id"
                " WHERE b.team_id = ? AND b.agent_id = ? ORDER BY b.created_at, t.id",
                (normalize_uuid(team_id), normalize_uuid(agent_id))).fetchall()
        return [(_tunnel(row), row["bound_port"]) for row in rows]

    # -- tunnel shares -----------------------------------------------------------------

    def create_share(self, team_id: str, tunnel_id: str, name: str, description: str = "", *,
                     expires_at: float | None = None, allowed_methods: Sequence[str] | None = None,
                     rate_limit: int | None = None) -> tuple[Share, SecretToken]:
        """Create a share link of the team's tunnel. Returns the row and the plaintext
        token of its URL (returned only here; only its hash is stored). Raises
        :class:`NotFoundError` if the tunnel is not the team's."""
        token = _new_token()
        with self._write() as db:
            row = db.execute("SELECT id, team_id FROM tunnels WHERE id = ? AND team_id = ?",
                             (normalize_uuid(tunnel_id), normalize_uuid(team_id))).fetchone()
            if row is None:
                raise NotFoundError(f"unknown tunnel: {tunnel_id}")
            share = Share(
                id=str(uuid.uuid4()), team_id=row["team_id"], tunnel_id=row["id"], name=name,
                description=description, token_prefix=token[:PREFIX_CHARS],
                expires_at=expires_at,
                allowed_methods=None if allowed_methods is None else tuple(allowed_methods),
                rate_limit=rate_limit, created_at=self._clock(), token_hash=hash_token(token))
            db.execute(
                "INSERT INTO tunnel_shares (id, team_id, tunnel_id, name, description, token_hash,"
                " token_prefix, expires_at, allowed_methods, rate_limit, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (share.id, share.team_id, share.tunnel_id, name, description, share.token_hash,
                 share.token_prefix, expires_at,
                 None if share.allowed_methods is None else json.dumps(list(share.allowed_methods)),
                 rate_limit, share.created_at))
        return share, token

    def get_share(self, team_id: str, tunnel_id: str, share_id: str) -> Share | None:
        """The share of the team's tunnel, or None."""
        with self._read() as db:
            row = db.execute(
                "SELECT * FROM tunnel_shares WHERE id = ? AND tunnel_id = ? AND team_id = ?",
                (normalize_uuid(share_id), normalize_uuid(tunnel_id), normalize_uuid(team_id))).fetchone()
        return _share(row) if row else None

    def list_shares(self, team_id: str, tunnel_id: str) -> list[Share]:
        """The shares of the team's tunnel, oldest first."""
        with self._read() as db:
            rows = db.execute(
                "SELECT * FROM tunnel_shares WHERE tunnel_id = ? AND team_id = ?"
                " ORDER BY created_at, id", (normalize_uuid(tunnel_id), normalize_uuid(team_id))).fetchall()
        return [_share(row) for row in rows]

    def delete_share(self, team_id: str, tunnel_id: str, share_id: str) -> bool:
        """Delete a share of the team's tunnel. False if there was none."""
        with self._write() as db:
            cur = db.execute(
                "DELETE FROM tunnel_shares WHERE id = ? AND tunnel_id = ? AND team_id = ?",
                (normalize_uuid(share_id), normalize_uuid(tunnel_id), normalize_uuid(team_id)))
        return cur.rowcount == 1

    def get_share_by_token(self, token: str) -> Share | None:
        """The share whose URL token is ``token`` (expired ones included: the caller
        decides what an expired link answers)."""
        if not isinstance(token, str) or not token:
            return None
        with self._read() as db:
            row = db.execute("SELECT * FROM tunnel_shares WHERE token_hash = ?",
                             (hash_token(token),)).fetchone()
        if row is None or not _hash_matches(row["token_hash"], token):
            return None
        return _share(row)

    # -- webhooks ----------------------------------------------------------------------

    def create_webhook(self, team_id: str, url: str, events: Sequence[str]) -> Webhook:
        """Register a webhook; its signing secret is generated here. The secret is kept
        in plaintext (unlike tokens) because the gateway must sign with it; the API
        shows it only once."""
        with self._write() as db:
            team_id = self._require_team(db, team_id)
            hook = Webhook(id=str(uuid.uuid4()), team_id=team_id, url=url, events=tuple(events),
                           created_at=self._clock(),
                           secret="whsec_" + secrets.token_urlsafe(_TOKEN_BYTES))
            db.execute("INSERT INTO webhooks (id, team_id, url, events, secret, created_at)"
                       " VALUES (?, ?, ?, ?, ?, ?)",
                       (hook.id, team_id, url, json.dumps(list(hook.events)), hook.secret,
                        hook.created_at))
        return hook

    def get_webhook(self, team_id: str, webhook_id: str) -> Webhook | None:
        """The team's webhook, or None."""
        with self._read() as db:
            row = db.execute("SELECT * FROM webhooks WHERE id = ? AND team_id = ?",
                             (normalize_uuid(webhook_id), normalize_uuid(team_id))).fetchone()
        return _webhook(row) if row else None

    def list_webhooks(self, team_id: str, event: str | None = None) -> list[Webhook]:
        """The team's webhooks (only those subscribed to ``event`` if given)."""
        with self._read() as db:
            rows = db.execute("SELECT * FROM webhooks WHERE team_id = ? ORDER BY created_at, id",
                              (normalize_uuid(team_id),)).fetchall()
        hooks = [_webhook(row) for row in rows]
        return [h for h in hooks if event is None or event in h.events]

    def delete_webhook(self, team_id: str, webhook_id: str) -> bool:
        """Delete the team's webhook. False if there was none."""
        with self._write() as db:
            cur = db.execute("DELETE FROM webhooks WHERE id = ? AND team_id = ?",
                             (normalize_uuid(webhook_id), normalize_uuid(team_id)))
        return cur.rowcount == 1

    # -- pending webhook deliveries ----------------------------------------------------

    def add_webhook_deliveries(self, deliveries: Sequence[tuple[str, str, str, bytes]],
                               keep: int) -> None:
        """Record deliveries ``(id, webhook_id, event, body)`` not made yet, in one
        transaction, then drop the oldest beyond ``keep`` rows (the table stays bounded)."""
        now = self._clock()
        with self._write() as db:
            db.executemany(
                "INSERT OR IGNORE INTO webhook_deliveries (id, webhook_id, event, body, created_at)"
                " SELECT ?, id, ?, ?, ? FROM webhooks WHERE id = ?",
                [(d_id, event, body, now, hook_id) for d_id, hook_id, event, body in deliveries])
            db.execute("DELETE FROM webhook_deliveries WHERE id IN (SELECT id FROM webhook_deliveries"
                       " ORDER BY created_at DESC, rowid DESC LIMIT -1 OFFSET ?)", (keep,))

    def set_webhook_delivery_attempts(self, delivery_id: str, attempts: int) -> None:
        with self._write() as db:
            db.execute("UPDATE webhook_deliveries SET attempts = ? WHERE id = ?", (attempts, delivery_id))

    def delete_webhook_delivery(self, delivery_id: str) -> None:
        """The delivery is over (delivered, failed for good, or dropped)."""
        with self._write() as db:
            db.execute("DELETE FROM webhook_deliveries WHERE id = ?", (delivery_id,))

    def pending_webhook_deliveries(self, limit: int) -> list[tuple[Webhook, str, bytes, str, int]]:
        """Deliveries left unfinished (e.g. by a restart), oldest first, at most ``limit``:
        ``(webhook, event, body, delivery id, attempts made)``."""
        with self._read() as db:
            rows = db.execute(
                "SELECT d.id AS delivery_id, d.event AS event, d.body AS body, d.attempts AS attempts,"
                " w.* FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id"
                " ORDER BY d.created_at, d.rowid LIMIT ?", (limit,)).fetchall()
        return [(_webhook(row), row["event"], bytes(row["body"]), row["delivery_id"], row["attempts"])
                for row in rows]

    # -- container services (seeds 003, 004) ---------------------------------------------

    def put_service(self, team_id: str, slug: str, service_type: str, spec: Any,
                    status: str) -> Service:
        """Create or replace the team's service ``slug`` (``created_at`` is kept)."""
        now = self._clock()
        team_id = normalize_uuid(team_id) or team_id
        with self._write() as db:
            db.execute(
                "INSERT INTO services (team_id, slug, service_type, spec, status, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (team_id, slug) DO UPDATE SET"
                " service_type = excluded.service_type, spec = excluded.spec,"
                " status = excluded.status, updated_at = excluded.updated_at",
                (team_id, slug, service_type, json.dumps(spec, sort_keys=True), status, now, now))
            row = db.execute("SELECT * FROM services WHERE team_id = ? AND slug = ?",
                             (team_id, slug)).fetchone()
        return _service(row)

    def set_service_status(self, team_id: str, slug: str, status: str) -> None:
        """Record the service's current status (derived live by relay.gateway.api.services)."""
        with self._write() as db:
            db.execute("UPDATE services SET status = ?, updated_at = ? WHERE team_id = ? AND slug = ?",
                       (status, self._clock(), normalize_uuid(team_id) or team_id, slug))

    def get_service(self, team_id: str, slug: str) -> Service | None:
        """The team's service; None if unknown *or another team's*."""
        with self._read() as db:
            row = db.execute("SELECT * FROM services WHERE team_id = ? AND slug = ?",
                             (normalize_uuid(team_id) or team_id, slug)).fetchone()
        return _service(row) if row else None

    def list_services(self, team_id: str | None) -> list[Service]:
        """The team's services by slug; ``None``: every team's."""
        with self._read() as db:
            if team_id is None:
                rows = db.execute("SELECT * FROM services ORDER BY team_id, slug").fetchall()
            else:
                rows = db.execute("SELECT * FROM services WHERE team_id = ? ORDER BY slug",
                                  (normalize_uuid(team_id) or team_id,)).fetchall()
        return [_service(row) for row in rows]

    def delete_service(self, team_id: str, slug: str) -> bool:
        with self._write() as db:
            cur = db.execute("DELETE FROM services WHERE team_id = ? AND slug = ?",
                             (normalize_uuid(team_id) or team_id, slug))
        return cur.rowcount == 1


