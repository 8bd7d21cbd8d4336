"""The fleet on this machine (issue 13's fleet benchmarks): a forwarded hop against a
direct one, failover after kill -9, and how fast a pause or a revocation reaches
another gateway.

Starts a private redis-server and gateways sharing a temporary data directory.

* hop: one agent held by A; a TCP tunnel to an echo service behind it opened twice: at
  A (direct: client -> A -> agent) and at B (forwarded: client -> B -> peer session ->
  A -> agent). TCP bulk throughput (MB/s of echoed bytes, one connection) and 64-byte
  request/response latency (p50/p99 over one connection).
* service: the agent also declares a service (a tiny HTTP server): the service proxy
  (``GET /api/v1/r/containers/{slug}/...``) and invoke (``POST /api/v1/r/invoke/{slug}``)
  at A (direct) and at B (the service's instance is held by A: its streams are
  forwarded), sequential requests on one keep-alive connection: req/s and p50/p99.
* failover: an agent given two fresh gateways X and Y (``--connections 2``, then 1);
  requests made at B; kill -9 of the gateway B forwards them to; the time until a
  request through B is echoed again. Goals: < 1 s with two connections, under the
  first reconnect backoff step (0.5 s +-20 %) with one.
* pause: an HTTP tunnel with a share link, used through B; PATCH ``paused`` at A; the
  time from the call until the share answers 503 at B. revoke: a dk- key used at B;
  ``relay admin key revoke --redis`` (the committed, published revocation: timed from
  the command's return; its own run time is printed beside); the time until B answers
  401. Goal: < 1 s.

Prints the numbers (medians over ``--repeats``); asserts nothing.

    .venv/bin/python bench/fleet.py [--only hop,service,failover,pause,revoke] [--mib 64] [--rounds 2000]
        [--requests 1000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
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
import urllib.error
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


def echo_once(port: int, timeout: float = 1.0) -> bool:
    """One short echo through ``port`` on a new connection: True if it came back."""
    payload = os.urandom(64)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = sock.recv(64)
                if not chunk:
                    return False
                got += chunk
            return got == payload
    except OSError:
        return False


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


def status_of(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def until(predicate: Any, timeout: float = 20.0, step: float = 0.005) -> float:
    """Seconds until ``predicate()`` holds (polled every ``step``)."""
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("not within the time")
        time.sleep(step)
    return time.perf_counter() - started


def median_line(label: str, values: list[float], goal: str) -> str:
    shown = ", ".join(f"{v * 1000:.0f}" for v in values)
    return f"{label:<44} median {statistics.median(values) * 1000:>6.0f} ms  (runs: {shown} ms; goal {goal})"


class Bench:
    """The processes of one run: Redis, gateways by name, agents."""

    def __init__(self, work: Path, redis_bin: str) -> None:
        self.work = work
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "RELAY_FLEET_SECRET": "bench-secret"}
        redis_port = free_port()
        self.procs.append(subprocess.Popen([redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save",
                                            "", "--dir", str(work)], stdout=subprocess.DEVNULL))
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.ports: dict[str, int] = {}
        self.gateways: dict[str, subprocess.Popen] = {}
        self.keys: dict[str, str] = {}

    def gateway(self, name: str) -> int:
        port = self.ports[name] = free_port()
        log = self.work / f"{name}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "gateway", "--listen", f"127.0.0.1:{port}", "--data",
             str(self.work / "data"), "--redis", self.redis_url, "--gateway-id", name, "--log-level", "warning"],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=self.env)
        self.procs.append(proc)
        self.gateways[name] = proc
        wait_for(lambda: b"in the fleet, advertised at" in log.read_bytes())  # after the keys
        if not self.keys:
            self.keys = dict(re.findall(r"^  (sk|dk|ak)  (\S+)$", log.read_text(), re.M))
        return port

    def agent(self, name: str, gateways: list[str], *extra: str) -> subprocess.Popen:
        args = [sys.executable, "-m", "relay", "agent", "--name", name, "--log-level", "warning", *extra]
        for gateway in gateways:
            args += ["--gateway", f"http://127.0.0.1:{self.ports[gateway]}"]
        proc = subprocess.Popen(args, stdout=(self.work / f"agent-{name}.log").open("wb"), stderr=subprocess.STDOUT,
                                env={**self.env, "RELAY_AGENT_KEY": self.keys["ak"]})
        self.procs.append(proc)
        return proc

    def api(self, gateway: str, method: str, path: str, body: Any = None, key: str | None = None) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.ports[gateway]}{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {key or self.keys['sk']}"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read() or b"null")

    def agent_id(self, gateway: str, name: str) -> Any:
        agents = self.api(gateway, "GET", "/api/v1/agents")["agents"]
        found = [a["agent_id"] for a in agents if a["online"] and a["name"] == name]
        return found[0] if found else None

    def joined(self, gateway: str) -> float:
        """Streams forwarded to ``gateway`` and joined to its agent so far."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[gateway]}/metrics", timeout=10) as resp:
            found = re.search(r'relay_fleet_forwarded_streams_in_total\{result="joined"\} (\S+)', resp.read().decode())
        return float(found.group(1)) if found else 0.0

    def holders(self, agent_id: str) -> dict[Any, Any]:
        """The agent's sessions leased in Redis (gateway id -> lease)."""
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            return client.hgetall(f"relay:agent:{agent_id}")
        finally:
            client.close()

    def admin(self, *args: str) -> Any:
        out = subprocess.run([sys.executable, "-m", "relay", "admin", "--data", str(self.work / "data"), *args],
                             capture_output=True, text=True, timeout=60, env=self.env)
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        return json.loads(out.stdout) if "--json" in args else out.stdout

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


