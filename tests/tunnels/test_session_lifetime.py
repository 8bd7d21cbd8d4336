"""relay.gateway.agents.session_lifetime: a tunnel session's TTL and idle timeout, and in
a fleet when the activity seen by one gateway is shared and how an idle session is
judged by what the whole fleet saw (times passed in: no clock, no sockets)."""
from __future__ import annotations

from relay.gateway.agents.session_lifetime import UNKNOWN_RETRY, Lifetime


def lifetime(idle: float = 8.0, expires_at: float | None = None) -> Lifetime:
    return Lifetime("team", "agent", expires_at, idle, active_at=100.0)


def test_ttl_and_idle_as_one_gateway_sees_them():
    life = lifetime(idle=8.0, expires_at=1000.0)
    assert life.why_over(999.0, 107.9, 0, 0) is None
    assert life.why_over(999.0, 108.0, 0, 0) == "idle"
    assert life.why_over(999.0, 108.0, 1, 0) is None  # a connection: active again
    assert life.why_over(999.0, 200.0, 1, 1) is None  # one still open: never idle
    assert life.why_over(1000.0, 200.0, 1, 1) == "ttl"


def test_activity_is_shared_at_most_once_per_quarter_of_the_idle_timeout():
    life = lifetime(idle=8.0)
    assert not life.share_due(100.5)  # nothing seen yet: nothing to tell
    life.why_over(0.0, 101.0, 1, 0)
    assert life.share_due(101.0) and not life.share_due(101.0)  # told once
    life.why_over(0.0, 102.0, 2, 0)
    assert not life.share_due(102.0)  # within a quarter (2 s) of the last time
    assert life.share_due(103.0)  # then the activity kept since is told
    assert not life.share_due(106.0)  # nothing new since
    quiet = lifetime(idle=0.0)  # no idle timeout: nothing to share
    quiet.why_over(0.0, 101.0, 1, 0)
    assert not quiet.share_due(101.0)


def test_idle_here_is_idle_only_when_the_fleet_saw_nothing_either():
    life = lifetime(idle=8.0)
    assert life.why_over(0.0, 108.0, 0, 0) == "idle"
    # Another gateway saw traffic: the shared record lasts 2.5 s more. Not idle, and
    # judged again exactly when the record would have gone.
    assert not life.idle_elsewhere(108.0, 2.5)
    assert life.why_over(0.0, 110.4, 0, 0) is None
    assert life.why_over(0.0, 110.5, 0, 0) == "idle"
    assert life.idle_elsewhere(110.5, 0.0)  # gone: idle for the whole fleet
    # Redis cannot say: kept, asked again a little later.
    assert not life.idle_elsewhere(110.5, None)
    assert life.why_over(0.0, 110.5 + UNKNOWN_RETRY - 0.1, 0, 0) is None
    assert life.why_over(0.0, 110.5 + UNKNOWN_RETRY, 0, 0) == "idle"
