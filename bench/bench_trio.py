"""One stream pair in one process under trio, asyncio and uvloop: the same workload.

    PYTHONPATH=. python bench/bench_trio.py [--runs 3] [--megabytes 256] [--round-trips 20000]

Two sessions over loopback TCP in one process (relay.trio's TrioMuxSession under trio;
relay.aio's MuxSession under stock asyncio and under uvloop, measured by
bench/bench_aio.py's own functions), each measuring:
  * MB/s of one stream carrying ``--megabytes`` from client to server (reader reads
    1 MiB at a time, writer writes 256 KiB chunks and waits for room);
  * request/response round trips per second: 64-byte request, 64-byte echo, one at a
    time on one stream.
The loops take turns within each run (trio, asyncio, uvloop, then again), so a machine
whose load changes affects them alike; the table shows the median of ``--runs``.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

import trio
import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_aio, when run from anywhere

from bench_aio import round_trips as aio_round_trips  # noqa: E402
from bench_aio import throughput as aio_throughput  # noqa: E402

from relay import EXTENSIONS  # noqa: E402
from relay.trio import MuxStream, TrioMuxSession  # noqa: E402


async def _pair(nursery: trio.Nursery, handler) -> tuple[TrioMuxSession, TrioMuxSession]:
    """A client and a server session over one loopback TCP connection, both running."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client_transport = await trio.open_tcp_stream("127.0.0.1", port)
    server_transport = await listeners[0].accept()
    await listeners[0].aclose()
    client = TrioMuxSession(client_transport, client=True)
    server = TrioMuxSession(server_transport, client=False, handler=handler)
    await nursery.start(client.run)
    await nursery.start(server.run)
    await client.wait_established()
    return client, server


async def trio_throughput(megabytes: int) -> float:
    """MB/s (10^6 bytes) of one stream, client -> server."""
    total = megabytes * 1024 * 1024
    done = trio.Event()
    received = 0

    async def sink(stream: MuxStream) -> None:
        nonlocal received
        stream.accept()
        while chunk := await stream.receive_some(1 << 20):
            received += len(chunk)
        done.set()

    async with trio.open_nursery() as nursery:
        client, server = await _pair(nursery, sink)
        stream = await client.open_stream()
        chunk = b"\x5a" * (256 * 1024)
        start = time.perf_counter()
        for _ in range(total // len(chunk)):
            await stream.send_all(chunk)
        await stream.send_eof()
        await done.wait()
        elapsed = time.perf_counter() - start
        assert received == total
        client.abort()
        server.abort()
    return total / elapsed / 1e6


async def trio_round_trips(count: int) -> float:
    """64-byte request/response exchanges per second on one stream."""

    async def echo(stream: MuxStream) -> None:
        stream.accept()
        while data := await stream.receive_some(65536):
            await stream.send_all(data)

    async def exchange(stream: MuxStream, request: bytes) -> None:
        await stream.send_all(request)
        got = 0
        while got < len(request):
            got += len(await stream.receive_some(len(request) - got))

    async with trio.open_nursery() as nursery:
        client, server = await _pair(nursery, echo)
        stream = await client.open_stream()
        request = b"r" * 64
        for _ in range(100):  # warm up
            await exchange(stream, request)
        start = time.perf_counter()
        for _ in range(count):
            await exchange(stream, request)
        elapsed = time.perf_counter() - start
        client.abort()
        server.abort()
    return count / elapsed


def measure(loop: str, megabytes: int, count: int) -> tuple[float, float]:
    """(MB/s, round trips/s) of one run on ``loop``: trio, asyncio or uvloop."""
    if loop == "trio":
        return trio.run(trio_throughput, megabytes), trio.run(trio_round_trips, count)
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(aio_throughput(megabytes)), runner.run(aio_round_trips(count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--round-trips", type=int, default=20000)
    args = parser.parse_args()
    loops = ["trio", "asyncio", "uvloop"]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in loops}
    for _ in range(args.runs):
        for name in loops:
            results[name].append(measure(name, args.megabytes, args.round_trips))
    print(f"one stream pair over loopback TCP, one process, compiled codec: {EXTENSIONS}, "
          f"{args.megabytes} MiB / {args.round_trips} round trips, median of {args.runs}")
    print(f"{'loop':<10}{'1-stream MB/s':>16}{'64B round trips/s':>20}")
    for name in loops:
        rates = [r for r, _ in results[name]]
        rtts = [t for _, t in results[name]]
        print(f"{name:<10}{statistics.median(rates):>16.0f}{statistics.median(rtts):>20.0f}")


if __name__ == "__main__":
    main()
