"""Keep freed heap memory for reuse instead of handing it back to the kernel at once.

Every read of a busy stream allocates a buffer of up to 256 KiB (the event loop's
read size) and frees it a moment later. glibc returns the top of its heap to the kernel
once more than ``M_TRIM_THRESHOLD`` is free there (dynamically about twice the largest
buffer freed so far, so 512 KiB here), and the next read faults the same pages in again,
zero-filled: a gigabyte from client to target cost the gateway and agent 14,000
page faults through the hub port and 26,000 through ``relay connect``, against about 300
with the thresholds below (bench/heap.py; bench/README.md, "The heap").

:func:`keep_freed_heap` fixes both thresholds: buffers under 1 MiB come from the heap,
and up to 16 MiB of free heap is kept. That is the most a process holds beyond what it
uses, and glibc's own dynamic thresholds may keep more (up to 64 MiB). The command line
calls it for the processes that move data (gateway, agent, ``relay connect``); a program
embedding relay decides for itself.
"""
from __future__ import annotations

import ctypes
import os

#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Allocations at least this large are mapped on their own (and unmapped when freed).
MMAP_THRESHOLD = 1024 * 1024
#: Free memory at the top of the heap beyond this is returned to the kernel.
TRIM_THRESHOLD = 16 * 1024 * 1024


def keep_freed_heap() -> bool:
    """Set glibc's trim and mmap thresholds for this process; True if they were set.

    Does nothing where the C library is not glibc, and nothing when the environment
    already tunes malloc (``GLIBC_TUNABLES`` naming ``glibc.malloc``): an operator's
    setting wins."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl's mallopt is a stub)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Both, or neither: setting either one turns glibc's dynamic adjustment off.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
