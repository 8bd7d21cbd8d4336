"""HTTP tunnels (seed 000, ``tunnel_protocol: http``): ``/tunnel/{token}/...`` proxied to
``127.0.0.1:target_port`` on the session's agent, plus the session's admin endpoints.

Routes (installed after the gateway's own ``GET /tunnel/{token}/tcp``, the TCP-over-WS
relay of tcp tunnels, which therefore keeps that one path):

* ``ANY /tunnel/{token}/{path}`` (a raw route): the reverse proxy of
  :mod:`relay.gateway.http.proxy`; ``/tunnel/{token}`` is stripped, the rest (query
  included) is what the target sees, so a page loaded at ``/tunnel/{token}/`` resolves
  its relative links and sub-resources inside the tunnel. The access token in the URL
  is the credential: anyone holding the URL may use it.
* ``ANY /tunnel/{token}`` -> ``308`` to ``/tunnel/{token}/`` (relative links need the
  slash).
* Admin, authorised by the session's ``admin_token`` in the ``X-Admin-Token`` header (the
  access token alone is not enough; a missing header is 401, a wrong one 403):
  ``GET /tunnel/{token}/_relay/stats`` (live counters), the request inspector
  (``/tunnel/{token}/_relay/inspect``, relay.gateway.web.inspector) and ``DELETE /tunnel/{token}``
  (close the session: the URL stops working and open connections through it, WebSockets
  included, are closed).

Absolute paths: the target's ``Location``/``Content-Location`` and ``Set-Cookie`` paths
are moved under ``/tunnel/{token}`` (:func:`relay.gateway.http.proxy.rewrite_paths`);
bodies are not. With a tunnel domain (``--tunnel-domain``, relay.gateway.http.tunnel_hosts)
every tunnel is also served at ``LABEL.DOMAIN``, its whole path space the app's: a
request whose ``Host`` names a tunnel goes to it, path untouched, whatever the path
(:meth:`HttpTunnels._resolve_by_host`).

Errors (JSON, seed 003 semantics): unknown or closed token, or a tcp session: 404; the
agent is not connected: 503; the agent or tunnel fails to reach the target (nothing
listening: the agent refuses the stream with CONNECT_FAILED): 502.
"""
from __future__ import annotations

import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:  # mypy checks the pure-Python twin: cython's no-op declarations
    from relay.mux import _cython_shim as cython
else:
    try:
        import cython
    except ImportError:  # the pure-Python gateway runs without Cython installed
        from relay.mux import _cython_shim as cython

from relay.aio import SessionClosedError
from relay.aio.stream import MuxStream
from relay.gateway.http.proxy import ProxyError, ProxyStats, RequestHead, Upstream, origin_form, serve_connection
from relay.gateway.http.server import HttpError, HttpProtocol, Request, Response, json_response, store_failure
from relay.gateway.http.tunnel_hosts import session_host_header, token_from_host
from relay.gateway.store import StoreError, TunnelSession
from relay.gateway.web.inspector import Inspector, InspectorRoutes

if TYPE_CHECKING:
    from relay.aio import MuxSession
    from relay.gateway.app import Gateway

__all__ = ["HttpTunnels", "ADMIN_HEADER"]

PREFIX = b"/tunnel/"
ADMIN_HEADER = "X-Admin-Token"
STATS_PATH = "/_relay/stats"
#: Open sessions remembered by token (the cache starts over when full).
SESSION_CACHE = 4096
#: Router answers remembered per (method, path after the token) (starts over when full).
ROUTE_CACHE = 4096
#: Resolver answers remembered per (method, request-target) (starts over when full),
#: for request-targets up to ANSWER_TARGET bytes (so the cache stays a few MiB; the
#: router answers too are remembered only for paths up to that size).
ANSWER_CACHE = 4096
ANSWER_TARGET = 1024


