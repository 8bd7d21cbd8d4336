"""Container services (seeds 003, 004): records, lifecycle, health probes, the proxy.

A service is a team's ``slug`` (``^[a-z0-9][a-z0-9-]{1,98}[a-z0-9]$``) with one of two types:

* ``deployed``: declared by agents (``relay agent --service slug=127.0.0.1:PORT,...``, sent
  in the agent's hello, see :mod:`relay.agent.services`). Every agent that declares it is
  an *instance*; the first declaration creates the record, later ones update it
  (``exposed_port``, ``usage_prompt``, ``openapi_url``, health path, labels).
* ``external``: created through the API with a ``url``, ``http://`` or ``https://``: the
  gateway itself connects to it (egress from the gateway, no agent involved), over TLS
  for https with the certificate verified against the system's CAs and the URL's host
  name (:attr:`ServiceManager.external_ssl_context` may name other CAs); it has one
  instance, the gateway, always online. WebSocket (any ``Upgrade``) requests to it are
  relayed by the manager itself (:meth:`ServiceManager._external_upgrade`).
  Where the gateway may connect is the egress policy of :mod:`relay.gateway.egress`
  (no loopback/private/link-local addresses unless ``--allow-private-egress``, never
  the gateway's own ports): a URL with such a literal address is refused at creation
  (400 ``egress_not_allowed``), and every connection is checked on the addresses the
  name resolves to (refused: 502, like any unreachable target).

Instances are learnt from the live agent registry (on every API call and every probe
tick), so nothing depends on event ordering. In a fleet that includes the agents other
gateways hold, from the hellos the fleet registry asked their gateways for
(relay.gateway.fleet.registry): their instances' streams are forwarded to the holder
like any other, and every gateway probes and routes to every instance itself. An instance whose agent disconnects stays,
*offline*, for ``offline_grace`` seconds (default: the gateway's ``agent_gone_grace``,
600 s): a restart or a network blip is not the end of a service. It is removed when the
grace runs out, or at once when its agent comes back without declaring the slug.

Health: the gateway probes ``GET {health}`` (default ``/health``) of every online
instance through the tunnel, right after the instance appears and then every
``probe_interval`` seconds (default 10 s), each with a ``probe_timeout`` (3 s). A status
below 400 passes; anything else, a timeout or a refused connection fails. An instance
with ``health=none`` is not probed: it is healthy while online. A request that cannot
reach an instance also marks it unhealthy until its next passing probe.

``service_status``, evaluated in this order:

1. ``stopped``: no instance (no agent declares the slug any more). The record is kept.
2. ``running``: some instance has passed a probe since the service last left ``stopped``
   (the *running* flag). It stays running while instances exist, even if none is healthy
   or online right now: that is the 503 case below.
3. ``failed``: at least one agent is online, and every online instance failed
   ``FAIL_THRESHOLD`` (3) consecutive probes without ever passing one.
4. ``deploying``: a probe has answered (and failed) on some online instance: the
   container is still starting.
5. ``created``: declared, no probe has answered yet (or no declaring agent is online).

``stopping`` is part of the seed's vocabulary but relay never reports it: it does not run
containers, so it has nothing to stop gracefully.

Gateway-level answers of the proxy and of invoke, before any container is reached:
404 unknown slug in the caller's team (another team's slug too); 400 status is not
``running``; 503 running but no online instance ("no online agent") or no healthy one;
502 every healthy online instance was tried (round robin, starting with the next one in
turn) and none could be reached (the agent refused the stream, e.g. the target refused
the connection, or the tunnel failed). Any other status is the container's own.

Endpoints (``{slug}`` is the service slug):

==============================================  =======  ======================================
``GET    /api/v1/r/containers``                 runtime  ``{"services": [service, ...]}``
``POST   /api/v1/r/containers``                 manage   external service → 201 service
``GET    /api/v1/r/containers/{slug}``          runtime  service
``DELETE /api/v1/r/containers/{slug}``          manage   204 (deployed: only when stopped)
``ANY    /api/v1/r/containers/{slug}/{path}``   runtime  transparent streaming proxy
``POST   /api/v1/r/invoke/{slug}``              runtime  seed 004 (relay.gateway.api.invoke)
==============================================  =======  ======================================

runtime = sk-, dk-, or JWT with X-Team-ID; manage = sk- or JWT. The proxy forwards the
path after the slug and the query as they are (under an external service URL's path
prefix, a path with ``.`` or ``..`` segments, which a server resolving them would use to
leave the prefix, is a 400), streams both ways (SSE included) through
:mod:`relay.gateway.http.proxy`, and drops the caller's ``Authorization`` and
``X-Team-ID`` (the gateway credential is never shown to the container).
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import urlsplit

import h11

from relay.aio import StreamRefused
from relay.allowlist import parse_host_port
from relay.gateway.api.invoke import dot_segment_error, has_dot_segment, invoke, stream_close
from relay.gateway.auth import AuthError, Principal
from relay.gateway.egress import EgressPolicy
from relay.gateway.http.exchange import http_exchange
from relay.gateway.http.proxy import (
    Local,
    LocalAnswer,
    MaybeUpstream,
    ProxyError,
    ProxyStats,
    RequestHead,
    Upstream,
    origin_form,
    serve_connection,
)
from relay.gateway.http.server import (
    MAX_BODY,
    SERVER_HEADER,
    STORE_UNAVAILABLE,
    HttpError,
    HttpProtocol,
    Request,
    Response,
    Router,
    error_response,
    json_response,
    store_failure,
)
from relay.gateway.store import Service, StoreError, StoreUnavailable
from relay.mux.errors import ErrorCode
from relay.services import SLUG_RE

if TYPE_CHECKING:
    from relay.gateway.app import Gateway

__all__ = ["ServiceManager", "SERVICE_STATUSES", "add_services_openapi"]

log = logging.getLogger("relay.gateway.api.services")

SERVICE_STATUSES = ("created", "deploying", "running", "stopping", "stopped", "failed")
PREFIX = b"/api/v1/r/containers/"
INVOKE_PREFIX = b"/api/v1/r/invoke/"
PROBE_INTERVAL = 10.0
PROBE_TIMEOUT = 3.0
FAIL_THRESHOLD = 3
#: Opening a stream (the agent connecting to its target) must be answered within this.
OPEN_TIMEOUT = 15.0
MAX_PROMPT = 4000
MAX_LABELS = 32
#: Service proxy answers remembered (see ServiceManager._resolve), and the longest
#: request-target remembered (so the cache stays a few MiB).
ANSWER_CACHE = 4096
ANSWER_TARGET = 1024
#: invoke's keep-alive pool: idle streams kept per instance, and how long one may idle.
#: Each holds one connection from the agent to the container, so the pool stays small.
POOL_MAX_IDLE = 32
POOL_IDLE_TIMEOUT = 15.0


@dataclass
class Instance:
    """One place a service runs: an agent's declaration, or the external URL."""

    agent_id: Optional[str]  # None: external (the gateway connects itself)
    agent_name: str
    host: str
    port: int
    health: Optional[str]
    session: Any = None
    base_path: str = ""  # external: the URL's path prefix
    tls: Optional[ssl.SSLContext] = None  # external https: TLS to host, verified
    egress: Optional[EgressPolicy] = None  # external: where the gateway may connect
    host_header: str = ""
    online: bool = True
    offline_since: float = 0.0
    healthy: bool = False
    ever_healthy: bool = False
    answered: bool = False  # some probe answered (passed or failed)
    failures: int = 0  # consecutive failed probes
    last_error: Optional[str] = None
    last_probe_at: Optional[float] = None
    probing: bool = False

    def describe(self) -> dict[str, Any]:
        return {"agent_id": self.agent_id, "agent_name": self.agent_name, "online": self.online,
                "healthy": self.healthy and self.online, "target": f"{self.host}:{self.port}",
                "consecutive_failures": self.failures, "last_error": self.last_error,
                "last_probe_at": _iso(self.last_probe_at)}

    #: Idle keep-alive streams of invoke: ``(stream, idle since)``.
    idle: list[tuple[Any, float]] = field(default_factory=list, repr=False)

    def checkout(self, max_idle: float = POOL_IDLE_TIMEOUT) -> Optional[Any]:
        """An idle keep-alive stream to this instance, idle at most ``max_idle`` seconds
        and still open, or None. The most recently used one first (the least likely to
        have been closed by the server); expired or dead ones met are closed."""
        self._expire()
        while self.idle:
            stream, since = self.idle[-1]
            if not _reusable(stream):
                self.idle.pop()
                stream_close(stream)
                continue
            if time.monotonic() - since > max_idle:
                return None  # fresh enough for a less strict (idempotent) caller only
            self.idle.pop()
            return stream
        return None

    def _expire(self) -> None:
        """Close idle streams past :data:`POOL_IDLE_TIMEOUT` (the oldest are first)."""
        limit = time.monotonic() - POOL_IDLE_TIMEOUT
        while self.idle and self.idle[0][1] < limit:
            stream_close(self.idle.pop(0)[0])

    def prune(self) -> None:
        """Close idle streams past :data:`POOL_IDLE_TIMEOUT` or ended by the peer (a
        container closing an idle connection): their agent-side connection is freed."""
        limit = time.monotonic() - POOL_IDLE_TIMEOUT
        if any(since < limit or not _reusable(stream) for stream, since in self.idle):
            keep = []
            for entry in self.idle:
                if entry[1] < limit or not _reusable(entry[0]):
                    stream_close(entry[0])
                else:
                    keep.append(entry)
            self.idle = keep

    def checkin(self, stream: Any) -> None:
        """Keep a stream whose exchange ended cleanly for the next invoke, if the pool has
        room and the instance is still in use; otherwise close it."""
        self._expire()
        if self.online and len(self.idle) < POOL_MAX_IDLE and _reusable(stream) and \
                (self.session is None or not self.session.is_closed):
            self.idle.append((stream, time.monotonic()))
        else:
            stream_close(stream)

    def retire(self) -> None:
        """The instance is gone (agent offline, declaration withdrawn, replaced, service
        deleted): close its idle streams and never keep any again."""
        self.online = False
        idle, self.idle = self.idle, []
        for stream, _ in idle:
            stream_close(stream)

    async def open(self) -> Any:
        """A stream to the target: a mux stream through the agent (waiting for its
        accept, so a refused target is known here), or a TCP connection (external)."""
        async with asyncio.timeout(OPEN_TIMEOUT):
            if self.agent_id is None:
                # Through the gateway's egress policy (relay.gateway.egress): checked on
                # the resolved addresses at every connection, not only at creation.
                assert self.egress is not None
                reader, writer = await self.egress.open_connection(self.host, self.port, ssl_context=self.tls)
                return TcpStream(reader, writer)
            return await self.session.open_stream({"protocol": "http", "target": f"{self.host}:{self.port}"})


