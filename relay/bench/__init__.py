"""``relay bench``: measure the path from this machine through a gateway to an agent,
or load-test any HTTP URL.

One idea per module:

``paths``
    what is measured through: a :class:`~relay.bench.paths.BenchPath` (the relay, the
    direct path, ``ssh -R``), and the probe that refuses an agent without ``--bench``;
``measure``
    the byte rows (download, upload, streams, latency, connect) against the bench
    target (relay.agent.bench, relay.bench_protocol);
``http_load``
    HTTP load: wrk when installed and flat out, else a Python client that measures its
    own CPU and says when it was the bottleneck;
``runner``
    repetitions, CPU time of local processes, Ctrl-C and broken paths;
``progress``
    the live display (rich);
``report``, ``plot``
    the table, the JSON document (and its schema), the PNG chart;
``local``, ``remote``
    setting up the paths: a gateway, an agent and ``ssh -R`` on this machine
    (``--local``), or tunnels to an agent of a gateway you run.

The heavy dependencies are the ``bench`` extra; :func:`require_extra` turns their
absence into one line saying what to install.
"""
from __future__ import annotations

import importlib.util

__all__ = ["BenchError", "BenchRefused", "require_extra"]

#: Modules of the ``bench`` extra (import name, package name).
EXTRA_MODULES = (("rich", "rich"), ("hdrh", "hdrhistogram"), ("psutil", "psutil"), ("matplotlib", "matplotlib"))


class BenchError(Exception):
    """A measurement could not go on (the path broke, a process died): the run ends and
    prints what it had."""


class BenchRefused(BenchError):
    """The target refused the benchmark (no ``--bench`` on the agent, a tunnel that does
    not lead to a bench target)."""


def require_extra() -> None:
    """Raise ImportError with one line saying what to install if a module of the
    ``bench`` extra is missing."""
    missing = []
    for module, package in EXTRA_MODULES:
        try:  # found, not imported: matplotlib alone takes a second to import
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
            found = False
        if not found:
            missing.append(package)
    if missing:
        raise ImportError(f"relay bench needs {', '.join(missing)}: pip install 'relay[bench]' "
                          f"(from a clone: scripts/bootstrap)")
