"""Throughput and latency of relay.aio: two MuxSessions over loopback TCP, one process.

    PYTHONPATH=. python bench/bench_aio.py [--runs 3] [--megabytes 256] [--round-trips 20000]

Measures, under stock asyncio and under uvloop:
  * MB/s of one stream carrying ``--megabytes`` from client to server (reader reads
    1 MiB at a time, writer writes 256 KiB chunks and drains);
  * request/response round trips per second: 64-byte request, 64-byte echo, one at a
    time on one stream.
Prints the median of ``--runs`` runs of each (both sessions share one process and one
core, so the numbers are a lower bound of a two-process setup).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import uvloop

from relay import EXTENSIONS
from relay.aio import connect_tcp, serve_tcp


async def _pair(on_stream):
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future = loop.create_future()
    server = await serve_tcp(accepted.set_result, "127.0.0.1", 0, on_stream=on_stream)
    client = await connect_tcp("127.0.0.1", server.sockets[0].getsockname()[1])
    server_session = await accepted
    await client.wait_established()
    return server, client, server_session


async def _close(server, client, server_session):
    client.abort()
    server_session.abort()
    server.close()
    await server.wait_closed()


async def throughput(megabytes: int) -> float:
    """MB/s (10^6 bytes) of one stream, client -> server."""
    total = megabytes * 1024 * 1024
    done: asyncio.Future = asyncio.get_running_loop().create_future()

    async def sink(stream):
        stream.accept()
        received = 0
        while chunk := await stream.read(1 << 20):
            received += len(chunk)
        done.set_result(received)

    pair = await _pair(sink)
    stream = await pair[1].open_stream()
    chunk = b"\x5a" * (256 * 1024)
    start = time.perf_counter()
    for _ in range(total // len(chunk)):
        stream.write(chunk)
        await stream.drain()
    stream.write_eof()
    received = await done
    elapsed = time.perf_counter() - start
    assert received == total
    await _close(*pair)
    return total / elapsed / 1e6


async def round_trips(count: int) -> float:
    """64-byte request/response exchanges per second on one stream."""

    async def echo(stream):
        stream.accept()
        while data := await stream.read(65536):
            stream.write(data)

    pair = await _pair(echo)
    stream = await pair[1].open_stream()
    request = b"r" * 64
    for _ in range(100):  # warm up
        stream.write(request)
        await stream.readexactly(64)
    start = time.perf_counter()
    for _ in range(count):
        stream.write(request)
        await stream.readexactly(64)
    elapsed = time.perf_counter() - start
    await _close(*pair)
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--round-trips", type=int, default=20000)
    args = parser.parse_args()
    loops = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    print(f"relay.aio over loopback TCP, one process, compiled codec: {EXTENSIONS}, median of {args.runs}")
    print(f"{'loop':<10}{'1-stream MB/s':>16}{'64B round trips/s':>20}")
    for name, factory in loops.items():
        rates, rtts = [], []
        for _ in range(args.runs):
            with asyncio.Runner(loop_factory=factory) as runner:
                rates.append(runner.run(throughput(args.megabytes)))
                rtts.append(runner.run(round_trips(args.round_trips)))
        print(f"{name:<10}{statistics.median(rates):>16.0f}{statistics.median(rtts):>20.0f}")


if __name__ == "__main__":
    main()
