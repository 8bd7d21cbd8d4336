"""``relay tunnels ...``: the Tunnels API (seed 002) from the command line.

::

    export RELAY_GATEWAY=http://127.0.0.1:8080 RELAY_KEY=sk-...   # (+ RELAY_TEAM_ID with a JWT)
    relay tunnels create 127.0.0.1:5432 --agent db-box --name staging-db   # POST   /tunnels
    relay tunnels list                                                    # GET    /tunnels
    relay tunnels get staging-db                                          # GET    /tunnels/{id}
    relay tunnels update staging-db --status paused                       # PATCH  /tunnels/{id}
    relay tunnels delete staging-db                                       # DELETE /tunnels/{id}
    relay tunnels connect staging-db --agent laptop --local-port 15432    # POST   /tunnels/{id}/connect
    relay tunnels bindings staging-db                                     # GET    /tunnels/{id}/bindings
    relay tunnels unbind staging-db --agent laptop                        # DELETE /tunnels/{id}/bindings/{a}
    relay tunnels share web --name demo --expires-in 7d --method GET      # POST   /tunnels/{id}/shares
    relay tunnels shares web                                              # GET    /tunnels/{id}/shares
    relay tunnels unshare web SHARE_ID                                    # DELETE /tunnels/{id}/shares/{s}

The fields are the API's (``--name``, ``--protocol auto|tcp|udp|http|https``,
``--public``, ``--hub-port``, ``--status``, ``--metadata``, ``--expires-in``, ``--method``,
``--rate-limit`` ...). TUNNEL is a tunnel id or the name of exactly one of the team's
tunnels; AGENT an agent id or a unique agent name. ``create`` corresponds to seed 002's
``connect expose``, ``connect`` to ``connect reach``, ``share`` to ``connect share``.

Output: a human table or a few labelled lines by default, one JSON document with
``--json`` (the API's answer as is). A failure is one ``Error:`` line with the gateway's
message and its status and code, and exit status 1: ``connect`` fails that way when the
agent cannot listen (``502 bind_failed``, e.g. the port is taken) or does not answer
(``504 bind_timeout``). The client and its options (``--gateway``, ``--key``,
``--team``, ``--ca-cert``, ``--json``) are relay.cli.tunnel's (``with_client``).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Optional

import click

from relay.cli import main
from relay.cli.tunnel import ApiClient, ApiError, _print_json, _quote, with_client

__all__ = ["tunnels"]

PROTOCOLS = ("auto", "tcp", "udp", "http", "https")
EXPIRY = ("1h", "24h", "7d", "30d", "never")
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

Column = tuple[str, Callable[[dict[str, Any]], Any]]

#: TUNNEL: a tunnel id, or the name of exactly one of the team's tunnels (:func:`_tunnel`).
tunnel_argument = click.argument("tunnel_ref", metavar="TUNNEL")


def _show_listing(found: dict[str, Any], key: str, columns: Sequence[Column], none: str, as_json: bool) -> None:
    """A list answer (``found[key]``): the API's JSON, or a table (``none`` when empty)."""
    if as_json:
        _print_json(found)
        return
    rows = found.get(key, [])
    click.echo(table(rows, columns) if rows else none)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Plain text columns, left-aligned, two spaces apart (no dependency needed)."""
    cells = [[h for h, _ in columns]] + [["-" if (v := get(row)) is None or v == "" else str(v)
                                          for _, get in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in cells)


def _emit(answer: Any, as_json: bool, show: Callable[[Any], None]) -> None:
    """An answer: as JSON with ``--json``, else in words (``show``)."""
    if as_json:
        _print_json(answer)
    else:
        show(answer)


def _tunnel(api: ApiClient, ref: str) -> dict[str, Any]:
    """A tunnel by id, else by name when exactly one of the team's tunnels has it."""
    found = api.call("GET", "/api/v1/tunnels").get("tunnels", [])
    for item in found:
        if item.get("id") == ref:
            return dict(item)
    named = [t for t in found if t.get("name") == ref]
    if len(named) == 1:
        return dict(named[0])
    if len(named) > 1:
        raise ApiError(f"{len(named)} tunnels are named {ref!r}; give the tunnel id")
    raise ApiError(f"no tunnel {ref!r} in this team (by id or name)")


