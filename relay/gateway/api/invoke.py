"""``POST /api/v1/r/invoke/{serviceSlug}`` (seed 004) and the buffered HTTP exchange it uses.

Request body (JSON object): ``method`` (required; GET, POST, PUT, PATCH, DELETE, HEAD,
OPTIONS), ``path`` (required; the path on the container with its query, at most 2048
characters, matching ``^/(?!/)``: absolute URLs, protocol-relative ``//host`` and anything
with a backslash, whitespace or control/non-ASCII characters are refused, so the target
can never be rewritten to another host; under an external service URL's path prefix, a
path with ``.`` or ``..`` segments too, see :func:`has_dot_segment`), ``headers`` (optional object of string values,
printable ASCII or tab, anything else is a 400, surrounding spaces and tabs dropped
(RFC 9110 5.5: they are not part of the value); hop-by-hop ones — Host, Connection,
Upgrade, Transfer-Encoding, TE, Trailer, plus Keep-Alive, Proxy-* and Content-Length,
which the gateway sets itself — are dropped; everything else, Authorization included, is
forwarded as is), ``body_base64`` (optional;
invalid base64 is a 400). Other fields are ignored.

Response: ``{"status_code", "headers", "body_base64"}`` — the container's answer (repeated
headers joined with ", "; its hop-by-hop headers dropped). The body is buffered: over
:data:`MAX_RESPONSE` bytes the gateway answers 502 ``response_too_large`` (use the
transparent proxy for big or streamed bodies).

Gateway-level failures are those of seed 003, decided by :mod:`relay.gateway.api.services`:
400 not running, 404 unknown slug (another team's too), 502 no instance could be reached
or the container's answer was not valid HTTP, 503 running but no healthy instance or no
online agent. Auth: JWT + X-Team-ID, sk- or dk- (invoke is runtime use).
"""
from __future__ import annotations

import base64
import binascii
import re
from json.encoder import encode_basestring_ascii as _json_string
from typing import TYPE_CHECKING, Any, Optional

import httptools

from relay.gateway.http.exchange import ResponseTooLarge, http_exchange
from relay.gateway.http.proxy import ProxyError
from relay.gateway.http.server import HttpError, Response, json_body

if TYPE_CHECKING:
    from relay.gateway.api.services import ServiceManager

__all__ = ["INVOKE_METHODS", "MAX_RESPONSE", "headers_json", "invoke"]

INVOKE_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
MAX_PATH = 2048
#: Largest container response invoke buffers (base64 makes the JSON ~4/3 of it).
MAX_RESPONSE = 16 * 1024 * 1024
#: The whole exchange with the container (after the stream is open) must end within this.
INVOKE_TIMEOUT = 300.0
#: Methods that may be sent twice (RFC 9110 9.2.2): retried once after a stale stream.
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
#: POST/PATCH reuse only a stream idle at most this long (never retried, see invoke()).
UNSAFE_REUSE_IDLE = 1.0
#: Request headers never forwarded: the seed's hop-by-hop list plus what framing needs.
STRIPPED = frozenset({"host", "connection", "upgrade", "transfer-encoding", "te", "trailer",
                      "keep-alive", "content-length", "proxy-connection", "proxy-authorization",
                      "proxy-authenticate"})
_RESPONSE_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer",
                           b"upgrade", b"proxy-connection"})
_PATH_RE = re.compile(r"^/(?!/)[\x21-\x7e]*$")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
#: Header values that can be sent: printable ASCII and tab (no CR, LF, NUL, other controls, non-ASCII).
_HEADER_VALUE_RE = re.compile(r"^[\t\x20-\x7e]*$")


_DOT_SEGMENT_RE = re.compile(r"(?:^|[/\\])\.\.?(?:;[^/\\]*)?(?=[/\\]|$)")
_ENCODED_DOT_OR_SLASH_RE = re.compile(r"%(?:2[eEfF]|5[cC])")


