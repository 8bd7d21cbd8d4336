"""Bad clients and bad targets against the HTTP proxy engine, through real sockets.

An independent adversarial pass over relay/gateway/http/proxy.py: in-process gateway +
agent on one uvloop loop (the fixtures of tests/http/test_http_tunnel.py), HTTP tunnels to
targets on 127.0.0.1 whose every byte a test decides, and clients that write raw bytes.
Each test checks what reaches the target (a request is forwarded whole and well formed,
or not at all: never a second, smuggled one), what reaches the client (in order,
complete, or the connection aborted), and that nothing is left behind (the agent
sessions' open streams go back to where they started). Every wait is bounded.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import h11
import psutil
import pytest

from tests.gateway.test_gateway_e2e import run
from tests.http.test_http_proxy_engine import RawClient, read_head, req, target
from tests.http.test_http_tunnel import open_http_tunnel, path_of, tunnel_to

pytestmark = pytest.mark.timeout(180)


# ----------------------------------------------------------------------------- helpers


def open_streams(gw: Any) -> int:
    """Open mux streams over all agent sessions of the gateway (what /metrics reports)."""
    return sum(len(a.session.streams) for a in gw.registry.connected())


async def settle(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``check`` until it holds or ``timeout`` passes; returns its last value."""
    for _ in range(int(timeout / 0.02)):
        if check():
            return True
        await asyncio.sleep(0.02)
    return check()


@dataclass
class Seen:
    """What one target connection received, parsed with h11 (a strict parser)."""

    requests: list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]] = field(default_factory=list)
    raw: bytearray = field(default_factory=bytearray)
    ending: str = "open"  # "eof" (clean), "partial" (EOF inside a request), "error: ..." (malformed)


Answer = Callable[[bytes, bytes, bytes], tuple[int, list[tuple[bytes, bytes]], bytes]]


@contextlib.asynccontextmanager
async def h11_target(answer: Optional[Answer] = None):
    """A keep-alive target that parses what it gets with h11 (strict) and answers each
    complete request with ``answer(method, target, body)`` -> (status, headers, body)
    (default: 200 ``ok:<target>``). Yields (port, seen): one :class:`Seen` per accepted
    connection, in order."""
    seen: list[Seen] = []

    def default(method: bytes, tgt: bytes, body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        return 200, [], b"ok:" + tgt

    respond = answer or default

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record = Seen()
        seen.append(record)
        # Heads up to 128 KiB: the tests send 60,000-byte paths, which now arrive in
        # 16 KiB pieces (the initial stream window) rather than in one read, and h11's
        # default refuses a head still incomplete past 16 KiB.
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=128 * 1024)
        current: Optional[h11.Request] = None
        body = b""
        try:
            for _ in range(1_000_000):
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    record.ending = "partial" if "complete" in str(exc) else f"error: {exc}"
                    return
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    record.raw += data
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    current, body = event, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert current is not None
                    record.requests.append((current.method, current.target, list(current.headers), body))
                    status, headers, data = respond(current.method, current.target, body)
                    headers = headers + [(b"content-length", str(len(data)).encode())]
                    out = conn.send(h11.Response(status_code=status, headers=headers))
                    out += conn.send(h11.Data(data=data)) if data and current.method != b"HEAD" else b""
                    out += conn.send(h11.EndOfMessage())
                    writer.write(out)
                    await writer.drain()
                    if conn.our_state is h11.MUST_CLOSE:
                        record.ending = "closed by target"
                        return
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    record.ending = "eof"
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            record.ending = "reset"

    async with target(handler) as (port, _):
        yield port, seen


async def read_all(reader: asyncio.StreamReader, timeout: float = 15.0) -> tuple[bytes, bool]:
    """Everything up to EOF (True) or until ``timeout`` passes (False)."""
    raw = b""
    try:
        async with asyncio.timeout(timeout):
            for _ in range(1_000_000):
                data = await reader.read(65536)
                if not data:
                    return raw, True
                raw += data
    except TimeoutError:
        return raw, False
    except ConnectionError:
        return raw, True
    return raw, False


def statuses(raw: bytes) -> list[int]:
    """Status codes of the responses in ``raw`` (Content-Length framed, as the gateway's
    own answers and these tests' targets are)."""
    found = []
    for _ in range(100_000):
        if not raw.startswith(b"HTTP/1.1 "):
            break
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            break
        found.append(int(head.split(b" ", 2)[1]))
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        raw = rest[length:]
    return found


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: t.test\r\n\r\n"