def service(bench: Bench, args: argparse.Namespace) -> None:
    for name in ("a", "b"):  # the service is known (and running) at both
        wait_for(lambda n=name: bench.api(n, "GET", "/api/v1/r/containers/bench-web")["service_status"] == "running")
    print(f"\nservice proxy and invoke ({args.requests} sequential requests, one keep-alive connection)")
    print(f"{'path':<40} {'req/s':>10} {'p50 µs':>9} {'p99 µs':>9}")
    calls = {"proxy": ("GET", "/api/v1/r/containers/bench-web/x", None),
             "invoke": ("POST", "/api/v1/r/invoke/bench-web", {"method": "GET", "path": "/x"})}
    for kind, (method, path, body) in calls.items():
        measured = {}
        for label, name in ((f"{kind} direct (at A, agent on A)", "a"), (f"{kind} forwarded (at B, agent on A)", "b")):
            measured[name] = requests(bench.ports[name], method, path, body, bench.keys["sk"], args.requests)
            rate, p50, p99 = measured[name]
            print(f"{label:<40} {rate:>10.0f} {p50:>9.0f} {p99:>9.0f}")
        (qa, la, _), (qb, lb, _) = measured["a"], measured["b"]
        print(f"{kind} forwarded/direct: {qb / qa:.2f}x req/s; added p50: {lb - la:.0f} µs")


def hop(bench: Bench, echo: int, args: argparse.Namespace) -> None:
    agent_id = wait_for(lambda: bench.agent_id("b", "bench"))
    hubs = {}
    for name in ("a", "b"):
        hubs[name] = bench.api(name, "POST", f"/api/v1/agents/{agent_id}/tunnel",
                               {"target_port": echo, "tunnel_protocol": "tcp"})["hub_port"]
    wait_for(lambda: ping_pong(hubs["b"], 1))
    print(f"fleet hop benchmark ({args.mib} MiB bulk, {args.rounds} x 64 B ping-pong)")
    print(f"{'path':<40} {'bulk MB/s':>10} {'p50 µs':>9} {'p99 µs':>9}")
    results = {}
    for label, name in (("direct (client -> A -> agent)", "a"), ("forwarded (client -> B -> A -> agent)", "b")):
        rate = bulk(hubs[name], args.mib)
        p50, p99 = ping_pong(hubs[name], args.rounds)
        results[name] = (rate, p50, p99)
        print(f"{label:<40} {rate:>10.1f} {p50:>9.0f} {p99:>9.0f}")
    (ra, pa, _), (rb, pb, _) = results["a"], results["b"]
    print(f"forwarded/direct bulk: {rb / ra:.2f}x (goal >= 0.7x); added p50: {pb - pa:.0f} µs (goal <= 150 µs)")


