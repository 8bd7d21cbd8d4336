"""The Tunnels API (seed 002): named, persistent tunnels, their share links, webhooks.

Endpoints (JSON in and out; errors ``{"error": {"code", "message"}}``; 400 names the
wrong field). "read" = any API caller of the team (sk-, dk-, JWT + X-Team-ID);
"manage" = sk- or JWT (a dk- key gets 403). Every id is looked up in the caller's team
only: another team's tunnel, share, webhook or agent answers 404.

==========================================  =======  ==========================================
``POST   /api/v1/tunnels``                   manage   create → 201 tunnel
``GET    /api/v1/tunnels``                   read     ``{"tunnels": [tunnel, ...]}``
``GET    /api/v1/tunnels/{id}``              read     tunnel
``PATCH  /api/v1/tunnels/{id}``              manage   ``name``/``status``/``metadata`` → tunnel
``DELETE /api/v1/tunnels/{id}``              manage   204 (its shares go with it)
``POST   /api/v1/tunnels/{id}/connect``      read     ``{agent_id, local_port?}`` → connection
``GET    /api/v1/tunnels/{id}/bindings``     read     ``{"bindings": [{agent_id, local_port, ...}]}``
``DELETE /api/v1/tunnels/{id}/bindings/{a}`` read     204: agent ``a`` stops listening
``POST   /api/v1/tunnels/{id}/shares``       manage   create → 201 share with ``shareUrl``
``GET    /api/v1/tunnels/{id}/shares``       read     ``{"shares": [share, ...]}``
``GET    /api/v1/tunnels/{id}/shares/{sid}`` read     share
``DELETE /api/v1/tunnels/{id}/shares/{sid}`` manage   204
``POST   /api/v1/webhooks``                  manage   ``{url, events?}`` → 201 with ``secret``
``GET    /api/v1/webhooks``                  manage   ``{"webhooks": [...]}`` (no secrets)
``GET    /api/v1/webhooks/{id}``             manage   webhook (no secret)
``DELETE /api/v1/webhooks/{id}``             manage   204
``ANY    /s/{share_token}/...``              share    checks, then proxied to the target
==========================================  =======  ==========================================

Create body: ``target`` (``"host:port"``, ``"[v6]:port"`` or ``{"host", "port"}``;
required), ``agent_id`` (required; the team's agent that reaches the target; it may be
offline), ``name`` (1..100 characters; generated as adjective-noun-4hex if absent),
``protocol`` (``auto`` default, ``tcp``, ``udp``, ``http``, ``https``; a udp tunnel's
hub port is a UDP socket, each client address one flow: relay.gateway.agents.udp_hub),
``public`` (bool, default false; see "Public tunnels" below), ``hub_port`` (1024..65535,
optional: a specific hub port; 409 if
another tunnel holds it, whatever its protocol). ``auto`` resolves by target port: 443 →
https; 80, 3000, 5000, 7860, 8000, 8080, 8188, 8888 → http; the well-known UDP services
(:data:`UDP_PORTS`: DNS 53, DHCP 67/68, TFTP 69, NTP 123, SNMP 161/162, IKE 500/4500,
syslog 514, OpenVPN 1194, STUN 3478, mDNS 5353, statsd 8125, game servers 27015,
WireGuard 51820) → udp; anything else → tcp. Unknown fields → 400.

Before the tunnel exists (relay.gateway.agents.tunnel_sessions, ``TunnelManager.target_refusal``): a
target that is the gateway's own listening or hub port (the requested ``hub_port``
included) as seen from the agent → 400 ``target_is_gateway``; with the agent online,
a target it does not allow → 403 ``target_not_allowed`` (the agent's reason).

A tunnel is reachable as a raw hub port on the gateway host (``hub_host:hub_port``):
TCP for tcp, http and https tunnels (each connection becomes one stream through the
agent to the target, exactly like a seed 000 tcp session), UDP for udp tunnels (each
client address and port becomes one flow: a stream of datagrams, ending after the
gateway's ``--udp-idle-timeout`` without one; the tunnel's ``udp`` object counts
flows, datagrams each way and datagrams dropped) (:class:`~relay.gateway.agents.tunnel_sessions.TunnelManager`
does the work). The port is kept in the store, so after a gateway restart an active
tunnel listens on the same port again.

Public tunnels (``public: true``). A tunnel's hub port normally listens on the
gateway's ``--hub-host`` (127.0.0.1 by default: the gateway's machine only, and the
agents there that ``connect`` to it). A public tunnel's hub port listens on
``--public-hub-host`` instead (0.0.0.0 by default: every interface), so any machine that
reaches the gateway host reaches the service; its answers carry ``public_url``,
``tcp://HOST:PORT`` (``udp://`` for udp), HOST being the public hub host or, when that
is every interface, the host of the gateway's public URL. An http or https tunnel also
gets, at creation, an unrestricted never-expiring share named ``public``, whose link is
returned once as ``public_url`` instead (what a browser should open; delete that share
to unpublish the link). ``hub_host`` in every answer is the address the hub port listens
on. (Seed 002 recommends shares over public tunnels: a public hub port has no access
control at all.)

In a fleet (relay.gateway.fleet) every gateway listens on every active tunnel's hub
port, so an L4 load balancer or DNS round robin in front of the fleet works for raw TCP
too: a connection to any gateway's hub port is carried to the agent wherever it is
held. The port is reserved in the store (a unique index: two gateways creating tunnels
at once never record the same port; the loser of the race binds another one), and
each gateway follows the tunnels table (:meth:`TunnelsApi.sync_hubs`: at once on the
fleet's ``tunnels`` event, on any commit to the store, and every few seconds), opening
and closing hub ports as tunnels are created, paused, resumed and deleted anywhere. A
port another program holds on one gateway's host is that gateway's problem only: its
answer shows the tunnel as ``error`` with the reason (the others serve it), and it
tries again on each pass.

``status`` as shown:

* ``paused``: asked for with PATCH; the hub port is closed (new connections are refused,
  open ones are cut), the record stays. PATCH ``"active"`` opens it again, same port;
* ``error``: the hub port could not be bound (``error`` says why; PATCH ``"active"``
  retries);
* ``connecting``: the hub port listens but the agent is offline (connections are closed
  at once). It turns ``active`` by itself when the agent is back: status is derived
  from the live registry on every read, nothing needs to re-arm;
* ``active``: listening, agent connected.

``connect``: ``agent_id`` is a second agent of the team (must be online: else 409) that
should bind ``127.0.0.1:local_port`` (default: the target port) and carry it to the
tunnel. The gateway sends it the control message ``{"type": "bind", "request_id",
"tunnel_id", "local_port", "hub": {"host", "port"}, "protocol"}`` and answers once the
agent reported the result: ``502 bind_failed`` with its reason if it cannot listen,
``504 bind_timeout`` without a result; the binding is re-sent whenever that agent
connects again (:mod:`relay.gateway.agents.bindings`), until it is removed with
``DELETE .../bindings/{agent_id}`` (the agent, if online, gets ``{"type": "unbind",
"tunnel_id"}`` and closes its listener; an offline one is simply not told again). The
answer carries the
``connection_string`` a client uses on that machine: ``postgresql://user@HOST:PORT/dbname``
(target port 5432), ``mysql://user@HOST:PORT/`` (3306), ``redis://HOST:PORT`` (6379),
``mongodb://HOST:PORT`` (27017), ``http(s)://HOST:PORT/`` (http/https tunnels), else
``tcp://HOST:PORT``. The stock agent answers ``bind`` by listening on that loopback
port and relaying each connection to the hub port (:mod:`relay.agent.bind`), so the hub
port must be reachable from it.

Shares (http and https tunnels, seed 002: the share URL is served by the gateway's HTTP
reverse proxy; for an https tunnel the agent wraps the connection to the target in
TLS): see :mod:`relay.gateway.api.shares` for the fields and the checks,
:mod:`relay.gateway.http.share_proxy` for the serving. The link
(``{gateway}/s/{share_token}/``) is returned once, at creation, as ``shareUrl`` (the
canonical name: seed 002 tells users to save the ``shareUrl``) and, with the same value,
as ``share_url`` for clients written against earlier answers; only a hash of its token
is stored. At the share URL every request is checked (404 unknown token, 410 expired,
405 method not allowed with ``Allow``, 429 over the rate limit with ``Retry-After``, 503
tunnel paused or agent offline), then proxied to the tunnel's target with the
``/s/{share_token}`` prefix stripped.

Webhooks: see :mod:`relay.gateway.api.webhooks`; ``tunnel.created`` and ``tunnel.deleted``
carry the tunnel as the API shows it.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import secrets
import time
from typing import TYPE_CHECKING, Any, Optional, TypeGuard
from urllib.parse import urlsplit

from relay.gateway.api.shares import RateLimiter, parse_share_request, printable_text
from relay.gateway.api.tunnels_openapi import add_tunnels_api
from relay.gateway.api.webhooks import WebhookDispatcher, parse_webhook_request
from relay.gateway.auth import Principal
from relay.gateway.http.server import HttpError, Request, Response, Router, json_response
from relay.gateway.http.share_proxy import ShareProxy
from relay.gateway.store import ConflictError, Share, Tunnel, Webhook, normalize_uuid

if TYPE_CHECKING:
    from relay.gateway.app import Gateway

__all__ = ["TunnelsApi", "auto_protocol", "connection_string", "generate_name", "parse_target"]

log = logging.getLogger("relay.gateway.api.tunnels")

PROTOCOLS: tuple[str, ...] = ("auto", "tcp", "udp", "http", "https")
#: Target ports ``auto`` treats as HTTP (web servers, dev servers, Gradio, ComfyUI, Jupyter).
HTTP_PORTS = frozenset({80, 3000, 5000, 7860, 8000, 8080, 8188, 8888})
HTTPS_PORTS = frozenset({443})
#: Target ports ``auto`` treats as UDP services (see the module docstring).
UDP_PORTS = frozenset({53, 67, 68, 69, 123, 161, 162, 500, 514, 1194, 3478, 4500, 5353, 8125,
                       27015, 51820})
MAX_NAME = 100
MAX_METADATA = 16 * 1024
HUB_PORT_RANGE = (1024, 65535)
#: Free ports tried for a new hub port before the tunnel is put in ``error``.
HUB_PORT_ATTEMPTS = 8
#: In a fleet (TunnelsApi.sync_hubs): how often the store's commit counter is looked
#: at, how often the tunnels table is read anyway (bind failures are retried then), and
#: how often while the store does not answer.
SYNC_POLL = 0.25
SYNC_EVERY = 5.0
SYNC_RETRY = 2.0
_CREATE_FIELDS = {"target", "agent_id", "name", "protocol", "public", "hub_port"}
_UPDATE_FIELDS = {"name", "status", "metadata"}
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")

_ADJECTIVES = ("amber", "bold", "brisk", "calm", "clever", "crisp", "eager", "gentle", "swift",
               "lucky", "mellow", "nimble", "quiet", "rapid", "silver", "steady", "sunny", "witty")
_NOUNS = ("badger", "comet", "falcon", "harbor", "heron", "lantern", "maple", "meadow", "otter",
          "pebble", "raven", "river", "summit", "tiger", "willow", "canyon", "breeze", "beacon")


# ----------------------------------------------------------------------------- pure helpers


def _bad(field: str, message: str) -> HttpError:
    return HttpError(400, f"invalid_{field}", f"{field}: {message}")


def generate_name() -> str:
    """``adjective-noun-4hex``, e.g. ``swift-otter-3fa9``."""
    return f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_NOUNS)}-{secrets.token_hex(2)}"


def _valid_port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _valid_host(host: Any) -> TypeGuard[str]:
    if not isinstance(host, str) or not host:
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return _HOSTNAME.fullmatch(host) is not None


def parse_target(value: Any) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or ``{"host": ..., "port": ...}`` → (host, port)."""
    host: Any  # checked below, whichever form it came in
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            host, sep, port_text = text[1:].partition("]:")
        else:
            host, sep, port_text = text.rpartition(":")
            if ":" in host:  # a bare IPv6 address is ambiguous without brackets
                sep = ""
        port: Any = int(port_text) if sep and port_text.isdigit() else None
    elif isinstance(value, dict):
        host, port = value.get("host"), value.get("port")
        host = host.strip() if isinstance(host, str) else host
    else:
        raise _bad("target", 'must be "host:port" or an object {"host": ..., "port": ...}')
    if not _valid_host(host):
        raise _bad("target", 'the host must be a hostname or an IP address ("[v6]:port" in a string)')
    if not _valid_port(port):
        raise _bad("target", "the port must be an integer from 1 to 65535")
    return host.lower(), port


