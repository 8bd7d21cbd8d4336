"""invoke served by the proxy engine (a raw route, each call a ``Local`` answer) and the
buffered exchange with the container (relay.gateway.http.exchange): the client side
(pipelining, 100-continue, a half-closed client, the body limit) and the shapes of a
container's answer (1xx first, a body framed by closing, HEAD, bytes after the answer).

An in-process gateway and agent on 127.0.0.1; the container is a raw asyncio server
scripted per path, counting its connections.
"""
from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest

from relay.gateway.http.server import MAX_BODY
from tests.gateway.test_gateway_e2e import gateway_and_team, run
from tests.http.test_http_proxy_engine import RawClient
from tests.http.test_invoke import invoke, serving_agent, wait_status

pytestmark = pytest.mark.timeout(120)


class Scripted:
    """A container answering each request by its path (``/cl``: Content-Length, the
    default; ``/continue``: a 100 Continue first; ``/eof``: a body ended by closing;
    ``/trailing``: junk after the answer), counting connections and requests."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[str] = []
        self.port = 0
        self._server: Any = None

    async def start(self) -> "Scripted":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            for _ in range(1000):
                head = await reader.readuntil(b"\r\n\r\n")
                method, target = head.split(b" ", 2)[:2]
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                path = target.decode()
                self.requests.append(f"{method.decode()} {path}")
                text = b"conn=%d %s %s %s" % (number, method, target, body)
                if path == "/eof":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + text)
                    await writer.drain()
                    return
                if path == "/continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Seen: %s\r\n\r\n" % (len(text), target)
                if method != b"HEAD":
                    answer += text
                if path == "/trailing":
                    answer += b"junk that is no response\r\n\r\n"
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def call(path: str, sk: str, method: str = "POST", data: bytes = b"x") -> bytes:
    body = json.dumps({"method": method, "path": path, "body_base64": base64.b64encode(data).decode()}).encode()
    return (f"POST /api/v1/r/invoke/box HTTP/1.1\r\nHost: t.test\r\nAuthorization: Bearer {sk}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def answer_of(data: bytes) -> tuple[int, str]:
    out = json.loads(data)
    return out["status_code"], base64.b64decode(out["body_base64"]).decode()


def with_container(tmp_path, test) -> None:
    async def body() -> None:
        async with gateway_and_team(tmp_path) as (gw, keys):
            container = await Scripted().start()
            try:
                async with serving_agent(gw, keys["ak"], "a", f"box=127.0.0.1:{container.port},health=none"):
                    await wait_status(gw, keys["sk"], "box", "running")
                    await test(gw, keys, container)
            finally:
                await container.close()

    run(body)


def test_pipelined_calls_and_an_api_request_on_one_connection(tmp_path) -> None:
    async def test(gw, keys, container) -> None:
        sk = keys["sk"]
        wire = [call(f"/n{i}", sk) for i in range(10)]
        wire.insert(5, f"GET /api/v1/r/containers/box HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {sk}\r\n\r\n"
                    .encode())
        wire.append(call("/last", "sk-not-a-key"))
        client = await RawClient.connect(gw.port, method=b"POST")
        await client.send(b"".join(wire))
        got = []
        for i in range(len(wire)):
            if i:
                client.next_cycle(b"POST")
            head, _, data = await client.response()
            got.append((head.status_code, data))
        await client.close()
        calls = [answer_of(data) for status, data in got[:5] + got[6:-1]]
        assert calls == [(200, f"conn=1 POST /n{i} x") for i in range(10)], got
        assert got[5][0] == 200 and json.loads(got[5][1])["service_slug"] == "box"
        assert got[-1][0] == 401 and json.loads(got[-1][1])["error"]["code"] == "invalid_credentials"
        assert container.connections == 1

    with_container(tmp_path, test)


def test_100_continue_half_close_and_the_body_limit(tmp_path) -> None:
    async def test(gw, keys, container) -> None:
        sk = keys["sk"]
        # Expect: 100-continue: the gateway says go on, then answers.
        request = call("/expect", sk)
        head, _, body = request.partition(b"\r\n\r\n")
        client = await RawClient.connect(gw.port, method=b"POST")
        await client.send(head + b"\r\nExpect: 100-continue\r\n\r\n")
        async with asyncio.timeout(10):
            assert (await client.reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 ")
        await client.send(body)
        response, _, data = await client.response()
        assert response.status_code == 200 and answer_of(data) == (200, "conn=1 POST /expect x")
        await client.close()
        # A client that half-closes after its request still gets the whole answer.
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(call("/half", sk))
        await writer.drain()
        writer.write_eof()
        async with asyncio.timeout(10):
            raw = await reader.read()
        writer.close()
        assert raw.startswith(b"HTTP/1.1 200 ")
        assert answer_of(raw.partition(b"\r\n\r\n")[2]) == (200, "conn=1 POST /half x")
        # A body over the limit: 413 JSON, the connection closed, nothing forwarded.
        client = await RawClient.connect(gw.port, method=b"POST")
        await client.send(b"POST /api/v1/r/invoke/box HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer %s\r\n"
                          b"Content-Length: %d\r\n\r\n" % (sk.encode(), MAX_BODY + 1) + b"{" * (MAX_BODY + 1))
        response, headers, data = await client.response()
        assert response.status_code == 413 and json.loads(data)["error"]["code"] == "body_too_large"
        assert headers[b"connection"] == b"close" and await client.closed()
        await client.close()
        assert container.requests == ["POST /expect", "POST /half"]

    with_container(tmp_path, test)


def test_the_shapes_of_a_containers_answer(tmp_path) -> None:
    async def test(gw, keys, container) -> None:
        sk = keys["sk"]

        async def one(path: str, method: str = "GET") -> tuple[int, Any]:
            status, out = await invoke(gw, sk, "box", method=method, path=path)
            assert status == 200, out
            return out["status_code"], base64.b64decode(out["body_base64"]).decode(), out["headers"]

        assert await one("/continue") == (200, "conn=1 GET /continue ", {"Content-Length": "21",
                                                                          "X-Seen": "/continue"})
        status, text, headers = await one("/head", "HEAD")
        assert (status, text, headers["X-Seen"]) == (200, "", "/head")
        assert (await one("/again"))[1] == "conn=1 GET /again "  # still the kept connection
        # A body framed by closing: whole, and the stream is not kept.
        assert (await one("/eof"))[:2] == (200, "conn=1 GET /eof ")
        assert (await one("/after-eof"))[1] == "conn=2 GET /after-eof "
        # Bytes after an answer: the answer stands, the stream is dropped.
        assert (await one("/trailing"))[1] == "conn=2 GET /trailing "
        assert (await one("/after-trailing"))[1] == "conn=3 GET /after-trailing "
        assert container.connections == 3

    with_container(tmp_path, test)
