"""Receive-side flow control: when to grant the peer more window, and how much.

The algorithm, per stream (and the same for the session, without auto-tuning):

* The peer may send at most ``credit`` more bytes. Each DATA frame lowers it; more than
  ``credit`` is a flow-control violation.
* Bytes count as *consumed* only when the application says so
  (``acknowledge_received_data``), never on arrival, so a reader that stops reading stops
  the sender after one window: memory is bounded by the window, not by the sender.
* Consumed bytes accumulate in ``pending``; a WINDOW_UPDATE of ``pending`` is due once it
  reaches a quarter of the window, or at once when the peer's credit has fallen to zero
  (it is stalled and waiting). Batching saves frames; the zero rule saves a deadlock.
* Auto-tuning: an epoch starts when the first byte after the previous epoch *arrives*.
  Once half the window has been consumed, the epoch ends; if that took at most
  ``4 x RTT`` since the epoch's first arrival, the window (not the reader) was the
  bottleneck, so it doubles (up to ``max_window``, and only as far as the caller's memory
  budget allows); the extra size is granted with the update. Timing from arrival rather
  than from the first acknowledgement matters: a reader that sits on data for seconds
  and then acknowledges it in many small pieces must not look fast.
"""
from __future__ import annotations

from typing import Optional


class ReceiveWindow:
    """The receiving side's view of one flow-control window."""

    __slots__ = ("window", "credit", "pending", "epoch_start", "epoch_consumed")

    def __init__(self, window: int) -> None:
        #: Current target size of the window (grows with auto-tuning).
        self.window = window
        #: Bytes the peer may still send before it must wait.
        self.credit = window
        #: Consumed bytes not yet announced to the peer.
        self.pending = 0
        self.epoch_start: Optional[float] = None
        self.epoch_consumed = 0

    def received(self, n: int) -> bool:
        """Account for ``n`` arriving bytes; False means the peer overran its window."""
        if n > self.credit:
            return False
        self.credit -= n
        return True

    def consumed(self, n: int) -> int:
        """Account for ``n`` consumed bytes; returns the increment to announce now, or 0."""
        self.pending += n
        if self.pending * 4 >= self.window or self.credit == 0:
            increment = self.pending
            self.pending = 0
            self.credit += increment
            return increment
        return 0

    def consumed_tuned(self, n: int, now: Optional[float], rtt: Optional[float],
                       max_window: int, growth_allowed: int) -> tuple[int, int]:
        """Like :meth:`consumed`, with auto-tuning.

        ``growth_allowed`` is how much the caller's memory budget lets the window grow.
        Returns ``(increment, growth)``: the WINDOW_UPDATE to send (0 for none) and how
        much of it is new window. The caller sets ``epoch_start`` when data arrives.
        """
        growth = 0
        if now is not None and rtt is not None and self.epoch_start is not None:
            self.epoch_consumed += n
            if self.epoch_consumed * 2 >= self.window:
                if now - self.epoch_start <= 4 * rtt and self.window < max_window:
                    growth = max(0, min(self.window, max_window - self.window, growth_allowed))
                    self.window += growth
                    self.pending += growth
                self.epoch_start = None
                self.epoch_consumed = 0
        return self.consumed(n), growth
