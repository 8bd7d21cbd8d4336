"""Regression tests for defects the adversarial tests (test_http_proxy_adversarial.py)
found in the HTTP proxy engine and the gateway's HTTP server; each failed before its fix.
The docstrings describe what went wrong before.
"""
from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.gateway.test_gateway_e2e import run
from tests.http.test_http_proxy_adversarial import (
    get_only_share,
    h11_target,
    path_of,
    read_all,
    read_head,
    req,
    statuses,
    target,
    tunnel_to,
)

pytestmark = pytest.mark.timeout(120)


def test_an_endless_request_trailer_is_bounded(tmp_path):
    """Finding 2: after the last chunk of a chunked upload, a client sends one trailer
    line that never ends. The head is bounded (MAX_HEAD, 431) but trailers are not: the
    gateway keeps reading (16 MiB here, 64 MiB when tried; the test process's RSS grew by
    the same amount), never answers, never closes. Expected: 431/400 and close after at
    most MAX_HEAD-ish bytes of trailer.

    Cause (reading): ``_head_bytes`` only counts while ``_in_head``; httptools joins a
    header value that arrives in pieces in its own buffer until the line ends, so an
    unterminated trailer grows it without limit (``on_header`` ignores trailers, but
    only after httptools has buffered them).
    """
    limit = 16 * 1024 * 1024

    async def body():
        async with h11_target() as (port, _), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(req(base + "t", "Transfer-Encoding: chunked\r\n", "POST") + b"5\r\nhello\r\n0\r\nX-T: ")
            sent = 0
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(30):
                    while sent < limit:
                        writer.write(b"a" * 65536)
                        await writer.drain()
                        sent += 65536
            writer.close()
            # Kernel buffers hold a few MiB at most: the rest was read by the gateway.
            assert sent < limit, f"the gateway read {sent >> 20} MiB of one trailer line"

    run(body, timeout=100)


