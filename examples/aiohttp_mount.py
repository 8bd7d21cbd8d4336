"""Mount the relay's agent endpoint and tunnel routing into an existing aiohttp app.

The aiohttp application keeps its own routes and its own port. Two routes are added:

* ``GET /relay/api/v1/agent/connect``: agents connect here (``relay agent --gateway
  http://HOST:PORT/relay --key ak-...``). aiohttp accepts the WebSocket; the relay
  :class:`~relay.gateway.app.Gateway` running on the same event loop serves the agent
  (registry, hooks, tasks) through :mod:`relay.gateway.embed`.
* ``/svc/{agent_id}/{port}/{path}``: requests with an ``sk-``/``dk-`` key are routed to
  ``127.0.0.1:{port}`` on that agent's machine over a mux stream, speaking HTTP/1.1 with
  h11, the response streamed back through aiohttp.

The gateway also serves its own API (``/api/v1/...``, tasks, HTTP tunnels) on a port of
its own, started on the same loop.

    python examples/aiohttp_mount.py              # serve on 127.0.0.1:8090 (prints keys)
    python examples/aiohttp_mount.py --selftest   # start everything, check, exit 0
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
from pathlib import Path

import h11
from aiohttp import ClientSession, WSMsgType, web

from relay.agent import Agent
from relay.aio import StreamRefused
from relay.gateway.app import Gateway
from relay.gateway.auth import AuthError
from relay.gateway.embed import authenticate_agent, open_agent_stream, serve_agent_websocket
from relay.gateway.store import Store

#: An agent's largest WebSocket message: one 256 KiB flush slice plus control frames.
MAX_MESSAGE = 16 * 1024 * 1024


async def agent_endpoint(request: web.Request) -> web.StreamResponse:
    """Authenticate before upgrading (401/403 as JSON), then hand the WebSocket over."""
    gateway: Gateway = request.app["gateway"]
    try:
        principal = await authenticate_agent(gateway, request.headers, request.remote)
    except AuthError as exc:
        return web.json_response(exc.to_json(), status=exc.status, headers=exc.headers)
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE)
    await ws.prepare(request)

    async def receive() -> bytes | None:
        while True:
            msg = await ws.receive()
            if msg.type == WSMsgType.BINARY:
                return msg.data
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return None
            # text/ping/pong: not part of the mux byte stream

    await serve_agent_websocket(gateway, principal, receive=receive, send=ws.send_bytes,
                                close=ws.close, peer=request.remote)
    return ws


async def service_proxy(request: web.Request) -> web.StreamResponse:
    """Route one request to a port on the agent's machine (tunnel routing)."""
    gateway: Gateway = request.app["gateway"]
    try:
        principal = await gateway.auth.authenticate(request.headers.get("Authorization"),
                                                    request.headers.get("X-Team-ID"))
        principal.require_runtime()
    except AuthError as exc:
        return web.json_response(exc.to_json(), status=exc.status)
    target = f"127.0.0.1:{int(request.match_info['port'])}"
    try:
        stream = open_agent_stream(gateway, principal.team_id, request.match_info["agent_id"],
                                   {"protocol": "http", "target": target})
        await stream.wait_accepted()
    except (LookupError, StreamRefused) as exc:
        return web.json_response({"error": {"code": "bad_gateway", "message": str(exc)}}, status=502)
    try:
        # HTTP/1.1 to the target over the stream; one request per stream.
        conn = h11.Connection(h11.CLIENT)
        body = await request.read()  # small bodies; stream request.content for big ones
        headers = [(k, v) for k, v in request.headers.items()
                   if k.lower() not in ("host", "connection", "transfer-encoding", "authorization")]
        headers += [("Host", target), ("Connection", "close"), ("Content-Length", str(len(body)))]
        path = "/" + request.match_info["path"] + (f"?{request.query_string}" if request.query_string else "")
        stream.write(conn.send(h11.Request(method=request.method, target=path, headers=headers)))
        stream.write(conn.send(h11.Data(data=body)) if body else b"")
        stream.write(conn.send(h11.EndOfMessage()))
        response: web.StreamResponse | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.read(65536))
            elif isinstance(event, h11.Response):
                response = web.StreamResponse(status=event.status_code)
                for name, value in event.headers:
                    if name not in (b"connection", b"transfer-encoding", b"content-length"):
                        response.headers.add(name.decode(), value.decode("latin-1"))
                await response.prepare(request)
            elif isinstance(event, h11.Data):
                assert response is not None
                await response.write(bytes(event.data))
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        assert response is not None
        await response.write_eof()
        return response
    except (ConnectionError, h11.ProtocolError) as exc:
        return web.json_response({"error": {"code": "tunnel_error", "message": str(exc)}}, status=502)
    finally:
        stream.abort()


