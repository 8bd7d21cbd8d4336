"""The fleet's registry at scale (issue 13): many agents over three gateways.

Starts a private redis-server, three gateways (a, b, c) sharing a temporary data
directory, an echo service, and ``--agents`` agents (2,000 by default) run as
``relay.agent.client.Agent`` objects in ``--procs`` processes (the embedding API: many
agent sessions in few processes), spread round robin over a and b. Then:

* memory: each gateway's RSS before and after, per agent it holds; the agent processes'
  RSS per session; Redis' ``used_memory`` per agent;
* forwarded lookups: ``--tunnels`` TCP tunnels opened at c, each to a different agent
  held by a or b; every connection to one of their hub ports looks its agent up in c's
  registry and forwards. A connection loop (``--seconds``) gives connections per second
  (each one lookup and one forwarded stream) and, from c's ``/metrics``, the registry
  lookups and the Redis round trips they caused (the goal: none once the location is
  cached).

    .venv/bin/python bench/fleet_scale.py [--agents 2000] [--procs 2] [--tunnels 100] [--seconds 5]

Prints the numbers; asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import psutil  # noqa: E402
from fleet import echo_server, free_port, wait_for  # noqa: E402

SECRET = "bench-secret"


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ----------------------------------------------------------------------------- agents process


def run_agents(urls: list[str], key: str, first: int, count: int, allow: str) -> None:
    """``count`` agents named scale-{first}...; agent i dials ``urls[i % len(urls)]``."""
    import logging

    import uvloop

    from relay.agent.client import Agent

    raise_nofile()
    logging.basicConfig(level=logging.WARNING)

    async def main() -> None:
        agents = [Agent(urls[i % len(urls)], key, name=f"scale-{i}", allow=[allow])
                  for i in range(first, first + count)]
        tasks = []
        for agent in agents:
            tasks.append(asyncio.create_task(agent.run()))
            await asyncio.sleep(0.002)  # a steady dial rate, not a thundering herd
        print("started", flush=True)
        await asyncio.gather(*tasks)

    uvloop.run(main())


# ----------------------------------------------------------------------------- measurements


def rss_kib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 1024


def metric(port: int, name: str) -> float:
    """Sum of every series of one metric on a gateway's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M))


