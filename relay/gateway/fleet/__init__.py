"""A gateway fleet: several gateways, one pool of agents (issue 13, items 2 and 3).

Who owns what:

* PostgreSQL/SQLite (the store) holds the durable state, shared by every gateway.
* Redis holds what is live: each gateway's lease, each agent session's lease with its
  epoch (relay.gateway.fleet.leases), fleet-wide share rate counters
  (relay.gateway.fleet.ratelimit) and the events channel that carries lease changes
  and cache invalidations to every gateway at once.
* Each gateway holds its agents' sessions and serves their streams; a request for an
  agent held elsewhere is forwarded over a peer session (relay.gateway.fleet.peers,
  relay.gateway.fleet.forward), whose streams are joined to the agent's at the holder
  (relay.gateway.fleet.bridge); what needs an agent's control messages (tasks, Tunnels
  API bindings, the agents' hellos) goes as control requests on the same sessions
  (relay.gateway.fleet.control).

:class:`Fleet` is the composition: the gateway creates it when started with
:class:`FleetConfig` (``relay gateway --redis URL --fleet-secret S``), and it hooks
into the gateway's registry (lookups fall back to the fleet; registrations become
leases), its caches (invalidations from the other gateways) and its health and
metrics. docs/FLEET.md has the rules and what happens on each failure.
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from relay.gateway.fleet.leases import CHANNEL, LeaseStore
from relay.gateway.fleet.metrics import FleetMetrics
from relay.gateway.fleet.peers import PEER_PATH, PeerPool
from relay.gateway.fleet.registry import FleetRegistry

if TYPE_CHECKING:
    from relay.gateway.app import Gateway

__all__ = ["Fleet", "FleetConfig", "PEER_PATH", "publish_invalidation"]

log = logging.getLogger("relay.gateway.fleet")

#: How long joining the fleet waits for the events channel's subscription.
SUBSCRIBE_WAIT = 2.0
#: Invalidation kinds (what the receiving gateway forgets; relay.gateway.app.Gateway.invalidate).
INVALIDATIONS = ("credentials", "tunnel_sessions", "tunnels", "shares", "services")


@dataclass
class FleetConfig:
    """How a gateway joins a fleet."""

    #: ``redis://[:password@]host:port[/db]`` (or ``rediss://``).
    redis_url: str
    #: Shared by every gateway of the fleet; authenticates peer sessions ("" with
    #: ``ca_file`` alone: the certificates do).
    secret: str
    #: This gateway's id (default: a new random one per start).
    gateway_id: str = ""
    #: The URL peers reach this gateway at (default: its public URL).
    advertise: Optional[str] = None
    #: Agent lease lifetime (renewed every third of it).
    agent_ttl: float = 15.0
    #: Gateway lease lifetime: a dead gateway is noticed within it.
    gateway_ttl: float = 6.0
    #: Mutual TLS between gateways: the CA (PEM) that signs every gateway's certificate.
    #: Peers dial with ``cert_file``/``key_file`` (the gateway's own --tls-cert) and
    #: trust only this CA; a peer session is accepted only from a client certificate
    #: this CA signed (docs/FLEET.md).
    ca_file: Optional[Path] = None
    cert_file: Optional[Path] = None
    key_file: Optional[Path] = None

    def peer_client_context(self) -> Optional[ssl.SSLContext]:
        """The TLS context peer dials use with mutual TLS: trusts only the fleet's CA and
        presents this gateway's certificate. None without ``ca_file``."""
        if self.ca_file is None:
            return None
        if self.cert_file is None or self.key_file is None:
            raise ValueError("mutual TLS between gateways needs this gateway's certificate and key "
                             "(--tls-cert, --tls-key)")
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def __repr__(self) -> str:  # never show the secret
        return (f"FleetConfig(redis_url={_redact(self.redis_url)!r}, gateway_id={self.gateway_id!r}, "
                f"advertise={self.advertise!r})")


