"""The fleet's counters, exported by the gateway's /metrics (relay.gateway.app).

Plain integers bumped on the paths they count (no label lookups there); the gateway's
collector turns them into Prometheus series at scrape time.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterator

__all__ = ["FleetMetrics"]


class FleetMetrics:
    """Counts of one gateway's fleet activity."""

    def __init__(self) -> None:
        #: Streams this gateway sent to the gateway holding the agent.
        self.forwarded_out = 0
        #: Streams other gateways forwarded here, by outcome (joined, refused, forged).
        self.forwarded_in: Counter[str] = Counter()
        #: Payload bytes of forwarded streams joined here, towards and from the agents.
        self.bytes_to_agents = 0
        self.bytes_from_agents = 0
        #: Registry lookups of agents not held here, by result (remote, miss).
        self.lookups: Counter[str] = Counter()
        #: Redis round trips made to locate an agent after a cache miss.
        self.lookup_fetches = 0
        #: Lease renewals by result (ok, lost), and claims of new sessions.
        self.renewals: Counter[str] = Counter()
        self.claims = 0
        #: Failed Redis operations, and whether Redis answered the last one.
        self.redis_failures = 0
        self.redis_up = False
        #: Peer sessions dialled that failed, and invalidations received.
        self.peer_failures = 0
        self.invalidations: Counter[str] = Counter()
        #: Control requests (relay.gateway.fleet.control) sent to other gateways and
        #: served here, by kind (hello, alive, bind, task).
        self.controls_out: Counter[str] = Counter()
        self.controls_in: Counter[str] = Counter()

    # the bridge's byte counter interface (relay.gateway.fleet.bridge)
    def add_in(self, n: int) -> None:
        self.bytes_to_agents += n

    def add_out(self, n: int) -> None:
        self.bytes_from_agents += n

    def families(self, peers_connected: int, locations: int) -> Iterator[Any]:
        """Prometheus metric families (prometheus_client imported lazily, as the gateway does)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily("relay_fleet_redis_up", "1 if Redis answered the last fleet operation",
                                value=1 if self.redis_up else 0)
        yield GaugeMetricFamily("relay_fleet_peers_connected", "Peer sessions to other gateways open now",
                                value=peers_connected)
        yield GaugeMetricFamily("relay_fleet_agent_locations", "Agent locations cached", value=locations)
        yield CounterMetricFamily("relay_fleet_forwarded_streams_out",
                                  "Streams forwarded to the gateway holding the agent", value=self.forwarded_out)
        inbound = CounterMetricFamily("relay_fleet_forwarded_streams_in",
                                      "Streams forwarded here by other gateways", labels=["result"])
        for result, count in sorted(self.forwarded_in.items()):
            inbound.add_metric([result], count)
        yield inbound
        forwarded = CounterMetricFamily("relay_fleet_forwarded_bytes",
                                        "Payload bytes of forwarded streams joined here", labels=["direction"])
        forwarded.add_metric(["to_agent"], self.bytes_to_agents)
        forwarded.add_metric(["from_agent"], self.bytes_from_agents)
        yield forwarded
        lookups = CounterMetricFamily("relay_fleet_registry_lookups",
                                      "Lookups of agents not held here", labels=["result"])
        for result, count in sorted(self.lookups.items()):
            lookups.add_metric([result], count)
        yield lookups
        yield CounterMetricFamily("relay_fleet_registry_fetches",
                                  "Redis round trips to locate an agent after a cache miss",
                                  value=self.lookup_fetches)
        renewals = CounterMetricFamily("relay_fleet_lease_renewals", "Agent lease renewals", labels=["result"])
        for result, count in sorted(self.renewals.items()):
            renewals.add_metric([result], count)
        yield renewals
        yield CounterMetricFamily("relay_fleet_lease_claims", "Agent sessions claimed", value=self.claims)
        yield CounterMetricFamily("relay_fleet_redis_failures", "Failed Redis operations",
                                  value=self.redis_failures)
        yield CounterMetricFamily("relay_fleet_peer_failures", "Peer sessions that could not be opened",
                                  value=self.peer_failures)
        invalidations = CounterMetricFamily("relay_fleet_invalidations_received",
                                            "Invalidations received from other gateways", labels=["kind"])
        for kind, count in sorted(self.invalidations.items()):
            invalidations.add_metric([kind], count)
        yield invalidations
        for name, direction, counts in (("relay_fleet_control_requests_out", "sent to other gateways",
                                         self.controls_out),
                                        ("relay_fleet_control_requests_in", "served for other gateways",
                                         self.controls_in)):
            family = CounterMetricFamily(name, f"Control requests {direction}", labels=["kind"])
            for kind, count in sorted(counts.items()):
                family.add_metric([kind], count)
            yield family
