"""The gateway: store + authentication + HTTP server + agent registry + tunnels.

Endpoints (one listening address):

* ``GET /healthz`` -> ``{"status": "ok", ...}``; ``GET /metrics`` (Prometheus);
  ``GET /`` and ``/dashboard/``: the web dashboard (relay.gateway.web.dashboard).
* ``GET /api/v1/agent/connect``: the agent endpoint. WebSocket upgrade with
  ``Authorization: Bearer ak-...``; a missing or bad key is answered 401 (JSON) before
  any upgrade. After the 101 the connection carries one mux session (the gateway is the
  ``client=False`` side) in WebSocket binary messages.
* ``GET /api/v1/agents``, ``GET /api/v1/agents/{agent_id}`` (sk-, dk-, JWT).
* ``POST /api/v1/agents/{agent_id}/tunnel`` (seed 000; runtime: sk-, dk-, JWT; optional
  ``ttl`` and ``idle_timeout`` in seconds, relay.gateway.agents.session_lifetime) and
  ``DELETE /api/v1/agents/{agent_id}/tunnel[?session_id=...]`` (management: sk-, JWT;
  a dk- key gets 403).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from relay import __version__
from relay.aio import MuxSession, WebSocketTransport
from relay.collector import settle
from relay.gateway.agents.bindings import Bindings
from relay.gateway.agents.registry import AgentNameTaken, ConnectedAgent, Registry, end_session
from relay.gateway.agents.revocation import RevocationWatcher
from relay.gateway.agents.session_lifetime import DEFAULT_IDLE_TIMEOUT as SESSION_IDLE_TIMEOUT
from relay.gateway.agents.session_lifetime import DEFAULT_TTL as SESSION_TTL
from relay.gateway.agents.session_lifetime import MAX_SECONDS, parse_seconds
from relay.gateway.agents.tunnel_sessions import DEFAULT_TARGET_PORT, HubListener, TunnelManager, holds_agent
from relay.gateway.api.services import ServiceManager, add_services_openapi
from relay.gateway.api.tasks import TASK_OWNER, TaskManager
from relay.gateway.api.tunnels import TunnelsApi
from relay.gateway.auth import Authenticator, Principal
from relay.gateway.egress import EgressPolicy
from relay.gateway.fleet import Fleet, FleetConfig
from relay.gateway.fleet.peers import GATEWAY_HEADER, PEER_PATH, SECRET_HEADER, secret_matches
from relay.gateway.hooks import GatewayHooks, GatewaySession
from relay.gateway.http.proxy import ProxyError, Upstream, origin_form, serve_connection
from relay.gateway.http.server import HttpError, HttpProtocol, Request, Response, Router, json_response
from relay.gateway.http.traffic import BUCKETS, Traffic
from relay.gateway.http.tunnel_hosts import check_host_header, session_host_header
from relay.gateway.http.tunnel_proxy import HttpTunnels
from relay.gateway.store import (
    TUNNEL_SESSION_PROTOCOLS,
    SecretToken,
    Store,
    Team,
    ensure_default_team,
    open_store,
)
from relay.gateway.web.dashboard import Dashboard
from relay.gateway.web.terminal import CLOSE_REASONS, TerminalRoutes
from relay.mux.connection import MuxConfig
from relay.mux.datagrams import DEFAULT_IDLE_TIMEOUT
from relay.mux.errors import ErrorCode
from relay.ws.handshake import HandshakeError, accept_response, parse_upgrade_request, reject_response
from relay.ws.tcp_tunnel import MUX_SUBPROTOCOL

__all__ = ["AGENT_PATH", "Gateway", "run_gateway"]

log = logging.getLogger("relay.gateway")

AGENT_PATH = "/api/v1/agent/connect"
#: An agent must complete its SETTINGS exchange within this time after the upgrade.
HELLO_TIMEOUT = 10.0
#: How often connected agents' ``last_seen`` is refreshed in the store.
HEARTBEAT_INTERVAL = 30.0
#: An agent offline this long is gone for good: its tunnel sessions are closed. A
#: shorter absence (a restart, a network blip) keeps them, so hub ports and tunnel URLs
#: work again when it is back.
AGENT_GONE_GRACE = 600.0


#: Statuses an agent may report about itself (``tunnel`` and ``offline`` are the gateway's).
AGENT_REPORTED_STATUSES = ("idle", "busy", "unhealthy")


def _refuse_agent_stream(stream: Any) -> None:
    """Agents do not open streams towards the gateway (yet): refuse, never queue."""
    stream.refuse(ErrorCode.REFUSED, "the gateway accepts no streams from agents")


class Gateway:
    """One gateway instance. ``await start(host, port)``, later ``await close()``.

    ``public_url`` is what tunnel URLs are built from (default: ``http(s)://HOST:PORT``
    of the listening address). ``tunnel_domain``: every HTTP tunnel is also served at a
    host of its own under that domain (relay.gateway.http.tunnel_hosts). With ``ssl_context`` the address serves HTTPS/WSS (hub
    ports stay raw TCP).
    """

    def __init__(self, store: Store, *, public_url: Optional[str] = None,
                 hub_host: str = "127.0.0.1", public_hub_host: str = "0.0.0.0",
                 jwt_key: Optional[str] = None,
                 mux_config: Optional[MuxConfig] = None,
                 ssl_context: Optional[ssl.SSLContext] = None,
                 agent_gone_grace: float = AGENT_GONE_GRACE,
                 allow_private_egress: bool = False,
                 udp_idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 fleet: Optional[FleetConfig] = None,
                 tunnel_domain: Optional[str] = None,
                 session_ttl: float = SESSION_TTL,
                 session_idle_timeout: float = SESSION_IDLE_TIMEOUT) -> None:
        self.store = store
        self._session_ttl = session_ttl
        self._session_idle_timeout = session_idle_timeout
        #: How this gateway joins a fleet (None: a gateway on its own), and once
        #: started, its membership (relay.gateway.fleet).
        self._fleet_config = fleet
        self.fleet: Optional[Fleet] = None
        #: HTTP tunnels are also served at ``LABEL.tunnel_domain`` (relay.gateway.http.tunnel_hosts).
        self.tunnel_domain = tunnel_domain
        #: Where the gateway itself may connect (external services, webhooks):
        #: relay.gateway.egress. Never its own listening and hub ports.
        #: own_ports' last answer: (the hub ports it was made from, the port, the set).
        self._own_ports: Optional[tuple[frozenset[int], int, frozenset[int]]] = None
        self.egress = EgressPolicy(allow_private_egress, own_ports=self.own_ports,
                                   own_hosts=[h for h in (hub_host, public_hub_host) if h])
        self.auth = Authenticator(store, jwt_key)
        self.registry = Registry(store)
        #: Ends the sessions of agents whose key gets revoked (relay.gateway.agents.revocation).
        self.revocations = RevocationWatcher(store, self.registry)
        self._revocation_watch: Optional[asyncio.Task[None]] = None
        #: Programmatic hooks (relay.gateway.hooks; docs/EMBEDDING.md).
        self.hooks = GatewayHooks()
        #: Access log, per-tunnel/per-service series, recent requests (relay.gateway.http.traffic).
        self.traffic = Traffic()
        self._public_url = public_url
        self._hub_host = hub_host
        self._public_hub_host = public_hub_host
        self._udp_idle_timeout = udp_idle_timeout
        self._mux_config = mux_config
        self._ssl = ssl_context
        self._agent_gone_grace = agent_gone_grace
        self._gone_timers: dict[str, asyncio.TimerHandle] = {}
        self._heartbeat: Optional[asyncio.Task[None]] = None
        self._metrics_registry: Any = None
        self.tunnels: Optional[TunnelManager] = None
        self.router = Router()
        self._server: Optional[asyncio.AbstractServer] = None
        #: A worker of ``relay gateway --workers``: its own loopback address, which the
        #: fleet advertises (relay.gateway.fleet.workers).
        self._peer_server: Optional[asyncio.AbstractServer] = None
        self._connections: set[HttpProtocol] = set()
        self._agent_tasks: set[asyncio.Task[None]] = set()
        self.host = ""
        self.port = 0
        self._routes()

    @property
    def url(self) -> str:
        """The base URL clients use (``public_url`` or the listening address)."""
        if self._public_url:
            return self._public_url.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self._ssl else 'http'}://{host}:{self.port}"

    def own_ports(self) -> frozenset[int]:
        """The TCP ports this gateway listens on now: its address and every hub port.

        Asked on every hub connection (the loop check), so made again only when the hub
        ports or the address changed, not from every hub each time."""
        hubs = self.tunnels.hub_ports() if self.tunnels is not None else frozenset()
        cached = self._own_ports
        if cached is None or cached[0] is not hubs or cached[1] != self.port:
            ports = hubs | {self.port} if self.port else hubs
            cached = self._own_ports = (hubs, self.port, ports)
        return cached[2]

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, reuse_port: bool = False,
                    peer_listen: Optional[tuple[str, int]] = None) -> None:
        """Listen on ``host:port`` (0: an ephemeral port, see :attr:`port`).

        ``reuse_port``: bind with SO_REUSEPORT (the processes of ``relay gateway
        --workers`` share the port, the kernel spreads connections over them).
        ``peer_listen``: also serve, without TLS, on this address of this process alone
        (a worker's loopback port, the one its fleet peers dial)."""
        loop = asyncio.get_running_loop()
        if self._fleet_config is None:  # in a fleet, the store's agents may be other gateways'
            await self.store.mark_all_agents_offline()  # nobody is connected before we listen

        def serve() -> HttpProtocol:
            return HttpProtocol(self.router, self._connections)

        if peer_listen is not None:
            self._peer_server = await loop.create_server(serve, *peer_listen)
        if reuse_port:
            # A shared port: other processes already serve it, so this one joins only
            # once it can answer for the whole fleet (below). The port is known.
            if port == 0:
                raise ValueError("reuse_port needs a port chosen beforehand, not 0")
            self.host, self.port = host, port
        else:
            self._server = await loop.create_server(serve, host, port, ssl=self._ssl)
            sockname = self._server.sockets[0].getsockname()
            self.host, self.port = sockname[0], sockname[1]
        self.egress.add_own_host(self.host)
        self.tunnels = TunnelManager(self.store, self.registry, public_url=self.url,
                                     hub_host=self._hub_host, public_hub_host=self._public_hub_host,
                                     egress=self.egress,
                                     udp_idle_timeout=self._udp_idle_timeout,
                                     tunnel_domain=self.tunnel_domain,
                                     session_ttl=self._session_ttl,
                                     session_idle_timeout=self._session_idle_timeout)
        self.tunnels.reuse_port = self._fleet_config is not None
        self.tunnels.closed_listeners.append(self.terminals.sessions_closed)
        self.tunnels.activity_probes.append(self.http_tunnels.activity)
        self.tunnels.activity_probes.append(self.terminals.activity)
        self.tunnels.on_expired = self._close_sessions
        if self._fleet_config is not None:
            self.fleet = Fleet(self, self._fleet_config)
            # The tasks' rows are shared by the fleet: a restart recovers only its own.
            self.tasks.owner = f"{TASK_OWNER}/{self.fleet.gateway_id}"
            # Join before any hub port opens: in a fleet they are shared with the other
            # gateways, and a connection landing here must find agents held elsewhere.
            await self.fleet.start(self.url)
        await self.tunnels.restore()
        self.tunnels.start_sweeping()
        await self.tunnels_api.start()
        await self.services.start()
        await self.tasks.start()
        if self.fleet is not None:
            self.tunnels_api.follow_fleet()  # every gateway listens on every tunnel's hub port
        if reuse_port:
            self._server = await loop.create_server(serve, host, port, ssl=self._ssl, reuse_port=True)
        self._heartbeat = loop.create_task(self._record_heartbeats())
        self._revocation_watch = loop.create_task(self.revocations.run())

    async def _record_heartbeats(self) -> None:
        """Refresh ``last_seen`` of connected agents. Liveness itself is the mux
        keepalive: a silent agent's session ends, and with it its registration."""
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            for entry in self.registry.connected():
                try:
                    await self.store.touch_agent(entry.team_id, entry.agent_id)
                except Exception as exc:  # a busy database must not stop the loop
                    log.warning("cannot record heartbeat of agent %s: %s", entry.agent_id, exc)

    async def close(self) -> None:
        """Stop listening, drop agents and HTTP connections, stop hub ports."""
        for server in (self._server, self._peer_server):
            if server is not None:
                server.close()
        if self.fleet is not None:  # first: its leases are released while Redis is still asked
            await self.fleet.close()
        for task in (self._heartbeat, self._revocation_watch):
            if task is not None:
                task.cancel()
        for timer in self._gone_timers.values():
            timer.cancel()
        self._gone_timers.clear()
        for conn in list(self._connections):
            conn.close()
        await self.tunnels_api.close()
        await self.services.close()
        self.tasks.close()
        if self.tunnels is not None:
            await self.tunnels.shutdown()
        self.registry.abort_all()
        for task in list(self._agent_tasks):
            task.cancel()
        if self._agent_tasks:
            await asyncio.gather(*self._agent_tasks, return_exceptions=True)
        await self.registry.writes.flush()  # the agents' offline rows, before the store closes
        await self.tasks.flush()  # and the tasks' last changes
        for server in (self._server, self._peer_server):
            if server is not None:
                await server.wait_closed()

    # ------------------------------------------------------------------ routes

    def _routes(self) -> None:
        add = self.router.add
        add("GET", "/healthz", self._healthz)
        add("GET", "/metrics", self._metrics)
        add("GET", "/api/v1/openapi.json", self._openapi)
        add("GET", AGENT_PATH, self._agent_connect)
        add("GET", PEER_PATH, self._peer_connect)
        add("GET", "/api/v1/agents", self._list_agents)
        add("GET", "/api/v1/agents/{agent_id}", self._get_agent)
        add("POST", "/api/v1/agents/{agent_id}/tunnel", self._open_tunnel)
        add("DELETE", "/api/v1/agents/{agent_id}/tunnel", self._close_tunnel)
        # Raw: an HTTP tunnel's own GET /tcp is handed to the proxy untouched (body unread).
        add("GET", "/tunnel/{token}/tcp", self._tcp_over_ws, raw=True)
        add("GET", "/tunnel/{token}/udp", self._udp_over_ws, raw=True)
        self.bindings = Bindings(self)  # seed 002's connect: agents listening for tunnels
        self.tunnels_api = TunnelsApi(self)  # seed 002: /api/v1/tunnels, shares, webhooks
        self.tunnels_api.register(self.router)
        self.tasks = TaskManager(self)  # seed 001: /api/v1/tasks
        self.tasks.register(self.router)
        self.services = ServiceManager(self)  # seeds 003/004: /api/v1/r/containers, /r/invoke
        self.services.register(self.router)
        self.dashboard = Dashboard(self)  # / and /dashboard/: the team's page in a browser
        self.dashboard.register(self.router)
        self.terminals = TerminalRoutes(self)  # /tunnel/{token}/_relay/terminal: agents' shells in a tab
        self.terminals.register(add)
        # Last: its /tunnel/{token}/... catch-all must not shadow the routes above.
        self.http_tunnels = HttpTunnels(self, self._connections)
        self.http_tunnels.install(self.tunnel_domain)

    async def _principal(self, request: Request) -> Principal:
        """The API caller (sk-, dk-, JWT); 401/400/403 as AuthError."""
        principal = await self.auth.authenticate(request.header("authorization"), request.header("x-team-id"))
        return principal.require_runtime()

    async def _healthz(self, request: Request) -> Response:
        body: dict[str, Any] = {"status": "ok", "version": __version__,
                                "agents_online": len(self.registry.connected())}
        if self.fleet is not None:
            # Still 200 without Redis: the agents held here are served (a load
            # balancer should keep sending their traffic); "degraded" says the rest.
            body["fleet"] = self.fleet.health()
            if not self.fleet.redis_up:
                body["status"] = "degraded"
        return json_response(body)

    # ------------------------------------------------------------------ fleet

    def fleet_publish(self, kind: str, **data: Any) -> None:
        """Tell the other gateways of the fleet to forget ``kind`` (no-op alone)."""
        if self.fleet is not None:
            self.fleet.publish(kind, **data)

    def invalidate(self, kind: str, message: dict[str, Any]) -> None:
        """Another gateway (or ``relay admin``) changed what our caches hold: forget it
        now, as a change made here would (relay.gateway.fleet, INVALIDATIONS)."""
        ids = [i for i in message.get("ids", ()) if isinstance(i, str)] if isinstance(message.get("ids"), list) else []
        if kind == "credentials":
            self.auth.forget()
            self.revocations.forget()
            self.revocations.check_soon()  # expel agents and cut connections of a revoked key now
        elif kind == "tunnel_sessions":  # closed (ids) or opened (opened) at another gateway
            if ids:  # closed: the HTTP tunnels' token caches start over (an opening leaves them)
                self.store.tunnel_sessions_version += 1
            for session_id in ids:
                self.http_tunnels.session_closed(session_id)
            self.terminals.sessions_closed(ids)
            if self.tunnels is not None:
                self.tunnels.closed_elsewhere(ids)
            if message.get("opened"):
                self.tunnels_api.sync_soon()  # its hub port listens here too (sync_sessions)
            team_id, agent_id = message.get("team"), message.get("agent")
            entry = self.registry.local(team_id, agent_id) \
                if isinstance(team_id, str) and isinstance(agent_id, str) else None
            if entry is not None and entry.status in ("idle", "tunnel"):
                self.rest(entry)  # held here: ``tunnel`` while it has sessions, else idle
        elif kind == "tunnels":
            self.tunnels_api.sync_soon()  # created, resumed, paused, deleted: hub ports follow
            if message.get("status") in ("paused", "deleted"):
                shares = message.get("shares")
                shares = [i for i in shares if isinstance(i, str)] if isinstance(shares, list) else []
                for tunnel_id in ids:
                    self.tunnels_api.stopped_elsewhere(tunnel_id, shares)
        elif kind == "shares":
            self.tunnels_api.share_proxy.forget(ids)
            for share_id in ids:
                self.tunnels_api.limiter.forget(share_id)
        elif kind == "services":
            self.services.forget()

    async def _peer_connect(self, request: Request) -> Optional[Response]:
        """Another gateway of the fleet opens its peer session (relay.gateway.fleet.peers):
        401 before any upgrade unless it proves the fleet secret and, with mutual TLS,
        presented a certificate the fleet's CA signed (the TLS handshake verified it)."""
        fleet = self.fleet
        if fleet is None:
            raise HttpError(404, "not_found", "this gateway is not part of a fleet")
        if fleet.config.ca_file is not None and request.client_certificate is None:
            log.warning("refused a peer session: no client certificate signed by the fleet's CA")
            raise HttpError(401, "fleet_certificate_required",
                            "a peer session needs a client certificate signed by the fleet's CA")
        if fleet.config.secret and not secret_matches(fleet.config.secret, request.header(SECRET_HEADER)):
            log.warning("refused a peer session: wrong or missing fleet secret")
            raise HttpError(401, "invalid_fleet_secret", "wrong or missing fleet secret")
        peer_id = (request.header(GATEWAY_HEADER) or "")[:100]
        try:
            upgrade = parse_upgrade_request(request.raw)
        except HandshakeError as exc:
            raise HttpError(exc.status_code, "bad_websocket_upgrade", exc.message) from None
        transport, leftover = request.take_over()
        transport.write(accept_response(upgrade))
        from relay.gateway.fleet.forward import serve_forwarded

        session = MuxSession(False, self._mux_config, on_stream=lambda stream: serve_forwarded(fleet, stream))
        WebSocketTransport.attach(transport, session, client=False, initial=leftover)
        transport.resume_reading()
        fleet.peers.accepted(peer_id, session)
        log.info("peer session from gateway %s accepted", peer_id)
        return None

    async def _openapi(self, request: Request) -> Response:
        return json_response(add_services_openapi(
            self.tasks.openapi(self.tunnels_api.openapi(openapi_document(self.url)))))

    async def _metrics(self, request: Request) -> Response:
        """Prometheus text exposition (no auth, like /healthz: numbers, no secrets)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if self._metrics_registry is None:
            from prometheus_client import CollectorRegistry

            self._metrics_registry = CollectorRegistry(auto_describe=False)
            self._metrics_registry.register(_GatewayCollector(self))
        return Response(200, generate_latest(self._metrics_registry), content_type=CONTENT_TYPE_LATEST)

    async def _list_agents(self, request: Request) -> Response:
        principal = await self._principal(request)
        agents = await self.store.list_agents(principal.team_id)
        return json_response({"agents": [self.registry.describe(a) for a in agents]})

    async def _team_agent(self, principal: Principal, agent_id: str) -> Any:
        agent = await self.store.get_agent(principal.team_id, agent_id)
        if agent is None:  # unknown, malformed, or another team's: all the same 404
            raise HttpError(404, "agent_not_found", f"no agent {agent_id} in this team")
        return agent

    async def _get_agent(self, request: Request) -> Response:
        principal = await self._principal(request)
        agent = await self._team_agent(principal, request.params["agent_id"])
        body = self.registry.describe(agent)
        assert self.tunnels is not None
        body["tunnels"] = await self.tunnels.sessions(principal.team_id, agent.id)
        return json_response(body)

    async def _open_tunnel(self, request: Request) -> Response:
        principal = await self._principal(request)
        body = request.json()
        if not isinstance(body, dict):
            raise HttpError(400, "invalid_request", "request body must be a JSON object")
        port = body.get("target_port", DEFAULT_TARGET_PORT)
        if port is None:
            port = DEFAULT_TARGET_PORT
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise HttpError(400, "invalid_target_port", "target_port must be an integer from 1 to 65535")
        protocol = body.get("tunnel_protocol", "http")
        if protocol is None:
            protocol = "http"
        if protocol not in TUNNEL_SESSION_PROTOCOLS:
            raise HttpError(400, "invalid_tunnel_protocol",
                            f"tunnel_protocol must be one of {', '.join(TUNNEL_SESSION_PROTOCOLS)}")
        for field in ("ttl", "idle_timeout"):  # absent or null: the gateway's default
            error = parse_seconds(body, field, 0.0) if body.get(field) is not None else None
            if error is not None:
                raise HttpError(400, f"invalid_{field}", error)
        host_header = body.get("host_header")
        if host_header is not None:
            bad_host = check_host_header(host_header) if protocol == "http" else "host_header is for http tunnels"
            if bad_host is not None:
                raise HttpError(400, "invalid_host_header", bad_host)
        agent = await self._team_agent(principal, request.params["agent_id"])
        if self.registry.get(principal.team_id, agent.id) is None:
            raise HttpError(409, "agent_offline", f"agent {agent.id} ({agent.name}) is not connected")
        assert self.tunnels is not None
        refusal = self.tunnels.target_refusal(principal.team_id, agent.id, "127.0.0.1", port)
        if refusal is not None:  # the agent would refuse every request, or a loop
            raise HttpError(*refusal)
        return json_response(await self.tunnels.open(principal.team_id, agent.id, port, protocol, host_header,
                                                     ttl=body.get("ttl"), idle_timeout=body.get("idle_timeout")))

    async def _close_tunnel(self, request: Request) -> Response:
        # Closing sessions is management (seed 002: deleting a tunnel is; SPEC: dk- keys
        # are runtime only): a dk- key may open and use tunnels, not end other people's.
        # The opener keeps its own way to close one: the session's admin_token.
        principal = (await self._principal(request)).require_manage()
        agent = await self._team_agent(principal, request.params["agent_id"])
        session_id = request.query_value("session_id")
        closed = await self._close_sessions(principal.team_id, agent.id, session_id)
        if session_id is not None and not closed:
            raise HttpError(404, "tunnel_not_found", f"no open tunnel session {session_id} on this agent")
        return json_response({"closed": closed})

    async def _close_sessions(self, team_id: str, agent_id: str, session_id: Optional[str] = None) -> list[str]:
        """Close tunnel sessions (one, or all of the agent's) and cut what runs through
        them now: hub ports stop (TunnelManager.close), and the live client connections
        of an HTTP tunnel, WebSockets included, are closed, as the admin close does."""
        assert self.tunnels is not None
        closed = await self.tunnels.close(team_id, agent_id, session_id)
        for sid in closed:
            self.http_tunnels.session_closed(sid)
        return closed

    async def _udp_over_ws(self, request: Request) -> Optional[Response]:
        """``GET /tunnel/{token}/udp``: a udp tunnel's datagrams over WebSocket (``relay
        connect --udp``; docs/PROTOCOL.md section 16.2), else an HTTP tunnel's own path."""
        return await self._tcp_over_ws(request, "udp")

    async def _tcp_over_ws(self, request: Request, protocol: str = "tcp") -> Optional[Response]:
        """``GET /tunnel/{token}/tcp`` (a raw route, called at headers time).

        For a tcp tunnel, the TCP-over-WS relay at its ``tunnel_url``: the token in the URL
        is the credential; each WebSocket connection becomes one stream to the target, or,
        offered the subprotocol ``relay.mux.v1`` (``relay connect``), carries a mux session
        whose every stream is one (relay.gateway.agents.tunnel_mux). For anything else the
        path is an HTTP tunnel's own ``/tcp``: the connection is proxied like every other path
        of the tunnel (unknown or closed tokens get its 404)."""
        row = await self.store.get_tunnel_session_by_token(request.params["token"])
        if row is None or row.protocol != protocol:
            transport, data = request.take_over_raw()
            serve_connection(transport, data, self._http_tunnel_tcp_path,
                             fallback=lambda declined=False: HttpProtocol(
                                 self.router, self._connections, declined=declined),
                             connections=self._connections)
            return None
        assert self.tunnels is not None
        hub = self.tunnels.hub(row.session_id)
        if hub is None and self.fleet is not None:
            # Opened at another gateway, whose hub port is not ours: a connection here
            # is a stream like any (forwarded if the agent is held elsewhere).
            hub = HubListener(row.session_id, row.team_id, row.agent_id, row.target_port)
        if hub is None:  # closed: 404
            raise HttpError(404, "tunnel_not_found", f"no such open {protocol} tunnel")
        if self.registry.get(row.team_id, row.agent_id) is None:
            raise HttpError(503, "agent_offline", "the tunnel's agent is not connected")
        try:
            upgrade = parse_upgrade_request(request.raw)
        except HandshakeError as exc:
            raise HttpError(exc.status_code, "bad_websocket_upgrade", exc.message,
                            {k.decode(): v.decode() for k, v in exc.headers}) from None
        transport, leftover = request.take_over()
        if protocol == "tcp" and MUX_SUBPROTOCOL in upgrade.subprotocols:
            # relay connect: one mux session, a stream per connection (PROTOCOL.md 14.1).
            transport.write(accept_response(upgrade, subprotocol=MUX_SUBPROTOCOL))
            self.tunnels.serve_mux(hub, transport, leftover, self._mux_config)
            return None
        transport.write(accept_response(upgrade))
        self.tunnels.serve_websocket(hub, transport, leftover)
        return None

    def _http_tunnel_tcp_path(self, request: Any) -> Optional[Awaitable[Optional[Upstream]]]:
        """Resolver of connections handed over by :meth:`_tcp_over_ws`: ``GET``/``HEAD
        /tunnel/{token}/tcp[?query]`` of an open HTTP tunnel goes to its target like any
        other path (same Upstream as relay.gateway.http.tunnel_proxy builds, after a
        store lookup); every other request goes back to the HTTP server (None), which
        routes it as usual."""
        target = origin_form(request.target)  # absolute-form: keep the path
        path = target.split(b"?", 1)[0]
        if request.method not in (b"GET", b"HEAD") or not path.startswith(b"/tunnel/") \
                or not path.endswith((b"/tcp", b"/udp")) or path.count(b"/") != 3:
            return None
        return self._http_tunnel_tcp_upstream(target, len(path) - len(b"/tcp"))

    async def _http_tunnel_tcp_upstream(self, target: bytes, end: int) -> Optional[Upstream]:
        token = target[len(b"/tunnel/"):end].decode("ascii", "replace")
        row = await self.store.get_tunnel_session_by_token(token)
        if row is None or row.protocol != "http":
            if row is not None and row.protocol in ("tcp", "udp"):
                return None  # a tcp (udp) tunnel's relay: the HTTP server's route answers
            raise ProxyError(404, "tunnel_not_found", "no such open http tunnel")
        agent = self.registry.get(row.team_id, row.agent_id)
        if agent is None:
            raise ProxyError(503, "agent_offline", "the tunnel's agent is not connected")
        session = agent.session
        meta = {"protocol": "http", "target": f"127.0.0.1:{row.target_port}"}

        def open_stream() -> Any:
            try:
                return session.open_stream_nowait(meta)
            except ConnectionError as exc:  # SessionClosedError included
                raise ProxyError(503, "agent_offline", f"the tunnel's agent is not reachable: {exc}") from None

        return Upstream(open_stream=open_stream, key=(id(session), row.target_port), target=target[end:],
                        headers=[(b"x-forwarded-prefix", target[:end])], prefix=target[:end],
                        host_override=session_host_header(row),
                        host=f"127.0.0.1:{row.target_port}".encode(),
                        stats=self.http_tunnels.stats(row.session_id, row.team_id))

    # ------------------------------------------------------------------ agent endpoint

    async def _agent_connect(self, request: Request) -> Optional[Response]:
        """Authenticate (401 before upgrading), upgrade, and run the agent's session."""
        principal = await self.hooks.run_authenticate(
            request, await self.auth.agent_default(request.header("authorization")))
        try:
            upgrade = parse_upgrade_request(request.raw)
        except HandshakeError as exc:
            transport, _ = request.take_over()
            transport.write(reject_response(exc))
            transport.close()
            return None
        transport, leftover = request.take_over()
        transport.write(accept_response(upgrade))
        # Handlers, not queues: nobody reads a queue here, and an unread control queue
        # would pause the session (backpressure) for good.
        holder: dict[str, Any] = {}
        session = GatewaySession(self.hooks, False, self._mux_config, on_stream=_refuse_agent_stream,
                                 on_control=lambda message: self._agent_control(holder, message))
        WebSocketTransport.attach(transport, session, client=False, initial=leftover)
        transport.resume_reading()  # HTTP paused it while the handler ran
        task = asyncio.get_running_loop().create_task(self._serve_agent(principal, session, holder))
        self._agent_tasks.add(task)
        task.add_done_callback(self._agent_tasks.discard)
        return None

    def _agent_control(self, holder: dict[str, Any], message: Any) -> None:
        """A control message from an agent. ``{"type": "status", "status": "idle" | "busy"
        | "unhealthy"}`` records what the agent reports (a gateway-owned ``tunnel`` status
        wins while tunnels are open); anything else is ignored."""
        entry = holder.get("entry")
        if entry is not None and isinstance(message, dict) and self.tasks.on_control(entry, message):
            return
        if entry is not None and self.bindings.on_control(entry, message):
            return
        if entry is None or not isinstance(message, dict) or message.get("type") != "status":
            return
        status = message.get("status")
        if status not in AGENT_REPORTED_STATUSES:
            return
        if status == "idle":
            self.rest(entry)
        else:
            self.registry.set_status(entry.team_id, entry.agent_id, status)

    def rest(self, entry: ConnectedAgent) -> None:
        """Make a connected agent ``idle``, or ``tunnel`` while it has open tunnel
        sessions (a gateway-owned status that wins over the agent's own ``idle``). The
        store is asked first, so the status is set a moment later, and only if no other
        status change came meanwhile (the newest wins)."""
        entry.status_seq += 1
        task = asyncio.get_running_loop().create_task(self._rest(entry, entry.status_seq))
        self._agent_tasks.add(task)
        task.add_done_callback(self._agent_tasks.discard)

    async def _rest(self, entry: ConnectedAgent, seq: int) -> None:
        try:
            sessions = await self.store.list_tunnel_sessions(entry.team_id, entry.agent_id)
            status = "tunnel" if holds_agent(sessions) else "idle"
        except Exception as exc:  # cannot tell: the agent's own word
            log.warning("cannot read the tunnel sessions of agent %s: %s", entry.agent_id, exc)
            status = "idle"
        if entry.status_seq == seq:
            self.registry.set_status(entry.team_id, entry.agent_id, status)

    async def _serve_agent(self, principal: Principal, session: GatewaySession,
                           holder: dict[str, Any]) -> None:
        """Register the agent once its SETTINGS arrived; unregister when it goes."""
        peer = session.get_extra_info("peername")
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                info = await session.wait_established()
        except (TimeoutError, ConnectionError) as exc:
            log.warning("agent connection from %s ended before its hello: %s", peer, exc or "timeout")
            session.abort(ErrorCode.TIMEOUT, "no SETTINGS")
            return
        assert principal.credential_id is not None
        try:
            entry = await self.registry.admit(principal.team_id, principal.credential_id, info, session)
        except AgentNameTaken as exc:  # a live agent holds this key and name: it keeps them
            end_session(session, exc.error_code, exc.message)
            return
        except ConnectionError as exc:
            log.info("agent connection from %s ended before it was registered: %s", peer, exc)
            return
        except Exception as exc:  # a store failure must not leave a half-registered agent
            log.error("cannot register agent from %s: %s", peer, exc)
            session.abort(ErrorCode.INTERNAL_ERROR, "registration failed")
            return
        holder["entry"] = session.agent = entry
        try:
            assert self.tunnels is not None
            seq = entry.status_seq
            if holds_agent(await self.store.list_tunnel_sessions(principal.team_id, entry.agent_id)) \
                    and entry.status_seq == seq:
                self.registry.set_status(principal.team_id, entry.agent_id, "tunnel")
            session.send_control({"type": "welcome", "agent_id": entry.agent_id,
                                  "team_id": entry.team_id})
            await self.bindings.agent_connected(entry)  # what it listened on before it went
            self.hooks.fire(self.hooks.on_agent_connected, entry)
            await session.wait_closed()
        finally:
            self.registry.unregister(entry)
            self.hooks.fire(self.hooks.on_agent_disconnected, entry)
            # entry.session, session.agent and the control callback's holder refer to each
            # other: undone here so the session is freed as soon as it ends.
            session.agent = None
            holder.clear()
            if not self.registry.is_online(entry.agent_id):
                self._schedule_gone(entry.team_id, entry.agent_id)

    def _schedule_gone(self, team_id: str, agent_id: str) -> None:
        """Close the agent's tunnels if it stays away for ``agent_gone_grace`` seconds."""
        old = self._gone_timers.pop(agent_id, None)
        if old is not None:
            old.cancel()

        def gone() -> None:
            self._gone_timers.pop(agent_id, None)
            if self.registry.is_online(agent_id) or self.tunnels is None:
                return
            if self.registry.get(team_id, agent_id) is not None:
                return  # held by another gateway of the fleet: its tunnels stay
            task = asyncio.get_running_loop().create_task(close())
            self._agent_tasks.add(task)
            task.add_done_callback(self._agent_tasks.discard)

        async def close() -> None:
            try:
                closed = await self._close_sessions(team_id, agent_id)
            except Exception as exc:  # the next start closes them (or the agent is back)
                log.warning("cannot close the tunnels of agent %s, gone: %s", agent_id, exc)
                return
            if closed:
                log.info("agent %s gone for %.0fs: closed its tunnels %s", agent_id,
                         self._agent_gone_grace, ", ".join(closed))

        self._gone_timers[agent_id] = asyncio.get_running_loop().call_later(self._agent_gone_grace, gone)


def openapi_document(server_url: str) -> dict[str, Any]:
    """The OpenAPI 3 description of the control API served at ``/api/v1/openapi.json``."""
    error = {"$ref": "#/components/responses/Error"}
    agent_id = {"name": "agentId", "in": "path", "required": True, "schema": {"type": "string"}}
    team = {"name": "X-Team-ID", "in": "header", "required": False,
            "schema": {"type": "string", "format": "uuid"},
            "description": "Required with a user JWT; ignored with sk-/dk- credentials."}
    agent_schema = {"type": "object", "properties": {
        "agent_id": {"type": "string"}, "name": {"type": "string"},
        "labels": {"type": "array", "items": {"type": "string"}}, "version": {"type": "string"},
        "status": {"type": "string", "enum": ["idle", "busy", "tunnel", "unhealthy", "offline"]},
        "online": {"type": "boolean"},
        "terminal": {"type": "boolean", "description": "the agent serves the web terminal (started with "
                                                        "--terminal SHELL); false while it is offline"},
        "gateways": {"type": "array", "items": {"type": "string"},
                     "description": "in a fleet only: the ids of the gateways holding a session of the agent "
                                    "(several with relay agent --connections; empty when offline)"}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "relay gateway API", "version": __version__},
        "servers": [{"url": server_url + "/api/v1"}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Agent": agent_schema, "Error": {"type": "object", "properties": {
                "error": {"type": "object", "properties": {"code": {"type": "string"},
                                                           "message": {"type": "string"}}}}}},
            "responses": {"Error": {"description": "Error", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Error"}}}}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/agents": {"get": {"summary": "List the team's agents", "parameters": [team], "responses": {
                "200": {"description": "Agents", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"agents": {"type": "array", "items": {
                        "$ref": "#/components/schemas/Agent"}}}}}}},
                "401": error, "403": error}}},
            "/agents/{agentId}": {"get": {"summary": "Get an agent", "parameters": [agent_id, team],
                                          "responses": {"200": {"description": "Agent", "content": {
                                              "application/json": {"schema": {"$ref": "#/components/schemas/Agent"}}}},
                                              "401": error, "404": error}}},
            "/agents/{agentId}/tunnel": {
                "post": {"summary": "Open tunnel", "parameters": [agent_id, team],
                         "requestBody": {"content": {"application/json": {"schema": {"type": "object", "properties": {
                             "target_port": {"type": "integer", "minimum": 1, "maximum": 65535, "default": DEFAULT_TARGET_PORT},
                             "tunnel_protocol": {"type": "string", "enum": list(TUNNEL_SESSION_PROTOCOLS),
                                                 "default": "http"},
                             "host_header": {"type": "string", "maxLength": 255,
                                             "description": "http only: the Host the target gets instead of "
                                                            "the client's (HOST or HOST:PORT)"},
                             "ttl": {"type": "number", "minimum": 0, "maximum": MAX_SECONDS, "nullable": True,
                                     "description": "seconds until the session closes (0: never; default: "
                                                    "the gateway's --session-ttl, none unless set)"},
                             "idle_timeout": {"type": "number", "minimum": 0, "maximum": MAX_SECONDS,
                                              "nullable": True,
                                              "description": "seconds without traffic after which the session "
                                                             "closes (0: never; default: the gateway's "
                                                             "--session-idle-timeout, 3600)"}}}}}},
                         "responses": {"200": {"description": "Tunnel opened", "content": {"application/json": {
                             "schema": {"type": "object", "required": ["session_id", "tunnel_url", "admin_token"],
                                        "properties": {"session_id": {"type": "string"}, "tunnel_url": {"type": "string"},
                                                       "admin_token": {"type": "string"},
                                                       "tunnel_protocol": {"type": "string",
                                                                           "enum": list(TUNNEL_SESSION_PROTOCOLS)},
                                                       "hub_port": {"type": "integer", "description": "tcp only"},
                                                       "expires_at": {"type": "string", "nullable": True,
                                                                      "description": "when the ttl ends (UTC)"},
                                                       "idle_timeout": {"type": "number"},
                                                       "tunnel_host_url": {
                                                           "type": "string",
                                                           "description": "http only, with --tunnel-domain"},
                                                       "terminal_url": {
                                                           "type": "string",
                                                           "description": "the web terminal's page, only when "
                                                                          "the agent serves one"}}}}}},
                                       "400": error, "401": error, "403": error, "404": error, "409": error}},
                "delete": {"summary": "Close one (session_id) or all of the agent's tunnel sessions",
                           "parameters": [agent_id, team, {"name": "session_id", "in": "query", "required": False,
                                                           "schema": {"type": "string"}}],
                           "responses": {"200": {"description": "Closed session ids"}, "401": error, "403": error,
                                         "404": error}},
            },
        },
    }