@dataclass
class ServiceState:
    """The live side of one service record."""

    instances: dict[Optional[str], Instance] = field(default_factory=dict)
    running: bool = False
    turn: int = 0  # round robin position
    stats: ProxyStats = field(default_factory=ProxyStats)
    #: Upgraded (WebSocket) connections to an external service, relayed by the manager.
    upgrades: set = field(default_factory=set)

    def status(self) -> str:
        """The lifecycle status (module docstring, rules 1-5)."""
        if not self.instances:
            return "stopped"
        if self.running:
            return "running"
        online = [i for i in self.instances.values() if i.online]
        if online and all(i.failures >= FAIL_THRESHOLD and not i.ever_healthy for i in online):
            return "failed"
        if any(i.answered for i in online):
            return "deploying"
        return "created"


class TcpStream:
    """A TCP connection with the subset of the MuxStream interface the proxy engine and
    :func:`~relay.gateway.http.exchange.http_exchange` use (external services)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    exception = None
    finished = False

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()

    async def read(self, n: int = -1) -> bytes:
        return await self._reader.read(n)

    def at_eof(self) -> bool:
        return self._reader.at_eof() or self._writer.is_closing()

    def is_closing(self) -> bool:
        return self._writer.is_closing()

    def close(self) -> None:
        self._writer.close()

    def abort(self, error_code: int = 0, message: str = "") -> None:
        self._writer.transport.abort()


#: Request/response headers an upgrade relay sets itself or never forwards (hop-by-hop).
_UPGRADE_DROP = frozenset({b"authorization", b"x-team-id", b"host", b"connection", b"upgrade", b"keep-alive",
                           b"te", b"trailer", b"transfer-encoding", b"content-length"})


async def _splice(reader: asyncio.StreamReader, client: asyncio.StreamWriter, upstream: Any,
                  event: h11.InformationalResponse, pending: bytes) -> None:
    """After the target's 101: its head (hop-by-hop headers dropped, the upgrade kept) to
    the client, then bytes both ways until one side ends (each direction waits for the
    other side to take what it sent: backpressure)."""
    out = [b"HTTP/1.1 101 %s\r\n" % (event.reason or b"Switching Protocols")]
    out += [n + b": " + v + b"\r\n" for n, v in event.headers if n not in _UPGRADE_DROP]
    out += [b"connection: upgrade\r\n"] + [b"upgrade: " + v + b"\r\n" for n, v in event.headers if n == b"upgrade"]
    client.write(b"".join(out) + b"\r\n" + pending)
    await client.drain()

    async def up() -> None:
        while data := await reader.read(65536):
            upstream.write(data)
            await upstream.drain()

    async def down() -> None:
        while data := await upstream.read(65536):
            client.write(data)
            await client.drain()

    tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _reusable(stream: Any) -> bool:
    """Neither ended by the peer (the container closed its keep-alive connection, the
    agent went away) nor closed or reset by us."""
    return stream.exception is None and not stream.at_eof() and not stream.is_closing()


def _iso(ts: Optional[float]) -> Optional[str]:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _declarations(info: Any) -> dict[str, dict[str, Any]]:
    """Valid service declarations of an agent's hello, by slug (bad ones are dropped)."""
    out: dict[str, dict[str, Any]] = {}
    raw = info.get("services") if isinstance(info, dict) else None
    for item in raw if isinstance(raw, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("slug"), str) or not SLUG_RE.match(item["slug"]):
            continue
        target = item.get("target")
        try:
            host, port = parse_host_port(target if isinstance(target, str) else "")
        except ValueError:
            continue
        health = item.get("health")
        health = health if isinstance(health, str) and health.startswith("/") and not health.startswith("//") else None
        prompt = item.get("prompt") if isinstance(item.get("prompt"), str) else None
        openapi = item.get("openapi") if isinstance(item.get("openapi"), str) else None
        labels = [x for x in item.get("labels") or [] if isinstance(x, str)][:MAX_LABELS] \
            if isinstance(item.get("labels"), list) else []
        out[item["slug"]] = {"host": host, "port": port, "health": health,
                             "usage_prompt": prompt[:MAX_PROMPT] if prompt else None,
                             "openapi_url": openapi, "labels": labels}
    return out


