"""``relay gateway --workers N``: several gateway processes on one machine are a fleet too.

The parent process (:func:`supervise`) serves nothing itself. It

* binds the listening address once with SO_REUSEPORT and keeps that socket, unlistened,
  for its whole life: a taken address is one clear error before any worker starts,
  port 0 becomes one port for every worker, and a restarted worker always finds it;
* starts N workers, each ``relay gateway`` with the same command line and environment
  plus :data:`WORKER_ENV`, which makes it a worker: it listens on the shared address
  with SO_REUSEPORT (the kernel spreads new connections over the workers), joins the
  fleet (Redis, the shared store) under an id of its own, and also listens on a
  port of its own, which it advertises: a peer session must reach *that* process, and
  the shared port would hand it to any of them. That port is on loopback (a fleet of
  one machine), or with ``--advertise HOST`` on the host of ``--listen``, advertised as
  ``http://HOST:PORT``, so other machines' gateways (one gateway, or their own
  workers) join the same fleet. Every tunnel's hub port is shared the same way
  (relay.gateway.api.tunnels);
* restarts a worker that exits while the fleet runs (after 0.5 s, doubling up to 10 s
  while it keeps dying young); gives up, stopping all, if a worker of the first start
  fails before it ever listened (a bad option, a store that refuses: it would fail the
  same way again);
* forwards SIGTERM and SIGINT to every worker (which stop cleanly: their agents'
  leases are released), SIGKILLs any still running after :data:`STOP_TIMEOUT`, and
  exits 0. Workers run in sessions of their own, so a terminal's Ctrl-C reaches them
  through the parent only, and they get SIGKILL if the parent dies (Linux
  PR_SET_PDEATHSIG).

A secret for the peer sessions is generated when none is given (the workers are the
whole fleet then); it travels in the environment, never on a command line.
"""
from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["STOP_TIMEOUT", "WORKER_ENV", "WorkerSpec", "advertise_host", "reserve_address", "supervise",
           "worker_spec"]

log = logging.getLogger("relay.gateway.fleet.workers")

#: Set in a worker's environment (JSON ``{"index", "id", "peer_port"}``); internal.
WORKER_ENV = "RELAY_GATEWAY_WORKER"
#: Seconds the workers get to stop after SIGTERM before they are killed.
STOP_TIMEOUT = 10.0
#: Restart delays: the first, the longest, and how long a worker must live to reset it.
RESTART_FIRST = 0.5
RESTART_MAX = 10.0
RESTART_RESET_AFTER = 30.0
_POLL = 0.1


