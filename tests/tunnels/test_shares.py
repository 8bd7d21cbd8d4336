"""Share links: request validation and the checks at the share URL, as pure functions
with an injected clock (no sleeping through rate-limit windows)."""
from __future__ import annotations

import pytest

from relay.gateway.api.shares import RateLimiter, allowed_methods, check_share, parse_share_request
from relay.gateway.http.server import HttpError
from relay.gateway.store import Share

T0 = 1_700_000_040.0  # a window boundary (divisible by 60)


def make_share(**kwargs) -> Share:
    fields = dict(id="s1", team_id="t", tunnel_id="tun", name="demo", description="",
                  token_prefix="abc", expires_at=None, allowed_methods=None, rate_limit=None,
                  created_at=T0, token_hash="h")
    fields.update(kwargs)
    return Share(**fields)


def refused(share: Share, method: str, now: float, limiter=None) -> HttpError:
    with pytest.raises(HttpError) as info:
        check_share(share, method, now, limiter)
    return info.value


# ----------------------------------------------------------------------------- validation


def test_parse_share_request_defaults_and_normalisation():
    spec = parse_share_request({"name": "  demo  "})
    assert (spec.name, spec.description, spec.expires_in) == ("demo", "", "24h")
    assert spec.allowed_methods is None and spec.rate_limit is None
    assert spec.expires_at(T0) == T0 + 24 * 3600
    spec = parse_share_request({"name": "x" * 100, "description": "d" * 500, "expires_in": "never",
                                "allowed_methods": ["get", "POST", "GET"], "rate_limit": 1000})
    assert spec.allowed_methods == ("GET", "POST") and spec.expires_at(T0) is None
    assert spec.rate_limit == 1000
    assert parse_share_request({"name": "é", "description": "two\nlines\tok"}).description == "two\nlines\tok"
    for choice, seconds in (("1h", 3600), ("7d", 7 * 86400), ("30d", 30 * 86400)):
        assert parse_share_request({"name": "n", "expires_in": choice}).expires_at(0) == seconds


@pytest.mark.parametrize("body, code", [
    ([], "invalid_request"),
    ({}, "invalid_name"),
    ({"name": ""}, "invalid_name"),
    ({"name": "   "}, "invalid_name"),
    ({"name": "x" * 101}, "invalid_name"),
    ({"name": 5}, "invalid_name"),
    ({"name": "n", "description": "d" * 501}, "invalid_description"),
    ({"name": "n", "description": 1}, "invalid_description"),
    ({"name": "n", "expires_in": "2h"}, "invalid_expires_in"),
    ({"name": "n", "expires_in": 3600}, "invalid_expires_in"),
    ({"name": "n", "allowed_methods": []}, "invalid_allowed_methods"),
    ({"name": "n", "allowed_methods": "GET"}, "invalid_allowed_methods"),
    ({"name": "n", "allowed_methods": ["GET", "FETCH"]}, "invalid_allowed_methods"),
    ({"name": "n", "allowed_methods": ["CONNECT"]}, "invalid_allowed_methods"),
    ({"name": "n", "allowed_methods": [1]}, "invalid_allowed_methods"),
    ({"name": "n", "rate_limit": 0}, "invalid_rate_limit"),
    ({"name": "n", "rate_limit": 1001}, "invalid_rate_limit"),
    ({"name": "n", "rate_limit": 1.5}, "invalid_rate_limit"),
    ({"name": "n", "rate_limit": True}, "invalid_rate_limit"),
    ({"name": "n", "ttl": "1h"}, "unknown_field"),
    ({"name": "a\x00b"}, "invalid_name"),
    ({"name": "\ud800"}, "invalid_name"),
    ({"name": "n", "description": "bell\x07"}, "invalid_description"),
])
def test_parse_share_request_names_the_wrong_field(body, code):
    with pytest.raises(HttpError) as info:
        parse_share_request(body)
    assert info.value.status == 400 and info.value.code == code
    field = code.removeprefix("invalid_")
    if code.startswith("invalid_") and field != "request":
        assert info.value.message.startswith(field + ":")


# ----------------------------------------------------------------------------- checks


def test_expired_share_is_410():
    share = make_share(expires_at=T0 + 3600)
    check_share(share, "GET", T0 + 3599)
    err = refused(share, "GET", T0 + 3600)
    assert err.status == 410 and err.code == "share_expired"
    check_share(make_share(expires_at=None), "GET", T0 + 10 ** 9)  # never


def test_method_not_allowed_is_405_with_allow():
    share = make_share(allowed_methods=("GET", "POST"))
    check_share(share, "GET", T0)
    check_share(share, "post", T0)
    check_share(share, "HEAD", T0)  # implied by GET
    err = refused(share, "DELETE", T0)
    assert err.status == 405 and err.code == "method_not_allowed"
    assert err.headers["Allow"] == "GET, POST, HEAD"
    assert allowed_methods(make_share(allowed_methods=("POST",))) == ("POST",)
    assert refused(make_share(allowed_methods=("POST",)), "HEAD", T0).status == 405
    for method in ("GET", "PUT", "PATCH", "DELETE", "OPTIONS"):  # no list: all allowed
        check_share(make_share(), method, T0)


def test_rate_limit_429_then_recovers_after_the_window():
    limiter = RateLimiter()
    share = make_share(rate_limit=3)
    for i in range(3):
        check_share(share, "GET", T0 + i, limiter)
    err = refused(share, "GET", T0 + 10, limiter)
    assert err.status == 429 and err.code == "rate_limited"
    assert err.headers["Retry-After"] == "50"
    # Refused requests do not count: still refused only until the window ends.
    for _ in range(20):
        assert refused(share, "GET", T0 + 59.5, limiter).headers["Retry-After"] == "1"
    check_share(share, "GET", T0 + 60, limiter)  # a new window
    check_share(share, "GET", T0 + 61, limiter)
    check_share(share, "GET", T0 + 62, limiter)
    assert refused(share, "GET", T0 + 63, limiter).status == 429
    # Another share has its own budget.
    check_share(make_share(id="s2", rate_limit=1), "GET", T0 + 63, limiter)


def test_checks_order_and_no_limiter_means_no_counting():
    share = make_share(expires_at=T0, allowed_methods=("GET",), rate_limit=1)
    assert refused(share, "POST", T0 + 1).status == 410  # expiry first
    live = make_share(allowed_methods=("GET",), rate_limit=1)
    limiter = RateLimiter()
    assert refused(live, "POST", T0, limiter).status == 405  # a 405 uses no budget
    check_share(live, "GET", T0, limiter)
    for _ in range(5):
        check_share(live, "GET", T0)  # without a limiter nothing is counted


def test_rate_limiter_memory_is_bounded():
    limiter = RateLimiter(max_keys=100)
    for i in range(1000):
        assert limiter.hit(f"share-{i}", 5, T0) is None
    assert len(limiter) == 100
    limiter.forget("share-999")
    assert len(limiter) == 99
    # The oldest keys were forgotten: they start over.
    for _ in range(5):
        assert limiter.hit("share-0", 5, T0) is None
    assert limiter.hit("share-0", 5, T0) == pytest.approx(60.0)