class ServiceManager:
    """Services of one gateway: install with :meth:`register`, then :meth:`start`."""

    def __init__(self, gateway: "Gateway", *, probe_interval: float = PROBE_INTERVAL,
                 probe_timeout: float = PROBE_TIMEOUT, offline_grace: Optional[float] = None) -> None:
        self.gw = gateway
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.offline_grace = offline_grace if offline_grace is not None else getattr(
            gateway, "_agent_gone_grace", 600.0)
        self._states: dict[tuple[str, str], ServiceState] = {}
        self._sessions: dict[str, Any] = {}  # agent id -> the session whose hello we read
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: Optional[asyncio.Task] = None
        # sync() fast path: the registry version it last saw, and when the next offline
        # instance's grace runs out (nothing can change before either moves).
        self._synced_version = -1
        self._sync_deadline = 0.0
        # Service rows by (team, slug), valid while the store's generation stays the same.
        self._records: dict[tuple[str, str], Service] = {}
        self._records_generation: Any = None
        self._sync_lock = asyncio.Lock()
        #: The proxy's answers by (request-target, Authorization, X-Team-ID), for API keys
        #: and services with one instance: ``(upstream, principal, state, instance,
        #: stamp, state's key)``, valid while the stamp (store generation, registry version, both
        #: caches' epochs) is unchanged and the instance still the only, online, healthy
        #: one (see _resolve). Moved epochs and the checks make stale ones misses.
        self._answers: dict[tuple, tuple[Upstream, Principal, ServiceState, Instance, tuple, tuple[str, str]]] = {}
        self._epoch = 0
        #: TLS for external https:// services: certificates verified against the system's
        #: CAs and the URL's host name (set another context, e.g. with a private CA).
        self.external_ssl_context: ssl.SSLContext = ssl.create_default_context()
        self._invoke_local = Local(self._invoke_answer, MAX_BODY)

    def register(self, router: Router) -> None:
        add = router.add
        add("GET", "/api/v1/r/containers", self._list)
        add("POST", "/api/v1/r/containers", self._create)
        add("GET", "/api/v1/r/containers/{slug}", self._get)
        add("DELETE", "/api/v1/r/containers/{slug}", self._delete)
        add("*", "/api/v1/r/containers/{slug}/{rest:path}", self._proxy, raw=True)
        add("POST", "/api/v1/r/invoke/{slug}", self._invoke_route, raw=True)

    async def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._probe_loop())

    async def close(self) -> None:
        for state in self._states.values():
            for inst in state.instances.values():
                inst.retire()
        tasks = [t for t in [self._loop_task, *self._tasks] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _invoke_route(self, request: Request) -> None:
        """``POST /api/v1/r/invoke/{slug}`` (relay.gateway.api.invoke): a raw route, so the
        connection is served by the proxy engine from this request on (httptools, no
        task per request on the client side), each invoke answered as a
        :class:`~relay.gateway.http.proxy.Local` by :meth:`_invoke_answer`; any other
        request on it goes back to the HTTP server."""
        transport, data = request.take_over_raw()
        serve_connection(transport, data, self._invoke_resolve, fallback=self._http_server,
                         connections=self.gw._connections)

    def _invoke_resolve(self, request: RequestHead) -> Optional[Local]:
        """The engine's resolver on an invoke connection: a Local for ``POST
        /api/v1/r/invoke/{slug}`` (the route's own pattern), else None (the HTTP server's)."""
        if request.method != b"POST":
            return None
        target = origin_form(request.target)
        cut = len(target)
        for sep in (b"?", b"#"):
            found = target.find(sep)
            if 0 <= found < cut:
                cut = found
        path = target[:cut]
        if not path.startswith(INVOKE_PREFIX) or len(path) == len(INVOKE_PREFIX) \
                or b"/" in path[len(INVOKE_PREFIX):]:
            return None
        return self._invoke_local

    async def _invoke_answer(self, request: RequestHead, body: bytes) -> LocalAnswer:
        """One invoke, counted by outcome for ``/metrics`` (the status class of the
        answer, or the gateway's error code), as the engine writes it."""
        authorization = team = None  # (a repeated header: the last one counts)
        for _, lname, value in request.raw_headers:
            if lname == b"authorization":
                authorization = value.decode("latin-1")
            elif lname == b"x-team-id":
                team = value.decode("latin-1")
        target = origin_form(request.target)
        slug = target[len(INVOKE_PREFIX):].split(b"?", 1)[0].split(b"#", 1)[0].decode("ascii", "replace")
        try:
            response = await invoke(self, authorization, team, slug, body)
        except (HttpError, AuthError) as exc:
            self.gw.traffic.count("invoke", exc.code)
            response = error_response(exc.status, exc.code, exc.message, exc.headers)
        except StoreUnavailable as exc:  # the database cannot be reached now: try again later
            log.warning("invoke %s: %s", slug, exc)
            response = error_response(503, "store_unavailable", STORE_UNAVAILABLE, {"Retry-After": "5"})
        else:
            self.gw.traffic.count("invoke", f"{response.status // 100}xx")
        headers = [(b"server", SERVER_HEADER.encode()), (b"content-type", response.content_type.encode())]
        headers += [(name.encode("latin-1"), value.encode("latin-1")) for name, value in response.headers.items()]
        return response.status, headers, response.body

    # ------------------------------------------------------------------ live state

    def _state(self, record: Service) -> ServiceState:
        key = (record.team_id, record.slug)
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = ServiceState()
            # Per-service series and access log lines (relay.gateway.http.traffic).
            state.stats.observer = self.gw.traffic.observer("service", record.team_id, record.slug)
        if record.service_type == "external" and None not in state.instances:
            url = urlsplit(record.spec.get("url", ""))
            https = url.scheme == "https"
            port = url.port or (443 if https else 80)
            host = url.hostname or ""
            inst = Instance(None, "external", host, port, record.spec.get("health"),
                            base_path=url.path.rstrip("/"),
                            host_header=(f"[{host}]" if ":" in host else host) + (f":{url.port}" if url.port else ""),
                            tls=self.external_ssl_context if https else None, egress=self.gw.egress)
            state.instances[None] = inst
            self._after_instance_added(record.team_id, record.slug, state, inst)
        return state

    def _after_instance_added(self, team_id: str, slug: str, state: ServiceState, inst: Instance) -> None:
        if inst.health is None:  # not probed: healthy while online
            inst.healthy = inst.ever_healthy = True
            state.running = True
        else:
            self._spawn_probe(team_id, slug, inst)

    def _in_sync(self) -> bool:
        """True while nothing :meth:`sync` depends on can have changed: the registry's
        version is the one of the last full pass, no known session has closed (a session
        ends before its agent is unregistered), and no offline instance's grace has run
        out. Called on every proxied request and invoke."""
        if self.gw.registry.version != self._synced_version or time.time() > self._sync_deadline:
            return False
        for session in self._sessions.values():  # (a loop: no generator per request)
            if session.is_closed:
                return False
        return True

    async def sync(self) -> None:
        """Bring instances in line with the agent registry (see the module docstring);
        returns at once while :meth:`_in_sync`. One pass at a time; a pass that waited
        for the store counts only once it is complete, so a request never sees half of
        one."""
        if self._in_sync():
            return
        async with self._sync_lock:
            if not self._in_sync():
                version = self.gw.registry.version
                self._synced_version = -1  # a pass in progress is not in sync
                await self._sync_pass()
                self._synced_version = version

    async def _sync_pass(self) -> None:
        now = time.time()
        store = self.gw.store
        live: dict[str, Any] = {}
        for entry in self.gw.registry.for_services():  # in a fleet, other gateways' agents too
            if entry.session.is_closed:
                continue
            live[entry.agent_id] = entry
            if self._sessions.get(entry.agent_id) is entry.session:
                continue  # declarations do not change within one session
            self._sessions[entry.agent_id] = entry.session
            declared = _declarations(entry.session.peer_info)
            for (team_id, slug), state in self._states.items():  # withdrawn declarations
                if team_id == entry.team_id and entry.agent_id in state.instances and slug not in declared:
                    state.instances.pop(entry.agent_id).retire()
            for slug, decl in declared.items():
                record = await store.get_service(entry.team_id, slug)
                if record is not None and record.service_type != "deployed":
                    log.warning("agent %s declares %s, an external service of its team: ignored",
                                entry.name, slug)
                    continue
                spec = {k: decl[k] for k in ("health", "usage_prompt", "openapi_url", "labels")}
                spec["exposed_port"] = decl["port"]
                if record is None or record.spec != spec:
                    record = await store.put_service(entry.team_id, slug, "deployed", spec,
                                               record.status if record else "created")
                state = self._state(record)
                inst = Instance(entry.agent_id, entry.name, decl["host"], decl["port"], decl["health"],
                                session=entry.session, host_header=f"{decl['host']}:{decl['port']}")
                previous = state.instances.get(entry.agent_id)
                if previous is not None:  # the agent reconnected: a new session
                    previous.retire()
                state.instances[entry.agent_id] = inst
                self._after_instance_added(entry.team_id, slug, state, inst)
        for gone in [a for a in self._sessions if a not in live]:
            del self._sessions[gone]
        deadline = float("inf")
        for state in self._states.values():
            for agent_id, inst in list(state.instances.items()):
                if agent_id is None:
                    continue
                if agent_id not in live or live[agent_id].session is not inst.session:
                    if inst.online:
                        inst.retire()  # its idle streams went with the session
                        inst.offline_since = now
                    elif now - inst.offline_since > self.offline_grace:
                        del state.instances[agent_id]
                        continue
                    deadline = min(deadline, inst.offline_since + self.offline_grace)
            if not state.instances:
                state.running = False
        self._sync_deadline = deadline

    def forget(self) -> None:
        """Empty the service row cache now (another gateway of a fleet changed one)."""
        self._records.clear()
        self._records_generation = None
        self._answers.clear()
        self._epoch += 1

    def _cached(self, team_id: str, slug: str) -> Optional[Service]:
        """The service row from memory, kept while the store's generation is unchanged
        (any commit, e.g. a delete, empties the cache: a deleted service is gone at
        once); None if not there."""
        generation = self.gw.store.generation()
        if generation != self._records_generation:
            self._records.clear()
            self._records_generation = generation
        return self._records.get((team_id, slug))

    async def _lookup(self, team_id: str, slug: str) -> Optional[Service]:
        """The service row: :meth:`_cached`, else read (and kept) from the store."""
        record = self._cached(team_id, slug)
        if record is None:
            before = self._records_generation
            record = await self.gw.store.get_service(team_id, slug)
            # Unknown slugs are not kept (bounded by real rows), nor a row read while
            # something was committed.
            if record is not None and self._cached(team_id, slug) is None and self._records_generation == before:
                if len(self._records) >= 4096:
                    self._records.clear()
                self._records[(team_id, slug)] = record
        return record

    async def _record(self, team_id: str, slug: str) -> tuple[Service, ServiceState]:
        """The team's service and its live state; 404 if unknown (or another team's)."""
        record = await self._lookup(team_id, slug) if SLUG_RE.match(slug) else None
        if record is None:
            raise HttpError(404, "service_not_found", f"no service {slug!r} in this team")
        return record, self._state(record)

    async def describe(self, record: Service, state: ServiceState) -> dict[str, Any]:
        """The API representation (seed 003's fields first)."""
        status = state.status()
        if status != record.status:
            await self.gw.store.set_service_status(record.team_id, record.slug, status)
        spec = record.spec
        instances = [i.describe() for i in state.instances.values()]
        body = {"service_slug": record.slug, "service_status": status,
                "exposed_port": spec.get("exposed_port"), "service_type": record.service_type,
                "usage_prompt": spec.get("usage_prompt"), "openapi_url": spec.get("openapi_url"),
                "health_path": spec.get("health"), "labels": spec.get("labels") or [],
                "instances": instances,
                "instances_online": sum(1 for i in state.instances.values() if i.online),
                "instances_healthy": sum(1 for i in instances if i["healthy"]),
                "created_at": _iso(record.created_at), "updated_at": _iso(record.updated_at)}
        if record.service_type == "external":
            body["url"] = spec.get("url")
        return body

    # ------------------------------------------------------------------ routing

    def candidates_nowait(self, team_id: str, slug: str, rotate: bool = True) -> Optional[list[Instance]]:
        """:meth:`candidates` from memory, for the proxy's per-request resolver: None
        when the store must be asked first (a pass of :meth:`sync` is due, or the
        service row is not cached)."""
        if not self._in_sync():
            return None
        record = self._cached(team_id, slug) if SLUG_RE.match(slug) else None
        if record is None:
            return None
        return self._pick(slug, self._state(record), rotate)

    async def candidates(self, team_id: str, slug: str, rotate: bool = True) -> list[Instance]:
        """Healthy online instances in round-robin order, or the seed 003 error.
        ``rotate``: advance the round robin (False for a check only)."""
        await self.sync()
        _, state = await self._record(team_id, slug)
        return self._pick(slug, state, rotate)

    def _pick(self, slug: str, state: ServiceState, rotate: bool) -> list[Instance]:
        if state.running and len(state.instances) == 1:  # the usual service: no lists to sort
            for only in state.instances.values():
                if only.online and only.healthy:
                    state.turn += rotate
                    return [only]
        status = state.status()
        if status != "running":
            raise HttpError(400, "service_not_running", f"service {slug!r} is {status}, not running")
        online = [i for i in state.instances.values() if i.online]
        if not online:
            raise HttpError(503, "no_online_agent", f"no online agent serves {slug!r}")
        healthy = [i for i in online if i.healthy]
        if not healthy:
            raise HttpError(503, "no_healthy_instance", f"no healthy instance of {slug!r}")
        healthy.sort(key=lambda i: i.agent_id or "")
        start = state.turn % len(healthy)
        state.turn += rotate
        return healthy[start:] + healthy[:start]

    async def open_to(self, slug: str, candidates: list[Instance]) -> tuple[Any, Instance]:
        """A stream to the first candidate that can be reached; 502 if none can."""
        errors = []
        for inst in candidates:
            try:
                return await inst.open(), inst
            except (ConnectionError, OSError, TimeoutError) as exc:
                reason = exc.message if isinstance(exc, StreamRefused) else (str(exc) or type(exc).__name__)
                errors.append(f"{inst.agent_name}: {reason}")
                inst.last_error = reason
                if inst.health is not None:  # probed: out of rotation until a probe passes
                    inst.healthy = False
        raise ProxyError(502, "target_unreachable",
                         f"could not reach service {slug!r}: " + "; ".join(errors))

    # ------------------------------------------------------------------ health probes

    def _spawn_probe(self, team_id: str, slug: str, inst: Instance) -> None:
        if inst.probing:
            return
        inst.probing = True
        task = asyncio.get_running_loop().create_task(self._probe(team_id, slug, inst))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe(self, team_id: str, slug: str, inst: Instance) -> None:
        error: Optional[str] = None
        try:
            async with asyncio.timeout(self.probe_timeout):
                stream = await inst.open()
                complete = False
                try:
                    status = (await http_exchange(
                        stream, "GET", inst.base_path + (inst.health or "/"),
                        [("Host", inst.host_header), ("User-Agent", "relay-health-probe")], b"",
                        limit=1024 * 1024)).status
                    complete = True
                finally:
                    stream_close(stream, abort=not complete)
            if status >= 400:
                error = f"health probe answered {status}"
        except StreamRefused as exc:
            error = exc.message or ErrorCode(exc.error_code).name
        except TimeoutError:
            error = f"health probe timed out after {self.probe_timeout}s"
        except Exception as exc:  # a failed probe is data, never a crash
            error = str(exc) or type(exc).__name__
        finally:
            inst.probing = False
        inst.answered, inst.last_probe_at, inst.last_error = True, time.time(), error
        if error is None:
            inst.healthy = inst.ever_healthy = True
            inst.failures = 0
            state = self._states.get((team_id, slug))
            if state is not None and state.instances.get(inst.agent_id) is inst:
                state.running = True
        else:
            inst.healthy = False
            inst.failures += 1

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            try:
                await self.sync()
                for (team_id, slug), state in list(self._states.items()):
                    for inst in state.instances.values():
                        inst.prune()
                        if inst.online and inst.health is not None:
                            self._spawn_probe(team_id, slug, inst)
            except Exception:  # e.g. a busy database: try again next tick
                log.exception("service health round failed")

    # ------------------------------------------------------------------ API routes

    async def _principal(self, request: Request, manage: bool = False) -> Principal:
        principal = await self.gw._principal(request)
        return principal.require_manage() if manage else principal

    async def _list(self, request: Request) -> Response:
        principal = await self._principal(request)
        await self.sync()
        records = await self.gw.store.list_services(principal.team_id)
        return json_response({"services": [await self.describe(r, self._state(r)) for r in records]})

    async def _get(self, request: Request) -> Response:
        principal = await self._principal(request)
        await self.sync()
        return json_response(await self.describe(*await self._record(principal.team_id, request.params["slug"])))

    async def _create(self, request: Request) -> Response:
        """An external service: ``{service_slug, url, health?, usage_prompt?, openapi_url?, labels?}``."""
        principal = await self._principal(request, manage=True)
        body = request.json()
        if not isinstance(body, dict):
            raise HttpError(400, "invalid_request", "request body must be a JSON object")
        slug = body.get("service_slug")
        if not isinstance(slug, str) or not SLUG_RE.match(slug):
            raise HttpError(400, "invalid_request", f"service_slug: must match {SLUG_RE.pattern}")
        url = body.get("url")
        split = urlsplit(url) if isinstance(url, str) else None
        try:
            valid_url = split is not None and split.scheme in ("http", "https") and bool(split.hostname) \
                and split.port != 0
        except ValueError:
            valid_url = False
        if not valid_url or not isinstance(url, str) or split is None or split.query or split.fragment \
                or split.username or not url.isascii() or not url.isprintable() or " " in url:
            raise HttpError(400, "invalid_request", "url: must be http(s)://HOST[:PORT][/PATH]")
        refused = self.gw.egress.check_url(url)
        if refused is not None:
            raise HttpError(400, "egress_not_allowed", f"url: {refused}")
        spec: dict[str, Any] = {"url": url, "exposed_port": split.port or (443 if split.scheme == "https" else 80),
                                "labels": []}
        for name, limit in (("health", 2048), ("usage_prompt", MAX_PROMPT), ("openapi_url", 2048)):
            value = body.get(name)
            if value is not None and (not isinstance(value, str) or len(value) > limit):
                raise HttpError(400, "invalid_request", f"{name}: must be a string of at most {limit} characters")
            if name == "health" and value is not None and (not value.startswith("/") or value.startswith("//")):
                raise HttpError(400, "invalid_request", "health: must be a path starting with a single '/'")
            spec[name] = value
        labels = body.get("labels")
        if labels is not None:
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or len(labels) > MAX_LABELS:
                raise HttpError(400, "invalid_request", f"labels: an array of at most {MAX_LABELS} strings")
            spec["labels"] = labels
        if await self.gw.store.get_service(principal.team_id, slug) is not None:
            raise HttpError(409, "service_exists", f"service {slug!r} already exists in this team")
        record = await self.gw.store.put_service(principal.team_id, slug, "external", spec, "created")
        old = self._states.pop((record.team_id, slug), None)
        for inst in old.instances.values() if old is not None else ():
            inst.retire()
        self.gw.fleet_publish("services", slug=slug)
        return json_response(await self.describe(record, self._state(record)), 201)

    async def _delete(self, request: Request) -> Response:
        principal = await self._principal(request, manage=True)
        await self.sync()
        record, state = await self._record(principal.team_id, request.params["slug"])
        if record.service_type == "deployed" and state.instances:
            raise HttpError(409, "service_declared", "agents still declare this service; "
                                                     "it can be deleted once it is stopped")
        await self.gw.store.delete_service(record.team_id, record.slug)
        self._states.pop((record.team_id, record.slug), None)
        self.gw.traffic.forget("service", record.slug, record.team_id)
        for inst in state.instances.values():
            inst.retire()
        for client in list(state.stats.clients):
            client.close()
        for task in list(state.upgrades):
            task.cancel()
        self.gw.fleet_publish("services", slug=record.slug)
        return json_response(None, 204)

    # ------------------------------------------------------------------ the proxy

    async def _check(self, authorization: Optional[str], team: Optional[str], slug: str,
                     rotate: bool = True) -> tuple[Principal, list[Instance]]:
        principal = (await self.gw.auth.authenticate(authorization, team)).require_runtime()
        return principal, await self.candidates(principal.team_id, slug, rotate)

    def _check_nowait(self, authorization: Optional[str], team: Optional[str], slug: str,
                      rotate: bool = True) -> Optional[tuple[Principal, list[Instance]]]:
        """:meth:`_check` from memory (the caches of relay.gateway.auth and of service
        rows); None when the store must be asked."""
        principal = self.gw.auth.cached(authorization, team)
        if principal is None:
            return None
        principal.require_runtime()
        candidates = self.candidates_nowait(principal.team_id, slug, rotate)
        return None if candidates is None else (principal, candidates)

    async def _proxy(self, request: Request) -> None:
        """Raw route: check the first request (errors answered by the HTTP server), then
        let the proxy engine own the connection, asking :meth:`_resolve` per request."""
        principal, candidates = await self._check(request.header("authorization"), request.header("x-team-id"),
                                                  request.params["slug"], rotate=False)
        if candidates[0].agent_id is None and request.header("upgrade"):
            await self._external_upgrade(request, principal, candidates[0])
            return
        # _resolve checks (and picks) again for this very request, and each later one.
        transport, data = request.take_over_raw()
        self.gw.revocations.hold(principal, transport)
        serve_connection(transport, data, _ProxyClient(self, transport).resolve,
                         fallback=self._http_server, connections=self.gw._connections)

    def _http_server(self, declined: bool = False) -> HttpProtocol:
        return HttpProtocol(self.gw.router, self.gw._connections, declined=declined)

    def _resolve(self, request: RequestHead, transport: Any = None) -> MaybeUpstream:
        """Where a request goes. None hands the connection back to the HTTP server: for
        other paths, and for a failed check (the route answers it, headers included).
        An absolute-form target is served like its origin form (RFC 9112 §3.2.2). The
        client's connection (``transport``) is held for each credential it used: revoking
        one cuts it (relay.gateway.agents.revocation).

        A keep-alive client repeats the same request, and with an API key and a service
        of one instance the answer is the same object as long as nothing it was built
        on moved: it is remembered here (see ``_answers``), and :class:`_ProxyClient`
        checks it before asking this again."""
        authorization = team = upgrade = None  # (a repeated header: the last one counts)
        for _, lname, value in request.raw_headers:
            if lname == b"authorization":
                authorization = value
            elif lname == b"x-team-id":
                team = value
            elif lname == b"upgrade":
                upgrade = value
        key = (request.target, authorization, team)
        gw = self.gw
        target = origin_form(request.target)
        if not target.startswith(PREFIX):
            return None
        end = target.find(b"/", len(PREFIX))
        slug = target[len(PREFIX):end].decode("ascii", "replace") if end > 0 else ""
        if end < 0 or "?" in slug:
            return None
        stamp = (gw.store.generation(), gw.registry.version, gw.auth.epoch, self._epoch)
        headers = {b"authorization": None if authorization is None else authorization.decode("latin-1"),
                   b"x-team-id": None if team is None else team.decode("latin-1"),
                   b"upgrade": None if upgrade is None else upgrade.decode("latin-1")}
        try:
            checked = self._check_nowait(headers[b"authorization"], headers[b"x-team-id"], slug)
        except (HttpError, AuthError):
            return None
        if checked is None:  # not all in memory: ask the store first (a slow path)
            return self._resolve_slowly(target, end, slug, headers, transport)
        answer = self._upstream(checked, target, end, slug, headers, transport)
        principal, candidates = checked
        if (answer is not None and principal.kind in ("sk", "dk") and len(candidates) == 1
                and candidates[0].agent_id is not None and len(target) <= ANSWER_TARGET):
            state_key = (principal.team_id, slug)
            state = self._states[state_key]
            if len(state.instances) == 1:
                if len(self._answers) >= ANSWER_CACHE:
                    self._answers.clear()
                self._answers[key] = (answer, principal, state, candidates[0], stamp, state_key)
        return answer

    async def _resolve_slowly(self, target: bytes, end: int, slug: str, headers: dict[bytes, Optional[str]],
                              transport: Any) -> Optional[Upstream]:
        try:
            checked = await self._check(headers.get(b"authorization"), headers.get(b"x-team-id"), slug)
        except (HttpError, AuthError):
            return None
        except StoreError as exc:
            raise ProxyError(503, "store_unavailable", store_failure("service proxy", exc)) from None
        return self._upstream(checked, target, end, slug, headers, transport)

    def _upstream(self, checked: tuple[Principal, list[Instance]], target: bytes, end: int, slug: str,
                  headers: dict[bytes, Optional[str]], transport: Any) -> Optional[Upstream]:
        principal, candidates = checked
        if transport is not None:
            self.gw.revocations.hold(principal, transport)
        first = candidates[0]
        if first.agent_id is None and headers.get(b"upgrade"):
            return None  # the route (_proxy) relays upgrades to external services itself
        if first.base_path and has_dot_segment(target[end:].decode("latin-1")):
            error = dot_segment_error()  # it could leave the external URL's path prefix
            raise ProxyError(error.status, error.code, error.message)
        state = self._states[(principal.team_id, slug)]
        return Upstream(open_stream=lambda: self._open_for_proxy(slug, candidates),
                        key=(principal.team_id, slug, first.agent_id),
                        target=first.base_path.encode() + target[end:],
                        host=first.host_header.encode(),
                        host_override=first.host_header.encode() if first.agent_id is None else None,
                        drop_headers=frozenset({b"authorization", b"x-team-id"}),
                        stats=state.stats)

    async def _open_for_proxy(self, slug: str, candidates: list[Instance]) -> Any:
        stream, _ = await self.open_to(slug, candidates)
        return stream

    # ------------------------------------------------------------------ external upgrades

    async def _external_upgrade(self, request: Request, principal: Principal, inst: Instance) -> None:
        """A WebSocket (any ``Upgrade``) to an external service: the gateway connects to the
        URL (TLS for https), sends the handshake with the request rewritten as the proxy
        does (path prefix, ``Host``, no gateway credential, ``X-Forwarded-*``), and on the
        target's ``101`` splices bytes both ways until either side ends. Any other answer
        is passed on with ``Connection: close`` and the connection ends, so nothing the
        client sends later can reach the target unchecked."""
        raw = request.raw
        slug = request.params["slug"]
        if any(n in (b"content-length", b"transfer-encoding") and v.strip() not in (b"", b"0")
               for n, v in raw.headers):
            raise HttpError(400, "invalid_request", "an upgrade request cannot carry a body")
        listed = {t.strip().lower() for n, v in raw.headers if n == b"connection" for t in v.split(b",")}
        upgrade = b""
        headers: list[tuple[bytes, bytes]] = []
        for name, value in raw.headers:  # h11 gives lower-case names
            if name == b"upgrade":
                upgrade = value
            if name in _UPGRADE_DROP or name.startswith(b"proxy-") or name.startswith(b"x-forwarded-") \
                    or (name in listed and name != b"upgrade"):
                continue
            headers.append((name, value))
        if b"upgrade" not in listed or not upgrade:
            raise HttpError(400, "invalid_request", "Upgrade needs Connection: upgrade")
        peer = request.peer
        gateway_scheme = b"https" if self.gw._ssl else b"http"
        forwarded_host = request.header("host")
        headers += [(b"host", inst.host_header.encode()), (b"connection", b"upgrade"), (b"upgrade", upgrade),
                    (b"x-forwarded-for", str(peer[0] if peer else "").encode()),
                    (b"x-forwarded-proto", gateway_scheme),
                    (b"x-forwarded-host", forwarded_host.encode("latin-1") if forwarded_host else b"")]
        path = origin_form(raw.target)
        end = path.find(b"/", len(PREFIX))
        if inst.base_path and has_dot_segment(path[end:].decode("latin-1")):
            raise dot_segment_error()
        target = inst.base_path.encode() + path[end:]
        try:
            upstream = await inst.open()
        except (ConnectionError, OSError, TimeoutError) as exc:
            raise HttpError(502, "target_unreachable", f"could not reach service {slug!r}: "
                                                       f"{str(exc) or type(exc).__name__}") from None
        conn = h11.Connection(h11.CLIENT)
        try:
            head = conn.send(h11.Request(method=raw.method, target=target, headers=headers))
            head += conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            upstream.abort()
            raise HttpError(400, "invalid_request", f"cannot forward this upgrade request: {exc}") from None
        transport, leftover = request.take_over()
        self.gw.revocations.hold(principal, transport)
        task = asyncio.get_running_loop().create_task(
            self._relay_upgrade(transport, leftover, upstream, conn, head, slug))
        state = self._states.get((principal.team_id, slug))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if state is not None:
            state.upgrades.add(task)
            task.add_done_callback(state.upgrades.discard)

    async def _relay_upgrade(self, transport: asyncio.Transport, leftover: bytes, upstream: Any,
                             conn: h11.Connection, head: bytes, slug: str) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2 ** 16)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        client = asyncio.StreamWriter(transport, protocol, reader, loop)
        if leftover:
            reader.feed_data(leftover)
        transport.resume_reading()
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                upstream.write(head)
                await upstream.drain()
                switched, answer = await self._upgrade_answer(upstream, conn)
            if switched is not None:  # 101: forward it, then splice until either side ends
                await _splice(reader, client, upstream, switched, answer)
            else:
                client.write(answer)
                await client.drain()
        except (ConnectionError, OSError, TimeoutError, h11.ProtocolError) as exc:
            log.info("upgrade to external service %s ended: %s", slug, str(exc) or type(exc).__name__)
        finally:
            upstream.abort()
            client.close()

    async def _upgrade_answer(self, upstream: Any,
                              conn: h11.Connection) -> tuple[Optional[h11.InformationalResponse], bytes]:
        """Read the target's answer to the handshake: ``(its 101, the bytes that came
        after it)``, or ``(None, the whole answer rebuilt for the client with Connection:
        close)``."""
        status, headers, body, reason = 0, [], [], b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await upstream.read(65536)
                if not data:
                    raise ConnectionResetError("the service closed the connection during the upgrade")
                conn.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                return event, bytes(conn.trailing_data[0])
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                status, headers, reason = event.status_code, list(event.headers), event.reason
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
                if sum(map(len, body)) > 1024 * 1024:
                    raise ConnectionResetError("the service's answer to the upgrade is too large")
            elif isinstance(event, h11.EndOfMessage):
                payload = b"".join(body)
                out = [b"HTTP/1.1 %d %s\r\n" % (status, reason or b"")]
                out += [n + b": " + v + b"\r\n" for n, v in headers if n not in _UPGRADE_DROP
                        and n != b"content-length"]
                out.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(payload))
                return None, b"".join(out) + payload
            else:
                raise ConnectionResetError("the service closed the connection during the upgrade")


