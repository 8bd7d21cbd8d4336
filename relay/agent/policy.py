"""What an agent decides, whatever loop runs it: where the gateway is, which targets
the gateway may reach through it, and how long to wait before reconnecting.

Both agents (``relay.agent.client`` on asyncio, ``relay.agent.trio_client`` on trio) call
these, so their URLs, allowlists, refusal messages and backoff cannot drift apart.
"""
from __future__ import annotations

import random
import ssl
from typing import Any, NamedTuple, Optional

from relay.allowlist import (
    LOOPBACK_HOSTS,
    allowed_by_list,
    describe_allowlist,
    not_allowed_message,
    parse_allowlist,
    parse_host_port,
)
from relay.mux.errors import ErrorCode

# The allowlist names are re-exported: the agents' policy API.
__all__ = [
    "AGENT_PATH", "LOOPBACK_HOSTS", "STREAM_PROTOCOLS", "GatewayAddress", "TargetRefused",
    "allowed_by_list", "backoff_delay", "describe_allowlist", "not_allowed_message",
    "no_terminal", "parse_allowlist", "parse_gateway_url", "parse_host_port", "parse_target",
    "target_tls",
]

AGENT_PATH = "/api/v1/agent/connect"
#: Stream protocols served as plain byte splices to the target.
STREAM_PROTOCOLS = frozenset({"tcp", "http"})
#: ...and with datagram records to a UDP target (relay.mux.datagrams, relay.agent.udp).
DATAGRAM_PROTOCOLS = frozenset({"udp"})


class GatewayAddress(NamedTuple):
    tls: bool
    host: str
    port: int
    #: Path of the agent endpoint on the gateway.
    path: str
    #: The full agent endpoint URL (for logs; it carries no secret).
    url: str


def parse_gateway_url(gateway_url: str) -> GatewayAddress:
    """Accept ``http(s)://`` and ``ws(s)://`` URLs (scheme optional) and add the agent
    endpoint's path unless it is there already; ValueError otherwise."""
    from urllib.parse import urlsplit

    split = urlsplit(gateway_url if "://" in gateway_url else "http://" + gateway_url)
    if split.scheme not in ("http", "https", "ws", "wss") or not split.hostname:
        raise ValueError(f"gateway URL must be http(s):// or ws(s)://HOST[:PORT]: {gateway_url!r}")
    tls = split.scheme in ("https", "wss")
    path = split.path.rstrip("/")
    path = path if path.endswith(AGENT_PATH) else path + AGENT_PATH
    return GatewayAddress(tls, split.hostname, split.port or (443 if tls else 80), path,
                          f"{split.scheme}://{split.netloc}{path}")


class TargetRefused(Exception):
    """An incoming stream's target is malformed or not allowed; carries the mux error
    code and the message the client will see."""

    def __init__(self, error_code: int, message: str) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.message = message


def parse_target(metadata: Any, protocols: frozenset[str] = STREAM_PROTOCOLS) -> tuple[str, int]:
    """``(host, port)`` of an incoming stream's target, or :class:`TargetRefused`
    (also for a ``protocol`` not in ``protocols``, the ones the caller serves)."""
    target = metadata.get("target") if isinstance(metadata, dict) else None
    protocol = metadata.get("protocol", "tcp") if isinstance(metadata, dict) else None
    if protocol not in protocols:
        raise TargetRefused(ErrorCode.REFUSED, f"unsupported stream protocol {protocol!r}")
    try:
        return parse_host_port(target if isinstance(target, str) else "")
    except ValueError:
        raise TargetRefused(ErrorCode.PROTOCOL_ERROR, f"bad target {target!r}: expected HOST:PORT") from None


def no_terminal(agent_name: str) -> TargetRefused:
    """The refusal of a terminal stream by an agent that serves no terminal."""
    return TargetRefused(ErrorCode.NOT_ALLOWED, f"agent {agent_name!r} serves no terminal: start it with "
                                                f"--terminal SHELL to allow one")


def backoff_delay(attempt: int, initial: float, maximum: float, jitter: float) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): exponential, capped, with
    jitter so many agents dropped at once do not return in lockstep."""
    base = min(maximum, initial * 2.0 ** min(attempt, 30))
    return base * random.uniform(1 - jitter, 1 + jitter)


_TARGET_TLS: Optional[ssl.SSLContext] = None


def target_tls() -> ssl.SSLContext:
    """TLS towards an https target (a stream with ``"tls": true``: an https tunnel's share
    link): encrypted, certificate not verified (relay.gateway.http.share_proxy says why:
    a target its owner chose, often with a self-signed certificate)."""
    global _TARGET_TLS
    if _TARGET_TLS is None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        _TARGET_TLS = context
    return _TARGET_TLS
