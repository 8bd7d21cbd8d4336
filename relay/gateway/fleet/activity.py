"""Tunnel sessions' idle timeouts across the fleet: traffic through any gateway counts.

A seed 000 session's connections and requests may pass through every gateway of the
fleet, and each gateway sees only its own share. Every gateway watches every open
session's lifetime (relay.gateway.agents.tunnel_sessions, ``sweep``); this module is
what they share through Redis:

* ``relay:active:{session id}``: written (``SET ... PX``) by a gateway that saw traffic
  through the session, at most once per quarter of its idle timeout
  (relay.gateway.agents.session_lifetime, ``Lifetime.share_due``), to expire one idle
  timeout plus :data:`MARGIN` after it was written. All sessions a sweep found active
  go in one pipeline: no round trip per connection or request, none at all for a
  session nobody uses.
* A gateway that finds a session idle by its own traffic asks for the key's remaining
  time (``PTTL``, one pipeline per sweep): gone, the session is idle for the whole
  fleet and that gateway closes it (for every gateway: the store, then the
  ``tunnel_sessions`` event); else it looks again once the key would have expired.

Without Redis nothing is shared, and no session idles out until it is back (closing a
session that another gateway carries traffic for would be worse than keeping an idle
one a while longer). TTLs do not depend on any of this.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from relay.gateway.fleet.leases import PREFIX

if TYPE_CHECKING:
    from relay.gateway.fleet import Fleet

__all__ = ["MARGIN", "SessionActivity"]

#: Added to a session's idle timeout in the lifetime of its key: two sweeps, so that
#: activity told a sweep late never lets the key lapse while the session is in use.
MARGIN = 2.0


def _key(session_id: str) -> str:
    return f"{PREFIX}active:{session_id}"


class SessionActivity:
    """The fleet's record of tunnel sessions' traffic (module docstring); the
    ``shared_activity`` of the gateway's TunnelManager."""

    def __init__(self, fleet: "Fleet") -> None:
        self._fleet = fleet

    async def touch(self, sessions: list[tuple[str, float]]) -> None:
        """Record traffic seen here through ``(session id, idle timeout)`` sessions."""
        fleet = self._fleet
        try:
            async with fleet.client.pipeline(transaction=False) as pipe:
                for session_id, idle_timeout in sessions:
                    pipe.set(_key(session_id), fleet.gateway_id, px=int((idle_timeout + MARGIN) * 1000))
                await pipe.execute()
        except Exception as exc:
            fleet.redis_failed("share the activity of tunnel sessions", exc)

    async def remaining(self, session_ids: list[str]) -> dict[str, Optional[float]]:
        """Seconds until each session is idle fleet-wide (0: it is); {} if Redis cannot
        say."""
        fleet = self._fleet
        try:
            async with fleet.client.pipeline(transaction=False) as pipe:
                for session_id in session_ids:
                    pipe.pttl(_key(session_id))
                answers = await pipe.execute()
        except Exception as exc:
            fleet.redis_failed("read the activity of tunnel sessions", exc)
            return {}
        # PTTL: -2 no key (idle everywhere), -1 no expiry (never written so by us).
        return {sid: max(int(ms), 0) / 1000 if int(ms) != -1 else None
                for sid, ms in zip(session_ids, answers, strict=True)}