def _path(tunnel: dict[str, Any], rest: str = "") -> str:
    """The API path of ``tunnel`` (as :func:`_tunnel` found it), with ``rest`` after it."""
    return f"/api/v1/tunnels/{_quote(tunnel['id'])}{rest}"


_TUNNEL_COLUMNS: list[Column] = [
    ("ID", lambda t: t.get("id")), ("NAME", lambda t: t.get("name")), ("PROTO", lambda t: t.get("protocol")),
    ("TARGET", lambda t: t.get("target")), ("HUB", lambda t: _hub(t)), ("STATUS", lambda t: t.get("status")),
    ("PUBLIC", lambda t: "yes" if t.get("public") else "no"), ("CONNS", lambda t: t.get("connections")),
]


def _hub(tunnel: dict[str, Any]) -> Optional[str]:
    if not tunnel.get("hub_port"):
        return None
    return f"{tunnel.get('hub_host') or ''}:{tunnel['hub_port']}"


def _show_tunnel(tunnel: dict[str, Any], verb: str = "") -> None:
    if verb:
        click.echo(f"{verb} tunnel {tunnel['name']} ({tunnel['id']})")
    fields = [("protocol", tunnel.get("protocol")), ("target", tunnel.get("target")),
              ("agent", tunnel.get("agent_id")), ("hub", _hub(tunnel)), ("status", tunnel.get("status")),
              ("error", tunnel.get("error")), ("public", "yes" if tunnel.get("public") else "no"),
              ("public_url", tunnel.get("public_url")), ("connections", tunnel.get("connections")),
              ("metadata", json.dumps(tunnel["metadata"]) if tunnel.get("metadata") else None),
              ("created_at", tunnel.get("created_at"))]
    if not verb:
        fields = [("id", tunnel.get("id")), ("name", tunnel.get("name")), *fields]
    for label, value in fields:
        if value is not None and value != "":
            click.echo(f"  {label:12} {value}")


@main.group()
def tunnels() -> None:
    """The Tunnels API: named tunnels, connect (bind on another agent), share links."""


@tunnels.command("create")
@click.argument("target")
@click.option("--agent", "agent_ref", required=True, metavar="AGENT",
              help="The agent that reaches TARGET (id or unique name).")
@click.option("--name", help="1-100 characters (default: generated, e.g. swift-otter-3fa9).")
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="auto", show_default=True,
              help="auto picks by the target port.")
@click.option("--public", is_flag=True, help="Hub port on the gateway's public hub host (and, for "
                                             "http/https, a public share link).")
@click.option("--hub-port", type=click.IntRange(1024, 65535), help="A specific hub port (default: any free one).")
@with_client
def tunnels_create(target: str, agent_ref: str, name: Optional[str], protocol: str, public: bool,
                   hub_port: Optional[int], api: ApiClient, as_json: bool) -> None:
    """Expose TARGET (HOST:PORT as the agent sees it) through AGENT as a named tunnel."""
    agent = api.resolve(agent_ref)
    body: dict[str, Any] = {"target": target, "agent_id": agent["agent_id"], "protocol": protocol,
                            "public": public}
    if name is not None:
        body["name"] = name
    if hub_port is not None:
        body["hub_port"] = hub_port
    _emit(api.call("POST", "/api/v1/tunnels", body), as_json, lambda created: _show_tunnel(created, "Created"))


@tunnels.command("list")
@with_client
def tunnels_list(api: ApiClient, as_json: bool) -> None:
    """List the team's tunnels."""
    found = api.call("GET", "/api/v1/tunnels")
    _show_listing(found, "tunnels", _TUNNEL_COLUMNS, "No tunnels.", as_json)


