"""The gateway's state as every backend stores it: the interface, rows, errors, and the
handling of secrets.

:class:`Store` is the interface every backend implements (relay.gateway.store.sqlite,
relay.gateway.store.postgres); the gateway, ``relay admin`` and the tests use only it.
The rows (:class:`Team`, :class:`Credential`, :class:`Agent`, :class:`TunnelSession`,
:class:`Tunnel`, :class:`Share`, :class:`Webhook`, :class:`Service`, :class:`TaskRecord`) are frozen
dataclasses, the same whichever backend read them; the ``_team``/``_agent``/...
converters build them from a database row that maps column names to values.

Secrets: credential tokens (``ak-``/``sk-``/``dk-``) and tunnel access/admin tokens are
returned in plaintext exactly once, when created, wrapped in :class:`SecretToken` (a
``str`` whose ``repr`` is masked). Only their SHA-256 is stored. Everything team-scoped
takes a ``team_id`` and never returns another team's rows.
"""
from __future__ import annotations

import abc
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Row(Protocol):
    """A database row (a ``sqlite3.Row``, an ``asyncpg.Record``): values by column name
    or by position."""

    def __getitem__(self, key: str | int, /) -> Any: ...

    def keys(self) -> Iterable[str]: ...


#: Credential kinds: ``sk`` team integration key (runtime + management), ``dk`` runtime
#: only, ``ak`` agent (may only connect as an agent of its team).
CREDENTIAL_KINDS: tuple[str, ...] = ("sk", "dk", "ak")

#: Agent statuses, as the seeds describe them.
AGENT_STATUSES: tuple[str, ...] = ("idle", "busy", "tunnel", "unhealthy", "offline")

#: Task statuses (seed 001), in the order a task goes through them; the last two are final.
TASK_STATUSES: tuple[str, ...] = ("queued", "dispatched", "running", "succeeded", "failed", "cancelled")

#: Protocols of a tunnel session opened with ``POST /agents/{id}/tunnel`` (seed 000).
TUNNEL_SESSION_PROTOCOLS: tuple[str, ...] = ("http", "tcp", "udp")

#: Characters of a credential token kept for display, after its ``xx-`` kind prefix.
PREFIX_CHARS = 6

# 32 random bytes -> 43 URL-safe characters.
_TOKEN_BYTES = 32

_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)


# --------------------------------------------------------------------------- errors


class StoreError(Exception):
    """The store cannot do what was asked (bad input, unusable data directory ...)."""


class NotFoundError(StoreError, LookupError):
    """A referenced row (team, agent ...) does not exist in the caller's team."""


class ConflictError(StoreError):
    """The request clashes with existing state (e.g. an agent id owned by another team)."""


class StoreUnavailable(StoreError):
    """The database cannot be reached now (PostgreSQL down, connection lost, too slow).
    Nothing was written; the same call may work later."""


# --------------------------------------------------------------------------- secrets