def leases(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
        return int(json.loads(resp.read())["fleet"]["leases"])


async def connect_loop(ports: list[int], seconds: float, concurrency: int = 16) -> int:
    """Connect, send 8 bytes, read them back, close; round robin over ``ports``, with
    ``concurrency`` loops at once, for ``seconds``. Returns the number completed."""
    done = 0
    deadline = time.monotonic() + seconds

    async def worker(offset: int) -> None:
        nonlocal done
        i = offset
        while time.monotonic() < deadline:
            reader, writer = await asyncio.open_connection("127.0.0.1", ports[i % len(ports)])
            writer.write(b"12345678")
            await reader.readexactly(8)
            writer.close()
            done += 1
            i += concurrency

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--procs", type=int, default=2, help="processes the agents run in")
    parser.add_argument("--tunnels", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        sys.exit("redis-server not found: scripts/bootstrap --system-deps installs it")
    raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="relay-bench-fleet-scale-"))
    procs: list[subprocess.Popen] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RELAY_FLEET_SECRET": SECRET}
    try:
        redis_port = free_port()
        procs.append(subprocess.Popen([redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                       "--dir", str(work)], stdout=subprocess.DEVNULL))
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        ports: dict[str, int] = {}
        gateways: dict[str, subprocess.Popen] = {}
        for name in ("a", "b", "c"):
            ports[name] = free_port()
            log = work / f"{name}.log"
            gateways[name] = subprocess.Popen(
                [sys.executable, "-m", "relay", "gateway", "--listen", f"127.0.0.1:{ports[name]}", "--data",
                 str(work / "data"), "--redis", redis_url, "--gateway-id", name, "--log-level", "warning"],
                stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
            procs.append(gateways[name])
            wait_for(lambda lg=log: b"in the fleet, advertised at" in lg.read_bytes())
        keys = dict(re.findall(r"^  (sk|dk|ak)  (\S+)$", (work / "a.log").read_text(), re.M))
        echo = echo_server()
        time.sleep(1.0)
        before = {n: rss_kib(p.pid) for n, p in gateways.items()}
        redis_before = int(subprocess.run(["redis-cli", "-p", str(redis_port), "info", "memory"], capture_output=True,
                                          text=True).stdout.split("used_memory:")[1].split()[0])

        urls = [f"http://127.0.0.1:{ports['a']}", f"http://127.0.0.1:{ports['b']}"]
        per = -(-args.agents // args.procs)
        agent_procs = []
        started = time.monotonic()
        for k in range(args.procs):
            count = min(per, args.agents - k * per)
            proc = subprocess.Popen([sys.executable, __file__, "agents", ",".join(urls), str(k * per), str(count),
                                     f"127.0.0.1:{echo}"], env={**env, "RELAY_AGENT_KEY": keys["ak"]},
                                    stdout=subprocess.PIPE, stderr=(work / f"agents{k}.log").open("wb"))
            agent_procs.append(proc)
            procs.append(proc)
        for proc in agent_procs:
            assert proc.stdout is not None
            proc.stdout.readline()

        def all_held() -> bool:
            return leases(ports["a"]) + leases(ports["b"]) >= args.agents

        wait_for(all_held, timeout=max(120.0, args.agents * 0.1))
        connected = time.monotonic() - started
        time.sleep(2.0)  # let renewals and caches settle
        after = {n: rss_kib(p.pid) for n, p in gateways.items()}
        held = {n: leases(ports[n]) for n in ("a", "b", "c")}
        agents_rss = sum(rss_kib(p.pid) for p in agent_procs)
        redis_after = int(subprocess.run(["redis-cli", "-p", str(redis_port), "info", "memory"], capture_output=True,
                                         text=True).stdout.split("used_memory:")[1].split()[0])

        print(f"fleet registry at scale: {args.agents} agents in {args.procs} processes over gateways a and b, "
              f"c forwards; one machine, {os.cpu_count()} cores")
        print(f"all {args.agents} agents held after {connected:.1f} s; held: {held}")
        for n in ("a", "b"):
            if held[n]:
                print(f"gateway {n}: RSS {before[n] / 1024:.0f} -> {after[n] / 1024:.0f} MiB, "
                      f"{(after[n] - before[n]) / held[n]:.1f} KiB per agent held")
        print(f"gateway c (holds none, mirrors {args.agents} locations): RSS {before['c'] / 1024:.0f} -> "
              f"{after['c'] / 1024:.0f} MiB, {(after['c'] - before['c']) / args.agents * 1024:.0f} B per location")
        print(f"agent processes: {agents_rss / args.agents:.1f} KiB RSS per agent session")
        print(f"redis used_memory: {(redis_after - redis_before) / args.agents:.0f} B per agent")

        # Tunnels at c to agents held elsewhere: every connection is a lookup at c.
        def api(method: str, path: str, body: Any = None) -> Any:
            request = urllib.request.Request(f"http://127.0.0.1:{ports['c']}{path}", method=method,
                                             data=None if body is None else json.dumps(body).encode(),
                                             headers={"Authorization": f"Bearer {keys['sk']}"})
            with urllib.request.urlopen(request, timeout=30) as resp:
                return json.loads(resp.read())

        online = [a["agent_id"] for a in api("GET", "/api/v1/agents")["agents"] if a["online"]]
        hubs = [api("POST", f"/api/v1/agents/{agent}/tunnel", {"target_port": echo, "tunnel_protocol": "tcp"})
                ["hub_port"] for agent in online[:args.tunnels]]
        asyncio.run(connect_loop(hubs, 1.0))  # warm-up: every location used once
        lookups0 = metric(ports["c"], "relay_fleet_registry_lookups_total")
        fetches0 = metric(ports["c"], "relay_fleet_registry_fetches_total")
        cpu0 = psutil.Process(gateways["c"].pid).cpu_times()
        t0 = time.monotonic()
        count = asyncio.run(connect_loop(hubs, args.seconds))
        elapsed = time.monotonic() - t0
        cpu1 = psutil.Process(gateways["c"].pid).cpu_times()
        lookups = metric(ports["c"], "relay_fleet_registry_lookups_total") - lookups0
        fetches = metric(ports["c"], "relay_fleet_registry_fetches_total") - fetches0
        cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        print(f"forwarded connections through c to {len(hubs)} agents: {count / elapsed:.0f}/s over {elapsed:.1f} s "
              f"(echo of 8 bytes each, 16 at a time); c's CPU {cpu / count * 1e6:.0f} µs per connection")
        print(f"c's registry: {lookups:.0f} lookups, {fetches:.0f} Redis round trips "
              f"({fetches / max(1, count):.3f} per new stream; goal 0)")
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["agents"]:
        run_agents(sys.argv[2].split(","), os.environ["RELAY_AGENT_KEY"], int(sys.argv[3]), int(sys.argv[4]),
                   sys.argv[5])
    else:
        main()
