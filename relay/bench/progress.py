"""The live display of a run, on stderr: elapsed time, what is being measured, and its
current rate. On a terminal it is one rich line redrawn four times a second from the
event loop (no refresh thread competing with the measurement); elsewhere (a pipe, CI)
one plain line per finished measurement.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Optional

from rich.console import Console
from rich.live import Live
from rich.text import Text

from relay.bench.measure import Settings, Tally

__all__ = ["Display"]

REFRESH = 0.25


def _rate(kind: str, per_second: float) -> str:
    if kind == "bytes":
        return f"{per_second / 1e6:,.1f} MB/s"
    return f"{per_second:,.0f} /s"


class Display:
    """``begin``/``end`` around each measurement; ``close`` at the end of the run."""

    def __init__(self, console: Optional[Console] = None, title: str = "relay bench") -> None:
        self.console = console or Console(stderr=True)
        self.title = title
        self.started = time.monotonic()
        self._live: Optional[Live] = None
        self._task: Optional[asyncio.Task[None]] = None
        self._what = "starting"
        self._tally: Optional[Tally] = None
        self._last = (0, time.monotonic())
        self._rate = ""
        self._planned = 0.0
        self._began = time.monotonic()

    @property
    def live(self) -> bool:
        return self.console.is_terminal

    def note(self, line: str) -> None:
        """A line above the live one (setup steps)."""
        self.console.print(Text(line, style="dim") if self.live else line, highlight=False)

    def begin(self, row: str, path: str, rep: int, repeat: int, tally: Tally, settings: Settings) -> None:
        self._what = f"{row} through {path} (repetition {rep + 1}/{repeat})"
        self._tally = tally
        self._last = (0, time.monotonic())
        self._rate = ""
        self._planned = settings.warmup + settings.duration
        self._began = time.monotonic()
        if self.live and self._live is None:
            self._live = Live(self._render(), console=self.console, auto_refresh=False, transient=True)
            self._live.start()
            self._task = asyncio.get_running_loop().create_task(self._refresh())

    def end(self, row: str, path: str, rep: int, repeat: int, sample: Any) -> None:
        from relay.bench.report import format_value

        line = f"{row:9} {path:8} {rep + 1}/{repeat}  {format_value(row, sample.value)}"
        if self.live:
            self.console.print(Text(line, style="dim"), highlight=False)
        else:
            self.console.print(line, highlight=False)

    def _render(self) -> Text:
        elapsed = time.monotonic() - self.started
        this = time.monotonic() - self._began
        text = Text()
        text.append(f"{self.title} ", style="bold")
        text.append(f"{elapsed:6.1f} s  ")
        text.append(self._what, style="cyan")
        text.append(f"  {this:4.1f}/{self._planned:.1f} s")
        if self._rate:
            text.append(f"  now {self._rate}", style="green")
        text.append("   Ctrl-C stops and prints what was measured", style="dim")
        return text

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(REFRESH)
            tally = self._tally
            if tally is not None:
                count, at = self._last
                now = time.monotonic()
                if now > at:
                    self._rate = _rate(tally.kind, (tally.count - count) / (now - at))
                self._last = (tally.count, now)
            if self._live is not None:
                self._live.update(self._render(), refresh=True)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._live is not None:
            self._live.stop()
            self._live = None