class SecretToken(str):
    """A plaintext token. It *is* the ``str`` (print it, send it), but ``repr()`` masks it,
    so a token caught in a debug print, a traceback or a ``%r`` log line does not leak."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"SecretToken({mask_token(self)!r})"


def mask_token(token: str) -> str:
    """``sk-AbCdEf…``: the kind prefix and a few characters, enough to tell keys apart."""
    kind = token_kind(token)
    keep = len(kind) + 1 + PREFIX_CHARS if kind else PREFIX_CHARS
    return token[:keep] + "…"


def token_kind(token: str) -> str | None:
    """The credential kind (``ak``/``sk``/``dk``) a token claims by its prefix, else None."""
    kind, sep, rest = token.partition("-")
    if sep and rest and kind in CREDENTIAL_KINDS:
        return kind
    return None


def hash_token(token: str) -> str:
    """SHA-256 (hex) of a token: what the database stores instead of the token.

    Why not bcrypt/argon2: those slow hashes exist to make guessing *low-entropy*
    passwords expensive. Our tokens are 256 random bits, so nothing can be guessed and a
    fast hash is just as safe, while keeping lookups cheap and indexable (a salted slow
    hash could not be looked up by value at all, only checked row by row).
    """
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _new_token(kind: str | None = None) -> SecretToken:
    body = secrets.token_urlsafe(_TOKEN_BYTES)
    return SecretToken(f"{kind}-{body}" if kind else body)


def _hash_matches(stored: str, token: str) -> bool:
    # The row was found by its hash through an index; compare again in constant time so
    # the final accept/reject decision never depends on how many characters matched.
    return hmac.compare_digest(stored.encode(), hash_token(token).encode())


def normalize_uuid(value: object) -> str | None:
    """The canonical (lower-case, hyphenated) form of a UUID string, or None if not one."""
    if isinstance(value, str):
        value = value.strip()
        if _UUID_RE.fullmatch(value):
            return value.lower()
    return None


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True, slots=True)
class Team:
    """A team: the unit every resource and credential belongs to."""

    id: str
    name: str
    created_at: float


@dataclass(frozen=True, slots=True)
class Credential:
    """A credential row. ``prefix`` (e.g. ``sk-AbCdEf``) is for display only."""

    id: str
    team_id: str
    kind: str
    prefix: str
    created_at: float
    revoked_at: float | None
    token_hash: str = field(repr=False)

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def display(self) -> str:
        """The masked form to show people: ``sk-AbCdEf…``."""
        return self.prefix + "…"


@dataclass(frozen=True, slots=True)
class Agent:
    """An agent seen by the gateway. ``labels`` is the JSON value the agent advertised."""

    id: str
    team_id: str
    name: str
    labels: Any
    version: str
    status: str
    first_seen: float
    last_seen: float


@dataclass(frozen=True, slots=True)
class TunnelSession:
    """A tunnel session opened on an agent (seed 000). Tokens are stored only as hashes."""

    session_id: str
    team_id: str
    agent_id: str
    target_port: int
    protocol: str
    hub_port: int | None
    metadata: Any
    created_at: float
    closed_at: float | None
    token_hash: str = field(repr=False)
    admin_token_hash: str = field(repr=False)

    @property
    def is_open(self) -> bool:
        return self.closed_at is None



@dataclass(frozen=True, slots=True)
class Service:
    """A container service record (see relay.gateway.api.services for the lifecycle)."""

    team_id: str
    slug: str
    service_type: str
    spec: Any
    status: str
    created_at: float
    updated_at: float



@dataclass(frozen=True, slots=True)
class Tunnel:
    """A named tunnel of the Tunnels API (seed 002). ``status`` is what was asked
    (``active``/``paused``); the API derives ``connecting``/``error`` from live state."""

    id: str
    team_id: str
    agent_id: str
    name: str
    target_host: str
    target_port: int
    protocol: str
    public: bool
    hub_port: int | None
    status: str
    metadata: Any
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class Share:
    """A share link of a tunnel. ``token_prefix`` is for display; the token itself is
    stored only as a hash. ``allowed_methods``/``rate_limit``/``expires_at``: None means
    no restriction."""

    id: str
    team_id: str
    tunnel_id: str
    name: str
    description: str
    token_prefix: str
    expires_at: float | None
    allowed_methods: tuple[str, ...] | None
    rate_limit: int | None
    created_at: float
    token_hash: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task (seed 001) as stored: what was asked and how it ended. Its events
    (progress, partial outputs) live only in the memory of the gateway that runs it."""

    id: str
    team_id: str
    owner: str
    kind: str
    input: Any
    labels: tuple[str, ...]
    status: str
    agent_id: str | None
    result: Any
    error: str | None
    created_at: float
    updated_at: float
    finished_at: float | None
    #: ``{"port", "protocol"}`` to tunnel while the task runs, or None.
    expose: Any = None
    #: Who submitted it, ``KIND:SUBJECT`` of the caller (relay.gateway.api.tasks), or None.
    submitted_by: str | None = None


@dataclass(frozen=True, slots=True)
class Webhook:
    """A team's webhook: where to POST which events, and the HMAC signing secret."""

    id: str
    team_id: str
    url: str
    events: tuple[str, ...]
    created_at: float
    secret: str = field(repr=False)



