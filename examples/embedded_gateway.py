"""Programmatic Gateway and Agent in one program: hooks, a task handler, a stream.

* ``gateway.hooks.authenticate`` accepts agents that present *our platform's* token
  (mapped to a team with ``agent_principal``), and ak- keys as usual;
* ``on_agent_connected`` / ``on_agent_disconnected`` log agents coming and going;
* ``allow_stream`` keeps streams away from port 22; ``on_stream_closed`` logs byte counts;
* the agent registers a ``thumbnail`` task handler (an async generator: each yield is a
  partial output) and the program submits a task through the HTTP API and follows its
  Server-Sent Events to the result.

    python examples/embedded_gateway.py --selftest
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from relay.agent import Agent
from relay.aio import StreamRefused
from relay.gateway.app import Gateway
from relay.gateway.embed import open_agent_stream
from relay.gateway.hooks import agent_principal
from relay.gateway.store import Store

PLATFORM_TOKEN = "platform-machine-token-1"


def install_hooks(gateway: Gateway, team_id: str, log: list[str]) -> None:
    async def authenticate(request: Any, default: Any) -> Any:
        if request.header("authorization") == f"Bearer {PLATFORM_TOKEN}":
            return agent_principal(team_id, subject="machine-1")  # stable agent id
        return default()  # anything else: the built-in ak- key check

    gateway.hooks.authenticate = authenticate
    gateway.hooks.on_agent_connected.append(lambda a: log.append(f"connected {a.name} {a.labels}"))
    gateway.hooks.on_agent_disconnected.append(lambda a: log.append(f"disconnected {a.name}"))
    gateway.hooks.allow_stream.append(
        lambda agent, meta: "ssh is not for tunnels" if str(meta.get("target", "")).endswith(":22") else True)
    gateway.hooks.on_stream_closed.append(
        lambda agent, meta, up, down: log.append(f"stream to {meta['target']} closed: {up} up, {down} down"))


def make_agent(url: str) -> Agent:
    agent = Agent(url, PLATFORM_TOKEN, name="worker", labels=["gpu", "linux"], backoff_initial=0.1)

    @agent.tasks.handler("thumbnail")
    async def thumbnail(task: Any):
        sizes = task.input.get("sizes", [64, 128])
        for size in sizes:
            await task.progress({"size": size})
            yield {"size": size, "bytes": size * size // 8}  # a partial output
        task.result = {"made": len(sizes)}

    return agent


async def http(port: int, method: str, path: str, key: str, body: Any = None) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode() if body is not None else b""
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                 f"Connection: close\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    raw = await reader.read()  # both the JSON answers and the event stream end with a close
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


async def main(selftest: bool) -> int:
    store = Store.open(Path(tempfile.mkdtemp(prefix="relay-embedded-")))
    team, keys = await store.create_team_with_keys("example")
    log: list[str] = []
    gateway = Gateway(store)
    install_hooks(gateway, team.id, log)
    await gateway.start("127.0.0.1", 0)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read())
        writer.close()

    service = await asyncio.start_server(echo, "127.0.0.1", 0)
    service_port = service.sockets[0].getsockname()[1]
    agent = make_agent(gateway.url)
    run = asyncio.ensure_future(agent.run())
    try:
        async with asyncio.timeout(20):
            while agent.agent_id is None:
                await asyncio.sleep(0.02)
            assert agent.agent_id is not None

            # A stream to a service on the agent's machine, programmatically.
            stream = open_agent_stream(gateway, team.id, agent.agent_id,
                                       {"protocol": "tcp", "target": f"127.0.0.1:{service_port}"})
            stream.write(b"ping " * 1000)
            stream.write_eof()
            echoed = await stream.read()
            await stream.wait_closed()
            print(f"echoed {len(echoed)} bytes through the agent")
            # ... and one the gateway's policy refuses before it reaches the agent.
            denied = open_agent_stream(gateway, team.id, agent.agent_id, {"protocol": "tcp", "target": "127.0.0.1:22"})
            try:
                await denied.wait_accepted()
                raise AssertionError("the stream to port 22 should have been denied")
            except StreamRefused as exc:
                print(f"denied: {exc.message}")

            # A task through the HTTP API, followed as Server-Sent Events.
            status, body = await http(gateway.port, "POST", "/api/v1/tasks", str(keys["sk"]),
                                      {"kind": "thumbnail", "input": {"sizes": [64, 128, 256]}, "labels": ["gpu"]})
            task = json.loads(body)
            print(f"submitted: {status} {task['status']} to {task['agent_id']}")
            status, events = await http(gateway.port, "GET", f"/api/v1/tasks/{task['task_id']}/events",
                                        str(keys["sk"]))
            lines = [line for line in events.decode().splitlines() if line.startswith("event: ")]
            print("events:", " ".join(line[7:] for line in lines))
            final = json.loads(events.decode().strip().splitlines()[-1][len("data: "):])
            print(f"result: {final['result']}")
            while not any(entry.startswith("stream to") for entry in log):
                await asyncio.sleep(0.02)
            if selftest:
                assert echoed == b"ping " * 1000
                assert status == 200 and final == {"type": "result", "result": {"made": 3}}
                assert lines.count("event: output") == 3 and lines.count("event: progress") == 3
                assert f"stream to 127.0.0.1:{service_port} closed: 5000 up, 5000 down" in log
            if not selftest:
                print(f"gateway on {gateway.url} (sk key {keys['sk']}); Ctrl-C to stop")
                await asyncio.Event().wait()
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
        agent.close()
        await gateway.close()
        service.close()
        await store.close()
    await asyncio.sleep(0.05)  # let the disconnected hook run
    for entry in log:
        print("hook:", entry)
    if selftest:
        assert log[0] == "connected worker ['gpu', 'linux']" and "disconnected worker" in log
        print("selftest ok")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--selftest", action="store_true", help="exercise everything briefly and exit")
    sys.exit(asyncio.run(main(parser.parse_args().selftest)))
