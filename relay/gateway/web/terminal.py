"""The web terminal (seed 000: the admin_token "for privileged operations (e.g.
WebTerminal)"): a shell on the agent's machine, in a browser tab, for whoever holds a
tunnel session's admin_token.

Only agents started with ``--terminal SHELL`` serve one (their hello says
``"terminal": {"shell", "user"}``); the tunnel-open answer of a session on such an agent
carries ``terminal_url`` (:func:`terminal_url`), whatever the session's protocol. Routes,
all under the session's own path:

* ``GET /tunnel/{token}/_relay/terminal``: the page (xterm.js, vendored in
  ``static/xterm``, see its VENDOR.md). Without the admin token it asks for it; the form
  sets the same ``HttpOnly``, ``SameSite=Strict`` cookie as the request inspector,
  scoped to ``/tunnel/{token}/_relay`` (paths the gateway answers itself, never
  proxied), so the page's WebSocket carries it and the token never sits in a URL.
* ``GET /tunnel/{token}/_relay/terminal/ws``: the WebSocket. The admin token in
  ``X-Admin-Token``, that cookie, or (clients that can set neither) the query
  ``admin_token`` (redacted from logs); ``cols`` and ``rows`` in the query give the
  first window size. Missing: 401; wrong: 403 (and 403 ``cross_origin`` for a browser
  page of another origin using the cookie or the query); unknown or closed session: 404; the
  agent offline: 503; an agent without ``--terminal``: 409 ``terminal_not_enabled``,
  and nothing is asked of the agent; the shell cannot start there: 502. All before
  the upgrade, so a refused client never holds a socket and a refused agent never
  starts a shell.
* ``GET /tunnel/{token}/_relay/terminal/{asset}``: xterm.js, its fit add-on, their CSS
  and the page's script (public files; no session needed).

On the WebSocket, binary messages are terminal bytes both ways; the page sends the
text message ``{"resize": [cols, rows]}`` when its window changes size, and receives
``{"exit": STATUS}`` when the shell ended, just before the close (1000). Anything else
in a text message closes with 1007. Each WebSocket is one terminal stream to the agent
(relay.mux.terminal; docs/PROTOCOL.md section 17): closing the tab ends the stream and
the agent hangs the shell up; the shell exiting closes the tab's socket; closing the
tunnel session closes its terminals.

Every opening, refusal and closing is logged on the ``relay.audit`` logger: session,
agent, client address, duration; never a token. They are counted too, for the
gateway's ``/metrics``: terminals opened, refused (by error code), closed (by reason:
``page_closed``, ``shell_exited``, ``session_closed``, ``error``) and open now.
"""
from __future__ import annotations

import asyncio
import html
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from relay.aio import SessionClosedError, StreamRefused, WebSocketTransport
from relay.aio.stream import MuxStream
from relay.gateway.http.server import HttpError, Request, Response
from relay.gateway.store import StoreError, TunnelSession
from relay.gateway.web.inspector import COOKIE
from relay.mux.errors import ErrorCode
from relay.mux.terminal import (
    DEFAULT_SIZE,
    TerminalData,
    TerminalDecoder,
    TerminalExit,
    TerminalProtocolError,
    check_size,
    encode_data,
    encode_resize,
    open_metadata,
)
from relay.ws.handshake import HandshakeError, accept_response, parse_upgrade_request

if TYPE_CHECKING:
    from relay.gateway.app import Gateway

__all__ = ["CLOSE_REASONS", "PAGE_PATH", "TerminalRoutes", "terminal_enabled", "terminal_url"]

log = logging.getLogger("relay.gateway.terminal")
audit = logging.getLogger("relay.audit")

PAGE_PATH = "/_relay/terminal"
ADMIN_HEADER = "X-Admin-Token"
#: How long the agent has to start the shell (and answer the stream) before 504.
OPEN_TIMEOUT = 15.0
#: Largest WebSocket message accepted from the page (a paste is one message).
MAX_MESSAGE = 1024 * 1024
STATIC = Path(__file__).parent / "static"
#: The files served as ``terminal/{asset}`` (nothing else is read from disk).
ASSETS = {
    "xterm.js": ("xterm/xterm.js", "text/javascript; charset=utf-8"),
    "xterm.css": ("xterm/xterm.css", "text/css; charset=utf-8"),
    "addon-fit.js": ("xterm/addon-fit.js", "text/javascript; charset=utf-8"),
    "terminal.js": ("terminal.js", "text/javascript; charset=utf-8"),
}
#: Why a terminal ended, as counted: the page's socket closed, the shell exited (or the
#: agent ended the stream), the tunnel session was closed, a protocol or stream error.
CLOSE_REASONS = ("page_closed", "shell_exited", "session_closed", "error")
CLOSE_NORMAL = 1000
CLOSE_INVALID = 1007
CLOSE_ERROR = 1011


