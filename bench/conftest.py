"""Collects the rates the micro benchmarks compute and prints them side by side.

pytest-benchmark reports seconds per round; the issues name rates (frames/s, MB/s,
messages/s) and ratios against a peer measured in the same run, so each benchmark records
its rate from the median round and this plugin prints a table at the end.
"""
from __future__ import annotations

import pytest

_RESULTS: list[tuple[str, str, float, str]] = []


@pytest.fixture
def record_rate():
    """``record_rate(benchmark, group, name, amount, unit)``: amount per median round."""

    def record(benchmark, group: str, name: str, amount: float, unit: str) -> None:
        median = benchmark.stats.stats.median
        _RESULTS.append((group, name, amount / median, unit))

    return record


def pytest_terminal_summary(terminalreporter) -> None:
    if not _RESULTS:
        return
    write = terminalreporter.write_line
    write("")
    write("rates from the median round (higher is better)")
    by_group: dict[str, list[tuple[str, float, str]]] = {}
    for group, name, rate, unit in _RESULTS:
        by_group.setdefault(group, []).append((name, rate, unit))
    for group, rows in by_group.items():
        base = min(rate for _, rate, _ in rows)
        write(f"  {group}")
        for name, rate, unit in rows:
            write(f"    {name:<28} {rate:>16,.0f} {unit:<10} x{rate / base:6.2f} of slowest")
