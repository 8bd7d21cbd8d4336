"""Share links of tunnels (seed 002): validation of the create request, and the checks
applied to every request that arrives at a share URL ``/s/{share_token}/...``.

Everything here is pure (no I/O, time passed in as ``now``), so the rules are tested
without sleeping and the HTTP layer only calls :func:`check_share`.

The answers at a share URL, in the order they are checked:

* unknown token → ``404 share_not_found`` (decided by the caller, which looks it up);
* expired → ``410 share_expired``. Why 410 Gone rather than 403/404: the link did exist
  and will never work again, which is exactly what 410 means, and it tells the person
  holding the link to ask for a new one instead of retrying;
* method not in ``allowed_methods`` → ``405 method_not_allowed`` with an ``Allow``
  header listing the allowed methods (``HEAD`` is allowed wherever ``GET`` is: it is a
  GET without the body, RFC 9110 §9.3.2);
* over ``rate_limit`` requests in the current minute → ``429 rate_limited`` with
  ``Retry-After`` (whole seconds until the window ends). Refused requests do not count
  against the limit, so a client that waits always gets back in.

The rate limiter uses fixed one-minute windows per share: O(1) memory per share, an
exact ``Retry-After``, and easy to reason about. (The price: up to twice the limit can
pass around a window boundary, acceptable for a courtesy limit on a shared link.) The
number of shares it tracks is bounded (least recently used forgotten first), so a flood
of distinct share tokens cannot grow it without bound.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

from relay.gateway.http.server import HttpError
from relay.gateway.store import Share

__all__ = [
    "EXPIRY_CHOICES",
    "HTTP_METHODS",
    "RateLimiter",
    "ShareRequest",
    "check_share",
    "parse_share_request",
    "printable_text",
]

#: ``expires_in`` values and their length in seconds (None: never expires).
EXPIRY_CHOICES: dict[str, Optional[int]] = {
    "1h": 3600,
    "24h": 24 * 3600,
    "7d": 7 * 24 * 3600,
    "30d": 30 * 24 * 3600,
    "never": None,
}
#: Used when a share is created without ``expires_in``: a link that was forgotten
#: should not work forever unless someone asked for that.
DEFAULT_EXPIRY = "24h"

#: Methods a share may allow (CONNECT and TRACE make no sense through a share).
HTTP_METHODS: tuple[str, ...] = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

MAX_NAME = 100
MAX_DESCRIPTION = 500
RATE_LIMIT_RANGE = (1, 1000)
#: Length of one rate-limit window, seconds (the limit is "per minute").
WINDOW = 60.0

_FIELDS = {"name", "description", "expires_in", "allowed_methods", "rate_limit"}


@dataclass(frozen=True)
class ShareRequest:
    """A validated ``POST /api/v1/tunnels/{id}/shares`` body."""

    name: str
    description: str
    expires_in: str
    allowed_methods: Optional[tuple[str, ...]]
    rate_limit: Optional[int]

    def expires_at(self, now: float) -> Optional[float]:
        """When a share created at ``now`` stops working (None: never)."""
        seconds = EXPIRY_CHOICES[self.expires_in]
        return None if seconds is None else now + seconds


def printable_text(value: str) -> bool:
    """No control characters, and valid UTF-8 (JSON can carry lone surrogates, which
    could not be stored)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return value.isprintable()


def _bad(field: str, message: str) -> HttpError:
    return HttpError(400, f"invalid_{field}", f"{field}: {message}")


