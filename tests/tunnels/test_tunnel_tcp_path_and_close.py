"""HTTP tunnel sessions (issue 5 gaps):

* ``DELETE /api/v1/agents/{id}/tunnel`` cuts the live client connections and WebSockets
  of the HTTP tunnels it closes, as the admin close does;
* ``GET /tunnel/{token}/tcp`` is the TCP-over-WS relay for tcp tunnels only: an HTTP
  tunnel's own ``/tcp`` (plain requests and WebSocket upgrades) reaches its target.

In-process gateway + agent + a real upstream (tests.support.webapps) on 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import hashlib

import pytest

from relay.ws.handshake import HandshakeRejected
from tests.gateway.test_gateway_e2e import http, open_tcp_tunnel, run, ws_connect
from tests.http.test_http_tunnel import Client, WsClient, open_http_tunnel, path_of, tunnel_to
from tests.support.webapps import WebApp, _drain_body

pytestmark = pytest.mark.timeout(120)


class TcpPathApp(WebApp):
    """WebApp whose ``/tcp`` is its own: JSON for plain requests, the echo WebSocket for
    an upgrade."""

    async def _route(self, ex) -> bool:
        if ex.path == "/tcp":
            if ex.request.method == b"GET" and any(n.lower() == b"upgrade" for n, _ in ex.request.headers):
                return await self._websocket(ex)
            await _drain_body(ex)
            await ex.respond_json({"app_tcp": ex.request.method.decode(), "target": ex.request.target.decode()})
            return False
        return await super()._route(ex)


async def start_echo_server() -> tuple[asyncio.AbstractServer, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_http_tunnel_own_tcp_path_and_the_tcp_relay_side_by_side(tmp_path):
    async def main():
        async with TcpPathApp() as app, tunnel_to(tmp_path, app.port) as (gw, keys, agent, tunnel):
            prefix = path_of(tunnel["tunnel_url"])
            # Plain GET and HEAD of the HTTP tunnel's /tcp reach the app.
            status, body = await http(gw.port, "GET", prefix + "tcp?x=1")
            assert status == 200 and body == {"app_tcp": "GET", "target": "/tcp?x=1"}, body
            client = await Client.connect(gw.port)
            try:
                # Keep-alive across the /tcp route and the tunnel's other paths, both ways.
                for path in ("tcp", "api/info", "tcp", "echo/1", "tcp"):
                    status, headers, payload = await client.request("GET", prefix + path)
                    assert status == 200, (path, payload)
                    if path == "tcp":
                        assert b'"app_tcp": "GET"' in payload or b'"app_tcp":"GET"' in payload
                status, headers, payload = await client.request("HEAD", prefix + "tcp")
                assert status == 200 and payload == b""
                # Other methods were never the relay's.
                status, _, payload = await client.request("POST", prefix + "tcp", body=b"x")
                assert status == 200 and b"POST" in payload
            finally:
                await client.close()
            # A WebSocket to the HTTP tunnel's /tcp is the app's own WebSocket.
            ws = await WsClient.connect(gw.port, prefix + "tcp")
            await ws.send("via /tcp")
            assert await ws.receive() == "echo: via /tcp"
            await ws.close()
            # Unknown tokens: the tunnel proxy's 404.
            status, body = await http(gw.port, "GET", "/tunnel/no-such-token/tcp")
            assert status == 404 and body["error"]["code"] == "tunnel_not_found"

            # Beside it, a tcp tunnel's /tcp is still the TCP-over-WS relay.
            server, echo_port = await start_echo_server()
            try:
                tcp = await open_tcp_tunnel(gw, keys["sk"], agent.agent_id, echo_port)
                reader, writer, parser, early = await ws_connect(tcp["tunnel_url"])
                from relay.ws import Opcode, encode_frame

                data = b"bytes over the relay " * 100
                writer.write(encode_frame(Opcode.BINARY, data, mask=True))
                received = b"".join(p for op, p in early if op == Opcode.BINARY)
                for _ in range(200):
                    if len(received) >= len(data):
                        break
                    chunk = await asyncio.wait_for(reader.read(65536), 10)
                    assert chunk, "relay closed early"
                    received += b"".join(p for op, p in parser.feed(chunk) if op == Opcode.BINARY)
                assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
                writer.close()
                # A plain GET of the tcp tunnel's URL is not an upgrade: 400 from the relay.
                token = tcp["tunnel_url"].rsplit("/", 2)[1]
                status, body = await http(gw.port, "GET", f"/tunnel/{token}/tcp")
                assert status == 400 and body["error"]["code"] == "bad_websocket_upgrade", body
                # Once closed, the relay answers 404 (and nothing else takes the path over).
                status, _ = await http(gw.port, "DELETE", f"/api/v1/agents/{agent.agent_id}/tunnel?session_id="
                                       f"{tcp['session_id']}", keys["sk"])
                assert status == 200
                with pytest.raises(HandshakeRejected) as info:
                    await ws_connect(tcp["tunnel_url"])
                assert info.value.status_code == 404
            finally:
                server.close()

    run(main)


def test_agent_tunnel_delete_cuts_live_clients_and_websockets(tmp_path):
    async def main():
        async with WebApp() as app, tunnel_to(tmp_path, app.port) as (gw, keys, agent, tunnel):
            second = await open_http_tunnel(gw, keys["sk"], agent.agent_id, app.port)
            first_prefix, second_prefix = path_of(tunnel["tunnel_url"]), path_of(second["tunnel_url"])
            clients, sockets = [], []
            for prefix in (first_prefix, second_prefix):
                client = await Client.connect(gw.port)
                assert (await client.request("GET", prefix + "api/info"))[0] == 200
                ws = await WsClient.connect(gw.port, prefix + "ws")
                await ws.send("hi")
                assert await ws.receive() == "echo: hi"
                clients.append(client)
                sockets.append(ws)
            base = f"/api/v1/agents/{agent.agent_id}/tunnel"
            # One session by id: its connections go, the other session's stay.
            status, body = await http(gw.port, "DELETE", f"{base}?session_id={tunnel['session_id']}", keys["sk"])
            assert status == 200 and body["closed"] == [tunnel["session_id"]]
            with pytest.raises(ConnectionError):
                await sockets[0].receive()
            assert await asyncio.wait_for(clients[0].reader.read(), 10) == b""  # closed by the gateway
            await sockets[1].send("still there")
            assert await sockets[1].receive() == "echo: still there"
            assert (await clients[1].request("GET", second_prefix + "api/info"))[0] == 200
            # All of the agent's sessions.
            status, body = await http(gw.port, "DELETE", base, keys["sk"])
            assert status == 200 and body["closed"] == [second["session_id"]]
            with pytest.raises(ConnectionError):
                await sockets[1].receive()
            assert await asyncio.wait_for(clients[1].reader.read(), 10) == b""
            assert (await http(gw.port, "GET", second_prefix + "api/info"))[0] == 404
            # Closed sessions leave no live counters behind in the gateway.
            assert not set(gw.http_tunnels._stats) & {tunnel["session_id"], second["session_id"]}
            for client in clients:
                await client.close()

    run(main)
