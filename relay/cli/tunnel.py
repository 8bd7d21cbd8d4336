"""``relay tunnel open|list|close``: a client of the gateway's control API.

::

    export RELAY_GATEWAY=http://127.0.0.1:8080 RELAY_KEY=sk-...
    relay tunnel open box1 --port 22 --protocol tcp   # POST /api/v1/agents/{id}/tunnel
    relay tunnel list [box1]                          # GET  /api/v1/agents[/{id}]
    relay tunnel close box1 [--session ID]            # DELETE /api/v1/agents/{id}/tunnel

AGENT is an agent id or the name of exactly one agent of the team. A small urllib client
(stdlib only) with timeouts; ``--ca-cert`` trusts a private CA for an https gateway;
``--team`` (``RELAY_TEAM_ID``) sends ``X-Team-ID``, which a user JWT needs (a team key
carries its team). The Tunnels API (seed 002: named tunnels, connect, shares) is ``relay
tunnels`` (relay.cli.tunnels), the plural as in its path ``/api/v1/tunnels``; these
singular commands are the agents' tunnel sessions of ``/api/v1/agents/{id}/tunnel``.
Errors are one line on stderr (the gateway's own JSON error message) and a non-zero exit;
the key is sent in the Authorization header and never printed.
"""
from __future__ import annotations

import functools
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import click

from relay.cli import json_option, main

__all__ = ["ApiClient", "ApiError", "tunnel", "with_client"]

#: Seconds an API call may take (connect + answer); the gateway answers in milliseconds.
API_TIMEOUT = 15.0


class ApiError(click.ClickException):
    """A failed API call, printed by click as one ``Error:`` line."""


@dataclass
class ApiClient:
    """Bearer-authenticated JSON calls to one gateway."""

    base_url: str
    key: str
    ca_cert: Optional[Path] = None
    timeout: float = API_TIMEOUT
    #: Sent as X-Team-ID (user JWTs need it; team keys ignore it).
    team_id: Optional[str] = None

    def __post_init__(self) -> None:
        url = self.base_url.strip().rstrip("/")
        if "://" not in url:
            url = "http://" + url
        for ws, http in (("ws://", "http://"), ("wss://", "https://")):
            if url.startswith(ws):  # an agent's ws(s):// gateway URL names the same server
                url = http + url[len(ws):]
        split = urllib.parse.urlsplit(url)
        if split.scheme not in ("http", "https") or not split.hostname:
            raise click.BadParameter(f"expected http(s)://HOST[:PORT], got {self.base_url!r}",
                                     param_hint="--gateway")
        self.base_url = url
        self._context = ssl.create_default_context(cafile=str(self.ca_cert)) \
            if self.ca_cert is not None else None

    def __repr__(self) -> str:  # never show the key
        return f"ApiClient({self.base_url!r})"

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One request; returns the decoded JSON answer or raises ApiError."""
        headers = {"Authorization": f"Bearer {self.key}"}
        if self.team_id:
            headers["X-Team-ID"] = self.team_id
        return self.call_url(method, self.base_url + path, body, headers)

    def call_url(self, method: str, url: str, body: Any = None, headers: Optional[dict[str, str]] = None) -> Any:
        """One request to ``url`` (e.g. a tunnel's admin endpoint) with ``headers`` and no
        key unless they carry it; the decoded JSON answer, or ApiError."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json", **(headers or {})}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self._context) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise ApiError(_error_message(exc)) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            text = getattr(reason, "strerror", None) or str(reason)
            raise ApiError(f"cannot reach the gateway at {self.base_url}: {text}") from None
        except (TimeoutError, OSError) as exc:
            raise ApiError(f"cannot reach the gateway at {self.base_url}: {exc or 'timed out'}") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise ApiError(f"the gateway at {self.base_url} answered with something that is not JSON") from None

    # ------------------------------------------------------------------ API

    def agents(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/api/v1/agents").get("agents", []))

    def agent(self, agent_id: str) -> dict[str, Any]:
        return self.call("GET", f"/api/v1/agents/{_quote(agent_id)}")

    def resolve(self, ref: str) -> dict[str, Any]:
        """An agent by id, else by name when exactly one agent of the team has it."""
        agents = self.agents()
        for agent in agents:
            if agent.get("agent_id") == ref:
                return agent
        named = [a for a in agents if a.get("name") == ref]
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            ids = ", ".join(str(a.get("agent_id")) for a in named)
            raise ApiError(f"{len(named)} agents are named {ref!r} ({ids}); give the agent id")
        raise ApiError(f"no agent {ref!r} in this team (by id or name)")


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The gateway's ``{"error": {"code", "message"}}`` as one line, with the status."""
    try:
        body = json.loads(exc.read() or b"null")
        error = body["error"]
        return f"{error['message']} (HTTP {exc.code} {error['code']})"
    except Exception:
        return f"the gateway answered HTTP {exc.code} {exc.reason}"


# --------------------------------------------------------------------------- commands


def _client_options(func: Any) -> Any:
    """The options every API command takes: ``--gateway``, ``--key``, ``--ca-cert``,
    ``--team`` and ``--json`` (their values reach ``func`` as keyword arguments)."""
    func = click.option("--team", "team_id", envvar="RELAY_TEAM_ID", metavar="UUID", show_envvar=True,
                        help="Team to act in (sent as X-Team-ID): needed with a user JWT.")(func)
    func = click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                        envvar="RELAY_CA_CERT", show_envvar=True,
                        help="Trust this CA (PEM) for an https gateway.")(func)
    func = click.option("--key", required=True, envvar="RELAY_KEY", metavar="sk-...", show_envvar=True,
                        help="Team key (sk-, dk-) or user JWT. Prefer the environment variable.")(func)
    func = click.option("--gateway", "gateway_url", required=True, envvar="RELAY_GATEWAY", metavar="URL",
                        show_envvar=True, help="Gateway base URL, e.g. http://127.0.0.1:8080.")(func)
    return json_option(func)