async def index(request: web.Request) -> web.Response:
    return web.Response(text="the application's own page\n")


def make_app(gateway: Gateway) -> web.Application:
    """The existing application, plus the two relay routes."""
    app = web.Application()
    app["gateway"] = gateway
    app.router.add_get("/", index)
    app.router.add_get("/relay/api/v1/agent/connect", agent_endpoint)
    app.router.add_route("*", "/svc/{agent_id}/{port:[0-9]+}/{path:.*}", service_proxy)
    return app


@contextlib.asynccontextmanager
async def serving(app: web.Application, port: int = 0):
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def main(selftest: bool, port: int) -> int:
    data = Path(tempfile.mkdtemp(prefix="relay-aiohttp-"))
    store = Store.open(data)
    _, keys = await store.create_team_with_keys("example")
    gateway = Gateway(store)
    await gateway.start("127.0.0.1", 0)  # its own API/tunnels port, same loop
    try:
        async with serving(make_app(gateway), 0 if selftest else port) as app_port:
            if not selftest:
                print(f"app on http://127.0.0.1:{app_port}/ ; relay API on {gateway.url}")
                print(f"agent:  relay agent --gateway http://127.0.0.1:{app_port}/relay --key {keys['ak']}")
                print(f"route:  curl -H 'Authorization: Bearer {keys['sk']}' "
                      f"http://127.0.0.1:{app_port}/svc/AGENT_ID/PORT/")
                await asyncio.Event().wait()
            return await selfcheck(gateway, app_port, str(keys["ak"]), str(keys["sk"]))
    finally:
        await gateway.close()
        await store.close()


async def selfcheck(gateway: Gateway, app_port: int, ak: str, sk: str) -> int:
    """An agent connects through the aiohttp app; a request is routed to a service on
    its machine; a wrong key gets 401 before any upgrade."""
    service = web.Application()
    service.router.add_get("/hello", lambda r: web.Response(text=f"hello {r.query.get('who')}"))
    async with serving(service) as service_port, ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{app_port}/relay/api/v1/agent/connect",
                            headers={"Authorization": "Bearer ak-wrong"}) as bad:
            assert bad.status == 401, bad.status
        agent = Agent(f"http://127.0.0.1:{app_port}/relay", ak, name="box")
        run = asyncio.ensure_future(agent.run())
        try:
            async with asyncio.timeout(10):
                while agent.agent_id is None:
                    await asyncio.sleep(0.02)
            url = f"http://127.0.0.1:{app_port}/svc/{agent.agent_id}/{service_port}/hello?who=aiohttp"
            async with http.get(url, headers={"Authorization": f"Bearer {sk}"}) as resp:
                text = await resp.text()
                assert resp.status == 200 and text == "hello aiohttp", (resp.status, text)
            print(f"agent {agent.name} connected through aiohttp; routed GET -> {text!r}")
            async with http.get(f"http://127.0.0.1:{app_port}/") as resp:
                assert resp.status == 200
        finally:
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
            agent.close()
    print("selftest ok")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--selftest", action="store_true", help="exercise everything briefly and exit")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.selftest, args.port)))
