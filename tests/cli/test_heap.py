"""relay.heap: freed read buffers stay in the heap for the next read instead of being
faulted in again, zero-filled, page by page (the command line's data movers call it
through relay.cli.run.prepare_process)."""
from __future__ import annotations

import os
import subprocess
import sys

#: A busy stream's pattern: a few read-sized buffers alive at once, then all freed.
CHURN = """
import resource, sys
{setup}
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(300):
    # 64 to 256 KiB each, every page written, as reads of a busy stream
    live = [b"x" * (65536 * (1 + (i + j) % 4)) for j in range(8)]
    del live
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(setup: str, env: dict[str, str] | None = None) -> int:
    done = subprocess.run([sys.executable, "-c", CHURN.format(setup=setup)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})}, check=True)
    return int(done.stdout)


def test_prepare_process_keeps_freed_read_buffers_for_the_next_read() -> None:
    default = faults("")
    kept = faults("from relay.cli.run import prepare_process; prepare_process()")
    # Kept: about the first round's pages (1.25 MiB: 320 pages). Glibc's default trims the
    # freed top of the heap after a round whenever nothing allocated later pins it: then
    # each round faults its pages in again (about 70,000 here), otherwise a few thousand
    # over the 300 rounds, depending on the heap's layout before the loop.
    assert kept < 1_000, (kept, default)
    assert kept < default, (kept, default)


def test_an_operators_malloc_tuning_wins() -> None:
    tunables = {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}
    code = "from relay.heap import keep_freed_heap; print(keep_freed_heap())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **tunables}, check=True)
    assert done.stdout.strip() == "False"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "True"
