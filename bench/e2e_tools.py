"""End-to-end comparison of tunnels driven by C load generators, so the generator is
never the ceiling (issue 14's table).

    .venv/bin/python bench/e2e_tools.py [--reps 3] [--duration 5] [--quick]
                                        [--paths direct,ssh-tt,ssh-N,hub,connect,nginx-proxy,http-tunnel]
                                        [--rows bulk,agg,rr,cfb,wrk,pgbench,redis]
                                        [--baseline DIR]

Every path carries the same targets, all on 127.0.0.1:

* ``direct``: the client reaches the target itself;
* ``ssh-tt`` / ``ssh-N``: OpenSSH reverse forwarding (``ssh -R``) from the "agent side"
  to a private sshd, one ssh connection per mode carrying every target; ``-tt`` forces
  a pty so both ends set TCP_NODELAY, ``-N`` leaves Nagle on;
* ``hub``: ``relay gateway`` + ``relay agent``, one tcp tunnel per target, clients dial
  the hub ports;
* ``hub-wss``: the same with TLS on the agent link (a second gateway serving TLS with a
  test CA's certificate, its agent dialling ``wss://``), as OpenSSH encrypts its link;
* ``connect``: the same tunnels reached through ``relay connect`` (one process per
  tunnel, listening locally);
* ``base`` (with ``--baseline DIR``): the hub port of a second gateway + agent running
  the relay package found in DIR (another commit, its extensions built), interleaved
  with ``hub`` for an A/B of two commits in one run;
* ``nginx-proxy`` / ``http-tunnel`` (the wrk row only): nginx as a reverse proxy, and
  relay's HTTP tunnel, in front of the same nginx.

Rows (``--rows``) and their generators: ``bulk`` (iperf3, one stream, forward and
``-R``), ``agg`` (iperf3 ``-P 32``: aggregate and fastest/slowest stream), ``rr`` (64-byte
request/response on one connection, bench/c/rr.c), ``cfb`` (connect, 1 byte echoed,
close, bench/c/rr.c), ``wrk`` (wrk -t2 -c64, 1 KiB from nginx), ``pgbench`` (select-only,
-c8 -j2), ``redis`` (redis-benchmark GET, plain and -P 16). Each row also gives the
tunnel's CPU time (user + system of the tunnel's processes: gateway, agent and relay
connect; ssh and its sshd; the nginx proxy) per GB, per connection or per request.

Paths are interleaved within each repetition so machine noise spreads evenly; the table
gives medians (and min-max with --spread). Results are written as JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import _topology as topo  # noqa: E402
import psutil  # noqa: E402
from e2e_http import start_nginx_proxy  # noqa: E402

from tests.support.servers import start_nginx, start_postgres, start_redis, start_sshd  # noqa: E402

HOST = "127.0.0.1"
TCP_PATHS = ("direct", "ssh-tt", "ssh-N", "hub", "base", "hub-wss", "connect")
HTTP_PATHS = ("nginx-proxy", "http-tunnel")
ROWS = ("bulk", "agg", "rr", "cfb", "wrk", "pgbench", "redis")
TARGETS = ("iperf", "echo", "nginx", "pg", "redis")
START = time.monotonic()


def log(text: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {text}", flush=True)


# ----------------------------------------------------------------------------- processes


def build_rr(workdir: Path) -> str:
    """Compile bench/c/rr.c (the latency client and echo target) into ``workdir``."""
    out = workdir / "rr"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(ROOT / "bench" / "c" / "rr.c")], check=True)
    return str(out)


def tree_cpu(pids: list[int]) -> float:
    """User + system seconds of these processes and all their descendants alive now."""
    total = 0.0
    seen: set[int] = set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            if proc.pid in seen:
                continue
            seen.add(proc.pid)
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
    return total


class Route:
    """One way to reach the targets: a local port per target and the tunnel's processes."""

    def __init__(self, name: str, ports: dict[str, int], pids: list[int], url: Optional[str] = None) -> None:
        self.name = name
        self.ports = ports
        self.pids = pids
        self.url = url  # the 1 KiB file's URL, where it is not http://HOST:ports["nginx"]/1k.bin

    def cpu(self) -> float:
        return tree_cpu(self.pids) if self.pids else 0.0