@tunnels.command("get")
@tunnel_argument
@with_client
def tunnels_get(tunnel_ref: str, api: ApiClient, as_json: bool) -> None:
    """Show one tunnel (id or unique name)."""
    _emit(api.call("GET", _path(_tunnel(api, tunnel_ref))), as_json, _show_tunnel)


@tunnels.command("update")
@tunnel_argument
@click.option("--name", help="New name (1-100 characters).")
@click.option("--status", type=click.Choice(["active", "paused"]), help="paused closes the hub port.")
@click.option("--metadata", metavar="JSON", help="Custom metadata: a JSON object (replaces the old one).")
@with_client
def tunnels_update(tunnel_ref: str, name: Optional[str], status: Optional[str], metadata: Optional[str],
                   api: ApiClient, as_json: bool) -> None:
    """Change a tunnel's name, status or metadata."""
    body: dict[str, Any] = {}
    if name is not None:
        body["name"] = name
    if status is not None:
        body["status"] = status
    if metadata is not None:
        try:
            body["metadata"] = json.loads(metadata)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--metadata") from None
    if not body:
        raise click.UsageError("nothing to update: give --name, --status or --metadata")
    _emit(api.call("PATCH", _path(_tunnel(api, tunnel_ref)), body), as_json,
          lambda updated: _show_tunnel(updated, "Updated"))


@tunnels.command("delete")
@tunnel_argument
@with_client
def tunnels_delete(tunnel_ref: str, api: ApiClient, as_json: bool) -> None:
    """Delete a tunnel (its shares and bindings go with it)."""
    found = _tunnel(api, tunnel_ref)
    api.call("DELETE", _path(found))
    _emit({"deleted": found["id"]}, as_json, lambda _: click.echo(f"Deleted tunnel {found['name']} ({found['id']})"))


@tunnels.command("connect")
@tunnel_argument
@click.option("--agent", "agent_ref", required=True, metavar="AGENT",
              help="The agent that should listen locally (id or unique name; must be online).")
@click.option("--local-port", type=click.IntRange(1, 65535),
              help="Port to listen on at 127.0.0.1 of AGENT's machine (default: the target port).")
@with_client
def tunnels_connect(tunnel_ref: str, agent_ref: str, local_port: Optional[int], api: ApiClient, as_json: bool) -> None:
    """Make AGENT listen on 127.0.0.1:--local-port for TUNNEL; fails (exit 1) if it cannot."""
    found = _tunnel(api, tunnel_ref)
    agent = api.resolve(agent_ref)
    body: dict[str, Any] = {"agent_id": agent["agent_id"]}
    if local_port is not None:
        body["local_port"] = local_port

    def show(connection: dict[str, Any]) -> None:
        click.echo(f"Connected tunnel {found['name']} on {agent.get('name')}: "
                   f"{connection['local_host']}:{connection['local_port']}")
        click.echo(f"  connection  {connection['connection_string']}")
        click.echo(f"  status      {connection.get('tunnel_status')}")

    _emit(api.call("POST", _path(found, "/connect"), body), as_json, show)


_BINDING_COLUMNS: list[Column] = [
    ("AGENT", lambda b: b.get("agent_id")), ("LOCAL", lambda b: f"{b.get('local_host')}:{b.get('local_port')}"),
    ("ONLINE", lambda b: "yes" if b.get("agent_online") else "no"),
    ("CONNECTION", lambda b: b.get("connection_string")), ("CREATED", lambda b: b.get("created_at")),
]


@tunnels.command("bindings")
@tunnel_argument
@with_client
def tunnels_bindings(tunnel_ref: str, api: ApiClient, as_json: bool) -> None:
    """List the agents that listen locally for TUNNEL (made by connect)."""
    found = api.call("GET", _path(_tunnel(api, tunnel_ref), "/bindings"))
    _show_listing(found, "bindings", _BINDING_COLUMNS, "No bindings.", as_json)


