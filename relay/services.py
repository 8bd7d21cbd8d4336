"""What both ends of the wire agree on about container services (seeds 003, 004).

An agent declares its services in its hello (SETTINGS ``info["services"]``: a list of
``{"slug", "target": "HOST:PORT", "health", "prompt", "openapi", "labels"}``; the agent
builds them in relay.agent.services), and the gateway reads them back
(relay.gateway.api.services). Both check a slug with :data:`SLUG_RE` and a target with
:func:`relay.allowlist.parse_host_port`. Neither end imports the other: both import this.
"""
from __future__ import annotations

import re

__all__ = ["SLUG_RE"]

#: The slug pattern of seed 003 (URL-safe, 3..100 characters).
SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,98}[a-z0-9]$")
