"""The fleet's live state in Redis: gateway leases, agent leases with epochs, events.

Keys (``PREFIX`` ``relay:``):

* ``relay:gw:{gateway id}``: JSON ``{"id", "url"}``, with a TTL (the gateway lease),
  rewritten every third of it. A gateway whose key is gone is dead for the others.
* ``relay:epoch:{agent id}``: the agent's epoch counter (INCR on every new session, no
  TTL): every session of the agent, on any gateway, has an epoch of its own.
* ``relay:fence:{agent id}``: a hash: ``floor`` and ``inst``, the agent process (its
  hello's ``instance`` id) whose sessions count and the lowest epoch still valid, and
  ``c{n}``: the epoch of the newest session of the process's connection ``n``. A
  session of another instance (a restarted agent, or one without an instance id)
  raises the floor to its own epoch: every older session, on every gateway, is stale
  from then on. A session of the same instance makes only the older sessions of its
  own connection stale (a reconnect, here or through another gateway).
* ``relay:agent:{agent id}``: a hash, one field per gateway holding a session of the
  agent (an agent may hold sessions to several gateways at once: ``relay agent
  --connections``): ``gateway id -> "{epoch}|{team id}|{instance}|{connection}|{deadline
  ms}"``. The deadline (Redis server time) is the lease's end; the hash itself expires
  when no field is renewed.

The scripts make the epochs the only authority: ``CLAIM`` (a new session) takes the
next epoch, raises the floor or the connection's newest epoch, drops the fields that
became stale (or are past their deadline), and always wins; ``RENEW`` rewrites only its
own gateway's field, and only while its epoch is neither below the floor nor older
than its connection's newest, so a gateway that was frozen or cut off, and whose agent
connected again elsewhere meanwhile, learns that it lost (and never overwrites
anything: it cannot take over or resurrect a session); ``RELEASE`` deletes a field only
with the epoch that wrote it. ``CLAIM`` and ``RENEW`` also drop the fields of sessions
past their deadline (a gateway killed without releasing), so the hash lists only live
sessions within one lease time. If Redis lost its data (a restart without
persistence), ``RENEW`` restores a missing counter (never below the epoch the holder
knows) and fence, so the registry is rebuilt from the live sessions.

Every change is published on ``relay:events`` (JSON) in the same script, so other
gateways keep their caches without polling: ``{"t": "at", "a": agent, "g": gateway,
"e": epoch, "f": floor, "c": connection, "team": team}``, ``{"t": "gone", "a": agent,
"g": gateway, "e": epoch}``; the gateways' own invalidations go there too.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["CHANNEL", "Holders", "Lease", "LeaseStore", "Location", "PREFIX", "parse_holders", "parse_processes",
           "safe_instance"]

PREFIX = "relay:"
CHANNEL = PREFIX + "events"

# Shared by the scripts: the server's time in ms, a field's epoch, connection and
# deadline, and the drop of every other field that is stale.
_LIB = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function field(v)
  local e, c, dl = string.match(v, '^(%d+)|[^|]*|[^|]*|(%d+)|(%d+)$')
  return tonumber(e or 0), tonumber(c or -1), tonumber(dl or 0)
end
local function prune(key, own, floor, conn, e, now)
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    local fe, fc, dl = field(all[i + 1])
    if all[i] ~= own and (fe < floor or dl < now or (fc == conn and fe < e)) then
      redis.call('HDEL', key, all[i])
    end
  end
end
"""

# KEYS: epoch, fence, agent. ARGV: gateway, team, ttl ms, channel, agent, instance, connection.
_CLAIM = _LIB + """
local e = redis.call('INCR', KEYS[1])
local conn = tonumber(ARGV[7])
local floor = tonumber(redis.call('HGET', KEYS[2], 'floor'))
if not floor or ARGV[6] == '' or ARGV[6] ~= redis.call('HGET', KEYS[2], 'inst') then
  floor = e
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2], 'floor', e, 'inst', ARGV[6])
end
redis.call('HSET', KEYS[2], 'c' .. conn, e)
local now = now_ms()
prune(KEYS[3], ARGV[1], floor, conn, e, now)
redis.call('HSET', KEYS[3], ARGV[1],
  e .. '|' .. ARGV[2] .. '|' .. ARGV[6] .. '|' .. conn .. '|' .. (now + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call('PUBLISH', ARGV[4], cjson.encode({t='at', a=ARGV[5], g=ARGV[1], e=e, f=floor, c=conn, team=ARGV[2]}))
return {e, floor}
"""