def _udp_datagrams(family: Any, stats: list[dict[str, int]]) -> Any:
    """``relay_udp_datagrams_total{direction="in"|"out"}`` over the UDP hubs' ``stats``."""
    metric = family("relay_udp_datagrams", "UDP datagrams relayed on the hub ports listening now "
                    "(in: from clients, out: to clients)", labels=["direction"])
    metric.add_metric(["in"], sum(s["datagrams_in"] for s in stats))
    metric.add_metric(["out"], sum(s["datagrams_out"] for s in stats))
    return metric


class _GatewayCollector:
    """Computes the gateway's metrics at scrape time from its live state (one registry
    per Gateway, so several gateways in one process do not collide)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        gw = self._gw
        agents = gw.registry.connected()
        yield GaugeMetricFamily("relay_agents_online", "Agents connected now", value=len(agents))
        yield GaugeMetricFamily("relay_agent_streams", "Open mux streams over all agent sessions",
                                value=sum(len(a.session.streams) for a in agents))
        tunnels = gw.tunnels
        hubs = tunnels.hubs() if tunnels is not None else []
        yield GaugeMetricFamily("relay_hub_ports", "TCP tunnel hub ports listening", value=len(hubs))
        yield GaugeMetricFamily("relay_tunnel_connections_active", "Tunnel connections open now",
                                value=sum(len(h.splices) for h in hubs))
        yield CounterMetricFamily("relay_tunnel_connections", "Tunnel connections accepted",
                                  value=tunnels.connections_total if tunnels is not None else 0)
        udp = [h.udp.as_dict() for h in hubs if h.udp is not None]
        yield GaugeMetricFamily("relay_udp_flows_active", "UDP tunnel flows open now",
                                value=sum(s["active_flows"] for s in udp))
        yield CounterMetricFamily("relay_udp_datagrams_dropped", "UDP datagrams dropped by a full "
                                  "queue (a slow reader) on the hub ports listening now",
                                  value=sum(s["datagrams_dropped"] for s in udp))
        yield _udp_datagrams(CounterMetricFamily, udp)
        refused = CounterMetricFamily("relay_tunnel_streams_refused", "Streams an agent refused",
                                      labels=["code"])
        for code, count in sorted((tunnels.refused if tunnels is not None else {}).items()):
            refused.add_metric([code], count)
        yield refused
        yield GaugeMetricFamily("relay_http_connections", "Open HTTP connections", value=len(gw._connections))
        yield from _terminal_families(gw.terminals)
        if gw.fleet is not None:
            yield from gw.fleet.metrics.families(gw.fleet.peers.connected(), len(gw.fleet.registry.locations))
        yield from _traffic_families(gw)


def _terminal_families(terminals: TerminalRoutes) -> Any:
    """The web terminal (relay.gateway.web.terminal): opened, refused by error code,
    closed by reason (every reason present, 0 until it happens), open now."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    yield CounterMetricFamily("relay_terminals_opened", "Web terminals opened (a shell started on an agent)",
                              value=terminals.opened_total)
    refused = CounterMetricFamily("relay_terminals_refused", "Web terminal openings refused, by error code "
                                  "(admin_token_required, invalid_admin_token, terminal_not_enabled, ...)",
                                  labels=["code"])
    for code, count in sorted(terminals.refused.items()):
        refused.add_metric([code], count)
    yield refused
    closed = CounterMetricFamily("relay_terminals_closed", "Web terminals closed, by reason", labels=["reason"])
    for reason in CLOSE_REASONS:
        closed.add_metric([reason], terminals.closed[reason])
    yield closed
    yield GaugeMetricFamily("relay_terminals_open", "Web terminals open now", value=terminals.open_now())


