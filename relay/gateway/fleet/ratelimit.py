"""Share rate limits counted across the fleet (a share limited to 60 requests a minute
allows 60 through all gateways together, not 60 each).

The share proxy asks synchronously, once per request, and must not wait for Redis on
that path. So each gateway decides from the fleet-wide count it last heard plus what
it counted itself since, and adds its own counts to the shared counter (``INCRBY`` of
``relay:rate:{share}:{window start}``) in the background, one round trip in flight per
share at a time; the answer brings the others' counts. A new client connection to a
limited share first reads the fleet-wide count (one GET, awaited by the share proxy's
route), so a gateway that never saw the share does not admit requests the others used
up. The fleet may overshoot by what
the gateways admit within one round trip of each other, never by a whole limit per
gateway. Without Redis, each gateway counts alone (as a single gateway does).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from relay.gateway.api.shares import WINDOW, RateLimiter

if TYPE_CHECKING:
    from relay.gateway.fleet import Fleet

__all__ = ["FleetRateLimiter"]


class FleetRateLimiter(RateLimiter):
    """:class:`RateLimiter` with the count shared through Redis (module docstring)."""

    def __init__(self, fleet: "Fleet", window: float = WINDOW, max_keys: int = 10_000) -> None:
        super().__init__(window, max_keys)
        self._fleet = fleet
        # key -> [window start, fleet count last heard, counted here not yet sent, in flight]
        self._counts: dict[str, list[float]] = {}

    def hit(self, key: str, limit: int, now: float) -> Optional[float]:
        start = now - (now % self.window)
        state = self._counts.get(key)
        if state is None or state[0] != start:
            if len(self._counts) >= self.max_keys:
                self._counts.clear()
            state = self._counts[key] = [start, 0, 0, 0]
        if state[1] + state[2] + state[3] >= limit:
            return start + self.window - now
        state[2] += 1
        if not state[3]:
            self._fleet.spawn(self._send(key, state))
        return None

    async def prime(self, key: str, now: float) -> None:
        """Learn the fleet-wide count of ``key``'s current window (one GET; the share
        proxy awaits it once per new client connection, so a gateway that never saw
        the share does not admit a request the others used up)."""
        start = now - (now % self.window)
        try:
            total = await self._fleet.leases.current(f"{key}:{int(start)}")
        except Exception as exc:
            self._fleet.redis_failed("read a share's request count", exc)
            return
        state = self._counts.get(key)
        if state is None or state[0] != start:
            if len(self._counts) >= self.max_keys:
                self._counts.clear()
            state = self._counts[key] = [start, 0, 0, 0]
        state[1] = max(state[1], total)

    async def _send(self, key: str, state: list[float]) -> None:
        while state[2] and self._counts.get(key) is state:
            n = int(state[2])
            state[2] = 0
            state[3] += n
            try:
                total = await self._fleet.leases.count(f"{key}:{int(state[0])}", n, self.window)
            except Exception as exc:
                self._fleet.redis_failed("count a share request", exc)
                state[3] -= n
                state[1] += n  # counted here alone while Redis is away
                return
            state[3] -= n
            state[1] = max(state[1], total)

    def forget(self, key: str) -> None:
        super().forget(key)
        self._counts.pop(key, None)