def bad_requests(base: str) -> list[tuple[str, bytes, set[int]]]:
    """(name, bytes, acceptable statuses) of ambiguous or malformed requests; each carries
    a request for /smuggled where a parser that disagrees would find one. A status of 0
    means "forwarded, answered by the target" is fine too (then the forwarded request must
    be unambiguous)."""
    line = f"POST {base}x HTTP/1.1\r\nHost: t.test\r\n".encode()
    get = f"GET {base}x HTTP/1.1\r\nHost: t.test\r\n".encode()
    return [
        ("cl+te", line + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED, {400}),
        ("te+cl", line + b"Transfer-Encoding: chunked\r\nContent-Length: 45\r\n\r\n0\r\n\r\n" + SMUGGLED, {400}),
        ("two cl", line + b"Content-Length: 0\r\nContent-Length: 40\r\n\r\n" + SMUGGLED, {400, 0}),
        ("cl list", line + b"Content-Length: 0, 40\r\n\r\n" + SMUGGLED, {400}),
        ("cl plus", line + b"Content-Length: +40\r\n\r\n" + SMUGGLED, {400}),
        ("cl space before colon", line + b"Content-Length : 41\r\n\r\n" + SMUGGLED, {400}),
        ("te not chunked", line + b"Transfer-Encoding: gzip\r\n\r\n" + SMUGGLED, {400, 501}),
        ("te chunked, then identity", line + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
         {400, 501}),
        ("te xchunked", line + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED, {400, 501}),
        ("chunk size not hex", line + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
         {400}),
        ("chunk size overflow",
         line + b"Transfer-Encoding: chunked\r\n\r\n10000000000000001\r\nA\r\n0\r\n\r\n" + SMUGGLED, {400}),
        ("chunk without CRLF", line + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n" + SMUGGLED, {400}),
        ("obs-fold", get + b"X-Fold: a\r\n b\r\n\r\n", {400, 0}),
        ("obs-fold on te", line + b"X-A: b\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n" + SMUGGLED, {400, 0}),
        ("bare LF", f"GET {base}x HTTP/1.1\nHost: t.test\nX-A: b\n\n".encode(), {400, 0}),
        ("bare LF in cl", line + b"X-A: b\nContent-Length: 40\r\n\r\n" + SMUGGLED, {400, 0}),
        ("NUL in a header", get + b"X-Nul: a\x00b\r\n\r\n", {400}),
        ("CR in a header", get + b"X-Cr: a\rb\r\n\r\n", {400}),
        ("long request line", f"GET {base}{'a' * 70_000} HTTP/1.1\r\nHost: t.test\r\n\r\n".encode(), {400, 404, 431}),
        ("long head", get + b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 1000) for i in range(80)) + b"\r\n",
         {400, 431}),
    ]


def forwarded_cleanly(name: str, codes: list[int], forwarded: list[tuple]) -> list[str]:
    """For a bad request that was forwarded (a lenient parse RFC 9112 allows: a fold
    replaced by a space, a bare LF taken as a line end): failures unless the target got
    it as one clean request for ``/x`` and whatever followed in the client's bytes was
    the gateway's to answer (its own 404 for /smuggled)."""
    failures = []
    got = [r[1] for r in forwarded]
    if got[-1:] != [b"/x"] or codes[1:] not in ([], [404]):
        failures.append(f"{name}: forwarded as {got}, answers {codes}")
    for hname, value in forwarded[-1][2] if forwarded else ():
        if b"\x00" in value or b"\r" in value or b"\n" in value:
            failures.append(f"{name}: forwarded header {hname!r}: {value!r}")
    return failures


@pytest.mark.parametrize("position", ["first", "pipelined"])
def test_smuggling_shapes_are_refused_or_forwarded_unambiguously(tmp_path, position):
    """Each bad request alone on a connection (first: parsed by the gateway's HTTP server
    before the proxy takes over) or after a good one in the same write (parsed by the
    proxy). The client gets the listed answer and then EOF; the target gets only complete,
    well-formed requests for the tunnel's own paths, never /smuggled."""
    failures: list[str] = []

    async def body():
        async with h11_target() as (port, seen), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            baseline = open_streams(gw)
            for name, bad, allowed in bad_requests(base):
                before = len(seen)
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                good = req(base + "good", "Content-Length: 0\r\n", "OPTIONS")
                writer.write((good if position == "pipelined" else b"") + bad)
                await writer.drain()
                # A refusal closes at once; a forwarded one stays open (keep-alive).
                raw, eof = await read_all(reader, timeout=4)
                writer.close()
                codes = statuses(raw)
                if position == "pipelined":
                    if codes[:1] != [200]:
                        failures.append(f"{name}: the good request first got {codes} {raw[:200]!r}")
                    codes = codes[1:]
                forwarded = [r for s in seen[before:] for r in s.requests]
                got = [r[1] for r in forwarded]
                if b"/smuggled" in got:
                    failures.append(f"{name}: the target got a smuggled request: {got}")
                if 0 in allowed and codes[:1] == [200]:
                    failures.extend(forwarded_cleanly(name, codes, forwarded))
                    continue
                if len(codes) != 1 or codes[0] not in allowed:
                    failures.append(f"{name}: answered {codes} (want one of {sorted(allowed)}): {raw[:300]!r}")
                    continue
                if not eof:
                    failures.append(f"{name}: the connection stayed open after {codes[0]}")
                if codes[0] >= 400 and b'"error"' not in raw.split(b"\r\n\r\n", 2)[-1][:200] and position == "pipelined":
                    failures.append(f"{name}: {codes[0]} without the JSON error body: {raw[:300]!r}")
                expected_paths = [b"/good"] if position == "pipelined" else []
                if got != expected_paths:
                    failures.append(f"{name}: the target got requests {got}, want {expected_paths}")
                for s in seen[before:]:
                    if s.ending.startswith("error"):
                        failures.append(f"{name}: the target got malformed bytes ({s.ending}): {bytes(s.raw)[:300]!r}")
            if not await settle(lambda: open_streams(gw) == baseline):
                failures.append(f"open streams {open_streams(gw)} != baseline {baseline}")

    run(body, timeout=150)
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- pipelining