def auto_protocol(port: int) -> str:
    """What ``protocol: auto`` means for a target port (see the module docstring)."""
    if port in HTTPS_PORTS:
        return "https"
    if port in UDP_PORTS:
        return "udp"
    return "http" if port in HTTP_PORTS else "tcp"


def connection_string(target_port: int, protocol: str, host: str, port: int) -> str:
    """How a client reaches a tunnel bound at ``host:port``, by the target's well-known
    port first (a database is a database whatever it was created as), then protocol."""
    hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if protocol == "udp":  # datagrams: none of the TCP clients below applies
        return f"udp://{hostport}"
    if target_port == 5432:
        return f"postgresql://user@{hostport}/dbname"
    if target_port == 3306:
        return f"mysql://user@{hostport}/"
    if target_port == 6379:
        return f"redis://{hostport}"
    if target_port == 27017:
        return f"mongodb://{hostport}"
    if protocol in ("http", "https"):
        return f"{protocol}://{hostport}/"
    return f"tcp://{hostport}"


def _iso(ts: Optional[float]) -> Optional[str]:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _name(value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value.strip()) <= MAX_NAME or not printable_text(value):
        raise _bad("name", f"must be a string of 1 to {MAX_NAME} printable characters")
    return value.strip()


def _object(request: Request, fields: set[str]) -> dict[str, Any]:
    body = request.json()
    if not isinstance(body, dict):
        raise HttpError(400, "invalid_request", "request body must be a JSON object")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise HttpError(400, "unknown_field",
                        f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(fields))}")
    return body