def has_dot_segment(path: str) -> bool:
    """Whether a request path (the query aside) has a ``.`` or ``..`` segment, also
    percent-encoded, after a backslash or with ``;`` parameters: what a server resolving
    dot segments would use to leave a path prefix put before the path. Sent under an
    external service URL's path prefix, such a path is refused."""
    path = path.split("?", 1)[0]
    path = _ENCODED_DOT_OR_SLASH_RE.sub(lambda m: {"e": ".", "f": "/", "c": "\\"}[m.group(0)[2].lower()], path)
    return _DOT_SEGMENT_RE.search(path) is not None


def dot_segment_error() -> HttpError:
    return HttpError(400, "invalid_path", "a path with '.' or '..' segments cannot be sent under the "
                                          "service URL's path prefix")


def _bad(field: str, message: str) -> HttpError:
    return HttpError(400, "invalid_request", f"{field}: {message}")


def parse_invoke_body(body: Any) -> tuple[str, str, list[tuple[str, str]], bytes]:
    """Validate an invoke body; ``(method, path, headers, body bytes)`` or HttpError 400."""
    if not isinstance(body, dict):
        raise HttpError(400, "invalid_request", "request body must be a JSON object")
    method = body.get("method")
    if method not in INVOKE_METHODS:
        raise _bad("method", f"must be one of {', '.join(INVOKE_METHODS)}")
    path = body.get("path")
    if not isinstance(path, str) or not path:
        raise _bad("path", "required: the path on the container, starting with '/'")
    if len(path) > MAX_PATH:
        raise _bad("path", f"at most {MAX_PATH} characters")
    if not _PATH_RE.match(path) or "\\" in path:
        raise _bad("path", "must start with a single '/' (no absolute or protocol-relative URL, "
                           "no host) and contain printable ASCII only")
    headers = body.get("headers")
    if headers is None:
        headers = {}
    if not isinstance(headers, dict):
        raise _bad("headers", "must be an object of header names to string values")
    forwarded: list[tuple[str, str]] = []
    for name, value in headers.items():
        if not isinstance(value, str) or not _HEADER_NAME_RE.match(name):
            raise _bad("headers", f"{name!r} must be a valid header name with a string value")
        if not _HEADER_VALUE_RE.match(value):
            raise _bad("headers", f"{name!r} has a value with CR, LF, NUL, another control character "
                                  "or a non-ASCII character")
        lower = name.lower()
        if lower in STRIPPED or lower.startswith("proxy-"):
            continue
        forwarded.append((name, value.strip(" \t")))  # surrounding whitespace is not part of a value
    encoded = body.get("body_base64")
    if encoded is None:
        encoded = ""
    if not isinstance(encoded, str):
        raise _bad("body_base64", "must be a base64 string")
    try:
        payload = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("body_base64", "is not valid base64") from None
    return method, path, forwarded, payload


def headers_json(headers: dict[str, str]) -> str:
    """``json.dumps(headers)`` for a dict of strings, without building an encoder per
    call as ``json.dumps`` does (each string escaped by json's own C function)."""
    return "{" + ", ".join([_json_string(name) + ": " + _json_string(value) for name, value in headers.items()]) + "}"


def _response_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    out: dict[str, str] = {}
    lower_seen: dict[str, str] = {}
    for name, value in raw:
        if name.lower() in _RESPONSE_HOP:
            continue
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        first = lower_seen.setdefault(key.lower(), key)
        out[first] = out[first] + ", " + text if first in out else text
    return out