def relay_tunnels(relay: topo.Relay, targets: dict[str, int]) -> dict[str, dict[str, Any]]:
    """One tcp tunnel per target: its hub port and ws:// URL."""
    out = {}
    for name, port in targets.items():
        status, body = topo._api(relay.port, "POST", f"/api/v1/agents/{relay.agent_id}/tunnel",
                                 relay.keys["sk"], {"target_port": port, "tunnel_protocol": "tcp"})
        if status != 200:
            raise RuntimeError(f"tunnel to {name}: {status} {body}")
        out[name] = body
    return out


def start_connects(procs: topo.Procs, relay: topo.Relay, tunnels: dict[str, dict[str, Any]]) -> Route:
    """``relay connect`` per tunnel, each on its own local port."""
    ports: dict[str, int] = {}
    pids = [relay.gateway.pid, relay.agent.pid]
    for name, body in tunnels.items():
        port = topo._free_port()
        proc = procs.spawn(f"connect-{name}", [*relay.cmd, "connect", body["tunnel_url"], "--listen",
                                                f"{HOST}:{port}", "--log-level", "warning"])
        topo.wait_for(lambda p=port: topo.tcp_accepts(p), 20, f"relay connect {name}", proc, procs)
        ports[name] = port
        pids.append(proc.pid)
    return Route("connect", ports, pids)


# ----------------------------------------------------------------------------- generators


def iperf(port: int, seconds: float, *extra: str) -> dict[str, Any]:
    done = subprocess.run(["iperf3", "-c", HOST, "-p", str(port), "-t", f"{seconds:g}", "-J",
                           "--connect-timeout", "5000", *extra],
                          capture_output=True, text=True, timeout=seconds + 60)
    data = json.loads(done.stdout or "{}")
    if done.returncode != 0 or "error" in data:
        raise RuntimeError(f"iperf3 {' '.join(extra)}: {data.get('error') or done.stderr}")
    return data


def run_bulk(path: Route, seconds: float, reverse: bool) -> dict[str, float]:
    cpu0 = path.cpu()
    data = iperf(path.ports["iperf"], seconds, *(["-R"] if reverse else []))
    cpu = path.cpu() - cpu0
    received = data["end"]["sum_received"]
    gb = received["bytes"] / 1e9
    return {"mbps": received["bits_per_second"] / 8 / 1e6, "cpu_s_per_gb": cpu / gb if path.pids else 0.0}


def run_agg(path: Route, seconds: float) -> dict[str, float]:
    cpu0 = path.cpu()
    data = iperf(path.ports["iperf"], seconds, "-P", "32", "-R")
    cpu = path.cpu() - cpu0
    received = data["end"]["sum_received"]
    rates = [s["receiver"]["bits_per_second"] for s in data["end"]["streams"]]
    return {"mbps": received["bits_per_second"] / 8 / 1e6,
            "fairness": max(rates) / min(rates) if min(rates) > 0 else float("inf"),
            "cpu_s_per_gb": cpu / (received["bytes"] / 1e9) if path.pids else 0.0}


def run_rr(rr: str, path: Route, seconds: float) -> dict[str, float]:
    out = subprocess.run([rr, "rr", str(path.ports["echo"]), f"{seconds:g}", "64"],
                         capture_output=True, text=True, timeout=seconds + 30, check=True).stdout.split()
    return {"samples": float(out[0]), "p50_us": float(out[1]), "p99_us": float(out[2])}


def run_cfb(rr: str, path: Route, seconds: float) -> dict[str, float]:
    cpu0 = path.cpu()
    out = subprocess.run([rr, "connect", str(path.ports["echo"]), f"{seconds:g}"],
                         capture_output=True, text=True, timeout=seconds + 30, check=True).stdout.split()
    cpu = path.cpu() - cpu0
    count = float(out[0])
    return {"samples": count, "p50_us": float(out[1]), "p99_us": float(out[2]),
            "cpu_us_per_conn": cpu / count * 1e6 if path.pids and count else 0.0}


