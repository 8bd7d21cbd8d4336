"""What both ends of the wire agree on about targets: ``HOST:PORT`` syntax and the
allowlist rule.

The agent decides every stream by these rules (relay.agent.policy); the gateway applies
the same ones to an agent's reported allowlist, to refuse a tunnel the agent would
refuse when it is opened rather than on every connection. Neither end imports the
other: both import this.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["LOOPBACK_HOSTS", "allowed_by_list", "describe_allowlist", "not_allowed_message",
           "parse_allowlist", "parse_host_port"]

#: What an empty allowlist allows.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def parse_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> ``(host, port)``; ValueError if malformed."""
    value = value.strip()
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.lower(), int(port)


def parse_allowlist(allow: Iterable[Any]) -> set[tuple[str, int]]:
    """``HOST:PORT`` strings or ``(host, port)`` pairs -> a set of ``(host, port)``."""
    return {parse_host_port(a) if isinstance(a, str) else (a[0].lower(), int(a[1])) for a in allow}


def allowed_by_list(allow: set[tuple[str, int]], host: str, port: int) -> bool:
    """An empty allowlist means loopback hosts only; otherwise exactly the listed pairs."""
    host = host.lower()
    if not allow:
        return host in LOOPBACK_HOSTS
    return (host, port) in allow


def describe_allowlist(allow: set[tuple[str, int]]) -> str:
    if not allow:
        return "loopback hosts only"
    return ", ".join(f"{h}:{p}" for h, p in sorted(allow))


def not_allowed_message(host: str, port: int, agent_name: str, allow: set[tuple[str, int]]) -> str:
    return (f"target {host}:{port} is not allowed by agent {agent_name!r} "
            f"(allowed: {describe_allowlist(allow)})")