def parse_share_request(body: Any) -> ShareRequest:
    """Validate a share-create body; raises 400 naming the wrong field.

    ``name`` 1..100 characters (required); ``description`` at most 500 characters
    (default empty); ``expires_in`` one of 1h, 24h, 7d, 30d, never (default 24h);
    ``allowed_methods`` a non-empty list of HTTP methods (default: all); ``rate_limit``
    an integer 1..1000 requests per minute (default: no limit).
    """
    if not isinstance(body, dict):
        raise HttpError(400, "invalid_request", "request body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise HttpError(400, "unknown_field",
                        f"unknown field {unknown[0]!r}; a share takes {', '.join(sorted(_FIELDS))}")
    name = body.get("name")
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= MAX_NAME or not printable_text(name):
        raise _bad("name", f"must be a string of 1 to {MAX_NAME} printable characters")
    description = body.get("description", "")
    if description is None:
        description = ""
    if (not isinstance(description, str) or len(description) > MAX_DESCRIPTION
            or not printable_text(description.replace("\n", " ").replace("\t", " "))):
        raise _bad("description", f"must be a string of at most {MAX_DESCRIPTION} characters "
                                  "(no control characters but newlines and tabs)")
    expires_in = body.get("expires_in", DEFAULT_EXPIRY)
    if expires_in not in EXPIRY_CHOICES:
        raise _bad("expires_in", f"must be one of {', '.join(EXPIRY_CHOICES)}")
    methods = body.get("allowed_methods")
    allowed: Optional[tuple[str, ...]] = None
    if methods is not None:
        if not isinstance(methods, list) or not methods:
            raise _bad("allowed_methods", "must be a non-empty list of HTTP methods")
        seen: list[str] = []
        for method in methods:
            upper = method.upper() if isinstance(method, str) else None
            if upper not in HTTP_METHODS:
                raise _bad("allowed_methods",
                           f"{method!r} is not one of {', '.join(HTTP_METHODS)}")
            if upper not in seen:
                seen.append(upper)
        allowed = tuple(seen)
    rate_limit = body.get("rate_limit")
    low, high = RATE_LIMIT_RANGE
    if rate_limit is not None and (not isinstance(rate_limit, int) or isinstance(rate_limit, bool)
                                   or not low <= rate_limit <= high):
        raise _bad("rate_limit", f"must be an integer from {low} to {high} (requests per minute)")
    return ShareRequest(name.strip(), description, expires_in, allowed, rate_limit)


def allowed_methods(share: Share) -> Optional[tuple[str, ...]]:
    """The methods a share accepts (HEAD added where GET is), None for any."""
    if share.allowed_methods is None:
        return None
    methods = list(share.allowed_methods)
    if "GET" in methods and "HEAD" not in methods:
        methods.append("HEAD")
    return tuple(methods)


class RateLimiter:
    """Fixed one-minute windows per share id, for at most ``max_keys`` shares."""

    def __init__(self, window: float = WINDOW, max_keys: int = 10_000) -> None:
        self.window = window
        self.max_keys = max_keys
        # share id -> (window start, requests counted in it); most recently used last.
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def hit(self, key: str, limit: int, now: float) -> Optional[float]:
        """Count one request for ``key``. None if it is within ``limit``, else the
        seconds until the window ends (the request is refused and not counted)."""
        start = now - (now % self.window)
        current = self._windows.get(key)
        count = current[1] if current is not None and current[0] == start else 0
        if count >= limit:
            self._windows.move_to_end(key)
            return start + self.window - now
        self._windows[key] = (start, count + 1)
        self._windows.move_to_end(key)
        while len(self._windows) > self.max_keys:
            self._windows.popitem(last=False)
        return None

    def forget(self, key: str) -> None:
        """Drop a key's state (its share was deleted)."""
        self._windows.pop(key, None)

    def __len__(self) -> int:
        return len(self._windows)


def check_share(share: Share, method: str, now: float,
                limiter: Optional[RateLimiter] = None) -> None:
    """Raise the :class:`HttpError` a request ``method`` at ``now`` gets at this share's
    URL (410 expired, 405 method, 429 rate limit), or return None if it may pass.
    With ``limiter`` a passing request is counted against the share's rate limit."""
    if share.expires_at is not None and now >= share.expires_at:
        raise HttpError(410, "share_expired", "this share link expired; ask its owner for a new one")
    methods = allowed_methods(share)
    if methods is not None and method.upper() not in methods:
        raise HttpError(405, "method_not_allowed",
                        f"{method} is not allowed through this share",
                        {"Allow": ", ".join(methods)})
    if share.rate_limit is not None and limiter is not None:
        wait = limiter.hit(share.id, share.rate_limit, now)
        if wait is not None:
            raise HttpError(429, "rate_limited",
                            f"this share allows {share.rate_limit} requests per minute",
                            {"Retry-After": str(max(1, math.ceil(wait)))})
