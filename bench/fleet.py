"""A forwarded hop against a direct one, on this machine (issue 13's fleet benchmark).

Starts a private redis-server, two gateways (A and B) sharing a temporary data
directory, and one agent held by A; then opens a TCP tunnel to an echo service behind
the agent twice: at A (its hub port is direct: client -> A -> agent) and at B
(forwarded: client -> B -> peer session -> A -> agent). For each it measures TCP bulk
throughput (MB/s of echoed bytes, one connection) and 64-byte request/response
latency (p50/p99 over one connection). The agent also declares a service (a tiny HTTP
server): the service proxy (``GET /api/v1/r/containers/{slug}/...``) and invoke
(``POST /api/v1/r/invoke/{slug}``) are measured at A (direct) and at B (the service's
instance is held by A: its streams are forwarded), sequential requests on one
keep-alive connection: req/s and p50/p99. Prints the numbers; asserts nothing.

    .venv/bin/python bench/fleet.py [--mib 64] [--rounds 2000] [--requests 1000]
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("not ready")
        time.sleep(0.05)


def echo_server() -> int:
    """An asyncio echo service in a daemon thread; returns its port."""
    ready: list[int] = []

    def main() -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(262144):
                    writer.write(data)
                    await writer.drain()
            except ConnectionError:
                pass
            writer.close()

        async def serve() -> None:
            server = await asyncio.start_server(echo, "127.0.0.1", 0)
            ready.append(server.sockets[0].getsockname()[1])
            await server.serve_forever()

        asyncio.run(serve())

    threading.Thread(target=main, daemon=True).start()
    return wait_for(lambda: ready and ready[0])


def http_server() -> int:
    """A minimal keep-alive HTTP/1.1 server (``200 ok`` to every body-less request) in a
    daemon thread; returns its port."""
    ready: list[int] = []
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"

    def main() -> None:
        async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while await reader.readuntil(b"\r\n\r\n"):
                    writer.write(answer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            writer.close()

        async def serve() -> None:
            server = await asyncio.start_server(serve_one, "127.0.0.1", 0)
            ready.append(server.sockets[0].getsockname()[1])
            await server.serve_forever()

        asyncio.run(serve())

    threading.Thread(target=main, daemon=True).start()
    return wait_for(lambda: ready and ready[0])


def requests(port: int, method: str, path: str, body: Any, token: str, n: int) -> tuple[float, float, float]:
    """req/s, p50 and p99 (µs) of ``n`` sequential requests on one keep-alive connection
    (each must answer 200)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    times = []
    try:
        for i in range(n + 50):
            started = time.perf_counter()
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{method} {path}: {resp.status}")
            if i >= 50:  # warm-up (the instance's keep-alive pool fills)
                times.append(time.perf_counter() - started)
    finally:
        conn.close()
    times.sort()
    return len(times) / sum(times), statistics.median(times) * 1e6, times[int(len(times) * 0.99)] * 1e6


