"""External services at https:// URLs (issue 5): the gateway speaks TLS to the URL's host,
verifying its certificate by default.

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

from tests.test_gateway_e2e import gateway_and_team, http, run
from tests.test_invoke import invoke

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