def hop_tools(bench: Bench, iperf_port: int, nginx_port: int, seconds: int) -> None:
    """The forwarded hop driven by C load generators: iperf3 (one stream each way)
    through hub ports of a tunnel opened at A and at B, and wrk -t2 -c64 (1 KiB from
    nginx) through one HTTP tunnel's URL at A and at B."""
    agent_id = wait_for(lambda: bench.agent_id("b", "bench"))
    hubs = {name: bench.api(name, "POST", f"/api/v1/agents/{agent_id}/tunnel",
                            {"target_port": iperf_port, "tunnel_protocol": "tcp"})["hub_port"] for name in ("a", "b")}
    opened = bench.api("a", "POST", f"/api/v1/agents/{agent_id}/tunnel",
                       {"target_port": nginx_port, "tunnel_protocol": "http"})
    path = opened["tunnel_url"][opened["tunnel_url"].index("/tunnel/"):] + "1k.bin"
    urls = {name: f"http://127.0.0.1:{bench.ports[name]}{path}" for name in ("a", "b")}
    wait_for(lambda: status_of(urls["b"]) == 200)
    print(f"fleet hop with C load generators (iperf3 {seconds} s, wrk -t2 -c64 {seconds} s, 1 KiB from nginx)")
    print(f"{'path':<40} {'fwd MB/s':>9} {'rev MB/s':>9} {'req/s':>9}")
    rows = {}
    for label, name in (("direct (client -> A -> agent)", "a"), ("forwarded (client -> B -> A -> agent)", "b")):
        rates = []
        for reverse in ((), ("-R",)):
            out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(hubs[name]), "-t", str(seconds), "-J",
                                  *reverse], capture_output=True, text=True, timeout=seconds + 60)
            rates.append(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 8e6)
        out = subprocess.run(["wrk", "-t2", "-c64", f"-d{seconds}s", urls[name]], capture_output=True, text=True,
                             timeout=seconds + 60).stdout
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        rows[name] = (*rates, rps)
        print(f"{label:<40} {rates[0]:>9.0f} {rates[1]:>9.0f} {rps:>9.0f}")
    (fa, ra, qa), (fb, rb, qb) = rows["a"], rows["b"]
    print(f"forwarded/direct: iperf3 {fb / fa:.2f}x / {rb / ra:.2f}x, wrk {qb / qa:.2f}x (goal >= 0.7x each)")


def failover(bench: Bench, echo: int, connections: int, run: int) -> float:
    """One failover: fresh gateways X and Y for an agent, requests at B, kill -9 of
    the gateway B forwards to; seconds until a request through B is echoed again."""
    x, y = f"x{connections}{run}", f"y{connections}{run}"
    bench.gateway(x)
    bench.gateway(y)
    name = f"failover-{connections}-{run}"
    agent = bench.agent(name, [x, y], "--allow", f"127.0.0.1:{echo}", "--connections", str(connections))
    agent_id = wait_for(lambda: bench.agent_id("b", name))
    hub = bench.api("b", "POST", f"/api/v1/agents/{agent_id}/tunnel",
                    {"target_port": echo, "tunnel_protocol": "tcp"})["hub_port"]
    wait_for(lambda: len(bench.holders(agent_id)) == connections)  # every session leased before the kill
    wait_for(lambda: echo_once(hub))
    before = {g: bench.joined(g) for g in (x, y)}
    wait_for(lambda: echo_once(hub))
    used = max((x, y), key=lambda g: bench.joined(g) - before[g])  # the gateway B forwarded to
    victim = bench.gateways[used]
    victim.kill()
    victim.wait(10)
    elapsed = until(lambda: echo_once(hub))
    bench.stop(agent)
    for gateway in (x, y):
        bench.stop(bench.gateways[gateway])
    return elapsed


