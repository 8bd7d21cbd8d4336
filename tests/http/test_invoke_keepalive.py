"""invoke keeps streams (= agent-to-container connections) alive between calls (issue 5):
reuse, the bounded idle pool, stale streams retried once for idempotent methods only,
and the pool closed when the agent goes away.

A real HTTP/1.1 server (asyncio + h11) counting its connections and requests, behind an
in-process agent and gateway on 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import base64
from typing import Optional

import h11
import pytest

from relay.gateway.api import services as services_module
from tests.gateway.test_gateway_e2e import gateway_and_team, run, wait_until
from tests.http.test_invoke import invoke, serving_agent, wait_status

pytestmark = pytest.mark.timeout(120)


class CountingServer:
    """Answers every request 200 with ``conn=N;req=M`` (its connection number and the
    request's number on it), keep-alive. ``drop_reused``: a request that is not the
    first on its connection is read, counted, and answered by closing the connection
    (as a server closing an idle connection just as the request arrives)."""

    def __init__(self) -> None:
        self.connections = 0
        self.open = 0
        self.requests: list[tuple[str, str]] = []  # (method, target)
        self.drop_reused = False
        self.port = 0
        self._server: Optional[asyncio.AbstractServer] = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> "CountingServer":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self._writers.add(writer)
        number, served = self.connections, 0
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.EndOfMessage):
                    served += 1
                    self.requests.append((request.method.decode(), request.target.decode()))
                    if self.drop_reused and served > 1:
                        return
                    body = f"conn={number};req={served}".encode()
                    writer.write(conn.send(h11.Response(status_code=200, headers=[
                        ("Content-Length", str(len(body))), ("Content-Type", "text/plain")])))
                    if request.method != b"HEAD":
                        writer.write(conn.send(h11.Data(data=body)))
                    writer.write(conn.send(h11.EndOfMessage()))
                    await writer.drain()
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (ConnectionError, h11.ProtocolError):
            return
        finally:
            self.open -= 1
            self._writers.discard(writer)
            writer.close()


async def call(gw, key: str, method: str = "GET", path: str = "/x", body: bytes = b"") -> tuple[int, str]:
    status, out = await invoke(gw, key, "kept", method=method, path=path,
                               body_base64=base64.b64encode(body).decode())
    assert status == 200, out
    return out["status_code"], base64.b64decode(out["body_base64"]).decode()


def test_streams_are_reused_and_the_pool_is_bounded(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(services_module, "POOL_MAX_IDLE", 4)

    async def body() -> None:
        async with gateway_and_team(tmp_path) as (gw, keys):
            server = await CountingServer().start()
            try:
                async with serving_agent(gw, keys["ak"], "box", f"kept=127.0.0.1:{server.port},health=none"):
                    await wait_status(gw, keys["sk"], "kept", "running")
                    answers = [await call(gw, keys["sk"], method) for method in
                               ("GET", "GET", "HEAD", "PUT", "DELETE", "OPTIONS", "POST", "PATCH")]
                    # One connection at the container carried all eight, in turn.
                    assert server.connections == 1, (server.connections, answers)
                    assert answers[0] == (200, "conn=1;req=1") and answers[1] == (200, "conn=1;req=2")
                    assert answers[2] == (200, "")  # HEAD: no body, and the stream stays usable
                    assert answers[-1] == (200, "conn=1;req=8")
                    # Ten at once need ten streams; afterwards at most POOL_MAX_IDLE stay.
                    results = await asyncio.gather(*(call(gw, keys["sk"]) for _ in range(10)))
                    assert all(status == 200 for status, _ in results)
                    assert server.connections >= 2
                    (inst,) = gw.services._states[((await gw.store.list_teams())[0].id, "kept")].instances.values()
                    assert 1 <= len(inst.idle) <= 4
                    await wait_until(lambda: server.open <= 4, timeout=10)
            finally:
                await server.close()

    run(body)


def test_stale_stream_retried_once_for_idempotent_methods_only(tmp_path) -> None:
    async def body() -> None:
        async with gateway_and_team(tmp_path) as (gw, keys):
            server = await CountingServer().start()
            try:
                async with serving_agent(gw, keys["ak"], "box", f"kept=127.0.0.1:{server.port},health=none"):
                    await wait_status(gw, keys["sk"], "kept", "running")
                    assert await call(gw, keys["sk"]) == (200, "conn=1;req=1")
                    server.drop_reused = True  # the kept connection dies on its next request
                    # GET: sent on the kept stream (dropped), then once more on a fresh one.
                    assert await call(gw, keys["sk"], "GET", "/again") == (200, "conn=2;req=1")
                    assert server.requests[-2:] == [("GET", "/again"), ("GET", "/again")]
                    # POST on a kept stream that dies is not sent twice: 502.
                    seen = len(server.requests)
                    status, out = await invoke(gw, keys["sk"], "kept", method="POST", path="/once",
                                               body_base64=base64.b64encode(b"x").decode())
                    assert status == 502 and out["error"]["code"] == "tunnel_error", out
                    assert server.requests[seen:] == [("POST", "/once")]
                    # A POST after the pool is empty goes on a fresh stream and succeeds.
                    server.drop_reused = False
                    status, text = await call(gw, keys["sk"], "POST", "/fresh", b"y")
                    assert status == 200 and text.endswith(";req=1")
            finally:
                await server.close()

    run(body)


def test_idle_streams_closed_when_the_agent_goes_away(tmp_path) -> None:
    async def body() -> None:
        async with gateway_and_team(tmp_path) as (gw, keys):
            server = await CountingServer().start()
            try:
                team_id = (await gw.store.list_teams())[0].id
                async with serving_agent(gw, keys["ak"], "box", f"kept=127.0.0.1:{server.port},health=none"):
                    await wait_status(gw, keys["sk"], "kept", "running")
                    await asyncio.gather(*(call(gw, keys["sk"]) for _ in range(3)))
                    (inst,) = gw.services._states[(team_id, "kept")].instances.values()
                    assert inst.idle and server.open >= 1
                    streams = [entry[0] for entry in inst.idle]
                # The agent is gone: its idle streams are dropped and the container's
                # connections end.
                await wait_until(lambda: gw.registry.connected() == [], timeout=10)
                await gw.services.sync()
                assert inst.idle == [] and not inst.online
                assert all(stream.is_closing() or stream.exception is not None for stream in streams)
                await wait_until(lambda: server.open == 0, timeout=10)
                # Back again: a new instance with a new pool serves at once.
                async with serving_agent(gw, keys["ak"], "box", f"kept=127.0.0.1:{server.port},health=none"):
                    await wait_status(gw, keys["sk"], "kept", "running", instances_online=1)
                    before = server.connections
                    assert (await call(gw, keys["sk"]))[1] == f"conn={before + 1};req=1"
            finally:
                await server.close()

    run(body)
