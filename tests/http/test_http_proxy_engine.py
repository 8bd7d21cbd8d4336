"""The HTTP proxy engine's framing and connection handling, through a real HTTP tunnel.

In-process gateway + agent on one uvloop loop; the target is a scripted asyncio TCP
server (so a test decides byte for byte what the target answers and when it closes) and
the client writes raw bytes on a socket and parses what comes back with h11. Covers what
the engine does itself rather than pass through: pipelined requests in order, chunked
uploads, close-delimited responses re-chunked (raw + close for HTTP/1.0), HEAD, 100
Continue, a stale kept stream retried, and the gateway's own 400/431 answers. Every wait
is bounded.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import pytest

from tests.gateway.test_gateway_e2e import run
from tests.http.test_http_tunnel import path_of, tunnel_to

pytestmark = pytest.mark.timeout(120)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def target(handler: Handler):
    """A TCP server on 127.0.0.1 running ``handler`` per connection; yields (port, conns)
    where conns counts the connections accepted."""
    accepted: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()


async def read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    """One request head from the target's side: (request line, lower-case headers)."""
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    for _ in range(10_000):
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers
            return body
        body += await reader.readexactly(size)
        await reader.readexactly(2)
    raise AssertionError("too many chunks")


class RawClient:
    """Raw bytes out, h11-parsed responses in (one connection)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: bytes = b"GET") -> None:
        self.reader, self.writer = reader, writer
        self.conn = h11.Connection(h11.CLIENT)
        # h11 must know what it asked for to frame the answers (HEAD has no body).
        self.conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        self.conn.send(h11.EndOfMessage())

    @classmethod
    async def connect(cls, port: int, method: bytes = b"GET") -> "RawClient":
        return cls(*await asyncio.open_connection("127.0.0.1", port), method=method)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def event(self) -> Any:
        for _ in range(10_000):
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            async with asyncio.timeout(20):
                self.conn.receive_data(await self.reader.read(65536))
        raise AssertionError("no event")

    async def response(self) -> tuple[h11.Response, dict[bytes, bytes], bytes]:
        head = await self.event()
        while isinstance(head, h11.InformationalResponse):
            head = await self.event()
        assert isinstance(head, h11.Response), head
        body = b""
        for _ in range(10_000):
            event = await self.event()
            if isinstance(event, h11.EndOfMessage):
                break
            body += event.data
        headers = {n.lower(): v for n, v in head.headers}
        return head, headers, body

    def next_cycle(self, method: bytes = b"GET") -> None:
        self.conn.start_next_cycle()
        self.conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        self.conn.send(h11.EndOfMessage())

    async def closed(self) -> bool:
        """True when the gateway closes the connection (EOF) within a few seconds."""
        async with asyncio.timeout(10):
            return await self.reader.read(65536) == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def req(path: str, extra: str = "", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: t.test\r\n{extra}\r\n".encode()


def test_pipelined_requests_are_answered_in_order(tmp_path):
    async def handler(reader, writer):
        for _ in range(10):
            line, _ = await read_head(reader)
            body = line.split()[1].encode()
            await asyncio.sleep(0.01)  # the next requests are already waiting at the gateway
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    async def body():
        async with target(handler) as (port, accepted), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            client = await RawClient.connect(gw.port)
            await client.send(req(base + "a") + req(base + "b?x=1") + req(base + "c"))
            seen = []
            for i in range(3):
                if i:
                    client.next_cycle()
                head, _, data = await client.response()
                assert head.status_code == 200
                seen.append(data)
            assert seen == [b"/a", b"/b?x=1", b"/c"]
            assert len(accepted) == 1  # one stream (one target connection) for all three
            await client.close()

    run(body)


def test_chunked_upload_and_close_delimited_response(tmp_path):
    uploads: list[tuple[dict[str, str], bytes]] = []

    async def handler(reader, writer):
        _, headers = await read_head(reader)
        data = await read_chunked(reader)
        uploads.append((headers, data))
        # No Content-Length, no chunking: the body ends when the connection does.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
        for piece in (b"got ", str(len(data)).encode(), b" bytes"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)

    async def body():
        async with target(handler) as (port, accepted), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            client = await RawClient.connect(gw.port)
            for round_ in range(2):  # the client connection outlives the target's
                if round_:
                    client.next_cycle()
                await client.send(req(base + "up", "Transfer-Encoding: chunked\r\n", "POST")
                                  + b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n")
                head, headers, data = await client.response()
                assert head.status_code == 200 and data == b"got 11 bytes"
                assert headers[b"transfer-encoding"] == b"chunked"  # re-framed for HTTP/1.1
                assert b"connection" not in headers
            assert len(accepted) == 2 and [d for _, d in uploads] == [b"hello world"] * 2
            assert uploads[0][0]["transfer-encoding"] == "chunked" and "content-length" not in uploads[0][0]
            await client.close()

    run(body)


def test_http10_client_gets_the_body_delimited_by_close(tmp_path):
    async def handler(reader, writer):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()  # keep-alive on the target side

    async def body():
        async with target(handler) as (port, _), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(f"GET {path_of(tunnel['tunnel_url'])}x HTTP/1.0\r\n\r\n".encode())
            async with asyncio.timeout(20):
                raw = await reader.read()  # up to the gateway's close
            head, _, data = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
            assert data == b"abcdef"
            writer.close()

    run(body)


def test_head_and_no_content_responses_keep_the_connection(tmp_path):
    async def handler(reader, writer):
        for _ in range(10):
            line, _ = await read_head(reader)
            if line.startswith("HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
            elif line.split()[1].endswith("/empty"):
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            await writer.drain()

    async def body():
        async with target(handler) as (port, accepted), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            client = await RawClient.connect(gw.port, method=b"HEAD")
            await client.send(req(base + "x", method="HEAD"))
            head, headers, data = await client.response()
            assert head.status_code == 200 and headers[b"content-length"] == b"5" and data == b""
            client.next_cycle()
            await client.send(req(base + "empty"))
            head, _, data = await client.response()
            assert head.status_code == 204 and data == b""
            client.next_cycle()
            await client.send(req(base + "x"))
            head, _, data = await client.response()
            assert head.status_code == 200 and data == b"hello"
            assert len(accepted) == 1
            await client.close()

    run(body)


def test_expect_100_continue_is_answered_before_the_body(tmp_path):
    async def handler(reader, writer):
        _, headers = await read_head(reader)
        assert "expect" not in headers  # the proxy answered it
        data = await reader.readexactly(int(headers["content-length"]))
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
        await writer.drain()
        await reader.read()

    async def body():
        async with target(handler) as (port, _), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(req(path_of(tunnel["tunnel_url"]) + "up",
                             "Content-Length: 4\r\nExpect: 100-continue\r\n", "PUT"))
            async with asyncio.timeout(20):
                interim = await reader.readuntil(b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100")
            writer.write(b"data")
            client = RawClient(reader, writer, method=b"PUT")
            head, _, data = await client.response()
            assert head.status_code == 201 and data == b"data"
            await client.close()

    run(body)


def test_a_kept_stream_the_target_closed_is_retried(tmp_path):
    async def handler(reader, writer):
        await read_head(reader)
        # Keep-alive as far as the headers go, then close: the next request on the
        # client's connection finds the kept stream ended.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async def body():
        async with target(handler) as (port, accepted), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            client = await RawClient.connect(gw.port)
            for i in range(3):
                if i:
                    client.next_cycle()
                    await asyncio.sleep(0.2)  # let the target's close arrive
                await client.send(req(base + "x"))
                head, _, data = await client.response()
                assert head.status_code == 200 and data == b"ok"
            assert len(accepted) == 3
            await client.close()

    run(body)


def test_malformed_and_oversized_requests_get_the_gateways_answer(tmp_path):
    async def handler(reader, writer):
        for _ in range(10):
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    async def body():
        async with target(handler) as (port, _), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            for bad, status in ((req(base + "x", "Content-Length: 1\r\nTransfer-Encoding: chunked\r\n"), 400),
                                (req(base + "x", "X-Big: " + "a" * 70_000 + "\r\n"), 431)):
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                # The first head goes to the gateway's HTTP server, which hands the
                # connection to the proxy; the bad one comes second, on the proxy.
                writer.write(req(base + "first", "Content-Length: 0\r\n", "OPTIONS"))
                writer.write(bad)
                async with asyncio.timeout(30):
                    raw = await reader.read()
                assert raw.startswith(b"HTTP/1.1 200 OK\r\n")  # the good request first
                last = raw[raw.rindex(b"HTTP/1.1 "):]
                assert last.startswith(b"HTTP/1.1 %d" % status), raw[:300]
                assert b'"code": "bad_request"' in last
                writer.close()

    run(body)


def test_response_heads_in_pieces_interim_responses_and_hop_by_hop_lines(tmp_path):
    first = (b"HTTP/1.1 100 Continue\r\n\r\n"
             b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\nX-Keep: yes\r\n"
             b"Content-Length: 2\r\n\r\nok")
    second = (b"HTTP/1.1 201 Made\r\nKeep-Alive: timeout=5\r\nProxy-Thing: 1\r\nTE: trailers\r\n"
              b"Text-Thing: kept\r\nX-Connection: kept\r\nContent-Length: 0\r\n\r\n")

    async def handler(reader, writer):
        await read_head(reader)
        for i in range(0, len(first), 7):  # the gateway gets the heads cut anywhere
            writer.write(first[i:i + 7])
            await writer.drain()
            await asyncio.sleep(0.005)
        await read_head(reader)
        writer.write(second)
        await writer.drain()
        await reader.read()

    async def body():
        async with target(handler) as (port, accepted), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            client = await RawClient.connect(gw.port)
            await client.send(req(base + "a"))
            head, headers, data = await client.response()
            assert head.status_code == 200 and data == b"ok"
            assert headers[b"x-keep"] == b"yes" and b"x-hop" not in headers and b"connection" not in headers
            client.next_cycle()
            await client.send(req(base + "b"))
            head, headers, data = await client.response()
            assert head.status_code == 201 and head.reason == b"Made" and data == b""
            assert headers[b"text-thing"] == b"kept" and headers[b"x-connection"] == b"kept"
            for gone in (b"keep-alive", b"proxy-thing", b"te"):
                assert gone not in headers
            assert len(accepted) == 1
            await client.close()

    run(body)
