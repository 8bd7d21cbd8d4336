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

In a fleet (docs/FLEET.md) a session's connections and requests may pass through any
gateway, and none of them sees all of its traffic. Every gateway watches every open
session's lifetime; each tells the others of the traffic it sees (at most every quarter
of the idle timeout, :meth:`Lifetime.share_due`: a key per session in Redis that
expires one idle timeout after the last traffic, relay.gateway.fleet.activity), and a
session idle on one gateway closes only once it is idle by what the whole fleet saw
(:meth:`Lifetime.idle_elsewhere`). Whichever gateway finds it over closes it, for every
gateway. While Redis is unreachable no session idles out (TTLs still apply).

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
#: In a fleet, when the shared activity cannot be read (Redis unreachable): how long
#: until it is asked again (the session stays open meanwhile).
UNKNOWN_RETRY = 5.0


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
    #: In a fleet: activity seen here that the others were not told of yet, and when
    #: they were last told (monotonic; None: never).
    unshared: bool = False
    shared_at: Optional[float] = None

    def why_over(self, now: float, monotonic: float, count: int, live: int) -> Optional[str]:
        """Why the session must close now (``"ttl"`` or ``"idle"``), or None.
        ``count``: connections/requests so far; ``live``: open now."""
        if self.expires_at is not None and now >= self.expires_at:
            return "ttl"
        if live or count != self.count:
            self.count = count
            self.active_at = monotonic
            self.unshared = True
            return None
        if self.idle_timeout and monotonic - self.active_at >= self.idle_timeout:
            return "idle"
        return None

    def share_due(self, monotonic: float) -> bool:
        """In a fleet: should the activity seen here be told to the others now? Once
        per quarter of the idle timeout at most, so a busy session costs little; told
        that late, the others' idea of its last activity is never earlier than the
        truth minus a quarter, and the shared record lasts an idle timeout plus a
        margin after it is told (relay.gateway.fleet.activity), so no session closes
        early. Marks it told."""
        if not self.unshared or not self.idle_timeout:
            return False
        if self.shared_at is not None and monotonic - self.shared_at < self.idle_timeout / 4:
            return False
        self.unshared, self.shared_at = False, monotonic
        return True

    def idle_elsewhere(self, monotonic: float, remaining: Optional[float]) -> bool:
        """Idle here: is it idle for the whole fleet too? ``remaining``: seconds until
        it is, by the fleet's shared record (None: unknown). If not, the idle clock here
        is moved to when it would be, so the next look at the shared record waits until
        then."""
        if remaining is not None and remaining <= 0:
            return True
        wait = remaining if remaining is not None else min(self.idle_timeout, UNKNOWN_RETRY)
        self.active_at = monotonic - self.idle_timeout + wait
        return False

    def metadata(self) -> dict[str, Any]:
        """What the session row keeps of it."""
        return {"expires_at": self.expires_at, "idle_timeout": self.idle_timeout}
