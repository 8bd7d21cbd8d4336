"""What a run prints and writes: one table (medians, min–max over the repetitions, the
ratio to the direct path, the row's details, the CPU used), the notes under it, and
the JSON document of ``--json`` with its schema (:data:`JSON_SCHEMA`).
"""
from __future__ import annotations

import os
import platform
import time
from statistics import median
from typing import Any

from rich.console import Console
from rich.table import Table

from relay import __version__
from relay.bench.http_load import HttpResult
from relay.bench.runner import ROW_UNITS, Results, RowResult

__all__ = ["JSON_SCHEMA", "format_value", "print_http_report", "print_report", "to_json"]

#: The direct path's name: the other paths are compared with it.
DIRECT = "direct"


def format_value(row: str, value: float) -> str:
    unit = ROW_UNITS[row][0]
    if value >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:,.1f} {unit}" if value >= 10 else f"{value:,.2f} {unit}"


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _detail(result: RowResult) -> str:
    d = result.median_detail()
    row = result.row
    if row == "streams" and "fairness" in d:
        return (f"{d['streams']:.0f} streams: slowest {_num(d['slowest_mb_s'])}, fastest "
                f"{_num(d['fastest_mb_s'])} MB/s (fairness {d['fairness']:.2f})")
    if row == "latency" and "p99" in d:
        return f"p90 {_num(d['p90'])}  p99 {_num(d['p99'])}  p99.9 {_num(d['p99.9'])}  max {_num(d['max'])} µs"
    if row == "connect" and "p50" in d:
        return f"setup p50 {_num(d['p50'])}  p99 {_num(d['p99'])} ms"
    if row == "http" and "p50" in d:
        engine = result.http[-1].engine if result.http else "?"
        ok = d.get("ok_share", 0.0)
        return f"p50 {_num(d['p50'])}  p99 {_num(d['p99'])} ms  2xx {ok:.0%}  ({engine})"
    return ""


def _cpu(result: RowResult) -> str:
    short = {"gateway": "gw", "agent": "agent", "client": "client", "connect": "connect", "sshd": "sshd", "ssh": "ssh"}
    return " ".join(f"{short.get(role, role)} {cores:.2f}" for role, cores in result.median_cpu().items())


def _ratio(results: Results, result: RowResult) -> str:
    if result.path == DIRECT:
        return ""
    direct = results.rows.get((result.row, DIRECT))
    if direct is None or not direct.values or not result.values:
        return ""
    base = median(direct.values)
    return f"{median(result.values) / base:.2f}×" if base > 0 else ""


def print_report(results: Results, console: Console) -> None:
    """The table and its notes."""
    table = Table(title=f"relay bench ({results.mode}): medians of {results.repeat} run(s) of "
                        f"{results.settings.duration:g} s", title_justify="left")
    has_direct = any(path == DIRECT for _, path in results.rows)
    has_range = any(len(result.values) > 1 for result in results.rows.values())
    for name, justify in (("row", "left"), ("path", "left"), ("median", "right"), ("min–max", "right"),
                          ("vs direct", "right"), ("detail", "left"), ("CPU cores", "left")):
        if (name == "vs direct" and not has_direct) or (name == "min–max" and not has_range):
            continue
        # The figures never wrap; on a narrow terminal the details and CPU columns do.
        table.add_column(name, justify=justify, no_wrap=name not in ("detail", "CPU cores"))  # type: ignore[arg-type]  # one of rich's literals
    previous = None
    for (row, path), result in results.rows.items():
        if not result.values:
            continue
        values = result.values
        cells = [row if row != previous else "", path, format_value(row, median(values)),
                 f"{_num(min(values))}–{_num(max(values))}" if len(values) > 1 else "",
                 _ratio(results, result), _detail(result), _cpu(result)]
        if not has_direct:
            del cells[4]
        if not has_range:
            del cells[3]
        table.add_row(*cells)
        previous = row
    console.print(table)
    for line in notes(results):
        console.print(line, highlight=False, soft_wrap=True)


def print_http_report(result: HttpResult, console: Console, interrupted: bool = False) -> None:
    """The table of ``relay bench http``."""
    table = Table(title=f"relay bench http: {result.seconds:.1f} s, {result.engine}", title_justify="left")
    for name in ("requests/s", "requests", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "statuses", "errors"):
        table.add_column(name, justify="left" if name in ("statuses", "errors") else "right")
    lat = result.latency_ms
    statuses = "  ".join(f"{code}: {count}" for code, count in sorted(result.statuses.items())) or "-"
    errors = "  ".join(f"{kind}: {count}" for kind, count in result.errors.items() if count) or "-"
    table.add_row(f"{result.rate:,.1f}", f"{result.requests:,}", *(_num(lat.get(k, 0.0)) for k in
                  ("p50", "p90", "p99", "p99.9", "max")), statuses, errors)
    console.print(table)
    if result.target_rate:
        console.print(f"target rate {result.target_rate:,.1f} req/s; latency counts from when each request was due",
                      highlight=False)
    console.print(result.client_line(), highlight=False)
    if interrupted:
        console.print("interrupted (Ctrl-C): the figures cover the time until then", highlight=False)


