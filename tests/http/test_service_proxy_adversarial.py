"""Bad clients, bad targets and a vanishing agent against the container-service paths
(seeds 003, 004), through real sockets on 127.0.0.1.

The service-side counterpart of tests/http/test_http_proxy_adversarial.py: the transparent
proxy ``ANY /api/v1/r/containers/{slug}/*`` (relay/gateway/api/services.py in front of the
engine of relay/gateway/http/proxy.py) and ``POST /api/v1/r/invoke/{slug}``
(relay/gateway/api/invoke.py). An in-process gateway with agents declaring services whose
targets are servers on 127.0.0.1 that record every byte they get (a strict h11 parse,
or a scripted raw handler). Each test checks what reaches the target (one well-formed
request per request the gateway authenticated, never the gateway credential, never a
request for another slug or team), what reaches the client (the seed's status codes as
JSON errors, or an aborted connection), and that nothing is left behind (the agent
sessions' open mux streams, less invoke's idle keep-alive pool, go back to where they
started). No mocks of the network; every wait is bounded.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from typing import Any, Optional

import pytest

from tests.gateway.test_gateway_e2e import gateway_and_team, http, run
from tests.http.test_http_proxy_adversarial import (
    Seen,
    bad_requests,
    forwarded_cleanly,
    h11_target,
    open_streams,
    read_all,
    settle,
    statuses,
)
from tests.http.test_http_proxy_engine import RawClient, read_head, req, target
from tests.http.test_invoke import invoke, serving_agent, wait_status

pytestmark = pytest.mark.timeout(120)

PROXY = "/api/v1/r/containers/"


# ----------------------------------------------------------------------------- helpers


def tagged(tag: bytes):
    """An h11_target answer: 200 ``<tag> <method> <target>``."""
    def answer(method: bytes, tgt: bytes, body: bytes):
        return 200, [(b"x-tag", tag)], tag + b" " + method + b" " + tgt + (b" " + body if body else b"")
    return answer


def pooled(gw: Any) -> int:
    """Streams idling in invoke's keep-alive pools (open on purpose, not a leak)."""
    return sum(len(i.idle) for s in gw.services._states.values() for i in s.instances.values())


def in_use(gw: Any) -> int:
    """Open mux streams that are not idle in invoke's pool."""
    return open_streams(gw) - pooled(gw)


async def leaked(gw: Any, baseline: int) -> list[str]:
    """[] once the streams in use are back to ``baseline`` (waiting a bounded time), else
    the failure to report."""
    if await settle(lambda: in_use(gw) == baseline):
        return []
    return [f"open streams {in_use(gw)} != baseline {baseline}"]


def paths(seen: list[Seen]) -> list[bytes]:
    return [r[1] for s in seen for r in s.requests]


def no_credential(seen: list[Seen], *secrets: str) -> list[str]:
    """Problems: a target connection that got a gateway credential or X-Team-ID."""
    problems = []
    for s in seen:
        raw = bytes(s.raw)
        for secret in secrets:
            if secret.encode() in raw:
                problems.append(f"the target got a credential: {raw[:400]!r}")
        for _, _, headers, _ in s.requests:
            for name, _ in headers:
                if name.lower() in (b"authorization", b"x-team-id", b"proxy-authorization"):
                    problems.append(f"the target got header {name!r}")
    return problems