# ----------------------------------------------------------------------------- the API


class TunnelsApi:
    """Routes and state of the Tunnels API on one :class:`~relay.gateway.app.Gateway`.

    The gateway calls :meth:`register` when it builds its router, :meth:`start` once it
    listens (reopens hub ports of active tunnels) and :meth:`close` when it stops.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.webhooks = WebhookDispatcher(store=getattr(gateway, "store", None),
                                          egress=getattr(gateway, "egress", None))
        self.limiter = RateLimiter()
        #: Time source for share expiry and rate limits (tests replace it).
        self.clock = time.time
        # Why a tunnel's hub port is not listening (bind failures), by tunnel id.
        self._errors: dict[str, str] = {}
        # Serialises listener changes: two PATCHes must not race to bind one port.
        self._hub_lock = asyncio.Lock()
        # Tunnel ids whose hub port this gateway listens on (or tried to): the rest of
        # TunnelManager's listeners are seed 000 sessions, not ours to sync.
        self._hub_ids: set[str] = set()
        # In a fleet: follows the tunnels table (sync_hubs); set() asks for a pass now.
        self._sync_wanted = asyncio.Event()
        self._sync_task: Optional[asyncio.Task[None]] = None
        #: Serves the share URLs /s/{share_token}/...
        self.share_proxy = ShareProxy(self)

    def register(self, router: Router) -> None:
        add = router.add
        add("POST", "/api/v1/tunnels", self._create)
        add("GET", "/api/v1/tunnels", self._list)
        add("GET", "/api/v1/tunnels/{tunnel_id}", self._get)
        add("PATCH", "/api/v1/tunnels/{tunnel_id}", self._update)
        add("DELETE", "/api/v1/tunnels/{tunnel_id}", self._delete)
        add("POST", "/api/v1/tunnels/{tunnel_id}/connect", self._connect)
        add("GET", "/api/v1/tunnels/{tunnel_id}/bindings", self._list_bindings)
        add("DELETE", "/api/v1/tunnels/{tunnel_id}/bindings/{agent_id}", self._delete_binding)
        add("POST", "/api/v1/tunnels/{tunnel_id}/shares", self._create_share)
        add("GET", "/api/v1/tunnels/{tunnel_id}/shares", self._list_shares)
        add("GET", "/api/v1/tunnels/{tunnel_id}/shares/{share_id}", self._get_share)
        add("DELETE", "/api/v1/tunnels/{tunnel_id}/shares/{share_id}", self._delete_share)
        add("POST", "/api/v1/webhooks", self._create_webhook)
        add("GET", "/api/v1/webhooks", self._list_webhooks)
        add("GET", "/api/v1/webhooks/{webhook_id}", self._get_webhook)
        add("DELETE", "/api/v1/webhooks/{webhook_id}", self._delete_webhook)
        self.share_proxy.register(router)

    def openapi(self, document: dict[str, Any]) -> dict[str, Any]:
        """``document`` (the gateway's OpenAPI) with this API's paths and schemas added."""
        return add_tunnels_api(document)

    async def start(self) -> None:
        """Reopen the hub ports of active tunnels (same port as before the restart) and
        resume webhook deliveries a previous run left unfinished."""
        await self.webhooks.resume()
        for tunnel in await self.gw.store.list_tunnels(None):
            if tunnel.status == "active":
                async with self._hub_lock:
                    await self._open_hub(tunnel)

    def follow_fleet(self) -> None:
        """In a fleet: keep the hub ports in step with the tunnels table, whoever changes
        it (:meth:`sync_hubs`), until :meth:`close`."""
        if self._sync_task is None:
            self._sync_task = asyncio.get_running_loop().create_task(self._follow())

    def sync_soon(self) -> None:
        """Another gateway changed a tunnel: look at the store now (in a fleet)."""
        self._sync_wanted.set()

    async def _follow(self) -> None:
        store = self.gw.store
        seen = store.generation()
        last = time.monotonic()
        failed = False
        while True:
            if failed:  # the store does not answer: retry at a slow pace, whatever asks
                await asyncio.sleep(SYNC_POLL)
            else:
                try:
                    async with asyncio.timeout(SYNC_POLL):
                        await self._sync_wanted.wait()
                except TimeoutError:
                    pass
            generation, elapsed = store.generation(), time.monotonic() - last
            if failed:
                due = elapsed >= SYNC_RETRY
            else:
                due = self._sync_wanted.is_set() or generation != seen or elapsed >= SYNC_EVERY
            if not due:
                continue
            self._sync_wanted.clear()
            seen, last = generation, time.monotonic()
            try:
                await self.sync_hubs()
                if self.gw.tunnels is not None:  # seed 000 sessions' hub ports and lifetimes
                    await self.gw.tunnels.sync_sessions()
                if failed:
                    log.info("hub ports follow the store again")
                failed = False
            except Exception as exc:  # keep what listens; the next pass retries
                if not failed:
                    log.warning("cannot follow the tunnels table (hub ports stay as they are): %s", exc)
                failed = True

    async def sync_hubs(self) -> None:
        """Listen on the hub port of every active tunnel of the store that has one, on
        this gateway too, and stop listening on those of tunnels paused, deleted or
        moved to another port (by any gateway). Idempotent."""
        tunnels = self.gw.tunnels
        if tunnels is None:
            return
        async with self._hub_lock:  # read under the lock: a creation here must not look stale
            wanted = {t.id: t for t in await self.gw.store.list_tunnels(None)
                      if t.status == "active" and t.hub_port is not None}
            for tunnel_id in list(self._hub_ids):
                tunnel = wanted.get(tunnel_id)
                hub = tunnels.hub(tunnel_id)
                if tunnel is None or (hub is not None and hub.port != tunnel.hub_port):
                    self._hub_ids.discard(tunnel_id)
                    self._close_hub_id(tunnel_id)
            for tunnel in wanted.values():
                if tunnels.hub(tunnel.id) is None:
                    await self._open_hub(tunnel)

    async def close(self) -> None:
        """Stop hub listeners and webhook deliveries."""
        if self._sync_task is not None:
            self._sync_task.cancel()
            await asyncio.gather(self._sync_task, return_exceptions=True)
            self._sync_task = None
        if self.gw.tunnels is not None:
            for tunnel_id in list(self._hub_ids):
                self.gw.tunnels.close_hub(tunnel_id)
            self._hub_ids.clear()
        await self.webhooks.close()

    # -- helpers

    async def _principal(self, request: Request, manage: bool = False) -> Principal:
        principal = await self.gw._principal(request)
        return principal.require_manage() if manage else principal

    async def _tunnel(self, principal: Principal, tunnel_id: str) -> Tunnel:
        tunnel = await self.gw.store.get_tunnel(principal.team_id, tunnel_id)
        if tunnel is None:  # unknown, malformed, or another team's: all the same 404
            raise HttpError(404, "tunnel_not_found", f"no tunnel {tunnel_id} in this team")
        return tunnel

    async def _team_agent_id(self, principal: Principal, value: Any) -> str:
        agent_id = normalize_uuid(value)
        if agent_id is None:
            raise _bad("agent_id", "must be the UUID of one of this team's agents")
        if await self.gw.store.get_agent(principal.team_id, agent_id) is None:
            raise HttpError(404, "agent_not_found", f"no agent {agent_id} in this team")
        return agent_id

    async def _open_hub(self, tunnel: Tunnel) -> Tunnel:
        """Listen on the tunnel's hub port; one that has none yet gets a free port,
        reserved in the store (atomically across a fleet). A bind failure is recorded
        as the tunnel's error (logged once per reason), not raised. Call with ``_hub_lock``."""
        tunnels = self.gw.tunnels
        assert tunnels is not None, "the gateway is not started"
        self._hub_ids.add(tunnel.id)
        for _ in range(HUB_PORT_ATTEMPTS):
            try:
                hub = await tunnels.open_hub(tunnel.id, tunnel.team_id, tunnel.agent_id,
                                             tunnel.target_host, tunnel.target_port,
                                             tunnel.hub_port or 0, protocol=tunnel.protocol,
                                             public=tunnel.public)
            except OSError as exc:
                error = f"cannot listen on hub port {tunnel.hub_port or 0}"
                if self.gw.fleet is not None:  # the others may well listen: say which one failed
                    error += f" on gateway {self.gw.fleet.gateway_id}"
                error += f": {exc.strerror or exc}"
                if self._errors.get(tunnel.id) != error:
                    log.warning("tunnel %s: %s", tunnel.id, error)
                self._errors[tunnel.id] = error
                return tunnel
            if tunnel.hub_port == hub.port:
                break
            # A new port: reserve it. The store refuses a port another tunnel holds (a
            # paused one keeps its port; another gateway may have just taken it).
            try:
                claimed = await self.gw.store.claim_hub_port(tunnel.team_id, tunnel.id, hub.port)
            except ConflictError:
                tunnels.close_hub(tunnel.id)
                continue
            except BaseException:
                tunnels.close_hub(tunnel.id)
                raise
            if claimed is None or claimed.hub_port != hub.port:
                # Deleted meanwhile, or another gateway reserved a port for it first: use that.
                tunnels.close_hub(tunnel.id)
                if claimed is None:
                    self._hub_ids.discard(tunnel.id)
                    return tunnel
                tunnel = claimed
                continue
            tunnel = claimed
            break
        else:
            self._errors[tunnel.id] = "no free hub port"
            return tunnel
        self._errors.pop(tunnel.id, None)
        log.info("tunnel %s (%s): hub port %s:%d -> agent %s %s:%d", tunnel.id, tunnel.name,
                 tunnels.hub_host, hub.port, tunnel.agent_id, tunnel.target_host, tunnel.target_port)
        return tunnel

    def stopped_elsewhere(self, tunnel_id: str, share_ids: list[str]) -> None:
        """Another gateway of the fleet paused or deleted the tunnel: stop its hub port
        here and cut its share links' live connections."""
        self._close_hub_id(tunnel_id)
        self.share_proxy.forget(share_ids)

    def _close_hub(self, tunnel: Tunnel) -> None:
        self._close_hub_id(tunnel.id)

    def _close_hub_id(self, tunnel_id: str) -> None:
        self._errors.pop(tunnel_id, None)
        self._hub_ids.discard(tunnel_id)
        if self.gw.tunnels is not None:
            self.gw.tunnels.close_hub(tunnel_id)

    def describe(self, tunnel: Tunnel) -> dict[str, Any]:
        """The API representation of a tunnel, with its live status."""
        tunnels = self.gw.tunnels
        hub = tunnels.hub(tunnel.id) if tunnels is not None else None
        error = None
        if tunnel.status == "paused":
            status = "paused"
        elif tunnel.id in self._errors or hub is None:
            status, error = "error", self._errors.get(tunnel.id, "the hub port is not listening")
        elif self.gw.registry.get(tunnel.team_id, tunnel.agent_id) is None:
            status = "connecting"
        else:
            status = "active"
        host = tunnel.target_host
        return {
            "id": tunnel.id,
            "name": tunnel.name,
            "agent_id": tunnel.agent_id,
            "target": f"[{host}]:{tunnel.target_port}" if ":" in host else f"{host}:{tunnel.target_port}",
            "target_host": host,
            "target_port": tunnel.target_port,
            "protocol": tunnel.protocol,
            "public": tunnel.public,
            "hub_host": self._hub_host(tunnel, hub),
            "hub_port": tunnel.hub_port,
            "status": status,
            "error": error,
            "metadata": tunnel.metadata,
            "connections": hub.connections if hub else 0,
            "active_connections": len(hub.splices) if hub else 0,
            "last_error": hub.last_error if hub else None,
            **({"udp": hub.udp.as_dict()} if hub is not None and hub.udp is not None else {}),
            **({"public_url": self._public_hub_url(tunnel)}
               if tunnel.public and tunnel.protocol in ("tcp", "udp") and tunnel.hub_port else {}),
            "created_at": _iso(tunnel.created_at),
            "updated_at": _iso(tunnel.updated_at),
        }

    def _hub_host(self, tunnel: Tunnel, hub: Any) -> Optional[str]:
        """The address the tunnel's hub port listens (or would listen) on."""
        if hub is not None and hub.host:
            return str(hub.host)
        tunnels = self.gw.tunnels
        if tunnels is None:
            return None
        return tunnels.public_hub_host if tunnel.public else tunnels.hub_host

    def _public_hub_url(self, tunnel: Tunnel) -> str:
        """``tcp://HOST:PORT`` (``udp://``) of a public tunnel's hub port, HOST as other
        machines name the gateway's host (module docstring, "Public tunnels")."""
        host = self._hub_host(tunnel, None) or ""
        if host in ("", "0.0.0.0", "::"):
            host = urlsplit(self.gw.url).hostname or host
        hostport = f"[{host}]:{tunnel.hub_port}" if ":" in host else f"{host}:{tunnel.hub_port}"
        return f"{'udp' if tunnel.protocol == 'udp' else 'tcp'}://{hostport}"

    async def _publish(self, team_id: str, event: str, data: dict[str, Any]) -> None:
        """Queue a webhook event; never waits, never fails the request."""
        try:
            hooks = await self.gw.store.list_webhooks(team_id, event)
        except Exception as exc:  # a webhook must never break the API call that caused it
            log.error("cannot read webhooks for %s: %s", event, exc)
            return
        await self.webhooks.publish(hooks, event, team_id, data)

    # -- tunnels

    async def _create(self, request: Request) -> Response:
        principal = await self._principal(request, manage=True)
        body = _object(request, _CREATE_FIELDS)
        if "target" not in body:
            raise _bad("target", "is required")
        host, port = parse_target(body["target"])
        if "agent_id" not in body:
            raise _bad("agent_id", "is required")
        name = generate_name() if body.get("name") is None else _name(body["name"])
        protocol = body.get("protocol", "auto")
        if protocol is None:
            protocol = "auto"
        if protocol not in PROTOCOLS:
            raise _bad("protocol", f"must be one of {', '.join(PROTOCOLS)}")
        if protocol == "auto":
            protocol = auto_protocol(port)
        public = body.get("public", False)
        if not isinstance(public, bool):
            raise _bad("public", "must be true or false")
        hub_port = body.get("hub_port")
        low, high = HUB_PORT_RANGE
        if hub_port is not None:
            if not _valid_port(hub_port) or not low <= hub_port <= high:
                raise _bad("hub_port", f"must be an integer from {low} to {high}")
        agent_id = await self._team_agent_id(principal, body["agent_id"])
        tunnels = self.gw.tunnels
        assert tunnels is not None, "the gateway is not started"
        # The requested hub port is not listening yet, but is about to be one of ours.
        future = () if hub_port is None else (hub_port,)
        refusal = tunnels.target_refusal(principal.team_id, agent_id, host, port, future_ports=future)
        if refusal is not None:  # a loop into the gateway, or a target the agent refuses
            raise HttpError(*refusal)
        loop = await tunnels.resolved_loop_refusal(principal.team_id, agent_id, host, port, future)
        if loop is not None:  # a name that resolves to the gateway itself
            raise HttpError(400, "target_is_gateway", loop)
        async with self._hub_lock:  # the port check, the insert and the bind as one step
            taken = HttpError(409, "hub_port_taken", f"hub_port: {hub_port} is used by another tunnel")
            if hub_port is not None and await self.gw.store.tunnel_on_hub_port(hub_port) is not None:
                raise taken
            try:
                tunnel = await self.gw.store.create_tunnel(principal.team_id, agent_id, name, host, port,
                                                           protocol, public=public, hub_port=hub_port)
            except ConflictError:  # another gateway took the port since the check above
                if hub_port is not None:  # (or a tunnel session holds it)
                    raise taken from None
                raise
            tunnel = await self._open_hub(tunnel)
        self.gw.fleet_publish("tunnels", ids=[tunnel.id], status="active")
        result = self.describe(tunnel)
        await self._publish(principal.team_id, "tunnel.created", result)
        if public and protocol in ("http", "https"):
            # Public = an unrestricted share made with the tunnel (delete it to unpublish).
            _, token = await self.gw.store.create_share(principal.team_id, tunnel.id, "public",
                                                  "created with the tunnel (public: true)")
            result = {**result, "public_url": f"{self.gw.url}/s/{token}/"}
        return json_response(result, 201)

    async def _list(self, request: Request) -> Response:
        principal = await self._principal(request)
        return json_response({"tunnels": [self.describe(t)
                                          for t in await self.gw.store.list_tunnels(principal.team_id)]})

    async def _get(self, request: Request) -> Response:
        principal = await self._principal(request)
        return json_response(self.describe(await self._tunnel(principal, request.params["tunnel_id"])))

    async def _update(self, request: Request) -> Response:
        principal = await self._principal(request, manage=True)
        tunnel = await self._tunnel(principal, request.params["tunnel_id"])
        body = _object(request, _UPDATE_FIELDS)
        if not body:
            raise HttpError(400, "invalid_request", "nothing to update: send name, status or metadata")
        changes: dict[str, Any] = {}
        if "name" in body:
            changes["name"] = _name(body["name"])
        if "status" in body:
            if body["status"] not in ("active", "paused"):
                raise _bad("status", 'must be "active" or "paused"')
            changes["status"] = body["status"]
        if "metadata" in body:
            metadata = body["metadata"]
            if not isinstance(metadata, dict):
                raise _bad("metadata", "must be a JSON object")
            if len(json.dumps(metadata).encode()) > MAX_METADATA:
                raise _bad("metadata", f"must be at most {MAX_METADATA} bytes as JSON")
            changes["metadata"] = metadata
        async with self._hub_lock:  # the stored status and the listener change together
            tunnel = await self.gw.store.update_tunnel(principal.team_id, tunnel.id, **changes) or tunnel
            if changes.get("status") == "paused":
                self._close_hub(tunnel)
                share_ids = [s.id for s in await self.gw.store.list_shares(tunnel.team_id, tunnel.id)]
                self.share_proxy.forget(share_ids)
                self.gw.fleet_publish("tunnels", ids=[tunnel.id], status="paused", shares=share_ids)
            elif changes.get("status") == "active":
                tunnels = self.gw.tunnels
                if tunnels is None or tunnels.hub(tunnel.id) is None:  # paused or errored: (re)open
                    tunnel = await self._open_hub(tunnel)
                self.gw.fleet_publish("tunnels", ids=[tunnel.id], status="active")
        return json_response(self.describe(tunnel))

    async def _delete(self, request: Request) -> Response:
        principal = await self._principal(request, manage=True)
        tunnel = await self._tunnel(principal, request.params["tunnel_id"])
        shares = await self.gw.store.list_shares(principal.team_id, tunnel.id)
        last = self.describe(tunnel)
        async with self._hub_lock:
            if await self.gw.store.delete_tunnel(principal.team_id, tunnel.id) is None:
                raise HttpError(404, "tunnel_not_found", f"no tunnel {tunnel.id} in this team")
            self._close_hub(tunnel)
        for share in shares:
            self.limiter.forget(share.id)
        self.share_proxy.forget([share.id for share in shares])
        self.gw.fleet_publish("tunnels", ids=[tunnel.id], status="deleted", shares=[s.id for s in shares])
        last["status"] = "deleted"
        await self._publish(principal.team_id, "tunnel.deleted", last)
        return json_response(None, 204)

    async def _connect(self, request: Request) -> Response:
        principal = await self._principal(request)
        tunnel = await self._tunnel(principal, request.params["tunnel_id"])
        body = _object(request, {"agent_id", "local_port"})
        if "agent_id" not in body:
            raise _bad("agent_id", "is required")
        local_port = body.get("local_port")
        if local_port is None:
            local_port = tunnel.target_port
        elif not _valid_port(local_port):
            raise _bad("local_port", "must be an integer from 1 to 65535")
        if tunnel.protocol == "udp":
            raise HttpError(400, "unsupported_protocol",
                            "connect binds a TCP port on the agent; a udp tunnel is reached at its "
                            "UDP hub port (hub_host:hub_port), or through a seed 000 udp session "
                            "with `relay connect --udp`")
        agent_id = await self._team_agent_id(principal, body["agent_id"])
        receiver = self.gw.registry.get(principal.team_id, agent_id)
        if receiver is None:
            raise HttpError(409, "agent_offline", f"agent {agent_id} is not connected")
        # Waits for the agent's result and records the binding (relay.gateway.agents.bindings).
        hub = await self.gw.bindings.bind(receiver, tunnel, local_port)
        return json_response({
            "tunnel_id": tunnel.id,
            "agent_id": agent_id,
            "local_host": "127.0.0.1",
            "local_port": local_port,
            "protocol": tunnel.protocol,
            "connection_string": connection_string(tunnel.target_port, tunnel.protocol,
                                                   "127.0.0.1", local_port),
            "hub": hub,
            "tunnel_status": self.describe(tunnel)["status"],
        })

    async def _list_bindings(self, request: Request) -> Response:
        principal = await self._principal(request)
        tunnel = await self._tunnel(principal, request.params["tunnel_id"])
        bindings = []
        for agent_id, local_port, created_at in await self.gw.store.list_tunnel_bindings(principal.team_id, tunnel.id):
            bindings.append({
                "agent_id": agent_id, "local_host": "127.0.0.1", "local_port": local_port,
                "agent_online": self.gw.registry.get(principal.team_id, agent_id) is not None,
                "connection_string": connection_string(tunnel.target_port, tunnel.protocol, "127.0.0.1", local_port),
                "created_at": _iso(created_at)})
        return json_response({"bindings": bindings})

    async def _delete_binding(self, request: Request) -> Response:
        principal = await self._principal(request)
        tunnel = await self._tunnel(principal, request.params["tunnel_id"])
        agent_id = normalize_uuid(request.params["agent_id"]) or request.params["agent_id"]
        if not await self.gw.store.delete_binding(principal.team_id, tunnel.id, agent_id):
            raise HttpError(404, "binding_not_found", f"agent {agent_id} has no binding of tunnel {tunnel.id}")
        self.gw.bindings.unbind(principal.team_id, agent_id, tunnel.id)
        return json_response(None, 204)

    # -- shares

    def _share_json(self, share: Share, token: Optional[str] = None) -> dict[str, Any]:
        result = {
            "id": share.id,
            "tunnel_id": share.tunnel_id,
            "name": share.name,
            "description": share.description,
            "token_prefix": share.token_prefix,
            "expires_at": _iso(share.expires_at),
            "expired": share.expires_at is not None and self.clock() >= share.expires_at,
            "allowed_methods": list(share.allowed_methods) if share.allowed_methods is not None else None,
            "rate_limit": share.rate_limit,
            "created_at": _iso(share.created_at),
        }
        if token is not None:
            url = f"{self.gw.url}/s/{token}/"
            result["shareUrl"] = url  # canonical (seed 002)
            result["share_url"] = url  # the same, as earlier answers spelled it
        return result

    async def _create_share(self, request: Request) -> Response:
        principal = await self._principal(request, manage=True)
        tunnel = await self._tunnel(principal, request.params["tunnel_id"])
        spec = parse_share_request(request.json())
        if tunnel.protocol not in ("http", "https"):
            raise HttpError(400, "invalid_tunnel_protocol",
                            f"shares are served by the gateway's HTTP proxy: create them on an http or "
                            f"https tunnel (this one is {tunnel.protocol})")
        share, token = await self.gw.store.create_share(
            principal.team_id, tunnel.id, spec.name, spec.description,
            expires_at=spec.expires_at(self.clock()), allowed_methods=spec.allowed_methods,
            rate_limit=spec.rate_limit)
        return json_response(self._share_json(share, token), 201)

    async def _list_shares(self, request: Request) -> Response:
        principal = await self._principal(request)
        tunnel = await self._tunnel(principal, request.params["tunnel_id"])
        return json_response({"shares": [self._share_json(s)
                                         for s in await self.gw.store.list_shares(principal.team_id, tunnel.id)]})

    async def _share(self, principal: Principal, request: Request) -> Share:
        tunnel = await self._tunnel(principal, request.params["tunnel_id"])
        share = await self.gw.store.get_share(principal.team_id, tunnel.id, request.params["share_id"])
        if share is None:
            raise HttpError(404, "share_not_found", f"no share {request.params['share_id']} on this tunnel")
        return share

    async def _get_share(self, request: Request) -> Response:
        return json_response(self._share_json(await self._share(await self._principal(request), request)))

    async def _delete_share(self, request: Request) -> Response:
        principal = await self._principal(request, manage=True)
        share = await self._share(principal, request)
        await self.gw.store.delete_share(principal.team_id, share.tunnel_id, share.id)
        self.limiter.forget(share.id)
        self.share_proxy.forget([share.id])
        self.gw.fleet_publish("shares", ids=[share.id])
        return json_response(None, 204)

    # -- webhooks

    @staticmethod
    def _webhook_json(hook: Webhook, with_secret: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = {"id": hook.id, "url": hook.url, "events": list(hook.events),
                                  "created_at": _iso(hook.created_at)}
        if with_secret:
            result["secret"] = hook.secret
        return result

    async def _create_webhook(self, request: Request) -> Response:
        principal = await self._principal(request, manage=True)
        url, events = parse_webhook_request(request.json())
        refused = self.webhooks.egress.check_url(url)
        if refused is not None:
            raise HttpError(400, "egress_not_allowed", f"url: {refused}")
        hook = await self.gw.store.create_webhook(principal.team_id, url, events)
        return json_response(self._webhook_json(hook, with_secret=True), 201)

    async def _list_webhooks(self, request: Request) -> Response:
        principal = await self._principal(request, manage=True)
        return json_response({"webhooks": [self._webhook_json(h)
                                           for h in await self.gw.store.list_webhooks(principal.team_id)]})

    async def _get_webhook(self, request: Request) -> Response:
        principal = await self._principal(request, manage=True)
        hook = await self.gw.store.get_webhook(principal.team_id, request.params["webhook_id"])
        if hook is None:
            raise HttpError(404, "webhook_not_found", f"no webhook {request.params['webhook_id']} in this team")
        return json_response(self._webhook_json(hook))

    async def _delete_webhook(self, request: Request) -> Response:
        principal = await self._principal(request, manage=True)
        if not await self.gw.store.delete_webhook(principal.team_id, request.params["webhook_id"]):
            raise HttpError(404, "webhook_not_found", f"no webhook {request.params['webhook_id']} in this team")
        return json_response(None, 204)