# KEYS: epoch, fence, agent. ARGV: gateway, epoch, team, ttl ms, channel, agent, instance, connection.
_RENEW = _LIB + """
local e = tonumber(ARGV[2])
local conn = tonumber(ARGV[8])
local cur = redis.call('GET', KEYS[1])
if not cur or tonumber(cur) < e then
  redis.call('SET', KEYS[1], e)
end
local floor = tonumber(redis.call('HGET', KEYS[2], 'floor'))
if not floor then
  floor = 0
  redis.call('HSET', KEYS[2], 'floor', 0, 'inst', ARGV[7])
end
local newest = tonumber(redis.call('HGET', KEYS[2], 'c' .. conn))
if not newest then
  newest = e
  redis.call('HSET', KEYS[2], 'c' .. conn, e)
end
local old = redis.call('HGET', KEYS[3], ARGV[1])
local old_e = old and field(old) or nil
if e < floor or e < newest or (old_e and old_e > e) then
  if old_e == e then
    redis.call('HDEL', KEYS[3], ARGV[1])
  end
  return 0
end
local now = now_ms()
prune(KEYS[3], ARGV[1], floor, conn, e, now)
redis.call('HSET', KEYS[3], ARGV[1],
  e .. '|' .. ARGV[3] .. '|' .. ARGV[7] .. '|' .. conn .. '|' .. (now + tonumber(ARGV[4])))
if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[4]) then
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
end
if old_e ~= e then
  redis.call('PUBLISH', ARGV[5], cjson.encode({t='at', a=ARGV[6], g=ARGV[1], e=e, f=floor, c=conn, team=ARGV[3]}))
end
return 1
"""

_RELEASE = _LIB + """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v or field(v) ~= tonumber(ARGV[2]) then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[3], cjson.encode({t='gone', a=ARGV[4], g=ARGV[1], e=tonumber(ARGV[2])}))
return 1
"""

_INSTANCE_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def safe_instance(instance: str) -> str:
    """An agent's instance id as it may appear in a lease (no separators)."""
    return _INSTANCE_UNSAFE.sub("", instance)[:64]


@dataclass(frozen=True)
class Location:
    """One session of an agent: the gateway holding it, its epoch, the agent's team, and
    which of the agent's connections it is."""

    gateway_id: str
    epoch: int
    team_id: str
    connection: int = 0


@dataclass
class Holders:
    """Every live session of one agent (gateway id -> location), and the floor below
    which an epoch is stale."""

    sessions: dict[str, Location]
    floor: int = 0


@dataclass
class Lease:
    """One local agent session's lease (``epoch`` None: not claimed yet, e.g. Redis was
    unreachable when the agent connected)."""

    agent_id: str
    team_id: str
    epoch: Optional[int] = None
    #: The agent process's instance id (relay.gateway.agents.registry), made safe.
    instance: str = ""
    #: Which of the agent's connections the session is (0 for an agent that says not).
    connection: int = 0
    #: True while a claim of it is in flight: a renewal round must not claim it again
    #: (two claims of one session: the second's epoch would make the first's stale).
    claiming: bool = False


def _text(value: Any) -> Optional[str]:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _live_fields(fields: Any, floor: int, now_ms: int) -> dict[str, list[str]]:
    """The fields of a ``relay:agent:*`` hash still valid (at or above ``floor``, before
    their deadline, well formed): gateway id -> ``[epoch, team, instance, connection,
    deadline]``."""
    live: dict[str, list[str]] = {}
    for raw_gateway, raw_value in (fields or {}).items():
        gateway, value = _text(raw_gateway), _text(raw_value)
        if gateway is None or value is None:
            continue
        parts = value.split("|")
        if len(parts) != 5 or not (parts[0].isdigit() and parts[3].isdigit() and parts[4].isdigit()):
            continue
        if int(parts[0]) < floor or int(parts[4]) < now_ms:
            continue
        live[gateway] = parts
    return live


def _floor(fence: Any) -> int:
    fence_floor = _text((fence or {}).get(b"floor") or (fence or {}).get("floor"))
    return int(fence_floor) if fence_floor is not None and fence_floor.isdigit() else 0


