"""``relay connect`` against the hub port of the same tunnel, in one run.

    .venv/bin/python bench/e2e_connect.py [--quick] [--only bulk,latency,idle] [--baseline DIR]

Topology, all on 127.0.0.1: the uvloop source/sink/echo target of bench/_topology.py,
``relay gateway`` + ``relay agent`` as processes (log level warning), one tcp tunnel to
the target. Paths (the same client, this process on uvloop, as bench/e2e_tcp.py):

* ``hub``: the tunnel's hub port;
* ``connect``: ``relay connect TUNNEL_URL --mode mux``: one multiplexed WebSocket;
* ``plain``: ``relay connect --mode plain``: one WebSocket per connection, the only form
  before the multiplexed one (same client and gateway code as then);
* ``base`` (with ``--baseline DIR``): the relay package in DIR (a worktree of an older
  commit, extensions copied in): its own gateway, agent and ``relay connect``.

Benchmarks: ``bulk`` (one stream each direction, MB/s and MB per CPU-second of the relay
processes, ``relay connect`` included), ``latency`` (connect + 64-byte request to the
first response byte, fresh connection each time: p50/p99; 64-byte request/response on
one connection), ``idle`` (N idle connections on fresh processes: RSS growth per
connection of gateway + agent, and of ``relay connect``). Each repeated (3, 1 with
--quick), paths interleaved; medians. Goals of issue 14 against the hub port: bulk at
least 0.9x, connect + first byte at most 1.2x, idle memory per connection at most the
hub port's (gateway + agent + relay connect against gateway + agent).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import _topology as topo  # noqa: E402
import e2e_tcp  # noqa: E402
import uvloop  # noqa: E402

PATHS = ("hub", "connect", "plain", "base")
BENCHMARKS = ("bulk", "latency", "idle")


def start_connect(procs: topo.Procs, relay: topo.Relay, url: str, mode: Optional[str], name: str,
                  source: Optional[Path] = None) -> tuple[int, int]:
    """A ``relay connect`` process on ``url``; returns (local port, pid)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"PYTHONPATH": str(source)} if source else {})}
    argv = [*relay.cmd, "connect", url, "--listen", f"{topo.HOST}:0", "--log-level", "warning"]
    if mode is not None:
        argv += ["--mode", mode]
    proc = procs.spawn(name, argv, env=env, cwd=source)
    line = topo.wait_for(lambda: re.search(r"listening on [\d.]+:(\d+)", procs.log(name)), 20,
                         f"relay connect ({name})", proc, procs)
    return int(line.group(1)), proc.pid


def tunnel_url(relay: topo.Relay, target: int) -> tuple[int, str]:
    status, body = topo._api(relay.port, "POST", f"/api/v1/agents/{relay.agent_id}/tunnel", relay.keys["sk"],
                             {"target_port": target, "tunnel_protocol": "tcp"})
    if status != 200:
        raise RuntimeError(f"tunnel: {status} {body}")
    return int(body["hub_port"]), str(body["tunnel_url"])


async def idle_connections(port: int, count: int, pids: dict[str, int]) -> dict[str, float]:
    """RSS growth (KiB) per connection of ``pids`` with ``count`` idle connections to
    ``port``, each checked end to end with a 1-byte echo (e2e_tcp.idle_streams, opened
    in batches of 50 throughout, warm-up included: a burst of 200 overflowed the listen
    backlog on a busy machine)."""
    import psutil

    def rss() -> dict[str, int]:
        return {name: psutil.Process(pid).memory_info().rss for name, pid in pids.items()}

    async def open_one() -> Any:
        error: BaseException = RuntimeError("no attempt")
        for attempt in range(10):
            try:
                transport, proto = await e2e_tcp._connect(e2e_tcp._Echo, port)
                waiter = proto.expect(1)
                transport.write(b"E!")
                await asyncio.wait_for(waiter, 30)
                return transport
            except (OSError, asyncio.TimeoutError) as exc:
                error = exc
                await asyncio.sleep(0.1 * (attempt + 1))
        raise RuntimeError(f"cannot open an idle connection: {error!r}")

    async def open_many(n: int) -> list[Any]:
        out: list[Any] = []
        for i in range(0, n, 50):
            out += await asyncio.gather(*(open_one() for _ in range(min(50, n - i))))
        return out

    for transport in await open_many(200):  # first-use allocations are not per connection
        transport.close()
    await asyncio.sleep(1.0)
    before = rss()
    conns = await open_many(count)
    await asyncio.sleep(2.0)
    during = rss()
    for transport in conns:
        transport.close()
    return {name: (during[name] - before[name]) / count / 1024 for name in pids}


