"""End-to-end UDP benchmark: relay's udp tunnels against socat's UDP forwarding and
against direct, measured in the same run with a C generator (bench/c/udp.c).

    .venv/bin/python bench/e2e_udp.py [--reps 3] [--duration 3] [--rate 10000]
                                      [--paths hub,connect,socat,direct] [--flows 16]

Paths, all to the same target (``udp serve``: counts datagrams, echoes pings) on
127.0.0.1:

* ``hub``: ``relay gateway`` + ``relay agent`` as processes, one udp tunnel session;
  the client sends to the gateway's UDP hub port;
* ``connect``: the same session reached through ``relay connect --udp`` (each local
  flow one WebSocket to the gateway);
* ``socat``: ``socat -T 30 UDP4-LISTEN:PORT,fork,reuseaddr UDP4:127.0.0.1:TARGET``, a
  child process per client address, what most users would set up by hand;
* ``direct``: the target itself (what the generator reaches with nothing between).

Rows: datagrams/s delivered to the target while ``udp send`` offers as many as the
kernel takes (64 B and 1200 B from one flow, 64 B from ``--flows`` flows; the target
counts over the middle ``--duration`` seconds of the send, so the warm-up and the tail
of queued datagrams are not in it), the distinct source addresses the target saw for
those flows (one per flow when the forwarder keeps flows apart), loss and RFC 3550
jitter at a fixed ``--rate`` (1200 B, one flow, counted after the queues drained), and
a 64 B ping-pong's p50/p99 (a reply awaited 200 ms, else counted lost). The tunnel's
CPU (gateway + agent + relay connect; socat and its children) per delivered datagram
is given for the rate rows. Paths are interleaved within each repetition; the table
gives medians and each relay path's ratio to socat. JSON goes to bench/results/.

socat comes with ``scripts/bootstrap --system-deps --bench``; gcc builds the generator.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import _topology as topo  # noqa: E402
from e2e_tools import tree_cpu  # noqa: E402

HOST = "127.0.0.1"
PATHS = ("hub", "connect", "socat", "direct")
#: How long the sender runs before and after the counted window.
WARMUP = 0.5
TAIL = 0.3
#: Pause between measurements, so one's queued datagrams are not the next one's.
SETTLE = 1.0
START = time.monotonic()


def log(text: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {text}", flush=True)


def build_generator(workdir: Path) -> str:
    """Compile bench/c/udp.c into ``workdir``."""
    out = workdir / "udp"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(ROOT / "bench" / "c" / "udp.c")], check=True)
    return str(out)


class Target:
    """``udp serve``: counts datagrams and answers pings; asked for its counters over
    stdin."""

    def __init__(self, procs: topo.Procs, generator: str) -> None:
        self.proc = procs.spawn("target", [generator, "serve", "0"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE)
        self.port = int(self.proc.stdout.readline())

    def snapshot(self, restart: bool = False) -> dict[str, float]:
        """Datagrams and bytes so far, the target's clock, the jitter and the distinct
        sources since the last ``restart`` (which then begins anew)."""
        self.proc.stdin.write(b"r\n" if restart else b"\n")
        self.proc.stdin.flush()
        count, size, seconds, jitter, sources = self.proc.stdout.readline().split()
        return {"count": int(count), "bytes": int(size), "t": float(seconds), "jitter_us": float(jitter),
                "sources": int(sources)}


class Path_:
    """One way to the target: the port the sender aims at and the forwarder's processes."""

    def __init__(self, name: str, port: int, pids: list[int]) -> None:
        self.name = name
        self.port = port
        self.pids = pids

    def cpu(self) -> float:
        return tree_cpu(self.pids) if self.pids else 0.0


def start_socat(procs: topo.Procs, target: int, options: str = "") -> Path_:
    """``options``: more socat address options for the listening side (e.g. ``rcvbuf=N``)."""
    port = topo._free_port()
    extra = f",{options.strip(',')}" if options.strip(",") else ""
    proc = procs.spawn("socat", ["socat", "-T", "30", f"UDP4-LISTEN:{port},fork,reuseaddr,bind={HOST}{extra}",
                                 f"UDP4:{HOST}:{target}"])
    time.sleep(0.3)
    if proc.poll() is not None:
        raise RuntimeError(f"socat exited: {procs.log('socat')}")
    return Path_("socat", port, [proc.pid])