def test_an_endless_response_head_from_the_target_is_bounded(tmp_path):
    """Finding 3: the target answers with a head that never ends (one header line of
    64 MiB). The gateway keeps acknowledging and buffering it (``_StreamSide._carry`` grows
    by every batch, and httptools' header value buffer too): the target wrote all 64 MiB
    (RSS of the test process +65 MiB), and the client got a 502 only when the target
    closed. Expected: a bound on the response head (like MAX_HEAD for requests): 502 and
    the stream reset after at most a window or so.
    """
    size = 64 * 1024 * 1024
    progress, ended = [0], []

    async def handler(reader, writer):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Long: ")
        try:
            for _ in range(size // 65536):
                writer.write(b"b" * 65536)
                await writer.drain()
                progress[0] += 65536
            ended.append("wrote it all")
        except ConnectionError:
            ended.append("closed")

    async def body():
        async with target(handler) as (port, _), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(req(path_of(tunnel["tunnel_url"]) + "x"))
            raw, _ = await read_all(reader, timeout=30)
            writer.close()
            assert raw.startswith(b"HTTP/1.1 502"), raw[:200]
            assert progress[0] < 16 * 1024 * 1024, f"the gateway took {progress[0] >> 20} MiB of one response head"

    run(body, timeout=100)


def test_a_hand_back_starts_at_its_own_request_not_inside_an_earlier_body(tmp_path):
    """Finding 4 (request smuggling into the gateway's own API): one write carries a
    tunnel POST whose *body* is ``GET /healthz ...`` + ``GET /api/v1/openapi.json ...`` +
    ``DELETE /tunnel/{token}/smuggled ...``, then a real ``GET /healthz`` (the resolver
    hands the connection back to the gateway's HTTP server), then a tunnel GET. The POST and its body go to the target correctly,
    but the gateway then also runs the three requests inside that body: the client gets
    6 responses for 3 requests (an openapi.json it never asked for), the target gets the
    smuggled ``DELETE /smuggled``, and every later response on the connection is off by
    three (response-queue poisoning behind any shared front proxy): bytes that were body
    data were run as requests, by the gateway's API and by the target.

    Cause (reading): ``ProxyConnection._hand_back`` finds where the handed-back request
    starts with ``raw.find(method + b" " + target + b" ")`` in ``self._raw``, which
    ``on_message_begin`` starts with the whole current read (``[self._chunk]``), including
    the earlier requests and bodies in it; the first match is inside the POST's body.
    Expected: the hand-back starts at the handed-back request's own first byte (track its
    offset in the read instead of searching for its request line).
    """
    async def body():
        async with h11_target() as (port, seen), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            inner = (b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /api/v1/openapi.json HTTP/1.1\r\nHost: t\r\n\r\n"
                     + f"DELETE {base}smuggled HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(req(base + "a", f"Content-Length: {len(inner)}\r\n", "POST") + inner
                         + req("/healthz") + req(base + "c"))
            raw, _ = await read_all(reader, timeout=4)  # keep-alive: whatever came in 4 s
            writer.close()
            assert [(r[0], r[1]) for s in seen for r in s.requests] == [(b"POST", b"/a"), (b"GET", b"/c")]
            assert b"openapi" not in raw, "a request inside a forwarded body was executed"
            assert statuses(raw) == [200, 200, 200], statuses(raw)

    run(body, timeout=60)


def test_a_share_refusal_before_pipelined_requests_says_connection_close(tmp_path):
    """Finding 5 (minor): on a GET-only share link, ``GET a`` + ``POST b`` (refused, even
    with ``Content-Length: 0``) + ``GET c`` in one write: the client gets 200 and 405,
    then the connection is closed; ``GET c`` is dropped, and the 405 carries no
    ``Connection: close`` to say so (the proxy's own refusals in the same position keep
    the connection, discarding up to DISCARD_LIMIT of body). Expected: ``c`` answered, or
    ``Connection: close`` on the 405.
    """
    from tests.gateway.test_gateway_e2e import gateway_and_team, running_agent

    async def body():
        async with h11_target() as (port, seen), gateway_and_team(tmp_path) as (gw, keys):
            async with running_agent(gw, keys["ak"], name="web-box") as agent:
                prefix = await get_only_share(gw, keys["sk"], agent.agent_id, port)
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                writer.write(req(prefix + "a") + req(prefix + "b", "Content-Length: 0\r\n", "POST") + req(prefix + "c"))
                raw, eof = await read_all(reader, timeout=4)
                writer.close()
                got = statuses(raw)
                assert got == [200, 405, 200] or (got == [200, 405] and b"connection: close" in raw.lower()), \
                    (got, eof, raw[-250:])

    run(body, timeout=60)


@pytest.mark.parametrize("where", ["api", "tunnel", "tunnel, second request"])
def test_a_folded_header_line_is_a_400_on_every_path(tmp_path, where):
    """Found by tests/http/test_service_proxy_adversarial.py: the first request on a
    connection is parsed by the gateway's HTTP server (h11), which joins an obs-fold
    continuation into the previous header's value; the proxy engine (llhttp) refuses the
    same bytes with 400 on later requests. So ``X-A: 1\\r\\n Authorization: Bearer sk-...``
    on a first request reached the target as one X-A header carrying the key. Expected:
    400 and close, whichever request on the connection, and nothing reaches the target."""
    folded = "X-A: 1\r\n X-Folded: yes\r\n"

    async def body():
        async with h11_target() as (port, seen), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            if where == "api":
                wire = req("/healthz", folded)
            elif where == "tunnel":
                wire = req(base + "folded", folded)
            else:
                wire = req(base + "fine") + req(base + "folded", folded)
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(wire)
            async with asyncio.timeout(20):
                raw = await reader.read(-1)  # the gateway closes after the 400
            writer.close()
            codes = statuses(raw)
            assert codes[-1] == 400, raw[:300]
            targets = [request[1] for record in seen for request in record.requests]
            assert not any(b"folded" in t for t in targets), targets
            if where == "tunnel, second request":
                assert codes == [200, 400] and len(targets) == 1, (codes, targets)

    run(body, timeout=60)


def test_a_half_closed_client_gets_a_slow_answer_while_the_target_makes_progress(tmp_path, monkeypatch):
    """Since a client's EOF with an answer outstanding is given up after EOF_PATIENCE of
    target silence (found by tests/http/test_service_proxy_adversarial.py: a client that left
    a hung target held the stream and both connections for ever), a half-closed client
    must still get an answer whose pieces come slower than the client's EOF but never
    pause for EOF_PATIENCE; a silent target is given up."""
    monkeypatch.setattr("relay.gateway.http.proxy.EOF_PATIENCE", 0.5)
    pieces = 6

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if b"/silent" in head:
            await reader.read()  # never answers; ends when the gateway gives up
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % pieces)
        for _ in range(pieces):  # 6 x 0.3 s: 1.8 s in all, never 0.5 s without a byte
            await asyncio.sleep(0.3)
            writer.write(b"x")
            await writer.drain()
        await reader.read()

    async def body():
        async with target(slow) as (port, _), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(req(base + "slow"))
            writer.write_eof()
            raw, eof = await read_all(reader, timeout=15)
            writer.close()
            assert eof and statuses(raw) == [200] and raw.endswith(b"\r\n\r\n" + b"x" * pieces), raw
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(req(base + "silent"))
            writer.write_eof()
            async with asyncio.timeout(10):
                rest = await reader.read()  # ends: the gateway gave up after EOF_PATIENCE
            writer.close()
            assert b"200" not in rest

    run(body, timeout=60)
