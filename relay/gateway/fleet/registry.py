"""The fleet registry: leases of the sessions held here, and where every other agent is.

Local side: every agent session the gateway's :class:`~relay.gateway.agents.registry.Registry`
registers is claimed in Redis (a new epoch, relay.gateway.fleet.leases), renewed every
third of the lease time and released (epoch permitting) when it ends. An agent may hold
sessions to several gateways at once (``relay agent --connections``): each gateway
leases its own. A renewal that finds the session stale (below the agent's floor: the
agent came back as another process; or older than the newest session of the same
connection of the agent: it reconnected elsewhere) ends the local session. While Redis
is unreachable the sessions keep being served; those that could not be claimed are
claimed, and the others' leases restored, once it is back.

Remote side: :attr:`FleetRegistry.locations` mirrors every agent's sessions in the
whole fleet (agent id -> gateway id -> location), filled by one scan at start (and
after any lost subscription) and kept by the events every claim, renewal-after-loss
and release publishes; an event below the agent's floor (or older than what is known
for that gateway or that connection) is ignored. A lookup of an agent held elsewhere is therefore a dict
read, no Redis round trip; a miss (an agent never heard of) asks Redis once in the
background, at most once a second per agent, and answers "offline" meanwhile.
Sessions on gateways whose own lease expired (a dead gateway) are not used; among the
others, a new stream goes to one whose peer session is up and carries the fewest
streams (so losing one gateway breaks only the streams it carried).

Hellos: for every agent it learns held on another gateway, the registry asks one such
gateway once, in the background, for the agent's hello (a ``hello`` control request,
relay.gateway.fleet.control): its name, labels, service declarations and target policy.
It is kept with the session it was read from, and only while that session is one of the
agent's (all sessions of one agent process say the same; a new process, a new hello;
an agent gone, its hello gone), so what the service manager and the tunnel checks read
about a remote agent is always current, and no request waits for it.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING, Any, Optional

from relay.gateway.agents.registry import ConnectedAgent, agent_identity
from relay.gateway.fleet.forward import ForwardSession, RemoteAgent
from relay.gateway.fleet.leases import Holders, Lease, Location
from relay.mux.errors import ErrorCode

if TYPE_CHECKING:
    from relay.gateway.fleet import Fleet
    from relay.gateway.fleet.control import ControlCall

__all__ = ["FleetRegistry", "MOVED_MESSAGE"]

log = logging.getLogger("relay.gateway.fleet.registry")

#: The GOAWAY message of a local session superseded by a newer one (of a new agent
#: process, or of the same connection of the agent through another gateway).
MOVED_MESSAGE = "the agent connected again through another gateway"
#: A lookup miss asks Redis at most this often per agent.
FETCH_INTERVAL = 1.0
#: Asking a gateway for an agent's hello: attempts (while the session holds), each
#: waiting at most this long for the answer.
HELLO_ATTEMPTS = 5
HELLO_TIMEOUT = 5.0
#: What is kept of a remote agent's hello: its identity (agent_identity), its service
#: declarations (the service manager), its target policy (the seed 000 tunnel checks)
#: and whether it serves a terminal (relay.gateway.web.terminal).
HELLO_FIELDS = ("name", "labels", "version", "services", "allow", "terminal")


class FleetRegistry:
    """Leases of local sessions and the cache of every agent's sessions."""

    def __init__(self, fleet: "Fleet") -> None:
        self._fleet = fleet
        self.gateway_id = fleet.gateway_id
        #: agent id -> gateway id -> that gateway's session of the agent (this one included).
        self.locations: dict[str, dict[str, Location]] = {}
        #: agent id -> the lowest epoch still valid (relay.gateway.fleet.leases).
        self.floors: dict[str, int] = {}
        #: Live gateways: id -> advertised URL (from their leases).
        self.gateways: dict[str, str] = {}
        #: Local sessions: agent id -> (lease, the registry entry it belongs to).
        self._leases: dict[str, tuple[Lease, ConnectedAgent]] = {}
        #: agent id -> gateway id -> the RemoteAgent forwarding there (made on first use).
        self._remote: dict[str, dict[str, tuple[RemoteAgent, ForwardSession]]] = {}
        self._fetched: dict[str, float] = {}
        #: agent id -> (the session it was asked at, the agent's hello there).
        self.hellos: dict[str, tuple[Location, dict[str, Any]]] = {}

    # -- local sessions (called by the gateway's Registry)

    def on_register(self, entry: ConnectedAgent) -> None:
        lease = Lease(entry.agent_id, entry.team_id, instance=entry.instance, connection=entry.connection or 0)
        lease.claiming = True  # from now: a renewal round running before the claim starts must not claim it
        self._leases[entry.agent_id] = (lease, entry)
        self._fleet.spawn(self._claim(lease, entry))

    def on_unregister(self, entry: ConnectedAgent) -> None:
        held = self._leases.get(entry.agent_id)
        if held is None or held[1] is not entry:
            return
        del self._leases[entry.agent_id]
        lease = held[0]
        mine = self.locations.get(entry.agent_id, {}).get(self.gateway_id)
        if mine is not None and mine.epoch == lease.epoch:
            self._forget(entry.agent_id, self.gateway_id)
        if lease.epoch is not None:
            self._fleet.spawn(self._release(lease))

    async def _claim(self, lease: Lease, entry: ConnectedAgent) -> None:
        fleet = self._fleet
        lease.claiming = True
        try:
            epoch, floor = await fleet.leases.claim(lease.agent_id, lease.team_id, lease.instance, lease.connection)
        except Exception as exc:
            fleet.redis_failed("claim the lease of agent " + lease.agent_id, exc)
            return  # claimed by the renewal loop once Redis answers
        finally:
            lease.claiming = False
        fleet.redis_ok()
        fleet.metrics.claims += 1
        held = self._leases.get(lease.agent_id)
        lease.epoch = epoch
        if held is None or held[0] is not lease:  # the session ended meanwhile
            await self._release(lease)
            return
        self._learn(lease.agent_id, Location(self.gateway_id, epoch, lease.team_id, lease.connection), floor)

    async def _release(self, lease: Lease) -> None:
        try:
            await self._fleet.leases.release(lease)
        except Exception as exc:  # the lease expires by itself
            self._fleet.redis_failed("release the lease of agent " + lease.agent_id, exc)

    async def renew(self) -> None:
        """One renewal round: claims pending, renews the rest; ends lost sessions.
        Raises on a Redis failure (the caller records it)."""
        fleet = self._fleet
        pending = [(lease, entry) for lease, entry in self._leases.values()
                   if lease.epoch is None and not lease.claiming]
        for lease, entry in pending:
            if lease.epoch is None and not lease.claiming:  # (not claimed meanwhile)
                await self._claim(lease, entry)
        held = [(lease, entry) for lease, entry in self._leases.values() if lease.epoch is not None]
        results = await fleet.leases.renew([lease for lease, _ in held])
        for (lease, entry), kept in zip(held, results, strict=True):
            fleet.metrics.renewals["ok" if kept else "lost"] += 1
            if not kept:
                self._lost(lease, entry)

    def _lost(self, lease: Lease, entry: ConnectedAgent) -> None:
        held = self._leases.get(lease.agent_id)
        if held is None or held[1] is not entry:
            return
        log.warning("agent %s (%s): it connected again elsewhere (this session's epoch %s is stale); "
                    "ending this session", entry.name, entry.agent_id, lease.epoch)
        self._fleet.gateway.registry.expel(entry, ErrorCode.GOING_AWAY, MOVED_MESSAGE)

    def local_leases(self) -> int:
        return len(self._leases)

    # -- locations

    def _changed(self, agent_id: str) -> None:
        self._remote.pop(agent_id, None)
        if agent_id in self.hellos and self._hello(agent_id) is None:
            del self.hellos[agent_id]  # read from a session the agent no longer has: ask another
            others = [loc for loc in self.locations.get(agent_id, {}).values() if loc.gateway_id != self.gateway_id]
            if others:
                self._fleet.spawn(self._fetch_hello(agent_id, max(others, key=lambda loc: loc.epoch)))
        self._fleet.gateway.registry.version += 1  # cached answers depending on it go

    def _forget(self, agent_id: str, gateway_id: str) -> None:
        holders = self.locations.get(agent_id)
        if holders is None or holders.pop(gateway_id, None) is None:
            return
        if not holders:
            del self.locations[agent_id]
        self._changed(agent_id)

    def _learn(self, agent_id: str, location: Optional[Location], floor: int) -> bool:
        """Record the agent's ``floor`` and ``location`` (unless it is stale: below the
        floor, or older than what is known for its gateway or for its connection); the
        sessions it supersedes (below the floor, or older of the same connection) go.
        True if anything changed."""
        floor = max(floor, self.floors.get(agent_id, 0))
        self.floors[agent_id] = floor
        holders = self.locations.setdefault(agent_id, {})
        if location is not None and (location.epoch < floor or any(
                loc.connection == location.connection and loc.epoch > location.epoch for loc in holders.values())):
            location = None  # already superseded
        changed = False
        for gateway_id in [g for g, loc in holders.items() if loc.epoch < floor or (
                location is not None and loc.connection == location.connection and loc.epoch < location.epoch)]:
            del holders[gateway_id]
            changed = True
        if location is not None:
            current = holders.get(location.gateway_id)
            if current is None or current.epoch < location.epoch:
                holders[location.gateway_id] = location
                changed = True
        if not holders:
            del self.locations[agent_id]
        if changed:
            self._changed(agent_id)
        held = self._leases.get(agent_id)
        if held is not None and held[0].epoch is not None and (held[0].epoch < floor or (
                location is not None and location.gateway_id != self.gateway_id
                and location.connection == held[0].connection and location.epoch > held[0].epoch)):
            self._lost(*held)  # superseded: no need to wait for the next renewal
        if location is not None and location.gateway_id != self.gateway_id and changed \
                and self.locations.get(agent_id, {}).get(location.gateway_id) is location:
            self._fleet.peers.ensure(location.gateway_id)
            if self._hello(agent_id) is None:
                self._fleet.spawn(self._fetch_hello(agent_id, location))
        return changed

    def on_event(self, message: dict[str, Any]) -> None:
        """A registry event from Redis (relay.gateway.fleet.leases)."""
        kind = message.get("t")
        if kind == "gw":  # a gateway joined: no need to wait for the next scan
            gateway_id, url = message.get("g"), message.get("u")
            if isinstance(gateway_id, str) and isinstance(url, str) and gateway_id not in self.gateways:
                self.set_gateways({**self.gateways, gateway_id: url})
            return
        if kind == "gw-gone":  # a gateway left cleanly
            gateway_id = message.get("g")
            if isinstance(gateway_id, str) and gateway_id in self.gateways and gateway_id != self.gateway_id:
                self.set_gateways({g: u for g, u in self.gateways.items() if g != gateway_id})
            return
        agent_id, gateway_id, epoch = message.get("a"), message.get("g"), message.get("e")
        if not isinstance(agent_id, str) or not isinstance(gateway_id, str) or not isinstance(epoch, int):
            return
        if kind == "at":
            floor, team, connection = message.get("f"), message.get("team"), message.get("c", 0)
            if isinstance(floor, int) and isinstance(team, str) and isinstance(connection, int):
                self._learn(agent_id, Location(gateway_id, epoch, team, connection), floor)
        elif kind == "gone":
            current = self.locations.get(agent_id, {}).get(gateway_id)
            if current is not None and current.epoch == epoch:
                self._forget(agent_id, gateway_id)

    def replace_all(self, found: dict[str, Holders]) -> None:
        """After a full scan: what Redis holds, plus our own live sessions."""
        own = {agent_id: holders[self.gateway_id] for agent_id, holders in self.locations.items()
               if self.gateway_id in holders and agent_id in self._leases}
        self.locations = {agent_id: dict(holders.sessions) for agent_id, holders in found.items()}
        self.floors = {agent_id: holders.floor for agent_id, holders in found.items()}
        for agent_id, location in own.items():
            if location.epoch >= self.floors.get(agent_id, 0):
                self.locations.setdefault(agent_id, {})[self.gateway_id] = location
        self._remote.clear()
        self.hellos = {agent_id: hello for agent_id, hello in self.hellos.items()
                       if self.locations.get(agent_id, {}).get(hello[0].gateway_id) == hello[0]}
        self._fleet.gateway.registry.version += 1
        for lease, entry in list(self._leases.values()):
            if lease.epoch is not None and lease.epoch < self.floors.get(lease.agent_id, 0):
                self._lost(lease, entry)
        peers = self._fleet.peers
        for gateway_id in {g for holders in self.locations.values() for g in holders}:
            if gateway_id in peers.urls:
                peers.ensure(gateway_id)

    def set_gateways(self, gateways: dict[str, str]) -> None:
        """The live gateways changed (a scan of their leases)."""
        gone = set(self.gateways) - set(gateways)
        self.gateways = gateways
        peers = self._fleet.peers
        peers.urls = {gid: url for gid, url in gateways.items() if gid != self.gateway_id}
        for gateway_id in gone:
            if gateway_id != self.gateway_id:
                log.warning("gateway %s is gone (its lease expired)", gateway_id)
                peers.forget(gateway_id)
        if gone:
            self._remote.clear()
            self._fleet.gateway.registry.version += 1
        for gateway_id in {g for holders in self.locations.values() for g in holders}:
            if gateway_id in peers.urls:
                peers.ensure(gateway_id)

    def holders_of(self, team_id: str, agent_id: str) -> list[str]:
        """The ids of the live gateways holding a session of the team's agent, this one
        included if it does (what the agent APIs show as ``gateways``), sorted."""
        found = {loc.gateway_id for loc in self.locations.get(agent_id, {}).values()
                 if loc.team_id == team_id and loc.gateway_id != self.gateway_id and loc.gateway_id in self.gateways}
        if self._fleet.gateway.registry.local(team_id, agent_id) is not None:
            found.add(self.gateway_id)
        return sorted(found)

    def remote(self, team_id: str, agent_id: str) -> Optional[RemoteAgent]:
        """The team's agent if another live gateway holds it (a dict read; see the
        module docstring), else None. With several holders, the least busy whose peer
        session is up."""
        metrics = self._fleet.metrics
        holders = self.locations.get(agent_id)
        if not holders:
            metrics.lookups["miss"] += 1
            self._fetch_later(agent_id)
            return None
        candidates = [loc for loc in holders.values()
                      if loc.team_id == team_id and loc.gateway_id != self.gateway_id
                      and loc.gateway_id in self.gateways]
        if not candidates:
            metrics.lookups["miss"] += 1
            return None
        metrics.lookups["remote"] += 1
        location = candidates[0] if len(candidates) == 1 else self._least_busy(candidates)
        return self._remote_agent(agent_id, location)

    def _remote_agent(self, agent_id: str, location: Location) -> RemoteAgent:
        cached = self._remote.get(agent_id, {}).get(location.gateway_id)
        if cached is not None and cached[1].location is location:
            return cached[0]
        session = ForwardSession(self._fleet, agent_id, location)
        name, version = "", ""
        labels: list[str] = []
        hello = self._hello(agent_id)
        if hello is not None:
            session.peer_info = hello
            name, labels, version = agent_identity(hello)
        agent = RemoteAgent(agent_id, location.team_id, name, labels, version,
                            session,  # type: ignore[arg-type]  # quacks like a MuxSession
                            status="remote", gateway_id=location.gateway_id)
        if len(self._remote) > 10_000:
            self._remote.clear()
        self._remote.setdefault(agent_id, {})[location.gateway_id] = (agent, session)
        return agent

    def _live_remote(self, location: Location) -> bool:
        return location.gateway_id != self.gateway_id and location.gateway_id in self.gateways

    def serving_elsewhere(self) -> list[ConnectedAgent]:
        """The agents other live gateways hold whose hello declares services (what the
        service manager adds to the agents held here, Registry.for_services). Agents
        declaring none are left out, so no gateway builds an entry per agent of the
        fleet for it."""
        agents: list[ConnectedAgent] = []
        for agent_id, holders in self.locations.items():
            hello = self._hello(agent_id)
            if hello is None or not hello.get("services"):
                continue
            live = sorted((loc for loc in holders.values() if self._live_remote(loc)), key=lambda loc: loc.epoch)
            if live:
                agents.append(self._remote_agent(agent_id, live[-1]))
        return agents

    def gateways_for(self, team_id: str, labels: list[str]) -> list[str]:
        """Other live gateways holding an agent of the team whose labels cover
        ``labels`` (an agent whose hello is not known yet counts), for task offers."""
        wanted = set(labels)
        found: list[str] = []
        for agent_id, holders in self.locations.items():
            hello = self._hello(agent_id)
            if hello is not None and not wanted <= set(agent_identity(hello)[1]):
                continue
            for location in holders.values():
                if location.team_id == team_id and location.gateway_id not in found and self._live_remote(location):
                    found.append(location.gateway_id)
        return found

    # -- hellos

    def _hello(self, agent_id: str) -> Optional[dict[str, Any]]:
        """The agent's hello, if it was read from a session the agent still has."""
        hello = self.hellos.get(agent_id)
        if hello is None or self.locations.get(agent_id, {}).get(hello[0].gateway_id) != hello[0]:
            return None
        return hello[1]

    async def _fetch_hello(self, agent_id: str, location: Location) -> None:
        delay = 0.2
        for _ in range(HELLO_ATTEMPTS):
            if self.locations.get(agent_id, {}).get(location.gateway_id) is not location or self._fleet.closed:
                return
            if self._hello(agent_id) is not None:
                return  # read meanwhile from another of its sessions
            try:
                reply = await self._fleet.control.request(location.gateway_id, "hello", location.team_id, {},
                                                          agent_id=agent_id)
                try:
                    frame = await reply.next(HELLO_TIMEOUT)
                finally:
                    reply.close()
            except (ConnectionError, TimeoutError, ValueError) as exc:
                log.debug("cannot read the hello of agent %s from gateway %s yet: %s", agent_id,
                          location.gateway_id, exc)
                await asyncio.sleep(delay)
                delay *= 2
                continue
            info = frame.get("info") if isinstance(frame, dict) else None
            if self.locations.get(agent_id, {}).get(location.gateway_id) is location and isinstance(info, dict):
                # Only what is read about a remote agent is kept (kept for every agent of the fleet).
                self.hellos[agent_id] = (location, {k: info[k] for k in HELLO_FIELDS if k in info})
                self._remote.pop(agent_id, None)  # rebuilt with its name and hello
                self._fleet.gateway.registry.version += 1  # the service manager looks again
                self._fleet.gateway.tasks.agent_elsewhere(location.team_id)  # queued tasks: an offer
            return

    @staticmethod
    async def serve_hello(call: "ControlCall") -> None:
        """The ``hello`` control request: the agent's SETTINGS info."""
        assert call.agent is not None  # a request for an agent (checked by the channel)
        info = call.agent.session.peer_info
        call.send({"info": info if isinstance(info, dict) else {}})

    def _least_busy(self, candidates: list[Location]) -> Location:
        """Of several gateways holding the agent, one whose peer session is up and
        carries the fewest streams now (ties: any), so new streams spread over them."""
        peers = self._fleet.peers
        loads = [(load, loc) for loc in candidates if (load := peers.load(loc.gateway_id)) is not None]
        if not loads:
            return random.choice(candidates)
        least = min(load for load, _ in loads)
        return random.choice([loc for load, loc in loads if load == least])

    def _fetch_later(self, agent_id: str) -> None:
        now = time.monotonic()
        if now - self._fetched.get(agent_id, -FETCH_INTERVAL) < FETCH_INTERVAL or not self._fleet.redis_up:
            return
        if len(self._fetched) > 10_000:
            self._fetched.clear()
        self._fetched[agent_id] = now
        self._fleet.spawn(self._fetch(agent_id))

    async def _fetch(self, agent_id: str) -> None:
        self._fleet.metrics.lookup_fetches += 1
        try:
            holders = await self._fleet.leases.locate(agent_id)
        except Exception as exc:
            self._fleet.redis_failed("locate agent " + agent_id, exc)
            return
        if holders is not None:
            for location in holders.sessions.values():
                self._learn(agent_id, location, holders.floor)