async def invoke(services: "ServiceManager", authorization: Optional[str], team: Optional[str], slug: str,
                 body: bytes) -> Response:
    """``POST /api/v1/r/invoke/{slug}`` with the caller's ``Authorization`` and
    ``X-Team-ID`` headers and the request body (the route is served by the proxy
    engine: ServiceManager._invoke_resolve).

    Streams are kept alive between calls (each is one connection from the agent to the
    container): the instance the round robin picked lends an idle one if it has one,
    and a stream whose exchange ended cleanly goes back to its pool. A reused stream may
    turn out stale (the container closed it meanwhile); an idempotent request is then
    sent once more on a fresh stream. A non-idempotent one (POST, PATCH) is never sent
    twice, so it only takes a stream idle for at most :data:`UNSAFE_REUSE_IDLE` seconds,
    shorter than any server's keep-alive timeout, where that race is negligible."""
    # runtime: sk-, dk-, JWT + X-Team-ID; from memory when it can be (no coroutine)
    auth = services.gw.auth
    principal = auth.cached(authorization, team) or await auth.authenticate(authorization, team)
    principal.require_runtime()
    method, path, headers, payload = parse_invoke_body(json_body(body))
    candidates = (services.candidates_nowait(principal.team_id, slug)  # 404/400/503
                  or await services.candidates(principal.team_id, slug))
    if candidates[0].base_path and has_dot_segment(path):  # it could leave the external URL's prefix
        raise dot_segment_error()
    idempotent = method in IDEMPOTENT
    first = candidates[0]
    reused = first.checkout() if idempotent else first.checkout(UNSAFE_REUSE_IDLE)
    while True:
        if reused is not None:
            stream, instance = reused, first
        else:
            try:
                stream, instance = await services.open_to(slug, candidates)
            except ProxyError as exc:  # 502: no instance could be reached
                raise HttpError(exc.status, exc.code, exc.message) from None
        try:
            answer = await _exchange(stream, instance, method, path, headers, payload, slug,
                                     reused=reused is not None)
        except _Stale:
            reused = None  # once more, on a fresh stream (only idempotent requests get here)
            continue
        except BaseException:
            stream_close(stream, abort=True)  # cut short: the rest must not keep flowing
            raise
        if answer.reusable:
            instance.checkin(stream)
        else:
            stream_close(stream)
        # The body by hand: base64 needs no JSON escaping, and json.dumps would look at
        # every character of it.
        return Response(200, b'{"status_code": %d, "headers": %s, "body_base64": "%s"}' % (
            answer.status, headers_json(_response_headers(answer.headers)).encode(),
            binascii.b2a_base64(answer.body, newline=False)))


class _Stale(Exception):
    """A reused keep-alive stream failed: send an idempotent request again."""


async def _exchange(stream: Any, instance: Any, method: str, path: str, headers: list[tuple[str, str]],
                    payload: bytes, slug: str, reused: bool) -> Any:
    """One exchange of :func:`invoke`, its failures as the HTTP errors of seed 003
    (or :class:`_Stale` for a reused stream an idempotent request may retry)."""
    out = [("Host", instance.host_header), *headers]
    if payload or method in ("POST", "PUT", "PATCH"):
        out.append(("Content-Length", str(len(payload))))
    target = instance.base_path + path
    try:
        return await http_exchange(stream, method, target, out, payload, limit=MAX_RESPONSE, timeout=INVOKE_TIMEOUT)
    except ResponseTooLarge as exc:
        raise HttpError(502, "response_too_large", f"{exc}; use the transparent proxy "
                                                   f"/api/v1/r/containers/{slug}/... for large bodies") from None
    except TimeoutError:
        raise HttpError(502, "upstream_timeout", f"the container did not answer within {INVOKE_TIMEOUT:.0f}s") from None
    except (httptools.HttpParserError, ConnectionError, OSError) as exc:
        if reused and method in IDEMPOTENT:
            stream_close(stream, abort=True)
            raise _Stale() from None
        if isinstance(exc, httptools.HttpParserError):
            raise HttpError(502, "bad_upstream_response", f"the container sent invalid HTTP: {exc}") from None
        raise HttpError(502, "tunnel_error", f"the tunnel to the container failed: {exc}") from None


def stream_close(stream: Any, abort: bool = False) -> None:
    """Drop a stream after a buffered exchange; ``abort`` if it was cut short (the rest
    of the response must not keep flowing)."""
    try:
        if abort:
            stream.abort()
        else:
            stream.close()
    except Exception:  # already closed or reset: nothing left to release
        pass
