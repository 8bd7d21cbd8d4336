"""The fleet's live state in Redis: gateway leases, agent leases with epochs, events.

Keys (``PREFIX`` ``relay:``):

* ``relay:gw:{gateway id}``: JSON ``{"id", "url"}``, with a TTL (the gateway lease),
  rewritten every third of it. A gateway whose key is gone is dead for the others.
* ``relay:epoch:{agent id}``: the agent's epoch counter (INCR on every new session, no
  TTL). Its value is the epoch of the newest session anywhere in the fleet.
* ``relay:agent:{agent id}``: ``"{gateway id}|{epoch}|{team id}"`` with a TTL (the agent
  lease): where the newest session of the agent is held.

The three scripts make the epoch the only authority: ``CLAIM`` (a new session) takes
the next epoch and always wins; ``RENEW`` rewrites a lease only while its epoch is
still the counter's value, so a gateway that was frozen or cut off, and whose agent
reconnected elsewhere meanwhile, learns that it lost (and never overwrites the newer
lease); ``RELEASE`` deletes a lease only with the epoch that wrote it. If Redis lost its
data (a restart without persistence), ``RENEW`` restores a missing counter from the
epoch the holder knows, so the registry is rebuilt from the live sessions.

Every change is published on ``relay:events`` (JSON) in the same script, so other
gateways keep their caches without polling: ``{"t": "at", "a": agent, "g": gateway,
"e": epoch, "team": team}``, ``{"t": "gone", "a": agent, "e": epoch}``; the gateways'
own invalidations go there too (relay.gateway.fleet.events).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["CHANNEL", "Lease", "LeaseStore", "Location", "PREFIX"]

PREFIX = "relay:"
CHANNEL = PREFIX + "events"

_CLAIM = """
local e = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2], ARGV[1] .. '|' .. e .. '|' .. ARGV[2], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], cjson.encode({t='at', a=ARGV[5], g=ARGV[1], e=e, team=ARGV[2]}))
return e
"""

_RENEW = """
local e = tonumber(ARGV[2])
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[2])
elseif tonumber(cur) ~= e then
  return 0
end
local v = ARGV[1] .. '|' .. ARGV[2] .. '|' .. ARGV[3]
local old = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[2], v, 'PX', ARGV[4])
if old ~= v then
  redis.call('PUBLISH', ARGV[5], cjson.encode({t='at', a=ARGV[6], g=ARGV[1], e=e, team=ARGV[3]}))
end
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[2], cjson.encode({t='gone', a=ARGV[3], e=tonumber(ARGV[1])}))
return 1
"""


@dataclass(frozen=True)
class Location:
    """Where an agent's newest session is held."""

    gateway_id: str
    epoch: int
    team_id: str


@dataclass
class Lease:
    """One local agent session's lease (``epoch`` None: not claimed yet, e.g. Redis was
    unreachable when the agent connected)."""

    agent_id: str
    team_id: str
    epoch: Optional[int] = None


def parse_location(value: Any) -> Optional[Location]:
    """A ``relay:agent:*`` value, or None if malformed."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    parts = value.split("|")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return Location(parts[0], int(parts[1]), parts[2])


class LeaseStore:
    """The Redis side of the registry: every Redis call of the fleet's registry goes
    through here (``client`` is a ``redis.asyncio.Redis``)."""

    def __init__(self, client: Any, gateway_id: str, *, agent_ttl: float, gateway_ttl: float) -> None:
        self.client = client
        self.gateway_id = gateway_id
        self.agent_ttl_ms = int(agent_ttl * 1000)
        self.gateway_ttl_ms = int(gateway_ttl * 1000)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @staticmethod
    def _keys(agent_id: str) -> list[str]:
        return [f"{PREFIX}epoch:{agent_id}", f"{PREFIX}agent:{agent_id}"]

    async def register_gateway(self, url: str) -> None:
        """Write (or refresh) this gateway's own lease."""
        await self.client.set(f"{PREFIX}gw:{self.gateway_id}", json.dumps({"id": self.gateway_id, "url": url}),
                              px=self.gateway_ttl_ms)

    async def drop_gateway(self) -> None:
        await self.client.delete(f"{PREFIX}gw:{self.gateway_id}")

    async def gateways(self) -> dict[str, str]:
        """Live gateways: id -> advertised URL."""
        keys = [key async for key in self.client.scan_iter(match=f"{PREFIX}gw:*", count=500)]
        if not keys:
            return {}
        found: dict[str, str] = {}
        for raw in await self.client.mget(keys):
            try:
                entry = json.loads(raw)
                found[str(entry["id"])] = str(entry["url"])
            except (TypeError, ValueError, KeyError):
                continue
        return found

    async def claim(self, agent_id: str, team_id: str) -> int:
        """A new session of ``agent_id`` here: its epoch (always the newest)."""
        return int(await self._claim(keys=self._keys(agent_id),
                                     args=[self.gateway_id, team_id, self.agent_ttl_ms, CHANNEL, agent_id]))

    async def renew(self, leases: list[Lease]) -> list[bool]:
        """Refresh claimed leases in one round trip; False for each one that was lost
        (a newer session of that agent exists elsewhere)."""
        if not leases:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for lease in leases:
                await self._renew(keys=self._keys(lease.agent_id),
                                  args=[self.gateway_id, lease.epoch, lease.team_id, self.agent_ttl_ms,
                                        CHANNEL, lease.agent_id], client=pipe)
            results = await pipe.execute()
        return [bool(int(r)) for r in results]

    async def release(self, lease: Lease) -> bool:
        """The session ended: drop the lease if it is still ours."""
        if lease.epoch is None:
            return False
        return bool(int(await self._release(keys=self._keys(lease.agent_id),
                                            args=[lease.epoch, CHANNEL, lease.agent_id])))

    async def locate(self, agent_id: str) -> Optional[Location]:
        return parse_location(await self.client.get(f"{PREFIX}agent:{agent_id}"))

    async def locations(self) -> dict[str, Location]:
        """Every agent lease (at start and after a lost subscription)."""
        found: dict[str, Location] = {}
        batch: list[str] = []

        async def flush() -> None:
            for key, raw in zip(batch, await self.client.mget(batch), strict=True):
                location = parse_location(raw)
                if location is not None:
                    found[key[len(PREFIX) + len("agent:"):]] = location
            batch.clear()

        async for key in self.client.scan_iter(match=f"{PREFIX}agent:*", count=1000):
            batch.append(key.decode() if isinstance(key, bytes) else key)
            if len(batch) >= 1000:
                await flush()
        if batch:
            await flush()
        return found

    async def publish(self, message: dict[str, Any]) -> None:
        await self.client.publish(CHANNEL, json.dumps(message))

    async def current(self, key: str) -> int:
        """The fleet-wide counter ``key`` (0 if absent)."""
        value = await self.client.get(f"{PREFIX}rate:{key}")
        return int(value) if value is not None else 0

    async def count(self, key: str, n: int, window: float) -> int:
        """Add ``n`` to the fleet-wide counter ``key`` (expiring after two windows);
        returns its new value."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.incrby(f"{PREFIX}rate:{key}", n)
            pipe.pexpire(f"{PREFIX}rate:{key}", int(window * 2000))
            total, _ = await pipe.execute()
        return int(total)
