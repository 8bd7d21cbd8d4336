"""End-to-end TCP benchmark: relay's hub port vs OpenSSH reverse forwarding vs direct.

    .venv/bin/python bench/e2e_tcp.py [--quick] [--only NAME[,NAME]] [--profile]

Topology, all on 127.0.0.1, same client (this process, uvloop) and same targets:

* target: a uvloop source/sink/echo server (bench/_topology.py) in its own process, and
  nginx (tests/servers.start_nginx) serving /1k.bin for wrk;
* relay: ``relay gateway`` + one ``relay agent`` as processes (log level warning); one
  tcp tunnel per target, clients connect to the hub ports;
* ssh -N: ``ssh -N -R PORT:127.0.0.1:TARGET ...`` run on the "agent side" against a
  private sshd (tests/servers.start_sshd) standing for the gateway host; every stream
  rides that one ssh connection; Nagle stays on;
* ssh -tt: the same with a forced pty and a remote ``sleep 3600``, so both ssh and sshd
  set TCP_NODELAY;
* direct: the client connects to the target itself.

Benchmarks (``--only`` names): ``bulk`` (one stream, each direction), ``agg`` (32
concurrent streams target->client: aggregate and fastest/slowest), ``latency`` (64-byte
request/response on a persistent connection; connect-to-first-byte of fresh
connections), ``wrk`` (wrk -t2 -c64 against nginx /1k.bin), ``idle`` (10,000 idle
streams through one agent: RSS per stream of the gateway and the agent, on a fresh
gateway/agent pair). Each is repeated (3 times, 1 with --quick), the paths interleaved
within each repetition so machine noise spreads evenly; the table shows medians. The
table is printed at the end and written as JSON to bench/results/.

``--profile`` additionally records py-spy (``--nonblocking``) on the gateway and the
agent during relay's first bulk, 32-stream and latency runs and prints their top frames (flamegraphs in
bench/results/).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import _topology as topo  # noqa: E402
import psutil  # noqa: E402
import uvloop  # noqa: E402

from tests.support.servers import start_nginx, start_sshd  # noqa: E402

HOST = "127.0.0.1"
PATHS = ("relay", "ssh -N", "ssh -tt", "direct")
BENCHMARKS = ("bulk", "agg", "latency", "wrk", "idle")
MB = 1e6
PYSPY = ROOT / ".venv" / "bin" / "py-spy"


# ----------------------------------------------------------------------------- client side


def _nodelay(transport: Any) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Download(asyncio.BufferedProtocol):
    """Asks the target for an endless stream (``R``, on :meth:`start`) and counts what
    arrives.

    Reads go into a fixed buffer of READ_SIZE bytes, so every socket gives at most that
    much per loop iteration. With ``data_received`` the loop reads up to 256 KiB at a
    time, and how much a socket holds when its turn comes depends on how far the kernel
    has auto-tuned that socket's buffers: the 32 direct streams (no relay in between)
    then measured 2-12x fastest/slowest, and the harness would blame that on the path.
    """

    READ_SIZE = 64 * 1024

    def __init__(self) -> None:
        self.received = 0
        self.transport: Any = None
        self._buffer = memoryview(bytearray(self.READ_SIZE))

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        _nodelay(transport)

    def start(self) -> None:
        self.transport.write(b"R")

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        pass


class _Upload(asyncio.Protocol):
    """Writes as fast as the connection takes it (``S``); the target reports what it got."""

    CHUNK = b"\xa5" * (256 * 1024)

    def __init__(self) -> None:
        self.transport: Any = None
        self.paused = False
        self.report: Optional[tuple[int, float]] = None
        self._pending = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        _nodelay(transport)
        transport.set_write_buffer_limits(high=1024 * 1024)
        transport.write(b"S")
        self._fill()

    def _fill(self) -> None:
        while not self.paused and not self.transport.is_closing():
            self.transport.write(self.CHUNK)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._fill()

    def data_received(self, data: bytes) -> None:
        data = self._pending + data
        size = topo.REPORT.size
        whole = len(data) - len(data) % size
        if whole:
            self.report = topo.REPORT.unpack_from(data, whole - size)
        self._pending = data[whole:]

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        pass


class _Echo(asyncio.Protocol):
    """Echo client: ``expect(n)`` resolves once ``n`` more bytes have arrived."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.waiter: Optional[asyncio.Future] = None
        self.need = 0
        self.first: Optional[float] = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        _nodelay(transport)

    def expect(self, n: int) -> asyncio.Future:
        self.need = n
        self.waiter = asyncio.get_running_loop().create_future()
        return self.waiter

    def data_received(self, data: bytes) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.need -= len(data)
        if self.need <= 0 and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))


