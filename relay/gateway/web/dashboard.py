"""The web dashboard: one server-rendered page per team at ``/dashboard/``.

``GET /`` redirects there. The page shows the signed-in team's agents (status, labels),
its open tunnel sessions with their live counters, its named tunnels and their shares,
its services with their health, and the last requests proxied for it
(relay.gateway.http.traffic); it reloads itself every few seconds. No script, no external
resource.

Signing in: ``Authorization: Bearer sk-/dk-/JWT`` works as on the API (with ``X-Team-ID``
for a JWT); a browser posts the key to ``/dashboard/login`` (a form, plus the team id for
a JWT) and gets a session cookie instead. The cookie holds no key: it is the team, the
credential id (or the JWT's subject and expiry) and an expiry, signed with HMAC-SHA256
under a key made at gateway start (a restart signs everybody out). It is ``HttpOnly``,
``SameSite=Strict`` and ``Path=/dashboard``: never sent to a tunnel URL, so an app behind
a tunnel never sees it. A revoked key's session ends at its next page load.

Secrets are never rendered: no keys, no access or admin tokens, no tunnel URLs (they
carry the token); sessions are named by their ids, shares by their token's display
prefix.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import secrets
import time
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import parse_qs

from relay.gateway.auth import AuthError, Principal
from relay.gateway.http.server import Request, Response, Router

if TYPE_CHECKING:
    from relay.gateway.app import Gateway

__all__ = ["COOKIE", "Dashboard", "SESSION_SECONDS"]

PATH = "/dashboard/"
COOKIE = "relay_dashboard"
#: Longest a browser session lasts (a JWT's own expiry ends it sooner).
SESSION_SECONDS = 12 * 3600
#: The page reloads itself this often (seconds).
REFRESH = 5

_STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.3em}
h2{font-size:1.05em;margin-top:1.6em}table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:.3em .5em;text-align:left;font-variant-numeric:tabular-nums}
th{background:#f4f4f4}.ok{color:#17702a}.bad{color:#b00020}.muted{color:#777}
form.inline{display:inline}"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _page(title: str, body: str, refresh: bool = False) -> Response:
    head = f'<meta http-equiv="refresh" content="{REFRESH}">' if refresh else ""
    text = (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>{head}"
            f"<style>{_STYLE}</style></head><body>{body}</body></html>")
    return Response(200, text.encode(), content_type="text/html; charset=utf-8",
                    headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                             "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                                        "form-action 'self'; frame-ancestors 'none'"})


def _table(headers: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f"<p class='muted'>{_e(empty)}</p>"
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _when(ts: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


class Dashboard:
    """The dashboard routes of one gateway."""

    def __init__(self, gateway: "Gateway") -> None:
        self.gw = gateway
        self._key = secrets.token_bytes(32)  # signs session cookies; per process

    def register(self, router: Router) -> None:
        router.add("GET", "/", self._root)
        router.add("GET", PATH, self._show)
        router.add("POST", PATH + "login", self._login)
        router.add("POST", PATH + "logout", self._logout)

    # -- sessions

    def _sign(self, payload: bytes) -> str:
        return base64.urlsafe_b64encode(hmac.new(self._key, payload, hashlib.sha256).digest()).rstrip(b"=").decode()

    def _cookie_for(self, principal: Principal) -> tuple[str, int]:
        expires = int(time.time()) + SESSION_SECONDS
        exp = principal.claims.get("exp") if principal.kind == "user" else None
        if isinstance(exp, (int, float)):
            expires = min(expires, int(exp))
        body = {"t": principal.team_id, "k": principal.kind, "s": principal.subject,
                "c": principal.credential_id, "e": expires}
        payload = base64.urlsafe_b64encode(json.dumps(body, separators=(",", ":")).encode()).rstrip(b"=")
        return f"{payload.decode()}.{self._sign(payload)}", expires - int(time.time())

    async def _from_cookie(self, request: Request) -> Optional[Principal]:
        """The principal of a valid session cookie, else None."""
        raw = request.header("cookie") or ""
        for part in raw.split(";"):
            name, _, value = part.strip().partition("=")
            if name != COOKIE or "." not in value:
                continue
            payload, _, signature = value.partition(".")
            if not hmac.compare_digest(signature, self._sign(payload.encode())):
                continue
            try:
                body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
                team_id, kind, subject, cred, expires = body["t"], body["k"], body["s"], body["c"], body["e"]
            except (ValueError, KeyError, TypeError):
                continue
            if expires < time.time():
                continue
            if cred is not None:  # a key: still active?
                found = await self.gw.store.get_credential(team_id, cred)
                if found is None or found.revoked:
                    continue
            return Principal(kind, team_id, subject, cred)
        return None

    async def _principal(self, request: Request) -> Optional[Principal]:
        if request.header("authorization"):
            return (await self.gw.auth.authenticate(request.header("authorization"),
                                                    request.header("x-team-id"))).require_runtime()
        return await self._from_cookie(request)

    # -- routes

    async def _root(self, request: Request) -> Response:
        return Response(303, b"", content_type="text/plain", headers={"Location": PATH})

    async def _login(self, request: Request) -> Response:
        form = parse_qs(request.body.decode("utf-8", "replace"))
        key = (form.get("key") or [""])[-1].strip()
        team = (form.get("team_id") or [""])[-1].strip() or None
        try:
            principal = (await self.gw.auth.authenticate(f"Bearer {key}", team)).require_runtime()
        except AuthError as exc:
            return self._login_page(f"Not signed in: {exc.message}", status=401)
        cookie, max_age = self._cookie_for(principal)
        secure = "; Secure" if self.gw.url.startswith("https://") else ""
        return Response(303, b"", content_type="text/plain", headers={
            "Location": PATH,
            "Set-Cookie": f"{COOKIE}={cookie}; Max-Age={max_age}; Path=/dashboard; HttpOnly; SameSite=Strict{secure}"})

    async def _logout(self, request: Request) -> Response:
        return Response(303, b"", content_type="text/plain", headers={
            "Location": PATH, "Set-Cookie": f"{COOKIE}=; Max-Age=0; Path=/dashboard; HttpOnly; SameSite=Strict"})

    def _login_page(self, message: str = "", status: int = 200) -> Response:
        note = f"<p class='bad'>{_e(message)}</p>" if message else ""
        response = _page("relay: sign in", f"""<h1>relay gateway</h1>{note}