def parse_holders(fields: Any, fence: Any, now_ms: int) -> Optional[Holders]:
    """A ``relay:agent:*`` hash and its ``relay:fence:*`` hash as :class:`Holders`
    (fields past their deadline, below the floor or malformed are left out); None if
    nothing is left."""
    floor = _floor(fence)
    sessions = {gateway: Location(gateway, int(parts[0]), parts[1], int(parts[3]))
                for gateway, parts in _live_fields(fields, floor, now_ms).items()}
    return Holders(sessions, floor) if sessions else None


def parse_processes(fields: Any, fence: Any, now_ms: int) -> dict[str, tuple[str, str]]:
    """Like :func:`parse_holders`, but which agent process holds each live session:
    gateway id -> ``(instance, team id)`` ("" for an agent that sent no instance id)."""
    return {gateway: (parts[2], parts[1])
            for gateway, parts in _live_fields(fields, _floor(fence), now_ms).items()}


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
        return [f"{PREFIX}epoch:{agent_id}", f"{PREFIX}fence:{agent_id}", f"{PREFIX}agent:{agent_id}"]

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

    async def claim(self, agent_id: str, team_id: str, instance: str = "", connection: int = 0) -> tuple[int, int]:
        """A new session of ``agent_id`` here: ``(its epoch, the agent's floor)``. It
        always wins: with an ``instance`` other than the current one's (or none) it makes
        every older session of the agent stale (the floor is its epoch); else the older
        sessions of the same ``connection`` (a reconnect, here or elsewhere)."""
        epoch, floor = await self._claim(keys=self._keys(agent_id),
                                         args=[self.gateway_id, team_id, self.agent_ttl_ms, CHANNEL, agent_id,
                                               safe_instance(instance), connection])
        return int(epoch), int(floor)

    async def renew(self, leases: list[Lease]) -> list[bool]:
        """Refresh claimed leases in one round trip; False for each one that was lost
        (a newer agent process holds the agent, so this session is stale)."""
        if not leases:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for lease in leases:
                await self._renew(keys=self._keys(lease.agent_id),
                                  args=[self.gateway_id, lease.epoch, lease.team_id, self.agent_ttl_ms,
                                        CHANNEL, lease.agent_id, safe_instance(lease.instance),
                                        lease.connection], client=pipe)
            results = await pipe.execute()
        return [bool(int(r)) for r in results]

    async def release(self, lease: Lease) -> bool:
        """The session ended: drop this gateway's field if it is still this session's."""
        if lease.epoch is None:
            return False
        return bool(int(await self._release(keys=[f"{PREFIX}agent:{lease.agent_id}"],
                                            args=[self.gateway_id, lease.epoch, CHANNEL, lease.agent_id])))


    async def locate(self, agent_id: str) -> Optional[Holders]:
        """Where the agent's live sessions are (one round trip)."""
        return parse_holders(*await self._lease_fields(agent_id))

    async def processes(self, agent_id: str) -> dict[str, tuple[str, str]]:
        """Which process holds each live session of the agent (one round trip):
        gateway id -> ``(instance, team id)`` (:func:`parse_processes`)."""
        return parse_processes(*await self._lease_fields(agent_id))

    async def _lease_fields(self, agent_id: str) -> tuple[dict[Any, Any], dict[Any, Any], int]:
        """The agent's lease hash, its fence hash and Redis's clock in ms, in one round trip."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(f"{PREFIX}agent:{agent_id}")
            pipe.hgetall(f"{PREFIX}fence:{agent_id}")
            pipe.time()
            fields, fence, (seconds, micros) = await pipe.execute()
        return fields, fence, seconds * 1000 + micros // 1000

    async def locations(self) -> dict[str, Holders]:
        """Every agent's live sessions (at start and after a lost subscription)."""
        found: dict[str, Holders] = {}
        batch: list[str] = []
        start = len(PREFIX) + len("agent:")

        async def flush() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.time()
                for key in batch:
                    pipe.hgetall(key)
                    pipe.hgetall(f"{PREFIX}fence:{key[start:]}")
                results = await pipe.execute()
            seconds, micros = results[0]
            now = seconds * 1000 + micros // 1000
            for i, key in enumerate(batch):
                holders = parse_holders(results[1 + 2 * i], results[2 + 2 * i], now)
                if holders is not None:
                    found[key[start:]] = holders
            batch.clear()

        async for key in self.client.scan_iter(match=f"{PREFIX}agent:*", count=1000):
            batch.append(key.decode() if isinstance(key, bytes) else key)
            if len(batch) >= 500:
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