def _team(row: Row) -> Team:
    return Team(id=row["id"], name=row["name"], created_at=row["created_at"])


def _credential(row: Row) -> Credential:
    return Credential(
        id=row["id"], team_id=row["team_id"], kind=row["kind"], prefix=row["prefix"],
        created_at=row["created_at"], revoked_at=row["revoked_at"],
        token_hash=row["token_hash"],
    )


def _agent(row: Row) -> Agent:
    return Agent(
        id=row["id"], team_id=row["team_id"], name=row["name"],
        labels=json.loads(row["labels"]), version=row["version"], status=row["status"],
        first_seen=row["first_seen"], last_seen=row["last_seen"],
    )


def _session(row: Row) -> TunnelSession:
    return TunnelSession(
        session_id=row["session_id"], team_id=row["team_id"], agent_id=row["agent_id"],
        target_port=row["target_port"], protocol=row["protocol"], hub_port=row["hub_port"],
        metadata=json.loads(row["metadata"]), created_at=row["created_at"],
        closed_at=row["closed_at"], token_hash=row["token_hash"],
        admin_token_hash=row["admin_token_hash"],
    )



def _service(row: Row) -> Service:
    return Service(team_id=row["team_id"], slug=row["slug"], service_type=row["service_type"],
                   spec=json.loads(row["spec"]), status=row["status"],
                   created_at=row["created_at"], updated_at=row["updated_at"])



def _tunnel(row: Row) -> Tunnel:
    return Tunnel(
        id=row["id"], team_id=row["team_id"], agent_id=row["agent_id"], name=row["name"],
        target_host=row["target_host"], target_port=row["target_port"],
        protocol=row["protocol"], public=bool(row["public"]), hub_port=row["hub_port"],
        status=row["status"], metadata=json.loads(row["metadata"]),
        created_at=row["created_at"], updated_at=row["updated_at"])


def _share(row: Row) -> Share:
    methods = row["allowed_methods"]
    return Share(
        id=row["id"], team_id=row["team_id"], tunnel_id=row["tunnel_id"], name=row["name"],
        description=row["description"], token_prefix=row["token_prefix"],
        expires_at=row["expires_at"],
        allowed_methods=None if methods is None else tuple(json.loads(methods)),
        rate_limit=row["rate_limit"], created_at=row["created_at"], token_hash=row["token_hash"])


def _task(row: Row) -> TaskRecord:
    result = row["result"]
    return TaskRecord(id=row["id"], team_id=row["team_id"], owner=row["owner"], kind=row["kind"],
                      input=json.loads(row["input"]),
                      labels=tuple(json.loads(row["labels"])), status=row["status"], agent_id=row["agent_id"],
                      result=None if result is None else json.loads(result), error=row["error"],
                      created_at=row["created_at"], updated_at=row["updated_at"], finished_at=row["finished_at"],
                      expose=json.loads(row["expose"]) if row["expose"] else None,
                      submitted_by=row["submitted_by"])


def _webhook(row: Row) -> Webhook:
    return Webhook(id=row["id"], team_id=row["team_id"], url=row["url"],
                   events=tuple(json.loads(row["events"])), created_at=row["created_at"],
                   secret=row["secret"])