class HttpTunnels:
    """The HTTP tunnel proxy and admin endpoints of one gateway (an extension type when
    compiled, see tunnel_proxy.pxd: its resolver runs once per proxied request)."""

    def __init__(self, gateway: "Gateway", connections: Optional[set] = None) -> None:
        self._gateway = gateway
        self._connections = connections
        #: Live counters by session id (in memory: they describe this process's traffic).
        self._stats: dict[str, ProxyStats] = {}
        #: Open http sessions by access token, so a request costs no SQLite read and no
        #: token hash; emptied whenever the store closes any session (its version moves).
        self._sessions: dict[str, TunnelSession] = {}
        self._sessions_version = -1
        #: Whether (method, path after the token) is this proxy's route or another one
        #: under /tunnel/{token}/ (stats, a tcp tunnel's /tcp): the router's answer,
        #: which depends on the path only through that part, remembered.
        self._routes: dict[tuple[bytes, bytes], bool] = {}
        #: Per access token, what its requests' Upstreams share (see _upstream_parts);
        #: rebuilt when the session row or the agent's connection changes.
        self._parts: dict[str, tuple] = {}
        #: Per (method, request-target), the last Upstream answered and what it depends
        #: on: ``(upstream, agent session, store's tunnel_sessions_version, registry
        #: version)``. While neither version moved and the session is open, the lookups
        #: behind it (token, session row, agent, parts) give the same answer, so the
        #: repeated requests of a keep-alive client get the same object, rebuilt never.
        self._answers: dict[tuple[bytes, bytes], tuple] = {}
        #: The tunnel domain (lower-case) when tunnels are served by host too, else None.
        self._domain: Optional[str] = None

    def install(self, tunnel_domain: Optional[str] = None) -> None:
        """Add the routes to the gateway's router; with ``tunnel_domain``, also serve
        every HTTP tunnel at its own host ``LABEL.DOMAIN`` (relay.gateway.http.tunnel_hosts),
        where requests go to the target with their path untouched."""
        self._domain = tunnel_domain.strip(".").lower() if tunnel_domain else None
        if self._domain:
            self._gateway.router.by_host = self._host_route
        add = self._gateway.router.add
        add("GET", "/tunnel/{token}" + STATS_PATH, self._admin_stats)
        InspectorRoutes(self._gateway, self).register(add)  # /_relay/inspect, requests, replay
        add("DELETE", "/tunnel/{token}", self._admin_close)
        add("*", "/tunnel/{token}", self._add_slash)
        add("*", "/tunnel/{token}/{path:path}", self._proxy, raw=True)

    def stats(self, session_id: str, team_id: Optional[str] = None) -> ProxyStats:
        """The live counters of one session (created on first use; with ``team_id``, with
        an observer feeding the access log, the session's series and the dashboard)."""
        stats = self._stats.get(session_id)
        if stats is None:
            stats = self._stats[session_id] = ProxyStats()
        if stats.observer is None and team_id is not None:
            stats.observer = self._gateway.traffic.observer("tunnel", team_id, session_id)
            stats.inspect = Inspector()  # the request inspector (relay.gateway.web.inspector)
        return stats

    def activity(self, session_id: str) -> Optional[tuple[int, int]]:
        """(requests and WebSockets so far, open now) of a session, None if it has had
        none (relay.gateway.agents.session_lifetime: what keeps a session alive)."""
        stats = self._stats.get(session_id)
        if stats is None:
            return None
        return stats.requests + stats.websockets, stats.active_requests + stats.active_websockets

    def session_closed(self, session_id: str) -> None:
        """A session was closed: cut its live client connections (WebSockets included)
        and forget its counters, so closed sessions leave nothing behind."""
        stats = self._stats.pop(session_id, None)
        self._gateway.traffic.forget("tunnel", session_id)
        if stats is not None:
            for client in list(stats.clients):
                client.close()

    # -- the proxy

    async def _proxy(self, request: Request) -> None:
        """Raw route: the connection becomes a proxy connection from this request on."""
        transport, data = request.take_over_raw()
        serve_connection(transport, data, self._resolve, fallback=self._http_server,
                         connections=self._connections)

    def _host_route(self, host: Optional[str]) -> Any:
        """Router hook: the host proxy for a ``LABEL.DOMAIN`` host, else None (paths)."""
        return self._proxy_by_host if token_from_host(host, self._domain) is not None else None

    async def _proxy_by_host(self, request: Request) -> None:
        """Every request to a tunnel's own host: the connection becomes a proxy connection
        (requests naming another host go back to the HTTP server)."""
        transport, data = request.take_over_raw()
        serve_connection(transport, data, self._resolve_by_host, fallback=self._http_server,
                         connections=self._connections)

    @cython.locals(request=RequestHead)
    def _resolve_by_host(self, request: RequestHead) -> Any:
        """Where a request on a tunnel host's connection goes: the tunnel its ``Host``
        names, the request-target as the client sent it (no prefix to strip or to put
        back: the app owns the host's whole path space). A coroutine when the session
        is not in memory (the store is asked first), as :meth:`_resolve_fully`."""
        host = None
        for _, lname, value in request.raw_headers:
            if lname == b"host":
                host = value.decode("latin-1")
        token = token_from_host(host, self._domain)
        if token is None:
            return None  # another host on a kept-alive connection: the HTTP server's
        row = self._cached_session(token)
        if row is None:
            return self._resolve_by_host_slowly(request, token)
        return self._host_upstream(request, token, row)

    async def _resolve_by_host_slowly(self, request: RequestHead, token: str) -> Upstream:
        try:
            row = await self._open_http_session(token)
        except StoreError as exc:
            raise ProxyError(503, "store_unavailable", store_failure("HTTP tunnel URL", exc)) from None
        return self._host_upstream(request, token, row)

    def _host_upstream(self, request: RequestHead, token: str, row: TunnelSession) -> Upstream:
        """The Upstream of a request to the tunnel host of ``row``."""
        agent = self._gateway.registry.get(row.team_id, row.agent_id)
        if agent is None:
            raise ProxyError(503, "agent_offline", "the tunnel's agent is not connected")
        session = agent.session
        parts = self._parts.get(token)
        if parts is None or parts[0] is not row or parts[1] is not session:
            parts = self._upstream_parts(row, session, PREFIX + token.encode())
            if len(self._parts) >= SESSION_CACHE:
                self._parts.clear()
            self._parts[token] = parts
        _, _, open_stream, key, _, host_header, stats, host_override = parts
        # With a Host override, the target's absolute redirects name itself: made
        # root-relative (an empty prefix); otherwise nothing to rewrite on its own host.
        return Upstream(open_stream=open_stream, key=key, target=origin_form(request.target),
                        host=host_header, stats=stats, host_override=host_override,
                        prefix=b"" if host_override is not None else None)

    def _http_server(self, declined: bool = False) -> HttpProtocol:
        return HttpProtocol(self._gateway.router, self._connections, declined=declined)

    @cython.locals(request=RequestHead)
    def _resolve(self, request: RequestHead) -> Union[Optional[Upstream], Coroutine[Any, Any, Optional[Upstream]]]:
        """Where a request on a proxy connection goes (None: another route's, e.g. the
        admin endpoints or the API, which the gateway's HTTP server answers)."""
        key = (request.method, request.target)
        gateway = self._gateway
        hit = self._answers.get(key)
        if hit is not None:
            upstream, session, sessions_version, agents_version = hit
            if (sessions_version == gateway.store.tunnel_sessions_version
                    and agents_version == gateway.registry.version and not session.is_closed):
                return upstream
        sessions_version = gateway.store.tunnel_sessions_version
        agents_version = gateway.registry.version
        answer = self._resolve_fully(request)
        if answer is None:
            return None
        if type(answer) is not tuple:  # the session is not in memory: a slow path
            return answer
        upstream, session = answer
        if len(request.target) <= ANSWER_TARGET:
            answers = self._answers
            if len(answers) >= ANSWER_CACHE:
                answers.clear()
            answers[key] = (upstream, session, sessions_version, agents_version)
        return upstream

    def _resolve_fully(self, request: RequestHead, row: Optional[TunnelSession] = None) -> Any:
        """:meth:`_resolve` without the answer cache: ``(upstream, agent session)``, None
        (not a proxied path), or, when the token's session is not in memory and ``row``
        (the session, read already) is not given, a coroutine resolving to the upstream
        once the store answered."""
        target = request.target
        if target.startswith((b"http://", b"https://")):  # absolute-form: keep the path
            slash = target.find(b"/", target.find(b"//") + 2)
            target = target[slash:] if slash >= 0 else b"/"
        if not target.startswith(PREFIX):
            return None
        end = target.find(b"/", len(PREFIX))
        if end < 0:
            return None  # /tunnel/{token} or /tunnel/{token}?...: the redirect
        rest = target[end:].split(b"?", 1)[0]
        route = (request.method, rest)
        mine = self._routes.get(route)
        if mine is None:
            path = target.split(b"?", 1)[0].decode("ascii", "replace")
            try:
                handler, _ = self._gateway.router.resolve(request.method.decode("ascii", "replace"), path)
            except HttpError:
                return None
            mine = handler == self._proxy
            if len(rest) <= ANSWER_TARGET:  # (a path of up to 64 KiB would make 4096 of them 256 MiB)
                if len(self._routes) >= ROUTE_CACHE:
                    self._routes.clear()
                self._routes[route] = mine
        if not mine:
            return None  # e.g. the stats endpoint, or a tcp tunnel's /tcp
        token = target[len(PREFIX):end].decode("ascii", "replace")
        if row is None:
            row = self._cached_session(token)
            if row is None:
                return self._resolve_slowly(request, token)
        agent = self._gateway.registry.get(row.team_id, row.agent_id)
        if agent is None:
            raise ProxyError(503, "agent_offline", "the tunnel's agent is not connected")
        session = agent.session
        parts = self._parts.get(token)
        if parts is None or parts[0] is not row or parts[1] is not session:
            parts = self._upstream_parts(row, session, target[:end])
            if len(self._parts) >= SESSION_CACHE:
                self._parts.clear()
            self._parts[token] = parts
        _, _, open_stream, key, headers, host, stats, host_override = parts
        return Upstream(open_stream=open_stream, key=key, target=target[end:], headers=headers,
                        host=host, stats=stats, prefix=headers[0][1], host_override=host_override), session

    def _upstream_parts(self, row: TunnelSession, session: "MuxSession", prefix: bytes) -> tuple:
        """What every request to one session through one agent connection shares:
        ``(row, session, open_stream, key, headers, host, stats, host_override)``; the
        override is the session's ``host_header`` (for targets that check Host)."""
        meta = {"protocol": "http", "target": f"127.0.0.1:{row.target_port}"}

        def open_stream() -> MuxStream:
            try:
                return session.open_stream_nowait(meta)
            except (SessionClosedError, ConnectionError) as exc:
                raise ProxyError(503, "agent_offline", f"the tunnel's agent is not reachable: {exc}") from None

        return (row, session, open_stream, (id(session), row.target_port),
                [(b"x-forwarded-prefix", prefix)], f"127.0.0.1:{row.target_port}".encode(),
                self.stats(row.session_id, row.team_id), session_host_header(row))

    async def _resolve_slowly(self, request: RequestHead, token: str) -> Optional[Upstream]:
        try:
            row = await self._open_http_session(token)
        except StoreError as exc:
            raise ProxyError(503, "store_unavailable", store_failure("HTTP tunnel URL", exc)) from None
        # The session is in memory now: the usual path, answer cache included.
        upstream = self._resolve(request)
        if upstream is None or isinstance(upstream, Upstream):
            return upstream
        upstream.close()  # dropped from memory meanwhile (a session closed): no second wait
        answer = self._resolve_fully(request, row)
        return None if answer is None else answer[0]

    def _cached_session(self, token: str) -> Optional[TunnelSession]:
        """The open http session of ``token`` from memory (None: not there)."""
        store = self._gateway.store
        if self._sessions_version != store.tunnel_sessions_version:
            self._sessions.clear()  # something was closed: its token must stop working now
            self._sessions_version = store.tunnel_sessions_version
        return self._sessions.get(token)

    async def _open_http_session(self, token: str) -> TunnelSession:
        """The open http session of ``token`` (cached, else read and kept); 404 if none."""
        row = self._cached_session(token)
        if row is not None:
            return row
        version = self._sessions_version
        row = await self._gateway.store.get_tunnel_session_by_token(token)
        if row is None or row.protocol != "http":  # unknown, closed, or a tcp tunnel
            raise ProxyError(404, "tunnel_not_found", "no such open http tunnel")
        sessions = self._sessions
        if self._gateway.store.tunnel_sessions_version == version:  # nothing closed meanwhile
            if len(sessions) >= SESSION_CACHE:
                sessions.clear()
            sessions[token] = row
        return row

    # -- plain routes

    async def _add_slash(self, request: Request) -> Response:
        """``/tunnel/{token}`` -> ``/tunnel/{token}/``: relative links need the slash."""
        location = f"/tunnel/{request.params['token']}/"
        query = request.target.partition("?")[2]
        if query:
            location += "?" + query
        return json_response({"location": location}, 308, {"Location": location})

    async def _admin_session(self, request: Request) -> TunnelSession:
        """The open http session of the URL's token, if the admin token matches."""
        try:
            row = await self._open_http_session(request.params["token"])
        except ProxyError as exc:
            raise HttpError(exc.status, exc.code, exc.message) from None
        admin = request.header(ADMIN_HEADER)
        if not admin:
            raise HttpError(401, "admin_token_required", f"send the session's admin_token in {ADMIN_HEADER}")
        if await self._gateway.store.check_tunnel_admin_token(row.session_id, admin) is None:
            raise HttpError(403, "invalid_admin_token", "wrong admin_token for this tunnel session")
        return row

    async def _admin_stats(self, request: Request) -> Response:
        row = await self._admin_session(request)
        online = self._gateway.registry.get(row.team_id, row.agent_id) is not None
        return json_response({
            "session_id": row.session_id,
            "agent_id": row.agent_id,
            "agent_online": online,
            "target_port": row.target_port,
            "tunnel_protocol": row.protocol,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row.created_at)),
            **self.stats(row.session_id, row.team_id).as_dict(),
        })

    async def _admin_close(self, request: Request) -> Response:
        row = await self._admin_session(request)
        tunnels = self._gateway.tunnels
        assert tunnels is not None
        closed = await tunnels.close(row.team_id, row.agent_id, row.session_id)
        self.session_closed(row.session_id)
        return json_response({"closed": closed})
