"""``relay admin``: teams and credentials in a gateway's store (its data directory, or
the database ``--store`` names), without a running gateway."""
from __future__ import annotations

import asyncio
import datetime as _dt
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar

import click

from relay.cli import data_dir_option, json_option, main, store_option
from relay.gateway.store import (
    CREDENTIAL_KINDS,
    Credential,
    SecretToken,
    Store,
    StoreError,
    Team,
    hash_token,
    normalize_uuid,
    open_store,
)

T = TypeVar("T")

_KIND_HELP = {
    "sk": "team integration key: runtime + management",
    "dk": "runtime only: proxy, invoke, use tunnels",
    "ak": "agent key: connect an agent to this team",
}


@dataclass
class _AdminStore:
    """Where ``relay admin`` finds the state (its group's options)."""

    data_dir: Path
    url: Optional[str]


@main.group()
@data_dir_option
@store_option
@click.pass_context
def admin(ctx: click.Context, data_dir: Path, store_url: Optional[str]) -> None:
    """Manage teams and credentials in a gateway's store (its data directory, or the
    database --store names)."""
    # Opened lazily by the subcommand, so `--help` never touches the store.
    ctx.obj = _AdminStore(data_dir, store_url)


def _with_store(ctx: click.Context, body: Callable[[Store], Awaitable[T]]) -> T:
    """Open the store, run ``body(store)``, close it; a StoreError is a one-line error."""
    where = ctx.find_object(_AdminStore)
    assert where is not None, "the admin group sets the store"

    async def run() -> T:
        try:
            store = await open_store(where.url, where.data_dir, listen=False)
        except StoreError as exc:
            raise click.ClickException(str(exc)) from None
        try:
            return await body(store)
        except StoreError as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            await store.close()

    return asyncio.run(run())


async def _resolve_team(store: Store, team: str) -> Team:
    """A team by UUID, or by name when exactly one team has it."""
    if normalize_uuid(team) is not None:
        found = await store.get_team(team)
        if found is not None:
            return found
    else:
        named = [t for t in await store.list_teams() if t.name == team]
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            raise click.ClickException(
                f"{len(named)} teams are named {team!r}; give the team id instead")
    raise click.ClickException(f"unknown team: {team}")


def _check_kind(kind: str) -> str:
    kind = kind.strip().lower().rstrip("-")
    if kind not in CREDENTIAL_KINDS:
        raise click.ClickException(
            f"bad key kind {kind!r}: must be one of {', '.join(CREDENTIAL_KINDS)}")
    return kind


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds") \
        .replace("+00:00", "Z")


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


@admin.group()
def team() -> None:
    """Create and list teams."""


@team.command("create")
@click.argument("name")
@json_option
@click.pass_context
def team_create(ctx: click.Context, name: str, as_json: bool) -> None:
    """Create team NAME with one sk-, dk- and ak- key, and print the keys once."""
    created = _with_store(ctx, lambda store: store.create_team_with_keys(name))
    assert created is not None
    new_team, keys = created
    if as_json:
        _print_json({"team_id": new_team.id, "name": new_team.name,
                     "keys": {kind: str(key) for kind, key in keys.items()}})
        return
    click.echo(f"Created team {new_team.name!r}  team_id: {new_team.id}")
    _echo_keys(keys)


def _echo_keys(keys: dict[str, SecretToken]) -> None:
    click.echo("Keys (shown only now; store them somewhere safe):")
    for kind, key in keys.items():
        click.echo(f"  {kind}  {key}    # {_KIND_HELP[kind]}")


@team.command("list")
@json_option
@click.pass_context
def team_list(ctx: click.Context, as_json: bool) -> None:
    """List teams."""
    teams = _with_store(ctx, lambda store: store.list_teams())
    if as_json:
        _print_json([{"team_id": t.id, "name": t.name, "created_at": _iso(t.created_at)}
                     for t in teams])
        return
    if not teams:
        click.echo("No teams yet. Create one with: relay admin team create NAME")
    for t in teams:
        click.echo(f"{t.id}  {_iso(t.created_at)}  {t.name}")


@admin.group()
def key() -> None:
    """Create, list and revoke a team's keys."""


