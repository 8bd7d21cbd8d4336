"""Run the rows: each row ``repeat`` times on every path (paths interleaved, so a noisy
moment hits them all alike), with the CPU time of the local processes that carry each
path and of this client; stop cleanly on Ctrl-C or at the first broken path, keeping
what was measured.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import median
from typing import Any, Optional

import psutil

from relay.bench import BenchError
from relay.bench.http_load import HttpLoad, HttpResult, run_http_load
from relay.bench.measure import BYTE_ROWS, Sample, Settings, Tally, run_byte_row
from relay.bench.paths import BenchPath

__all__ = ["ROWS", "ROW_UNITS", "CpuMeter", "Results", "RowResult", "run_rows"]

#: Every row, in the order they run.
ROWS = ("download", "upload", "streams", "latency", "connect", "http")
#: Row -> (unit of its headline, whether higher is better).
ROW_UNITS: dict[str, tuple[str, bool]] = {
    "download": ("MB/s", True),
    "upload": ("MB/s", True),
    "streams": ("MB/s", True),
    "latency": ("µs p50", False),
    "connect": ("conn/s", True),
    "http": ("req/s", True),
}
#: Share of a budget (one core for the client, every core for the machine) that counts
#: as hitting it.
LIMIT_SHARE = 0.85


class CpuMeter:
    """CPU time (user + system) of this process and of local processes (with their
    children) between :meth:`start` and :meth:`stop`, as cores used."""

    def __init__(self, processes: dict[str, int]) -> None:
        self._procs: dict[str, psutil.Process] = {}
        for role, pid in processes.items():
            try:
                self._procs[role] = psutil.Process(pid)
            except psutil.Error:
                pass
        self._start: dict[str, float] = {}
        self._wall = 0.0

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        total = 0.0
        for p in [proc, *_children(proc)]:
            try:
                times = p.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        return total

    def _sample(self) -> dict[str, float]:
        sample = {role: self._cpu(proc) for role, proc in self._procs.items()}
        sample["client"] = time.process_time()
        return sample

    def start(self) -> None:
        self._start = self._sample()
        self._wall = time.monotonic()

    def stop(self, extra_client_cores: float = 0.0) -> dict[str, float]:
        end = self._sample()
        wall = max(time.monotonic() - self._wall, 1e-9)
        cores = {role: max(0.0, end[role] - self._start.get(role, end[role])) / wall for role in end}
        cores["client"] += extra_client_cores
        return cores


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return list(proc.children(recursive=True))
    except psutil.Error:
        return []


@dataclass
class RowResult:
    """Every repetition of one row on one path."""

    row: str
    path: str
    samples: list[Sample] = field(default_factory=list)
    cpu: list[dict[str, float]] = field(default_factory=list)
    http: list[HttpResult] = field(default_factory=list)

    @property
    def values(self) -> list[float]:
        return [s.value for s in self.samples]

    def median_detail(self) -> dict[str, float]:
        keys = {k for s in self.samples for k in s.detail}
        return {k: median(s.detail[k] for s in self.samples if k in s.detail) for k in sorted(keys)}

    def median_cpu(self) -> dict[str, float]:
        roles = {r for c in self.cpu for r in c}
        return {r: median(c.get(r, 0.0) for c in self.cpu) for r in sorted(roles)}

    def histogram(self) -> Any:
        """Every repetition's latency histogram merged, or None."""
        merged = None
        for sample in self.samples:
            if sample.histogram is None:
                continue
            if merged is None:
                from relay.bench.measure import new_histogram

                merged = new_histogram()
            merged.add(sample.histogram)
        return merged

    def limits(self) -> list[str]:
        """Why this figure may say more about this machine than about the path."""
        notes: list[str] = []
        if not self.cpu:
            return notes
        cpu = self.median_cpu()
        client = cpu.get("client", 0.0)
        threads = max((h.client_threads for h in self.http), default=1)
        if client >= LIMIT_SHARE * threads or any(h.saturated for h in self.http):
            notes.append(f"limited by the client (it used {client:.2f} core{'s' if threads > 1 else ''}"
                         f"{f' of {threads}' if threads > 1 else ''})")
        cores = os.cpu_count() or 1
        total = sum(cpu.values())
        if total >= LIMIT_SHARE * cores and len(cpu) > 1:
            notes.append(f"limited by this machine's {cores} cores ({', '.join(cpu)} used {total:.2f} together)")
        return notes


@dataclass
class Results:
    """A run so far: what the report and the chart show."""

    settings: Settings
    repeat: int
    paths: list[BenchPath]
    mode: str
    rows: dict[tuple[str, str], RowResult] = field(default_factory=dict)
    status: str = "running"
    error: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    #: The row/path/repetition running when the run stopped.
    stopped_in: Optional[str] = None
    #: The 1-minute load average when the run started (None where there is none).
    load_average: Optional[float] = field(default_factory=lambda: os.getloadavg()[0] if hasattr(os, "getloadavg")
                                          else None)

    def add(self, row: str, path: str, sample: Sample, cpu: dict[str, float],
            http: Optional[HttpResult] = None) -> None:
        result = self.rows.setdefault((row, path), RowResult(row, path))
        result.samples.append(sample)
        result.cpu.append(cpu)
        if http is not None:
            result.http.append(http)


def applicable(row: str, path: BenchPath) -> bool:
    return path.http_url is not None if row == "http" else path.tcp is not None


async def run_rows(results: Results, rows: list[str], display: Any,
                   check_alive: Callable[[], Optional[str]] = lambda: None) -> None:
    """Measure ``rows`` into ``results``; BenchError at the first broken path (results
    keep what was measured before it)."""
    settings = results.settings
    if not any(applicable(row, path) for row in rows for path in results.paths):
        raise BenchError(f"none of the rows {', '.join(rows)} can run on these paths: the byte rows need a tcp "
                         f"tunnel (or --agent, --local), the http row an http one")
    for row in rows:
        for rep in range(results.repeat):
            for path in results.paths:
                if not applicable(row, path):
                    continue
                dead = check_alive()
                if dead:
                    raise BenchError(dead)
                results.stopped_in = f"{row} through {path.name} (repetition {rep + 1}/{results.repeat})"
                tally = Tally()
                display.begin(row, path.name, rep, results.repeat, tally, settings)
                meter = CpuMeter(path.processes)
                meter.start()
                http: Optional[HttpResult] = None
                if row == "http":
                    assert path.http_url is not None
                    load = HttpLoad(path.http_url, connections=settings.concurrency, duration=settings.duration,
                                    warmup=settings.warmup, ca_cert=path.ca_cert)
                    http = await run_http_load(load, tally)
                    sample = Sample(http.rate, {**http.latency_ms,
                                                "ok_share": _ok_share(http.statuses, http.requests)})
                    cpu = meter.stop(http.client_cores if http.engine == "wrk" else 0.0)
                else:
                    assert row in BYTE_ROWS
                    sample = await run_byte_row(row, path, settings, tally)
                    cpu = meter.stop()
                results.add(row, path.name, sample, cpu, http)
                display.end(row, path.name, rep, results.repeat, sample)
    results.stopped_in = None


def _ok_share(statuses: dict[str, int], requests: int) -> float:
    ok = sum(v for k, v in statuses.items() if k.startswith("2"))
    return ok / requests if requests else 0.0
