"""The gateway's state in a SQL database: one implementation of :class:`Store` for every
SQL backend.

The rules (team scoping, tokens stored only as hashes, which row a call may touch) are
written once, here, in SQL that SQLite and PostgreSQL both read, with ``?`` for a
parameter. A backend supplies the rest (:class:`SqlStore`'s abstract methods): how a
transaction is opened (:meth:`SqlStore._write`, :meth:`SqlStore._read`, which yield a
:class:`Tx`), its schema migrations (:attr:`SqlStore.MIGRATIONS`, in its dialect, the
same versions on both), :meth:`SqlStore.generation`, and the few statements the two
dialects spell differently (:meth:`SqlStore._revoked_among`, the pending deliveries'
order, serialising a check-then-insert).
"""
from __future__ import annotations

import abc
import json
import re
import secrets
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, Protocol

from relay.gateway.store.base import (
    _TOKEN_BYTES,
    CREDENTIAL_KINDS,
    PREFIX_CHARS,
    TASK_STATUSES,
    TUNNEL_SESSION_PROTOCOLS,
    Agent,
    ConflictError,
    Credential,
    NotFoundError,
    Row,
    SecretToken,
    Service,
    Share,
    Store,
    StoreError,
    TaskRecord,
    Team,
    Tunnel,
    TunnelSession,
    Webhook,
    _agent,
    _check_status,
    _credential,
    _hash_matches,
    _new_token,
    _service,
    _session,
    _share,
    _task,
    _team,
    _tunnel,
    _webhook,
    hash_token,
    normalize_uuid,
    token_kind,
)

__all__ = ["SERVICE_TYPES", "TUNNEL_STATUSES", "SqlStore", "Tx"]

#: What a tunnel's ``status`` and a service's ``service_type`` may be (the schema's CHECKs).
TUNNEL_STATUSES: tuple[str, ...] = ("active", "paused")
SERVICE_TYPES: tuple[str, ...] = ("deployed", "external")

_SESSION_ID = re.compile(r"[0-9a-f]{32}")


def _session_id(value: object) -> str | None:
    """A tunnel session id as the store makes them (32 hex digits), else None (which
    matches no row): arbitrary text from a URL never reaches the database."""
    return value if isinstance(value, str) and _SESSION_ID.fullmatch(value) else None


async def _refuse_hub_port_of(tx: "Tx", table: str, hub_port: int) -> None:
    """ConflictError if an open session (``tunnel_sessions``) or a tunnel (``tunnels``)
    holds ``hub_port``. Each table's unique index keeps its own rows apart; this keeps
    the two tables apart (every gateway of a fleet listens on both kinds of port)."""
    where = " AND closed_at IS NULL" if table == "tunnel_sessions" else ""
    if await tx.fetchone(f"SELECT 1 FROM {table} WHERE hub_port = ?{where}", (hub_port,)) is not None:
        raise ConflictError(f"hub port {hub_port} is held by another tunnel")


def _check_tunnel_status(status: object) -> None:
    if status not in TUNNEL_STATUSES:
        raise StoreError(f"tunnel status must be one of {', '.join(TUNNEL_STATUSES)}")