def terminal_enabled(hello: Any) -> bool:
    """Does the agent whose hello is ``hello`` serve a terminal (``--terminal``)?"""
    return isinstance(hello, dict) and isinstance(hello.get("terminal"), dict)


def terminal_url(public_url: str, access_token: str) -> str:
    """The page of the session whose access token is ``access_token``."""
    return f"{public_url.rstrip('/')}/tunnel/{access_token}{PAGE_PATH}"


def _who(request: Request) -> str:
    peer = request.peer
    return f"{peer[0]}:{peer[1]}" if peer else "?"


def _same_origin(request: Request) -> bool:
    """No ``Origin`` (not a browser), or one naming the host the request was sent to."""
    origin = request.header("origin")
    if origin is None:
        return True
    from urllib.parse import urlsplit

    return urlsplit(origin).netloc.lower() == (request.header("host") or "").lower()


class _TerminalSocket(WebSocketTransport):
    """The page's WebSocket: binary messages are terminal bytes, text messages the
    page's resize requests (module docstring)."""

    session: "_TerminalBridge"

    def _text_received(self, payload: Any) -> bool:
        return self.session.text_received(bytes(payload))

    def send_text(self, text: str) -> None:
        if not self.is_closing():
            ws = self._ws
            self._transport.write(ws.encode_frame(ws.Opcode.TEXT, text.encode()))

    def close_with(self, code: int, reason: str) -> None:
        """Send a close frame with ``code`` and ``reason`` (cut to fit), then close."""
        if not self._close_sent and not self._transport.is_closing():
            ws = self._ws
            payload = ws.encode_close_payload(code, reason.encode()[:120].decode("utf-8", "ignore"))
            self._transport.write(ws.encode_frame(ws.Opcode.CLOSE, payload))
        self._close_sent = True
        self._transport.close()


class _TerminalBridge:
    """One open terminal: the page's WebSocket on one side, the terminal stream to the
    agent on the other."""

    def __init__(self, routes: "TerminalRoutes", stream: MuxStream, row: TunnelSession, who: str) -> None:
        self._routes = routes
        self.stream = stream
        self.row = row
        self.who = who
        self.ws: Optional[_TerminalSocket] = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._input_paused = False
        self._pump: Optional[asyncio.Task[None]] = None
        self._started = time.monotonic()
        self._ended = False
        self.reason = "the page closed"
        #: Why it ended, as counted in metrics (TerminalRoutes.closed): one of CLOSE_REASONS.
        self.ended_by = "page_closed"

    # -- the WebSocket's callbacks

    def connection_made(self, ws: Any) -> None:
        self.ws = ws
        self._pump = asyncio.get_running_loop().create_task(self._carry_output())

    def data_received(self, payload: Any) -> None:
        """Keystrokes (or a paste) from the page."""
        self._send(encode_data(payload))

    def text_received(self, payload: bytes) -> bool:
        try:
            message = json.loads(payload)
            cols, rows = message["resize"]
            record = encode_resize(*check_size(cols, rows))
        except (ValueError, TypeError, KeyError, TerminalProtocolError) as exc:
            assert self.ws is not None
            self.ws.close_with(CLOSE_INVALID, f'expected {{"resize": [cols, rows]}}: {exc}')
            return False
        self._send(record)
        return True

    def eof_received(self) -> Optional[bool]:
        return None

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        """The page's socket is gone (tab closed, navigated away, network): end the
        stream, and the agent hangs the shell up."""
        if not self.stream.finished:
            self.stream.close()
        self._end()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- the two directions

    def _send(self, record: bytes) -> None:
        if self._ended or self.stream.is_closing():
            return
        try:
            self.stream.write(record)
        except (ConnectionError, RuntimeError):
            return
        if not self.stream.writable() and not self._input_paused:
            # A paste faster than the shell reads: stop reading the page until the agent
            # grants window, so what waits here stays one send queue's worth.
            self._input_paused = True
            assert self.ws is not None
            self.ws.pause_reading()
            asyncio.get_running_loop().create_task(self._resume_input())

    async def _resume_input(self) -> None:
        try:
            await self.stream.drain()
        except ConnectionError:
            return
        self._input_paused = False
        if self.ws is not None and not self.ws.is_closing():
            self.ws.resume_reading()

    async def _carry_output(self) -> None:
        """The shell's output to the page; at the shell's end, its status and a close."""
        ws = self.ws
        assert ws is not None
        decoder = TerminalDecoder()
        try:
            while True:
                data = await self.stream.read(65536)
                if not data:
                    break
                for event in decoder.feed(data):
                    if isinstance(event, TerminalData):
                        ws.write(event.data)
                    elif isinstance(event, TerminalExit):
                        self.reason = f"the shell exited with status {event.status}"
                        self.ended_by = "shell_exited"
                        ws.send_text(json.dumps({"exit": event.status}))
                await self._writable.wait()  # a tab that reads slowly holds the shell back
        except TerminalProtocolError as exc:
            self.reason = f"protocol error from the agent: {exc}"
            self.ended_by = "error"
            self.stream.abort(ErrorCode.PROTOCOL_ERROR, str(exc))
            ws.close_with(CLOSE_ERROR, self.reason)
        except ConnectionError as exc:
            if not self._ended:
                self.reason = f"the terminal stream was reset: {exc}"
                self.ended_by = "error"
                ws.close_with(CLOSE_ERROR, self.reason)
        else:
            if not self._ended:
                self.ended_by = "shell_exited"  # the agent ended the stream: the shell is gone
                ws.close_with(CLOSE_NORMAL, self.reason if self.reason.startswith("the shell") else "the shell ended")
        self._end()

    def close(self, reason: str) -> None:
        """Close from the gateway's side (the tunnel session was closed)."""
        self.reason = reason
        if not self._ended:
            self.ended_by = "session_closed"
        if self.ws is not None:
            self.ws.close_with(CLOSE_NORMAL, reason)
        if not self.stream.finished:
            self.stream.abort(ErrorCode.CANCEL, reason)
        self._end()

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self._writable.set()
        self._routes._closed(self)
        self._routes.closed[self.ended_by] += 1
        audit.info("terminal closed: session %s (agent %s) for %s after %.1fs: %s", self.row.session_id,
                   self.row.agent_id, self.who, time.monotonic() - self._started, self.reason)