def pause(bench: Bench, agent_id: str, web: int, repeats: int) -> list[float]:
    tunnel = bench.api("a", "POST", "/api/v1/tunnels", {"target": f"127.0.0.1:{web}", "agent_id": agent_id,
                                                        "protocol": "http", "name": "paused"})
    share = bench.api("a", "POST", f"/api/v1/tunnels/{tunnel['id']}/shares", {"name": "bench"})
    url = f"http://127.0.0.1:{bench.ports['b']}/" + share["share_url"].split("/", 3)[3]
    times = []
    for _ in range(repeats):
        wait_for(lambda: status_of(url) == 200)
        started = time.perf_counter()
        bench.api("a", "PATCH", f"/api/v1/tunnels/{tunnel['id']}", {"status": "paused"})
        until(lambda: status_of(url) == 503)
        times.append(time.perf_counter() - started)
        bench.api("a", "PATCH", f"/api/v1/tunnels/{tunnel['id']}", {"status": "active"})
    return times


def revoke(bench: Bench, repeats: int) -> tuple[list[float], list[float]]:
    team_id = [t["team_id"] for t in bench.admin("team", "list", "--json") if t["name"] == "default"][0]
    times, commands = [], []
    url = f"http://127.0.0.1:{bench.ports['b']}/api/v1/agents"
    for _ in range(repeats):
        dk = bench.admin("key", "create", "--team", team_id, "--kind", "dk", "--json")["key"]
        wait_for(lambda k=dk: status_of(url, {"Authorization": f"Bearer {k}"}) == 200)
        started = time.perf_counter()
        bench.admin("key", "revoke", "--team", team_id, dk, "--redis", bench.redis_url)
        returned = time.perf_counter()
        until(lambda k=dk: status_of(url, {"Authorization": f"Bearer {k}"}) == 401)
        times.append(time.perf_counter() - returned)
        commands.append(returned - started)
    return times, commands


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="hop,tools,service,failover,pause,revoke",
                        help="comma-separated: hop, tools (iperf3 and wrk), service, failover, pause, revoke")
    parser.add_argument("--seconds", type=int, default=5, help="length of each iperf3 and wrk run (tools)")
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=1000, help="service proxy and invoke requests per path")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    only = set(args.only.split(","))
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        sys.exit("redis-server not found: scripts/bootstrap --system-deps installs it")
    work = Path(tempfile.mkdtemp(prefix="relay-bench-fleet-"))
    bench = Bench(work, redis_bin)
    stack = contextlib.ExitStack()
    try:
        bench.gateway("a")
        bench.gateway("b")
        echo = echo_server()
        web = http_server()
        extra_allow: list[str] = []
        if "tools" in only:
            if not (shutil.which("iperf3") and shutil.which("wrk")):
                sys.exit("iperf3 and wrk are needed for --only tools: scripts/bootstrap --system-deps installs them")
            iperf_port = free_port()
            bench.procs.append(subprocess.Popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf_port)],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from tests.support.servers import start_nginx

            (work / "nginx").mkdir()
            nginx = stack.enter_context(start_nginx(work / "nginx"))
            extra_allow = ["--allow", f"127.0.0.1:{iperf_port}", "--allow", f"127.0.0.1:{nginx.port}"]
        bench.agent("bench", ["a"], "--allow", f"127.0.0.1:{echo}", "--allow", f"127.0.0.1:{web}", *extra_allow,
                    "--service", f"bench-web=127.0.0.1:{web},health=none")
        agent_id = wait_for(lambda: bench.agent_id("b", "bench"))
        print(f"one machine, {os.cpu_count()} cores (shared: numbers are noisy)")
        if "hop" in only:
            hop(bench, echo, args)
        if "tools" in only:
            hop_tools(bench, iperf_port, nginx.port, args.seconds)
        if "service" in only:
            service(bench, args)
        if "failover" in only:
            for connections, goal in ((2, "< 1000 ms"), (1, "< the first backoff step, 500 ms +-20 %")):
                times = [failover(bench, echo, connections, run) for run in range(args.repeats)]
                print(median_line(f"failover, --connections {connections}", times, goal))
        if "pause" in only:
            print(median_line("pause at A -> share refused (503) at B", pause(bench, agent_id, web, args.repeats),
                              "< 1000 ms"))
        if "revoke" in only:
            times, commands = revoke(bench, args.repeats)
            print(median_line("revoke (admin --redis) -> 401 at B", times, "< 1000 ms"))
            print(median_line("  (the revoke command itself ran)", commands, "none: a process start"))
    finally:
        bench.close()
        stack.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