def with_client(func: Callable[..., None]) -> Callable[..., None]:
    """A command of the control API: :func:`_client_options`, with ``--gateway``,
    ``--key``, ``--ca-cert`` and ``--team`` made into one ``api`` argument (an
    :class:`ApiClient`); ``as_json`` (``--json``) and the command's own options pass
    through. Apply it below the command's own options."""
    @functools.wraps(func)
    def command(*args: Any, gateway_url: str, key: str, ca_cert: Optional[Path], team_id: Optional[str],
                **kwargs: Any) -> None:
        func(*args, api=ApiClient(gateway_url, key, ca_cert, team_id=team_id), **kwargs)

    return _client_options(command)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


@main.group()
def tunnel() -> None:
    """Open, list and close agents' tunnel sessions (the Tunnels API: relay tunnels)."""


@tunnel.command("open")
@click.argument("agent_ref", metavar="AGENT")
@click.option("--port", "target_port", type=click.IntRange(1, 65535), required=True,
              help="Port of the service on the agent's machine.")
@click.option("--protocol", type=click.Choice(["http", "tcp"]), default="http", show_default=True,
              help="http: a reverse-proxy URL; tcp: a raw hub port and a ws:// relay URL.")
@click.option("--host-header", metavar="HOST[:PORT]",
              help="http: send the target this Host instead of the client's (for apps that check it).")