class TerminalRoutes:
    """The web terminal's routes on one gateway (module docstring)."""

    def __init__(self, gateway: "Gateway") -> None:
        self.gw = gateway
        #: Open terminals by tunnel session id.
        self.live: dict[str, set[_TerminalBridge]] = {}
        #: Since start, for metrics (relay.gateway.app) and tests: terminals opened,
        #: WebSocket openings refused by error code, terminals closed by CLOSE_REASONS.
        self.opened_total = 0
        self.refused: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()

    def open_now(self) -> int:
        """Terminals open now, over all sessions."""
        return sum(len(bridges) for bridges in self.live.values())

    def register(self, add: Any) -> None:
        """Add the routes (before the HTTP tunnels' catch-all, which would proxy them)."""
        add("GET", "/tunnel/{token}" + PAGE_PATH, self._page)
        add("POST", "/tunnel/{token}" + PAGE_PATH, self._sign_in)
        add("GET", "/tunnel/{token}" + PAGE_PATH + "/ws", self._websocket)
        add("GET", "/tunnel/{token}" + PAGE_PATH + "/{asset}", self._asset)

    def activity(self, session_id: str) -> Optional[tuple[int, int]]:
        """``(0, open terminals)`` of a tunnel session, None if it has none: an open
        terminal keeps its session from idling out (relay.gateway.agents.session_lifetime)."""
        bridges = self.live.get(session_id)
        return (0, len(bridges)) if bridges else None

    def sessions_closed(self, session_ids: list[str]) -> None:
        """Tunnel sessions were closed: so are their terminals."""
        for session_id in session_ids:
            for bridge in list(self.live.get(session_id, ())):
                bridge.close("the tunnel session was closed")

    def _closed(self, bridge: _TerminalBridge) -> None:
        bridges = self.live.get(bridge.row.session_id)
        if bridges is not None:
            bridges.discard(bridge)
            if not bridges:
                del self.live[bridge.row.session_id]

    # -- checks

    async def _session(self, request: Request) -> TunnelSession:
        """The open session of the URL's token (any protocol); 404 if none."""
        try:
            row = await self.gw.store.get_tunnel_session_by_token(request.params["token"])
        except StoreError as exc:
            raise HttpError(503, "store_unavailable", str(exc)) from None
        if row is None:
            raise HttpError(404, "tunnel_not_found", "no such open tunnel session")
        return row

    @staticmethod
    def _admin_from(request: Request, query: bool) -> Optional[str]:
        header = request.header(ADMIN_HEADER)
        if header:
            return header
        for part in (request.header("cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and value:
                return value
        return request.query_value("admin_token") if query else None

    async def _authorised(self, request: Request, row: TunnelSession, admin: Optional[str]) -> None:
        """401 without an admin token, 403 with a wrong one (audit-logged)."""
        if not admin:
            audit.warning("terminal refused: session %s for %s: no admin_token", row.session_id, _who(request))
            raise HttpError(401, "admin_token_required",
                            f"send the session's admin_token in {ADMIN_HEADER} (or sign in on the page)")
        if await self.gw.store.check_tunnel_admin_token(row.session_id, admin) is None:
            audit.warning("terminal refused: session %s for %s: wrong admin_token", row.session_id, _who(request))
            raise HttpError(403, "invalid_admin_token", "wrong admin_token for this tunnel session")

    def _agent_session(self, row: TunnelSession) -> Any:
        """The agent's mux session; 503 if it is offline, 409 if it serves no terminal."""
        agent = self.gw.registry.get(row.team_id, row.agent_id)
        if agent is None:
            raise HttpError(503, "agent_offline", "the tunnel's agent is not connected")
        hello = agent.session.peer_info
        # Empty: held by another gateway of a fleet whose hello is not mirrored here yet;
        # the agent decides (it refuses unless it serves one, and the refusal says why).
        if hello and not terminal_enabled(hello):
            raise HttpError(409, "terminal_not_enabled",
                            f"agent {agent.name!r} serves no terminal: it must be started with "
                            f"--terminal SHELL (relay agent --help)")
        return agent.session

    # -- routes

    async def _asset(self, request: Request) -> Response:
        entry = ASSETS.get(request.params["asset"])
        if entry is None:
            raise HttpError(404, "not_found", "no such terminal file")
        path, content_type = entry
        return Response(200, (STATIC / path).read_bytes(), content_type=content_type,
                        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})

    async def _page(self, request: Request) -> Response:
        row = await self._session(request)
        admin = self._admin_from(request, query=False)
        if not admin:
            return _ask()
        if await self.gw.store.check_tunnel_admin_token(row.session_id, admin) is None:
            return _ask("wrong admin token", 403)
        try:
            self._agent_session(row)
        except HttpError as exc:
            return _html("relay terminal", f"<h1>No terminal</h1><p id='error'>{html.escape(exc.message)}</p>",
                         exc.status)
        return _html("relay terminal", _TERMINAL_BODY, 200, page=True)

    async def _sign_in(self, request: Request) -> Response:
        from urllib.parse import parse_qs

        row = await self._session(request)
        admin = (parse_qs(request.body.decode("utf-8", "replace")).get("admin_token") or [""])[-1].strip()
        if not admin:
            return _ask("", 401)
        if await self.gw.store.check_tunnel_admin_token(row.session_id, admin) is None:
            audit.warning("terminal sign-in refused: session %s for %s: wrong admin_token",
                          row.session_id, _who(request))
            return _ask("wrong admin token", 403)
        base = f"/tunnel/{request.params['token']}/_relay"
        secure = "; Secure" if self.gw.url.startswith("https://") else ""
        return Response(303, b"", content_type="text/plain", headers={
            "Location": base + "/terminal",
            "Set-Cookie": f"{COOKIE}={admin}; Path={base}; HttpOnly; SameSite=Strict{secure}"})

    async def _websocket(self, request: Request) -> Optional[Response]:
        try:
            return await self._open(request)
        except HttpError as exc:
            self.refused[exc.code] += 1
            raise

    async def _open(self, request: Request) -> Optional[Response]:
        """The WebSocket route's work; every refusal is an HttpError (counted by the caller)."""
        row = await self._session(request)
        who = _who(request)
        admin = self._admin_from(request, query=True)
        await self._authorised(request, row, admin)
        if admin is not None and not request.header(ADMIN_HEADER) and not _same_origin(request):
            # The cookie rides along on any page's WebSocket: only the gateway's own page
            # may use it (SameSite=Strict already keeps other sites' pages out in today's
            # browsers; this holds for the others too).
            audit.warning("terminal refused: session %s for %s: a page of another origin (%s)",
                          row.session_id, who, (request.header("origin") or "")[:100])
            raise HttpError(403, "cross_origin", "a terminal WebSocket from a page of another origin is refused")
        try:
            session = self._agent_session(row)
        except HttpError as exc:
            audit.warning("terminal refused: session %s for %s: %s", row.session_id, who, exc.message)
            raise
        try:
            cols = int(request.query_value("cols") or DEFAULT_SIZE[0])
            rows = int(request.query_value("rows") or DEFAULT_SIZE[1])
            metadata = open_metadata(row.session_id, cols, rows, who)
        except (ValueError, TerminalProtocolError) as exc:
            raise HttpError(400, "invalid_size", f"cols and rows: {exc}") from None
        try:
            upgrade = parse_upgrade_request(request.raw)
        except HandshakeError as exc:
            raise HttpError(exc.status_code, "bad_websocket_upgrade", exc.message,
                            {k.decode(): v.decode() for k, v in exc.headers}) from None
        try:
            stream = session.open_stream_nowait(metadata)
        except (SessionClosedError, ConnectionError) as exc:
            raise HttpError(503, "agent_offline", f"the tunnel's agent is not reachable: {exc}") from None
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                await stream.wait_accepted()
        except StreamRefused as exc:
            status, code = ((409, "terminal_not_enabled") if exc.error_code == ErrorCode.NOT_ALLOWED
                            else (502, "terminal_failed"))
            audit.warning("terminal refused by agent %s: session %s for %s: %s", row.agent_id,
                          row.session_id, who, exc.message)
            raise HttpError(status, code, exc.message or "the agent refused the terminal") from None
        except TimeoutError:
            stream.abort(ErrorCode.CANCEL, "no answer in time")
            raise HttpError(504, "terminal_timeout", f"the agent did not start the shell within {OPEN_TIMEOUT:.0f}s") from None
        except ConnectionError as exc:
            raise HttpError(503, "agent_offline", f"the tunnel's agent went away: {exc}") from None
        except BaseException:  # cancelled: the client went away while the shell was starting
            stream.abort(ErrorCode.CANCEL, "the client went away")
            audit.info("terminal closed: session %s for %s: the client left before the shell started",
                       row.session_id, who)
            raise
        transport, leftover = request.take_over()
        if transport.is_closing():  # the client left while the shell was starting
            stream.close()
            audit.info("terminal closed: session %s for %s: the client left before the shell started",
                       row.session_id, who)
            return None
        transport.write(accept_response(upgrade))
        bridge = _TerminalBridge(self, stream, row, who)
        self.live.setdefault(row.session_id, set()).add(bridge)
        self.opened_total += 1
        audit.info("terminal opened: session %s (team %s, agent %s) for %s, %dx%d", row.session_id,
                   row.team_id, row.agent_id, who, cols, rows)
        _TerminalSocket.attach(transport, bridge, client=False, initial=leftover, max_message_size=MAX_MESSAGE)
        transport.resume_reading()  # the HTTP layer paused it while the request was handled
        return None


def _ask(message: str = "", status: int = 200) -> Response:
    note = f"<p id='error' style='color:#b00020'>{html.escape(message)}</p>" if message else ""
    body = (f"<h1>Terminal</h1>{note}<form method='post'><p><label>The tunnel's admin_token<br>"
            f"<input id='admin_token' name='admin_token' type='password' size='60' autocomplete='off'></label></p>"
            f"<p><button id='open' type='submit'>Open</button></p></form>")
    return _html("relay terminal", body, status)


_TERMINAL_BODY = ("<div id='terminal'></div><div id='status'>connecting…</div>"
                  "<script src='terminal/xterm.js'></script><script src='terminal/addon-fit.js'></script>"
                  "<script src='terminal/terminal.js'></script>")


def _html(title: str, body: str, status: int = 200, page: bool = False) -> Response:
    head = ("<link rel='stylesheet' href='terminal/xterm.css'><style>html,body{margin:0;height:100%;"
            "background:#000}#terminal{position:absolute;inset:0 0 1.6em 0}#status{position:absolute;left:0;"
            "right:0;bottom:0;height:1.6em;font:13px system-ui,sans-serif;color:#ccc;padding:0 .5em}</style>"
            if page else "<style>body{font:14px system-ui,sans-serif;margin:1.5em}</style>")
    text = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{head}"
            f"</head><body>{body}</body></html>")
    return Response(status, text.encode(), content_type="text/html; charset=utf-8", headers={
        "Cache-Control": "no-store", "X-Frame-Options": "DENY",
        # Scripts only from the gateway; xterm.js sets inline styles; the socket is same-origin.
        "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                   "connect-src 'self'; form-action 'self'; img-src 'self' data:"})
