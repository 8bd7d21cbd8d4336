"""Container services an agent declares (seeds 003, 004): ``relay agent --service``.

``--service slug=HOST:PORT[,health=/health][,prompt=TEXT][,openapi=/openapi.json][,label=L]``
(repeatable; ``label`` repeatable too). The declarations travel in the agent's hello (its
SETTINGS ``info["services"]``, a list of :meth:`ServiceSpec.to_info` dicts), so the
gateway learns them with the connection itself and forgets nothing on a reconnect. A
declared target is implicitly on the agent's allowlist. ``health=none`` (or
``health=``) turns the gateway's health probe off: the service then counts as healthy
whenever its agent is online. ``prompt`` may not contain commas (the separator).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from relay.allowlist import parse_host_port
from relay.services import SLUG_RE

__all__ = ["SLUG_RE", "ServiceSpec", "parse_service"]

DEFAULT_HEALTH = "/health"
MAX_PROMPT = 4000


@dataclass(frozen=True)
class ServiceSpec:
    """One declared service: where it listens and how the gateway describes/probes it."""

    slug: str
    host: str
    port: int
    health: Optional[str] = DEFAULT_HEALTH
    prompt: Optional[str] = None
    openapi: Optional[str] = None
    labels: tuple[str, ...] = field(default_factory=tuple)

    def to_info(self) -> dict[str, Any]:
        """The declaration as sent in the hello."""
        return {"slug": self.slug, "target": f"{self.host}:{self.port}", "health": self.health,
                "prompt": self.prompt, "openapi": self.openapi, "labels": list(self.labels)}


def _path(value: str, option: str) -> str:
    if not value.startswith("/") or value.startswith("//"):
        raise ValueError(f"{option} must be a path starting with a single '/', got {value!r}")
    return value


def parse_service(text: str) -> ServiceSpec:
    """Parse one ``--service`` value; ValueError with a one-line reason if malformed."""
    head, *options = text.split(",")
    slug, sep, target = head.partition("=")
    slug = slug.strip()
    if not sep:
        raise ValueError(f"expected slug=HOST:PORT[,health=/path][,prompt=TEXT]..., got {text!r}")
    if not SLUG_RE.match(slug):
        raise ValueError(f"service slug {slug!r} must match {SLUG_RE.pattern}")
    host, port = parse_host_port(target)
    health: Optional[str] = DEFAULT_HEALTH
    prompt = openapi = None
    labels: list[str] = []
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"service option {option!r} must be KEY=VALUE")
        if key == "health":
            health = None if value.strip().lower() in ("", "none", "off") else _path(value.strip(), "health")
        elif key == "prompt":
            prompt = value[:MAX_PROMPT]
        elif key == "openapi":
            openapi = _path(value.strip(), "openapi")
        elif key == "label":
            labels.append(value.strip())
        else:
            raise ValueError(f"unknown service option {key!r} (health, prompt, openapi, label)")
    return ServiceSpec(slug, host, port, health, prompt, openapi, tuple(labels))