@tunnels.command("unbind")
@tunnel_argument
@click.option("--agent", "agent_ref", required=True, metavar="AGENT", help="The agent to stop listening.")
@with_client
def tunnels_unbind(tunnel_ref: str, agent_ref: str, api: ApiClient, as_json: bool) -> None:
    """Remove AGENT's binding of TUNNEL: it stops listening and is not told again."""
    found = _tunnel(api, tunnel_ref)
    agent = api.resolve(agent_ref)
    api.call("DELETE", _path(found, f"/bindings/{_quote(agent['agent_id'])}"))
    _emit({"tunnel_id": found["id"], "unbound": agent["agent_id"]}, as_json,
          lambda _: click.echo(f"Unbound tunnel {found['name']} from {agent.get('name')} ({agent['agent_id']})"))


@tunnels.command("share")
@tunnel_argument
@click.option("--name", required=True, help="Share name (1-100 characters).")
@click.option("--description", help="At most 500 characters.")
@click.option("--expires-in", type=click.Choice(EXPIRY), default="24h", show_default=True)
@click.option("--method", "methods", multiple=True, type=click.Choice(METHODS, case_sensitive=False),
              help="An HTTP method to allow (repeat; default: all).")
@click.option("--rate-limit", type=click.IntRange(1, 1000), help="Requests per minute (default: no limit).")
@with_client
def tunnels_share(tunnel_ref: str, name: str, description: Optional[str], expires_in: str,
                  methods: tuple[str, ...], rate_limit: Optional[int], api: ApiClient, as_json: bool) -> None:
    """Create a share link of an http or https TUNNEL; its shareUrl is shown only now."""
    body: dict[str, Any] = {"name": name, "expires_in": expires_in}
    if description is not None:
        body["description"] = description
    if methods:
        body["allowed_methods"] = [m.upper() for m in methods]
    if rate_limit is not None:
        body["rate_limit"] = rate_limit
    _emit(api.call("POST", _path(_tunnel(api, tunnel_ref), "/shares"), body), as_json, _show_share)


def _show_share(share: dict[str, Any]) -> None:
    click.echo(f"Created share {share['name']} ({share['id']})")
    click.echo(f"  shareUrl     {share['shareUrl']}    (shown only now: send this link)")
    click.echo(f"  expires_at   {share.get('expires_at') or 'never'}")
    if share.get("allowed_methods"):
        click.echo(f"  methods      {', '.join(share['allowed_methods'])}")
    if share.get("rate_limit"):
        click.echo(f"  rate_limit   {share['rate_limit']}/min")


_SHARE_COLUMNS: list[Column] = [
    ("ID", lambda s: s.get("id")), ("NAME", lambda s: s.get("name")),
    ("EXPIRES", lambda s: ("expired " if s.get("expired") else "") + (s.get("expires_at") or "never")),
    ("METHODS", lambda s: ",".join(s["allowed_methods"]) if s.get("allowed_methods") else "all"),
    ("RATE", lambda s: f"{s['rate_limit']}/min" if s.get("rate_limit") else None),
    ("TOKEN", lambda s: (s.get("token_prefix") or "") + "…"),
]


@tunnels.command("shares")
@tunnel_argument
@with_client
def tunnels_shares(tunnel_ref: str, api: ApiClient, as_json: bool) -> None:
    """List TUNNEL's share links (their URLs were shown once, at creation)."""
    found = api.call("GET", _path(_tunnel(api, tunnel_ref), "/shares"))
    _show_listing(found, "shares", _SHARE_COLUMNS, "No shares.", as_json)


@tunnels.command("unshare")
@tunnel_argument
@click.argument("share_id")
@with_client
def tunnels_unshare(tunnel_ref: str, share_id: str, api: ApiClient, as_json: bool) -> None:
    """Delete a share link: it stops working at once."""
    found = _tunnel(api, tunnel_ref)
    api.call("DELETE", _path(found, f"/shares/{_quote(share_id)}"))
    _emit({"tunnel_id": found["id"], "deleted": share_id}, as_json,
          lambda _: click.echo(f"Deleted share {share_id} of tunnel {found['name']}"))