def bulk(port: int, mib: int) -> float:
    """MB/s of ``mib`` MiB echoed through ``port`` on one connection."""
    size = mib * 1024 * 1024
    block = os.urandom(256 * 1024)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        got = 0

        def reader() -> None:
            nonlocal got
            while got < size:
                chunk = sock.recv(1024 * 1024)
                if not chunk:
                    return
                got += len(chunk)

        thread = threading.Thread(target=reader)
        started = time.perf_counter()
        thread.start()
        for _ in range(size // len(block)):
            sock.sendall(block)
        thread.join()
        elapsed = time.perf_counter() - started
    assert got == size
    return size / elapsed / 1e6


def ping_pong(port: int, rounds: int) -> tuple[float, float]:
    """p50 and p99 (µs) of a 64-byte request echoed back, one connection."""
    payload = b"x" * 64
    times = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(rounds + 100):
            started = time.perf_counter()
            sock.sendall(payload)
            got = 0
            while got < 64:
                got += len(sock.recv(64 - got))
            if i >= 100:  # warm-up rounds (window ramp, caches) are not counted
                times.append((time.perf_counter() - started) * 1e6)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=1000, help="service proxy and invoke requests per path")
    args = parser.parse_args()
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        sys.exit("redis-server not found: scripts/bootstrap --system-deps installs it")
    work = Path(tempfile.mkdtemp(prefix="relay-bench-fleet-"))
    procs: list[subprocess.Popen] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RELAY_FLEET_SECRET": "bench-secret"}
    try:
        redis_port = free_port()
        procs.append(subprocess.Popen([redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                       "--dir", str(work)], stdout=subprocess.DEVNULL))
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        ports = {}
        for name in ("a", "b"):
            ports[name] = free_port()
            log = work / f"{name}.log"
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "relay", "gateway", "--listen", f"127.0.0.1:{ports[name]}", "--data",
                 str(work / "data"), "--redis", redis_url, "--gateway-id", name, "--log-level", "warning"],
                stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env))
            wait_for(lambda lg=log: b"in the fleet, advertised at" in lg.read_bytes())  # after the keys
        keys = dict(re.findall(r"^  (sk|dk|ak)  (\S+)$", (work / "a.log").read_text(), re.M))
        echo = echo_server()
        web = http_server()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "relay", "agent", "--gateway", f"http://127.0.0.1:{ports['a']}", "--name",
             "bench", "--allow", f"127.0.0.1:{echo}", "--service", f"bench-web=127.0.0.1:{web},health=none",
             "--log-level", "warning"],
            stdout=(work / "agent.log").open("wb"), stderr=subprocess.STDOUT,
            env={**env, "RELAY_AGENT_KEY": keys["ak"]}))

        def api(name: str, method: str, path: str, body: Any = None) -> Any:
            request = urllib.request.Request(f"http://127.0.0.1:{ports[name]}{path}", method=method,
                                             data=None if body is None else json.dumps(body).encode(),
                                             headers={"Authorization": f"Bearer {keys['sk']}"})
            with urllib.request.urlopen(request, timeout=10) as resp:
                return json.loads(resp.read())

        def agent_seen_at_b() -> Any:
            agents = api("b", "GET", "/api/v1/agents")["agents"]
            return [a["agent_id"] for a in agents if a["online"]]

        agent_id = wait_for(agent_seen_at_b)[0]
        hubs = {}
        for name in ("a", "b"):
            hubs[name] = api(name, "POST", f"/api/v1/agents/{agent_id}/tunnel",
                             {"target_port": echo, "tunnel_protocol": "tcp"})["hub_port"]
        wait_for(lambda: ping_pong(hubs["b"], 1))
        print(f"fleet hop benchmark ({args.mib} MiB bulk, {args.rounds} x 64 B ping-pong; one machine, "
              f"{os.cpu_count()} cores)")
        print(f"{'path':<40} {'bulk MB/s':>10} {'p50 µs':>9} {'p99 µs':>9}")
        results = {}
        for label, name in (("direct (client -> A -> agent)", "a"), ("forwarded (client -> B -> A -> agent)", "b")):
            rate = bulk(hubs[name], args.mib)
            p50, p99 = ping_pong(hubs[name], args.rounds)
            results[name] = (rate, p50, p99)
            print(f"{label:<40} {rate:>10.1f} {p50:>9.0f} {p99:>9.0f}")
        (ra, pa, _), (rb, pb, _) = results["a"], results["b"]
        print(f"forwarded/direct bulk: {rb / ra:.2f}x (goal >= 0.7x); added p50: {pb - pa:.0f} µs (goal <= 150 µs)")

        for name in ("a", "b"):  # the service is known (and running) at both
            wait_for(lambda n=name: api(n, "GET", "/api/v1/r/containers/bench-web")["service_status"] == "running")
        print(f"\nservice proxy and invoke ({args.requests} sequential requests, one keep-alive connection)")
        print(f"{'path':<40} {'req/s':>10} {'p50 µs':>9} {'p99 µs':>9}")
        calls = {"proxy": ("GET", "/api/v1/r/containers/bench-web/x", None),
                 "invoke": ("POST", "/api/v1/r/invoke/bench-web", {"method": "GET", "path": "/x"})}
        for kind, (method, path, body) in calls.items():
            measured = {}
            for label, name in ((f"{kind} direct (at A, agent on A)", "a"), (f"{kind} forwarded (at B, agent on A)", "b")):
                measured[name] = requests(ports[name], method, path, body, keys["sk"], args.requests)
                rate, p50, p99 = measured[name]
                print(f"{label:<40} {rate:>10.0f} {p50:>9.0f} {p99:>9.0f}")
            (qa, la, _), (qb, lb, _) = measured["a"], measured["b"]
            print(f"{kind} forwarded/direct: {qb / qa:.2f}x req/s; added p50: {lb - la:.0f} µs")
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
