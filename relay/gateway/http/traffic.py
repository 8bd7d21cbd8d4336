"""What went through the gateway's HTTP proxies: access log, per-destination metrics and
the recent requests the dashboard shows.

Every proxied destination (an HTTP tunnel session, a container service) has a
:class:`~relay.gateway.http.proxy.ProxyStats` whose ``observer`` is made here
(:meth:`Traffic.observer`); the proxy engine calls it once per finished exchange. Each call

* writes one access log line on the ``relay.access`` logger: destination, method, path
  (the path at the target, query string dropped: a query may carry a secret, and the
  tunnel's token is in the gateway-side prefix, which is never logged), status, bytes
  each way, duration; the fields ride on the record as ``record.access`` for the JSON
  formatter (relay.logs);
* counts the request in the destination's series: requests by status class, bytes each
  way, and a latency histogram (:data:`BUCKETS`), exposed on ``/metrics``;
* remembers it in the team's last :data:`RECENT` requests (for the dashboard).

Series of a destination are dropped when it goes away (:meth:`Traffic.forget`), so the
label sets stay as many as the open tunnels and the services. Refusals and counters of
other features (share refusals by reason, invoke outcomes, tasks) are kept in
:attr:`Traffic.counters`.

The observer runs once per proxied request, so this module is compiled from its own
source (traffic.pxd: Destination and Traffic are extension types with typed fields and
:meth:`Traffic.record` reads them as C fields); the ``.py`` is its pure-Python twin.
"""
from __future__ import annotations

import functools
import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # mypy checks the pure-Python twin: cython's no-op declarations
    from relay.mux import _cython_shim as cython
else:
    try:
        import cython
    except ImportError:  # the pure-Python gateway runs without Cython installed
        from relay.mux import _cython_shim as cython

__all__ = ["BUCKETS", "RECENT", "Destination", "Traffic", "status_class"]

access_log = logging.getLogger("relay.access")

#: Upper bounds (seconds) of the latency histogram's buckets (+Inf is implied).
BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Requests remembered per team for the dashboard.
RECENT = 100


def status_class(status: int) -> str:
    """``2xx``-style class of a status; ``none`` when the client got no status (cut)."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "none"


# status // 100 -> its class, for the per-request path (no string built per request).
_CLASSES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")
_INFO = logging.INFO


@dataclass
class Destination:
    """The counters of one proxied destination."""

    kind: str  # "tunnel" | "service"
    team_id: str
    name: str  # tunnel session id, or service slug
    requests: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # by status class
    bytes_in: int = 0
    bytes_out: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))  # last: +Inf only
    duration_sum: float = 0.0
    #: False once forgotten (Traffic.forget): its series must not come back.
    live: bool = True

    @property
    def count(self) -> int:
        return sum(self.requests.values())


def _entry(row: tuple[Any, ...]) -> dict[str, Any]:
    """A remembered request as the access log and the dashboard show it."""
    when, kind, name, method, target, status, bytes_in, bytes_out, seconds = row
    return {"time": when, kind: name, "method": method.decode("latin-1"),
            "path": target.split(b"?", 1)[0].decode("latin-1")[:512], "status": status,
            "bytes_in": bytes_in, "bytes_out": bytes_out, "duration_ms": round(seconds * 1000, 3)}


class Traffic:
    """Access log, per-destination series and recent requests of one gateway."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.destinations: dict[tuple[str, str, str], Destination] = {}
        self._recent: dict[str, deque] = {}
        #: Other counters by (metric name, label value): e.g. ("share_refusals", "share_expired").
        self.counters: dict[tuple[str, str], int] = defaultdict(int)

    def observer(self, kind: str, team_id: str, name: str) -> Callable[[bytes, bytes, int, int, int, float], None]:
        """The ``ProxyStats.observer`` of one destination."""
        key = (kind, team_id, name)
        dest = self.destinations.get(key)
        if dest is None:
            dest = self.destinations[key] = Destination(kind, team_id, name)

        return functools.partial(self.record, dest)

    @cython.locals(dest=Destination, status=cython.longlong, bucket=cython.longlong, last=cython.longlong)
    def record(self, dest: Destination, method: bytes, target: bytes, status: int, bytes_in: int,
               bytes_out: int, seconds: float) -> None:
        """Count one finished exchange of ``dest`` and log it."""
        if not dest.live:
            return  # forgotten (closed) meanwhile: its series must not come back
        dest.requests[_CLASSES[status // 100] if 100 <= status <= 599 else "none"] += 1
        dest.bytes_in += bytes_in
        dest.bytes_out += bytes_out
        dest.duration_sum += seconds
        # The first bucket whose bound is >= seconds (bisect_left), most often the first:
        # a typed walk costs less than a call.
        bucket = 0
        last = len(BUCKETS)
        while bucket < last and BUCKETS[bucket] < seconds:
            bucket += 1
        dest.buckets[bucket] += 1
        # Every proxied request passes here: keep a tuple, and build the entry only for
        # a log line or when the dashboard asks (recent()).
        recent = self._recent.get(dest.team_id)
        if recent is None:
            recent = self._recent[dest.team_id] = deque(maxlen=RECENT)
        row = (self._clock(), dest.kind, dest.name, method, target, status, bytes_in, bytes_out, seconds)
        recent.append(row)
        if access_log.isEnabledFor(_INFO):
            entry = _entry(row)
            access_log.info("%s %s %s %s %d %d>%d bytes %.1fms", dest.kind, dest.name, entry["method"],
                            entry["path"], status, bytes_in, bytes_out, seconds * 1000, extra={"access": entry})

    def recent(self, team_id: str) -> list[dict[str, Any]]:
        """The team's last requests, newest first."""
        return [_entry(row) for row in reversed(self._recent.get(team_id, ()))]

    def forget(self, kind: str, name: str, team_id: Optional[str] = None) -> None:
        """The destination is gone (a closed tunnel session, a removed service): drop its
        series (of any team when ``team_id`` is None)."""
        for key in [k for k in self.destinations if k[0] == kind and k[2] == name
                    and (team_id is None or k[1] == team_id)]:
            self.destinations.pop(key).live = False

    def count(self, metric: str, label: str, n: int = 1) -> None:
        """Add ``n`` to one of :attr:`counters`."""
        self.counters[(metric, label)] += n
