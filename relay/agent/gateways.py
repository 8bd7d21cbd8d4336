"""Which gateways an agent holds sessions to: its dial targets, and which one each of
its connections uses.

``relay agent --gateway URL`` may be repeated, and one URL's host name may resolve to
several addresses (DNS round robin in front of a fleet): every URL, and every address
of such a name, is a dial target. The agent holds up to N sessions at once
(``--connections``; default 2 when there are several targets, else 1), each to a
different target, so losing one gateway loses only the streams it carried. A
connection that drops, or fails to dial, moves to the next target no other connection
of the agent uses (backing off as any reconnect does).

A name with one IPv4 and one IPv6 address (``localhost``) is one server reached two
ways, not two gateways: only the addresses of the family with most of them count.

Two targets may still be one gateway (two names for it, or a load balancer): that
gateway refuses the second connection of the same agent process with a GOAWAY
``REFUSED`` (relay.gateway.agents.registry), and the connection tries another target.
Names are resolved again before every reconnect, so a fleet whose DNS record changes
is followed without a restart (:meth:`TargetRing.update`: connections keep targets
still in the answer; one whose address went dials another); a name that cannot be
resolved at that moment keeps its last addresses. How many sessions the agent holds is
decided at start (``--connections`` sets it whatever the name resolves to).
Loop-neutral: the asyncio agent resolves the names and dials.
"""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from relay.agent.policy import GatewayAddress

__all__ = ["DialTarget", "TargetRing", "default_connections", "expand", "is_address"]


@dataclass(frozen=True)
class DialTarget:
    """One place to dial: a gateway URL and the address to reach it at (None: dial
    its host name)."""

    gateway: GatewayAddress
    ip: Optional[str] = None

    @property
    def label(self) -> str:
        """For log lines: the URL, and the address if the name had several."""
        return self.gateway.url + (f" ({self.ip})" if self.ip else "")


def is_address(host: str) -> bool:
    """Is ``host`` an IP address literal (nothing to resolve)?"""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def expand(gateway: GatewayAddress, infos: Sequence[Any]) -> list[DialTarget]:
    """The targets of one URL given what its host name resolved to (``getaddrinfo``
    tuples; empty: not resolved). Several only if the name has several addresses of
    one family (see the module docstring)."""
    by_family: dict[int, list[str]] = {}
    for info in infos:
        family, sockaddr = info[0], info[4]
        addresses = by_family.setdefault(int(family), [])
        if sockaddr[0] not in addresses:
            addresses.append(str(sockaddr[0]))
    if not by_family:
        return [DialTarget(gateway)]
    best = max(by_family.items(), key=lambda item: (len(item[1]), item[0] == socket.AF_INET))[1]
    if len(best) < 2:
        return [DialTarget(gateway)]
    return [DialTarget(gateway, address) for address in best]


def default_connections(targets: Sequence[DialTarget]) -> int:
    """Sessions an agent holds at once unless told: 2 with several targets, else 1."""
    return 2 if len(targets) > 1 else 1


class TargetRing:
    """Which target each connection (by index) dials: its own at first, then after a
    drop or a failed dial the next one that no other connection uses."""

    def __init__(self, targets: Sequence[DialTarget]) -> None:
        if not targets:
            raise ValueError("an agent needs at least one gateway")
        self.targets = list(targets)
        #: connection index -> index of the target it uses (or last used).
        self.used: dict[int, int] = {}

    def first(self, connection: int) -> DialTarget:
        """The target connection ``connection`` dials first."""
        index = connection % len(self.targets)
        taken = {i for c, i in self.used.items() if c != connection}
        for step in range(len(self.targets)):
            candidate = (index + step) % len(self.targets)
            if candidate not in taken:
                index = candidate
                break
        self.used[connection] = index
        return self.targets[index]

    def update(self, targets: Sequence[DialTarget]) -> None:
        """New targets (the names resolved again): a connection whose target is still
        there keeps it; one whose target went moves on at its :meth:`next`. An empty
        list changes nothing (an agent always has somewhere to dial)."""
        if not targets:
            return
        current = {c: self.targets[i] for c, i in self.used.items() if i < len(self.targets)}
        self.targets = list(targets)
        self.used = {c: self.targets.index(t) for c, t in current.items() if t in self.targets}

    def next(self, connection: int) -> DialTarget:
        """The target after the one ``connection`` used, skipping those other
        connections use (its own again if every other one is taken)."""
        current = self.used.get(connection, connection % len(self.targets))
        taken = {i for c, i in self.used.items() if c != connection}
        for step in range(1, len(self.targets) + 1):
            candidate = (current + step) % len(self.targets)
            if candidate not in taken:
                self.used[connection] = candidate
                return self.targets[candidate]
        return self.targets[current]