<form method="post" action="{PATH}login">
<p><label>Team key (sk- or dk-) or user JWT<br><input id="key" name="key" type="password" size="60"
 autocomplete="off"></label></p>
<p><label>Team id (with a JWT only)<br><input id="team_id" name="team_id" size="40"></label></p>
<p><button id="signin" type="submit">Sign in</button></p></form>""")
        response.status = status
        return response

    async def _show(self, request: Request) -> Response:
        try:
            principal = await self._principal(request)
        except AuthError as exc:
            return self._login_page(exc.message, status=exc.status)
        if principal is None:
            return self._login_page()
        return _page("relay dashboard", await self.render(principal.team_id, principal), refresh=True)

    # -- the page

    async def render(self, team_id: str, principal: Principal) -> str:
        """The body of the team's page."""
        gw = self.gw
        team = await gw.store.get_team(team_id)
        parts = [f"<h1>relay: team {_e(team.name if team else team_id)}</h1>",
                 f"<p class='muted'>team {_e(team_id)} · signed in with a {_e(principal.kind)} "
                 f"{'key' if principal.kind != 'user' else 'JWT'} · refreshes every {REFRESH}s "
                 f"<form class='inline' method='post' action='{PATH}logout'><button>Sign out</button></form></p>"]

        agents = await gw.store.list_agents(team_id)
        rows, names = [], {}
        for agent in agents:
            info = gw.registry.describe(agent)
            names[agent.id] = agent.name
            online = info.get("online")
            rows.append([_e(agent.name), f"<span class='{'ok' if online else 'bad'}'>{_e(info.get('status'))}</span>",
                         _e(", ".join(info.get("labels") or [])), _e(info.get("version")), _e(agent.id)])
        parts += ["<h2>Agents</h2>", _table(["name", "status", "labels", "version", "id"], rows, "No agents yet.")]

        rows = []
        tunnels = gw.tunnels
        for agent in agents:
            for session in await tunnels.sessions(team_id, agent.id) if tunnels is not None else []:
                sid = session["session_id"]
                stats = gw.http_tunnels._stats.get(sid)
                live = stats.as_dict() if stats is not None else {}
                if session["tunnel_protocol"] == "tcp":
                    traffic = (f"{session['active_connections']} open, {session['connections']} total "
                               f"(hub port {_e(session['hub_port'])})")
                else:
                    traffic = (f"{live.get('requests', 0)} requests, {live.get('active_requests', 0)} active, "
                               f"{_bytes(live.get('bytes_in', 0))} in, {_bytes(live.get('bytes_out', 0))} out")
                rows.append([_e(sid), _e(names.get(agent.id)), _e(session["tunnel_protocol"]),
                             _e(session["target_port"]), traffic, _e(session["created_at"])])
        parts += ["<h2>Tunnel sessions</h2>",
                  _table(["session", "agent", "protocol", "target port", "traffic", "opened"], rows,
                         "No open tunnel sessions.")]

        rows = []
        for tunnel in await gw.store.list_tunnels(team_id):
            info = gw.tunnels_api.describe(tunnel)
            hub = tunnels.hub(tunnel.id) if tunnels is not None else None
            shares = await gw.store.list_shares(team_id, tunnel.id)
            share_text = ", ".join(f"{_e(s.name)} ({_e(s.token_prefix)}…)" for s in shares) or "-"
            status_class = "ok" if info["status"] == "active" else "bad"
            rows.append([_e(tunnel.name), _e(names.get(tunnel.agent_id, tunnel.agent_id)), _e(info["target"]),
                         f"<span class='{status_class}'>{_e(info['status'])}</span>",
                         _e(f"{len(hub.splices)} open, {hub.connections} total" if hub else "-"), share_text])
        parts += ["<h2>Named tunnels</h2>",
                  _table(["name", "agent", "target", "status", "connections", "shares"], rows, "No named tunnels.")]

        rows = []
        await gw.services.sync()
        for record in await gw.store.list_services(team_id):
            info = await gw.services.describe(record, gw.services._state(record))
            healthy = info["instances_healthy"]
            rows.append([_e(record.slug), _e(info["service_type"]),
                         f"<span class='{'ok' if info['service_status'] == 'running' else 'bad'}'>"
                         f"{_e(info['service_status'])}</span>",
                         _e(f"{healthy} healthy, {info['instances_online']} online of {len(info['instances'])}")])
        parts += ["<h2>Services</h2>", _table(["slug", "type", "status", "instances"], rows, "No services.")]

        rows = []
        for entry in gw.traffic.recent(team_id):
            where = f"tunnel {entry['tunnel']}" if "tunnel" in entry else f"service {entry.get('service')}"
            status = entry["status"]
            rows.append([_e(_when(entry["time"])), _e(where), _e(entry["method"]), _e(entry["path"]),
                         f"<span class='{'bad' if not status or status >= 500 else 'ok'}'>{_e(status or 'cut')}</span>",
                         _e(f"{entry['duration_ms']:.1f} ms"), _e(_bytes(entry["bytes_in"])),
                         _e(_bytes(entry["bytes_out"]))])
        parts += ["<h2>Recent requests</h2>",
                  _table(["time", "to", "method", "path", "status", "duration", "in", "out"], rows,
                         "No requests yet.")]
        return "".join(parts)