def run_wrk(path: Route, seconds: float) -> dict[str, float]:
    url = path.url or f"http://{HOST}:{path.ports['nginx']}/1k.bin"
    cpu0 = path.cpu()
    done = subprocess.run(["wrk", "-t2", "-c64", f"-d{seconds:g}s", str(url)],
                          capture_output=True, text=True, timeout=seconds + 30)
    cpu = path.cpu() - cpu0
    rps = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
    total = re.search(r"(\d+) requests in", done.stdout)
    if done.returncode != 0 or not rps or not total:
        raise RuntimeError(f"wrk: {done.stdout} {done.stderr}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    return {"rps": float(rps.group(1)), "non2xx": float(errors.group(1)) if errors else 0.0,
            "cpu_us_per_req": cpu / int(total.group(1)) * 1e6 if path.pids else 0.0}


def run_pgbench(pg: Any, path: Route, seconds: float) -> dict[str, float]:
    done = subprocess.run([pg.tool("pgbench"), "-S", "-n", "-c", "8", "-j", "2", "-T", f"{int(max(1, seconds))}"],
                          capture_output=True, text=True, env=pg.env(path.ports["pg"]), timeout=seconds + 60)
    tps = re.search(r"tps = ([\d.]+)", done.stdout)
    if done.returncode != 0 or not tps:
        raise RuntimeError(f"pgbench: {done.stdout} {done.stderr}")
    return {"tps": float(tps.group(1))}


_REDIS_RATE: dict[tuple[str, int], float] = {}  # (path, pipeline depth) -> the last rate measured


def run_redis(path: Route, seconds: float, pipeline: int) -> dict[str, float]:
    # redis-benchmark runs a request count, not a time: size the count from the last
    # rate measured on this path at this depth, so each run lasts about ``seconds``.
    rate = _REDIS_RATE.get((path.name, pipeline), 10_000.0 * pipeline)
    requests = max(1000, int(rate * seconds))
    argv = ["redis-benchmark", "-h", HOST, "-p", str(path.ports["redis"]), "-t", "get", "-n", str(requests),
            "-c", "50", "-P", str(pipeline), "--csv", "-q"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds * 10 + 60)
    match = re.search(r'"GET","([\d.]+)"', done.stdout)
    if done.returncode != 0 or not match:
        raise RuntimeError(f"redis-benchmark: {done.stdout} {done.stderr}")
    _REDIS_RATE[path.name, pipeline] = float(match.group(1))
    return {"rps": float(match.group(1))}


# ----------------------------------------------------------------------------- table

# (row key, label, metric, unit, higher is better)
TABLE = [
    ("bulk_fwd", "iperf3 1 stream fwd", "mbps", "MB/s", True),
    ("bulk_rev", "iperf3 1 stream rev", "mbps", "MB/s", True),
    ("bulk_fwd", "  CPU s per GB fwd", "cpu_s_per_gb", "s", False),
    ("bulk_rev", "  CPU s per GB rev", "cpu_s_per_gb", "s", False),
    ("agg", "iperf3 -P 32 aggregate", "mbps", "MB/s", True),
    ("agg", "  fastest/slowest", "fairness", "x", False),
    ("rr", "64 B req/resp p50", "p50_us", "us", False),
    ("rr", "64 B req/resp p99", "p99_us", "us", False),
    ("cfb", "connect + 1 B echo p50", "p50_us", "us", False),
    ("cfb", "connect + 1 B echo p99", "p99_us", "us", False),
    ("cfb", "  CPU us per connection", "cpu_us_per_conn", "us", False),
    ("wrk", "wrk -t2 -c64 1 KiB req/s", "rps", "req/s", True),
    ("wrk", "  CPU us per request", "cpu_us_per_req", "us", False),
    ("pgbench", "pgbench -S TPS", "tps", "TPS", True),
    ("redis", "redis GET req/s", "rps", "req/s", True),
    ("redis_p16", "redis GET -P 16 req/s", "rps", "req/s", True),
]


