"""How long a tunnel session (seed 000) lives: an optional TTL and an idle timeout.

A session opened with ``POST /api/v1/agents/{id}/tunnel`` may say ``ttl`` (seconds: it
closes that long after it was opened, whatever happens) and ``idle_timeout`` (seconds:
it closes once nothing has gone through it for that long). Without them the gateway's
defaults apply: ``--session-ttl`` (:data:`DEFAULT_TTL`, 0 = no TTL) and
``--session-idle-timeout`` (:data:`DEFAULT_IDLE_TIMEOUT`, one hour; 0 = never idle out).
``0`` in the request turns either off for that session.

"Something going through it": a connection accepted on its hub port, a connection or a
udp flow still open, an HTTP request or WebSocket through its URL, or one still running,
or a web terminal open on it.
A session with a live connection is never idle, however long the connection is quiet.

Why an idle timeout by default: a session keeps its agent in status ``tunnel`` (no tasks
are dispatched to it), and a caller that forgets to close its session would otherwise
take the agent out of the pool for good.

The deadline (``expires_at``, absolute) and the idle timeout are kept in the session's
row, so they survive a gateway restart: a restarted gateway reopens the sessions that
are still open (hub ports on the same port), closes at once those whose TTL passed
meanwhile, and starts their idle clocks afresh (it cannot know what went through them
while it was down). A task-bound session (relay.gateway.api.tasks, ``expose``) has
neither: it closes with its task.

In a fleet (docs/FLEET.md) only TTLs are enforced: a session's connections and requests
may pass through any gateway of the fleet, none of them sees all of its traffic, and an
idle timeout judged on one gateway's share would close sessions in use elsewhere. A
session opened in a fleet answers ``idle_timeout: 0`` to say so.

Everything here is pure (time passed in); relay.gateway.agents.tunnel_sessions sweeps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["DEFAULT_IDLE_TIMEOUT", "DEFAULT_TTL", "MAX_SECONDS", "Lifetime", "parse_seconds"]

#: Default TTL of a session, seconds (0: none).
DEFAULT_TTL = 0.0
#: Default idle timeout of a session, seconds (0: none).
DEFAULT_IDLE_TIMEOUT = 3600.0
#: Largest ``ttl`` or ``idle_timeout`` accepted (30 days).
MAX_SECONDS = 30 * 24 * 3600


def parse_seconds(body: dict[str, Any], field: str, default: float) -> Optional[str]:
    """Validate ``body[field]`` (absent or null: ``default``); returns an error message
    or None, and leaves the number (float) in ``body[field]``."""
    value = body.get(field)
    if value is None:
        body[field] = float(default)
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= MAX_SECONDS:
        return f"{field} must be a number of seconds from 0 (none) to {MAX_SECONDS}"
    body[field] = float(value)
    return None


@dataclass
class Lifetime:
    """When one session ends: ``expires_at`` (wall clock, None: no TTL) and
    ``idle_timeout`` (seconds, 0: none), with the activity last seen (monotonic clock)."""

    team_id: str
    agent_id: str
    expires_at: Optional[float]
    idle_timeout: float
    #: Monotonic time of the last activity seen (or of the start).
    active_at: float
    #: Activity count last seen (connections + requests so far).
    count: int = 0

    def why_over(self, now: float, monotonic: float, count: int, live: int) -> Optional[str]:
        """Why the session must close now (``"ttl"`` or ``"idle"``), or None.
        ``count``: connections/requests so far; ``live``: open now."""
        if self.expires_at is not None and now >= self.expires_at:
            return "ttl"
        if live or count != self.count:
            self.count = count
            self.active_at = monotonic
            return None
        if self.idle_timeout and monotonic - self.active_at >= self.idle_timeout:
            return "idle"
        return None

    def metadata(self) -> dict[str, Any]:
        """What the session row keeps of it."""
        return {"expires_at": self.expires_at, "idle_timeout": self.idle_timeout}