class Run:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.reps = 1 if args.quick else args.reps
        self.warmup = 0.3 if args.quick else 0.5
        self.window = 1.0 if args.quick else 2.0
        self.workdir = workdir
        self.procs = topo.Procs(workdir)
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.ports: dict[str, int] = {}
        self.cpu_pids: dict[str, list[int]] = {}
        self.target = 0

    def add(self, metric: str, path: str, value: float) -> None:
        self.samples.setdefault(metric, {}).setdefault(path, []).append(value)

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - START:6.1f}s] {text}", flush=True)

    def setup(self) -> None:
        self.target = topo.start_target(self.procs)
        if set(self.args.only) - {"idle"}:
            relay = topo.Relay(self.procs)
            hub, url = tunnel_url(relay, self.target)
            relay_pids = [relay.gateway.pid, relay.agent.pid]
            self.ports["hub"] = hub
            self.cpu_pids["hub"] = relay_pids
            for path, mode in (("connect", "mux"), ("plain", "plain")):
                port, pid = start_connect(self.procs, relay, url, mode, f"connect-{path}")
                self.ports[path] = port
                self.cpu_pids[path] = [*relay_pids, pid]
            if self.args.baseline:
                source = Path(self.args.baseline).resolve()
                base = topo.Relay(self.procs, source=source, name="-base")
                _, base_url = tunnel_url(base, self.target)
                port, pid = start_connect(self.procs, base, base_url, None, "connect-base", source)
                self.ports["base"] = port
                self.cpu_pids["base"] = [base.gateway.pid, base.agent.pid, pid]
        self.log(f"ports: {self.ports}")

    def paths(self) -> list[str]:
        return [p for p in PATHS if p in self.ports]

    def bench_bulk(self, run: Any) -> None:
        for rep in range(self.reps):
            for path in self.paths():
                port, pids = self.ports[path], self.cpu_pids[path]
                up, up_eff = run(e2e_tcp.upload(port, self.warmup, self.window, pids))
                [down], down_eff = run(e2e_tcp.downloads(port, 1, self.warmup, self.window, pids))
                self.add("bulk_up", path, up)
                self.add("bulk_down", path, down)
                if up_eff and down_eff:
                    self.add("bulk_up_eff", path, up_eff)
                    self.add("bulk_down_eff", path, down_eff)
                self.log(f"  rep {rep + 1} {path:>8}: up {up:8.1f} MB/s  down {down:8.1f} MB/s")

    def bench_latency(self, run: Any) -> None:
        count = 100 if self.args.quick else 300
        for rep in range(self.reps):
            for path in self.paths():
                port = self.ports[path]
                cfb = run(e2e_tcp.connect_first_byte(port, 2.0 if self.args.quick else 4.0, count))
                rr = run(e2e_tcp.request_response(port, 1.0 if self.args.quick else 2.0))
                values = {"cfb_p50": e2e_tcp.percentile(cfb, 50), "cfb_p99": e2e_tcp.percentile(cfb, 99),
                          "rr_p50": e2e_tcp.percentile(rr, 50), "rr_p99": e2e_tcp.percentile(rr, 99)}
                for metric, value in values.items():
                    self.add(metric, path, value * 1e6)
                self.log(f"  rep {rep + 1} {path:>8}: connect+first byte p50 {values['cfb_p50'] * 1e6:6.0f} us "
                         f"p99 {values['cfb_p99'] * 1e6:6.0f} us ({len(cfb)}); req/resp p50 "
                         f"{values['rr_p50'] * 1e6:5.0f} us p99 {values['rr_p99'] * 1e6:5.0f} us")

    def bench_idle(self, run: Any) -> None:
        """Fresh processes per path, so neither baseline nor growth carries heap from the
        other benchmarks. ``relay connect``'s own growth is added to gateway + agent."""
        count = self.args.idle_streams
        runs = [(rep, p) for rep in range(self.reps) for p in ("hub", "connect", "plain", "base") if p in self.args.paths]
        for rep, path in runs:  # repeated (--reps), paths interleaved, as the other benchmarks
            if path == "base" and not self.args.baseline:
                continue
            sub = topo.Procs(self.workdir / f"idle-{path}-{rep}")  # fresh logs: "listening on" is new
            sub.workdir.mkdir(exist_ok=True)
            try:
                source = Path(self.args.baseline).resolve() if path == "base" else None
                relay = topo.Relay(sub, source=source, name="-base" if source else "")
                hub, url = tunnel_url(relay, self.target)
                pids = {"gateway": relay.gateway.pid, "agent": relay.agent.pid}
                port = hub
                if path != "hub":
                    port, pid = start_connect(sub, relay, url, {"connect": "mux", "plain": "plain"}.get(path),
                                              f"connect-{path}", source)
                    pids["connect"] = pid
                kib = run(idle_connections(port, count, pids))
                total = sum(kib.values())
                self.add("idle_total", path, total)
                self.add("idle_relay", path, kib["gateway"] + kib["agent"])
                if "connect" in kib:
                    self.add("idle_connect", path, kib["connect"])
                self.log(f"  rep {rep + 1} {path:>8}: {count} idle connections: " +
                         ", ".join(f"{k} {v:.2f}" for k, v in kib.items()) + f" KiB each (total {total:.2f})")
            finally:
                sub.stop_all()


