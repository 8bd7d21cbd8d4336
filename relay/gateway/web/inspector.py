"""The request inspector of an HTTP tunnel: its last requests, headers and bodies, replay.

Like ngrok's inspector, per seed 000 tunnel session, opened with the session's
``admin_token`` (the access token in the URL alone is not enough):

* ``GET /tunnel/{token}/_relay/inspect``: an HTML page; without the admin token (header
  ``X-Admin-Token``, or the cookie the page's form sets) it asks for it. The cookie is
  ``HttpOnly``, ``SameSite=Strict`` and scoped to ``/tunnel/{token}/_relay``: paths the
  gateway answers itself, never proxied, so the app behind the tunnel never sees it.
* ``GET /tunnel/{token}/_relay/requests``: the same as JSON.
* ``POST /tunnel/{token}/_relay/replay/{id}``: sends the request again, through the
  gateway's own listening address and the tunnel, as a client would; the replay shows
  up as a new request. A request whose body was cut (over :data:`BODY_CAP`) is not
  replayed (409).

Bounded memory: the last :data:`KEEP` exchanges per session, the first :data:`BODY_CAP`
bytes of each body (the proxy engine keeps no more: ProxyStats.inspect). Shown headers
have credentials (``Authorization``, ``Cookie``, ``Set-Cookie``, ``X-Admin-Token`` ...)
replaced by ``<redacted>`` and everything else passed through relay.logs.redact; the
originals are kept only for a replay and never rendered.

:meth:`Inspector.add` runs once per proxied request of an inspected tunnel, so this
module is compiled from its own source (inspector.pxd: Inspector is an extension type);
the ``.py`` is its pure-Python twin.
"""
from __future__ import annotations

import asyncio
import html
import itertools
import ssl
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Optional

from relay.gateway.http.proxy import ProxyError, RequestHead
from relay.gateway.http.server import HttpError, Request, Response, json_response
from relay.logs import redact

if TYPE_CHECKING:
    from relay.gateway.app import Gateway

__all__ = ["BODY_CAP", "Inspector", "InspectorRoutes", "KEEP"]

#: Exchanges kept per tunnel session.
KEEP = 50
#: Body bytes kept per request and per response.
BODY_CAP = 4096
#: Header values never shown.
SECRET_HEADERS = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie",
                            b"x-admin-token", b"x-api-key"})
#: Not replayed as they were: the framing and the hop-by-hop ones are the new request's own.
_NOT_REPLAYED = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
                           b"te", b"trailer", b"upgrade", b"expect", b"proxy-connection"})
COOKIE = "relay_admin"
#: Bound on a replay's round trip.
REPLAY_TIMEOUT = 30.0


def _shown(name: bytes, value: bytes) -> tuple[str, str]:
    text_name = name.decode("latin-1")
    if name.lower() in SECRET_HEADERS:
        return text_name, "<redacted>"
    return text_name, redact(value.decode("latin-1"))


def _body_text(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    return redact(text)


class Inspector:
    """The last exchanges of one tunnel session (the engine's ``ProxyStats.inspect``).

    :meth:`add` runs for every proxied request, so it only keeps the raw pieces (the
    head's header list, the capped bodies: bounded as before). Decoding and redaction
    cost more than the rest of the request's path put together, and happen only when
    someone looks (:meth:`listing`)."""

    cap = BODY_CAP

    def __init__(self) -> None:
        self.entries: deque[tuple[Any, ...]] = deque(maxlen=KEEP)
        self._ids = itertools.count(1)

    def add(self, head: RequestHead, target: bytes, status: int, req_body: bytes | bytearray, nin: int,
            resp_head: bytes, resp_body: bytes | bytearray, nout: int, seconds: float) -> None:
        """One finished exchange (called by the proxy engine, with the bodies it kept:
        no longer written to, so kept as they are)."""
        self.entries.append((next(self._ids), time.time(), head.method, target, head.raw_headers, status,
                             seconds, req_body, nin, resp_head, resp_body, nout))

    @staticmethod
    def _shown_entry(raw: tuple[Any, ...]) -> dict[str, Any]:
        (entry_id, when, method, target, raw_headers, status, seconds, req_body, nin,
         resp_head, resp_body, nout) = raw
        response_headers = []
        for line in resp_head.split(b"\r\n")[1:]:
            name, colon, value = line.partition(b":")
            if colon:
                response_headers.append(_shown(name.strip(), value.strip()))
        return {
            "id": entry_id, "time": when, "method": method.decode("latin-1"),
            "path": redact(target.decode("latin-1")), "status": status,
            "duration_ms": round(seconds * 1000, 3), "bytes_in": nin, "bytes_out": nout,
            "request_headers": [_shown(name, value) for name, _, value in raw_headers],
            "request_body": _body_text(req_body), "request_body_truncated": nin > len(req_body),
            "response_headers": response_headers,
            "response_body": _body_text(resp_body), "response_body_truncated": nout > len(resp_body),
        }

    def listing(self) -> list[dict[str, Any]]:
        """The entries as shown (newest first): decoded, credentials redacted."""
        return [self._shown_entry(raw) for raw in reversed(self.entries)]

    def original(self, entry_id: int) -> Optional[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes, bool]]:
        """For a replay (never rendered): method, target, the headers a replay sends again,
        body, and whether the body was cut."""
        for raw in self.entries:
            if raw[0] == entry_id:
                _, _, method, target, raw_headers, _, _, req_body, nin, _, _, _ = raw
                headers = [(name, value) for name, lname, value in raw_headers if lname not in _NOT_REPLAYED]
                return method, target, headers, bytes(req_body), nin > len(req_body)
        return None


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


