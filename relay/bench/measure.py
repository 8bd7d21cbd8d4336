"""The byte rows of ``relay bench``, each one measurement of ``warmup + duration``
seconds through one :class:`~relay.bench.paths.BenchPath`:

``download``  one stream, target -> here: MB/s (10^6 bytes) after the warm-up.
``upload``    one stream, here -> target: MB/s as counted by the target (its ``done``
              line), from the first byte sent to that answer.
``streams``   N streams at once, target -> here: total MB/s; fairness = slowest stream /
              fastest stream (1.0: perfectly even).
``latency``   one stream, a 64-byte message echoed back, one at a time: round trips in
              an HDR histogram (p50, p90, p99, p99.9, max in microseconds).
``connect``   a new connection and its first exchange (``hello``), one at a time:
              connections/s and the setup latency (p50, p99).

Every measurement keeps a :class:`Tally` the live display reads, and fails with
BenchError if nothing moves for :data:`STALL_TIMEOUT` seconds or the path breaks.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from hdrh.histogram import HdrHistogram

from relay.bench import BenchError
from relay.bench.paths import BenchPath, abort, open_mode
from relay.bench_protocol import parse_reply

__all__ = ["BYTE_ROWS", "Sample", "Settings", "Tally", "latency_detail", "new_histogram", "percentile_curve", "run_byte_row"]

#: Seconds without progress after which a measurement is a broken path.
STALL_TIMEOUT = 8.0
#: Interval of the throughput-over-time series.
SERIES_STEP = 0.1
READ_SIZE = 256 * 1024
_CHUNK = bytes(256 * 1024)
#: Percentiles reported for latency rows, and the points of the plotted curve.
REPORTED_PERCENTILES = (50.0, 90.0, 99.0, 99.9)
CURVE_PERCENTILES = (0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0)


@dataclass
class Settings:
    """What every measurement of a run uses."""

    duration: float = 1.0
    warmup: float = 0.2
    streams: int = 8
    message_size: int = 64
    concurrency: int = 16


@dataclass
class Tally:
    """What the running measurement has done so far (bytes or operations)."""

    kind: str = "bytes"
    count: int = 0


@dataclass
class Sample:
    """One measurement: its headline ``value`` (the row's unit), details, and what the
    chart draws."""

    value: float
    detail: dict[str, float] = field(default_factory=dict)
    #: ``(seconds, bytes/s)`` about every SERIES_STEP seconds, for bulk rows.
    series: list[tuple[float, float]] = field(default_factory=list)
    #: The latency histogram (microseconds), for latency rows.
    histogram: Optional[Any] = None
    #: Notes from the measurement itself (e.g. the HTTP client was saturated).
    limits: list[str] = field(default_factory=list)


def _broke(path: BenchPath, what: str, exc: BaseException) -> BenchError:
    """The error of a stream cut in the middle of a measurement."""
    how = "reset" if isinstance(exc, ConnectionResetError) else "cut" if isinstance(exc, OSError) else "ended early"
    return BenchError(f"{path.name}: the {what} stream was {how} mid-measurement "
                      f"(the agent, its target or the gateway went away)")


def new_histogram() -> Any:
    """Microseconds from 1 µs to 100 s, 3 significant digits."""
    return HdrHistogram(1, 100_000_000, 3)


def percentile_curve(histogram: Any) -> list[tuple[float, float]]:
    """``(percentile, µs)`` points of ``histogram`` for the chart."""
    if histogram is None or histogram.get_total_count() == 0:
        return []
    return [(p, float(histogram.get_value_at_percentile(p))) for p in CURVE_PERCENTILES]


def latency_detail(histogram: Any, scale: float = 1.0) -> dict[str, float]:
    detail = {f"p{p:g}": histogram.get_value_at_percentile(p) / scale for p in REPORTED_PERCENTILES}
    detail["max"] = histogram.get_max_value() / scale
    detail["count"] = float(histogram.get_total_count())
    return detail


async def _sample_series(tally: Tally, series: list[tuple[float, float]]) -> None:
    """``(seconds since the start, bytes/s)`` every SERIES_STEP, from the clock, not from
    the step: a busy loop wakes up late."""
    loop = asyncio.get_running_loop()
    start = last_at = loop.time()
    last = tally.count
    while True:
        await asyncio.sleep(SERIES_STEP)
        now = loop.time()
        series.append((now - start, (tally.count - last) / max(now - last_at, 1e-9)))
        last, last_at = tally.count, now


async def _watch(body: Awaitable[Sample], tally: Tally, what: str) -> Sample:
    """Run ``body``; BenchError if ``tally`` stops moving for STALL_TIMEOUT seconds."""
    task = asyncio.ensure_future(body)
    last, since = tally.count, time.monotonic()
    try:
        while not task.done():
            await asyncio.wait([task], timeout=0.25)
            if tally.count != last:
                last, since = tally.count, time.monotonic()
            elif time.monotonic() - since > STALL_TIMEOUT:
                raise BenchError(f"{what}: nothing moved for {STALL_TIMEOUT:.0f} s (the path is stuck)")
        return task.result()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _download(path: BenchPath, settings: Settings, tally: Tally) -> Sample:
    return await _pull(path, settings, tally, 1)


async def _streams(path: BenchPath, settings: Settings, tally: Tally) -> Sample:
    return await _pull(path, settings, tally, settings.streams)


async def _pull(path: BenchPath, settings: Settings, tally: Tally, count: int) -> Sample:
    """``count`` source streams read at once for warmup + duration."""
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(count):
            conns.append(await open_mode(path, "source"))
    except BaseException:
        for _, writer in conns:
            abort(writer)
        raise
    per_stream = [0] * count
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from = start + settings.warmup
    end = measure_from + settings.duration
    series: list[tuple[float, float]] = []
    at_start = [0] * count

    async def read(i: int, reader: asyncio.StreamReader) -> None:
        marked = False
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                raise _broke(path, "download", EOFError())
            per_stream[i] += len(data)
            tally.count += len(data)
            now = loop.time()
            if not marked and now >= measure_from:
                at_start[i] = per_stream[i]
                marked = True
            if now >= end:
                return

    sampler = asyncio.ensure_future(_sample_series(tally, series))
    readers = [asyncio.ensure_future(read(i, r)) for i, (r, _) in enumerate(conns)]
    try:
        done, _ = await asyncio.wait(readers, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # the first failure, if any
    except (ConnectionError, OSError) as exc:
        raise _broke(path, "download", exc) from None
    finally:
        sampler.cancel()
        for task in readers:
            task.cancel()
        for _, writer in conns:
            abort(writer)
        await asyncio.gather(*readers, return_exceptions=True)
    elapsed = max(loop.time() - measure_from, 1e-9)
    rates = [(per_stream[i] - at_start[i]) / elapsed for i in range(count)]
    total = sum(rates)
    detail: dict[str, float] = {"bytes": float(sum(per_stream[i] - at_start[i] for i in range(count)))}
    if count > 1:
        detail.update({"streams": float(count), "slowest_mb_s": min(rates) / 1e6, "fastest_mb_s": max(rates) / 1e6,
                       "fairness": min(rates) / max(rates) if max(rates) > 0 else 0.0})
    return Sample(total / 1e6, detail, series)


async def _upload(path: BenchPath, settings: Settings, tally: Tally) -> Sample:
    reader, writer = await open_mode(path, "sink")
    loop = asyncio.get_running_loop()
    series: list[tuple[float, float]] = []
    sampler = asyncio.ensure_future(_sample_series(tally, series))
    start = loop.time()
    end = start + settings.warmup + settings.duration
    try:
        while loop.time() < end:
            writer.write(_CHUNK)
            await writer.drain()
            tally.count += len(_CHUNK)
        writer.write_eof()
        line = await reader.readline()
    except (ConnectionError, OSError) as exc:
        raise _broke(path, "upload", exc) from None
    finally:
        sampler.cancel()
        abort(writer)
    elapsed = loop.time() - start
    words = parse_reply(line)
    if not words or words[0] != "done" or len(words) < 2 or not words[1].isdigit():
        raise _broke(path, "upload", EOFError())
    received = int(words[1])
    return Sample(received / elapsed / 1e6, {"bytes": float(received), "sent": float(tally.count)}, series)


async def _latency(path: BenchPath, settings: Settings, tally: Tally) -> Sample:
    reader, writer = await open_mode(path, "echo")
    histogram = new_histogram()
    message = b"x" * settings.message_size
    clock = time.perf_counter_ns
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + settings.warmup
    end = measure_from + settings.duration
    tally.kind = "ops"
    try:
        while True:
            sent = clock()
            writer.write(message)
            await reader.readexactly(len(message))
            rtt = clock() - sent
            tally.count += 1
            now = loop.time()
            if now >= measure_from:
                histogram.record_value(max(1, rtt // 1000))
                if now >= end:
                    break
    except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
        raise _broke(path, "echo", exc) from None
    finally:
        abort(writer)
    detail = latency_detail(histogram)
    return Sample(detail["p50"], detail, histogram=histogram)


async def _connect(path: BenchPath, settings: Settings, tally: Tally) -> Sample:
    histogram = new_histogram()
    loop = asyncio.get_running_loop()
    clock = time.perf_counter_ns
    measure_from = loop.time() + settings.warmup
    end = measure_from + settings.duration
    tally.kind = "ops"
    done = 0
    while True:
        began = clock()
        _, writer = await open_mode(path, "hello")
        abort(writer)
        took = clock() - began
        tally.count += 1
        now = loop.time()
        if now >= measure_from:
            done += 1
            histogram.record_value(max(1, took // 1000))
            if now >= end:
                break
    elapsed = max(loop.time() - measure_from, 1e-9)
    detail = latency_detail(histogram, 1000.0)  # milliseconds
    return Sample(done / elapsed, detail, histogram=histogram)


#: Row name -> its measurement.
BYTE_ROWS: dict[str, Callable[[BenchPath, Settings, Tally], Awaitable[Sample]]] = {
    "download": _download,
    "upload": _upload,
    "streams": _streams,
    "latency": _latency,
    "connect": _connect,
}


async def run_byte_row(row: str, path: BenchPath, settings: Settings, tally: Tally) -> Sample:
    """Measure ``row`` through ``path`` once."""
    return await _watch(BYTE_ROWS[row](path, settings, tally), tally, f"{row} through {path.name}")