_team_option = click.option("--team", "team_ref", required=True, metavar="ID",
                            help="Team id (or its name, if unique).")


@key.command("create")
@_team_option
@click.option("--kind", required=True, metavar="ak|sk|dk",
              help="sk: runtime + management; dk: runtime only; ak: agent.")
@json_option
@click.pass_context
def key_create(ctx: click.Context, team_ref: str, kind: str, as_json: bool) -> None:
    """Create a key for a team and print it once."""
    kind = _check_kind(kind)

    async def create(store: Store) -> tuple[Team, SecretToken]:
        found = await _resolve_team(store, team_ref)
        return found, (await store.create_credential(found.id, kind))[1]

    found, token = _with_store(ctx, create)
    if as_json:
        _print_json({"team_id": found.id, "kind": kind, "key": str(token)})
        return
    click.echo(f"Created {kind} key for team {found.name!r} ({found.id}):")
    _echo_keys({kind: token})


def _credential_json(cred: Credential) -> dict[str, Any]:
    return {"id": cred.id, "kind": cred.kind, "prefix": cred.display,
            "created_at": _iso(cred.created_at), "revoked_at": _iso(cred.revoked_at)}


@key.command("list")
@_team_option
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
@json_option
@click.pass_context
def key_list(ctx: click.Context, team_ref: str, include_revoked: bool, as_json: bool) -> None:
    """List a team's keys (display prefixes only; keys themselves are not stored)."""
    async def listing(store: Store) -> tuple[Team, list[Credential]]:
        found = await _resolve_team(store, team_ref)
        return found, await store.list_credentials(found.id, include_revoked=include_revoked)

    found, creds = _with_store(ctx, listing)
    if as_json:
        _print_json({"team_id": found.id, "keys": [_credential_json(c) for c in creds]})
        return
    for cred in creds:
        state = f"revoked {_iso(cred.revoked_at)}" if cred.revoked else "active"
        click.echo(f"{cred.id}  {cred.kind}  {cred.display:<12}  {_iso(cred.created_at)}  {state}")


@key.command("revoke")
@_team_option
@click.argument("key_ref", metavar="KEY")
@click.option("--redis", "redis_url", envvar="RELAY_REDIS", metavar="URL",
              help="The fleet's Redis: every gateway of the fleet refuses the key at once.")
@json_option
@click.pass_context
def key_revoke(ctx: click.Context, team_ref: str, key_ref: str, redis_url: Optional[str], as_json: bool) -> None:
    """Revoke a team's key. KEY is the key id, its display prefix (sk-AbCdEf), or the key."""
    async def revoke(store: Store) -> tuple[Team, Credential]:
        found = await _resolve_team(store, team_ref)
        cred = await _find_credential(store, found.id, key_ref.strip())
        await store.revoke_credential(found.id, cred.id)
        return found, cred

    found, cred = _with_store(ctx, revoke)
    if redis_url:
        from relay.gateway.fleet import publish_invalidation

        try:
            publish_invalidation(redis_url, "credentials", ids=[cred.id])
        except Exception as exc:  # revoked in the store all the same: gateways poll it too
            click.echo(f"warning: revoked, but cannot tell the fleet through Redis: {exc}", err=True)
    if as_json:
        _print_json({"team_id": found.id, "revoked": cred.id, "prefix": cred.display})
        return
    click.echo(f"Revoked {cred.kind} key {cred.display} ({cred.id})")


async def _find_credential(store: Store, team_id: str, ref: str) -> Credential:
    active = await store.list_credentials(team_id)
    if normalize_uuid(ref) is not None:
        matches = [c for c in active if c.id == normalize_uuid(ref)]
    else:
        # The full key (matched by hash), else the start of a display prefix.
        matches = [c for c in active if c.token_hash == hash_token(ref)]
        prefix = ref.rstrip(".…")
        if not matches and len(prefix) > 3:
            matches = [c for c in active if c.prefix.startswith(prefix)]
    if not matches:
        # Never echo the reference back: it may be a full key.
        raise click.ClickException("no such active key in this team")
    if len(matches) > 1:
        raise click.ClickException(f"{len(matches)} keys match; give the key id instead")
    return matches[0]