@dataclass
class WorkerSpec:
    """What makes a ``relay gateway`` process a worker (read from :data:`WORKER_ENV`)."""

    index: int
    gateway_id: str
    peer_port: int
    #: The address its peer port listens on: loopback, or with an advertise host the
    #: host of ``--listen`` (so other machines' gateways reach it).
    peer_host: str = "127.0.0.1"
    #: The host it advertises (``--advertise HOST``); "" for ``peer_host``.
    advertise_host: str = ""

    @property
    def advertise(self) -> str:
        host = self.advertise_host or self.peer_host
        return f"http://{_bracketed(host)}:{self.peer_port}"


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def worker_spec() -> Optional[WorkerSpec]:
    """This process's worker spec, or None if it is not a worker of ``--workers``."""
    raw = os.environ.get(WORKER_ENV)
    if not raw:
        return None
    try:
        data = json.loads(raw)
        return WorkerSpec(int(data["index"]), str(data["id"]), int(data["peer_port"]),
                          str(data.get("peer_host", "127.0.0.1")), str(data.get("advertise_host", "")))
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{WORKER_ENV} is set but malformed (it is for --workers' own use)") from None


def advertise_host(value: str) -> str:
    """The host of ``--advertise`` given with ``--workers``: ``HOST`` or ``http://HOST``
    (each worker advertises ``http://HOST:its peer port``). Raises ValueError for a
    port, a path, or a scheme other than http (a worker's peer port serves no TLS)."""
    text = value.strip()
    if "://" in text:
        parts = urllib.parse.urlsplit(text)
        if parts.scheme != "http":
            raise ValueError("with --workers, --advertise is HOST or http://HOST: each worker's peer port "
                             "serves plain HTTP (the fleet secret authenticates it; keep it on a private network)")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("with --workers, --advertise is HOST or http://HOST, nothing after the host")
        try:
            port = parts.port
        except ValueError:
            port = -1
        if port is not None:
            raise ValueError("with --workers, --advertise gives no port: each worker advertises its own peer port")
        host = parts.hostname or ""
    else:
        host = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        if "/" in host or (":" in host and not _is_ipv6(host)):
            raise ValueError("with --workers, --advertise is HOST or http://HOST (no port: each worker "
                             "advertises its own peer port)")
    if not host or not re.fullmatch(r"[A-Za-z0-9.:_-]+", host):
        raise ValueError(f"--advertise {value!r}: not a host name or address")
    return host


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


def reserve_address(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` with SO_REUSEPORT, without listening: the workers bind the same
    port beside it. Raises OSError (the address is taken, or not this machine's)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _free_port(host: str) -> int:
    """A port free on ``host`` now (a worker's peer port)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _local(host: str) -> str:
    """Where this machine reaches a listener on ``host`` (a wildcard: loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the parent dies (Linux only)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


@dataclass
class _Worker:
    index: int
    base_id: str
    peer_port: int
    peer_host: str = "127.0.0.1"
    proc: Optional[subprocess.Popen[bytes]] = None
    starts: int = 0
    started_at: float = 0.0
    ready: bool = False
    delay: float = RESTART_FIRST
    restart_at: Optional[float] = None

    @property
    def gateway_id(self) -> str:
        # A new id per start: leases of the dead process are never mistaken for its own.
        suffix = f"w{self.index}" if self.starts <= 1 else f"w{self.index}r{self.starts - 1}"
        return f"{self.base_id}-{suffix}"


def _accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((_local(host), port), timeout=0.2):
            return True
    except OSError:
        return False


def supervise(count: int, argv: Sequence[str], *, gateway_id: Optional[str], fleet_secret: Optional[str],
              echo: Callable[[str], None] = print, env: Optional[dict[str, str]] = None,
              advertise: str = "", peer_host: str = "127.0.0.1") -> int:
    """Run ``count`` workers, each ``python -m relay`` + ``argv`` (the parent's own
    command line), until SIGTERM/SIGINT; returns the exit status (module docstring).
    ``advertise``: the host the workers advertise (their peer ports listen on
    ``peer_host``); "" for loopback (one machine's fleet)."""
    base_env = dict(os.environ if env is None else env)
    base_env.pop(WORKER_ENV, None)
    base_env["RELAY_FLEET_SECRET"] = fleet_secret or secrets.token_urlsafe(32)
    base_id = gateway_id or secrets.token_hex(3)
    workers = [_Worker(i, base_id, _free_port(peer_host), peer_host) for i in range(1, count + 1)]
    stopping: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def start(worker: _Worker) -> None:
        worker.starts += 1
        if worker.starts > 1 and _accepts(worker.peer_port, worker.peer_host):  # someone took its port meanwhile
            worker.peer_port = _free_port(worker.peer_host)
        spec = {"index": worker.index, "id": worker.gateway_id, "peer_port": worker.peer_port,
                "peer_host": worker.peer_host, "advertise_host": advertise}
        shown = WorkerSpec(worker.index, worker.gateway_id, worker.peer_port, worker.peer_host, advertise)
        worker.proc = subprocess.Popen([sys.executable, "-m", "relay", *argv],
                                       env={**base_env, WORKER_ENV: json.dumps(spec)},
                                       start_new_session=True, preexec_fn=_die_with_parent)
        worker.started_at, worker.ready, worker.restart_at = time.monotonic(), False, None
        echo(f"relay gateway worker {worker.index} started: pid {worker.proc.pid}, "
             f"id {worker.gateway_id}, peers at {shown.advertise}")

    status = 0
    try:
        for worker in workers:
            start(worker)
        while not stopping:
            time.sleep(_POLL)
            now = time.monotonic()
            for worker in workers:
                proc = worker.proc
                if proc is None:
                    if worker.restart_at is not None and now >= worker.restart_at and not stopping:
                        start(worker)
                    continue
                code = proc.poll()
                if code is None:
                    if not worker.ready and _accepts(worker.peer_port, worker.peer_host):
                        worker.ready = True
                    continue
                if stopping:
                    break
                worker.proc = None
                if not worker.ready and worker.starts == 1:
                    echo(f"relay gateway worker {worker.index} (pid {proc.pid}) {_describe_exit(code)} "
                         f"before it listened: stopping the others (see its error above)")
                    status = 1
                    stopping.append(0)
                    break
                lived = now - worker.started_at
                worker.delay = RESTART_FIRST if lived >= RESTART_RESET_AFTER else worker.delay
                echo(f"relay gateway worker {worker.index} (pid {proc.pid}) {_describe_exit(code)}; "
                     f"restarting it in {worker.delay:g} s")
                worker.restart_at = now + worker.delay
                worker.delay = min(worker.delay * 2, RESTART_MAX)
    finally:
        _stop_all(workers)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopping and stopping[0] != 0:
        echo(f"relay gateway: stopped {count} workers ({signal.Signals(stopping[0]).name})")
    return status


def _stop_all(workers: list[_Worker]) -> None:
    running = [w.proc for w in workers if w.proc is not None and w.proc.poll() is None]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for proc in running:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("worker pid %d did not stop within %g s: killed", proc.pid, STOP_TIMEOUT)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
