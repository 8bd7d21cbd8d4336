"""Serve relay agents from a trio application (trio-websocket + relay.trio).

The trio app accepts agents on ``/api/v1/agent/connect`` with trio-websocket, checks the
``Authorization: Bearer`` key before upgrading (401 otherwise), and runs each agent's
mux session with :class:`relay.trio.TrioMuxSession` over
:class:`relay.trio.WebSocketStream`. Streams it opens to the agent are
``trio.abc.HalfCloseableStream`` objects. Any relay agent can connect: ``relay agent
--gateway http://127.0.0.1:PORT --key ak-example``; here the self-test runs the asyncio
``relay.agent.Agent`` in a thread of this process.

    python examples/trio_host.py --selftest
"""
from __future__ import annotations

import argparse
import functools
import asyncio
import sys
import threading
from typing import Any, Optional

import trio
from trio_websocket import serve_websocket

from relay.mux.errors import ErrorCode
from relay.trio import MuxStream, StreamRefused, TrioMuxSession, WebSocketStream

AGENT_PATH = "/api/v1/agent/connect"
AGENT_KEY = "ak-example"  # your own check goes here (a database, a JWT ...)
MAX_MESSAGE = 16 * 1024 * 1024


def bearer(headers: list[tuple[bytes, bytes]]) -> Optional[str]:
    for name, value in headers:
        if name.lower() == b"authorization" and value.lower().startswith(b"bearer "):
            return value[7:].decode("latin-1").strip()
    return None


async def refuse(stream: MuxStream) -> None:
    """Agents open no streams towards the host."""
    raise StreamRefused(ErrorCode.REFUSED, "this host accepts no streams from agents")


async def serve_agents(on_agent: trio.MemorySendChannel, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Listen for agents; send each established session to ``on_agent``; keep it running
    until the agent goes."""

    async def on_request(request: Any) -> None:
        if request.path.split("?")[0] != AGENT_PATH:
            await request.reject(404)
            return
        if bearer(request.headers) != AGENT_KEY:
            await request.reject(401, extra_headers=[(b"content-type", b"application/json")],
                                 body=b'{"error": {"code": "invalid_credentials", "message": "bad agent key"}}')
            return
        ws = await request.accept()
        session = TrioMuxSession(WebSocketStream(ws), client=False, handler=refuse,
                                 on_control=lambda message: None)  # status reports: unused here
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run)
            with trio.fail_after(10):
                info = await session.wait_established()
            print(f"agent {info.get('name')!r} connected (labels {info.get('labels')})")
            await on_agent.send(session)
            await session.wait_closed()

    await serve_websocket(on_request, "127.0.0.1", 0, None, max_message_size=MAX_MESSAGE,
                          task_status=task_status)


async def echo_server(stream: trio.SocketStream) -> None:
    """A service on 'the agent's machine' (here: this one)."""
    async for data in stream:
        await stream.send_all(data)
    await stream.send_eof()


def run_agent_in_thread(port: int) -> tuple[threading.Thread, Any]:
    """The asyncio relay agent, in its own thread and event loop."""
    from relay.agent import Agent

    ready: dict[str, Any] = {}
    started = threading.Event()

    def main() -> None:
        async def go() -> None:
            ready["loop"] = asyncio.get_running_loop()
            ready["task"] = asyncio.current_task()
            started.set()
            await Agent(f"http://127.0.0.1:{port}", AGENT_KEY, name="asyncio-agent", labels=["demo"]).run()

        try:
            asyncio.run(go())
        except asyncio.CancelledError:
            pass

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    started.wait(10)

    def stop() -> None:
        ready["loop"].call_soon_threadsafe(ready["task"].cancel)
        thread.join(10)

    return thread, stop


async def main(selftest: bool) -> int:
    async with trio.open_nursery() as nursery:
        echo_listeners = await nursery.start(functools.partial(trio.serve_tcp, echo_server, 0, host="127.0.0.1"))
        echo_port = echo_listeners[0].socket.getsockname()[1]
        send, receive = trio.open_memory_channel(10)
        server = await nursery.start(serve_agents, send)
        print(f"trio host: agents connect to http://127.0.0.1:{server.port} (key {AGENT_KEY})")
        _, stop_agent = run_agent_in_thread(server.port)
        try:
            with trio.fail_after(20):
                session = await receive.receive()
                stream = await session.open_stream({"protocol": "tcp", "target": f"127.0.0.1:{echo_port}"})
                payload = b"0123456789abcdef" * 65536  # 1 MiB, both ways
                async with trio.open_nursery() as io:
                    io.start_soon(send_then_eof, stream, payload)
                    echoed = bytearray()
                    async for chunk in stream:
                        echoed += chunk
                assert bytes(echoed) == payload, "echo mismatch"
                print(f"echoed {len(echoed)} bytes through the agent's stream")
                await session.aclose()
        finally:
            await trio.to_thread.run_sync(stop_agent)
        if selftest:
            print("selftest ok")
        else:
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()
    return 0


async def send_then_eof(stream: MuxStream, payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        await stream.send_all(view[:65536])
        view = view[65536:]
    await stream.send_eof()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--selftest", action="store_true", help="exercise everything briefly and exit")
    sys.exit(trio.run(main, parser.parse_args().selftest))