def _traffic_families(gw: "Gateway") -> Any:
    """Per tunnel and per service: requests by status class, bytes each way, a latency
    histogram, requests in flight; TCP tunnels' open connections; share refusals by
    reason, invoke outcomes, tasks (relay.gateway.http.traffic). Labels carry session ids and
    service slugs, never tokens."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    families = {}
    for kind, label in (("tunnel", "session_id"), ("service", "service")):
        labels = [label] if kind == "tunnel" else ["team_id", label]
        families[kind] = (
            CounterMetricFamily(f"relay_{kind}_http_requests", f"HTTP requests proxied to a {kind}, by status "
                                "class (none: the connection was cut before a status)", labels=labels + ["code"]),
            CounterMetricFamily(f"relay_{kind}_http_request_bytes", f"Request body bytes sent to a {kind}",
                                labels=labels),
            CounterMetricFamily(f"relay_{kind}_http_response_bytes", f"Response body bytes received from a {kind}",
                                labels=labels),
            HistogramMetricFamily(f"relay_{kind}_http_request_duration_seconds",
                                  f"Time from request head to the end of the response, per {kind}", labels=labels),
            GaugeMetricFamily(f"relay_{kind}_http_requests_active", f"HTTP requests to a {kind} in flight",
                              labels=labels),
        )
    for dest in list(gw.traffic.destinations.values()):
        requests, sent, received, latency, _ = families[dest.kind]
        values = [dest.name] if dest.kind == "tunnel" else [dest.team_id, dest.name]
        for code, count in sorted(dest.requests.items()):
            requests.add_metric(values + [code], count)
        sent.add_metric(values, dest.bytes_in)
        received.add_metric(values, dest.bytes_out)
        cumulative, buckets = 0, []
        for bound, count in zip([*(str(b) for b in BUCKETS), "+Inf"], dest.buckets, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        latency.add_metric(values, buckets, dest.duration_sum)
    for session_id, stats in list(gw.http_tunnels._stats.items()):
        families["tunnel"][4].add_metric([session_id], stats.active_requests)
    for (team_id, slug), state in list(gw.services._states.items()):
        families["service"][4].add_metric([team_id, slug], state.stats.active_requests)
    for group in families.values():
        yield from group
    hubs = gw.tunnels.hubs() if gw.tunnels is not None else []
    active = GaugeMetricFamily("relay_tcp_tunnel_connections_active", "Connections open now through a TCP "
                               "tunnel's hub port or its WebSocket URL", labels=["session_id"])
    for hub in hubs:
        if hub.session_id:
            active.add_metric([hub.session_id], len(hub.splices))
    yield active
    described = {"share_refusals": ("relay_share_refusals", "Share link requests refused, by reason", "reason"),
                 "invoke": ("relay_invoke_requests", "Invoke calls by outcome: status class, or the "
                            "gateway's error code", "outcome"),
                 "tasks": ("relay_tasks", "Tasks submitted and finished, by event", "event")}
    counters = {name: CounterMetricFamily(metric, text, labels=[label])
                for name, (metric, text, label) in described.items()}
    for (name, value), count in sorted(gw.traffic.counters.items()):
        if name in counters:
            counters[name].add_metric([value], count)
    yield from counters.values()
    tasks = GaugeMetricFamily("relay_tasks_current", "Known tasks by status now", labels=["status"])
    for status, count in sorted(gw.tasks.by_status().items()):
        tasks.add_metric([status], count)
    yield tasks


def _print_default_team(team: Team, keys: dict[str, SecretToken], store_url: Optional[str], data_dir: Path,
                        echo: Callable[[str], None]) -> None:
    echo(f"Created the default team {team.id}. Its keys (shown only now; store them safely):")
    for kind, key in keys.items():
        echo(f"  {kind}  {key}")
    where = f"--store {store_url}" if store_url else f"--data {data_dir}"
    if store_url and "@" in store_url:  # a database URL with a password: do not print it
        where = "--store URL"
    echo(f"  (more or lost ones: relay admin {where} key create --team default --kind sk|dk|ak)")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _mutual_tls_server_context(cert: Any, key: Any, ca_file: Path) -> ssl.SSLContext:
    """The listening context with mutual TLS between gateways: a client certificate is
    asked for and, when given, must chain to the fleet's CA alone (not the system's
    CAs, which create_default_context would trust for client certificates too).
    Optional, so browsers, API clients and agents connect without one; the peer path
    requires one (:meth:`Gateway._peer_connect`)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
        context.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the fleet's TLS files ({ca_file}): {exc}") from None
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


