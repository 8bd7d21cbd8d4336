"""What the proxy remembers between requests gives the answer it would compute afresh.

The engine keeps, per client connection, the last response head it rewrote and the last
request header lines it built, and the tunnel resolver keeps its answers per request
target; each is reused only when everything it depends on is the same. These tests send
repeated and slightly different requests and responses over one connection (real
gateway + agent in process, a scripted target, raw sockets on 127.0.0.1) and check each
answer as if nothing were remembered. Every wait is bounded.
"""
from __future__ import annotations

import asyncio
import json

import pytest

from tests.gateway.test_gateway_e2e import gateway_and_team, http, running_agent, wait_until
from tests.http.test_http_proxy_engine import RawClient, read_head, req, run, target
from tests.http.test_http_tunnel import open_http_tunnel, path_of, tunnel_to

pytestmark = pytest.mark.timeout(120)

LISTED = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nX-Keep: 2\r\nContent-Length: 2\r\n\r\nok"
UNLISTED = b"HTTP/1.1 200 OK\r\nX-Hop: 1\r\nX-Keep: 2\r\nContent-Length: 2\r\n\r\nok"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Keep: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Keep: 2\r\n\r\n"


def test_a_repeated_response_head_is_rewritten_for_each_request(tmp_path):
    # The target answers each request with the response named by its path.
    answers = {"listed": LISTED, "unlisted": UNLISTED, "chunked": CHUNKED,
               "missing": LISTED.replace(b"200 OK", b"404 Not Found"), "created": LISTED.replace(b"200", b"201")}

    async def handler(reader, writer):
        for _ in range(20):
            line, _ = await read_head(reader)
            method, path = line.split()[:2]
            name = path.rsplit("/", 1)[1]
            writer.write(CHUNKED_HEAD if method == "HEAD" else answers[name])
            await writer.drain()

    async def body():
        async with target(handler) as (port, accepted), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            client = await RawClient.connect(gw.port)
            seen = []
            for i, name in enumerate(["listed", "listed", "unlisted", "listed", "created", "missing", "chunked", "chunked"]):
                if i:
                    client.next_cycle()
                await client.send(req(base + name))
                head, headers, data = await client.response()
                seen.append((name, head.status_code, headers, data))
            for name, status, headers, data in seen:
                assert data == b"ok", name
                assert status == {"missing": 404, "created": 201}.get(name, 200)
                assert b"connection" not in headers and headers[b"x-keep"] == b"2"
                # X-Hop is hop-by-hop only where Connection lists it.
                assert (b"x-hop" in headers) == (name == "unlisted"), (name, headers)
                if name == "chunked":  # re-framed for the HTTP/1.1 client
                    assert headers[b"transfer-encoding"] == b"chunked"
                else:
                    assert headers[b"content-length"] == b"2" and b"transfer-encoding" not in headers
            # The same chunked head answering a HEAD: no body, so nothing re-framed.
            client.next_cycle(b"HEAD")
            await client.send(req(base + "chunked", method="HEAD"))
            head, headers, data = await client.response()
            assert head.status_code == 200 and data == b""
            assert b"transfer-encoding" not in headers and b"connection" not in headers
            # And answering an HTTP/1.0 client: the body raw, delimited by the close.
            client.writer.write(f"GET {base}chunked HTTP/1.0\r\n\r\n".encode())
            async with asyncio.timeout(20):
                raw = await client.reader.read()
            head, _, data = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and data == b"ok"
            assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
            assert len(accepted) == 1
            await client.close()

    run(body)


