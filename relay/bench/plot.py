"""The ``--plot FILE.png`` chart: throughput over time of the bulk rows (last
repetition, every path) beside the latency distribution of the echo row (every
repetition merged, every path), percentiles on a log scale so p99.9 is as readable as
the median. Drawn with matplotlib's Agg backend: no display needed.
"""
from __future__ import annotations

from pathlib import Path

from relay.bench.measure import percentile_curve
from relay.bench.runner import Results

__all__ = ["PLOT_SIZE", "write_plot"]

#: Inches and dots per inch of the figure: the PNG is PLOT_SIZE[0] * DPI by
#: PLOT_SIZE[1] * DPI pixels.
PLOT_SIZE = (12.0, 4.5)
DPI = 100
_BULK_ROWS = ("download", "upload", "streams")
_TICKS = (50.0, 90.0, 99.0, 99.9, 99.99)


def write_plot(results: Results, path: Path) -> None:
    """Draw ``results`` into the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=PLOT_SIZE, dpi=DPI)
    try:
        # A colour per row, a line style per path: the relay and its peers side by side.
        colours = {row: f"C{i}" for i, row in enumerate(_BULK_ROWS)}
        styles = {path.name: style for path, style in zip(results.paths, ("-", "--", ":", "-."), strict=False)}
        for (row, name), result in results.rows.items():
            if row not in _BULK_ROWS or not result.samples or not result.samples[-1].series:
                continue
            series = result.samples[-1].series
            left.plot([t for t, _ in series], [v / 1e6 for _, v in series],
                      color=colours[row], linestyle=styles.get(name, "-"), label=f"{row} · {name}")
        left.set_title("throughput over time (last repetition)")
        left.set_xlabel("seconds")
        left.set_ylabel("MB/s")
        left.grid(True, alpha=0.3)
        if left.get_legend_handles_labels()[0]:
            left.legend(fontsize="x-small", ncol=3)

        for (row, name), result in results.rows.items():
            if row != "latency":
                continue
            curve = [(p, us) for p, us in percentile_curve(result.histogram()) if p < 100.0]
            if curve:
                right.plot([1.0 / (1.0 - p / 100.0) for p, _ in curve], [us for _, us in curve],
                           marker=".", linestyle=styles.get(name, "-"),
                           label=f"echo {results.settings.message_size} B · {name}")
        right.set_xscale("log")
        right.set_yscale("log")
        right.set_xticks([1.0 / (1.0 - p / 100.0) for p in _TICKS], [f"p{p:g}" for p in _TICKS])
        right.set_title("request/response latency distribution")
        right.set_ylabel("µs")
        right.grid(True, which="both", alpha=0.3)
        if right.get_legend_handles_labels()[0]:
            right.legend(fontsize="small")
        fig.suptitle(f"relay bench ({results.mode}, {results.status})")
        fig.tight_layout()
        fig.savefig(path, dpi=DPI, format="png")
    finally:
        plt.close(fig)
