"""The gateway's persistent state: teams, hashed credentials, agents seen, tunnel
sessions, tunnels, shares, webhooks and their pending deliveries, services.

:mod:`relay.gateway.store.base` holds what every backend shares (the rows, the errors,
the handling of secrets); :mod:`relay.gateway.store.sqlite` is the embedded SQLite
backend in the data directory. Import the names from here.
"""
from __future__ import annotations

from relay.gateway.store.base import (
    AGENT_STATUSES,
    CREDENTIAL_KINDS,
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
    default_data_dir,
    ensure_default_team,
    hash_token,
    mask_token,
    normalize_uuid,
    token_kind,
)
from relay.gateway.store.sqlite import DB_FILENAME, MIGRATIONS, Store

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
    "StoreError",
    "Team",
    "Tunnel",
    "TunnelSession",
    "Webhook",
    "default_data_dir",
    "ensure_default_team",
    "hash_token",
    "mask_token",
    "normalize_uuid",
    "token_kind",
]
