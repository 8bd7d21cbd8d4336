"""HTTP tunnels end to end: ``/tunnel/{token}/...`` through the agent to a real HTTP server.

In-process gateway + agent + upstream (tests/support/webapps.py, or the nginx fixture) on one
uvloop loop, real sockets on 127.0.0.1; real clients (curl, a wsproto WebSocket client,
an h11 keep-alive client). The 200 MiB transfers run the gateway, the agent and the
upstream as separate processes and watch the gateway's memory. Every wait is bounded.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urljoin, urlsplit

import h11
import psutil
import pytest
import wsproto
import wsproto.events as ws_events

from tests.gateway.test_gateway_e2e import gateway_and_team, http, run, run_cmd, running_agent, wait_until
from tests.support.servers import free_port
from tests.support.webapps import WS_GREETING, WebApp, payload, payload_sha256

pytestmark = pytest.mark.timeout(240)

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade"}


# ----------------------------------------------------------------------------- helpers


async def open_http_tunnel(gw, sk: str, agent_id: str, port: int) -> dict[str, Any]:
    status, body = await http(gw.port, "POST", f"/api/v1/agents/{agent_id}/tunnel", sk,
                              {"target_port": port, "tunnel_protocol": "http"})
    assert status == 200, body
    assert body["tunnel_protocol"] == "http" and body["tunnel_url"].endswith("/")
    return body


@contextlib.asynccontextmanager
async def tunnel_to(tmp_path: Path, port: int):
    """Gateway + agent + an http tunnel to 127.0.0.1:port; yields (gw, keys, agent, tunnel)."""
    async with gateway_and_team(tmp_path) as (gw, keys):
        async with running_agent(gw, keys["ak"], name="web-box") as agent:
            tunnel = await open_http_tunnel(gw, keys["sk"], agent.agent_id, port)
            yield gw, keys, agent, tunnel


def path_of(url: str) -> str:
    return urlsplit(url).path


class Client:
    """A keep-alive HTTP/1.1 client on one TCP connection (h11), for tests that need to
    see the connection reused, the bytes as they arrive, or exact headers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> "Client":
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()

    async def _event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            async with asyncio.timeout(20):
                self.conn.receive_data(await self.reader.read(65536))

    async def send(self, method: str, target: str, headers: Optional[list[tuple[str, str]]] = None,
                   body: bytes = b"") -> None:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        hdrs = [("host", "tunnel.test")] + (headers or [])
        if body or method in ("POST", "PUT"):
            hdrs.append(("content-length", str(len(body))))
        self.writer.write(self.conn.send(h11.Request(method=method, target=target, headers=hdrs)))
        if body:
            self.writer.write(self.conn.send(h11.Data(data=body)))
        self.writer.write(self.conn.send(h11.EndOfMessage()))
        await self.writer.drain()

    async def response(self) -> tuple[h11.Response, list[tuple[float, bytes]]]:
        """The response head and its body pieces with their arrival times."""
        head = await self._event()
        assert isinstance(head, h11.Response), head
        pieces = []
        while True:
            event = await self._event()
            if isinstance(event, h11.EndOfMessage):
                return head, pieces
            pieces.append((time.monotonic(), bytes(event.data)))

    async def request(self, method: str, target: str, headers: Optional[list[tuple[str, str]]] = None,
                      body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        await self.send(method, target, headers, body)
        head, pieces = await self.response()
        hdrs = {n.decode().lower(): v.decode("latin-1") for n, v in head.headers}
        return head.status_code, hdrs, b"".join(p for _, p in pieces)


class WsClient:
    """A minimal WebSocket client (wsproto) over asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 ws: wsproto.WSConnection) -> None:
        self.reader, self.writer, self.ws = reader, writer, ws
        self.pending: list[Any] = []

    @classmethod
    async def connect(cls, port: int, path: str) -> "WsClient":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        writer.write(ws.send(ws_events.Request(host=f"127.0.0.1:{port}", target=path)))
        client = cls(reader, writer, ws)
        event = await client.next_event()
        if not isinstance(event, ws_events.AcceptConnection):
            raise ConnectionError(f"WebSocket handshake refused: {event!r}")
        return client

    async def next_event(self) -> Any:
        while not self.pending:
            async with asyncio.timeout(20):
                data = await self.reader.read(65536)
            self.ws.receive_data(data or None)
            self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    async def send(self, message: Any) -> None:
        self.writer.write(self.ws.send(ws_events.Message(data=message)))
        await self.writer.drain()

    async def receive(self) -> Any:
        parts: list[Any] = []
        while True:
            event = await self.next_event()
            if isinstance(event, ws_events.CloseConnection):
                raise ConnectionError(f"closed: {event.code} {event.reason}")
            if isinstance(event, (ws_events.TextMessage, ws_events.BytesMessage)):
                parts.append(event.data)
                if event.message_finished:
                    return "".join(parts) if isinstance(parts[0], str) else b"".join(parts)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(self.ws.send(ws_events.CloseConnection(code=1000)))
        self.writer.close()


async def curl(*args: str, timeout: float = 60.0) -> tuple[int, bytes, bytes]:
    return await run_cmd("curl", "-sS", "--max-time", str(int(timeout)), *args, timeout=timeout + 5)


# ----------------------------------------------------------------------------- tests


def test_methods_keepalive_forwarded_and_hop_by_hop_headers(tmp_path):
    async def main():
        async with WebApp() as app, tunnel_to(tmp_path, app.port) as (gw, keys, agent, tunnel):
            prefix = path_of(tunnel["tunnel_url"])  # /tunnel/TOKEN/
            client = await Client.connect(gw.port)
            body = os.urandom(100_000)
            seen = []
            for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
                status, hdrs, data = await client.request(
                    method, prefix + "echo/x?q=1&r=%2F",
                    headers=[("connection", "keep-alive, x-hop-listed"), ("x-hop-listed", "secret"),
                             ("keep-alive", "timeout=5"), ("te", "trailers"),
                             ("proxy-authorization", "Basic eDp5"), ("x-forwarded-for", "10.1.2.3"),
                             ("x-forwarded-host", "spoofed"), ("x-end-to-end", "yes")],
                    body=body if method in ("POST", "PUT", "PATCH") else b"")
                assert status == 200, data
                echo = json.loads(data)
                seen.append(echo)
                assert echo["method"] == method
                assert echo["target"] == "/echo/x?q=1&r=%2F"  # the prefix is stripped, the rest kept
                if method in ("POST", "PUT", "PATCH"):
                    assert echo["body_length"] == len(body)
                    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
                headers = dict(echo["headers"])
                assert not HOP_BY_HOP & set(headers) and "x-hop-listed" not in headers
                assert headers["x-end-to-end"] == "yes"
                assert headers["host"] == "tunnel.test"  # kept: apps compare it with Origin
                assert headers["x-forwarded-host"] == "tunnel.test"
                assert headers["x-forwarded-proto"] == "http"
                assert headers["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
                assert headers["x-forwarded-prefix"] == prefix.rstrip("/")

            # HEAD: the head of the GET, no body; OPTIONS: the app's own answer.
            status, hdrs, data = await client.request("HEAD", prefix + "download?size=5000")
            assert (status, hdrs["content-length"], data) == (200, "5000", b"")
            status, hdrs, data = await client.request("OPTIONS", prefix + "echo")
            assert status == 204 and "OPTIONS" in hdrs["allow"]
            # Hop-by-hop headers of the response are dropped too; end-to-end ones kept.
            status, hdrs, data = await client.request("GET", prefix + "hop")
            assert (status, data) == (200, b"hop")
            assert hdrs["x-end-to-end"] == "kept"
            assert not {"keep-alive", "proxy-authenticate", "trailer", "x-private-hop"} & set(hdrs)
            # An app-level status passes through untouched.
            status, _, data = await client.request("GET", prefix + "missing")
            assert status == 404 and json.loads(data)["path"] == "/missing"
            await client.close()

            # All of that was one client connection and one connection to the app.
            assert app.connections == 1

            # curl, as a real client, for the same methods.
            url = tunnel["tunnel_url"]
            code, out, err = await curl("-I", url + "download?size=123")
            assert code == 0, err
            assert out.startswith(b"HTTP/1.1 200") and b"content-length: 123" in out.lower()
            code, out, err = await curl("-i", "-X", "OPTIONS", url)
            assert code == 0 and out.startswith(b"HTTP/1.1 204"), (out, err)
            for method in ("POST", "PUT", "DELETE"):
                code, out, err = await curl("-X", method, "--data-binary", "abc", url + "echo")
                assert code == 0, err
                echo = json.loads(out)
                assert (echo["method"], echo["body_length"]) == (method, 3)

    run(main)


def test_nginx_through_the_tunnel(tmp_path, nginx_server):
    async def main():
        async with tunnel_to(tmp_path, nginx_server.port) as (gw, keys, agent, tunnel):
            prefix = path_of(tunnel["tunnel_url"])
            client = await Client.connect(gw.port)
            for path in ("/1k.bin", "/1m.bin", "/1k.bin"):
                status, hdrs, data = await client.request("GET", prefix + path.lstrip("/"))
                assert status == 200
                assert data == nginx_server.content(path)
            status, hdrs, data = await client.request("HEAD", prefix + "1k.bin")
            assert (status, hdrs["content-length"], data) == (200, "1024", b"")
            # nginx's own answers to methods a static location does not take pass through.
            status, _, _ = await client.request("POST", prefix + "1k.bin", body=b"x")
            assert status == 405
            status, _, _ = await client.request("GET", prefix + "nope")
            assert status == 404
            await client.close()

            out_file = tmp_path / "1k.bin"
            code, _, err = await curl("-o", str(out_file), tunnel["tunnel_url"] + "1k.bin")
            assert code == 0, err
            assert out_file.read_bytes() == nginx_server.content("/1k.bin")
            code, out, err = await curl("-I", tunnel["tunnel_url"] + "1k.bin")
            assert code == 0 and out.startswith(b"HTTP/1.1 200") and b"Content-Length: 1024" in out
            code, out, err = await curl("-i", "-X", "OPTIONS", tunnel["tunnel_url"] + "1k.bin")
            assert code == 0 and out.startswith(b"HTTP/1.1 405"), (out, err)

    run(main)


def test_server_sent_events_and_chunks_arrive_as_sent(tmp_path):
    async def main():
        async with WebApp() as app, tunnel_to(tmp_path, app.port) as (gw, keys, agent, tunnel):
            prefix = path_of(tunnel["tunnel_url"])
            client = await Client.connect(gw.port)
            interval = 0.3
            await client.send("GET", prefix + "sse?n=5&interval=%s" % interval,
                              headers=[("accept", "text/event-stream")])
            head = await client._event()
            assert head.status_code == 200
            assert dict(head.headers)[b"content-type"] == b"text/event-stream"
            events: list[tuple[float, dict]] = []  # (arrival wall time, event)
            buffer = b""
            while True:
                event = await client._event()
                if isinstance(event, h11.EndOfMessage):
                    break
                arrived = time.time()
                buffer += event.data
                while b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    data = [line[6:] for line in block.split(b"\n") if line.startswith(b"data: ")]
                    events.append((arrived, json.loads(data[0])))
            assert [e["i"] for _, e in events] == [0, 1, 2, 3, 4]
            last_sent = events[-1][1]["sent"]
            # The first event reached the client long before the server sent the last one...
            assert events[0][0] < last_sent - 3 * interval
            # ...and each one arrived right after it was sent, not batched later.
            for arrived, event in events:
                assert arrived - event["sent"] < interval / 2, (arrived, event)
            gaps = [b[0] - a[0] for a, b in zip(events, events[1:], strict=False)]
            assert all(gap > interval / 2 for gap in gaps), gaps

            # A chunked response: the pieces come one by one too.
            await client.send("GET", prefix + "chunks?n=4&size=1000&interval=0.25")
            head, pieces = await client.response()
            assert head.status_code == 200
            assert b"".join(p for _, p in pieces) == b"".join(bytes([48 + i]) * 1000 for i in range(4))
            assert pieces[-1][0] - pieces[0][0] > 0.5  # spread over time, not one lump
            await client.close()

    run(main)


def test_websocket_echo_through_the_tunnel(tmp_path):
    async def main():
        async with WebApp() as app, tunnel_to(tmp_path, app.port) as (gw, keys, agent, tunnel):
            prefix = path_of(tunnel["tunnel_url"])
            ws = await WsClient.connect(gw.port, prefix + "ws")
            await ws.send(WS_GREETING)
            assert await ws.receive() == "echo: " + WS_GREETING
            big = os.urandom(3 * 1024 * 1024)
            await ws.send(big)
            assert await ws.receive() == big
            for i in range(20):
                await ws.send(f"message {i}")
                assert await ws.receive() == f"echo: message {i}"
            await ws.close()

            # Several at once, and plain requests beside them.
            clients = [await WsClient.connect(gw.port, prefix + "ws") for _ in range(10)]
            for i, c in enumerate(clients):
                await c.send(f"client {i}")
            for i, c in enumerate(clients):
                assert await c.receive() == f"echo: client {i}"
            code, out, _ = await curl(tunnel["tunnel_url"] + "api/info")
            assert json.loads(out)["app"] == "relay-webapp"
            for c in clients:
                await c.close()

    run(main)


def test_relative_links_and_the_missing_slash(tmp_path):
    async def main():
        async with WebApp() as app, tunnel_to(tmp_path, app.port) as (gw, keys, agent, tunnel):
            url = tunnel["tunnel_url"]
            # /tunnel/TOKEN (no slash) redirects to /tunnel/TOKEN/, the query kept.
            code, out, err = await curl("-i", url.rstrip("/") + "?a=1")
            assert code == 0, err
            assert out.startswith(b"HTTP/1.1 308")
            assert re.search(rb"(?im)^location: " + re.escape(path_of(url).encode()) + rb"\?a=1\r$", out)
            code, page, err = await curl("-L", url.rstrip("/"))
            assert code == 0 and b"relay test app" in page

            # Every relative reference of the page, resolved as a browser would, works.
            refs = re.findall(rb'(?:href|src)="([^"]+)"', page)
            assert {b"sub/page.html", b"static/app.js", b"static/style.css"} <= set(refs)
            for ref in refs:
                absolute = urljoin(url, ref.decode())
                assert absolute.startswith(url)
                code, body, err = await curl("-f", absolute)
                assert code == 0, (absolute, err)
                assert body
            code, sub, _ = await curl("-f", urljoin(url, "sub/page.html"))
            back = re.search(rb'href="([^"]+)"', sub).group(1).decode()
            assert urljoin(urljoin(url, "sub/page.html"), back) == url  # ../ leads home

    run(main)


def test_errors_unknown_token_refused_target_and_offline_agent(tmp_path):
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys):
            status, body = await http(gw.port, "GET", "/tunnel/no-such-token/")
            assert status == 404 and body["error"]["code"] == "tunnel_not_found"

            async with running_agent(gw, keys["ak"], name="box") as agent:
                dead_port = free_port()  # nothing listens there
                tunnel = await open_http_tunnel(gw, keys["sk"], agent.agent_id, dead_port)
                prefix = path_of(tunnel["tunnel_url"])
                status, body = await http(gw.port, "GET", prefix + "anything")
                assert status == 502, body
                assert body["error"]["code"] == "target_unreachable"
                assert "CONNECT_FAILED" in body["error"]["message"]
                # POST with a body gets the same, and the connection stays usable.
                client = await Client.connect(gw.port)
                status, _, data = await client.request("POST", prefix + "x", body=b"payload")
                assert status == 502 and json.loads(data)["error"]["code"] == "target_unreachable"
                status, _, data = await client.request("GET", "/healthz")
                assert status == 200
                await client.close()

                # A tcp tunnel's token is not an http tunnel.
                status, tcp = await http(gw.port, "POST", f"/api/v1/agents/{agent.agent_id}/tunnel",
                                         keys["sk"], {"target_port": dead_port, "tunnel_protocol": "tcp"})
                assert status == 200
                status, body = await http(gw.port, "GET", f"/tunnel/{tcp['tunnel_url'].split('/')[-2]}/x")
                assert status == 404

                async with WebApp() as app:
                    live = await open_http_tunnel(gw, keys["sk"], agent.agent_id, app.port)
            # The agent is gone (its tunnels stay open for a grace period): 503.
            await wait_until(lambda: not gw.registry.connected())
            status, body = await http(gw.port, "GET", path_of(live["tunnel_url"]) + "api/info")
            assert status == 503 and body["error"]["code"] == "agent_offline"
            status, body = await http(gw.port, "HEAD", path_of(live["tunnel_url"]))
            assert status == 503 and body is None

    run(main)


def test_a_client_that_stops_reading_stops_the_upstream(tmp_path):
    """Backpressure end to end: while the client reads nothing, the upstream stalls after
    a bounded amount (socket buffers + one stream window), then everything arrives."""
    size = 256 * 1024 * 1024

    async def main():
        async with WebApp() as app, tunnel_to(tmp_path, app.port) as (gw, keys, agent, tunnel):
            client = await Client.connect(gw.port)
            await client.send("GET", path_of(tunnel["tunnel_url"]) + f"download?size={size}")
            await wait_until(lambda: app.download_sent > 0)
            await asyncio.sleep(1.5)
            stalled_at = app.download_sent
            await asyncio.sleep(1.0)
            assert app.download_sent == stalled_at  # nobody reads: nothing more is sent
            print(f"upstream stalled after {stalled_at / 2**20:.1f} MiB")
            assert stalled_at < 64 * 1024 * 1024, stalled_at
            head = await client._event()
            assert head.status_code == 200
            digest, received = hashlib.sha256(), 0
            while True:
                event = await client._event()
                if isinstance(event, h11.EndOfMessage):
                    break
                digest.update(event.data)
                received += len(event.data)
            assert received == size and digest.hexdigest() == payload_sha256(size)
            await client.close()

    run(main, timeout=120)


def test_agent_dropping_mid_response_cuts_the_client_off(tmp_path):
    async def main():
        async with WebApp() as app, gateway_and_team(tmp_path) as (gw, keys):
            async with running_agent(gw, keys["ak"], name="box") as agent:
                tunnel = await open_http_tunnel(gw, keys["sk"], agent.agent_id, app.port)
                client = await Client.connect(gw.port)
                await client.send("GET", path_of(tunnel["tunnel_url"]) + "sse?n=50&interval=0.1")
                head = await client._event()
                assert head.status_code == 200
                assert isinstance(await client._event(), h11.Data)
                gw.registry.abort_all("test: agent dropped")
                # The response cannot complete: the connection is aborted, not ended cleanly.
                with pytest.raises((h11.RemoteProtocolError, ConnectionError)):
                    while not isinstance(await client._event(), h11.EndOfMessage):
                        pass
                await client.close()

    run(main)


def test_admin_token_stats_and_close(tmp_path):
    async def main():
        async with WebApp() as app, tunnel_to(tmp_path, app.port) as (gw, keys, agent, tunnel):
            url, prefix = tunnel["tunnel_url"], path_of(tunnel["tunnel_url"])
            admin = {"X-Admin-Token": tunnel["admin_token"]}
            for _ in range(3):
                code, _, _ = await curl("-f", url + "api/info")
                assert code == 0
            code, _, _ = await curl("-f", "--data-binary", "12345", url + "upload")
            assert code == 0
            ws = await WsClient.connect(gw.port, prefix + "ws")
            await ws.send("hi")
            assert await ws.receive() == "echo: hi"

            status, body = await http(gw.port, "GET", prefix + "_relay/stats")
            assert status == 401
            status, body = await http(gw.port, "GET", prefix + "_relay/stats",
                                      headers={"X-Admin-Token": "wrong"})
            assert status == 403
            status, body = await http(gw.port, "GET", prefix + "_relay/stats", headers=admin)
            assert status == 200, body
            assert body["session_id"] == tunnel["session_id"] and body["agent_online"] is True
            assert body["requests"] == 5 and body["websockets"] == 1 and body["active_websockets"] == 1
            assert body["bytes_in"] == 5 and body["bytes_out"] > 0

            # The access token alone cannot close it; the admin token can.
            status, _ = await http(gw.port, "DELETE", prefix.rstrip("/"))
            assert status == 401
            status, body = await http(gw.port, "DELETE", prefix.rstrip("/"), headers=admin)
            assert status == 200 and body["closed"] == [tunnel["session_id"]]
            with pytest.raises(ConnectionError):  # the open WebSocket went with it
                await ws.receive()
            status, body = await http(gw.port, "GET", prefix + "api/info")
            assert status == 404
            status, body = await http(gw.port, "GET", prefix + "_relay/stats", headers=admin)
            assert status == 404

    run(main)


def test_mixed_requests_on_one_connection_and_many_users(tmp_path):
    async def main():
        async with WebApp() as app, tunnel_to(tmp_path, app.port) as (gw, keys, agent, tunnel):
            prefix = path_of(tunnel["tunnel_url"])
            # One connection: tunnel, API, tunnel again (the proxy hands the connection to
            # the API server and takes it back), and a pipelined pair.
            client = await Client.connect(gw.port)
            assert (await client.request("GET", prefix + "api/info"))[0] == 200
            status, _, data = await client.request("GET", "/healthz")
            assert status == 200 and json.loads(data)["status"] == "ok"
            status, _, data = await client.request("POST", prefix + "echo", body=b"again")
            assert status == 200 and json.loads(data)["body_length"] == 5
            await client.close()

            async def user(i: int) -> None:
                c = await Client.connect(gw.port)
                for j in range(5):
                    body = f"user {i} request {j}".encode()
                    status, _, data = await c.request("POST", prefix + f"echo/{i}/{j}", body=body)
                    assert status == 200
                    echo = json.loads(data)
                    assert echo["target"] == f"/echo/{i}/{j}"
                    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
                await c.close()

            async def sse_user() -> None:
                c = await Client.connect(gw.port)
                await c.send("GET", prefix + "sse?n=3&interval=0.1")
                head, pieces = await c.response()
                assert head.status_code == 200 and b"".join(p for _, p in pieces).count(b"data: ") == 3
                await c.close()

            await asyncio.gather(*(user(i) for i in range(50)), *(sse_user() for _ in range(10)))

    run(main)


# ----------------------------------------------------------------------------- 200 MiB, memory


def _spawn(args: list[str], log: Path, env: Optional[dict] = None) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            start_new_session=True, cwd=str(Path(__file__).resolve().parents[2]))


def _wait_for(predicate, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def _api(port: int, method: str, path: str, token: str, body: Any = None) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


class _RssSampler(threading.Thread):
    """Samples a process's RSS every 20 ms; ``peak`` is the largest seen."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def test_200_mib_upload_and_download_keep_gateway_memory_flat(tmp_path, record_property):
    """curl moves 200 MiB down and 200 MiB up (chunked) through a gateway process; the
    checksums match and the gateway's RSS grows by less than 64 MiB."""
    size = 200 * 1024 * 1024
    limit = 64 * 1024 * 1024
    gw_port = free_port()
    procs: list[subprocess.Popen] = []
    try:
        app_log = tmp_path / "app.log"
        procs.append(_spawn([sys.executable, "-m", "tests.support.webapps"], app_log))
        app_port = int(_wait_for(lambda: re.search(rb"listening (\d+)", app_log.read_bytes())).group(1))
        gw_log = tmp_path / "gateway.log"
        gateway = _spawn([sys.executable, "-m", "relay", "gateway", "--listen", f"127.0.0.1:{gw_port}",
                          "--data", str(tmp_path / "data"), "--log-level", "warning"], gw_log)
        procs.append(gateway)
        _wait_for(lambda: b"listening on" in gw_log.read_bytes())
        keys = dict(re.findall(r"^  (sk|dk|ak)  (\S+)$", gw_log.read_text(), re.M))
        procs.append(_spawn([sys.executable, "-m", "relay", "agent", "--gateway", f"http://127.0.0.1:{gw_port}",
                             "--name", "big", "--log-level", "warning"], tmp_path / "agent.log",
                            env={"RELAY_AGENT_KEY": keys["ak"]}))

        def online() -> Optional[str]:
            agents = [a for a in _api(gw_port, "GET", "/api/v1/agents", keys["sk"])["agents"] if a["online"]]
            return agents[0]["agent_id"] if agents else None

        agent_id = _wait_for(online)
        tunnel = _api(gw_port, "POST", f"/api/v1/agents/{agent_id}/tunnel", keys["sk"],
                      {"target_port": app_port, "tunnel_protocol": "http"})
        url = tunnel["tunnel_url"]

        def curl_sync(*args: str, stdin: Any = None) -> bytes:
            done = subprocess.run(["curl", "-sS", "-f", "--max-time", "120", *args], stdin=stdin,
                                  capture_output=True, timeout=130)
            assert done.returncode == 0, done.stderr
            return done.stdout

        # Warm up (allocator arenas, buffers at their working size), then the baseline.
        curl_sync("-o", os.devnull, url + f"download?size={16 * 1024 * 1024}")
        small = tmp_path / "small.bin"
        small.write_bytes(b"".join(payload(16 * 1024 * 1024)))
        curl_sync("-T", "-", url + "upload", stdin=small.open("rb"))
        baseline = psutil.Process(gateway.pid).memory_info().rss

        sampler = _RssSampler(gateway.pid)
        sampler.start()
        try:
            started = time.monotonic()
            downloaded = tmp_path / "down.bin"
            curl_sync("-o", str(downloaded), url + f"download?size={size}")
            down_s = time.monotonic() - started
            assert downloaded.stat().st_size == size
            digest = hashlib.sha256()
            with downloaded.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            assert digest.hexdigest() == payload_sha256(size)

            started = time.monotonic()
            with downloaded.open("rb") as f:  # -T - : a chunked upload of stdin
                answer = json.loads(curl_sync("-T", "-", url + "upload", stdin=f))
            up_s = time.monotonic() - started
            assert answer == {"length": size, "sha256": payload_sha256(size)}
        finally:
            peak = sampler.stop()
        growth = peak - baseline
        mib = 1024 * 1024
        summary = (f"gateway RSS baseline {baseline / mib:.1f} MiB, peak {peak / mib:.1f} MiB, "
                   f"growth {growth / mib:.1f} MiB; download {size / mib / down_s:.0f} MiB/s, "
                   f"upload {size / mib / up_s:.0f} MiB/s")
        print(summary)
        record_property("memory", summary)
        assert growth < limit, summary
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