async def _connect(factory: Callable[[], asyncio.Protocol], port: int) -> tuple[Any, Any]:
    return await asyncio.get_running_loop().create_connection(factory, HOST, port)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` and their children so far."""
    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                times = p.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


async def downloads(port: int, streams: int, warmup: float, seconds: float,
                    cpu_pids: list[int] = ()) -> tuple[list[float], Optional[float]]:
    """Per-stream MB/s of ``streams`` concurrent target->client streams, and MB per
    CPU-second spent by ``cpu_pids`` (the relay or ssh processes) in the window.

    All connections are made first and then started together (one loop iteration
    writes every request), so no stream runs alone for a head start; every stream is
    measured over the same interval."""
    conns = [await _connect(_Download, port) for _ in range(streams)]
    await asyncio.sleep(0.05)  # the relay's and ssh's streams to the target are set up
    for _, proto in conns:
        proto.start()
    try:
        await asyncio.sleep(warmup)
        start = [p.received for _, p in conns]
        cpu0 = cpu_seconds(cpu_pids)
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        end = [p.received for _, p in conns]
        dt = time.perf_counter() - t0
        cpu = cpu_seconds(cpu_pids) - cpu0
    finally:
        for transport, _ in conns:
            transport.abort()
    rates = [(b - a) / dt / MB for a, b in zip(start, end, strict=True)]
    if min(rates) <= 0:
        raise RuntimeError(f"a stream made no progress: {rates}")
    return rates, (sum(end) - sum(start)) / MB / cpu if cpu_pids and cpu > 0 else None


async def upload(port: int, warmup: float, seconds: float,
                 cpu_pids: list[int] = ()) -> tuple[float, Optional[float]]:
    """MB/s client->target, as counted and timed by the target; MB per CPU-second."""
    transport, proto = await _connect(_Upload, port)
    try:
        await asyncio.sleep(warmup)
        first = proto.report
        cpu0 = cpu_seconds(cpu_pids)
        await asyncio.sleep(seconds)
        last = proto.report
        cpu = cpu_seconds(cpu_pids) - cpu0
    finally:
        transport.abort()
    if first is None or last is None or last[1] <= first[1]:
        raise RuntimeError("no progress reports from the sink")
    rate = (last[0] - first[0]) / (last[1] - first[1]) / MB
    # The CPU window is the client's, the byte count the target's: close enough over seconds.
    return rate, rate * seconds / cpu if cpu_pids and cpu > 0 else None


async def request_response(port: int, seconds: float, max_samples: int = 200_000) -> list[float]:
    """Round-trip times (s) of 64-byte request/64-byte response on one connection."""
    transport, proto = await _connect(_Echo, port)
    message = b"q" * 64
    try:
        transport.write(b"E")
        for _ in range(200):  # warm-up
            waiter = proto.expect(64)
            transport.write(message)
            await waiter
        samples = []
        perf = time.perf_counter
        deadline = perf() + seconds
        while len(samples) < max_samples:
            t0 = perf()
            if t0 > deadline:
                break
            waiter = proto.expect(64)
            transport.write(message)
            await waiter
            samples.append(perf() - t0)
    finally:
        transport.close()
    return samples


async def connect_first_byte(port: int, seconds: float, max_samples: int) -> list[float]:
    """Connect, send a 64-byte request, time until the first response byte (fresh
    connection each time, one at a time)."""
    samples = []
    message = b"E" + b"q" * 64
    deadline = time.perf_counter() + seconds
    while len(samples) < max_samples and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        transport, proto = await _connect(_Echo, port)
        waiter = proto.expect(1)
        transport.write(message)
        await waiter
        samples.append(proto.first - t0)
        transport.close()
    return samples


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def run_wrk(port: int, seconds: int) -> tuple[float, float]:
    """wrk -t2 -c64 against nginx /1k.bin through ``port``: (requests/s, p99 ms)."""
    done = subprocess.run(["wrk", "-t2", "-c64", f"-d{seconds}s", "--latency",
                           f"http://{HOST}:{port}/1k.bin"],
                          capture_output=True, text=True, timeout=seconds + 30)
    out = done.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if done.returncode != 0 or not rps or not p99:
        raise RuntimeError(f"wrk failed ({done.returncode}): {out} {done.stderr}")
    if errors:
        print(f"    wrk reported: {errors.group(0)}", flush=True)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99.group(2)]
    return float(rps.group(1)), float(p99.group(1)) * scale


# ----------------------------------------------------------------------------- idle streams


async def idle_streams(port: int, count: int, pids: dict[str, int]) -> dict[str, Any]:
    """Open ``count`` connections to ``port``, each checked end to end with a 1-byte
    echo, keep them idle, and measure the RSS of ``pids`` before, with them open, and
    after closing them."""
    def rss() -> dict[str, int]:
        out = {}
        for name, pid in pids.items():
            try:
                proc = psutil.Process(pid)
                out[name] = proc.memory_info().rss + sum(
                    c.memory_info().rss for c in proc.children(recursive=True))
            except psutil.NoSuchProcess:
                out[name] = 0
        return out

    async def open_one() -> tuple[Any, Any]:
        for attempt in range(5):
            try:
                transport, proto = await _connect(_Echo, port)
                waiter = proto.expect(1)
                transport.write(b"E!")
                await asyncio.wait_for(waiter, 30)
                return transport, proto
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.05 * (attempt + 1))
        raise RuntimeError("cannot open an idle stream")

    # Warm-up: first-use allocations (imports, caches, free lists) are not per stream.
    warm = await asyncio.gather(*(open_one() for _ in range(200)))
    for transport, _ in warm:
        transport.close()
    await asyncio.sleep(1.0)
    before = rss()
    conns: list[tuple[Any, Any]] = []
    t0 = time.perf_counter()
    batch = 50  # below the hub's listen backlog (asyncio's default, 100): no SYN retries
    for i in range(0, count, batch):
        conns += await asyncio.gather(*(open_one() for _ in range(min(batch, count - i))))
    opened_in = time.perf_counter() - t0
    await asyncio.sleep(2.0)
    during = rss()
    for transport, _ in conns:
        transport.close()
    conns.clear()
    await asyncio.sleep(3.0)
    after = rss()
    per_stream = {name: (during[name] - before[name]) / count / 1024 for name in pids}
    return {"streams": count, "open_seconds": opened_in, "rss_before": before, "rss_during": during,
            "rss_after_close": after, "kib_per_stream": per_stream}


# ----------------------------------------------------------------------------- profiling


class Profiler:
    """py-spy record (raw collapsed stacks + flamegraph) of the gateway and the agent."""

    def __init__(self, outdir: Path, stamp: str, native: bool = False) -> None:
        self.native = native
        self.outdir = outdir
        self.stamp = stamp
        self.running: list[tuple[str, subprocess.Popen, Path]] = []
        self.reports: dict[str, Any] = {}

    @contextlib.contextmanager
    def record(self, label: str, pids: dict[str, int], enabled: bool):
        if not enabled:
            yield
            return
        procs = []
        for name, pid in pids.items():
            raw = self.outdir / f"pyspy-{self.stamp}-{label}-{name}.txt"
            proc = subprocess.Popen([str(PYSPY), "record", "--pid", str(pid), "--rate", "250",
                                     "--format", "raw", "-o", str(raw),
                                     *(["--native"] if self.native else ["--nonblocking"])],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            procs.append((name, proc, raw))
        time.sleep(0.5)
        try:
            yield
        finally:
            for _name, proc, _raw in procs:
                proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            for name, proc, raw in procs:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                self.reports[f"{label}/{name}"] = summarise_profile(raw)
                _flamegraph(raw)


def summarise_profile(raw: Path, top: int = 12) -> dict[str, Any]:
    """Self and inclusive sample shares of the hottest frames of a py-spy raw file."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = 0
    try:
        lines = raw.read_text().splitlines()
    except OSError:
        return {"error": f"no profile at {raw}"}
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        self_counts[_short(frames[-1])] += n
        for frame in {_short(f) for f in frames}:
            incl_counts[frame] += n
    if not total:
        return {"error": "no samples"}
    return {
        "samples": total,
        "self": [(f, round(100 * c / total, 1)) for f, c in self_counts.most_common(top)],
        "inclusive": [(f, round(100 * c / total, 1)) for f, c in incl_counts.most_common(top + 8)],
    }


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py:123)"
    return re.sub(r"\((?:[^()]*/)?([^/()]+)\)$", r"(\1)", frame.strip())


def _flamegraph(raw: Path) -> None:
    """Flamegraph SVG next to the raw file, if the flamegraph tools are around."""
    return  # py-spy's own SVG needs a second recording; the raw file loads in speedscope


# ----------------------------------------------------------------------------- the run


class Results:
    def __init__(self) -> None:
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.extra: dict[str, Any] = {}

    def add(self, metric: str, path: str, value: float) -> None:
        self.samples.setdefault(metric, {}).setdefault(path, []).append(value)

    def median(self, metric: str, path: str) -> Optional[float]:
        values = self.samples.get(metric, {}).get(path)
        return statistics.median(values) if values else None


# metric: (label, unit, higher_is_better, goal text, goal check(relay, best_ssh))
METRICS: list[tuple[str, str, str, bool, str]] = [
    ("bulk_up", "bulk 1 stream client->target", "MB/s", True, ">= ssh"),
    ("bulk_down", "bulk 1 stream target->client", "MB/s", True, ">= ssh"),
    ("agg32", "32 streams target->client, aggregate", "MB/s", True, ">= ssh"),
    ("agg32_fairness", "32 streams fastest/slowest", "x", False, "<= 1.1"),
    ("bulk_up_eff", "  CPU cost: bulk up, MB per CPU-second", "MB/cpus", True, "(info)"),
    ("bulk_down_eff", "  CPU cost: bulk down, MB per CPU-second", "MB/cpus", True, "(info)"),
    ("agg32_eff", "  CPU cost: 32 streams, MB per CPU-second", "MB/cpus", True, "(info)"),
    ("rr_p50", "64 B req/resp p50", "us", False, "<= 1.5x ssh"),
    ("rr_p99", "64 B req/resp p99", "us", False, "<= 1.5x ssh"),
    ("cfb_p50", "connect-to-first-byte p50", "us", False, "<= 1.5x ssh"),
    ("cfb_p99", "connect-to-first-byte p99", "us", False, "<= 1.5x ssh"),
    ("wrk_rps", "wrk -t2 -c64 nginx 1k req/s", "req/s", True, ">= 0.75x ssh"),
    ("wrk_p99", "wrk -t2 -c64 nginx 1k p99", "ms", False, "(info)"),
    ("idle_gateway", "idle streams: RSS/stream gateway|sshd", "KiB", False, "<= 10"),
    ("idle_agent", "idle streams: RSS/stream agent|ssh", "KiB", False, "<= 10"),
]


def _verdict(metric: str, relay: Optional[float], best: Optional[float]) -> tuple[str, str]:
    """(ratio relay÷best-ssh text, ok/SHORT)."""
    if relay is None:
        return "", ""
    ratio = relay / best if best else None
    ratio_text = f"{ratio:.2f}" if ratio is not None else ""
    if metric == "agg32_fairness":
        return ratio_text, "ok" if relay <= 1.1 else "SHORT"
    if metric in ("idle_gateway", "idle_agent"):
        return ratio_text, "ok" if relay <= 10 else "SHORT"
    if ratio is None or metric == "wrk_p99" or metric.endswith("_eff"):
        return ratio_text, ""
    if metric in ("bulk_up", "bulk_down", "agg32"):
        return ratio_text, "ok" if ratio >= 1.0 else "SHORT"
    if metric == "wrk_rps":
        return ratio_text, "ok" if ratio >= 0.75 else "SHORT"
    return ratio_text, "ok" if ratio <= 1.5 else "SHORT"


def table(results: Results) -> tuple[str, list[dict[str, Any]]]:
    rows = []
    has_base = any("base" in per_path for per_path in results.samples.values())
    columns = ("relay", "base", *PATHS[1:]) if has_base else PATHS
    header = f"{'metric':<38}{'unit':>8}" + "".join(f"{p:>11}" for p in columns) + \
        f"{'goal':>14}{'relay/ssh':>11}{'':>7}"
    lines = [header, "-" * len(header)]
    for metric, label, unit, higher, goal in METRICS:
        if metric not in results.samples:
            continue
        values = {p: results.median(metric, p) for p in columns}
        ssh = [v for p, v in values.items() if p.startswith("ssh") and v is not None]
        best = (max(ssh) if higher else min(ssh)) if ssh else None
        ratio, verdict = _verdict(metric, values["relay"], best)
        cells = "".join(f"{_fmt(values[p]):>11}" for p in columns)
        lines.append(f"{label:<38}{unit:>8}{cells}{goal:>14}{ratio:>11}{verdict:>7}")
        rows.append({"metric": metric, "label": label, "unit": unit, "goal": goal,
                     "median": values, "best_ssh": best, "relay_over_best_ssh": ratio,
                     "verdict": verdict, "samples": results.samples[metric]})
    return "\n".join(lines), rows


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.quick = args.quick
        self.reps = 1 if args.quick else args.reps
        self.warmup = args.warmup if args.warmup is not None else (0.3 if args.quick else 0.5)
        self.window = args.window if args.window is not None else (1.0 if args.quick else 2.0)
        self.workdir = workdir
        self.procs = topo.Procs(workdir)
        self.results = Results()
        self.ports: dict[str, dict[str, int]] = {}
        self.pids: dict[str, dict[str, int]] = {}
        self.cpu_pids: dict[str, list[int]] = {}
        self.stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.outdir = ROOT / "bench" / "results"
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.profiler = Profiler(self.outdir, self.stamp, args.profile == "native")
        self.relay: Optional[topo.Relay] = None

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - START:6.1f}s] {text}", flush=True)

    # -- setup

    def setup(self, stack: contextlib.ExitStack) -> None:
        want = set(self.args.only)
        target = topo.start_target(self.procs)
        ports: dict[str, dict[str, int]] = {p: {} for p in PATHS}
        ports["base"] = {}
        ports["direct"]["target"] = target
        nginx_port = None
        if "wrk" in want:
            (self.workdir / "nginx").mkdir()
            nginx = stack.enter_context(start_nginx(self.workdir / "nginx"))
            nginx_port = nginx.port
            ports["direct"]["nginx"] = nginx_port
        targets = [target] + ([nginx_port] if nginx_port else [])
        names = ["target"] + (["nginx"] if nginx_port else [])
        if want - {"idle"}:
            relay = self.relay = topo.Relay(self.procs)
            for name, t in zip(names, targets, strict=True):
                ports["relay"][name] = relay.tunnel(t)
            self.pids["relay"] = {"gateway": relay.gateway.pid, "agent": relay.agent.pid}
            self.cpu_pids["relay"] = [relay.gateway.pid, relay.agent.pid]
            if self.args.baseline:
                source = None if self.args.baseline == "." else Path(self.args.baseline).resolve()
                extra_env = dict(kv.split("=", 1) for kv in self.args.baseline_env)
                base = topo.Relay(self.procs, source=source, name="-base", extra_env=extra_env)
                self.cpu_pids["base"] = [base.gateway.pid, base.agent.pid]
                for name, t in zip(names, targets, strict=True):
                    ports["base"][name] = base.tunnel(t)
            if self.args.paths != ["relay"]:
                (self.workdir / "sshd").mkdir()
                self.sshd = stack.enter_context(start_sshd(self.workdir / "sshd"))
                master = psutil.Process(self.sshd.pid)
                for path, tty in (("ssh -N", False), ("ssh -tt", True)):
                    before = {c.pid for c in master.children()}
                    fwd = topo.start_ssh_forward(self.procs, self.sshd, path.replace(" ", ""), targets, tty)
                    ports[path] = dict(zip(names, fwd, strict=True))
                    # ssh itself + the sshd child(ren) serving its connection (not the
                    # probe connections' short-lived ones: those are gone again by now).
                    time.sleep(0.2)
                    sshd_children = [c.pid for c in master.children() if c.pid not in before]
                    self.cpu_pids[path] = [self.procs.procs[-1].pid, *sshd_children]
        self.ports = ports
        self.log(f"ports: {ports}")

    def paths(self) -> list[str]:
        paths = [p for p in PATHS if p in self.args.paths and self.ports.get(p)]
        if self.ports.get("base"):
            paths.insert(1, "base")
        return paths

    # -- benchmarks

    def run(self, loop_run: Callable[[Any], Any]) -> None:
        only = self.args.only
        for name in BENCHMARKS:
            if name in only:
                t0 = time.monotonic()
                self.log(f"== {name}")
                getattr(self, f"bench_{name}")(loop_run)
                self.log(f"== {name} took {time.monotonic() - t0:.1f}s")

    def _profile(self, label: str, path: str):
        enabled = self.args.profile and path == "relay"
        return self.profiler.record(label, self.pids.get("relay", {}), enabled)

    def bench_bulk(self, loop_run: Callable[[Any], Any]) -> None:
        for rep in range(self.reps):
            for path in self.paths():
                port = self.ports[path]["target"]
                cpu_pids = self.cpu_pids.get(path, [])
                with self._profile("bulk_up", path) if rep == 0 else contextlib.nullcontext():
                    up, up_eff = loop_run(upload(port, self.warmup, self.window, cpu_pids))
                with self._profile("bulk_down", path) if rep == 0 else contextlib.nullcontext():
                    [down], down_eff = loop_run(downloads(port, 1, self.warmup, self.window, cpu_pids))
                self.results.add("bulk_up", path, up)
                self.results.add("bulk_down", path, down)
                if up_eff is not None:
                    self.results.add("bulk_up_eff", path, up_eff)
                    self.results.add("bulk_down_eff", path, down_eff)
                eff = f"  (MB per CPU-s: up {up_eff:6.1f} down {down_eff:6.1f})" if up_eff else ""
                self.log(f"  rep {rep + 1} {path:>8}: up {up:8.1f} MB/s  down {down:8.1f} MB/s{eff}")

    def bench_agg(self, loop_run: Callable[[Any], Any]) -> None:
        for rep in range(self.reps):
            for path in self.paths():
                with self._profile("agg32", path) if rep == 0 else contextlib.nullcontext():
                    rates, eff = loop_run(downloads(self.ports[path]["target"], 32, self.warmup, self.window,
                                                    self.cpu_pids.get(path, [])))
                total, fairness = sum(rates), max(rates) / min(rates)
                if eff is not None:
                    self.results.add("agg32_eff", path, eff)
                self.results.extra.setdefault("agg32_rates", {}).setdefault(path, []).append(sorted(rates))
                self.results.add("agg32", path, total)
                self.results.add("agg32_fairness", path, fairness)
                self.log(f"  rep {rep + 1} {path:>8}: 32 streams {total:8.1f} MB/s  "
                         f"fastest/slowest {fairness:.3f}")

    def bench_latency(self, loop_run: Callable[[Any], Any]) -> None:
        rr_seconds = 1.0 if self.quick else 2.0
        cfb_count = 100 if self.quick else 300
        for rep in range(self.reps):
            for path in self.paths():
                port = self.ports[path]["target"]
                with self._profile("latency", path) if rep == 0 else contextlib.nullcontext():
                    rr = loop_run(request_response(port, rr_seconds))
                cfb = loop_run(connect_first_byte(port, 2.0 if self.quick else 4.0, cfb_count))
                values = {"rr_p50": percentile(rr, 50), "rr_p99": percentile(rr, 99),
                          "cfb_p50": percentile(cfb, 50), "cfb_p99": percentile(cfb, 99)}
                for metric, value in values.items():
                    self.results.add(metric, path, value * 1e6)
                self.log(f"  rep {rep + 1} {path:>8}: req/resp p50 {values['rr_p50'] * 1e6:7.0f} us "
                         f"p99 {values['rr_p99'] * 1e6:7.0f} us ({len(rr)} samples); connect-to-first-byte "
                         f"p50 {values['cfb_p50'] * 1e6:7.0f} us p99 {values['cfb_p99'] * 1e6:7.0f} us "
                         f"({len(cfb)})")

    def bench_wrk(self, loop_run: Callable[[Any], Any]) -> None:
        seconds = 2 if self.quick else 5
        for rep in range(self.reps):
            for path in self.paths():
                rps, p99 = run_wrk(self.ports[path]["nginx"], seconds)
                self.results.add("wrk_rps", path, rps)
                self.results.add("wrk_p99", path, p99)
                self.log(f"  rep {rep + 1} {path:>8}: {rps:10.0f} req/s  p99 {p99:7.2f} ms")

    def bench_idle(self, loop_run: Callable[[Any], Any]) -> None:
        """On fresh processes: a new gateway + agent (and a new ssh -N), so neither the
        baseline nor the growth is blurred by heap left over from the other benchmarks."""
        count = self.args.idle_streams
        target = self.ports["direct"]["target"]
        sub = topo.Procs(self.workdir / "idle")
        sub.workdir.mkdir(exist_ok=True)
        try:
            for path in [p for p in ("relay", "ssh -N") if p in self.args.paths]:
                if path == "relay":
                    relay = topo.Relay(sub)
                    port = relay.tunnel(target)
                    pids = {"gateway": relay.gateway.pid, "agent": relay.agent.pid}
                else:
                    if not hasattr(self, "sshd"):
                        (self.workdir / "sshd").mkdir(exist_ok=True)
                        self.sshd = self._stack.enter_context(start_sshd(self.workdir / "sshd"))
                    [port] = topo.start_ssh_forward(sub, self.sshd, "idle-ssh", [target], tty=False)
                    ssh_proc = sub.procs[-1]
                    # The per-connection sshd child(ren) carry the forward; the listener
                    # process itself is tiny and shared. Count every sshd below the master.
                    master = psutil.Process(self.sshd.pid)
                    children = [c for c in master.children() if c.pid not in self._sshd_children_before]
                    if len(children) != 1:
                        self.log(f"  sshd children for the idle forward: {[c.pid for c in children]}")
                    pids = {"gateway": children[-1].pid, "agent": ssh_proc.pid}
                n = count if path == "relay" else min(count, self.args.idle_ssh_streams)
                result = loop_run(idle_streams(port, n, pids))
                self.results.extra.setdefault("idle", {})[path] = result
                self.results.add("idle_gateway", path, result["kib_per_stream"]["gateway"])
                self.results.add("idle_agent", path, result["kib_per_stream"]["agent"])
                kib = result["kib_per_stream"]
                self.log(f"  {path:>8}: {n} streams opened in {result['open_seconds']:.1f}s; "
                         f"gateway {kib['gateway']:.2f} KiB/stream, agent {kib['agent']:.2f} KiB/stream; "
                         f"RSS MiB before/during/after-close gateway "
                         f"{_mib(result, 'gateway')}, agent {_mib(result, 'agent')}")
                sub.stop_all()
        finally:
            sub.stop_all()


def _mib(result: dict[str, Any], name: str) -> str:
    return "/".join(f"{result[k][name] / 2**20:.1f}" for k in ("rss_before", "rss_during", "rss_after_close"))


START = time.monotonic()
DEADLINE = [START + 3600.0]


class _Deadline(Exception):
    pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repetition, shorter windows (< 90 s)")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of the paths")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (without --quick)")
    parser.add_argument("--warmup", type=float, help="seconds before a throughput window (0.5; quick 0.3)")
    parser.add_argument("--window", type=float, help="seconds of a throughput window (2; quick 1)")
    parser.add_argument("--idle-streams", type=int, default=10_000)
    parser.add_argument("--idle-ssh-streams", type=int, default=2_000,
                        help="idle streams for ssh -N (ssh polls every channel on every event, "
                             "so opening 10,000 takes minutes)")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also run a second gateway+agent from the relay package in DIR (e.g. a "
                             "git worktree of the previous commit), interleaved: column 'base'")
    parser.add_argument("--baseline-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment for the baseline's processes only (--baseline . runs "
                             "the same code: an A/B of the environment)")
    parser.add_argument("--profile", nargs="?", const="python", choices=("python", "native"),
                        help="py-spy the gateway and agent during relay's bulk and latency runs "
                             "(--profile=native: with C frames)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="abort after this many seconds (default 350, --quick 88)")
    args = parser.parse_args()
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    for name in args.only:
        if name not in BENCHMARKS:
            parser.error(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    for path in args.paths:
        if path not in PATHS:
            parser.error(f"unknown path {path!r}; choose from {', '.join(PATHS)}")
    timeout = args.timeout or (88 if args.quick else 350)

    nofile = topo.raise_nofile()
    if "idle" in args.only and nofile < args.idle_streams + 1000:
        parser.error(f"RLIMIT_NOFILE is {nofile}: too low for {args.idle_streams} idle streams")

    # SIGALRM (the time bound) and SIGTERM stop the run, then cleanup and the table of
    # what was measured follow. Raised inside a protocol callback an exception would only
    # be logged by the loop, so while the loop runs the handler cancels the running task.
    running: dict[str, Any] = {}
    stopped: list[str] = []

    def on_signal(signum: int, frame: Any) -> None:
        why = f"the run took longer than {timeout:.0f}s" if signum == signal.SIGALRM else \
            f"stopped by signal {signal.Signals(signum).name}"
        stopped.append(why)
        task = running.get("task")
        if task is not None and not task.done():
            running["loop"].call_soon_threadsafe(task.cancel)
        else:
            raise _Deadline(why)

    signal.signal(signal.SIGALRM, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    DEADLINE[0] = START + timeout

    from relay import EXTENSIONS

    status = 0
    workdir = Path(tempfile.mkdtemp(prefix="relay-e2e-"))
    bench = Bench(args, workdir)
    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    try:
        with contextlib.ExitStack() as stack:
            bench._stack = stack
            bench.setup(stack)
            master = getattr(bench, "sshd", None)
            bench._sshd_children_before = {c.pid for c in psutil.Process(master.pid).children()} if master else set()
            if "idle" in args.only and "ssh -N" in args.paths and master is None:
                bench._sshd_children_before = set()
            def loop_run(coro: Any) -> Any:
                remaining = DEADLINE[0] - time.monotonic()
                if remaining <= 0 or stopped:
                    coro.close()
                    raise _Deadline(stopped[0] if stopped else f"the run took longer than {timeout:.0f}s")

                async def bounded() -> Any:
                    running["task"] = asyncio.current_task()
                    running["loop"] = asyncio.get_running_loop()
                    try:
                        return await asyncio.wait_for(coro, remaining)
                    finally:
                        running.clear()

                try:
                    return runner.run(bounded())
                except asyncio.CancelledError:
                    if stopped:
                        raise _Deadline(stopped[0]) from None
                    raise

            try:
                bench.run(loop_run)
            except (_Deadline, asyncio.TimeoutError, Exception) as exc:
                status = 143 if stopped and "signal" in stopped[0] else 1
                bench.log(f"ABORTED: {type(exc).__name__}: {exc}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                bench.procs.stop_all()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        runner.close()
        bench.procs.stop_all()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)

    text, rows = table(bench.results)
    print()
    print(f"relay e2e TCP benchmark, {bench.stamp}, {'quick' if args.quick else f'{bench.reps} reps'}, "
          f"medians; relay extensions: {EXTENSIONS}; {os.cpu_count()} CPUs")
    print(text)
    print("relay/ssh: relay's median over the better of ssh -N and ssh -tt. "
          "32-stream direction: target->client.")
    if bench.profiler.reports:
        print()
        print("py-spy (relay, self time, top frames):")
        for label, report in bench.profiler.reports.items():
            if "self" not in report:
                print(f"  {label}: {report}")
                continue
            print(f"  {label} ({report['samples']} samples): " +
                  "; ".join(f"{f} {p}%" for f, p in report["self"][:8]))
    out = bench.outdir / f"e2e_tcp-{bench.stamp}.json"
    out.write_text(json.dumps({
        "stamp": bench.stamp, "argv": sys.argv[1:], "quick": args.quick, "reps": bench.reps,
        "extensions": EXTENSIONS, "cpus": os.cpu_count(), "rows": rows, "extra": bench.results.extra,
        "profiles": bench.profiler.reports, "status": status,
    }, indent=2, default=str))
    print(f"written: {out.relative_to(ROOT)}  (total {time.monotonic() - START:.0f}s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
