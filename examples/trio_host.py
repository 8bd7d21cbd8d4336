"""Serve relay agents from a trio application (relay.trio.gateway.serve_agents).

The trio app accepts agents on ``/api/v1/agent/connect`` with
:func:`relay.trio.gateway.serve_agents` (trio-websocket underneath): the
``Authorization: Bearer`` key is checked by our ``authenticate`` before the upgrade (a
JSON 401 otherwise), and our ``handler`` gets each agent's running
:class:`relay.trio.TrioMuxSession` for as long as the agent stays connected. Streams it
opens to the agent are ``trio.abc.HalfCloseableStream`` objects. Any relay agent can
connect: ``relay agent --gateway http://127.0.0.1:PORT --key ak-example``; the self-test
runs the asyncio ``relay.agent.Agent`` in a thread of this process.

    python examples/trio_host.py --selftest
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import threading
from typing import Any, Optional

import trio

from relay.trio import MuxStream, TrioMuxSession
from relay.trio.gateway import serve_agents

AGENT_KEY = "ak-example"


def authenticate(token: Optional[str]) -> Any:
    """Your own check goes here (a database, a JWT ...): a truthy principal, or None (401)."""
    return {"team": "demo"} if token == AGENT_KEY else None


def agent_handler(agents: trio.MemorySendChannel) -> Any:
    """Hand each connected agent's session to the application; serve while it is there."""

    async def handler(session: TrioMuxSession, principal: Any) -> None:
        info = session.peer_info
        print(f"agent {info.get('name')!r} connected (labels {info.get('labels')}, principal {principal})")
        await agents.send(session)
        await trio.sleep_forever()  # cancelled when the agent goes

    return handler


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
        server = await nursery.start(functools.partial(
            serve_agents, agent_handler(send), "127.0.0.1", 0, authenticate=authenticate))
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
