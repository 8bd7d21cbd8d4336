"""The gateway's persistent state: teams, hashed credentials, agents seen, tunnel
sessions, tunnels, shares, webhooks and their pending deliveries, services, tasks.

One interface, :class:`Store` (relay.gateway.store.base, with the rows, the errors and
the handling of secrets), and a backend per database: :mod:`.sqlite` (a file in the
data directory, the default for one gateway) and :mod:`.postgres` (a PostgreSQL
database several gateways share, on asyncpg). Both run the same SQL rules
(relay.gateway.store.sql). :func:`open_store` picks the backend from a URL. Import the
names from here.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from relay.gateway.store.base import (
    AGENT_STATUSES,
    CREDENTIAL_KINDS,
    TASK_STATUSES,
    TUNNEL_SESSION_PROTOCOLS,
    Agent,
    ConflictError,
    Credential,
    NotFoundError,
    SecretToken,
    Service,
    Share,
    Store,
    StoreError,
    StoreUnavailable,
    TaskRecord,
    Team,
    Tunnel,
    TunnelSession,
    Webhook,
    default_data_dir,
    ensure_default_team,
    hash_token,
    mask_token,
    normalize_uuid,
    token_kind,
)
from relay.gateway.store.sqlite import DB_FILENAME, MIGRATIONS, SqliteStore

__all__ = [
    "AGENT_STATUSES",
    "CREDENTIAL_KINDS",
    "DB_FILENAME",
    "MIGRATIONS",
    "TUNNEL_SESSION_PROTOCOLS",
    "Agent",
    "ConflictError",
    "Credential",
    "NotFoundError",
    "SecretToken",
    "Service",
    "Share",
    "Store",
    "SqliteStore",
    "StoreError",
    "StoreUnavailable",
    "TASK_STATUSES",
    "TaskRecord",
    "Team",
    "Tunnel",
    "TunnelSession",
    "Webhook",
    "default_data_dir",
    "ensure_default_team",
    "hash_token",
    "mask_token",
    "normalize_uuid",
    "open_store",
    "store_location",
    "token_kind",
]


#: URL schemes of the PostgreSQL backend.
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def _sqlite_path(url: str) -> Path:
    """The database file a SQLite ``url`` (``sqlite:///PATH`` or a plain path) names; an
    existing directory, or a path ending in ``/``, means its ``relay.db``."""
    raw = url[len("sqlite://"):] if url.startswith("sqlite://") else url
    if not raw:
        raise StoreError(f"no database path in {url!r} (sqlite:///PATH)")
    path = Path(raw).expanduser()
    if raw.endswith("/") or path.is_dir():
        path = path / DB_FILENAME
    return path


def store_location(url: str | None, data_dir: str | os.PathLike[str]) -> str:
    """Where ``open_store(url, data_dir)`` keeps the state, for messages (a PostgreSQL
    URL without its password)."""
    if url and url.startswith(POSTGRES_SCHEMES):
        from relay.gateway.store.postgres import redact_dsn

        return redact_dsn(url)
    if url:
        return str(_sqlite_path(url))
    return str(Path(data_dir).expanduser() / DB_FILENAME)


async def open_store(url: str | None, data_dir: str | os.PathLike[str] | None = None, *,
                     listen: bool = True, clock: Callable[[], float] = time.time) -> Store:
    """Open the store ``url`` names, creating and migrating its schema:

    * None or empty: SQLite in ``data_dir`` (its ``relay.db``), the default;
    * ``sqlite:///PATH`` or a plain path: that SQLite database file (a directory: its
      ``relay.db``);
    * ``postgresql://USER:PASSWORD@HOST:PORT/DBNAME`` (or ``postgres://``): PostgreSQL,
      on asyncpg (``pip install 'relay[postgres]'``); ``listen``: follow other
      processes' commits (LISTEN/NOTIFY, see :meth:`PostgresStore.generation
      <relay.gateway.store.postgres.PostgresStore.generation>`), which a short-lived
      ``relay admin`` does not need.

    ``clock`` gives the times the store records (tests). Raises :class:`StoreError` with a one-line reason if it cannot.
    """
    if url and url.startswith(POSTGRES_SCHEMES):
        from relay.gateway.store.postgres import PostgresStore

        return await PostgresStore.connect(url, listen=listen, clock=clock)
    if url and "://" in url and not url.startswith("sqlite://"):
        raise StoreError(f"unknown store URL scheme in {url.split('://')[0]!r}: "
                         "use sqlite:///PATH, a path, or postgresql://...")
    if url:
        return SqliteStore.open_file(_sqlite_path(url), clock=clock)
    if data_dir is None:
        raise StoreError("no store URL and no data directory")
    return SqliteStore.open(data_dir, clock=clock)