def start_relay(procs: topo.Procs, target: int, paths: list[str]) -> list[Path_]:
    """A gateway, an agent and one udp session to ``target``; the hub port, and ``relay
    connect --udp`` on a local port."""
    relay = topo.Relay(procs)
    status, body = topo._api(relay.port, "POST", f"/api/v1/agents/{relay.agent_id}/tunnel", relay.keys["sk"],
                             {"target_port": target, "tunnel_protocol": "udp"})
    if status != 200:
        raise RuntimeError(f"udp tunnel: {status} {body}")
    out = []
    if "hub" in paths:
        out.append(Path_("hub", int(body["hub_port"]), [relay.gateway.pid, relay.agent.pid]))
    if "connect" in paths:
        port = topo._free_port()
        proc = procs.spawn("connect", [*relay.cmd, "connect", "--udp", body["tunnel_url"], "--listen",
                                       f"{HOST}:{port}", "--log-level", "info"])
        topo.wait_for(lambda: "listening on udp" in procs.log("connect"), 20, "relay connect --udp", proc, procs)
        out.append(Path_("connect", port, [relay.gateway.pid, relay.agent.pid, proc.pid]))
    return out


# ----------------------------------------------------------------------------- rows


def run_rate(generator: str, target: Target, path: Path_, seconds: float, size: int, flows: int) -> dict[str, float]:
    """As many datagrams as the kernel takes: delivered per second over the middle
    ``seconds`` of the send, what was offered, distinct sources, CPU per datagram."""
    sender = subprocess.Popen([generator, "send", str(path.port), f"{WARMUP + seconds + TAIL:g}", str(size), "0",
                               str(flows)], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(WARMUP)
        # Sources counted from here: the previous row's last datagrams are through by now.
        first, cpu0 = target.snapshot(restart=True), path.cpu()
        time.sleep(seconds)
        last, cpu = target.snapshot(), path.cpu() - cpu0
        out = sender.communicate(timeout=seconds + 30)[0].split()
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    delivered = last["count"] - first["count"]
    sent, sent_seconds = int(out[0]), float(out[1])
    result = {"dgps": delivered / (last["t"] - first["t"]), "offered_dgps": sent / sent_seconds,
              "sources": last["sources"]}
    if path.pids and delivered:
        result["cpu_us_per_dg"] = cpu / delivered * 1e6
    return result


def run_loss(generator: str, target: Target, path: Path_, seconds: float, size: int, rate: float) -> dict[str, float]:
    """``rate`` datagrams/s for ``seconds``: the share that never arrived (counted once
    the queues drained) and the jitter of those that did."""
    first = target.snapshot(restart=True)
    out = subprocess.run([generator, "send", str(path.port), f"{seconds:g}", str(size), f"{rate:g}", "1"],
                         capture_output=True, text=True, timeout=seconds + 30, check=True).stdout.split()
    time.sleep(SETTLE)
    last = target.snapshot()
    sent, errors = int(out[0]), int(out[2])
    delivered = last["count"] - first["count"]
    return {"loss_pct": max(0.0, 100.0 * (1 - delivered / (sent + errors))) if sent + errors else 100.0,
            "jitter_us": last["jitter_us"]}


def run_ping(generator: str, path: Path_, seconds: float) -> dict[str, float]:
    out = subprocess.run([generator, "ping", str(path.port), f"{seconds:g}", "64"],
                         capture_output=True, text=True, timeout=seconds + 60, check=True).stdout.split()
    return {"samples": float(out[0]), "p50_us": float(out[1]), "p99_us": float(out[2]), "lost": float(out[4])}


# ----------------------------------------------------------------------------- table

#: (row label, result key, metric, unit, with a ratio to socat)
ROWS: list[tuple[str, str, str, str, bool]] = [
    ("64 B, 1 flow, delivered", "rate64", "dgps", "dgram/s", True),
    ("64 B, 1 flow, offered by the sender", "rate64", "offered_dgps", "dgram/s", False),
    ("64 B, 1 flow, tunnel CPU", "rate64", "cpu_us_per_dg", "us/dgram", True),
    ("1200 B, 1 flow, delivered", "rate1200", "dgps", "dgram/s", True),
    ("1200 B, 1 flow, offered by the sender", "rate1200", "offered_dgps", "dgram/s", False),
    ("1200 B, 1 flow, tunnel CPU", "rate1200", "cpu_us_per_dg", "us/dgram", True),
    ("64 B, N flows, delivered", "flows", "dgps", "dgram/s", True),
    ("64 B, N flows, sources at the target", "flows", "sources", "count", False),
    ("1200 B at R/s: loss", "loss", "loss_pct", "%", False),
    ("1200 B at R/s: jitter (RFC 3550)", "loss", "jitter_us", "us", True),
    ("64 B ping-pong p50", "ping", "p50_us", "us", True),
    ("64 B ping-pong p99", "ping", "p99_us", "us", True),
    ("64 B ping-pong lost", "ping", "lost", "count", False),
]


def median(results: dict[str, dict[str, list[dict[str, float]]]], key: str, path: str, metric: str) -> Optional[float]:
    values = [r[metric] for r in results.get(key, {}).get(path, []) if metric in r]
    return statistics.median(values) if values else None


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return ""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def table(results: dict[str, dict[str, list[dict[str, float]]]], paths: list[str], args: argparse.Namespace) -> str:
    relay_paths = [p for p in ("hub", "connect") if p in paths]
    head = ["row", "unit", *paths, *(f"{p}/socat" for p in relay_paths if "socat" in paths)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "--:|" * (len(head) - 2)]
    for label, key, metric, unit, with_ratio in ROWS:
        label = label.replace("N flows", f"{args.flows} flows").replace("R/s", f"{args.rate:,.0f}/s")
        cells = [median(results, key, p, metric) for p in paths]
        if all(c is None for c in cells):
            continue
        row = [label, unit, *(_fmt(c) for c in cells)]
        socat = median(results, key, "socat", metric)
        for p in relay_paths:
            if "socat" not in paths:
                continue
            mine = median(results, key, p, metric)
            ok = with_ratio and mine is not None and socat not in (None, 0)
            row.append(f"{mine / socat:.2f}" if ok else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="repetitions, paths interleaved in each")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds counted per measurement")
    parser.add_argument("--rate", type=float, default=10_000, help="datagrams/s of the loss row (1200 B)")
    parser.add_argument("--flows", type=int, default=16, help="flows of the many-flows row")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--socat-options", default="", metavar="OPTS",
                        help="more options for socat's listening address, e.g. rcvbuf=4194304 (the "
                             "receive buffer relay's hub port asks for; default: socat's defaults)")
    args = parser.parse_args()
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    for p in paths:
        if p not in PATHS:
            parser.error(f"unknown path {p!r}; choose from {', '.join(PATHS)}")
    if "socat" in paths and shutil.which("socat") is None:
        parser.error("socat is not installed: scripts/bootstrap --system-deps --bench installs it "
                     "(or leave it out: --paths hub,connect,direct)")
    if shutil.which("gcc") is None:
        parser.error("gcc is needed to build bench/c/udp.c")

    from relay import EXTENSIONS

    workdir = Path(tempfile.mkdtemp(prefix="relay-udp-"))
    procs = topo.Procs(workdir)
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    status = 0
    try:
        generator = build_generator(workdir)
        target = Target(procs, generator)
        routes: dict[str, Path_] = {}
        if "direct" in paths:
            routes["direct"] = Path_("direct", target.port, [])
        if "socat" in paths:
            routes["socat"] = start_socat(procs, target.port, args.socat_options)
        if "hub" in paths or "connect" in paths:
            routes.update({r.name: r for r in start_relay(procs, target.port, paths)})
        order = [p for p in paths if p in routes]
        for rep in range(args.reps):
            for name in order:
                path = routes[name]
                measured = {
                    "rate64": run_rate(generator, target, path, args.duration, 64, 1),
                    "rate1200": run_rate(generator, target, path, args.duration, 1200, 1),
                    "flows": run_rate(generator, target, path, args.duration, 64, args.flows),
                    "loss": run_loss(generator, target, path, args.duration, 1200, args.rate),
                    "ping": run_ping(generator, path, args.duration),
                }
                for key, value in measured.items():
                    results.setdefault(key, {}).setdefault(name, []).append(value)
                    time.sleep(SETTLE)
                log(f"rep {rep + 1} {name:>8}: 64 B {measured['rate64']['dgps']:9,.0f}/s "
                    f"(offered {measured['rate64']['offered_dgps']:,.0f}), 1200 B {measured['rate1200']['dgps']:9,.0f}/s, "
                    f"{args.flows} flows {measured['flows']['dgps']:9,.0f}/s ({measured['flows']['sources']:.0f} sources), "
                    f"loss at {args.rate:,.0f}/s {measured['loss']['loss_pct']:.2f}% "
                    f"jitter {measured['loss']['jitter_us']:.0f} us, ping p50 {measured['ping']['p50_us']:.0f} us "
                    f"p99 {measured['ping']['p99_us']:.0f} us lost {measured['ping']['lost']:.0f}")
    except (Exception, KeyboardInterrupt) as exc:
        status = 1
        log(f"ABORTED: {type(exc).__name__}: {exc}")
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    shown = [p for p in paths if p in results.get("rate64", {})]
    print()
    print(f"relay e2e UDP benchmark, {args.reps} rep(s) of {args.duration:g} s, medians; relay extensions: "
          f"{EXTENSIONS}; {os.cpu_count()} CPUs (numbers on a shared box are noisy)")
    print(table(results, shown, args))
    print("x/socat: relay's median over socat's (rates: higher is better; CPU, jitter, latency: lower).")
    outdir = ROOT / "bench" / "results"
    outdir.mkdir(exist_ok=True)
    out = outdir / f"e2e_udp-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps({"args": vars(args), "paths": shown, "extensions": EXTENSIONS,
                               "results": results}, indent=1))
    print(f"written: {out.relative_to(ROOT)}  (total {time.monotonic() - START:.0f}s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