# ----------------------------------------------------------------------------- OpenAPI


class _ProxyClient:
    """One client connection the service proxy serves, and the engine's resolver for
    it (:meth:`resolve`): a remembered answer still in force is given at once, and the
    connection is held for a credential (revoking it cuts the connection,
    relay.gateway.agents.revocation) once, not per request; anything else is
    :meth:`ServiceManager._resolve`."""

    __slots__ = ("_services", "_transport", "_held")

    def __init__(self, services: ServiceManager, transport: Any) -> None:
        self._services = services
        self._transport = transport
        self._held: Optional[Principal] = None  # the principal of the last answer given

    def resolve(self, request: RequestHead) -> MaybeUpstream:
        authorization = team = None  # (a repeated header: the last one counts)
        for _, lname, value in request.raw_headers:
            if lname == b"authorization":
                authorization = value
            elif lname == b"x-team-id":
                team = value
        services = self._services
        hit = services._answers.get((request.target, authorization, team))
        if hit is not None:
            upstream, principal, state, inst, seen, state_key = hit
            gw = services.gw
            if (inst.online and inst.healthy and state.running and len(state.instances) == 1
                    and seen == (gw.store.generation(), gw.registry.version, gw.auth.epoch, services._epoch)
                    and services._states.get(state_key) is state and services._in_sync()):
                state.turn += 1  # (as _pick would)
                if principal is not self._held:
                    gw.revocations.hold(principal, self._transport)
                    self._held = principal
                return upstream
        self._held = None
        return services._resolve(request, self._transport)


