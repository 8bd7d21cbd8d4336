"""The garbage collector of a long-running relay process (gateway, agent).

A process that has started holds tens of thousands of objects that live until it exits:
modules, classes, functions, the configuration. CPython's cyclic collector walks every
one of them at each full (oldest-generation) collection, about 75 ms here with 45,000
objects on a loaded machine, and the younger generations' collections wade through them
too until they are promoted. Every connection in flight at that moment waits: that pause,
not the relay's work, was the slowest percentile of a fresh connection through a hub port.

:func:`settle` collects once and moves everything alive into the permanent generation
(``gc.freeze``), which the collector never walks: later collections cost what the
objects made since then cost (connections, streams), and nothing is freed that would
not be freed otherwise. Called once the process serves (its imports done, listeners
up); an application embedding the relay decides for its own process.
"""
from __future__ import annotations

import gc

__all__ = ["settle"]


def settle() -> None:
    """Collect what start-up left behind, then freeze the rest out of later collections."""
    gc.collect()
    gc.freeze()