async def exchange(port: int, data: bytes, timeout: float = 4.0) -> tuple[bytes, bool]:
    """Write ``data`` on a fresh connection; everything read until EOF or ``timeout``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    raw, eof = await read_all(reader, timeout=timeout)
    writer.close()
    return raw, eof


def auth(key: str) -> str:
    return f"Authorization: Bearer {key}\r\n"


@contextlib.asynccontextmanager
async def two_teams(tmp_path, answer_a=None):
    """A gateway; team A's agent serves ``svc-a`` (h11 target tagged A), team B's agent
    serves ``svc-b`` (tagged B), no health probes. Yields (gw, keys_a, keys_b, seen_a,
    seen_b)."""
    async with h11_target(answer_a or tagged(b"A")) as (port_a, seen_a), \
            h11_target(tagged(b"B")) as (port_b, seen_b), gateway_and_team(tmp_path) as (gw, keys_a):
        _, keys_b = await gw.store.create_team_with_keys("team-b")
        async with serving_agent(gw, keys_a["ak"], "box-a", f"svc-a=127.0.0.1:{port_a},health=none"), \
                serving_agent(gw, keys_b["ak"], "box-b", f"svc-b=127.0.0.1:{port_b},health=none"):
            await wait_status(gw, keys_a["sk"], "svc-a", "running")
            await wait_status(gw, keys_b["sk"], "svc-b", "running")
            yield gw, keys_a, keys_b, seen_a, seen_b


# ----------------------------------------------------------------------------- the gateway credential


@pytest.mark.parametrize("position", ["first", "pipelined"])
def test_the_gateway_credential_never_reaches_the_target(tmp_path, position):
    """Every spelling and position of the credential: the request is refused (nothing
    reaches the target) or forwarded without Authorization, X-Team-ID or the key in any
    other byte. ``first``: the request opens the connection (the gateway's HTTP server
    checks it before the engine takes over); ``pipelined``: it follows an authenticated
    one in the same write (parsed and checked by the engine's resolver)."""
    failures: list[str] = []

    async def body():
        async with two_teams(tmp_path) as (gw, keys, keys_b, seen, seen_b):
            sk, dk = keys["sk"], keys["dk"]
            team = (await gw.store.list_teams())[0].id
            variants = [
                ("plain", auth(sk)),
                ("dk", auth(dk)),
                ("lower-case name", f"authorization: Bearer {sk}\r\n"),
                ("upper-case name", f"AUTHORIZATION: Bearer {sk}\r\n"),
                ("mixed-case name and scheme", f"aUtHoRiZaTiOn: bearer {sk}\r\n"),
                ("duplicated", auth(sk) + auth(sk)),
                ("sk then dk", auth(sk) + auth(dk)),
                ("valid then junk", auth(sk) + "Authorization: Basic Zm9vOmJhcg==\r\n"),
                ("junk then valid", "Authorization: Basic Zm9vOmJhcg==\r\n" + auth(sk)),
                ("valid then other team's", auth(sk) + auth(keys_b["sk"])),
                ("other team's then valid", auth(keys_b["sk"]) + auth(sk)),
                ("spread apart", auth(sk) + "X-A: 1\r\nX-B: 2\r\n" + f"authorization: Bearer {dk}\r\n"),
                ("x-team-id", auth(sk) + f"X-Team-ID: {team}\r\nx-team-id: other\r\n"),
                ("proxy-authorization", auth(sk) + f"Proxy-Authorization: Bearer {sk}\r\n"),
                ("extra whitespace", f"Authorization: \t Bearer {sk} \t\r\n"),
                ("fold inside the value", f"Authorization: Bearer\r\n {sk}\r\n"),
                ("fold after the name", f"Authorization:\r\n Bearer {sk}\r\n"),
                ("fold after the value", f"Authorization: Bearer {sk}\r\n\tx\r\n"),
            ]
            baseline = in_use(gw)
            secrets = (sk, dk, keys_b["sk"], team)
            for name, headers in variants:
                before = len(seen)
                good = req(PROXY + "svc-a/good", auth(sk))
                wire = req(PROXY + f"svc-a/{name.replace(' ', '-')}", headers + "Connection: close\r\n")
                raw, eof = await exchange(gw.port, (good if position == "pipelined" else b"") + wire)
                codes = statuses(raw)
                if position == "pipelined":
                    if codes[:1] != [200]:
                        failures.append(f"{name}: the good request got {codes} {raw[:200]!r}")
                    codes = codes[1:]
                got = paths(seen[before:])
                forwarded = [p for p in got if p != b"/good"]
                if len(codes) != 1 or not eof:
                    failures.append(f"{name}: answers {codes}, eof {eof}: {raw[:300]!r}")
                elif codes[0] == 200:
                    if len(forwarded) != 1:
                        failures.append(f"{name}: 200 but the target got {got}")
                elif not 400 <= codes[0] < 500 or forwarded:
                    failures.append(f"{name}: {codes[0]} and the target got {got}")
                failures.extend(f"{name}: {p}" for p in no_credential(seen[before:], *secrets))
            # The plain spellings must be accepted (not all refused for a wrong reason).
            assert paths(seen).count(b"/plain") == 1 and paths(seen).count(b"/lower-case-name") == 1
            assert not seen_b, "team B's target got a request"
            failures.extend(await leaked(gw, baseline))

    run(body, timeout=100)
    assert not failures, "\n".join(failures)


def test_each_pipelined_request_is_authenticated_on_its_own(tmp_path):
    """An authenticated request, then one that must be refused, then a good one, in one
    write: the refused one is answered by the gateway (never rides on the first one's
    authentication, never reaches either target); the connection then serves the third
    one or is closed. Also all of them in one long pipeline."""
    failures: list[str] = []

    async def body():
        async with two_teams(tmp_path) as (gw, keys, keys_b, seen, seen_b):
            sk = keys["sk"]
            bad = [
                ("no credentials", PROXY + "svc-a/bad", "", {401}),
                ("unknown key", PROXY + "svc-a/bad", auth("sk-" + "0" * 40), {401}),
                ("not bearer", PROXY + "svc-a/bad", f"Authorization: {sk}\r\n", {401}),
                ("agent key", PROXY + "svc-a/bad", auth(keys["ak"]), {403}),
                ("other team's key", PROXY + "svc-a/bad", auth(keys_b["sk"]), {404}),
                ("other team's slug", PROXY + "svc-b/bad", auth(sk), {404}),
                ("other team's slug, dk", PROXY + "svc-b/bad", auth(keys["dk"]), {404}),
                ("unknown slug", PROXY + "svc-c/bad", auth(sk), {404}),
                ("empty bearer", PROXY + "svc-a/bad", "Authorization: Bearer \r\n", {401}),
                ("jwt without team", PROXY + "svc-a/bad", auth("a.b.c"), {400, 401}),
            ]
            baseline = in_use(gw)
            for name, path, headers, allowed in bad:
                before, before_b = len(seen), len(seen_b)
                wire = (req(PROXY + "svc-a/one", auth(sk)) + req(path, headers)
                        + req(PROXY + "svc-a/three", auth(sk) + "Connection: close\r\n"))
                raw, eof = await exchange(gw.port, wire)
                codes = statuses(raw)
                got = paths(seen[before:])
                if codes[:1] != [200] or len(codes) < 2 or codes[1] not in allowed:
                    failures.append(f"{name}: answers {codes}: {raw[:400]!r}")
                elif codes[2:] not in ([], [200]) or not eof:
                    failures.append(f"{name}: after the refusal {codes[2:]}, eof {eof}")
                want = [b"/one"] + [b"/three"] * (codes[2:] == [200])
                if got != want or len(seen_b) != before_b:
                    failures.append(f"{name}: target A got {got} (want {want}), B {paths(seen_b)}")
                if b'"error"' not in raw:
                    failures.append(f"{name}: no JSON error body: {raw[:400]!r}")
            # One pipeline: good, bad..., good; every good one answered by A, in order.
            client = await RawClient.connect(gw.port)
            wire = [req(PROXY + "svc-a/p0", auth(sk))]
            for i, (_, path, headers, _) in enumerate(bad):
                wire += [req(path, headers), req(PROXY + f"svc-a/p{i + 1}", auth(sk))]
            before = len(seen)
            await client.send(b"".join(wire))
            raw, _ = await read_all(client.reader, timeout=4)
            await client.close()
            codes = statuses(raw)
            expected = [200]
            for _, _, _, allowed in bad:
                expected += [min(allowed), 200]
            # A refusal may close the connection; what was answered is in order.
            if codes != expected[:len(codes)] or len(codes) < 2:
                failures.append(f"pipeline: answers {codes}, want a prefix of {expected}")
            answered_good = [b"/p%d" % i for i in range(len(bad) + 1)][:(len(codes) + 1) // 2]
            if paths(seen[before:]) != answered_good:
                failures.append(f"pipeline: target got {paths(seen[before:])}, want {answered_good}")
            failures.extend(no_credential(seen, sk, keys["dk"], keys_b["sk"]))
            assert not seen_b
            failures.extend(await leaked(gw, baseline))

    run(body, timeout=60)
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- smuggling


@pytest.mark.parametrize("position", ["first", "pipelined"])
def test_smuggling_shapes_on_the_service_path(tmp_path, position):
    """The request shapes of tests/http/test_http_proxy_adversarial.py under the service
    prefix, authenticated; the request hidden in each (``GET /smuggled``, 40 bytes, which
    the shapes' lengths count on) must never reach the target: a parser that saw it as a
    request answers it itself (404), one that did not must not forward it inside a body.
    The bad request is refused (400/501/...) and the connection closed, or forwarded as
    one clean request."""
    failures: list[str] = []

    async def body():
        async with two_teams(tmp_path) as (gw, keys, keys_b, seen, seen_b):
            sk = keys["sk"]
            base = PROXY + "svc-a/"
            baseline = in_use(gw)
            for name, bad, allowed in bad_requests(base):
                if b"Host: t.test\r\n" in bad:
                    bad = bad.replace(b"Host: t.test\r\n", f"Host: t.test\r\n{auth(sk)}".encode(), 1)
                else:  # bare LF line ends
                    bad = bad.replace(b"Host: t.test\n", f"Host: t.test\nAuthorization: Bearer {sk}\n".encode(), 1)
                before = len(seen)
                good = req(base + "good", auth(sk) + "Content-Length: 0\r\n", "OPTIONS")
                raw, eof = await exchange(gw.port, (good if position == "pipelined" else b"") + bad, timeout=1.5)
                codes = statuses(raw)
                if position == "pipelined":
                    if codes[:1] != [200]:
                        failures.append(f"{name}: the good request first got {codes} {raw[:200]!r}")
                    codes = codes[1:]
                forwarded = [r for s in seen[before:] for r in s.requests]
                got = [r[1] for r in forwarded]
                if any(b"smuggled" in p for p in got):
                    failures.append(f"{name}: the target got a smuggled request: {got}")
                for s in seen[before:]:
                    if s.ending.startswith("error"):
                        failures.append(f"{name}: the target got malformed bytes ({s.ending}): {bytes(s.raw)[:300]!r}")
                if 0 in allowed and codes[:1] == [200]:
                    failures.extend(forwarded_cleanly(name, codes, forwarded))
                    continue
                if len(codes) != 1 or codes[0] not in allowed:
                    failures.append(f"{name}: answered {codes} (want one of {sorted(allowed)}): {raw[:300]!r}")
                    continue
                if not eof:
                    failures.append(f"{name}: the connection stayed open after {codes[0]}")
                expected = [b"/good"] if position == "pipelined" else []
                if got != expected:
                    failures.append(f"{name}: the target got {got}, want {expected}")
            failures.extend(no_credential(seen, sk))
            assert not seen_b
            failures.extend(await leaked(gw, baseline))

    run(body, timeout=100)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("position", ["first", "pipelined"])
def test_a_folded_line_that_spells_the_credential_does_not_reach_the_target(tmp_path, position):
    """``X-A: 1`` folded onto `` Authorization: Bearer <key>`` (then the real
    Authorization line): refused, or forwarded without the key in any byte."""

    async def body():
        async with two_teams(tmp_path) as (gw, keys, _, seen, _):
            sk = keys["sk"]
            good = req(PROXY + "svc-a/good", auth(sk))
            wire = req(PROXY + "svc-a/folded", f"X-A: 1\r\n {auth(sk)}{auth(sk)}Connection: close\r\n")
            raw, eof = await exchange(gw.port, (good if position == "pipelined" else b"") + wire)
            codes = statuses(raw)
            assert eof and codes[-1] in (200, 400), raw[:300]
            assert not no_credential(seen, sk), no_credential(seen, sk)

    run(body, timeout=30)


# ----------------------------------------------------------------------------- paths


def test_paths_cannot_leave_the_slug_or_the_team(tmp_path):
    """Dot segments (plain and percent-encoded), ``//``, absolute-form targets, encoded
    or differently spelt slugs and very long paths: the request goes to the slug's own
    container with the path after the slug exactly as sent (the container decides what
    it means: it is its own path space, reached without any gateway credential), or the
    gateway answers it (JSON error); never team B's service, never the gateway's API
    with the service's privileges."""
    failures: list[str] = []

    async def body():
        async with two_teams(tmp_path) as (gw, keys, keys_b, seen, seen_b):
            sk = keys["sk"]
            port_b = None
            for entry in gw.registry.connected():
                if entry.team_id != (await gw.store.list_teams())[0].id:
                    port_b = gw.services._states[(entry.team_id, "svc-b")].instances[entry.agent_id].port
            forwarded = [  # (request-target, what svc-a's container must get)
                ("svc-a/../svc-b/x", "/../svc-b/x"),
                ("svc-a/%2e%2e/svc-b/x", "/%2e%2e/svc-b/x"),
                ("svc-a/%2E%2E%2Fsvc-b%2Fx", "/%2E%2E%2Fsvc-b%2Fx"),
                ("svc-a/..%2f..%2f..%2fcontainers%2fsvc-b%2fx", "/..%2f..%2f..%2fcontainers%2fsvc-b%2fx"),
                ("svc-a/./../../svc-b/x", "/./../../svc-b/x"),
                ("svc-a//evil.example/x", "//evil.example/x"),
                ("svc-a///svc-b", "///svc-b"),
                ("svc-a/../../../agents", "/../../../agents"),
                ("svc-a/../../invoke/svc-b", "/../../invoke/svc-b"),
                ("svc-a/x?next=/api/v1/r/containers/svc-b/&a=..%2f", "/x?next=/api/v1/r/containers/svc-b/&a=..%2f"),
                ("svc-a/http://127.0.0.1:1/x", "/http://127.0.0.1:1/x"),
                ("svc-a/" + "a" * 60_000, "/" + "a" * 60_000),
            ]
            refused = [  # (request-target, token, the gateway's answers)
                (PROXY + "svc-b/x", sk, {404}),
                (PROXY + "svc-a/../svc-b/x", keys_b["sk"], {404}),  # B's key: A's slug is not B's
                (PROXY + "%73vc-b/x", sk, {404}),
                (PROXY + "svc-b%2fx/y", sk, {404}),
                (PROXY + "svc-a%2f..%2fsvc-b/x", sk, {404}),
                (PROXY + "SVC-A/x", sk, {404}),
                (PROXY + "svc-a%00/x", sk, {400, 404}),
                (PROXY + "/svc-b/x", sk, {404}),
                (PROXY + "../containers/svc-b/x", sk, {404}),
                (PROXY + "./svc-b/x", sk, {404}),
                ("/api/v1/r/./containers/svc-b/x", sk, {404}),
                ("/api/v1/r/containers/svc-a/../svc-b", keys_b["sk"], {404}),
                ("//api/v1/r/containers/svc-b/x", sk, {400, 404}),
                (f"http://127.0.0.1:{port_b}/x", sk, {400, 404}),
                ("http://gw.test/api/v1/r/containers/svc-b/x", sk, {400, 404}),
                ("*", sk, {400, 404}),
                (PROXY + "svc-a/" + "a" * 70_000, sk, {400, 414, 431}),
            ]
            baseline = in_use(gw)
            for position in ("first", "pipelined"):
                pre = req(PROXY + "svc-a/pre", auth(sk)) if position == "pipelined" else b""
                for rest, want in forwarded:
                    before = len(seen)
                    raw, eof = await exchange(gw.port, pre + req(PROXY + rest, auth(sk) + "Connection: close\r\n"))
                    codes = statuses(raw)[1:] if pre else statuses(raw)
                    got = [p for p in paths(seen[before:]) if p != b"/pre"]
                    if codes != [200] or got != [want.encode()]:
                        failures.append(f"{position} {rest[:60]}: answers {codes}, target got {[g[:60] for g in got]}")
                    for s in seen[before:]:
                        for _, _tgt, headers, _ in s.requests:
                            host = dict(headers).get(b"host")
                            if host != b"t.test":
                                failures.append(f"{position} {rest[:60]}: Host {host!r}")
                for tgt, token, allowed in refused:
                    before = len(seen)
                    raw, eof = await exchange(gw.port, pre + req(tgt, auth(token) + "Connection: close\r\n"))
                    codes = statuses(raw)[1:] if pre else statuses(raw)
                    got = [p for p in paths(seen[before:]) if p != b"/pre"]
                    if len(codes) != 1 or codes[0] not in allowed or got or not eof:
                        failures.append(f"{position} {tgt[:60]}: answers {codes} eof {eof}, target got {got}: "
                                        f"{raw[:200]!r}")
                    elif b'"error"' not in raw:
                        failures.append(f"{position} {tgt[:60]}: no JSON error: {raw[:300]!r}")
            failures.extend(no_credential(seen, sk, keys_b["sk"]))
            if seen_b:
                failures.append(f"team B's target got {paths(seen_b)}")
            failures.extend(await leaked(gw, baseline))

    run(body, timeout=60)
    assert not failures, "\n".join(failures)


def test_invoke_paths_as_seed_004_says(tmp_path):
    """``path``: at most 2048 characters, ``^/(?!/)``; absolute and protocol-relative URLs,
    backslashes, whitespace, control and non-ASCII characters refused (400 JSON, nothing
    reaches the target); what is accepted reaches svc-a's container exactly as given."""
    failures: list[str] = []

    async def body():
        async with two_teams(tmp_path) as (gw, keys, keys_b, seen, seen_b):
            sk = keys["sk"]
            accepted = ["/" + "a" * 2047, "/" + "b" * 2000 + "?q=" + "c" * 44, "/../svc-b/x", "/%2F%2Fevil.example/x",
                        "/a//b", "/?next=//evil.example", "/..%2f..%2fapi/v1/agents", "/x#frag", "/~!$&'()*+,;=:@"]
            refused = ["/" + "a" * 2048, "/" + "a" * 5000, "//evil.example/x", "//", "///x", "http://evil.example/",
                       "https://evil.example/x", "evil.example/x", "x", "", "/\\evil.example", "\\\\evil/x",
                       "/a b", "/a\tb", "/a\r\nHost: evil", "/a\nb", "/a\x00b", "/a\x7fb", "/é", "/\u2028",
                       " /x", "/x "]
            for path in accepted:
                before = len(paths(seen))
                status, out = await invoke(gw, sk, "svc-a", method="GET", path=path)
                got = paths(seen)[before:]
                if status != 200 or got != [path.encode()]:
                    failures.append(f"{path[:40]!r} ({len(path)}): {status} {str(out)[:200]}, target got "
                                    f"{[g[:40] for g in got]}")
                elif base64.b64decode(out["body_base64"]) != b"A GET " + path.encode():
                    failures.append(f"{path[:40]!r}: body {out['body_base64'][:80]}")
            for path in refused:
                before = len(paths(seen))
                status, out = await invoke(gw, sk, "svc-a", method="GET", path=path)
                if status != 400 or out["error"]["code"] != "invalid_request" or len(paths(seen)) != before:
                    failures.append(f"{path[:40]!r} ({len(path)}): {status} {out}, target got {paths(seen)[before:]}")
            # Another team's slug, whatever the path: 404.
            for path in ("/x", "/../svc-a/x"):
                status, out = await invoke(gw, sk, "svc-b", method="GET", path=path)
                if status != 404:
                    failures.append(f"svc-b {path}: {status} {out}")
            if seen_b:
                failures.append(f"team B's target got {paths(seen_b)}")
            failures.extend(no_credential(seen, sk))

    run(body, timeout=60)
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- invoke bodies


async def invoke_raw(port: int, token: str, slug: str, data: bytes,
                     content_type: str = "application/json") -> tuple[int, Any, bool]:
    """POST ``data`` as is to invoke; (status, JSON body or None, closed by the gateway)."""
    head = (f"POST /api/v1/r/invoke/{slug} HTTP/1.1\r\nHost: gw\r\n{auth(token)}"
            f"Content-Type: {content_type}\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    raw, eof = await exchange(port, head.encode() + data, timeout=10)
    head_, _, payload = raw.partition(b"\r\n\r\n")
    try:
        parsed = json.loads(payload)
    except ValueError:
        parsed = None
    return int(head_.split(b" ", 2)[1]) if head_ else 0, parsed, eof


def test_invoke_with_a_bad_body_is_a_4xx_json_error_and_nothing_reaches_the_target(tmp_path):
    failures: list[str] = []
    ok = {"method": "GET", "path": "/ok"}

    async def body():
        async with two_teams(tmp_path) as (gw, keys, _, seen, _):
            sk = keys["sk"]
            bodies: list[tuple[str, bytes, set[int]]] = [
                ("not json", b"method=GET&path=/x", {400}),
                ("truncated json", b'{"method": "GET", "path": "/x"', {400}),
                ("not utf-8", b'{"method": "GET", "path": "/\xff\xfe"}', {400}),
                ("nan", b'{"method": "GET", "path": "/x", "headers": {"A": NaN}}', {400}),
                ("deep nesting", b'{"method": "GET", "path": "/x", "headers": ' + b"[" * 100_000 + b"]" * 100_000
                 + b"}", {400, 413}),
                ("empty", b"", {400}),
                ("null", b"null", {400}),
                ("array", b'[{"method": "GET", "path": "/x"}]', {400}),
                ("string", b'"GET /x"', {400}),
                ("too large", json.dumps({**ok, "body_base64": "QUFB" * 400_000}).encode(), {413}),
            ]
            fields: list[tuple[str, dict]] = [
                ("method int", {"method": 1, "path": "/x"}),
                ("method lower-case", {"method": "get", "path": "/x"}),
                ("method list", {"method": ["GET"], "path": "/x"}),
                ("method with space", {"method": "GET /evil HTTP/1.1\r\n", "path": "/x"}),
                ("method CONNECT", {"method": "CONNECT", "path": "/x"}),
                ("path int", {"method": "GET", "path": 1}),
                ("path null", {"method": "GET", "path": None}),
                ("path list", {"method": "GET", "path": ["/x"]}),
                ("headers string", {**ok, "headers": "X-A: 1"}),
                ("headers list", {**ok, "headers": [["X-A", "1"]]}),
                ("header value int", {**ok, "headers": {"X-A": 1}}),
                ("header value null", {**ok, "headers": {"X-A": None}}),
                ("header value list", {**ok, "headers": {"X-A": ["1", "2"]}}),
                ("header value object", {**ok, "headers": {"X-A": {"b": "c"}}}),
                ("header value true", {**ok, "headers": {"X-A": True}}),
                ("body int", {**ok, "body_base64": 123}),
                ("body list", {**ok, "body_base64": ["QQ=="]}),
                ("body bad chars", {**ok, "body_base64": "not base64!"}),
                ("body short", {**ok, "body_base64": "QUJ"}),
                ("body url-safe", {**ok, "body_base64": "-_-_"}),
                ("body with newline", {**ok, "body_base64": "QUJD\nREVG"}),
                ("body with space", {**ok, "body_base64": " QUJD"}),
                ("body non-ascii", {**ok, "body_base64": "QUJDé"}),
                ("name with CR LF", {**ok, "headers": {"X-A\r\nX-Injected": "1"}}),
                ("name with LF", {**ok, "headers": {"X-A\nX-Injected": "1"}}),
                ("name with colon", {**ok, "headers": {"X-A: 1\r\nX-B": "1"}}),
                ("name with space", {**ok, "headers": {"X A": "1"}}),
                ("name empty", {**ok, "headers": {"": "1"}}),
                ("name non-ascii", {**ok, "headers": {"X-Ä": "1"}}),
                ("value with CR LF", {**ok, "headers": {"X-A": "1\r\nX-Injected: 1"}}),
                ("value with LF", {**ok, "headers": {"X-A": "1\nX-Injected: 1"}}),
                ("value with CR", {**ok, "headers": {"X-A": "1\rX-Injected: 1"}}),
                ("value with NUL", {**ok, "headers": {"X-A": "1\x00"}}),
                ("value with a control character", {**ok, "headers": {"X-A": "a\x01b"}}),
                ("value with DEL", {**ok, "headers": {"X-A": "a\x7fb"}}),
                ("value non-latin-1", {**ok, "headers": {"X-A": "snow \u2603"}}),
                ("value with U+2028", {**ok, "headers": {"X-A": "a\u2028b"}}),
                ("value with U+0085", {**ok, "headers": {"X-A": "a\x85b"}}),
            ]
            bodies += [(name, json.dumps(value).encode(), {400}) for name, value in fields]
            baseline = in_use(gw)
            for name, data, allowed in bodies:
                before = len(paths(seen))
                status, out, closed = await invoke_raw(gw.port, sk, "svc-a", data)
                if status not in allowed:
                    failures.append(f"{name}: {status} {out}")
                elif not (isinstance(out, dict) and set(out.get("error", {})) == {"code", "message"}):
                    failures.append(f"{name}: {status} without a JSON error: {out}")
                if len(paths(seen)) != before:
                    failures.append(f"{name}: the target got {paths(seen)[before:]}")
                # The gateway goes on serving (the same connection pool, the same target).
                status, out = await invoke(gw, sk, "svc-a", method="GET", path=f"/after/{name.replace(' ', '-')}")
                if status != 200 or out["status_code"] != 200:
                    failures.append(f"{name}: the next invoke got {status} {out}")
            failures.extend(await leaked(gw, baseline))
            for s in seen:
                for method, tgt, _headers, _ in s.requests:
                    if not tgt.startswith(b"/after/"):
                        failures.append(f"the target got {method} {tgt}")

    run(body, timeout=60)
    assert not failures, "\n".join(failures)


def test_invoke_strips_hop_by_hop_headers_and_frames_the_body_itself(tmp_path):
    """Hop-by-hop headers in ``headers`` (any case, repeated in other spellings) are
    dropped (a body that looks like a request stays a body), ``Content-Length`` is the
    gateway's own, ``Host`` is the instance's, surrounding whitespace is not part of a
    value; the target gets one well-formed request with exactly the decoded body, and
    end-to-end headers (an application ``Authorization`` included) as given. The
    caller's gateway credential is never among them."""

    def echo_headers(method: bytes, tgt: bytes, data: bytes):
        return 200, [], data

    async def body():
        async with two_teams(tmp_path, echo_headers) as (gw, keys, _, seen, _):
            sk = keys["sk"]
            payload = bytes(range(256)) + b"\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
            hop = {"Host": "evil.example", "Connection": "close, X-Listed", "Upgrade": "websocket",
                   "Transfer-Encoding": "chunked", "TE": "trailers", "Trailer": "X-T", "Keep-Alive": "timeout=1",
                   "Content-Length": "3", "Proxy-Authorization": "Basic eDp5", "Proxy-Connection": "keep-alive",
                   "host": "evil2.example", "HOST": "evil3.example", "cOnTeNt-LeNgTh": "99999",
                   "transfer-encoding": "gzip, chunked", "x-app": "1", "Authorization": "Bearer app-token",
                   "X-Space": " \t v  w \t "}
            for method in ("POST", "PUT", "PATCH", "GET", "DELETE", "OPTIONS"):
                before = len(paths(seen))
                status, out = await invoke(gw, sk, "svc-a", method=method, path="/h", headers=hop,
                                           body_base64=base64.b64encode(payload).decode())
                assert status == 200 and out["status_code"] == 200, (method, status, out)
                assert base64.b64decode(out["body_base64"]) == payload, method
                requests = [r for s in seen for r in s.requests][before:]
                assert [(r[0], r[1], r[3]) for r in requests] == [(method.encode(), b"/h", payload)], requests
                names = [n.lower() for n, _ in requests[0][2]]
                headers = dict((n.lower(), v) for n, v in requests[0][2])
                assert names.count(b"host") == 1 and headers[b"host"].startswith(b"127.0.0.1:"), requests[0][2]
                assert names.count(b"content-length") == 1 and headers[b"content-length"] == b"%d" % len(payload)
                for gone in (b"connection", b"upgrade", b"transfer-encoding", b"te", b"trailer", b"keep-alive",
                             b"proxy-authorization", b"proxy-connection"):
                    assert gone not in names, (method, gone, requests[0][2])
                assert headers[b"x-app"] == b"1" and headers[b"authorization"] == b"Bearer app-token"
                assert headers[b"x-space"] == b"v  w", requests[0][2]  # surrounding whitespace is not the value
                assert names.count(b"authorization") == 1
            assert not any(b"smuggled" in p for p in paths(seen))
            assert all(s.ending in ("open", "eof") for s in seen), [s.ending for s in seen]
            for s in seen:
                assert sk.encode() not in bytes(s.raw) and keys["dk"].encode() not in bytes(s.raw)

    run(body, timeout=60)


# ----------------------------------------------------------------------------- misbehaving targets


def misbehaving(log: list[str], tag: str = "t", progress: Optional[list[int]] = None):
    """A raw target handler; the last path segment decides the answer: ``garbage`` (not
    HTTP, connection kept open), ``close`` (closed unanswered), ``cut`` (Content-Length
    100000, 1000 bytes, closed), ``hang`` (never answers), ``slowbody`` (Content-Length
    1000000, 1000 bytes, then nothing), ``huge`` (64 MiB as fast as it is taken,
    ``progress[0]`` counts), ``badchunk``, ``twocl`` (two different Content-Lengths),
    ``badstatus``; anything else 200 ``ok:<tag>:<path>`` (keep-alive). ``log`` gets each
    request's path and ``<name>: closed`` when a connection left open ends."""
    block = b"z" * (256 * 1024)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(10_000):
            try:
                line, headers = await read_head(reader)
                await reader.readexactly(int(headers.get("content-length", "0")))
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            path = line.split()[1]
            log.append(path)
            name = path.rsplit("/", 1)[-1]
            if name in ("garbage", "hang", "slowbody", "badchunk", "twocl"):
                writer.write({"garbage": b"SSH-2.0-OpenSSH_9.6\r\nthis is not HTTP\r\n\r\n",
                              "hang": b"",
                              "slowbody": b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"s" * 1000,
                              "badchunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
                              "twocl": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 7\r\n\r\nokxyzzy",
                              }[name])
                await writer.drain()
                with contextlib.suppress(ConnectionError):
                    while await reader.read(65536):
                        pass
                log.append(f"{name}: closed")
                return
            if name == "close":
                return
            if name == "cut":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"c" * 1000)
                await writer.drain()
                return
            if name == "badstatus":
                writer.write(b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n")
            elif name == "huge":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (64 * 1024 * 1024))
                try:
                    for _ in range(256):
                        writer.write(block)
                        await writer.drain()
                        if progress is not None:
                            progress[0] += len(block)
                except ConnectionError:
                    log.append("huge: closed")
                    return
            else:
                data = f"ok:{tag}:{path}".encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
            await writer.drain()
    return handler


@contextlib.asynccontextmanager
async def misbehaving_service(tmp_path, log: list[str], progress: Optional[list[int]] = None):
    async with target(misbehaving(log, "t", progress)) as (port, _), gateway_and_team(tmp_path) as (gw, keys):
        async with serving_agent(gw, keys["ak"], "box", f"svc-a=127.0.0.1:{port},health=none"):
            await wait_status(gw, keys["sk"], "svc-a", "running")
            yield gw, keys


async def bystanders(gw: Any, sk: str, stop: asyncio.Event) -> tuple[int, float, list[str]]:
    """Good requests, proxied and invoked, in a loop until ``stop``: (count, slowest, errors)."""
    count, slowest, errors = 0, 0.0, []
    client = await RawClient.connect(gw.port)
    try:
        for i in range(100_000):
            if stop.is_set():
                break
            started = time.monotonic()
            if i:
                client.next_cycle()
            await client.send(req(PROXY + f"svc-a/ok{i}", auth(sk)))
            head, _, data = await client.response()
            if (head.status_code, data) != (200, f"ok:t:/ok{i}".encode()):
                errors.append(f"proxy {i}: {head.status_code} {data[:100]!r}")
            status, out = await invoke(gw, sk, "svc-a", method="GET", path=f"/iok{i}")
            if status != 200 or base64.b64decode(out["body_base64"]) != f"ok:t:/iok{i}".encode():
                errors.append(f"invoke {i}: {status} {out}")
            slowest = max(slowest, time.monotonic() - started)
            count += 1
            await asyncio.sleep(0.02)
    finally:
        await client.close()
    return count, slowest, errors


def test_a_misbehaving_target_on_the_proxy_path(tmp_path):
    """Garbage, a close before or during the answer, a bad chunk, two Content-Lengths, a
    bad status line: 502 (JSON) while no response has started, an aborted connection
    after (never a truncated body that looks complete); the target's connection is
    released, other clients are served throughout, and the open streams go back to where
    they were. (A target that never answers: the next test.)"""
    log: list[str] = []
    failures: list[str] = []

    async def body():
        async with misbehaving_service(tmp_path, log) as (gw, keys):
            sk = keys["sk"]
            baseline = in_use(gw)
            stop = asyncio.Event()
            others = asyncio.ensure_future(bystanders(gw, sk, stop))
            for name in ("garbage", "close", "badstatus", "twocl"):
                raw, eof = await exchange(gw.port, req(PROXY + f"svc-a/{name}", auth(sk) + "Connection: close\r\n"),
                                          timeout=10)
                if statuses(raw) != [502] or b'"error"' not in raw or not eof:
                    failures.append(f"{name}: {raw[:300]!r}")
            for name, length in (("cut", 100_000), ("badchunk", None)):
                started = time.monotonic()
                raw, eof = await exchange(gw.port, req(PROXY + f"svc-a/{name}", auth(sk)), timeout=10)
                head, _, data = raw.partition(b"\r\n\r\n")
                if statuses(raw) == [502]:
                    continue  # answered before anything was forwarded: fine
                complete = len(data) >= length if length else data.endswith(b"0\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200") or complete or not eof or time.monotonic() - started > 5:
                    failures.append(f"{name}: {raw[:200]!r}... ({len(data)} body bytes) eof {eof}")
            for name in ("garbage", "badchunk", "twocl"):
                if not await settle(lambda name=name: f"{name}: closed" in log, 10):
                    failures.append(f"{name}: the target's connection stayed open")
            stop.set()
            count, slowest, errors = await asyncio.wait_for(others, 20)
            if errors or count < 1 or slowest > 3:
                failures.append(f"bystanders: {count} rounds, slowest {slowest:.2f}s, errors {errors[:5]}")
            failures.extend(await leaked(gw, baseline))

    run(body, timeout=60)
    assert not failures, "\n".join(failures)


def test_a_client_that_leaves_a_silent_target_releases_the_stream(tmp_path):
    """The target never answers, or stops mid-body; the client waits 1 s and closes its
    connection. The stream and the target's connection must be released within 5 s."""
    log: list[str] = []

    async def body():
        async with misbehaving_service(tmp_path, log) as (gw, keys):
            sk = keys["sk"]
            baseline = in_use(gw)
            for name in ("hang", "slowbody"):
                client = await RawClient.connect(gw.port)
                await client.send(req(PROXY + f"svc-a/{name}", auth(sk)))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        while await client.reader.read(65536):
                            pass
                await client.close()
            # The gateway's stream goes first; the target sees its connection end a moment
            # later (agent -> target), so the bounded wait covers both.
            released = await settle(lambda: in_use(gw) == baseline and "hang: closed" in log
                                    and "slowbody: closed" in log, 5)
            assert released and "hang: closed" in log and "slowbody: closed" in log, (in_use(gw), log)

    run(body, timeout=30)


def test_a_misbehaving_target_on_invoke(tmp_path, monkeypatch):
    """The same targets through invoke: 502 JSON errors (``bad_upstream_response``,
    ``tunnel_error``, ``upstream_timeout`` past the exchange limit, ``response_too_large``
    past the buffering limit, the body read no further), each request sent once, the
    stream dropped (never back in the pool), others served throughout, no leak."""
    monkeypatch.setattr("relay.gateway.api.invoke.INVOKE_TIMEOUT", 1.5)
    monkeypatch.setattr("relay.gateway.api.invoke.MAX_RESPONSE", 1024 * 1024)
    log: list[str] = []
    progress = [0]
    failures: list[str] = []

    async def body():
        async with misbehaving_service(tmp_path, log, progress) as (gw, keys):
            sk = keys["sk"]
            stop = asyncio.Event()
            others = asyncio.ensure_future(bystanders(gw, sk, stop))
            await asyncio.sleep(0.2)
            cases = [("garbage", "bad_upstream_response"), ("close", "tunnel_error"),
                     ("badstatus", "bad_upstream_response"), ("twocl", "bad_upstream_response"),
                     ("cut", ("tunnel_error", "bad_upstream_response")), ("slowbody", "upstream_timeout"),
                     ("badchunk", "bad_upstream_response"), ("hang", "upstream_timeout"),
                     ("huge", "response_too_large")]
            for method in ("POST", "GET"):
                for name, code in cases:
                    before = log.count(f"/{method}/{name}")
                    started = time.monotonic()
                    status, out = await invoke(gw, sk, "svc-a", method=method, path=f"/{method}/{name}")
                    took = time.monotonic() - started
                    sent = log.count(f"/{method}/{name}") - before
                    codes = code if isinstance(code, tuple) else (code,)
                    if status != 502 or out["error"]["code"] not in codes or took > 5:
                        failures.append(f"{method} {name}: {status} {out} after {took:.1f}s")
                    # Sent once (a GET may be sent again once on a fresh stream when a
                    # reused keep-alive stream failed: it could have been a stale one).
                    if sent != 1 and not (method == "GET" and sent == 2):
                        failures.append(f"{method} {name}: the target got it {sent} times")
            for name in ("garbage", "hang", "slowbody", "badchunk", "twocl", "huge"):
                if not await settle(lambda name=name: f"{name}: closed" in log, 10):
                    failures.append(f"{name}: a target connection stayed open ({log.count(name + ': closed')})")
            if progress[0] > 40 * 1024 * 1024:
                failures.append(f"huge: the target wrote {progress[0]} bytes before it was stopped")
            stop.set()
            count, slowest, errors = await asyncio.wait_for(others, 20)
            if errors or count < 1 or slowest > 3:
                failures.append(f"bystanders: {count} rounds, slowest {slowest:.2f}s, errors {errors[:5]}")
            # Only the bystanders' streams may be left, idle in the pool.
            if not await settle(lambda: in_use(gw) == 0):
                failures.append(f"open streams in use {in_use(gw)} (pooled {pooled(gw)})")

    run(body, timeout=80)
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- an agent vanishing


def test_an_agent_vanishing_mid_request_and_the_next_request_goes_to_a_healthy_one(tmp_path):
    """Three agents serve one slug. The agent carrying a request whose answer has not
    started (proxy), one whose body is half sent (proxy) and one carrying an invoke each
    drop their connection: the client gets a 502 JSON error or an aborted connection
    within seconds (never a truncated body that looks complete), and the next requests,
    both paths, go to the agent left, answered by its own target."""
    logs: list[list[str]] = [[], [], []]
    failures: list[str] = []

    async def body():
        async with contextlib.AsyncExitStack() as stack:
            ports = [(await stack.enter_async_context(target(misbehaving(logs[i], f"t{i}"))))[0] for i in range(3)]
            gw, keys = await stack.enter_async_context(gateway_and_team(tmp_path))
            sk = keys["sk"]
            agents = [await stack.enter_async_context(
                serving_agent(gw, keys["ak"], f"box{i}", f"pool=127.0.0.1:{ports[i]},health=none")) for i in range(3)]
            await wait_status(gw, sk, "pool", "running", instances_online=3, instances_healthy=3)

            async def carrier(path: str) -> int:
                """The index of the agent whose target got ``path``."""
                assert await settle(lambda: any(path in log for log in logs), 10), (path, logs)
                return next(i for i, log in enumerate(logs) if path in log)

            def vanish(i: int) -> None:
                agents[i].backoff_initial = agents[i].backoff_max = 120.0  # no reconnecting in this test
                agents[i].close()

            gone: list[int] = []
            # 1. The answer has not started.
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(req("/api/v1/r/containers/pool/x/hang", auth(sk) + "Connection: close\r\n"))
            victim = await carrier("/x/hang")
            started = time.monotonic()
            vanish(victim)
            gone.append(victim)
            raw, eof = await read_all(reader, timeout=10)
            writer.close()
            took = time.monotonic() - started
            if not (eof or statuses(raw)) or took > 5 or (raw and statuses(raw) != [502]):
                failures.append(f"hang: after {took:.1f}s eof {eof}: {raw[:300]!r}")
            # 2. The body is half sent.
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(req("/api/v1/r/containers/pool/y/slowbody", auth(sk)))
            victim = await carrier("/y/slowbody")
            if victim in gone:
                failures.append(f"slowbody: went to the agent that is gone ({victim})")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            started = time.monotonic()
            vanish(victim)
            gone.append(victim)
            raw, eof = await read_all(reader, timeout=10)
            writer.close()
            took = time.monotonic() - started
            if not head.startswith(b"HTTP/1.1 200") or not eof or len(raw) >= 1_000_000 or took > 5:
                failures.append(f"slowbody: after {took:.1f}s eof {eof}, {len(raw)} body bytes: {head!r}")
            survivor = next(i for i in range(3) if i not in gone)
            # 3. The next requests, both paths, go to the agent left.
            for i in range(4):
                raw, eof = await exchange(gw.port, req(f"/api/v1/r/containers/pool/after{i}",
                                                       auth(sk) + "Connection: close\r\n"), timeout=10)
                if statuses(raw) != [200] or not raw.endswith(f"ok:t{survivor}:/after{i}".encode()):
                    failures.append(f"proxy after{i}: {raw[:300]!r}")
                status, out = await invoke(gw, sk, "pool", method="GET", path=f"/iafter{i}")
                if status != 200 or base64.b64decode(out["body_base64"]) != f"ok:t{survivor}:/iafter{i}".encode():
                    failures.append(f"invoke iafter{i}: {status} {out}")
            # 4. An invoke in flight when its agent (the last one) drops: 502 at once;
            # then no agent is online: 503.
            task = asyncio.ensure_future(invoke(gw, sk, "pool", method="POST", path="/z/hang"))
            await carrier("/z/hang")
            started = time.monotonic()
            vanish(survivor)
            status, out = await asyncio.wait_for(task, 10)
            took = time.monotonic() - started
            if status != 502 or took > 5:
                failures.append(f"invoke hang: {status} {out} after {took:.1f}s")
            status, out = await invoke(gw, sk, "pool", method="GET", path="/none")
            if status != 503 or out["error"]["code"] != "no_online_agent":
                failures.append(f"no agent left: {status} {out}")
            for i, log in enumerate(logs):  # each target's connection went with its agent
                for name in ("hang", "slowbody"):
                    if any(p.endswith(f"/{name}") for p in log) and not await settle(
                            lambda name=name, log=log: f"{name}: closed" in log, 10):
                        failures.append(f"t{i}: the {name} connection stayed open: {log}")

    run(body, timeout=60)
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- one connection, many places


def test_one_connection_across_slugs_invoke_and_the_api_and_a_key_revoked_between_requests(tmp_path):
    """One write: svc-a, svc-c (the same team, another target), invoke of svc-c, the
    gateway's /healthz, an invoke without credentials, svc-a again, invoke of team B's
    slug: answered in order, each by the right party; no request reaches a service it was
    not for. Then on a kept connection a key revoked between two requests: the second is
    refused (401), never forwarded."""

    async def body():
        async with h11_target(tagged(b"C")) as (port_c, seen_c), \
                two_teams(tmp_path) as (gw, keys, keys_b, seen, seen_b):
            sk = keys["sk"]
            async with serving_agent(gw, keys["ak"], "box-c", f"svc-c=127.0.0.1:{port_c},health=none"):
                await wait_status(gw, sk, "svc-c", "running")
                baseline = in_use(gw)

                def invoke_req(slug: str, token: Optional[str], path: str) -> bytes:
                    data = json.dumps({"method": "POST", "path": path,
                                       "body_base64": base64.b64encode(b"payload").decode()}).encode()
                    return req(f"/api/v1/r/invoke/{slug}", (auth(token) if token else "")
                               + f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n", "POST") + data

                wire = [req(PROXY + "svc-a/1", auth(sk)), req(PROXY + "svc-c/2", auth(sk)),
                        invoke_req("svc-c", sk, "/3"), req("/healthz"), invoke_req("svc-a", None, "/4"),
                        req(PROXY + "svc-a/5", auth(keys["dk"])), invoke_req("svc-b", sk, "/6"),
                        req(PROXY + "svc-c/7", auth(sk))]
                client = await RawClient.connect(gw.port)
                await client.send(b"".join(wire))
                got = []
                for i in range(len(wire)):
                    if i:
                        client.next_cycle()
                    head, _, data = await client.response()
                    got.append((head.status_code, data))
                await client.close()
                assert got[0] == (200, b"A GET /1") and got[1] == (200, b"C GET /2"), got
                assert got[2][0] == 200, got[2]
                assert base64.b64decode(json.loads(got[2][1])["body_base64"]) == b"C POST /3 payload"
                assert got[3][0] == 200 and b'"status"' in got[3][1], got[3]
                assert got[4][0] == 401 and b'"error"' in got[4][1], got[4]
                assert got[5] == (200, b"A GET /5"), got[5]
                assert got[6][0] == 404 and b'"error"' in got[6][1], got[6]
                assert got[7] == (200, b"C GET /7"), got[7]
                assert paths(seen) == [b"/1", b"/5"] and paths(seen_c) == [b"/2", b"/3", b"/7"] and not seen_b
                # A key revoked between two requests of one kept connection.
                team = (await gw.store.list_teams())[0].id
                cred, token = await gw.store.create_credential(team, "dk")
                client = await RawClient.connect(gw.port)
                await client.send(req(PROXY + "svc-a/before", auth(token)))
                head, _, data = await client.response()
                assert (head.status_code, data) == (200, b"A GET /before")
                assert await gw.store.revoke_credential(team, cred.id)
                client.next_cycle()
                await client.send(req(PROXY + "svc-a/after", auth(token)))
                head, _, data = await client.response()
                assert head.status_code == 401 and b'"error"' in data, (head, data)
                await client.close()
                assert paths(seen) == [b"/1", b"/5", b"/before"]
                assert not no_credential(seen + seen_c, sk, keys["dk"], token)
                assert await settle(lambda: in_use(gw) == baseline), (in_use(gw), baseline)

    run(body, timeout=60)


# ----------------------------------------------------------------------------- external services' path prefix


def test_dot_segments_cannot_leave_an_external_services_path_prefix(tmp_path):
    """External services on one host with different path prefixes (team A's ext-x on
    /x and ext-y on /y, team B's ext-z on /z): a request to ext-x whose path has dot
    segments (plain, percent-encoded, with a backslash or ``;`` parameters) would reach
    /y or /z on a server that resolves them, so the gateway refuses it (400 JSON) on
    both paths; paths that only look alike (``a..b``, ``...``, a query) go through."""
    failures: list[str] = []

    async def body():
        async with h11_target(tagged(b"H")) as (port, seen), gateway_and_team(tmp_path) as (gw, keys):
            sk = keys["sk"]
            team_b, keys_b = await gw.store.create_team_with_keys("team-b")
            for token, slug, prefix in ((sk, "ext-x", "/x"), (sk, "ext-y", "/y"), (keys_b["sk"], "ext-z", "/z")):
                status, out = await http(gw.port, "POST", "/api/v1/r/containers", token,
                                         {"service_slug": slug, "url": f"http://127.0.0.1:{port}{prefix}"})
                assert status == 201, out
            escaping = ["/../y/secret", "/%2e%2e/y/secret", "/.%2E/y", "/%2E./z/secret", "/./../z", "/..",
                        "/a/../../y", "/..%2fy%2fsecret", "/..%2Fz", "/..;/y/secret", "/..;a=b/y",
                        "/..%5cy", "/.%2e?q=1", "/./"]
            allowed = ["/a..b", "/...", "/..a/b", "/a/.b", "/?next=../../y", "/q?a=/../../z", "/a%2eb",
                       "/.well-known/x"]
            for path in escaping:
                before = len(paths(seen))
                raw, eof = await exchange(gw.port, req(PROXY + "ext-x" + path, auth(sk) + "Connection: close\r\n"),
                                          timeout=10)
                if statuses(raw) != [400] or b'"error"' not in raw or len(paths(seen)) != before:
                    failures.append(f"proxy {path}: {raw[:200]!r}, the target got {paths(seen)[before:]}")
                status, out = await invoke(gw, sk, "ext-x", method="GET", path=path)
                if status != 400 or len(paths(seen)) != before:
                    failures.append(f"invoke {path}: {status} {out}, the target got {paths(seen)[before:]}")
            # A WebSocket handshake (relayed by the service manager itself for external services).
            upgrade = ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                       "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
            for path in ("/../y/ws", "/%2e%2e/z/ws"):
                before = len(seen)
                raw, eof = await exchange(gw.port, req(PROXY + "ext-x" + path, auth(sk) + upgrade), timeout=10)
                if statuses(raw) != [400] or b'"error"' not in raw or len(seen) != before:
                    failures.append(f"upgrade {path}: {raw[:200]!r}, {len(seen) - before} target connections")
            for path in allowed:
                before = len(paths(seen))
                raw, eof = await exchange(gw.port, req(PROXY + "ext-x" + path, auth(sk) + "Connection: close\r\n"),
                                          timeout=10)
                if statuses(raw) != [200] or paths(seen)[before:] != [b"/x" + path.encode()]:
                    failures.append(f"proxy {path}: {raw[:200]!r}, the target got {paths(seen)[before:]}")
                status, out = await invoke(gw, sk, "ext-x", method="GET", path=path)
                if status != 200 or paths(seen)[before + 1:] != [b"/x" + path.encode()]:
                    failures.append(f"invoke {path}: {status} {out}, the target got {paths(seen)[before + 1:]}")
            failures.extend(no_credential(seen, sk, keys_b["sk"]))

    run(body, timeout=60)
    assert not failures, "\n".join(failures)


def test_a_refused_requests_body_is_never_parsed_as_a_request(tmp_path):
    """A request refused by the gateway (no credentials, another team's slug, an agent
    key) whose body is an authenticated request for svc-a (Content-Length, chunked, or
    past the discard limit), first on its connection or pipelined after a good one: the
    refusal is answered, the body is dropped or the connection closed, and the request
    inside the body never reaches the target; the good request after it does, or the
    connection is closed."""
    failures: list[str] = []

    async def body():
        async with two_teams(tmp_path) as (gw, keys, keys_b, seen, seen_b):
            sk = keys["sk"]
            inner = req(PROXY + "svc-a/inside-the-body", auth(sk))
            refusals = [("no credentials", PROXY + "svc-a/refused", "", 401),
                        ("other team's slug", PROXY + "svc-b/refused", auth(sk), 404),
                        ("agent key", PROXY + "svc-a/refused", auth(keys["ak"]), 403),
                        ("unknown slug", PROXY + "svc-q/refused", auth(sk), 404)]
            framings = [("content-length", f"Content-Length: {len(inner)}\r\n", inner),
                        ("chunked", "Transfer-Encoding: chunked\r\n", b"%x\r\n%s\r\n0\r\n\r\n" % (len(inner), inner)),
                        ("large", f"Content-Length: {len(inner) * 4000}\r\n", inner * 4000)]
            baseline = in_use(gw)
            for position in ("first", "pipelined"):
                for name, path, headers, status in refusals:
                    for framing, header, data in framings:
                        label = f"{position} {name} {framing}"
                        before = len(paths(seen))
                        wire = (req(PROXY + "svc-a/pre", auth(sk)) if position == "pipelined" else b"") \
                            + req(path, headers + header, "POST") + data \
                            + req(PROXY + "svc-a/post", auth(sk) + "Connection: close\r\n")
                        raw, eof = await exchange(gw.port, wire, timeout=5)
                        codes = statuses(raw)
                        want = ([200] if position == "pipelined" else []) + [status]
                        got = paths(seen)[before:]
                        if codes[:len(want)] != want or codes[len(want):] not in ([], [200]) or not eof:
                            failures.append(f"{label}: answers {codes}, eof {eof}: {raw[:300]!r}")
                        expected = ([b"/pre"] if position == "pipelined" else []) + \
                            ([b"/post"] if codes[len(want):] == [200] else [])
                        if got != expected:
                            failures.append(f"{label}: the target got {got}, want {expected}")
            if seen_b:
                failures.append(f"team B's target got {paths(seen_b)}")
            failures.extend(await leaked(gw, baseline))

    run(body, timeout=60)
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- many clients


def test_100_concurrent_clients_switching_slugs_and_teams_on_kept_connections(tmp_path):
    """100 keep-alive clients, 10 requests each, alternating between two of team A's
    services (and some with team B's key to team B's service, some invokes): every answer
    is the one for that request, from the right service; no request crosses a slug or a
    team; the open streams go back to where they were."""
    clients, rounds = 100, 10

    async def one(gw: Any, c: int, keys: dict, keys_b: dict) -> int:
        client = await RawClient.connect(gw.port)
        ok, used = 0, False
        try:
            for r in range(rounds):
                kind = (c + r) % 4
                if kind == 3:  # an invoke, on its own connection
                    status, out = await invoke(gw, keys["sk"], "svc-c", method="POST", path=f"/i{c}-{r}",
                                               body_base64=base64.b64encode(b"%d" % r).decode())
                    assert status == 200, out
                    assert base64.b64decode(out["body_base64"]) == b"C POST /i%d-%d %d" % (c, r, r)
                    ok += 1
                    continue
                slug, key, tag = (("svc-a", keys["sk"], b"A"), ("svc-c", keys["dk"], b"C"),
                                  ("svc-b", keys_b["sk"], b"B"))[kind]
                data = b"c%dr%d" % (c, r)
                if used:
                    client.next_cycle(b"POST")
                used = True
                await client.send(req(PROXY + f"{slug}/p{c}-{r}", auth(key) + f"Content-Length: {len(data)}\r\n",
                                      "POST") + data)
                head, _, got = await client.response()
                assert (head.status_code, got) == (200, tag + b" POST /p%d-%d " % (c, r) + data), (c, r, head, got)
                ok += 1
        finally:
            await client.close()
        return ok

    async def body():
        async with h11_target(tagged(b"C")) as (port_c, seen_c), \
                two_teams(tmp_path) as (gw, keys, keys_b, seen, seen_b):
            async with serving_agent(gw, keys["ak"], "box-c", f"svc-c=127.0.0.1:{port_c},health=none"):
                await wait_status(gw, keys["sk"], "svc-c", "running")
                baseline = in_use(gw)
                done = await asyncio.gather(*(one(gw, c, keys, keys_b) for c in range(clients)))
                assert done == [rounds] * clients
                for tag, got in ((b"A", seen), (b"B", seen_b), (b"C", seen_c)):
                    for s in got:
                        assert not s.ending.startswith("error"), (tag, s.ending)
                assert all(p.startswith(b"/p") for p in paths(seen) + paths(seen_b))
                assert len(paths(seen)) + len(paths(seen_b)) + len(paths(seen_c)) == clients * rounds
                assert not no_credential(seen + seen_b + seen_c, keys["sk"], keys["dk"], keys_b["sk"])
                assert await settle(lambda: in_use(gw) == baseline), (in_use(gw), baseline)

    run(body, timeout=90)


# ----------------------------------------------------------------------------- absolute-form (issue 12, finding 3)


def test_absolute_form_is_served_like_origin_form_and_never_spins(tmp_path):
    """``GET http://x/api/v1/r/containers/SLUG/... HTTP/1.1`` (RFC 9112 §3.2.2: a server
    must accept absolute-form) with a runtime dk- key: answered by the container like
    the origin form, on the first request of a connection and on a kept-alive one; the
    target gets the origin-form path. It used to be passed between the HTTP server (which
    routes on the parsed path) and the proxy's resolver (which compared the raw target)
    for ever, with no I/O: 100% of a core, even after the client left."""

    async def body():
        async with two_teams(tmp_path) as (gw, keys, _, seen, seen_b):
            dk = keys["dk"]
            baseline = in_use(gw)
            wire = (f"GET http://x{PROXY}svc-a/v1/models?q=1 HTTP/1.1\r\nHost: x\r\n" + auth(dk)
                    + "\r\n").encode()
            raw, _ = await exchange(gw.port, wire + req(PROXY + "svc-a/second", auth(dk) + "Connection: close\r\n"),
                                    timeout=5)
            assert statuses(raw) == [200, 200], raw[:400]
            assert b"A GET /v1/models?q=1" in raw
            raw, _ = await exchange(gw.port, req(PROXY + "svc-a/first", auth(dk))
                                    + wire.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1),
                                    timeout=5)
            assert statuses(raw) == [200, 200], raw[:400]
            assert paths(seen) == [b"/v1/models?q=1", b"/second", b"/first", b"/v1/models?q=1"]
            # Another team's slug in absolute-form is still that team's 404.
            raw, _ = await exchange(gw.port, f"GET http://x{PROXY}svc-b/x HTTP/1.1\r\nHost: x\r\n"
                                    f"{auth(dk)}Connection: close\r\n\r\n".encode(), timeout=5)
            assert statuses(raw) == [404] and not seen_b
            # A client that sends one and leaves: nothing keeps running.
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(wire)
            await writer.drain()
            writer.close()
            await asyncio.sleep(0.2)
            cpu = time.process_time()
            await asyncio.sleep(1.0)
            assert time.process_time() - cpu < 0.5, "the gateway keeps a core busy"
            assert not await leaked(gw, baseline)

    run(body, timeout=60)


def test_a_raw_route_whose_owner_declines_its_request_answers_404_once(tmp_path):
    """The mechanism under the finding above: whatever a raw route's resolver declines
    of the very request the route gave it is answered (404) by the HTTP server instead
    of being handed over again, so no disagreement between a route and its resolver can
    pass a connection back and forth without I/O. Later requests on the connection are
    routed as usual (the raw route may take them)."""
    from relay.gateway.http.proxy import serve_connection
    from relay.gateway.http.server import HttpProtocol, Router, json_response

    async def body():
        router = Router()
        calls: list[str] = []

        async def ping(request):
            return json_response({"pong": True})

        async def grabby(request):  # takes everything under /raw/, its resolver declines it all
            calls.append(request.path)
            transport, data = request.take_over_raw()
            serve_connection(transport, data, lambda head: None,
                             fallback=lambda declined=False: HttpProtocol(router, declined=declined))

        router.add("GET", "/ping", ping)
        router.add("*", "/raw/{rest:path}", grabby, raw=True)
        server = await asyncio.get_running_loop().create_server(lambda: HttpProtocol(router), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            raw, eof = await exchange(port, b"GET /raw/x HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
            assert statuses(raw) == [404] and eof, raw
            assert calls == ["/raw/x", "/raw/x"]  # taken over once, then answered
            # Kept alive: a served request first, then the raw route's.
            raw, eof = await exchange(port, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"
                                      b"GET /raw/y HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
            assert statuses(raw) == [200, 404], raw
            cpu = time.process_time()
            await asyncio.sleep(0.5)
            assert time.process_time() - cpu < 0.3
        finally:
            server.close()

    run(body, timeout=30)
