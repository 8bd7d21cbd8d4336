"""HTTP load: N keep-alive connections against one URL, flat out or at a target rate;
requests/s, the latency distribution and the status counts.

Two engines:

``wrk``
    used when it is installed and the load is flat out (wrk has no target rate); a Lua
    script collects the status counts and the percentiles, and wrk's own CPU time says
    whether it was saturated.
``python``
    asyncio (uvloop) and httptools. At a target rate it is open loop: requests are due
    on a fixed schedule and a latency runs from when the request was due, so a server
    that falls behind shows in the percentiles (no coordinated omission). It measures
    its own CPU time and how late its event loop runs (a timer every 10 ms): a client
    that used most of a core, or whose loop fell 20 ms behind (p99: saturated, or
    starved of CPU on a shared machine), is the bottleneck, and the result says so.
"""
from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import signal
import ssl
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Optional

import httptools

from relay.bench import BenchError
from relay.bench.measure import Tally, latency_detail, new_histogram, percentile_curve

__all__ = ["HttpLoad", "HttpResult", "run_http_load", "wrk_available"]

#: A request that takes longer is counted as a timeout error.
REQUEST_TIMEOUT = 30.0
#: The Python client's event loop running this late (p99, seconds) means the client
#: could not keep up: saturated, or starved of CPU by other work on the machine.
LAG_LIMIT = 0.02
#: Interval of the event-loop lag probe.
LAG_TICK = 0.01
#: Share of its cores a client may use before it is called saturated.
SATURATED_SHARE = 0.85


@dataclass
class HttpLoad:
    """What to send and how hard."""

    url: str
    connections: int = 16
    duration: float = 5.0
    warmup: float = 0.2
    #: Requests per second to aim at; None: flat out.
    rate: Optional[float] = None
    method: str = "GET"
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    #: ``auto`` (wrk when present and flat out), ``wrk`` or ``python``.
    engine: str = "auto"
    #: Set to end the load early (Ctrl-C): what was measured until then is the result.
    stop: Optional[asyncio.Event] = None
    #: PEM file of a private CA for an https URL (Python engine; wrk verifies nothing).
    ca_cert: Optional[str] = None


@dataclass
class HttpResult:
    engine: str
    requests: int
    seconds: float
    statuses: dict[str, int]
    errors: dict[str, int]
    #: Milliseconds: p50, p90, p99, p99.9, max.
    latency_ms: dict[str, float]
    #: ``(percentile, µs)`` for the chart.
    curve: list[tuple[float, float]]
    client_cores: float
    client_threads: int
    saturated: bool
    target_rate: Optional[float] = None
    histogram: Optional[Any] = None
    #: Python engine: p99 of how late its event loop woke up (ms), the client's own delay.
    loop_lag_ms: Optional[float] = None

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def client_line(self) -> str:
        """One line on the client: which engine, how much CPU, whether it was the limit."""
        used = f"{self.engine} client used {self.client_cores:.2f} of {self.client_threads} core(s)"
        if self.loop_lag_ms is not None:
            used += f", its event loop lagged {self.loop_lag_ms:.1f} ms (p99)"
        if self.saturated:
            return (f"{used}: SATURATED (or starved of CPU by other work), the client was the bottleneck; "
                    f"the server may do more than this")
        if self.target_rate and self.rate < 0.95 * self.target_rate:
            return f"{used}: not saturated; the target rate was not reached, so the server (or the path) is the limit"
        return f"{used}: not the bottleneck"

    def to_json(self) -> dict[str, Any]:
        return {"engine": self.engine, "requests": self.requests, "seconds": round(self.seconds, 4),
                "requests_per_second": round(self.rate, 2), "target_rate": self.target_rate,
                "statuses": self.statuses, "errors": self.errors,
                "latency_ms": {k: round(v, 4) for k, v in self.latency_ms.items()},
                "client": {"cores": round(self.client_cores, 3), "threads": self.client_threads,
                           "saturated": self.saturated, "loop_lag_ms": self.loop_lag_ms}}


def wrk_available() -> Optional[str]:
    return shutil.which("wrk")


def check_url(url: str) -> urllib.parse.SplitResult:
    """The split URL, or ValueError with what is wrong."""
    split = urllib.parse.urlsplit(url)
    if split.scheme not in ("http", "https") or not split.hostname:
        raise ValueError(f"expected an http(s):// URL, got {url!r}")
    try:
        _ = split.port  # urllib checks the port only when asked
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    return split