def echo_answer(method: bytes, tgt: bytes, body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return 200, [], b"%s %s %s" % (method, tgt, hashlib.sha256(body).hexdigest().encode())


def echoed(method: str, path: str, body: bytes = b"") -> bytes:
    return f"{method} {path} {hashlib.sha256(body).hexdigest()}".encode()


async def responses(client: RawClient, count: int) -> list[tuple[int, bytes]]:
    """``count`` pipelined responses (status, body), in the order they come."""
    out = []
    for i in range(count):
        if i:
            client.next_cycle()
        head, _, data = await client.response()
        out.append((head.status_code, data))
    return out


def test_pipelined_requests_with_and_without_bodies_in_one_write(tmp_path):
    async def body():
        async with h11_target(echo_answer) as (port, seen), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            baseline = open_streams(gw)
            big = os.urandom(300_000)  # bigger than the client buffer: reading pauses mid-pipeline
            wire = (req(base + "a")
                    + req(base + "b", "Content-Length: 10\r\n", "POST") + b"0123456789"
                    + req(base + "c?q=1")
                    + req(base + "d", "Transfer-Encoding: chunked\r\n", "PUT")
                    + b"3\r\nabc\r\n4;x=y\r\ndefg\r\n0\r\nX-Trailer: 1\r\n\r\n"
                    + req(base + "e", f"Content-Length: {len(big)}\r\n", "POST") + big
                    + req(base + "f", method="DELETE"))
            for round_ in range(3):
                client = await RawClient.connect(gw.port)
                if round_ == 0:
                    await client.send(wire)
                else:  # the same bytes cut at odd places
                    step = 7 if round_ == 1 else 65_537
                    for i in range(0, len(wire), step):
                        client.writer.write(wire[i:i + step])
                    await client.writer.drain()
                got = await responses(client, 6)
                assert got == [(200, echoed("GET", "/a")), (200, echoed("POST", "/b", b"0123456789")),
                               (200, echoed("GET", "/c?q=1")), (200, echoed("PUT", "/d", b"abcdefg")),
                               (200, echoed("POST", "/e", big)), (200, echoed("DELETE", "/f"))], round_
                await client.close()
            assert all(s.ending in ("open", "eof") for s in seen), [s.ending for s in seen]
            assert await settle(lambda: open_streams(gw) == baseline), (open_streams(gw), baseline)

    run(body, timeout=120)


def test_pipeline_across_tunnels_and_into_the_gateways_own_api(tmp_path):
    """One connection, one write: tunnel A, tunnel B (another agent's), the gateway's own
    /healthz (the resolver hands the connection back), tunnel A again, and an unknown
    tunnel token (the gateway's 404); answered in order, each by the right party."""

    def tagged(tag: bytes):
        def answer(method: bytes, tgt: bytes, body: bytes):
            return 200, [], tag + b" " + tgt
        return answer

    async def body():
        async with h11_target(tagged(b"A")) as (port_a, seen_a), h11_target(tagged(b"B")) as (port_b, seen_b), \
                tunnel_to(tmp_path, port_a) as (gw, keys, _, tunnel_a):
            from tests.gateway.test_gateway_e2e import running_agent
            async with running_agent(gw, keys["ak"], name="second-box") as agent_b:
                tunnel_b = await open_http_tunnel(gw, keys["sk"], agent_b.agent_id, port_b)
                a, b = path_of(tunnel_a["tunnel_url"]), path_of(tunnel_b["tunnel_url"])
                assert a != b
                baseline = open_streams(gw)
                for order in range(2):
                    client = await RawClient.connect(gw.port)
                    wire = [req(a + "1"), req(b + "2"), req("/healthz"), req(a + "3"),
                            req("/tunnel/" + "x" * 43 + "/4"), req(b + "5", "Content-Length: 3\r\n", "POST") + b"abc"]
                    if order:
                        wire.insert(0, req("/healthz"))  # the API first, then the tunnels
                    await client.send(b"".join(wire))
                    got = await responses(client, len(wire))
                    if order:
                        assert got[0][0] == 200 and b'"status"' in got[0][1], got[0]
                        got = got[1:]
                    assert got[0] == (200, b"A /1") and got[1] == (200, b"B /2"), got
                    assert got[2][0] == 200 and b'"status"' in got[2][1], got[2]
                    assert got[3] == (200, b"A /3"), got
                    assert got[4][0] == 404 and b'"error"' in got[4][1], got[4]
                    assert got[5] == (200, b"B /5"), got
                    await client.close()
                assert [r[1] for s in seen_a for r in s.requests] == [b"/1", b"/3"] * 2
                assert [r[1] for s in seen_b for r in s.requests] == [b"/2", b"/5"] * 2
                assert await settle(lambda: open_streams(gw) == baseline), (open_streams(gw), baseline)

    run(body, timeout=120)


# ----------------------------------------------------------------------------- slow and stalled clients


async def ask(port: int, path: str, count: int = 1) -> list[tuple[int, bytes]]:
    """``count`` keep-alive GETs on one fresh connection, each bounded (RawClient)."""
    client = await RawClient.connect(port)
    out = []
    try:
        for i in range(count):
            if i:
                client.next_cycle()
            await client.send(req(path))
            head, _, data = await client.response()
            out.append((head.status_code, data))
    finally:
        await client.close()
    return out


def big_or_small(progress: list[int], ended: list[str], size: int, piece: int = 256 * 1024):
    """A raw target handler: ``GET .../big`` -> ``size`` bytes written as fast as the
    connection takes them (``progress[0]`` counts them; ``ended`` gets how the writing
    ended), anything else -> 200 ``ok`` (keep-alive)."""
    block = os.urandom(piece)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(1000):
            line, _ = await read_head(reader)
            if not line.split()[1].endswith(b"big".decode()):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            try:
                for _ in range(size // piece):
                    writer.write(block)
                    await writer.drain()
                    progress[0] += piece
            except ConnectionError as exc:
                ended.append(f"closed: {type(exc).__name__}")
                raise
            ended.append("complete")
    return handler


def test_a_client_that_never_reads_a_128_mib_response_holds_little_and_blocks_nobody(tmp_path):
    """What the target can write before everything between stops it is bounded by the
    mux window and the kernel buffers of the hops (the agent's receive buffer may
    autotune to several MiB; measured 12-18 MiB here), not by the response (128 MiB)."""
    size = 128 * 1024 * 1024
    progress, ended = [0], []

    async def body():
        async with target(big_or_small(progress, ended, size)) as (port, _), \
                tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            baseline = open_streams(gw)
            me = psutil.Process()
            rss0 = me.memory_info().rss
            sock = socket.socket()
            # A small fixed receive buffer: the client's own kernel buffer is not what
            # is measured (and does not autotune).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
            stalled = RawClient(*await asyncio.open_connection(sock=sock))
            await stalled.send(req(base + "big"))  # ... and never read
            # Wait until the target can write no more (everything between is full).
            last = -1
            for _ in range(100):
                await asyncio.sleep(0.3)
                if progress[0] == last and progress[0] > 0:
                    break
                last = progress[0]
            held = progress[0]
            grown = me.memory_info().rss - rss0
            # What left the target sits in kernel buffers, the agent, the mux window and
            # the gateway: a few MiB, not the response.
            assert held < 40 * 1024 * 1024, held
            assert grown < 48 * 1024 * 1024, grown
            # The same tunnel (same agent session) still answers others.
            others = await asyncio.gather(*(ask(gw.port, base + f"o{i}", 5) for i in range(10)))
            assert all(r == [(200, b"ok")] * 5 for r in others)
            assert progress[0] < 40 * 1024 * 1024 and not ended
            await stalled.close()
            assert await settle(lambda: bool(ended)), "the target's connection stayed open"
            assert ended[0].startswith("closed"), ended
            assert await settle(lambda: open_streams(gw) == baseline), (open_streams(gw), baseline)

    run(body, timeout=120)


def test_slowloris_heads_do_not_block_other_clients(tmp_path):
    async def body():
        async with h11_target() as (port, seen), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            slow_heads = [req(base + f"slow{i}", "X-Pad: " + "p" * 60 + "\r\n") for i in range(20)]

            async def slowloris(head: bytes) -> tuple[int, bytes]:
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                try:
                    for i in range(len(head)):  # ~150 bytes, one per 40 ms: ~6 s
                        writer.write(head[i:i + 1])
                        await writer.drain()
                        if i == len(head) - 1:
                            break
                        await asyncio.sleep(0.04)
                    client = RawClient(reader, writer)
                    head_, _, data = await client.response()
                    return head_.status_code, data
                finally:
                    writer.close()

            slow = [asyncio.ensure_future(slowloris(h)) for h in slow_heads]
            await asyncio.sleep(0.3)  # every slow head has begun
            fast = await ask(gw.port, base + "fast", 30)
            # Answered while every slow head was still arriving.
            assert not any(t.done() for t in slow), "a slow client finished before the fast one"
            assert fast == [(200, b"ok:/fast")] * 30
            results = await asyncio.gather(*slow)
            assert results == [(200, b"ok:/slow%d" % i) for i in range(20)]

    run(body, timeout=120)


def test_client_gone_mid_response_closes_the_stream_and_the_targets_connection(tmp_path):
    progress, ended = [0], []

    async def body():
        async with target(big_or_small(progress, ended, 32 * 1024 * 1024)) as (port, _), \
                tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            baseline = open_streams(gw)
            for round_ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                writer.write(req(base + "big"))
                got = 0
                async with asyncio.timeout(20):
                    while got < 1024 * 1024:
                        data = await reader.read(65536)
                        assert data
                        got += len(data)
                if round_ == 2:  # an abortive close (RST) too
                    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                               struct.pack("ii", 1, 0))
                writer.close()
                assert await settle(lambda round_=round_: len(ended) == round_ + 1), f"round {round_}: target still writing"
                assert ended[round_].startswith("closed"), ended
                assert await settle(lambda baseline=baseline: open_streams(gw) == baseline), (round_, open_streams(gw), baseline)
            assert await ask(gw.port, base + "after") == [(200, b"ok")]

    run(body, timeout=120)


def test_client_gone_mid_request_body_closes_the_stream_and_the_targets_connection(tmp_path):
    received: list[tuple[int, str]] = []

    async def handler(reader, writer):
        _, headers = await read_head(reader)
        got = 0
        try:
            for _ in range(100_000):
                data = await reader.read(65536)
                if not data:
                    received.append((got, "eof"))
                    return
                got += len(data)
        except ConnectionError:
            received.append((got, "reset"))
            raise

    async def body():
        async with target(handler) as (port, _), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            baseline = open_streams(gw)
            for round_, framing in enumerate(("Content-Length: 10485760\r\n", "Transfer-Encoding: chunked\r\n")):
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                piece = os.urandom(200_000)
                writer.write(req(base + "up", framing, "POST"))
                writer.write(piece if "Length" in framing else b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                await asyncio.sleep(0.3)
                writer.close()
                assert await settle(lambda round_=round_: len(received) == round_ + 1), f"{framing}: target still waiting"
                assert received[round_][0] <= 200_100, received  # (chunk lines re-framed)
                assert await settle(lambda: open_streams(gw) == baseline), (framing, open_streams(gw), baseline)

    run(body, timeout=120)


# ----------------------------------------------------------------------------- target misbehaviour


def scripted(*answers: bytes, close_after: bool = False):
    """A raw target handler answering the n-th request head on a connection with
    ``answers[n]`` (bytes as given, whatever they are); closes after the last one if
    ``close_after``, else waits for the client's EOF."""
    async def handler(reader, writer):
        for answer in answers:
            await read_head(reader)
            writer.write(answer)
            await writer.drain()
        if not close_after:
            await reader.read()
    return handler


def test_target_closing_mid_body_aborts_the_client_connection(tmp_path):
    partial = os.urandom(50_000)
    cases = [
        ("content-length", b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + partial),
        ("chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(partial), partial)),
        ("chunked, cut in a chunk",
         b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s" % (len(partial) * 2, partial)),
    ]

    async def body():
        for name, answer in cases:
            async with target(scripted(answer, close_after=True)) as (port, _), \
                    tunnel_to(tmp_path / name.replace(" ", "_").replace(",", ""), port) as (gw, _, _, tunnel):
                baseline = open_streams(gw)
                client = await RawClient.connect(gw.port)
                await client.send(req(path_of(tunnel["tunnel_url"]) + "x"))
                with pytest.raises(h11.RemoteProtocolError):  # EOF before the body's end: truncated
                    await client.response()
                raw, eof = await read_all(client.reader, timeout=10)
                assert eof, name
                await client.close()
                assert await settle(lambda baseline=baseline: open_streams(gw) == baseline), name

    run(body, timeout=120)


def test_target_garbage_is_a_502_and_the_connection_goes_on(tmp_path):
    async def body():
        for name, answer, close in (("ssh banner", b"SSH-2.0-OpenSSH_9.6\r\n", False),
                                    ("binary", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" * 10, True),
                                    ("bad status line", b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n", False),
                                    ("bad content-length", b"HTTP/1.1 200 OK\r\nContent-Length: x1\r\n\r\n", False),
                                    ("closed at once", b"", True)):
            async with target(scripted(answer, close_after=close)) \
                    as (port, _), tunnel_to(tmp_path / name.replace(" ", "_"), port) as (gw, _, _, tunnel):
                base = path_of(tunnel["tunnel_url"])
                baseline = open_streams(gw)
                client = await RawClient.connect(gw.port)
                await client.send(req(base + "x"))
                head, headers, data = await client.response()
                assert head.status_code == 502, (name, head, data)
                assert headers[b"content-type"] == b"application/json" and b'"error"' in data, (name, data)
                # The client's connection survives the target's failure (and the next
                # request, on a new stream, gets the same answer).
                client.next_cycle()
                await client.send(req(base + "y"))
                head, _, data = await client.response()
                assert head.status_code == 502 and b'"error"' in data, (name, head, data)
                await client.close()
                assert await settle(lambda baseline=baseline: open_streams(gw) == baseline), name

    run(body, timeout=150)


def test_close_delimited_response_is_relayed_whole(tmp_path):
    payload_ = os.urandom(3 * 1024 * 1024 + 17)

    async def handler(reader, writer):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        for i in range(0, len(payload_), 100_000):
            writer.write(payload_[i:i + 100_000])
            await writer.drain()

    async def body():
        async with target(handler) as (port, accepted), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            client = await RawClient.connect(gw.port)
            for i in range(3):
                if i:
                    client.next_cycle()
                await client.send(req(base + "x"))
                head, _, data = await client.response()
                assert head.status_code == 200
                assert hashlib.sha256(data).hexdigest() == hashlib.sha256(payload_).hexdigest(), (i, len(data))
            await client.close()
            assert len(accepted) == 3

    run(body, timeout=120)


def test_interim_and_bodiless_responses_keep_the_framing(tmp_path):
    """103/102 before the final answer; 204 and 304 with a Content-Length (or chunked)
    and no body; HEAD answered with Content-Length and with chunked: none waits for a body,
    and the next answer on the same connections is intact."""
    answers = [
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\nETag: \"e\"\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",  # HEAD
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",  # HEAD
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlast",
    ]
    methods = [b"GET", b"GET", b"GET", b"GET", b"HEAD", b"HEAD", b"GET"]
    expect = [(200, b"ok"), (204, b""), (304, b""), (304, b""), (200, b""), (200, b""), (200, b"last")]

    async def body():
        async with target(scripted(*answers)) as (port, accepted), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            for pipelined in (False, True):
                client = await RawClient.connect(gw.port, method=methods[0])
                got = []
                if pipelined:
                    await client.send(b"".join(req(base + str(i), method=m.decode()) for i, m in enumerate(methods)))
                for i, method in enumerate(methods):
                    if i:
                        client.next_cycle(method)
                    if not pipelined:
                        await client.send(req(base + str(i), method=method.decode()))
                    head, headers, data = await client.response()
                    got.append((head.status_code, data))
                    if i == 4:
                        assert headers[b"content-length"] == b"1000"
                assert got == expect, (pipelined, got)
                await client.close()
            assert len(accepted) == 2  # one target connection per client connection

    run(body, timeout=120)


def test_a_204_followed_by_stray_body_bytes_never_reaches_the_client_as_data(tmp_path):
    async def body():
        async with target(scripted(b"HTTP/1.1 204 No Content\r\n\r\nhello",
                                   b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")) as (port, _), \
                tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            baseline = open_streams(gw)
            client = await RawClient.connect(gw.port)
            await client.send(req(base + "a"))
            head, _, data = await client.response()
            assert head.status_code == 204 and data == b""
            client.next_cycle()
            await client.send(req(base + "b"))
            try:
                head, _, data = await client.response()
                # The stray bytes made the target's stream unusable: a 502, a retry, or 200.
                assert head.status_code in (200, 502) and b"hello" not in data, (head, data)
            except h11.RemoteProtocolError:
                pass  # the connection was closed: acceptable, the bytes were not relayed
            await client.close()
            assert await settle(lambda: open_streams(gw) == baseline)

    run(body, timeout=60)


def test_target_answering_before_reading_the_body(tmp_path):
    upload = os.urandom(4 * 1024 * 1024)

    async def early_close(reader, writer):
        await read_head(reader)
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbig")
        await writer.drain()

    async def early_keep(reader, writer):
        for _ in range(10):
            _, headers = await read_head(reader)
            n = int(headers.get("content-length", "0"))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly")
            await writer.drain()
            data = await reader.readexactly(n)  # read (and check) the body after answering
            assert data == upload[:n]

    async def body():
        for name, handler, status, text in (("close", early_close, 413, b"big"), ("keep", early_keep, 200, b"early")):
            async with target(handler) as (port, _), tunnel_to(tmp_path / name, port) as (gw, _, _, tunnel):
                base = path_of(tunnel["tunnel_url"])
                baseline = open_streams(gw)
                client = await RawClient.connect(gw.port, method=b"POST")
                client.writer.write(req(base + "up", f"Content-Length: {len(upload)}\r\n", "POST"))
                sender = asyncio.ensure_future(_send_quietly(client.writer, upload))
                head, _, data = await client.response()
                assert (head.status_code, data) == (status, text), name
                with contextlib.suppress(ConnectionError):
                    await asyncio.wait_for(sender, 20)
                # Then: another request on the same connection is answered, or the
                # connection is closed (the body could not be delivered) - never a hang.
                client.next_cycle()
                with contextlib.suppress(ConnectionError):
                    await client.send(req(base + "next", "Content-Length: 0\r\n", "POST"))
                try:
                    head, _, data = await client.response()
                    # "close": a new target connection answers the next one the same way.
                    assert (head.status_code, data) == ((200, b"early") if name == "keep" else (413, b"big")), name
                except h11.RemoteProtocolError:
                    assert name == "close", name
                await client.close()
                assert await settle(lambda baseline=baseline: open_streams(gw) == baseline), name

    run(body, timeout=120)


async def _send_quietly(writer: asyncio.StreamWriter, data: bytes) -> None:
    for i in range(0, len(data), 65536):
        writer.write(data[i:i + 65536])
        await writer.drain()


def test_websocket_upgrade_refused_then_another_request(tmp_path):
    upgrade = ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
    refused = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\nno"
    after = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nafter"

    async def body():
        async with target(scripted(refused, after)) as (port, accepted), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            baseline = open_streams(gw)
            for pipelined in (False, True):
                client = await RawClient.connect(gw.port)
                first, second = req(base + "ws", upgrade), req(base + "after")
                await client.send(first + second if pipelined else first)
                head, _, data = await client.response()
                assert (head.status_code, data) == (400, b"no"), pipelined
                client.next_cycle()
                if not pipelined:
                    await client.send(second)
                head, _, data = await client.response()
                assert (head.status_code, data) == (200, b"after"), pipelined
                await client.close()
            assert await settle(lambda: open_streams(gw) == baseline)

    run(body, timeout=60)


# ----------------------------------------------------------------------------- many connections


def pattern(tgt: bytes) -> bytes:
    """A deterministic body of 0..40 KiB for a request-target (checked by sha256)."""
    seed = hashlib.sha256(tgt).digest()
    size = int.from_bytes(seed[:4], "big") % 40_000
    return (seed * (size // 32 + 1))[:size]


def test_200_concurrent_keep_alive_clients_20_requests_each(tmp_path):
    clients, rounds = 200, 20

    def answer(method: bytes, tgt: bytes, body: bytes):
        data = pattern(tgt)
        if method == b"POST":  # the upload's digest, then the pattern
            data = hashlib.sha256(body).hexdigest().encode() + data
        return 200, [], data

    async def one(gw_port: int, base: str, c: int) -> int:
        client = await RawClient.connect(gw_port)
        ok = 0
        try:
            for r in range(rounds):
                path = f"{base}c{c}/r{r}"
                method = "POST" if r % 4 == 3 else "GET"
                if r:
                    client.next_cycle(method.encode())
                upload = os.urandom((c * 131 + r * 17) % 20_000) if method == "POST" else b""
                extra = f"Content-Length: {len(upload)}\r\n" if method == "POST" else ""
                await client.send(req(path, extra, method) + upload)
                head, _, data = await client.response()
                want = pattern(f"/c{c}/r{r}".encode())
                if method == "POST":
                    want = hashlib.sha256(upload).hexdigest().encode() + want
                assert head.status_code == 200, (c, r, head)
                assert hashlib.sha256(data).digest() == hashlib.sha256(want).digest(), (c, r, len(data), len(want))
                ok += 1
        finally:
            await client.close()
        return ok

    async def body():
        async with h11_target(answer) as (port, seen), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            baseline = open_streams(gw)
            done = await asyncio.gather(*(one(gw.port, base, c) for c in range(clients)))
            assert done == [rounds] * clients
            assert sum(len(s.requests) for s in seen) == clients * rounds
            assert len(seen) == clients  # one target connection per client connection, kept
            assert all(not s.ending.startswith("error") for s in seen)
            assert await settle(lambda: open_streams(gw) == baseline), (open_streams(gw), baseline)
            assert await settle(lambda: all(s.ending in ("eof", "reset") for s in seen)), \
                {s.ending for s in seen}

    run(body, timeout=170)



def test_pipelined_requests_and_a_half_closed_client(tmp_path):
    """2000 bodiless requests in one write (~1.2 MiB, far past the client buffer: reading
    pauses and resumes; before c9ae340 a large read that began a head was counted whole
    against MAX_HEAD and this got a false 431 after ~128 KiB), every answer in order; then
    a client that half-closes after its requests still gets the whole answers, then EOF."""
    count = 2000

    async def body():
        async with h11_target() as (port, seen), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            baseline = open_streams(gw)
            client = await RawClient.connect(gw.port)
            wire = b"".join(req(base + f"p{i}", "X-Pad: " + "z" * 500 + "\r\n") for i in range(count))
            sender = asyncio.ensure_future(client.send(wire))
            got = await responses(client, count)
            await asyncio.wait_for(sender, 20)
            assert got == [(200, b"ok:/p%d" % i) for i in range(count)]
            await client.close()
            for half_close in range(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                writer.write(req(base + "last") if not half_close else req(base + "a") + req(base + "b"))
                writer.write_eof()
                raw, eof = await read_all(reader, timeout=15)
                writer.close()
                assert eof, raw
                want = [b"ok:/last"] if not half_close else [b"ok:/a", b"ok:/b"]
                assert statuses(raw) == [200] * len(want) and all(w in raw for w in want), raw
            assert await settle(lambda: open_streams(gw) == baseline), (open_streams(gw), baseline)

    run(body, timeout=150)


def test_pipelined_small_heads_after_a_slow_answer_are_not_a_false_431(tmp_path):
    """2000 small pipelined requests behind a first answer that takes a second: the
    proxy's reads after the pause are large and carry many complete heads before a cut
    one (the shape that got a false 431 before c9ae340); every answer comes, in order."""
    count = 2000

    async def slow_first(reader, writer):
        for i in range(count):
            line, _ = await read_head(reader)
            if i == 0:
                # While the first answer waits, the pipelined requests pile up in the
                # kernel: the proxy's next reads are large (up to its read buffer).
                await asyncio.sleep(1.0)
            data = b"ok:" + line.split()[1].encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
            await writer.drain()

    async def body():
        async with target(slow_first) as (port, _), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            wire = b"".join(req(base + f"p{i}", "X-Pad: " + "z" * 500 + "\r\n") for i in range(count))
            writer.write(wire)
            raw = b""
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    while raw.count(b"HTTP/1.1 ") < count:
                        data = await reader.read(65536)
                        if not data:
                            break
                        raw += data
            writer.close()
            got = statuses(raw)
            assert got == [200] * count, (len(got), got[-3:], raw[-300:])
            assert [int(x.split(b"/p")[1]) for x in re.findall(rb"ok:/p\d+", raw)] == list(range(count))

    run(body, timeout=100)


def test_mid_pipeline_hand_back_with_request_bodies(tmp_path):
    """Between two tunnel requests in one write, an API request with a body (JSON, a body
    that looks like a request, a chunked one, one past the client buffer): the gateway
    answers it itself, its body is never parsed as a request, and the tunnel request after
    it goes to the target with its own body."""

    async def body():
        async with h11_target(echo_answer) as (port, seen), tunnel_to(tmp_path, port) as (gw, keys, agent, tunnel):
            base = path_of(tunnel["tunnel_url"])
            baseline = open_streams(gw)
            opened = json.dumps({"target_port": port, "tunnel_protocol": "http"}).encode()
            apis = [
                (200, (f"POST /api/v1/agents/{agent.agent_id}/tunnel HTTP/1.1\r\nHost: t\r\n"
                       f"Authorization: Bearer {keys['sk']}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(opened)}\r\n\r\n").encode() + opened),
                (405, f"POST /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: {len(SMUGGLED)}\r\n\r\n".encode()
                 + SMUGGLED),
                (405, f"POST /api/v1/agents HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                      f"{len(SMUGGLED):x}\r\n".encode() + SMUGGLED + b"\r\n0\r\n\r\n"),
                (405, b"POST /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 300000\r\n\r\n" + b"x" * 300_000),
            ]
            for status, api in apis:
                client = await RawClient.connect(gw.port)
                await client.send(req(base + "a") + api + req(base + "b", "Content-Length: 3\r\n", "POST") + b"xyz")
                got = await responses(client, 3)
                assert got[0] == (200, echoed("GET", "/a")), got
                assert got[1][0] == status and got[1][1].startswith(b"{"), got[1]
                assert got[2] == (200, echoed("POST", "/b", b"xyz")), got
                await client.close()
            assert [r[1] for s in seen for r in s.requests] == [b"/a", b"/b"] * len(apis)
            assert await settle(lambda: open_streams(gw) == baseline), (open_streams(gw), baseline)

    run(body, timeout=60)


async def get_only_share(gw: Any, sk: str, agent_id: str, port: int) -> str:
    """An http tunnel (Tunnels API) to 127.0.0.1:``port`` through the agent, and a
    GET-only share link on it; returns the link's path prefix (``/s/TOKEN``)."""
    from tests.tunnels.test_tunnels_api import api, create

    tunnel = await create(gw, sk, target=f"127.0.0.1:{port}", agent_id=agent_id, name="web", protocol="http")
    status, _, share = await api(gw, "POST", f"/api/v1/tunnels/{tunnel['id']}/shares", sk,
                                 {"name": "ro", "allowed_methods": ["GET"], "expires_in": "1h"})
    assert status == 201, share
    return "/s/" + share["share_url"].rsplit("/s/", 1)[1]


def test_share_refusals_never_reach_the_target(tmp_path):
    """A GET-only share link: refused POST/PUT (a body that looks like a request, a
    chunked one, one past the discard limit) after an allowed GET in the same write are
    answered 405 and their bodies never parsed as requests nor sent to the target. (What
    comes after a refusal on the same connection: tests/http/test_http_proxy_findings.py.)"""
    from tests.gateway.test_gateway_e2e import gateway_and_team, running_agent

    async def body():
        async with h11_target(echo_answer) as (port, seen), gateway_and_team(tmp_path) as (gw, keys):
            async with running_agent(gw, keys["ak"], name="web-box") as agent:
                prefix = await get_only_share(gw, keys["sk"], agent.agent_id, port)
                baseline = open_streams(gw)
                refused = [req(prefix + "b", f"Content-Length: {len(SMUGGLED)}\r\n", "POST") + SMUGGLED,
                           req(prefix + "d", "Transfer-Encoding: chunked\r\n", "PUT")
                           + b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED),
                           req(prefix + "big", "Content-Length: 10000000\r\n", "POST") + b"x" * 200_000]
                for bad in refused:
                    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                    writer.write(req(prefix + "a") + bad)
                    raw, eof = await read_all(reader, timeout=10)
                    writer.close()
                    assert statuses(raw) == [200, 405] and eof, raw[:300]
                    assert echoed("GET", "/a") in raw and b"Allow: GET" in raw
                assert [r[1] for s in seen for r in s.requests] == [b"/a"] * len(refused)
                assert await settle(lambda: open_streams(gw) == baseline), (open_streams(gw), baseline)

    run(body, timeout=60)