def test_a_repeated_request_head_is_rebuilt_from_what_changed(tmp_path):
    heads: list[tuple[str, dict[str, str]]] = []

    async def handler(reader, writer):
        for _ in range(20):
            heads.append(await read_head(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    async def body():
        async with target(handler) as (port, _), tunnel_to(tmp_path, port) as (gw, keys, agent, tunnel):
            other = await open_http_tunnel(gw, keys["sk"], agent.agent_id, port)
            base, base2 = path_of(tunnel["tunnel_url"]), path_of(other["tunnel_url"])
            listed = "Connection: keep-alive, X-Drop\r\nX-Drop: 1\r\nX-Forwarded-For: 10.0.0.1\r\n"
            unlisted = "X-Drop: 1\r\nX-Forwarded-For: 10.0.0.1\r\n"
            sent = [(base + "a", listed), (base + "a", listed), (base + "b?q=1", listed), (base + "a", unlisted),
                    (base2 + "a", unlisted), (base + "a", unlisted), (base + "a", "")]
            client = await RawClient.connect(gw.port)
            for i, (path, extra) in enumerate(sent):
                if i:
                    client.next_cycle()
                await client.send(req(path, extra))
                head, _, _ = await client.response()
                assert head.status_code == 200
            assert len(heads) == len(sent)
            for (path, extra), (line, headers) in zip(sent, heads, strict=True):
                prefix = base2 if path.startswith(base2) else base
                assert line == f"GET /{path[len(prefix):]} HTTP/1.1"
                assert headers["x-forwarded-prefix"] == prefix.rstrip("/")
                assert headers["host"] == "t.test" and headers["x-forwarded-host"] == "t.test"
                assert "connection" not in headers
                assert ("x-drop" in headers) == (extra == unlisted), (path, extra, headers)
                assert headers["x-forwarded-for"] == ("127.0.0.1" if not extra else "10.0.0.1, 127.0.0.1")
            await client.close()

    run(body)


def test_remembered_answers_end_with_the_tunnel_and_the_agent(tmp_path):
    async def handler(reader, writer):
        for _ in range(50):
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]")
            await writer.drain()

    async def body():
        async with target(handler) as (port, _), gateway_and_team(tmp_path) as (gw, keys):
            async with running_agent(gw, keys["ak"], name="web-box") as agent:
                tunnel = await open_http_tunnel(gw, keys["sk"], agent.agent_id, port)
                closing = await open_http_tunnel(gw, keys["sk"], agent.agent_id, port)
                for t in (tunnel, closing):  # the same request twice: the second is remembered
                    for _ in range(2):
                        status, _ = await http(gw.port, "GET", path_of(t["tunnel_url"]) + "x")
                        assert status == 200
                status, _ = await http(gw.port, "DELETE", path_of(closing["tunnel_url"]).rstrip("/"),
                                       headers={"X-Admin-Token": closing["admin_token"]})
                assert status == 200
                status, body = await http(gw.port, "GET", path_of(closing["tunnel_url"]) + "x")
                assert status == 404 and body["error"]["code"] == "tunnel_not_found"
                # A keep-alive client of the open tunnel, across the agent's departure.
                client = await RawClient.connect(gw.port)
                await client.send(req(path_of(tunnel["tunnel_url"]) + "x"))
                head, _, data = await client.response()
                assert head.status_code == 200 and data == b"[]"
            await wait_until(lambda: not gw.registry.connected())
            for fresh in (False, True):
                if fresh:
                    await client.close()
                    client = await RawClient.connect(gw.port)
                else:
                    client.next_cycle()
                await client.send(req(path_of(tunnel["tunnel_url"]) + "x"))
                head, _, data = await client.response()
                assert head.status_code == 503 and json.loads(data)["error"]["code"] == "agent_offline"
            # The agent back (a new connection): the tunnel works again.
            async with running_agent(gw, keys["ak"], name="web-box"):
                client.next_cycle()
                await client.send(req(path_of(tunnel["tunnel_url"]) + "x"))
                head, _, data = await client.response()
                assert head.status_code == 200 and data == b"[]"
            await client.close()

    run(body)


def test_a_response_head_without_header_lines_keeps_its_reason(tmp_path):
    async def handler(reader, writer):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 Fine Thanks\r\n\r\none")  # the body ends with the connection
        await writer.drain()

    async def body():
        async with target(handler) as (port, accepted), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            for _ in range(2):  # the head built, then remembered
                writer.write(req(path_of(tunnel["tunnel_url"]) + "x"))
                async with asyncio.timeout(20):
                    raw = await reader.readuntil(b"0\r\n\r\n")
                assert raw == b"HTTP/1.1 200 Fine Thanks\r\ntransfer-encoding: chunked\r\n\r\n3\r\none\r\n0\r\n\r\n"
            assert len(accepted) == 2
            writer.close()

    run(body)


def test_long_request_targets_are_answered_but_not_remembered(tmp_path):
    async def handler(reader, writer):
        for _ in range(10):
            line, _ = await read_head(reader)
            body = str(len(line)).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    async def body():
        async with target(handler) as (port, _), tunnel_to(tmp_path, port) as (gw, _, _, tunnel):
            base = path_of(tunnel["tunnel_url"])
            client = await RawClient.connect(gw.port)
            for i, path in enumerate(("short", "long/" + "x" * 4000, "long/" + "x" * 4000 + "?q=" + "y" * 2000)):
                if i:
                    client.next_cycle()
                await client.send(req(base + path))
                head, _, data = await client.response()
                assert head.status_code == 200 and int(data) == len(f"GET /{path} HTTP/1.1")
            tunnels = gw.http_tunnels
            assert [len(t) for _, t in tunnels._answers] == [len(base) + len("short")]
            assert [len(p) for _, p in tunnels._routes] == [len("/short")]
            await client.close()

    run(body)