async def run_http_load(load: HttpLoad, tally: Optional[Tally] = None) -> HttpResult:
    """Drive ``load``; BenchError if no request got an answer."""
    tally = tally if tally is not None else Tally("ops")
    tally.kind = "ops"
    engine = load.engine
    if engine == "auto":
        engine = "wrk" if wrk_available() and load.rate is None and load.duration >= 1 else "python"
    if engine == "wrk":
        if load.rate is not None:
            raise ValueError("wrk has no target rate: use --engine python with --rate")
        result = await _run_wrk(load)
    else:
        result = await _run_python(load, tally)
    tally.count = max(tally.count, result.requests)
    if result.requests == 0:
        errors = ", ".join(f"{k} {v}" for k, v in result.errors.items() if v) or "none answered"
        raise BenchError(f"no HTTP request to {_safe(load.url)} got an answer ({errors})")
    return result


def _safe(url: str) -> str:
    """``url`` without its path: a tunnel or share token is a secret."""
    split = urllib.parse.urlsplit(url)
    return f"{split.scheme}://{split.netloc}/…" if split.path not in ("", "/") else url


# --------------------------------------------------------------------------- python


class _Response:
    """httptools callbacks of one response."""

    def __init__(self) -> None:
        self.complete = False
        self.parser: Any = None
        self.status = 0

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        self.complete = True


async def _run_python(load: HttpLoad, tally: Tally) -> HttpResult:
    split = check_url(load.url)
    tls = split.scheme == "https"
    host = split.hostname or ""
    port = split.port or (443 if tls else 80)
    target = (split.path or "/") + (f"?{split.query}" if split.query else "")
    head = [f"{load.method} {target} HTTP/1.1", f"Host: {split.netloc}", "User-Agent: relay-bench"]
    head += [f"{k}: {v}" for k, v in load.headers]
    if load.body or load.method in ("POST", "PUT", "PATCH"):
        head.append(f"Content-Length: {len(load.body)}")
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + load.body
    context = ssl.create_default_context(cafile=load.ca_cert) if tls else None

    loop = asyncio.get_running_loop()
    histogram = new_histogram()
    statuses: dict[str, int] = {}
    errors = {"connect": 0, "read": 0, "timeout": 0}
    started = loop.time()
    measure_from = started + load.warmup
    end = measure_from + load.duration
    interval = 1.0 / load.rate if load.rate else 0.0
    next_slot = [measure_from if load.rate else 0.0]
    counted = [0]
    cpu0 = time.process_time()

    def stopped() -> bool:
        return load.stop is not None and load.stop.is_set()

    async def worker() -> None:
        reader: Optional[asyncio.StreamReader] = None
        writer: Optional[asyncio.StreamWriter] = None
        while loop.time() < end and not stopped():
            if writer is None:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(host, port, ssl=context, limit=1 << 20), REQUEST_TIMEOUT)
                except (OSError, TimeoutError):
                    errors["connect"] += 1
                    await asyncio.sleep(0.05)  # a refused connection must not spin
                    continue
            assert reader is not None and writer is not None
            due = None
            if interval:
                due = next_slot[0]
                next_slot[0] += interval
                if due >= end:
                    break
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            sent = loop.time()
            response = _Response()
            parser = httptools.HttpResponseParser(response)
            response.parser = parser
            try:
                writer.write(request)
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    while not response.complete:
                        data = await reader.read(1 << 18)
                        if not data:
                            raise ConnectionError("closed")
                        parser.feed_data(data)
            except TimeoutError:
                errors["timeout"] += 1
                writer.transport.abort()
                writer = None
                continue
            except (OSError, ConnectionError, httptools.HttpParserError):
                errors["read"] += 1
                writer.transport.abort()
                writer = None
                continue
            now = loop.time()
            tally.count += 1
            if sent >= measure_from and now <= end + REQUEST_TIMEOUT:
                counted[0] += 1
                code = str(response.status)
                statuses[code] = statuses.get(code, 0) + 1
                histogram.record_value(max(1, int((now - (due if due is not None else sent)) * 1e6)))
            if not parser.should_keep_alive():
                writer.close()
                writer = None
        if writer is not None:
            writer.transport.abort()

    lags = new_histogram()

    async def lag_probe() -> None:  # how late the loop runs a timer: the client's own delay
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_TICK)
            lags.record_value(max(1, int((loop.time() - before - LAG_TICK) * 1e6)))

    probe = asyncio.ensure_future(lag_probe())
    workers = [asyncio.ensure_future(worker()) for _ in range(load.connections)]
    try:
        await asyncio.gather(*workers)
    finally:
        probe.cancel()
        for task in workers:
            task.cancel()
        await asyncio.gather(probe, *workers, return_exceptions=True)
    wall = max(min(loop.time(), end) - measure_from, 1e-9)
    cores = (time.process_time() - cpu0) / max(loop.time() - started, 1e-9)
    detail = latency_detail(histogram, 1000.0) if histogram.get_total_count() else {}

    lag_p99 = lags.get_value_at_percentile(99.0) / 1e6 if lags.get_total_count() else 0.0
    return HttpResult("python", counted[0], wall, statuses, errors,
                      {k: v for k, v in detail.items() if k != "count"}, percentile_curve(histogram),
                      cores, 1, cores >= SATURATED_SHARE or lag_p99 >= LAG_LIMIT, load.rate, histogram,
                      loop_lag_ms=lag_p99 * 1000)