def add_services_openapi(document: dict[str, Any]) -> dict[str, Any]:
    """Add the container services' paths and schemas to the gateway's OpenAPI document."""
    error = {"$ref": "#/components/responses/Error"}
    slug = {"name": "serviceSlug", "in": "path", "required": True, "schema": {"type": "string"},
            "example": "my-llm"}
    team = {"name": "X-Team-ID", "in": "header", "required": False,
            "schema": {"type": "string", "format": "uuid"},
            "description": "Required with a user JWT; ignored with sk-/dk- credentials."}
    nullable_str = {"type": "string", "nullable": True}
    service = {"type": "object", "required": ["service_slug", "service_status", "service_type"], "properties": {
        "service_slug": {"type": "string"},
        "service_status": {"type": "string", "enum": list(SERVICE_STATUSES)},
        "exposed_port": {"type": "integer", "nullable": True},
        "service_type": {"type": "string", "enum": ["deployed", "external"]},
        "usage_prompt": nullable_str, "openapi_url": nullable_str, "health_path": nullable_str,
        "labels": {"type": "array", "items": {"type": "string"}},
        "url": {"type": "string", "description": "external services only"},
        "instances": {"type": "array", "items": {"type": "object", "properties": {
            "agent_id": nullable_str, "agent_name": {"type": "string"}, "online": {"type": "boolean"},
            "healthy": {"type": "boolean"}, "target": {"type": "string"},
            "consecutive_failures": {"type": "integer"}, "last_error": nullable_str,
            "last_probe_at": nullable_str}}},
        "instances_online": {"type": "integer"}, "instances_healthy": {"type": "integer"},
        "created_at": nullable_str, "updated_at": nullable_str}}
    invoke_request = {
        "type": "object", "required": ["method", "path"],
        "description": "Structured form of sending an HTTP request through the gateway tunnel into the container.",
        "properties": {
            "method": {"type": "string", "enum": ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]},
            "path": {"type": "string", "maxLength": 2048, "pattern": "^/(?!/)",
                     "description": "Path on the container, including the leading '/'; query allowed."},
            "body_base64": {"type": "string", "description": "Request body, base64-encoded."},
            "headers": {"type": "object", "additionalProperties": {"type": "string"},
                        "description": "Headers to forward; hop-by-hop ones are stripped."}}}
    invoke_response = {"type": "object", "required": ["status_code", "body_base64"], "properties": {
        "status_code": {"type": "integer"}, "body_base64": {"type": "string"},
        "headers": {"type": "object", "additionalProperties": {"type": "string"}}}}
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update({"Service": service, "InvokeRequest": invoke_request, "InvokeResponse": invoke_response})
    service_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Service"}}}
    runtime_errors = {"400": error, "401": error, "403": error, "404": error, "502": error, "503": error}
    document.setdefault("paths", {}).update({
        "/r/containers": {
            "get": {"summary": "List the team's container services", "parameters": [team], "responses": {
                "200": {"description": "Services", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"services": {"type": "array", "items": {
                        "$ref": "#/components/schemas/Service"}}}}}}},
                "400": error, "401": error, "403": error}},
            "post": {"summary": "Create an external service (egress to an http:// or https:// URL; "
                                "https certificates are verified)", "parameters": [team],
                     "requestBody": {"required": True, "content": {"application/json": {"schema": {
                         "type": "object", "required": ["service_slug", "url"], "properties": {
                             "service_slug": {"type": "string", "pattern": SLUG_RE.pattern},
                             "url": {"type": "string"}, "health": nullable_str,
                             "usage_prompt": nullable_str, "openapi_url": nullable_str,
                             "labels": {"type": "array", "items": {"type": "string"}}}}}}},
                     "responses": {"201": {"description": "Created", "content": service_ref},
                                   "400": error, "401": error, "403": error, "409": error}}},
        "/r/containers/{serviceSlug}": {
            "get": {"summary": "Get a container service", "parameters": [slug, team], "responses": {
                "200": {"description": "Service", "content": service_ref},
                "400": error, "401": error, "403": error, "404": error}},
            "delete": {"summary": "Delete a service record (deployed: only once stopped)",
                       "parameters": [slug, team], "responses": {
                           "204": {"description": "Deleted"}, "400": error, "401": error, "403": error,
                           "404": error, "409": error}}},
        "/r/containers/{serviceSlug}/{path}": {
            "parameters": [slug, {"name": "path", "in": "path", "required": True, "schema": {"type": "string"},
                                  "description": "Forwarded to the container as is (may contain '/')."}, team],
            **{method: {"summary": "Transparent streaming proxy to the container (any method)",
                        "responses": {**runtime_errors, "default": {"description": "The container's own response"}}}
               for method in ("get", "post", "put", "patch", "delete", "options")}},
        "/r/invoke/{serviceSlug}": {
            "post": {"summary": "Invoke a container service (runtime)", "operationId": "invokeService",
                     "parameters": [slug, team],
                     "requestBody": {"required": True, "content": {"application/json": {"schema": {
                         "$ref": "#/components/schemas/InvokeRequest"}}}},
                     "responses": {"200": {"description": "Container response", "content": {"application/json": {
                         "schema": {"$ref": "#/components/schemas/InvokeResponse"}}}}, **runtime_errors}}},
    })
    return document
