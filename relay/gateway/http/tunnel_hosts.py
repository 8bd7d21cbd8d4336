"""Host-based tunnel URLs (``--tunnel-domain``): ``http://LABEL.DOMAIN/`` for an HTTP tunnel.

A path-prefixed tunnel URL (``/tunnel/TOKEN/``) cannot serve an app whose pages link to
root-relative URLs (``<script src="/static/app.js">``): the browser asks the gateway's
own ``/static``. With a tunnel domain, every tunnel also has a host of its own, where
the whole path space is the app's and nothing needs rewriting.

The label is the tunnel's access token itself, re-encoded: host names are
case-insensitive (browsers lower-case them) while tokens are case-sensitive base64url, so
the label is the token's 32 random bytes in lower-case base32 (52 characters, within a
DNS label's 63). It is exactly as secret as the path URL's token, and the gateway turns
it back into the token with no table to keep. DNS and TLS: a wildcard record
``*.DOMAIN`` pointing at the gateway (and a wildcard certificate for HTTPS).
"""
from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Optional
from urllib.parse import urlsplit

__all__ = ["check_host_header", "host_label", "session_host_header", "token_from_host", "tunnel_host_url"]

#: Longest DNS label (RFC 1035).
MAX_LABEL = 63


def host_label(token: str) -> Optional[str]:
    """The host label of an access token, or None if the token is not canonical
    base64url (every token relay makes is)."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None
    if not raw or base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != token:
        return None
    label = base64.b32encode(raw).rstrip(b"=").decode().lower()
    return label if len(label) <= MAX_LABEL else None


def token_from_host(host: Optional[str], domain: Optional[str]) -> Optional[str]:
    """The access token named by a ``Host`` header value (``LABEL.DOMAIN[:PORT]``), or
    None if the host is not one label under ``domain``."""
    if not host or not domain:
        return None
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 literal is never a tunnel host
        return None
    name = host.rsplit(":", 1)[0] if ":" in host else host
    suffix = "." + domain.strip(".").lower()
    if not name.endswith(suffix):
        return None
    label = name[: -len(suffix)]
    if not label or "." in label or len(label) > MAX_LABEL:
        return None
    try:
        raw = base64.b32decode(label.upper() + "=" * (-len(label) % 8))
    except (binascii.Error, ValueError):
        return None
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode() if raw else None


_HOST_HEADER = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                          r"[A-Za-z0-9])?(?::\d{1,5})?|\[[0-9A-Fa-f:.]+\](?::\d{1,5})?")


def check_host_header(value: object) -> Optional[str]:
    """Why ``value`` cannot be an HTTP tunnel's ``host_header`` (the ``Host`` sent to the
    target instead of the client's, for targets that check it: dev servers, Django's
    ALLOWED_HOSTS), or None if it can: ``HOST[:PORT]``, at most 255 characters."""
    if not isinstance(value, str) or not value or len(value) > 255 or not _HOST_HEADER.fullmatch(value):
        return "host_header must be HOST or HOST:PORT (a DNS name or an IP address)"
    return None


def session_host_header(row: Any) -> Optional[bytes]:
    """A tunnel session's ``host_header`` (kept in its metadata), as bytes, or None."""
    metadata = getattr(row, "metadata", None)
    value = metadata.get("host_header") if isinstance(metadata, dict) else None
    return value.encode("ascii") if isinstance(value, str) and check_host_header(value) is None else None


def tunnel_host_url(token: str, domain: str, public_url: str) -> Optional[str]:
    """``SCHEME://LABEL.DOMAIN[:PORT]/``: the scheme and port of ``public_url`` (where
    clients reach the gateway), the host of the tunnel."""
    label = host_label(token)
    if label is None:
        return None
    split = urlsplit(public_url)
    port = f":{split.port}" if split.port else ""
    return f"{split.scheme}://{label}.{domain.strip('.').lower()}{port}/"