# --------------------------------------------------------------------------- wrk

#: Runs in wrk: counts statuses per thread, then prints one JSON line with everything.
_WRK_SCRIPT = r"""
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  local merged = {}
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    if s then for k, v in pairs(s) do merged[k] = (merged[k] or 0) + v end end
  end
  local parts = {}
  for k, v in pairs(merged) do table.insert(parts, string.format('"%d": %d', k, v)) end
  local curve = {}
  for _, p in ipairs({0, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 100}) do
    table.insert(curve, string.format('[%g, %d]', p, latency:percentile(p)))
  end
  local e = summary.errors
  io.write(string.format(
    'RELAY-BENCH-WRK {"requests": %d, "duration_us": %d, "statuses": {%s}, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}, "curve": [%s], "max_us": %d}\n',
    summary.requests, summary.duration, table.concat(parts, ", "),
    e.connect, e.read, e.write, e.timeout, table.concat(curve, ", "), latency.max))
end
"""


async def _run_wrk(load: HttpLoad) -> HttpResult:
    wrk = wrk_available()
    if wrk is None:
        raise BenchError("wrk is not installed (use --engine python)")
    threads = max(1, min(load.connections, os.cpu_count() or 1))
    seconds = max(1, round(load.duration))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="relay-bench-", delete=False) as script:
        script.write(_WRK_SCRIPT)
    argv = [wrk, "-t", str(threads), "-c", str(max(load.connections, threads)), "-d", f"{seconds}s",
            "--timeout", f"{int(REQUEST_TIMEOUT)}s", "-s", script.name]
    for k, v in load.headers:
        argv += ["-H", f"{k}: {v}"]
    argv.append(load.url)
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL)
        try:
            communicate = asyncio.ensure_future(proc.communicate())
            if load.stop is not None:
                stopping = asyncio.ensure_future(load.stop.wait())
                await asyncio.wait([communicate, stopping], return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not communicate.done() and proc.returncode is None:
                    proc.send_signal(signal.SIGINT)  # wrk stops and reports what it measured
            out, _ = await communicate
        except BaseException:  # cancelled (Ctrl-C): wrk must not outlive the run
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
    finally:
        os.unlink(script.name)
    wall = time.monotonic() - started
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    text = out.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("RELAY-BENCH-WRK ")), None)
    if proc.returncode != 0 or line is None:
        last = text.strip().splitlines()[-1] if text.strip() else f"exit status {proc.returncode}"
        raise BenchError(f"wrk failed: {last}")
    data = json.loads(line.split(" ", 1)[1])
    curve = [(float(p), float(us)) for p, us in data["curve"]]
    by_p = dict(curve)
    latency_ms = {"p50": by_p[50.0] / 1000, "p90": by_p[90.0] / 1000, "p99": by_p[99.0] / 1000,
                  "p99.9": by_p[99.9] / 1000, "max": data["max_us"] / 1000}
    cores = cpu / max(wall, 1e-9)
    return HttpResult("wrk", int(data["requests"]), data["duration_us"] / 1e6,
                      {str(k): int(v) for k, v in data["statuses"].items()},
                      {k: int(v) for k, v in data["errors"].items()}, latency_ms, curve,
                      cores, threads, cores >= SATURATED_SHARE * threads)
