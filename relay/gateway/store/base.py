"""The gateway's state as every backend stores it: rows, errors, and the handling of secrets.

The rows (:class:`Team`, :class:`Credential`, :class:`Agent`, :class:`TunnelSession`,
:class:`Tunnel`, :class:`Share`, :class:`Webhook`, :class:`Service`) are frozen
dataclasses, the same whichever backend read them; the ``_team``/``_agent``/...
converters build them from a database row that maps column names to values.

Secrets: credential tokens (``ak-``/``sk-``/``dk-``) and tunnel access/admin tokens are
returned in plaintext exactly once, when created, wrapped in :class:`SecretToken` (a
``str`` whose ``repr`` is masked). Only their SHA-256 is stored. Everything team-scoped
takes a ``team_id`` and never returns another team's rows.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay.gateway.store.sqlite import Store

#: A database row: column name -> value (a ``sqlite3.Row`` ...).
Row = Mapping[str, Any]

#: Credential kinds: ``sk`` team integration key (runtime + management), ``dk`` runtime
#: only, ``ak`` agent (may only connect as an agent of its team).
CREDENTIAL_KINDS: tuple[str, ...] = ("sk", "dk", "ak")

#: Agent statuses, as the seeds describe them.
AGENT_STATUSES: tuple[str, ...] = ("idle", "busy", "tunnel", "unhealthy", "offline")

#: Protocols of a tunnel session opened with ``POST /agents/{id}/tunnel`` (seed 000).
TUNNEL_SESSION_PROTOCOLS: tuple[str, ...] = ("http", "tcp")

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


def _webhook(row: Row) -> Webhook:
    return Webhook(id=row["id"], team_id=row["team_id"], url=row["url"],
                   events=tuple(json.loads(row["events"])), created_at=row["created_at"],
                   secret=row["secret"])



def default_data_dir() -> Path:
    """Where state lives when no ``--data``/``RELAY_DATA`` is given:
    ``$XDG_DATA_HOME/relay``, else ``~/.local/share/relay``."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "relay"



def ensure_default_team(store: Store) -> tuple[Team, dict[str, SecretToken]] | None:
    """On the first start of an empty gateway, create team ``default`` with one key of
    each kind and return ``(team, {kind: plaintext key})`` so the caller can print the
    keys once. Returns None if any team already exists. Safe against a concurrent
    ``relay admin team create``: the check and the insert are one transaction."""
    return store.create_team_with_keys("default", only_if_no_teams=True)


def _check_status(status: str) -> None:
    if status not in AGENT_STATUSES:
        raise StoreError(f"agent status must be one of {', '.join(AGENT_STATUSES)}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__