class Tx(Protocol):
    """One transaction (or, for :meth:`SqlStore._read`, one connection in autocommit) of
    a backend. ``sql`` uses ``?`` for parameters; ``args`` are their values in order."""

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None: ...

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]: ...

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run a statement; returns how many rows it changed."""
        ...

    async def executemany(self, sql: str, args: Iterable[Sequence[Any]]) -> None: ...


class SqlStore(Store):
    """:class:`Store` over a SQL database; a backend subclasses it (see the module
    docstring)."""

    #: Ordered schema migrations in the backend's dialect; migration ``i`` moves the
    #: schema from version ``i`` to ``i + 1``. Every backend has the same versions (the
    #: same tables and columns after each); a test holds them to that.
    MIGRATIONS: ClassVar[Sequence[Sequence[str]]] = ()
    #: The column that orders webhook deliveries created in the same instant.
    _DELIVERY_ORDER: ClassVar[str] = "rowid"
    #: How "skip the first N rows, keep the rest" is spelled (N is the parameter).
    _OFFSET: ClassVar[str] = "LIMIT -1 OFFSET ?"

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.tunnel_sessions_version = 0
        #: Bumped on every write transaction this store commits (see :meth:`generation`).
        self._own_writes = 0

    # -- what a backend provides --------------------------------------------------------

    @abc.abstractmethod
    def _write(self) -> AbstractAsyncContextManager[Tx]:
        """One write transaction: committed when the block ends, rolled back if it
        raises; bumps ``_own_writes`` on commit. Backend failures become StoreError."""

    @abc.abstractmethod
    def _read(self) -> AbstractAsyncContextManager[Tx]:
        """A connection for reads; each single statement is its own consistent snapshot."""

    async def _serialize(self, tx: Tx, what: str) -> None:
        """Make concurrent transactions that check-then-insert ``what`` run one after the
        other (SQLite: nothing to do, a write transaction holds the whole database)."""

    @abc.abstractmethod
    async def _revoked_among(self, tx: Tx, ids: list[str]) -> list[Row]:
        """Rows (``id``) of the revoked credentials among ``ids``, however many ids."""

    # -- schema ------------------------------------------------------------------------

    async def _migrate(self) -> None:
        """Create or upgrade the schema to ``len(MIGRATIONS)``, in one transaction."""
        migrations = self.MIGRATIONS
        async with self._write() as tx:
            await self._serialize(tx, "migrations")
            await tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = await tx.fetchone("SELECT version FROM schema_version")
            if row is None:
                await tx.execute("INSERT INTO schema_version (version) VALUES (0)")
                version = 0
            else:
                version = row[0]
            if version > len(migrations):
                raise StoreError(
                    f"database {self.location} has schema version {version}, newer than this "
                    f"relay understands ({len(migrations)}); upgrade relay")
            for statements in migrations[version:]:
                for statement in statements:
                    await tx.execute(statement)
            if version != len(migrations):
                await tx.execute("UPDATE schema_version SET version = ?", (len(migrations),))

    async def schema_version(self) -> int:
        async with self._read() as tx:
            row = await tx.fetchone("SELECT version FROM schema_version")
        return int(row[0]) if row else 0

    # -- teams -------------------------------------------------------------------------

    async def create_team(self, name: str) -> Team:
        async with self._write() as tx:
            return await self._insert_team(tx, name)

    async def create_team_with_keys(
        self, name: str, kinds: Sequence[str] = CREDENTIAL_KINDS, *, only_if_no_teams: bool = False,
    ) -> tuple[Team, dict[str, SecretToken]] | None:
        async with self._write() as tx:
            if only_if_no_teams:
                await self._serialize(tx, "first team")  # two gateways starting: one default team
            if only_if_no_teams and await tx.fetchone("SELECT 1 FROM teams LIMIT 1"):
                return None
            team = await self._insert_team(tx, name)
            keys = {}
            for kind in kinds:
                keys[kind] = (await self._insert_credential(tx, team.id, kind))[1]
            return team, keys

    async def get_team(self, team_id: str) -> Team | None:
        team_id = normalize_uuid(team_id) or ""
        if not team_id:
            return None
        async with self._read() as tx:
            row = await tx.fetchone("SELECT * FROM teams WHERE id = ?", (team_id,))
        return _team(row) if row else None

    async def list_teams(self) -> list[Team]:
        async with self._read() as tx:
            rows = await tx.fetchall("SELECT * FROM teams ORDER BY created_at, id")
        return [_team(row) for row in rows]

    async def _insert_team(self, tx: Tx, name: str) -> Team:
        name = name.strip() if isinstance(name, str) else ""
        if not 1 <= len(name) <= 100:
            raise StoreError("team name must be 1 to 100 characters")
        team = Team(id=str(uuid.uuid4()), name=name, created_at=self._clock())
        await tx.execute("INSERT INTO teams (id, name, created_at) VALUES (?, ?, ?)",
                         (team.id, team.name, team.created_at))
        return team

    async def _require_team(self, tx: Tx, team_id: str) -> str:
        canonical = normalize_uuid(team_id)
        if canonical is None or not await tx.fetchone(
                "SELECT 1 FROM teams WHERE id = ?", (canonical,)):
            raise NotFoundError(f"unknown team: {team_id}")
        return canonical

    # -- credentials -------------------------------------------------------------------

    async def create_credential(self, team_id: str, kind: str) -> tuple[Credential, SecretToken]:
        async with self._write() as tx:
            return await self._insert_credential(tx, team_id, kind)

    async def _insert_credential(self, tx: Tx, team_id: str,
                                 kind: str) -> tuple[Credential, SecretToken]:
        if kind not in CREDENTIAL_KINDS:
            raise StoreError(f"credential kind must be one of {', '.join(CREDENTIAL_KINDS)}")
        team_id = await self._require_team(tx, team_id)
        token = _new_token(kind)
        cred = Credential(
            id=str(uuid.uuid4()), team_id=team_id, kind=kind,
            prefix=token[:len(kind) + 1 + PREFIX_CHARS], created_at=self._clock(),
            revoked_at=None, token_hash=hash_token(token),
        )
        await tx.execute(
            "INSERT INTO credentials (id, team_id, kind, token_hash, prefix, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (cred.id, cred.team_id, cred.kind, cred.token_hash, cred.prefix, cred.created_at))
        return cred, token

    async def lookup_credential(self, token: str) -> Credential | None:
        if not isinstance(token, str) or token_kind(token) is None:
            return None
        async with self._read() as tx:
            row = await tx.fetchone("SELECT * FROM credentials WHERE token_hash = ?",
                                    (hash_token(token),))
        if row is None or row["revoked_at"] is not None:
            return None
        if not _hash_matches(row["token_hash"], token):
            return None
        return _credential(row)

    async def get_credential(self, team_id: str, credential_id: str) -> Credential | None:
        async with self._read() as tx:
            row = await tx.fetchone("SELECT * FROM credentials WHERE id = ? AND team_id = ?",
                                    (normalize_uuid(credential_id), normalize_uuid(team_id)))
        return _credential(row) if row else None

    async def list_credentials(self, team_id: str, *, include_revoked: bool = False) -> list[Credential]:
        sql = "SELECT * FROM credentials WHERE team_id = ?"
        if not include_revoked:
            sql += " AND revoked_at IS NULL"
        async with self._read() as tx:
            rows = await tx.fetchall(sql + " ORDER BY created_at, id",
                                     (normalize_uuid(team_id),))
        return [_credential(row) for row in rows]

    async def revoke_credential(self, team_id: str, credential_id: str) -> bool:
        async with self._write() as tx:
            changed = await tx.execute(
                "UPDATE credentials SET revoked_at = ?"
                " WHERE id = ? AND team_id = ? AND revoked_at IS NULL",
                (self._clock(), normalize_uuid(credential_id), normalize_uuid(team_id)))
        return changed == 1

    async def revoked_credentials(self, credential_ids: Iterable[str]) -> set[str]:
        wanted = sorted({str(i) for i in credential_ids})
        async with self._read() as tx:
            rows = await self._revoked_among(tx, wanted)
        return {row["id"] for row in rows}

    # -- agents ------------------------------------------------------------------------

    async def upsert_agent(self, team_id: str, agent_id: str | None, name: str, labels: Any = None,
                           version: str = "", status: str = "idle") -> Agent:
        _check_status(status)
        labels_json = json.dumps({} if labels is None else labels, sort_keys=True)
        if agent_id is not None:
            canonical = normalize_uuid(agent_id)
            if canonical is None:
                raise StoreError(f"agent id must be a UUID: {agent_id!r}")
            agent_id = canonical
        agent_id = agent_id or str(uuid.uuid4())
        now = self._clock()
        async with self._write() as tx:
            team_id = await self._require_team(tx, team_id)
            # One statement, so two gateways registering the same agent cannot race: the
            # row is created, or updated only if it is this team's.
            await tx.execute(
                "INSERT INTO agents (id, team_id, name, labels, version, status, first_seen, last_seen)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                " name = excluded.name, labels = excluded.labels, version = excluded.version,"
                " status = excluded.status, last_seen = excluded.last_seen"
                " WHERE agents.team_id = excluded.team_id",
                (agent_id, team_id, name, labels_json, version, status, now, now))
            row = await tx.fetchone("SELECT * FROM agents WHERE id = ?", (agent_id,))
            if row is None or row["team_id"] != team_id:
                raise ConflictError(f"agent id {agent_id} is registered to another team")
            return _agent(row)

    async def get_agent(self, team_id: str, agent_id: str) -> Agent | None:
        async with self._read() as tx:
            row = await tx.fetchone("SELECT * FROM agents WHERE id = ? AND team_id = ?",
                                    (normalize_uuid(agent_id), normalize_uuid(team_id)))
        return _agent(row) if row else None

    async def list_agents(self, team_id: str) -> list[Agent]:
        async with self._read() as tx:
            rows = await tx.fetchall("SELECT * FROM agents WHERE team_id = ? ORDER BY first_seen, id",
                                     (normalize_uuid(team_id),))
        return [_agent(row) for row in rows]

    async def set_agent_status(self, team_id: str, agent_id: str, status: str) -> bool:
        _check_status(status)
        async with self._write() as tx:
            changed = await tx.execute(
                "UPDATE agents SET status = ?, last_seen = ? WHERE id = ? AND team_id = ?",
                (status, self._clock(), normalize_uuid(agent_id), normalize_uuid(team_id)))
        return changed == 1

    async def touch_agent(self, team_id: str, agent_id: str) -> bool:
        async with self._write() as tx:
            changed = await tx.execute("UPDATE agents SET last_seen = ? WHERE id = ? AND team_id = ?",
                                       (self._clock(), normalize_uuid(agent_id), normalize_uuid(team_id)))
        return changed == 1

    async def mark_all_agents_offline(self) -> int:
        async with self._write() as tx:
            changed = await tx.execute("UPDATE agents SET status = 'offline' WHERE status != 'offline'")
        return changed

    # -- tunnel sessions ---------------------------------------------------------------

    async def create_tunnel_session(
        self, team_id: str, agent_id: str, target_port: int = 8188, protocol: str = "http",
        *, hub_port: int | None = None, metadata: Any = None,
    ) -> tuple[TunnelSession, SecretToken, SecretToken]:
        if not isinstance(target_port, int) or isinstance(target_port, bool) \
                or not 1 <= target_port <= 65535:
            raise StoreError("target_port must be an integer from 1 to 65535")
        if protocol not in TUNNEL_SESSION_PROTOCOLS:
            raise StoreError(f"protocol must be one of {', '.join(TUNNEL_SESSION_PROTOCOLS)}")
        if hub_port is not None and not 1 <= hub_port <= 65535:
            raise StoreError("hub_port must be from 1 to 65535")
        access, admin = _new_token(), _new_token()
        async with self._write() as tx:
            row = await tx.fetchone("SELECT id, team_id FROM agents WHERE id = ? AND team_id = ?",
                                    (normalize_uuid(agent_id), normalize_uuid(team_id)))
            if row is None:
                raise NotFoundError(f"unknown agent: {agent_id}")
            if hub_port is not None:  # open sessions: their unique index; tunnels: here
                await _refuse_hub_port_of(tx, "tunnels", hub_port)
            session = TunnelSession(
                session_id=secrets.token_hex(16), team_id=row["team_id"],
                agent_id=row["id"], target_port=target_port,
                protocol=protocol, hub_port=hub_port,
                metadata={} if metadata is None else metadata, created_at=self._clock(),
                closed_at=None, token_hash=hash_token(access),
                admin_token_hash=hash_token(admin),
            )
            await tx.execute(
                "INSERT INTO tunnel_sessions (session_id, team_id, agent_id, target_port,"
                " protocol, token_hash, admin_token_hash, hub_port, metadata, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (session.session_id, session.team_id, session.agent_id, target_port,
                 protocol, session.token_hash, session.admin_token_hash, hub_port,
                 json.dumps(session.metadata, sort_keys=True), session.created_at))
        return session, access, admin

    async def get_tunnel_session(self, team_id: str, session_id: str) -> TunnelSession | None:
        async with self._read() as tx:
            row = await tx.fetchone("SELECT * FROM tunnel_sessions WHERE session_id = ? AND team_id = ?",
                                    (_session_id(session_id), normalize_uuid(team_id)))
        return _session(row) if row else None

    async def get_tunnel_session_by_token(self, token: str, *,
                                          open_only: bool = True) -> TunnelSession | None:
        if not isinstance(token, str) or not token:
            return None
        async with self._read() as tx:
            row = await tx.fetchone("SELECT * FROM tunnel_sessions WHERE token_hash = ?",
                                    (hash_token(token),))
        if row is None or not _hash_matches(row["token_hash"], token):
            return None
        if open_only and row["closed_at"] is not None:
            return None
        return _session(row)

    async def check_tunnel_admin_token(self, session_id: str, admin_token: str) -> TunnelSession | None:
        if not isinstance(admin_token, str) or not admin_token:
            return None
        async with self._read() as tx:
            row = await tx.fetchone("SELECT * FROM tunnel_sessions WHERE session_id = ?",
                                    (_session_id(session_id),))
        if row is None or not _hash_matches(row["admin_token_hash"], admin_token):
            return None
        return _session(row)

    async def list_tunnel_sessions(self, team_id: str | None, agent_id: str | None = None, *,
                                   open_only: bool = True) -> list[TunnelSession]:
        sql = "SELECT * FROM tunnel_sessions WHERE team_id = ?" if team_id is not None \
            else "SELECT * FROM tunnel_sessions WHERE 1 = 1"
        args: list[Any] = [normalize_uuid(team_id)] if team_id is not None else []
        if agent_id is not None:
            sql += " AND agent_id = ?"
            args.append(normalize_uuid(agent_id))
        if open_only:
            sql += " AND closed_at IS NULL"
        async with self._read() as tx:
            rows = await tx.fetchall(sql + " ORDER BY created_at, session_id", args)
        return [_session(row) for row in rows]

    async def close_tunnel_session(self, team_id: str, session_id: str) -> bool:
        async with self._write() as tx:
            changed = await tx.execute(
                "UPDATE tunnel_sessions SET closed_at = ?"
                " WHERE session_id = ? AND team_id = ? AND closed_at IS NULL",
                (self._clock(), _session_id(session_id), normalize_uuid(team_id)))
        self.tunnel_sessions_version += 1
        return changed == 1

    async def close_tunnel_sessions(self, team_id: str, agent_id: str) -> list[str]:
        team_id, agent_id = normalize_uuid(team_id) or "", normalize_uuid(agent_id) or ""  # "" matches no row
        async with self._write() as tx:
            ids = [row[0] for row in await tx.fetchall(
                "SELECT session_id FROM tunnel_sessions"
                " WHERE team_id = ? AND agent_id = ? AND closed_at IS NULL"
                " ORDER BY created_at, session_id", (team_id, agent_id))]
            await tx.execute(
                "UPDATE tunnel_sessions SET closed_at = ?"
                " WHERE team_id = ? AND agent_id = ? AND closed_at IS NULL",
                (self._clock(), team_id, agent_id))
        self.tunnel_sessions_version += 1
        return ids


    # -- tunnels (Tunnels API, seed 002) -----------------------------------------------

    async def create_tunnel(self, team_id: str, agent_id: str, name: str, target_host: str,
                            target_port: int, protocol: str, *, public: bool = False,
                            hub_port: int | None = None, status: str = "active",
                            metadata: Any = None) -> Tunnel:
        _check_tunnel_status(status)
        now = self._clock()
        async with self._write() as tx:
            row = await tx.fetchone("SELECT id, team_id FROM agents WHERE id = ? AND team_id = ?",
                                    (normalize_uuid(agent_id), normalize_uuid(team_id)))
            if row is None:
                raise NotFoundError(f"unknown agent: {agent_id}")
            if hub_port is not None:  # tunnels: their unique index; open sessions: here
                await _refuse_hub_port_of(tx, "tunnel_sessions", hub_port)
            tunnel = Tunnel(
                id=str(uuid.uuid4()), team_id=row["team_id"], agent_id=row["id"], name=name,
                target_host=target_host, target_port=target_port, protocol=protocol,
                public=bool(public), hub_port=hub_port, status=status,
                metadata={} if metadata is None else metadata, created_at=now, updated_at=now)
            await tx.execute(
                "INSERT INTO tunnels (id, team_id, agent_id, name, target_host, target_port,"
                " protocol, public, hub_port, status, metadata, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (tunnel.id, tunnel.team_id, tunnel.agent_id, name, target_host, target_port,
                 protocol, int(tunnel.public), hub_port, status,
                 json.dumps(tunnel.metadata, sort_keys=True), now, now))
        return tunnel

    async def get_tunnel(self, team_id: str, tunnel_id: str) -> Tunnel | None:
        async with self._read() as tx:
            row = await tx.fetchone("SELECT * FROM tunnels WHERE id = ? AND team_id = ?",
                                    (normalize_uuid(tunnel_id), normalize_uuid(team_id)))
        return _tunnel(row) if row else None

    async def list_tunnels(self, team_id: str | None) -> list[Tunnel]:
        async with self._read() as tx:
            if team_id is None:
                rows = await tx.fetchall("SELECT * FROM tunnels ORDER BY created_at, id")
            else:
                rows = await tx.fetchall("SELECT * FROM tunnels WHERE team_id = ? ORDER BY created_at, id",
                                         (normalize_uuid(team_id),))
        return [_tunnel(row) for row in rows]

    async def tunnel_on_hub_port(self, hub_port: int) -> Tunnel | None:
        async with self._read() as tx:
            row = await tx.fetchone("SELECT * FROM tunnels WHERE hub_port = ?", (hub_port,))
        return _tunnel(row) if row else None

    async def claim_hub_port(self, team_id: str, tunnel_id: str, hub_port: int) -> Tunnel | None:
        if not 1 <= hub_port <= 65535:
            raise StoreError("hub_port must be from 1 to 65535")
        tunnel_id, team_id = normalize_uuid(tunnel_id) or "", normalize_uuid(team_id) or ""  # "" matches no row
        async with self._write() as tx:
            await _refuse_hub_port_of(tx, "tunnel_sessions", hub_port)
            # The unique index on hub_port refuses a port another tunnel holds (ConflictError).
            await tx.execute("UPDATE tunnels SET hub_port = ?, updated_at = ?"
                             " WHERE id = ? AND team_id = ? AND hub_port IS NULL",
                             (hub_port, self._clock(), tunnel_id, team_id))
            row = await tx.fetchone("SELECT * FROM tunnels WHERE id = ? AND team_id = ?", (tunnel_id, team_id))
        return _tunnel(row) if row else None

    async def update_tunnel(self, team_id: str, tunnel_id: str, **changes: Any) -> Tunnel | None:
        allowed = {"name", "status", "metadata", "hub_port"}
        if not changes or not set(changes) <= allowed:
            raise StoreError(f"update_tunnel takes some of {', '.join(sorted(allowed))}")
        if "status" in changes:
            _check_tunnel_status(changes["status"])
        columns = [f"{key} = ?" for key in changes] + ["updated_at = ?"]
        values = [json.dumps(v, sort_keys=True) if k == "metadata" else v for k, v in changes.items()]
        tunnel_id, team_id = normalize_uuid(tunnel_id) or "", normalize_uuid(team_id) or ""  # "" matches no row
        async with self._write() as tx:
            changed = await tx.execute(f"UPDATE tunnels SET {', '.join(columns)} WHERE id = ? AND team_id = ?",
                                       (*values, self._clock(), tunnel_id, team_id))
            if changed != 1:
                return None
            row = await tx.fetchone("SELECT * FROM tunnels WHERE id = ?", (tunnel_id,))
            assert row is not None  # updated in this transaction
            return _tunnel(row)

    async def delete_tunnel(self, team_id: str, tunnel_id: str) -> Tunnel | None:
        tunnel_id, team_id = normalize_uuid(tunnel_id) or "", normalize_uuid(team_id) or ""  # "" matches no row
        async with self._write() as tx:
            row = await tx.fetchone("SELECT * FROM tunnels WHERE id = ? AND team_id = ?",
                                    (tunnel_id, team_id))
            if row is None:
                return None
            await tx.execute("DELETE FROM tunnels WHERE id = ?", (tunnel_id,))  # shares cascade
        return _tunnel(row)

    # -- tunnel bindings (the Tunnels API's connect) ----------------------------------

    async def put_binding(self, team_id: str, tunnel_id: str, agent_id: str, local_port: int) -> None:
        async with self._write() as tx:
            await tx.execute(
                "INSERT INTO tunnel_bindings (tunnel_id, team_id, agent_id, local_port, created_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (tunnel_id, agent_id)"
                " DO UPDATE SET local_port = excluded.local_port, created_at = excluded.created_at",
                (normalize_uuid(tunnel_id), normalize_uuid(team_id), normalize_uuid(agent_id),
                 local_port, self._clock()))

    async def list_bindings(self, team_id: str, agent_id: str) -> list[tuple[Tunnel, int]]:
        async with self._read() as tx:
            rows = await tx.fetchall(
                "SELECT t.*, b.local_port AS bound_port FROM tunnel_bindings b"
                " JOIN tunnels t ON t.id = b.tunnel_id"
                " WHERE b.team_id = ? AND b.agent_id = ? ORDER BY b.created_at, t.id",
                (normalize_uuid(team_id), normalize_uuid(agent_id)))
        return [(_tunnel(row), row["bound_port"]) for row in rows]

    async def list_tunnel_bindings(self, team_id: str, tunnel_id: str) -> list[tuple[str, int, float]]:
        async with self._read() as tx:
            rows = await tx.fetchall(
                "SELECT agent_id, local_port, created_at FROM tunnel_bindings"
                " WHERE team_id = ? AND tunnel_id = ? ORDER BY created_at, agent_id",
                (normalize_uuid(team_id) or "", normalize_uuid(tunnel_id) or ""))
        return [(row["agent_id"], row["local_port"], row["created_at"]) for row in rows]

    async def delete_binding(self, team_id: str, tunnel_id: str, agent_id: str) -> bool:
        async with self._write() as tx:
            row = await tx.fetchone(
                "SELECT agent_id FROM tunnel_bindings WHERE team_id = ? AND tunnel_id = ? AND agent_id = ?",
                (normalize_uuid(team_id) or "", normalize_uuid(tunnel_id) or "", normalize_uuid(agent_id) or ""))
            if row is None:
                return False
            await tx.execute("DELETE FROM tunnel_bindings WHERE tunnel_id = ? AND agent_id = ?",
                             (normalize_uuid(tunnel_id), normalize_uuid(agent_id)))
        return True

    # -- tunnel shares -----------------------------------------------------------------

    async def create_share(self, team_id: str, tunnel_id: str, name: str, description: str = "", *,
                           expires_at: float | None = None, allowed_methods: Sequence[str] | None = None,
                           rate_limit: int | None = None) -> tuple[Share, SecretToken]:
        token = _new_token()
        async with self._write() as tx:
            row = await tx.fetchone("SELECT id, team_id FROM tunnels WHERE id = ? AND team_id = ?",
                                    (normalize_uuid(tunnel_id), normalize_uuid(team_id)))
            if row is None:
                raise NotFoundError(f"unknown tunnel: {tunnel_id}")
            share = Share(
                id=str(uuid.uuid4()), team_id=row["team_id"], tunnel_id=row["id"], name=name,
                description=description, token_prefix=token[:PREFIX_CHARS],
                expires_at=expires_at,
                allowed_methods=None if allowed_methods is None else tuple(allowed_methods),
                rate_limit=rate_limit, created_at=self._clock(), token_hash=hash_token(token))
            await tx.execute(
                "INSERT INTO tunnel_shares (id, team_id, tunnel_id, name, description, token_hash,"
                " token_prefix, expires_at, allowed_methods, rate_limit, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (share.id, share.team_id, share.tunnel_id, name, description, share.token_hash,
                 share.token_prefix, expires_at,
                 None if share.allowed_methods is None else json.dumps(list(share.allowed_methods)),
                 rate_limit, share.created_at))
        return share, token

    async def get_share(self, team_id: str, tunnel_id: str, share_id: str) -> Share | None:
        async with self._read() as tx:
            row = await tx.fetchone(
                "SELECT * FROM tunnel_shares WHERE id = ? AND tunnel_id = ? AND team_id = ?",
                (normalize_uuid(share_id), normalize_uuid(tunnel_id), normalize_uuid(team_id)))
        return _share(row) if row else None

    async def list_shares(self, team_id: str, tunnel_id: str) -> list[Share]:
        async with self._read() as tx:
            rows = await tx.fetchall(
                "SELECT * FROM tunnel_shares WHERE tunnel_id = ? AND team_id = ?"
                " ORDER BY created_at, id", (normalize_uuid(tunnel_id), normalize_uuid(team_id)))
        return [_share(row) for row in rows]

    async def delete_share(self, team_id: str, tunnel_id: str, share_id: str) -> bool:
        async with self._write() as tx:
            changed = await tx.execute(
                "DELETE FROM tunnel_shares WHERE id = ? AND tunnel_id = ? AND team_id = ?",
                (normalize_uuid(share_id), normalize_uuid(tunnel_id), normalize_uuid(team_id)))
        return changed == 1

    async def get_share_by_token(self, token: str) -> Share | None:
        if not isinstance(token, str) or not token:
            return None
        async with self._read() as tx:
            row = await tx.fetchone("SELECT * FROM tunnel_shares WHERE token_hash = ?",
                                    (hash_token(token),))
        if row is None or not _hash_matches(row["token_hash"], token):
            return None
        return _share(row)

    # -- webhooks ----------------------------------------------------------------------

    async def create_webhook(self, team_id: str, url: str, events: Sequence[str]) -> Webhook:
        async with self._write() as tx:
            team_id = await self._require_team(tx, team_id)
            hook = Webhook(id=str(uuid.uuid4()), team_id=team_id, url=url, events=tuple(events),
                           created_at=self._clock(),
                           secret="whsec_" + secrets.token_urlsafe(_TOKEN_BYTES))
            await tx.execute("INSERT INTO webhooks (id, team_id, url, events, secret, created_at)"
                             " VALUES (?, ?, ?, ?, ?, ?)",
                             (hook.id, team_id, url, json.dumps(list(hook.events)), hook.secret,
                        hook.created_at))
        return hook

    async def get_webhook(self, team_id: str, webhook_id: str) -> Webhook | None:
        async with self._read() as tx:
            row = await tx.fetchone("SELECT * FROM webhooks WHERE id = ? AND team_id = ?",
                                    (normalize_uuid(webhook_id), normalize_uuid(team_id)))
        return _webhook(row) if row else None

    async def list_webhooks(self, team_id: str, event: str | None = None) -> list[Webhook]:
        async with self._read() as tx:
            rows = await tx.fetchall("SELECT * FROM webhooks WHERE team_id = ? ORDER BY created_at, id",
                                     (normalize_uuid(team_id),))
        hooks = [_webhook(row) for row in rows]
        return [h for h in hooks if event is None or event in h.events]

    async def delete_webhook(self, team_id: str, webhook_id: str) -> bool:
        async with self._write() as tx:
            changed = await tx.execute("DELETE FROM webhooks WHERE id = ? AND team_id = ?",
                                       (normalize_uuid(webhook_id), normalize_uuid(team_id)))
        return changed == 1

    # -- pending webhook deliveries ----------------------------------------------------

    async def add_webhook_deliveries(self, deliveries: Sequence[tuple[str, str, str, bytes]],
                                     keep: int) -> None:
        now = self._clock()
        async with self._write() as tx:
            await tx.executemany(
                "INSERT INTO webhook_deliveries (id, webhook_id, event, body, created_at)"
                " SELECT ?, id, ?, ?, ? FROM webhooks WHERE id = ? ON CONFLICT DO NOTHING",
                [(d_id, event, body, now, hook_id) for d_id, hook_id, event, body in deliveries])
            await tx.execute(f"DELETE FROM webhook_deliveries WHERE id IN (SELECT id FROM webhook_deliveries"
                             f" ORDER BY created_at DESC, {self._DELIVERY_ORDER} DESC {self._OFFSET})", (keep,))

    async def set_webhook_delivery_attempts(self, delivery_id: str, attempts: int) -> None:
        async with self._write() as tx:
            await tx.execute("UPDATE webhook_deliveries SET attempts = ? WHERE id = ?", (attempts, delivery_id))

    async def delete_webhook_delivery(self, delivery_id: str) -> None:
        async with self._write() as tx:
            await tx.execute("DELETE FROM webhook_deliveries WHERE id = ?", (delivery_id,))

    async def pending_webhook_deliveries(self, limit: int) -> list[tuple[Webhook, str, bytes, str, int]]:
        async with self._read() as tx:
            rows = await tx.fetchall(
                f"SELECT d.id AS delivery_id, d.event AS event, d.body AS body, d.attempts AS attempts,"
                " w.* FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id"
                f" ORDER BY d.created_at, d.{self._DELIVERY_ORDER} LIMIT ?", (limit,))
        return [(_webhook(row), row["event"], bytes(row["body"]), row["delivery_id"], row["attempts"])
                for row in rows]

    # -- container services (seeds 003, 004) ---------------------------------------------

    async def put_service(self, team_id: str, slug: str, service_type: str, spec: Any,
                          status: str) -> Service:
        if service_type not in SERVICE_TYPES:
            raise StoreError(f"service_type must be one of {', '.join(SERVICE_TYPES)}")
        now = self._clock()
        team_id = normalize_uuid(team_id) or team_id
        async with self._write() as tx:
            await tx.execute(
                "INSERT INTO services (team_id, slug, service_type, spec, status, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (team_id, slug) DO UPDATE SET"
                " service_type = excluded.service_type, spec = excluded.spec,"
                " status = excluded.status, updated_at = excluded.updated_at",
                (team_id, slug, service_type, json.dumps(spec, sort_keys=True), status, now, now))
            row = await tx.fetchone("SELECT * FROM services WHERE team_id = ? AND slug = ?",
                                    (team_id, slug))
        assert row is not None  # written in this transaction
        return _service(row)

    async def set_service_status(self, team_id: str, slug: str, status: str) -> None:
        async with self._write() as tx:
            await tx.execute("UPDATE services SET status = ?, updated_at = ? WHERE team_id = ? AND slug = ?",
                             (status, self._clock(), normalize_uuid(team_id) or team_id, slug))

    async def get_service(self, team_id: str, slug: str) -> Service | None:
        async with self._read() as tx:
            row = await tx.fetchone("SELECT * FROM services WHERE team_id = ? AND slug = ?",
                                    (normalize_uuid(team_id) or team_id, slug))
        return _service(row) if row else None

    async def list_services(self, team_id: str | None) -> list[Service]:
        async with self._read() as tx:
            if team_id is None:
                rows = await tx.fetchall("SELECT * FROM services ORDER BY team_id, slug")
            else:
                rows = await tx.fetchall("SELECT * FROM services WHERE team_id = ? ORDER BY slug",
                                         (normalize_uuid(team_id) or team_id,))
        return [_service(row) for row in rows]

    async def delete_service(self, team_id: str, slug: str) -> bool:
        async with self._write() as tx:
            changed = await tx.execute("DELETE FROM services WHERE team_id = ? AND slug = ?",
                                       (normalize_uuid(team_id) or team_id, slug))
        return changed == 1

    # -- tasks (seed 001) ----------------------------------------------------------------

    async def create_task(self, team_id: str, task_id: str, kind: str, task_input: Any,
                          labels: Sequence[str], owner: str = "", expose: Any = None,
                          submitted_by: str | None = None) -> TaskRecord:
        now = self._clock()
        task_id = normalize_uuid(task_id) or ""
        if not task_id:
            raise StoreError("task id must be a UUID")
        async with self._write() as tx:
            team_id = await self._require_team(tx, team_id)
            await tx.execute(
                "INSERT INTO tasks (id, team_id, owner, kind, input, labels, status, created_at, updated_at,"
                " expose, submitted_by) VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                (task_id, team_id, owner, kind, json.dumps(task_input), json.dumps(list(labels)), now, now,
                 None if expose is None else json.dumps(expose), submitted_by))
            row = await tx.fetchone("SELECT * FROM tasks WHERE id = ?", (task_id,))
        assert row is not None  # inserted in this transaction
        return _task(row)

    async def update_task(self, team_id: str, task_id: str, **changes: Any) -> bool:
        allowed = {"status", "agent_id", "result", "error", "finished_at"}
        if not changes or not set(changes) <= allowed:
            raise StoreError(f"update_task takes some of {', '.join(sorted(allowed))}")
        if "status" in changes and changes["status"] not in TASK_STATUSES:
            raise StoreError(f"task status must be one of {', '.join(TASK_STATUSES)}")
        columns = [f"{key} = ?" for key in changes] + ["updated_at = ?"]
        values = [json.dumps(v) if k == "result" and v is not None else v for k, v in changes.items()]
        async with self._write() as tx:
            changed = await tx.execute(f"UPDATE tasks SET {', '.join(columns)} WHERE id = ? AND team_id = ?",
                                       (*values, self._clock(), normalize_uuid(task_id), normalize_uuid(team_id)))
        return changed == 1

    async def get_task(self, team_id: str, task_id: str) -> TaskRecord | None:
        async with self._read() as tx:
            row = await tx.fetchone("SELECT * FROM tasks WHERE id = ? AND team_id = ?",
                                    (normalize_uuid(task_id), normalize_uuid(team_id)))
        return _task(row) if row else None

    async def list_tasks(self, team_id: str | None, statuses: Sequence[str] | None = None, *,
                         owner: str | None = None) -> list[TaskRecord]:
        sql, args = "SELECT * FROM tasks WHERE 1 = 1", []
        if team_id is not None:
            sql += " AND team_id = ?"
            args.append(normalize_uuid(team_id))
        if owner is not None:
            sql += " AND owner = ?"
            args.append(owner)
        if statuses is not None:
            wanted = [s for s in statuses if s in TASK_STATUSES]
            if not wanted:
                return []
            sql += f" AND status IN ({', '.join('?' for _ in wanted)})"
            args.extend(wanted)
        async with self._read() as tx:
            rows = await tx.fetchall(sql + " ORDER BY created_at, id", args)
        return [_task(row) for row in rows]

    async def delete_finished_tasks(self, before: float) -> int:
        async with self._write() as tx:
            return await tx.execute("DELETE FROM tasks WHERE finished_at IS NOT NULL AND finished_at < ?",
                                    (before,))
