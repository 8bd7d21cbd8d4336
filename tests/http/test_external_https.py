"""External services (issue 5): https:// URLs, the gateway speaking TLS to the URL's host
and verifying its certificate by default; WebSocket upgrades relayed to them.

A real TLS server on 127.0.0.1 whose certificate comes from a test CA (trustme); the
gateway trusts that CA only where the test says so (ServiceManager.external_ssl_context).
"""
from __future__ import annotations

import asyncio
import base64
import json
import ssl
from typing import Optional

import h11
import pytest
import trustme

from tests.gateway.test_gateway_e2e import gateway_and_team, http, run
from tests.http.test_invoke import invoke

pytestmark = pytest.mark.timeout(120)


class TlsEcho:
    """HTTPS/1.1 keep-alive server: answers ``{method, target, host, tls_version,
    connection}`` as JSON for any request (the body is read and counted)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.connections = 0
        self.handshakes_failed = 0
        self.port = 0
        self._server: Optional[asyncio.AbstractServer] = None

    async def __aenter__(self) -> "TlsEcho":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        conn = h11.Connection(h11.SERVER)
        size = 0
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request, size = event, 0
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    body = json.dumps({
                        "method": request.method.decode(), "target": request.target.decode(),
                        "host": dict(request.headers).get(b"host", b"").decode(), "body_size": size,
                        "tls_version": writer.get_extra_info("ssl_object").version(),
                        "connection": number}).encode()
                    writer.write(conn.send(h11.Response(status_code=200, headers=[
                        ("Content-Type", "application/json"), ("Content-Length", str(len(body)))])))
                    writer.write(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
                    await writer.drain()
                    conn.start_next_cycle()
                else:
                    return
        except (ConnectionError, ssl.SSLError, h11.ProtocolError):
            return
        finally:
            writer.close()


def test_https_external_service_verified_tls(tmp_path):
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)

    async def body() -> None:
        async with gateway_and_team(tmp_path) as (gw, keys), TlsEcho(server_context) as server:
            sk, path = keys["sk"], "/api/v1/r/containers"
            base = f"https://127.0.0.1:{server.port}"
            # Default: the system's CAs, which do not know the test CA: 502, never plain text.
            status, svc = await http(gw.port, "POST", path, sk, {"service_slug": "untrusted", "url": base})
            assert status == 201 and svc["url"] == base and svc["exposed_port"] == server.port, svc
            status, out = await http(gw.port, "GET", path + "/untrusted/x", sk)
            assert status == 502, out
            status, out = await invoke(gw, sk, "untrusted", method="GET", path="/x")
            assert status == 502 and "CERTIFICATE_VERIFY_FAILED" in out["error"]["message"], out

            # Trusting the test CA: proxy and invoke reach it over TLS.
            trusting = ssl.create_default_context()
            ca.configure_trust(trusting)
            gw.services.external_ssl_context = trusting
            status, svc = await http(gw.port, "POST", path, sk, {"service_slug": "secure", "url": base + "/api"})
            assert status == 201
            status, out = await http(gw.port, "GET", path + "/secure/v1/models?x=1", sk)
            assert status == 200, out
            assert out["target"] == "/api/v1/models?x=1" and out["host"] == f"127.0.0.1:{server.port}"
            assert out["tls_version"].startswith("TLSv1.")
            seen = server.connections
            for i in range(3):  # invoke keeps its TLS connection alive between calls
                status, out = await invoke(gw, sk, "secure", method="POST", path=f"/p{i}",
                                           body_base64=base64.b64encode(b"abc").decode())
                assert status == 200 and out["status_code"] == 200, out
                answer = json.loads(base64.b64decode(out["body_base64"]))
                assert answer["target"] == f"/api/p{i}" and answer["body_size"] == 3
            assert server.connections == seen + 1

            # The certificate must name the URL's host: "localhost" is not in it.
            status, _ = await http(gw.port, "POST", path, sk,
                                   {"service_slug": "wrong-name", "url": f"https://localhost:{server.port}"})
            assert status == 201
            status, out = await invoke(gw, sk, "wrong-name", method="GET", path="/")
            assert status == 502, out
            # Bad URLs are still refused.
            for bad in ("https://", "https://h:0/", "ftp://h/", "https://user@h/"):
                assert (await http(gw.port, "POST", path, sk, {"service_slug": "bad-url", "url": bad}))[0] == 400

    run(body)


class RawUpgradeTarget:
    """Records each handshake head it gets; answers ``101`` + ``hello`` and then echoes,
    or, for a target path ending in ``/refuse``, ``403`` (keep-alive, as servers do)."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.after_refusal: list[bytes] = []
        self.port = 0
        self._server: Optional[asyncio.AbstractServer] = None

    async def __aenter__(self) -> "RawUpgradeTarget":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            if head.split(b" ", 2)[1].endswith(b"/refuse"):
                writer.write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\nno")
                await writer.drain()
                self.after_refusal.append(await reader.read(65536))  # b"" once the gateway hangs up
                return
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Keep-Alive: timeout=5\r\n\r\nhello")
            await writer.drain()
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def upgrade(port: int, path: str, token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write((f"GET {path} HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {token}\r\n"
                  "Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nX-App: 7\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return reader, writer, head


def test_websocket_upgrades_to_external_services(tmp_path):
    import wsproto
    import wsproto.events as ws_events

    from tests.support.webapps import WS_GREETING, WebApp

    async def body() -> None:
        async with gateway_and_team(tmp_path) as (gw, keys), RawUpgradeTarget() as target, WebApp() as app:
            sk, path = keys["sk"], "/api/v1/r/containers"
            assert (await http(gw.port, "POST", path, sk,
                               {"service_slug": "raw-ws", "url": f"http://127.0.0.1:{target.port}/base"}))[0] == 201
            reader, writer, head = await upgrade(gw.port, path + "/raw-ws/socket?room=1", sk)
            assert head.startswith(b"HTTP/1.1 101 ") and b"keep-alive" not in head.lower(), head
            assert await asyncio.wait_for(reader.readexactly(5), 10) == b"hello"
            writer.write(b"ping over the splice")
            assert await asyncio.wait_for(reader.readexactly(20), 10) == b"ping over the splice"
            sent = target.heads[0].decode("latin-1").lower()
            # Rewritten as the proxy does: prefix, Host, no gateway credential.
            assert sent.startswith("get /base/socket?room=1 http/1.1\r\n")
            assert f"host: 127.0.0.1:{target.port}\r\n" in sent and "x-app: 7" in sent
            assert sk.lower() not in sent and "authorization" not in sent and "x-forwarded-host: gw.test" in sent
            assert "upgrade: websocket" in sent and "connection: upgrade\r\n" in sent
            # Deleting the service cuts the relayed connection.
            assert (await http(gw.port, "DELETE", path + "/raw-ws", sk))[0] == 204
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()

            # A refused upgrade is passed on and the connection ends: nothing more reaches
            # the target through it.
            assert (await http(gw.port, "POST", path, sk,
                               {"service_slug": "raw-ws2", "url": f"http://127.0.0.1:{target.port}"}))[0] == 201
            reader, writer, head = await upgrade(gw.port, path + "/raw-ws2/refuse", sk)
            assert head.startswith(b"HTTP/1.1 403 ") and b"connection: close" in head.lower(), head
            assert await asyncio.wait_for(reader.read(), 10) == b"no"
            writer.close()
            for _ in range(100):
                if target.after_refusal:
                    break
                await asyncio.sleep(0.05)
            assert target.after_refusal == [b""]
            # Without a key: 401 before anything is opened.
            reader, writer, head = await upgrade(gw.port, path + "/raw-ws2/x", "sk-wrong")
            assert head.startswith(b"HTTP/1.1 401 ")
            writer.close()

            # A real WebSocket (wsproto client) to an external service's echo endpoint.
            assert (await http(gw.port, "POST", path, sk,
                               {"service_slug": "web-ext", "url": f"http://127.0.0.1:{app.port}"}))[0] == 201
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
            writer.write(ws.send(ws_events.Request(host="gw.test", target=path + "/web-ext/ws",
                                                   extra_headers=[(b"authorization", f"Bearer {sk}".encode())])))
            events: list = []

            async def next_event():
                while not events:
                    data = await asyncio.wait_for(reader.read(65536), 10)
                    ws.receive_data(data or None)
                    events.extend(ws.events())
                return events.pop(0)

            assert isinstance(await next_event(), ws_events.AcceptConnection)
            writer.write(ws.send(ws_events.Message(data=WS_GREETING)))
            message = await next_event()
            assert isinstance(message, ws_events.TextMessage) and message.data == "echo: " + WS_GREETING
            writer.write(ws.send(ws_events.CloseConnection(code=1000)))
            writer.close()

    run(body)
