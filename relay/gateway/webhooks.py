"""What a webhook *receiver* needs, at the path the README documents:
:func:`verify` (and :func:`sign`) of ``X-Relay-Signature``. The dispatcher that sends
deliveries, and the rest of the webhooks feature, is :mod:`relay.gateway.api.webhooks`."""
from __future__ import annotations

from relay.gateway.api.webhooks import sign, verify

__all__ = ["sign", "verify"]
