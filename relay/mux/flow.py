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
  bottleneck (:meth:`ReceiveWindow.epoch_test`). Timing from arrival rather than from the
  first acknowledgement matters: a reader that sits on data for seconds and then
  acknowledges it in many small pieces must not look fast. What size the window then
  takes is the connection's decision (one target shared by the streams that are
  receiving, see ``MuxConnection``); this class only applies it (:meth:`resize`).
* Shrinking: credit once granted is never taken back (the peer may already be using
  it), so a smaller window is reached by *withholding*: the difference becomes ``debt``,
  and consumed bytes repay it before any of them is granted again. The invariant is
  ``credit + (received, not yet granted again) == window + debt``.
"""
from __future__ import annotations

from typing import Optional


class ReceiveWindow:
    """The receiving side's view of one flow-control window."""

    __slots__ = ("window", "credit", "pending", "epoch_start", "epoch_consumed", "debt", "seen", "total")

    def __init__(self, window: int) -> None:
        #: Current target size of the window (auto-tuning moves it).
        self.window = window
        #: Bytes the peer may still send before it must wait.
        self.credit = window
        #: Consumed bytes not yet announced to the peer.
        self.pending = 0
        self.epoch_start: Optional[float] = None
        self.epoch_consumed = 0
        #: Granted bytes above ``window`` that consumption must repay before new grants.
        self.debt = 0
        #: When the connection last counted this stream as receiving (its clock).
        self.seen = float("-inf")
        #: Bytes consumed over the stream's life: what its reader has shown it reads.
        self.total = 0

    @property
    def committed(self) -> int:
        """What the peer may have outstanding: the window plus what is being withheld."""
        return self.window + self.debt

    def received(self, n: int) -> bool:
        """Account for ``n`` arriving bytes; False means the peer overran its window."""
        if n > self.credit:
            return False
        self.credit -= n
        return True

    def consumed(self, n: int) -> int:
        """Account for ``n`` consumed bytes; returns the increment to announce now, or 0."""
        self.total += n
        pending = self.pending + n
        if self.debt:  # shrinking: consumed bytes repay the debt before being granted again
            repaid = min(self.debt, pending)
            self.debt -= repaid
            pending -= repaid
        self.pending = pending
        # ``pending`` can only be 0 here while repaying; then the peer still holds credit
        # or the application still holds bytes whose acknowledgement will come.
        if pending and (pending * 4 >= self.window or self.credit == 0):
            self.pending = 0
            self.credit += pending
            return pending
        return 0

    def epoch_test(self, n: int, now: float, rtt: float) -> bool:
        """Count ``n`` consumed bytes into the tuning epoch; True when an epoch just ended
        fast enough that the window, not the reader, was the bottleneck.

        The caller sets ``epoch_start`` when data arrives.
        """
        if self.epoch_start is None:
            return False
        self.epoch_consumed += n
        if self.epoch_consumed * 2 < self.window:
            return False
        fast = now - self.epoch_start <= 4 * rtt
        self.epoch_start = None
        self.epoch_consumed = 0
        return fast

    def resize(self, target: int) -> None:
        """Make ``target`` the window. Growth is granted with the next announcement (it is
        added to ``pending``, which is due at once); shrinking becomes ``debt``."""
        committed = self.window + self.debt
        self.window = target
        if target >= committed:
            self.debt = 0
            self.pending += target - committed
        else:
            self.debt = committed - target