@click.option("--ttl", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Close the session this long after it opens (0: never; default: the gateway's).")
@click.option("--idle-timeout", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Close it after this long with nothing through it (0: never; default: the gateway's).")
@with_client
def tunnel_open(agent_ref: str, target_port: int, protocol: str, api: ApiClient, as_json: bool,
                host_header: Optional[str] = None, ttl: Optional[float] = None,
                idle_timeout: Optional[float] = None) -> None:
    """Open a tunnel to port --port on AGENT (an agent id or a unique name)."""
    agent = api.resolve(agent_ref)
    request: dict[str, Any] = {"target_port": target_port, "tunnel_protocol": protocol}
    if host_header:
        request["host_header"] = host_header
    if ttl is not None:
        request["ttl"] = ttl
    if idle_timeout is not None:
        request["idle_timeout"] = idle_timeout
    opened = api.call("POST", f"/api/v1/agents/{_quote(agent['agent_id'])}/tunnel", request)
    if as_json:
        _print_json({"agent_id": agent["agent_id"], "agent_name": agent.get("name"), **opened})
        return
    click.echo(f"Opened {opened['tunnel_protocol']} tunnel {opened['session_id']} "
               f"to port {target_port} on {agent.get('name')} ({agent['agent_id']})")
    click.echo(f"  tunnel_url   {opened['tunnel_url']}")
    if opened.get("tunnel_host_url"):
        click.echo(f"  host url     {opened['tunnel_host_url']}    (the tunnel's own host: --tunnel-domain)")
    if opened.get("hub_port") is not None:
        host = urllib.parse.urlsplit(api.base_url).hostname
        click.echo(f"  hub port     {host}:{opened['hub_port']}    (every connection is one stream)")
    if opened.get("terminal_url"):
        click.echo(f"  terminal     {opened['terminal_url']}    (the agent's shell: sign in with the admin_token)")
    if opened.get("expires_at"):
        click.echo(f"  expires_at   {opened['expires_at']}")
    if opened.get("idle_timeout"):
        click.echo(f"  idle_timeout {opened['idle_timeout']:g}s    (closes after this long unused)")
    click.echo(f"  admin_token  {opened['admin_token']}    (shown only now)")


@tunnel.command("list")
@click.argument("agent_ref", metavar="[AGENT]", required=False)
@with_client
def tunnel_list(agent_ref: Optional[str], api: ApiClient, as_json: bool) -> None:
    """List open tunnel sessions of AGENT, or of every agent of the team."""
    agents = [api.resolve(agent_ref)] if agent_ref else api.agents()
    rows: list[dict[str, Any]] = []
    for agent in agents:
        detail = api.agent(agent["agent_id"])
        for session in detail.get("tunnels", []):
            rows.append({**session, "agent_id": agent["agent_id"], "agent_name": agent.get("name")})
    if as_json:
        _print_json({"tunnels": rows})
        return
    if not rows:
        click.echo("No open tunnels.")
        return
    click.echo(f"{'SESSION':36}  {'AGENT':16}  {'PROTO':5}  {'TARGET':6}  {'HUB':5}  {'CONNS':5}  CREATED")
    for row in rows:
        click.echo(f"{row['session_id']:36}  {str(row['agent_name'])[:16]:16}  {row['tunnel_protocol']:5}  "
                   f"{row['target_port']:<6}  {row.get('hub_port') or '-':<5}  "
                   f"{row.get('connections', 0):<5}  {row.get('created_at', '')}")


@tunnel.command("close")
@click.argument("agent_ref", metavar="AGENT")
@click.option("--session", "session_id", metavar="ID", help="Close only this session (default: all of AGENT's).")
@with_client
def tunnel_close(agent_ref: str, session_id: Optional[str], api: ApiClient, as_json: bool) -> None:
    """Close AGENT's tunnel sessions (one with --session)."""
    agent = api.resolve(agent_ref)
    path = f"/api/v1/agents/{_quote(agent['agent_id'])}/tunnel"
    if session_id:
        path += "?session_id=" + _quote(session_id)
    closed = api.call("DELETE", path).get("closed", [])
    if as_json:
        _print_json({"agent_id": agent["agent_id"], "closed": closed})
        return
    if not closed:
        click.echo(f"No open tunnels on {agent.get('name')} ({agent['agent_id']}).")
    for sid in closed:
        click.echo(f"Closed {sid}")