async def run_gateway(listen_host: str, listen_port: int, data_dir: Path, *,
                      public_url: Optional[str] = None, hub_host: str = "127.0.0.1",
                      public_hub_host: str = "0.0.0.0",
                      jwt_key: Optional[str] = None,
                      tls_cert: Optional[Path] = None, tls_key: Optional[Path] = None,
                      allow_private_egress: bool = False,
                      store_url: Optional[str] = None,
                      udp_idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                      fleet: Optional[FleetConfig] = None,
                      tunnel_domain: Optional[str] = None,
                      session_ttl: float = SESSION_TTL,
                      session_idle_timeout: float = SESSION_IDLE_TIMEOUT,
                      echo: Callable[[str], None] = print,
                      stop: Optional[asyncio.Event] = None,
                      reuse_port: bool = False,
                      peer_listen: Optional[tuple[str, int]] = None) -> None:
    """Run a gateway until SIGINT/SIGTERM (or ``stop`` is set).

    The state is in ``store_url`` (relay.gateway.store.open_store: a SQLite path or
    ``postgresql://...``), by default SQLite in ``data_dir``. On the first start of an
    empty store, once it listens, creates the default team and prints its keys once (a
    start that fails creates none). Prints ``relay gateway listening on URL`` when ready.
    ``tls_cert``
    (PEM chain) and ``tls_key`` make it serve HTTPS/WSS. ``allow_private_egress``: the
    gateway may connect to loopback/private/link-local addresses (relay.gateway.egress).
    ``fleet``: join a fleet of gateways (relay.gateway.fleet; docs/FLEET.md).
    ``reuse_port`` and ``peer_listen``: a worker of ``relay gateway --workers``
    (:meth:`Gateway.start`, relay.gateway.fleet.workers).
    """
    ssl_context = None
    if tls_cert is not None:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(tls_cert, tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load TLS certificate {tls_cert}: {exc}") from None
    if fleet is not None and fleet.ca_file is not None:
        if ssl_context is None:
            raise ValueError("mutual TLS between gateways (--fleet-ca) needs this gateway to serve TLS "
                             "(--tls-cert, --tls-key)")
        ssl_context = _mutual_tls_server_context(tls_cert, tls_key, fleet.ca_file)
        fleet.cert_file, fleet.key_file = tls_cert, tls_key
    store = await open_store(store_url, data_dir)
    try:
        gateway = Gateway(store, public_url=public_url, hub_host=hub_host,
                          public_hub_host=public_hub_host, jwt_key=jwt_key,
                          ssl_context=ssl_context, allow_private_egress=allow_private_egress,
                          udp_idle_timeout=udp_idle_timeout, fleet=fleet,
                          tunnel_domain=tunnel_domain, session_ttl=session_ttl,
                          session_idle_timeout=session_idle_timeout)
        # Listen first: a start that fails (the port is taken) must not create and print
        # keys that nobody will see again once the operator has fixed the address.
        await gateway.start(listen_host, listen_port, reuse_port=reuse_port, peer_listen=peer_listen)
        created = await ensure_default_team(store)
        if created is not None:
            _print_default_team(*created, store_url=store_url, data_dir=data_dir, echo=echo)
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass
        host = f"[{gateway.host}]" if ":" in gateway.host else gateway.host
        scheme = "https" if ssl_context else "http"
        echo(f"relay gateway listening on {scheme}://{host}:{gateway.port} (store: {store.location})")
        if gateway.fleet is not None:
            echo(f"relay gateway {gateway.fleet.gateway_id} in the fleet, advertised at {gateway.fleet.advertise}")
        if _is_loopback(hub_host):
            # Said at every start: a TCP tunnel's hub port is unreachable from other
            # machines until the operator chooses to expose it.
            echo(f"TCP tunnel hub ports listen on {hub_host} (this machine only; "
                 f"--hub-host 0.0.0.0 lets other machines reach them)")
        settle()  # start-up's objects out of the collector's way (relay.collector)
        started = time.monotonic()
        try:
            await stop.wait()
        finally:
            log.info("gateway stopping after %.0fs", time.monotonic() - started)
            await gateway.close()
    finally:
        await store.close()