METRICS = [
    ("bulk_up", "bulk client->target", "MB/s", True, 0.9),
    ("bulk_down", "bulk target->client", "MB/s", True, 0.9),
    ("bulk_up_eff", "  MB per CPU-second, up", "MB/cpus", True, None),
    ("bulk_down_eff", "  MB per CPU-second, down", "MB/cpus", True, None),
    ("cfb_p50", "connect + first byte p50", "us", False, 1.2),
    ("cfb_p99", "connect + first byte p99", "us", False, 1.2),
    ("rr_p50", "64 B req/resp p50", "us", False, None),
    ("rr_p99", "64 B req/resp p99", "us", False, None),
    ("idle_total", "idle KiB/conn, all relay processes", "KiB", False, 1.0),
    ("idle_relay", "  of which gateway + agent", "KiB", False, None),
    ("idle_connect", "  of which relay connect", "KiB", False, None),
]


def table(run: Run) -> str:
    cols = [p for p in PATHS if any(p in per for per in run.samples.values())]
    head = f"{'metric':<38}{'unit':>8}" + "".join(f"{c:>10}" for c in cols) + f"{'connect/hub':>13}{'goal':>8}"
    lines = [head, "-" * len(head)]
    for metric, label, unit, higher, goal in METRICS:
        per = run.samples.get(metric)
        if not per:
            continue
        med = {p: statistics.median(v) for p, v in per.items()}
        cells = "".join(f"{e2e_tcp._fmt(med.get(c)):>10}" for c in cols)
        ratio = med["connect"] / med["hub"] if med.get("hub") and "connect" in med else None
        verdict = ""
        if ratio is not None and goal is not None:
            ok = ratio >= goal if higher else ratio <= goal
            verdict = f"{'>=' if higher else '<='}{goal:g} {'ok' if ok else 'SHORT'}"
        lines.append(f"{label:<38}{unit:>8}{cells}{(f'{ratio:.2f}' if ratio else ''):>13}  {verdict}")
    return "\n".join(lines)


START = time.monotonic()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repetition, shorter windows")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--paths", default=",".join(PATHS), help="subset of the paths for idle")
    parser.add_argument("--idle-streams", type=int, default=1000,
                        help="idle connections (a tunnel carries at most 1024 at once: MAX_HUB_CONNECTIONS)")
    parser.add_argument("--baseline", metavar="DIR", help="also run the relay package in DIR (column base)")
    args = parser.parse_args()
    args.only = [n for n in args.only.split(",") if n]
    args.paths = [n for n in args.paths.split(",") if n]
    topo.raise_nofile()
    from relay import EXTENSIONS

    workdir = Path(tempfile.mkdtemp(prefix="relay-connect-"))
    run = Run(args, workdir)
    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    status = 0
    try:
        run.setup()
        for name in BENCHMARKS:
            if name in args.only:
                run.log(f"== {name}")
                getattr(run, f"bench_{name}")(lambda coro: runner.run(asyncio.wait_for(coro, 300)))
    except Exception as exc:  # print what was measured
        run.log(f"ABORTED: {type(exc).__name__}: {exc}")
        status = 1
    finally:
        runner.close()
        run.procs.stop_all()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"relay connect vs hub port, {'quick' if args.quick else f'{run.reps} reps'}, medians; "
          f"extensions: {EXTENSIONS}; {os.cpu_count()} CPUs")
    print(table(run))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (out / f"e2e_connect-{stamp}.json").write_text(json.dumps(
        {"argv": sys.argv[1:], "samples": run.samples, "extensions": EXTENSIONS, "status": status}, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