class InspectorRoutes:
    """The inspector's routes (installed by relay.gateway.http.tunnel_proxy)."""

    def __init__(self, gateway: "Gateway", tunnels: Any) -> None:
        self.gw = gateway
        self.tunnels = tunnels

    def register(self, add: Any) -> None:
        add("GET", "/tunnel/{token}/_relay/inspect", self._page)
        add("POST", "/tunnel/{token}/_relay/inspect", self._sign_in)
        add("GET", "/tunnel/{token}/_relay/requests", self._json)
        add("POST", "/tunnel/{token}/_relay/replay/{entry_id}", self._replay)

    # -- access

    async def _session(self, request: Request, admin: Optional[str]) -> Any:
        """The open http session of the URL's token if ``admin`` is its admin token; None
        if no admin token was given; 403 if it is wrong."""
        try:
            row = await self.tunnels._open_http_session(request.params["token"])
        except ProxyError as exc:
            raise HttpError(exc.status, exc.code, exc.message) from None
        if not admin:
            return None
        if await self.gw.store.check_tunnel_admin_token(row.session_id, admin) is None:
            raise HttpError(403, "invalid_admin_token", "wrong admin_token for this tunnel session")
        return row

    def _admin_from(self, request: Request) -> Optional[str]:
        header = request.header("x-admin-token")
        if header:
            return header
        for part in (request.header("cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and value:
                return value
        return None

    def _inspector(self, row: Any) -> Inspector:
        stats = self.tunnels.stats(row.session_id, row.team_id)
        if stats.inspect is None:
            stats.inspect = Inspector()
        return stats.inspect

    # -- routes

    async def _json(self, request: Request) -> Response:
        row = await self._session(request, self._admin_from(request))
        if row is None:
            raise HttpError(401, "admin_token_required", "send the session's admin_token in X-Admin-Token")
        return json_response({"session_id": row.session_id, "requests": self._inspector(row).listing()})

    async def _sign_in(self, request: Request) -> Response:
        from urllib.parse import parse_qs

        admin = (parse_qs(request.body.decode("utf-8", "replace")).get("admin_token") or [""])[-1].strip()
        try:
            row = await self._session(request, admin)
        except HttpError as exc:
            if exc.status != 403:
                raise
            return self._ask(request, "wrong admin token", 403)
        if row is None:
            return self._ask(request, "", 401)
        base = f"/tunnel/{request.params['token']}/_relay"
        secure = "; Secure" if self.gw.url.startswith("https://") else ""
        return Response(303, b"", content_type="text/plain", headers={
            "Location": base + "/inspect",
            "Set-Cookie": f"{COOKIE}={admin}; Path={base}; HttpOnly; SameSite=Strict{secure}"})

    def _ask(self, request: Request, message: str = "", status: int = 200) -> Response:
        note = f"<p style='color:#b00020'>{_e(message)}</p>" if message else ""
        body = (f"<h1>Request inspector</h1>{note}<form method='post'><p><label>The tunnel's admin_token<br>"
                f"<input id='admin_token' name='admin_token' type='password' size='60' autocomplete='off'></label></p>"
                f"<p><button id='open' type='submit'>Open</button></p></form>")
        return self._html("relay inspector", body, status)

    def _html(self, title: str, body: str, status: int = 200) -> Response:
        text = (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>"
                "body{font:14px system-ui,sans-serif;margin:1.5em}table{border-collapse:collapse;width:100%}"
                "td,th{border-bottom:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}"
                "pre{white-space:pre-wrap;word-break:break-all;background:#f6f6f6;padding:.5em;margin:.3em 0}"
                "</style></head><body>" + body + "</body></html>")
        return Response(status, text.encode(), content_type="text/html; charset=utf-8", headers={
            "Cache-Control": "no-store", "X-Frame-Options": "DENY",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"})

    async def _page(self, request: Request) -> Response:
        try:
            row = await self._session(request, self._admin_from(request))
        except HttpError as exc:
            if exc.status != 403:
                raise
            return self._ask(request, "wrong admin token", 403)
        if row is None:
            return self._ask(request)
        rows = []
        for entry in self._inspector(row).listing():
            def headers(pairs: list) -> str:
                return _e("\n".join(f"{name}: {value}" for name, value in pairs))

            def shown_body(text: str, cut: bool) -> str:
                return _e(text) + (" …(cut)" if cut else "")

            details = (f"<details><summary>headers and bodies</summary>"
                       f"<b>request</b><pre>{headers(entry['request_headers'])}</pre>"
                       f"<pre>{shown_body(entry['request_body'], entry['request_body_truncated'])}</pre>"
                       f"<b>response</b><pre>{headers(entry['response_headers'])}</pre>"
                       f"<pre>{shown_body(entry['response_body'], entry['response_body_truncated'])}</pre></details>")
            replay = "" if entry["request_body_truncated"] else (
                f"<form method='post' action='replay/{entry['id']}'>"
                f"<button class='replay' type='submit'>Replay</button></form>")
            rows.append(f"<tr class='entry'><td>{entry['id']}</td>"
                        f"<td>{_e(time.strftime('%H:%M:%S', time.localtime(entry['time'])))}</td>"
                        f"<td>{_e(entry['method'])}</td><td class='path'>{_e(entry['path'])}{details}</td>"
                        f"<td>{_e(entry['status'] or 'cut')}</td><td>{entry['duration_ms']:.1f} ms</td>"
                        f"<td>{entry['bytes_in']} / {entry['bytes_out']}</td><td>{replay}</td></tr>")
        table = ("<table><tr><th>#</th><th>time</th><th>method</th><th>path</th><th>status</th><th>duration</th>"
                 "<th>bytes in / out</th><th></th></tr>" + "".join(rows) + "</table>") if rows \
            else "<p>No requests yet.</p>"
        body = (f"<h1>Request inspector</h1><p>tunnel session {_e(row.session_id)} → port {_e(row.target_port)} · "
                f"last {KEEP} requests, bodies up to {BODY_CAP} bytes · <a href='inspect'>reload</a></p>{table}")
        return self._html("relay inspector", body)

    async def _replay(self, request: Request) -> Response:
        row = await self._session(request, self._admin_from(request))
        if row is None:
            raise HttpError(401, "admin_token_required", "send the session's admin_token in X-Admin-Token")
        try:
            original = self._inspector(row).original(int(request.params["entry_id"]))
        except ValueError:
            original = None
        if original is None:
            raise HttpError(404, "request_not_found", "no such request in the inspector (it keeps the last ones)")
        method, target, headers, body, cut = original
        if cut:
            raise HttpError(409, "body_truncated", f"the request body was over {BODY_CAP} bytes; it cannot be replayed")
        status = await self._send(request.params["token"], method, target, headers, body)
        if "text/html" in (request.header("accept") or ""):
            return Response(303, b"", content_type="text/plain", headers={"Location": "../inspect"})
        return json_response({"replayed": int(request.params["entry_id"]), "status": status})

    async def _send(self, token: str, method: bytes, target: bytes, headers: list, body: bytes) -> int:
        """The request again, to this gateway's own address and the tunnel's path, as a
        client sends it; returns the status the client would get."""
        gw = self.gw
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(gw.host, gw.host)
        context = None
        if gw.url.startswith("https://"):
            context = ssl.create_default_context()
            context.check_hostname = False  # ourselves, by address
            context.verify_mode = ssl.CERT_NONE
        lines = [b"%s /tunnel/%s%s HTTP/1.1" % (method, token.encode(), target),
                 b"Host: %s" % gw.url.split("://", 1)[1].encode(), b"Connection: close",
                 b"Content-Length: %d" % len(body)]
        lines += [name + b": " + value for name, value in headers]
        try:
            async with asyncio.timeout(REPLAY_TIMEOUT):
                reader, writer = await asyncio.open_connection(host, gw.port, ssl=context)
                try:
                    writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
                    status_line = await reader.readline()
                    while await reader.read(65536):  # the whole answer: the exchange completes
                        pass
                finally:
                    writer.close()
        except (OSError, TimeoutError) as exc:
            raise HttpError(502, "replay_failed", f"the replay did not complete: {exc or 'timeout'}") from None
        try:
            return int(status_line.split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise HttpError(502, "replay_failed", "the replay got no HTTP answer") from None