def table(results: dict[str, dict[str, list[dict[str, float]]]], paths: list[str], spread: bool) -> str:
    width = max(18 if spread else 12, *(len(p) + 2 for p in paths))
    lines = [f"{'row':30}" + "".join(f"{p:>{width}}" for p in paths)]
    for key, label, metric, _unit, _higher in TABLE:
        cells = []
        any_value = False
        for p in paths:
            values = [r[metric] for r in results.get(key, {}).get(p, []) if metric in r]
            if not values or (metric.startswith("cpu") and p == "direct"):
                cells.append(f"{'':>{width}}")
                continue
            any_value = True
            med = statistics.median(values)
            cell = _fmt(med)
            if spread and len(values) > 1:
                cell += f" ({_fmt(min(values))}-{_fmt(max(values))})"
            cells.append(f"{cell:>{width}}")
        if any_value:
            lines.append(f"{label:30}" + "".join(cells))
    return "\n".join(lines)


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratios(results: dict[str, dict[str, list[dict[str, float]]]]) -> list[str]:
    """relay's cells over the peer each goal names (issue 14's goals)."""

    def med(key: str, path: str, metric: str) -> Optional[float]:
        values = [r[metric] for r in results.get(key, {}).get(path, []) if metric in r]
        return statistics.median(values) if values else None

    goals = [
        ("bulk fwd: hub / ssh-tt", "bulk_fwd", "hub", "ssh-tt", "mbps", ">= 1.1"),
        ("bulk rev: hub / ssh-tt", "bulk_rev", "hub", "ssh-tt", "mbps", ">= 1.1"),
        ("bulk fwd: hub / direct", "bulk_fwd", "hub", "direct", "mbps", "moonshot 0.4"),
        ("32 streams: hub / better ssh", "agg", "hub", "ssh*", "mbps", ">= 1.1"),
        ("rr p50: hub / ssh-tt", "rr", "hub", "ssh-tt", "p50_us", "<= 1.0"),
        ("rr p99: hub / ssh-tt", "rr", "hub", "ssh-tt", "p99_us", "<= 1.3"),
        ("connect p50: hub / ssh-tt", "cfb", "hub", "ssh-tt", "p50_us", "<= 1.0"),
        ("connect p99: hub / ssh-tt", "cfb", "hub", "ssh-tt", "p99_us", "<= 1.5"),
        ("wrk: hub / ssh-tt", "wrk", "hub", "ssh-tt", "rps", ">= 1.3"),
        ("wrk: http-tunnel / nginx-proxy", "wrk", "http-tunnel", "nginx-proxy", "rps", ">= 1.0"),
        ("wrk CPU/req: http-tunnel / nginx-proxy", "wrk", "http-tunnel", "nginx-proxy", "cpu_us_per_req", "<= 1.5"),
        ("pgbench: hub / ssh-tt", "pgbench", "hub", "ssh-tt", "tps", ">= 1.1"),
        ("redis GET: hub / ssh-tt", "redis", "hub", "ssh-tt", "rps", ">= 1.1"),
        ("bulk fwd: hub-wss / ssh-tt", "bulk_fwd", "hub-wss", "ssh-tt", "mbps", ">= 0.9"),
        ("bulk rev: hub-wss / ssh-tt", "bulk_rev", "hub-wss", "ssh-tt", "mbps", ">= 0.9"),
        ("bulk fwd: connect / hub", "bulk_fwd", "connect", "hub", "mbps", ">= 0.9"),
        ("bulk rev: connect / hub", "bulk_rev", "connect", "hub", "mbps", ">= 0.9"),
        ("connect p50: connect / hub", "cfb", "connect", "hub", "p50_us", "<= 1.2"),
    ]
    # --baseline: this checkout over the other commit, row by row (no goal: an A/B).
    goals += [(f"{label}: hub / base", key, "hub", "base", metric, "A/B")
              for key, label, metric, _unit, _higher in TABLE if not label.startswith(" ")]
    out = []
    for label, key, mine, peer, metric, goal in goals:
        a = med(key, mine, metric)
        if peer == "ssh*":
            candidates = [v for v in (med(key, "ssh-tt", metric), med(key, "ssh-N", metric)) if v]
            b = max(candidates) if candidates else None
        else:
            b = med(key, peer, metric)
        if a is not None and b:
            out.append(f"{label:42} {a / b:6.2f}x   (goal {goal})")
    return out


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--quick", action="store_true", help="1 repetition of 2 s each")
    parser.add_argument("--paths", default=",".join(p for p in TCP_PATHS + HTTP_PATHS if p != "base"))
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--spread", action="store_true", help="show min-max beside each median")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also path 'base': the hub port of the relay package in DIR (another commit)")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.duration = 1, 2.0
    paths = [p for p in args.paths.split(",") if p]
    if args.baseline and "base" not in paths:
        paths.insert(paths.index("hub") + 1 if "hub" in paths else len(paths), "base")
    if "base" in paths and not args.baseline:
        parser.error("path base needs --baseline DIR")
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(paths) - set(TCP_PATHS + HTTP_PATHS) | set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown path or row: {', '.join(sorted(unknown))}")
    for tool in ("iperf3", "wrk", "redis-benchmark", "gcc", "nginx"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin") is None:
            parser.error(f"{tool} is not installed (scripts/bootstrap --system-deps installs it)")
    topo.raise_nofile()

    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="relay-e2e-tools-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        procs = topo.Procs(workdir)
        stack.callback(procs.stop_all)
        rr = build_rr(workdir)

        targets: dict[str, int] = {}
        iperf_port = topo._free_port()
        proc = procs.spawn("iperf3", ["iperf3", "-s", "-B", HOST, "-p", str(iperf_port)])
        topo.wait_for(lambda: topo.tcp_accepts(iperf_port), 20, "iperf3 server", proc, procs)
        targets["iperf"] = iperf_port
        proc = procs.spawn("echo", [rr, "serve", "0"], stdout=subprocess.PIPE)
        targets["echo"] = int(proc.stdout.readline())
        for sub in ("nginx", "redis", "ssh-tt", "ssh-N"):
            (workdir / sub).mkdir()
        nginx = stack.enter_context(start_nginx(workdir / "nginx"))
        targets["nginx"] = nginx.port
        pg = stack.enter_context(start_postgres())
        subprocess.run([pg.tool("pgbench"), "-i", "-q", "-s", "10"], env=pg.env(), check=True,
                       capture_output=True, timeout=300)
        targets["pg"] = pg.port
        redis = stack.enter_context(start_redis(workdir / "redis"))
        subprocess.run([*redis.cli_args(), "set", "key:__rand_int__", "x" * 3], check=True, capture_output=True)
        targets["redis"] = redis.port

        built: dict[str, Route] = {"direct": Route("direct", dict(targets), [])}
        for mode, tty in (("ssh-tt", True), ("ssh-N", False)):
            if mode in paths:
                sshd = stack.enter_context(start_sshd(workdir / mode))
                names = list(targets)
                ports = topo.start_ssh_forward(procs, sshd, mode, [targets[n] for n in names], tty)
                ssh = next(p for p in procs.procs if getattr(p, "bench_name", "") == mode)
                built[mode] = Route(mode, dict(zip(names, ports, strict=True)), [ssh.pid, sshd.pid])
        if {"hub", "connect", "http-tunnel"} & set(paths):
            relay = topo.Relay(procs)
            tunnels = relay_tunnels(relay, targets)
            relay_pids = [relay.gateway.pid, relay.agent.pid]
            built["hub"] = Route("hub", {n: int(b["hub_port"]) for n, b in tunnels.items()}, relay_pids)
            if "connect" in paths:
                built["connect"] = start_connects(procs, relay, tunnels)
            if "http-tunnel" in paths:
                status, body = topo._api(relay.port, "POST", f"/api/v1/agents/{relay.agent_id}/tunnel",
                                         relay.keys["sk"], {"target_port": nginx.port, "tunnel_protocol": "http"})
                if status != 200:
                    raise RuntimeError(f"http tunnel: {status} {body}")
                built["http-tunnel"] = Route("http-tunnel", {}, relay_pids, url=body["tunnel_url"] + "1k.bin")
        if "base" in paths:
            base = topo.Relay(procs, name="-base", source=Path(args.baseline).resolve())
            hubs = {n: base.tunnel(port) for n, port in targets.items()}
            built["base"] = Route("base", hubs, [base.gateway.pid, base.agent.pid])
        if "hub-wss" in paths:
            import trustme

            ca = trustme.CA()
            leaf = ca.issue_cert("127.0.0.1")
            cert, key, ca_file = workdir / "gw.pem", workdir / "gw.key", workdir / "ca.pem"
            leaf.cert_chain_pems[0].write_to_path(str(cert))
            leaf.private_key_pem.write_to_path(str(key))
            ca.cert_pem.write_to_path(str(ca_file))
            secure = topo.Relay(procs, name="-wss", tls=(cert, key, ca_file))
            hubs = {n: secure.tunnel(port) for n, port in targets.items()}
            built["hub-wss"] = Route("hub-wss", hubs, [secure.gateway.pid, secure.agent.pid])
        if "nginx-proxy" in paths:
            pport = start_nginx_proxy(procs, workdir / "nginx-proxy", nginx.port, workers=1)
            proxy = next(p for p in procs.procs if getattr(p, "bench_name", "") == "nginx-proxy")
            built["nginx-proxy"] = Route("nginx-proxy", {"nginx": pport}, [proxy.pid])
        order = [p for p in paths if p in built]
        tcp_order = [p for p in order if p in TCP_PATHS]
        log(f"paths up: {', '.join(order)}; {args.reps} repetition(s) of {args.duration:g} s per measurement")

        runs: list[tuple[str, list[str], Callable[[Route], dict[str, float]]]] = []
        d = args.duration
        if "bulk" in rows:
            runs += [("bulk_fwd", tcp_order, lambda p: run_bulk(p, d, False)),
                     ("bulk_rev", tcp_order, lambda p: run_bulk(p, d, True))]
        if "agg" in rows:
            runs.append(("agg", tcp_order, lambda p: run_agg(p, d)))
        if "rr" in rows:
            runs.append(("rr", tcp_order, lambda p: run_rr(rr, p, d)))
        if "cfb" in rows:
            runs.append(("cfb", tcp_order, lambda p: run_cfb(rr, p, d)))
        if "wrk" in rows:
            runs.append(("wrk", order, lambda p: run_wrk(p, d)))
        if "pgbench" in rows:
            runs.append(("pgbench", tcp_order, lambda p: run_pgbench(pg, p, d)))
        if "redis" in rows:
            runs += [("redis", tcp_order, lambda p: run_redis(p, d, 1)),
                     ("redis_p16", tcp_order, lambda p: run_redis(p, d, 16))]
        for rep in range(args.reps):
            for key, on, fn in runs:
                for name in on:
                    try:
                        value = fn(built[name])
                    except (RuntimeError, subprocess.SubprocessError, KeyError, ValueError) as exc:
                        log(f"rep {rep + 1} {key} {name}: FAILED {exc}")
                        continue
                    results.setdefault(key, {}).setdefault(name, []).append(value)
                    shown = ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
                    log(f"rep {rep + 1} {key:9} {name:12} {shown}")

    print()
    print(f"medians of {args.reps} run(s), {args.duration:g} s each, {os.cpu_count()} cores")
    print(table(results, order, args.spread))
    print()
    for line in ratios(results):
        print(line)
    outdir = ROOT / "bench" / "results"
    outdir.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = outdir / f"e2e_tools-{stamp}.json"
    out.write_text(json.dumps({"args": vars(args), "paths": order, "results": results}, indent=1))
    print(f"\nwritten: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