def default_data_dir() -> Path:
    """Where state lives when no ``--data``/``RELAY_DATA`` is given:
    ``$XDG_DATA_HOME/relay``, else ``~/.local/share/relay``."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "relay"



# --------------------------------------------------------------------------- the interface


class Store(abc.ABC):
    """The gateway's state, whatever holds it: :class:`~relay.gateway.store.sqlite.SqliteStore`
    (a file in the data directory, the default) or
    :class:`~relay.gateway.store.postgres.PostgresStore` (a PostgreSQL database shared by
    several gateways). :func:`relay.gateway.store.open_store` picks one from a URL;
    :meth:`Store.open` opens the SQLite one in a data directory.

    Every data method is a coroutine and one short transaction. Team-scoped methods take
    a ``team_id`` and never see another team's rows; a malformed id finds nothing. What
    is answered per request (credentials, tunnel sessions, shares, services) is kept in
    memory by its users while :meth:`generation` stays the same, so a cached request
    makes no database round trip; :meth:`generation` itself never waits.
    """

    #: Bumped whenever this store closes tunnel sessions (in-memory token caches compare it).
    tunnel_sessions_version: int = 0

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str], *,
             clock: Callable[[], float] = time.time) -> Store:
        """The SQLite store in ``data_dir`` (created and migrated if needed); see
        :meth:`relay.gateway.store.sqlite.SqliteStore.open`."""
        from relay.gateway.store.sqlite import SqliteStore

        return SqliteStore.open(data_dir, clock=clock)

    # -- lifecycle ---------------------------------------------------------------------

    #: Where the state is, for messages (never with a password).
    location: str = ""

    @abc.abstractmethod
    def generation(self) -> Hashable:
        """A value that changes whenever anything was committed since the last call
        returned it, by this store or by anyone else (``relay admin`` in another process,
        another gateway). In-memory caches of rows keep what they hold only while it
        stays the same. Cheap and never waits: no database round trip per call."""

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The schema version of the open database (how many migrations ran)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the database. The store is unusable afterwards."""

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- teams -------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_team(self, name: str) -> Team:
        """Create a team named ``name`` (1..100 characters) with a new UUID."""

    @abc.abstractmethod
    async def create_team_with_keys(
        self, name: str, kinds: Sequence[str] = CREDENTIAL_KINDS, *, only_if_no_teams: bool = False,
    ) -> tuple[Team, dict[str, SecretToken]] | None:
        """Create a team and one credential of each of ``kinds``, atomically.

        Returns the team and ``{kind: plaintext token}`` (shown once, never stored). With
        ``only_if_no_teams`` nothing is created, and None returned, if any team exists
        (checked in the same transaction, so two starting gateways create one team).
        """

    @abc.abstractmethod
    async def get_team(self, team_id: str) -> Team | None:
        """The team with this id, or None (also for a malformed id)."""

    @abc.abstractmethod
    async def list_teams(self) -> list[Team]:
        """All teams, oldest first."""

    # -- credentials -------------------------------------------------------------------

    @abc.abstractmethod
    async def create_credential(self, team_id: str, kind: str) -> tuple[Credential, SecretToken]:
        """Issue a new ``kind`` (``ak``/``sk``/``dk``) credential for the team. Returns
        the row and the plaintext token; the token is not stored anywhere."""

    @abc.abstractmethod
    async def lookup_credential(self, token: str) -> Credential | None:
        """The active (not revoked) credential whose token is ``token``, else None."""

    @abc.abstractmethod
    async def get_credential(self, team_id: str, credential_id: str) -> Credential | None:
        """The team's credential with this id (revoked or not), or None."""

    @abc.abstractmethod
    async def list_credentials(self, team_id: str, *, include_revoked: bool = False) -> list[Credential]:
        """The team's credentials, oldest first; revoked ones only if asked."""

    @abc.abstractmethod
    async def revoke_credential(self, team_id: str, credential_id: str) -> bool:
        """Revoke one of the team's credentials. False if no such active credential."""

    @abc.abstractmethod
    async def revoked_credentials(self, credential_ids: Iterable[str]) -> set[str]:
        """Which of ``credential_ids`` are revoked (ids the store does not know, e.g. an
        ``authenticate`` hook's own, are not: the store cannot revoke them)."""

    # -- agents ------------------------------------------------------------------------

    @abc.abstractmethod
    async def upsert_agent(self, team_id: str, agent_id: str | None, name: str, labels: Any = None,
                           version: str = "", status: str = "idle") -> Agent:
        """Register an agent that connected, or refresh one seen before.

        ``agent_id=None`` registers a new agent with a fresh UUID. An ``agent_id`` the
        agent chose itself is kept. Raises :class:`ConflictError` if that id belongs to
        another team's agent (one team can never take over another's agent), and
        :class:`NotFoundError` for an unknown team.
        """

    @abc.abstractmethod
    async def get_agent(self, team_id: str, agent_id: str) -> Agent | None:
        """The team's agent with this id; None if unknown *or another team's*."""

    @abc.abstractmethod
    async def list_agents(self, team_id: str) -> list[Agent]:
        """The team's agents, first seen first."""

    @abc.abstractmethod
    async def set_agent_status(self, team_id: str, agent_id: str, status: str) -> bool:
        """Set an agent's status and mark it seen now. False if not the team's agent."""

    @abc.abstractmethod
    async def touch_agent(self, team_id: str, agent_id: str) -> bool:
        """Record a heartbeat (``last_seen`` = now). False if not the team's agent."""

    @abc.abstractmethod
    async def mark_all_agents_offline(self) -> int:
        """Set every agent offline (at gateway start no agent is connected yet).
        Returns how many changed."""

    # -- tunnel sessions (seed 000) ----------------------------------------------------

    @abc.abstractmethod
    async def create_tunnel_session(
        self, team_id: str, agent_id: str, target_port: int = 8188, protocol: str = "http",
        *, hub_port: int | None = None, metadata: Any = None,
    ) -> tuple[TunnelSession, SecretToken, SecretToken]:
        """Open a tunnel session on one of the team's agents.

        Returns ``(session, access_token, admin_token)``. The access token goes into the
        shareable ``tunnel_url``; the admin token authorises close/stats/terminal. Both
        are returned only here. Raises :class:`NotFoundError` if the agent is not the
        team's, :class:`StoreError` for a bad port or protocol.
        """

    @abc.abstractmethod
    async def get_tunnel_session(self, team_id: str, session_id: str) -> TunnelSession | None:
        """The team's tunnel session (open or closed), or None."""

    @abc.abstractmethod
    async def get_tunnel_session_by_token(self, token: str, *,
                                          open_only: bool = True) -> TunnelSession | None:
        """The session whose *access* token is ``token`` (the one in ``tunnel_url``).
        Closed sessions are not returned unless ``open_only=False``."""

    @abc.abstractmethod
    async def check_tunnel_admin_token(self, session_id: str, admin_token: str) -> TunnelSession | None:
        """The session if ``admin_token`` is its admin token, else None."""

    @abc.abstractmethod
    async def list_tunnel_sessions(self, team_id: str | None, agent_id: str | None = None, *,
                                   open_only: bool = True) -> list[TunnelSession]:
        """The team's tunnel sessions (of one agent if given; every team's with
        ``team_id`` None), oldest first."""

    @abc.abstractmethod
    async def close_tunnel_session(self, team_id: str, session_id: str) -> bool:
        """Close one of the team's open sessions. False if none was open."""

    @abc.abstractmethod
    async def close_tunnel_sessions(self, team_id: str, agent_id: str) -> list[str]:
        """Close all of an agent's open sessions; returns the ids that were closed."""

    # -- tunnels (Tunnels API, seed 002) -----------------------------------------------

    @abc.abstractmethod
    async def create_tunnel(self, team_id: str, agent_id: str, name: str, target_host: str,
                            target_port: int, protocol: str, *, public: bool = False,
                            hub_port: int | None = None, status: str = "active",
                            metadata: Any = None) -> Tunnel:
        """Record a tunnel of one of the team's agents. Input is validated by the API
        layer; this raises :class:`NotFoundError` if the agent is not the team's."""

    @abc.abstractmethod
    async def get_tunnel(self, team_id: str, tunnel_id: str) -> Tunnel | None:
        """The team's tunnel; None if unknown *or another team's*."""

    @abc.abstractmethod
    async def list_tunnels(self, team_id: str | None) -> list[Tunnel]:
        """The team's tunnels, oldest first; ``None``: every team's (gateway start)."""

    @abc.abstractmethod
    async def tunnel_on_hub_port(self, hub_port: int) -> Tunnel | None:
        """The tunnel (of any team) that holds ``hub_port``, if one does."""

    @abc.abstractmethod
    async def claim_hub_port(self, team_id: str, tunnel_id: str, hub_port: int) -> Tunnel | None:
        """Record ``hub_port`` as the tunnel's if it has none yet, atomically for every
        process sharing the store; returns the stored row afterwards (its ``hub_port``
        is another one if someone claimed first), None if the tunnel is gone. Raises
        :class:`ConflictError` if another tunnel holds ``hub_port``."""

    @abc.abstractmethod
    async def update_tunnel(self, team_id: str, tunnel_id: str, **changes: Any) -> Tunnel | None:
        """Change some of ``name``, ``status``, ``metadata``, ``hub_port`` of the team's
        tunnel; returns the new row, or None if there is no such tunnel."""

    @abc.abstractmethod
    async def delete_tunnel(self, team_id: str, tunnel_id: str) -> Tunnel | None:
        """Delete the team's tunnel with its shares and bindings; returns the deleted
        row (or None)."""

    # -- tunnel bindings (the Tunnels API's connect) -----------------------------------

    @abc.abstractmethod
    async def put_binding(self, team_id: str, tunnel_id: str, agent_id: str, local_port: int) -> None:
        """Record that the team's agent listens on ``local_port`` for the tunnel (one
        port per tunnel and agent: a new one replaces the old)."""

    @abc.abstractmethod
    async def list_bindings(self, team_id: str, agent_id: str) -> list[tuple[Tunnel, int]]:
        """The agent's bindings as ``(tunnel, local_port)``, oldest first."""

    @abc.abstractmethod
    async def list_tunnel_bindings(self, team_id: str, tunnel_id: str) -> list[tuple[str, int, float]]:
        """The tunnel's bindings as ``(agent_id, local_port, created_at)``, oldest first."""

    @abc.abstractmethod
    async def delete_binding(self, team_id: str, tunnel_id: str, agent_id: str) -> bool:
        """Forget the agent's binding of the tunnel. False if there was none."""

    # -- tunnel shares -----------------------------------------------------------------

    @abc.abstractmethod
    async def create_share(self, team_id: str, tunnel_id: str, name: str, description: str = "", *,
                           expires_at: float | None = None, allowed_methods: Sequence[str] | None = None,
                           rate_limit: int | None = None) -> tuple[Share, SecretToken]:
        """Create a share link of the team's tunnel. Returns the row and the plaintext
        token of its URL (returned only here; only its hash is stored). Raises
        :class:`NotFoundError` if the tunnel is not the team's."""

    @abc.abstractmethod
    async def get_share(self, team_id: str, tunnel_id: str, share_id: str) -> Share | None:
        """The share of the team's tunnel, or None."""

    @abc.abstractmethod
    async def list_shares(self, team_id: str, tunnel_id: str) -> list[Share]:
        """The shares of the team's tunnel, oldest first."""

    @abc.abstractmethod
    async def delete_share(self, team_id: str, tunnel_id: str, share_id: str) -> bool:
        """Delete a share of the team's tunnel. False if there was none."""

    @abc.abstractmethod
    async def get_share_by_token(self, token: str) -> Share | None:
        """The share whose URL token is ``token`` (expired ones included: the caller
        decides what an expired link answers)."""

    # -- webhooks ----------------------------------------------------------------------

    @abc.abstractmethod
    async def create_webhook(self, team_id: str, url: str, events: Sequence[str]) -> Webhook:
        """Register a webhook; its signing secret is generated here. The secret is kept
        in plaintext (unlike tokens) because the gateway must sign with it; the API
        shows it only once."""

    @abc.abstractmethod
    async def get_webhook(self, team_id: str, webhook_id: str) -> Webhook | None:
        """The team's webhook, or None."""

    @abc.abstractmethod
    async def list_webhooks(self, team_id: str, event: str | None = None) -> list[Webhook]:
        """The team's webhooks (only those subscribed to ``event`` if given)."""

    @abc.abstractmethod
    async def delete_webhook(self, team_id: str, webhook_id: str) -> bool:
        """Delete the team's webhook (and its pending deliveries). False if there was none."""

    # -- pending webhook deliveries ----------------------------------------------------

    @abc.abstractmethod
    async def add_webhook_deliveries(self, deliveries: Sequence[tuple[str, str, str, bytes]],
                                     keep: int) -> None:
        """Record deliveries ``(id, webhook_id, event, body)`` not made yet, in one
        transaction, then drop the oldest beyond ``keep`` rows (the table stays bounded).
        A delivery of a webhook that no longer exists is not recorded."""

    @abc.abstractmethod
    async def set_webhook_delivery_attempts(self, delivery_id: str, attempts: int) -> None:
        """Record how many attempts a pending delivery has had."""

    @abc.abstractmethod
    async def delete_webhook_delivery(self, delivery_id: str) -> None:
        """The delivery is over (delivered, failed for good, or dropped)."""

    @abc.abstractmethod
    async def pending_webhook_deliveries(self, limit: int) -> list[tuple[Webhook, str, bytes, str, int]]:
        """Deliveries left unfinished (e.g. by a restart), oldest first, at most ``limit``:
        ``(webhook, event, body, delivery id, attempts made)``."""

    # -- container services (seeds 003, 004) -------------------------------------------

    @abc.abstractmethod
    async def put_service(self, team_id: str, slug: str, service_type: str, spec: Any,
                          status: str) -> Service:
        """Create or replace the team's service ``slug`` (``created_at`` is kept)."""

    @abc.abstractmethod
    async def set_service_status(self, team_id: str, slug: str, status: str) -> None:
        """Record the service's current status (derived live by relay.gateway.api.services)."""

    @abc.abstractmethod
    async def get_service(self, team_id: str, slug: str) -> Service | None:
        """The team's service; None if unknown *or another team's*."""

    @abc.abstractmethod
    async def list_services(self, team_id: str | None) -> list[Service]:
        """The team's services by slug; ``None``: every team's."""

    @abc.abstractmethod
    async def delete_service(self, team_id: str, slug: str) -> bool:
        """Delete the team's service. False if there was none."""

    # -- tasks (seed 001) ----------------------------------------------------------------

    @abc.abstractmethod
    async def create_task(self, team_id: str, task_id: str, kind: str, task_input: Any,
                          labels: Sequence[str], owner: str = "", expose: Any = None,
                          submitted_by: str | None = None) -> TaskRecord:
        """Record a task just submitted (``queued``); ``task_id`` is the caller's UUID,
        ``owner`` names the gateway that runs it, ``expose`` its port to tunnel (or None),
        ``submitted_by`` who asked. Raises :class:`NotFoundError` for an unknown team."""

    @abc.abstractmethod
    async def update_task(self, team_id: str, task_id: str, **changes: Any) -> bool:
        """Change some of ``status``, ``agent_id``, ``result``, ``error``,
        ``finished_at`` of the team's task. False if there is no such task."""

    @abc.abstractmethod
    async def get_task(self, team_id: str, task_id: str) -> TaskRecord | None:
        """The team's task; None if unknown *or another team's*."""

    @abc.abstractmethod
    async def list_tasks(self, team_id: str | None, statuses: Sequence[str] | None = None, *,
                         owner: str | None = None) -> list[TaskRecord]:
        """The team's tasks (``None``: every team's), oldest first; only those in
        ``statuses``, and of ``owner``, if given."""

    @abc.abstractmethod
    async def delete_finished_tasks(self, before: float) -> int:
        """Forget tasks that finished before ``before``; returns how many."""


async def ensure_default_team(store: Store) -> tuple[Team, dict[str, SecretToken]] | None:
    """On the first start of an empty gateway, create team ``default`` with one key of
    each kind and return ``(team, {kind: plaintext key})`` so the caller can print the
    keys once. Returns None if any team already exists. Safe against a concurrent
    ``relay admin team create``: the check and the insert are one transaction."""
    return await store.create_team_with_keys("default", only_if_no_teams=True)


def _check_status(status: str) -> None:
    if status not in AGENT_STATUSES:
        raise StoreError(f"agent status must be one of {', '.join(AGENT_STATUSES)}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__