def _redact(url: str) -> str:
    """A Redis URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def _redis_module() -> Any:
    try:
        import redis.asyncio as aioredis
    except ImportError:
        raise ValueError("--redis needs the redis client: pip install 'relay[fleet]'") from None
    return aioredis


class Fleet:
    """One gateway's membership of a fleet (module docstring)."""

    def __init__(self, gateway: "Gateway", config: FleetConfig) -> None:
        if not config.secret and config.ca_file is None:
            raise ValueError("a fleet needs a secret shared by its gateways (--fleet-secret) "
                             "or mutual TLS (--fleet-ca)")
        aioredis = _redis_module()
        self.gateway = gateway
        self.config = config
        self.gateway_id = config.gateway_id or uuid.uuid4().hex[:12]
        self.advertise = ""
        # Commands fail fast (the gateway goes on without Redis); the subscription's
        # connection waits for messages as long as it takes, pinging to notice a loss.
        self.client = aioredis.from_url(config.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._sub_client = aioredis.from_url(config.redis_url, socket_connect_timeout=2.0,
                                             socket_keepalive=True, health_check_interval=3)
        self.leases = LeaseStore(self.client, self.gateway_id, agent_ttl=config.agent_ttl,
                                 gateway_ttl=config.gateway_ttl)
        self.metrics = FleetMetrics()
        self.registry = FleetRegistry(self)
        from relay.gateway.fleet.clones import CloneGuard
        from relay.gateway.fleet.control import ControlChannel
        from relay.gateway.fleet.forward import serve_forwarded

        self.control = ControlChannel(self)
        self.clones = CloneGuard(self)

        self.peers = PeerPool(self.gateway_id, config.secret, lambda stream: serve_forwarded(self, stream),
                              metrics=self.metrics, ssl_context=config.peer_client_context())
        self.closed = False
        self.redis_up = False
        self._tasks: set[asyncio.Task] = set()
        self._loops: list[asyncio.Task] = []
        self._resync = True
        #: Set once the events channel is subscribed (and again after each resubscription).
        self._subscribed = asyncio.Event()

    def __repr__(self) -> str:
        return f"Fleet({self.gateway_id!r}, {self.config!r})"

    # -- lifecycle

    async def start(self, advertise: str) -> None:
        """Join: hook into the gateway, register, start the lease and event loops. A
        Redis that does not answer yet is logged, not fatal (local agents are served)."""
        from relay.gateway.fleet.ratelimit import FleetRateLimiter

        self.advertise = (self.config.advertise or advertise).rstrip("/")
        gw = self.gateway
        registry = gw.registry
        registry.remote = self.registry.remote
        registry.elsewhere = self.registry.serving_elsewhere
        registry.holders = self.registry.holders_of
        self.control.handle("hello", self.registry.serve_hello)
        self.control.handle("alive", self.clones.serve_alive)
        registry.admission = self.clones.admission
        self.control.handle("bind", gw.bindings.serve_peer)
        self.control.handle("task", gw.tasks.serve_peer)
        self.control.handle("cancel", gw.tasks.serve_cancel)
        registry.on_register.append(self.registry.on_register)
        registry.on_unregister.append(self.registry.on_unregister)
        gw.tunnels_api.limiter = FleetRateLimiter(self)
        if gw.tunnels is not None:
            from relay.gateway.fleet.activity import SessionActivity

            gw.tunnels.session_listeners.append(self._sessions_changed)
            gw.tunnels.shared_activity = SessionActivity(self)
        loop = asyncio.get_running_loop()
        await self._round()
        self.spawn(self._announce({"t": "gw", "g": self.gateway_id, "u": self.advertise}))
        self._loops = [loop.create_task(self._lease_loop()), loop.create_task(self._subscribe_loop())]
        # Listening for the events before the gateway says it is in the fleet: a tunnel
        # opened elsewhere just after must reach it at once, not at the next poll.
        try:
            async with asyncio.timeout(SUBSCRIBE_WAIT):
                await self._subscribed.wait()
        except TimeoutError:
            pass  # Redis is slow or away: the loops catch up (and the store is polled)
        log.info("gateway %s in the fleet at %s (redis %s)", self.gateway_id, self.advertise,
                 _redact(self.config.redis_url))

    async def close(self) -> None:
        """Leave: release the leases held here (so others learn at once) and stop."""
        self.closed = True
        for task in self._loops:
            task.cancel()
        try:
            async with asyncio.timeout(1.0):
                for lease, _ in list(self.registry._leases.values()):
                    await self.leases.release(lease)
                await self.leases.drop_gateway()
                await self.leases.publish({"t": "gw-gone", "g": self.gateway_id})
        except Exception:  # leaving fast matters more: leases expire by themselves
            pass
        await self.peers.close()
        for task in list(self._tasks):
            task.cancel()
        for client in (self.client, self._sub_client):
            try:
                await client.aclose()
            except Exception:
                pass

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background (kept referenced until done)."""
        if self.closed:
            coro.close()
            return
        self.track(asyncio.get_running_loop().create_task(coro))

    def track(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- Redis health

    def redis_failed(self, what: str, exc: BaseException) -> None:
        self.metrics.redis_failures += 1
        if self.redis_up or not self._resync:
            log.error("Redis unreachable (cannot %s: %s): serving only the agents held by this gateway "
                      "until it is back", what, exc)
        self.redis_up = False
        self._resync = True
        self.metrics.redis_up = False

    def redis_ok(self) -> None:
        if not self.redis_up:
            self.redis_up = True
            self.metrics.redis_up = True

    def health(self) -> dict[str, Any]:
        """The fleet part of /healthz."""
        return {"gateway_id": self.gateway_id, "redis": "ok" if self.redis_up else "unreachable",
                "gateways": sorted(self.registry.gateways), "peers_connected": self.peers.connected(),
                "leases": self.registry.local_leases()}

    # -- loops

    async def _round(self) -> None:
        """Gateway lease, live gateways, agent leases; after a Redis outage, a full
        rebuild of the locations (and of our leases, by renewal)."""
        try:
            await self.leases.register_gateway(self.advertise)
            self.registry.set_gateways(await self.leases.gateways())
            await self.registry.renew()
            if self._resync:
                self.registry.replace_all(await self.leases.locations())
                if not self.redis_up and self.metrics.redis_failures:
                    log.warning("Redis reachable again: leases of %d local agent session(s) restored",
                                self.registry.local_leases())
                self._resync = False
            self.redis_ok()
        except Exception as exc:
            self.redis_failed("renew the leases", exc)

    async def _lease_loop(self) -> None:
        interval = min(self.config.agent_ttl, self.config.gateway_ttl) / 3
        while True:
            await asyncio.sleep(interval)
            await self._round()

    async def _subscribe_loop(self) -> None:
        delay = 0.2
        while True:
            pubsub = self._sub_client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                self._subscribed.set()
                self._resync = True  # messages may have been missed: rescan
                self.spawn(self._round())
                self.gateway.tunnels_api.sync_soon()  # and hub ports follow the store now
                delay = 0.2
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is not None and message.get("type") == "message":
                        self._on_message(message.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.redis_failed("receive fleet events", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:
                    pass

    def _on_message(self, data: Any) -> None:
        try:
            message = json.loads(data)
        except (TypeError, ValueError):
            return
        if not isinstance(message, dict):
            return
        if message.get("t") == "inv":
            kind = message.get("k")
            if message.get("o") != self.gateway_id and kind in INVALIDATIONS:
                self.metrics.invalidations[kind] += 1
                try:
                    self.gateway.invalidate(kind, message)
                except Exception:
                    log.exception("cannot apply the %s invalidation", kind)
            return
        self.registry.on_event(message)

    async def _announce(self, message: dict[str, Any]) -> None:
        try:
            await self.leases.publish(message)
        except Exception as exc:
            self.redis_failed("announce this gateway", exc)

    # -- invalidations

    def _sessions_changed(self, team_id: str, agent_id: str, session_ids: list[str], opened: bool) -> None:
        """Tunnel sessions opened or closed here: the others listen on (or stop) their
        hub ports, and the gateway holding the agent sets its status (``tunnel``)."""
        key = "opened" if opened else "ids"
        self.publish("tunnel_sessions", **{key: list(session_ids)}, team=team_id, agent=agent_id)

    def publish(self, kind: str, **data: Any) -> None:
        """Tell every other gateway to forget ``kind`` (one of :data:`INVALIDATIONS`)."""
        self.spawn(self._publish({"t": "inv", "k": kind, "o": self.gateway_id, **data}))

    async def _publish(self, message: dict[str, Any]) -> None:
        try:
            await self.leases.publish(message)
        except Exception as exc:
            self.redis_failed(f"publish the {message['k']} invalidation", exc)


def publish_invalidation(redis_url: str, kind: str, **data: Any) -> None:
    """From outside a gateway (``relay admin``): tell every gateway of the fleet to
    forget ``kind`` now. Synchronous; raises on a Redis failure."""
    try:
        import redis
    except ImportError:
        raise ValueError("--redis needs the redis client: pip install 'relay[fleet]'") from None
    client = redis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        client.publish(CHANNEL, json.dumps({"t": "inv", "k": kind, "o": "admin", **data}))
    finally:
        client.close()