def notes(results: Results) -> list[str]:
    lines: list[str] = []
    for path in results.paths:
        lines.append(f"{path.name}: {path.how}")
    for result in results.rows.values():
        for limit in result.limits():
            lines.append(f"{result.row} through {result.path}: {limit}")
        for http in result.http[-1:]:
            if http.saturated:
                lines.append(f"http through {result.path}: {http.client_line()}")
    lines.extend(results.notes)
    if results.load_average is not None:
        cores = os.cpu_count() or 1
        busy = results.load_average >= 0.5 * cores
        lines.append(f"load average {results.load_average:.1f} on {cores} cores when the run started"
                     + (": other work shared this machine, expect noise (see min–max)" if busy else ""))
    lines.append(f"{os.cpu_count()} cores here; MB/s is 10^6 bytes/s; CPU cores: CPU seconds per second "
                 f"of each local process during the measurement (median)")
    if results.status == "interrupted":
        lines.append(f"interrupted (Ctrl-C) during {results.stopped_in or 'setup'}: the table shows what was measured")
    elif results.status == "failed":
        lines.append(f"error: {results.error}")
        if results.stopped_in:
            lines.append(f"  (during {results.stopped_in}; the table shows what was measured before)")
    return lines


def to_json(results: Results) -> dict[str, Any]:
    """The ``--json`` document (valid against :data:`JSON_SCHEMA`)."""
    rows = []
    for (row, path), result in results.rows.items():
        if not result.values:
            continue
        values = result.values
        entry: dict[str, Any] = {
            "row": row, "path": path, "unit": ROW_UNITS[row][0], "higher_is_better": ROW_UNITS[row][1],
            "median": median(values), "min": min(values), "max": max(values), "values": values,
            "detail": result.median_detail(), "cpu_cores": result.median_cpu(), "limits": result.limits(),
        }
        if result.http:
            entry["http"] = [h.to_json() for h in result.http]
        rows.append(entry)
    settings = results.settings
    return {
        "relay_version": __version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(results.started)),
        "mode": results.mode,
        "status": results.status,
        "error": results.error,
        "settings": {"duration": settings.duration, "warmup": settings.warmup, "repeat": results.repeat,
                     "streams": settings.streams, "message_size": settings.message_size,
                     "concurrency": settings.concurrency},
        "machine": {"cpus": os.cpu_count() or 1, "platform": platform.platform(), "python": platform.python_version(),
                    "load_average": results.load_average},
        "paths": [path.describe() for path in results.paths],
        "rows": rows,
        "notes": notes(results),
    }


_NUMBERS = {"type": "object", "additionalProperties": {"type": "number"}}

#: JSON Schema (draft 2020-12) of :func:`to_json`'s document.
JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "relay bench result",
    "type": "object",
    "required": ["relay_version", "started", "mode", "status", "error", "settings", "machine", "paths", "rows", "notes"],
    "properties": {
        "relay_version": {"type": "string"},
        "started": {"type": "string"},
        "mode": {"enum": ["local", "remote", "tunnel"]},
        "status": {"enum": ["complete", "interrupted", "failed"]},
        "error": {"type": ["string", "null"]},
        "settings": {
            "type": "object",
            "required": ["duration", "warmup", "repeat", "streams", "message_size", "concurrency"],
            "additionalProperties": {"type": "number"},
        },
        "machine": {"type": "object", "required": ["cpus"], "properties": {"cpus": {"type": "integer", "minimum": 1}}},
        "paths": {"type": "array", "items": {
            "type": "object", "required": ["name", "how", "tcp", "http", "processes"],
            "properties": {"name": {"type": "string"}, "how": {"type": "string"},
                           "tcp": {"type": ["string", "null"]}, "http": {"type": "boolean"},
                           "processes": {"type": "array", "items": {"type": "string"}}}}},
        "rows": {"type": "array", "items": {
            "type": "object",
            "required": ["row", "path", "unit", "higher_is_better", "median", "min", "max", "values", "detail",
                         "cpu_cores", "limits"],
            "properties": {
                "row": {"enum": list(ROW_UNITS)},
                "path": {"type": "string"},
                "unit": {"type": "string"},
                "higher_is_better": {"type": "boolean"},
                "median": {"type": "number", "minimum": 0},
                "min": {"type": "number", "minimum": 0},
                "max": {"type": "number", "minimum": 0},
                "values": {"type": "array", "minItems": 1, "items": {"type": "number", "minimum": 0}},
                "detail": _NUMBERS,
                "cpu_cores": _NUMBERS,
                "limits": {"type": "array", "items": {"type": "string"}},
                "http": {"type": "array", "items": {"type": "object", "required": ["engine", "requests", "statuses"]}},
            }}},
        "notes": {"type": "array", "items": {"type": "string"}},
    },
}
