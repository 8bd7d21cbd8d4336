"""Processes for bench/e2e_tcp.py: the target server, the relay gateway and agent, and
OpenSSH reverse forwards, all on 127.0.0.1, each in its own process group.

Also runnable as ``python bench/_topology.py target`` (the benchmark does this): a
uvloop TCP server that prints its port and then serves, per connection, the mode named
by the connection's first byte:

* ``R`` (source): sends an endless stream of bytes, honouring backpressure.
* ``S`` (sink): reads and discards; every 50 ms it reports ``(bytes received so far,
  its CLOCK_MONOTONIC time)`` as two big-endian doubles/ints (16 bytes), so the client
  gets the rate *as seen by the target*, with no buffering in between to blur it.
* ``E`` (echo): echoes everything.
* ``G`` (HTTP, the ``G`` of a first ``GET``, kept as part of the request): answers every
  request head (HTTP/1.1 GETs without bodies) with ``200`` and 1 KiB, keeping the
  connection alive.

A connection that never sends its first byte costs the target one idle socket.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
REPORT = struct.Struct("!qd")  # bytes received, target's time.monotonic()
REPORT_INTERVAL = 0.05
SOURCE_CHUNK = b"\x5a" * (256 * 1024)
HTTP_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                 b"Content-Length: 1024\r\n\r\n" + b"\x5a" * 1024)


# ----------------------------------------------------------------------------- target server


class _Target(asyncio.Protocol):
    __slots__ = ("transport", "mode", "received", "paused", "timer", "loop", "pending")

    def __init__(self) -> None:
        self.transport: Any = None
        self.mode = b""
        self.received = 0
        self.paused = False
        self.timer: Optional[asyncio.TimerHandle] = None
        self.pending = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        mode = self.mode
        if not mode:
            mode = self.mode = data[:1]
            if mode != b"G":
                data = data[1:]
            if mode == b"R":
                self.transport.set_write_buffer_limits(high=1024 * 1024)
                self._fill()
            elif mode == b"S":
                self.loop = asyncio.get_running_loop()
                self.timer = self.loop.call_later(REPORT_INTERVAL, self._report)
        if mode == b"S":
            self.received += len(data)
        elif mode == b"E":
            if data:
                self.transport.write(data)
        elif mode == b"G":
            pending = self.pending + data
            answered = pending.count(b"\r\n\r\n")
            if answered:
                self.transport.write(HTTP_RESPONSE * answered)
                pending = pending[pending.rindex(b"\r\n\r\n") + 4:]
            self.pending = pending

    def _fill(self) -> None:
        transport = self.transport
        while not self.paused and not transport.is_closing():
            transport.write(SOURCE_CHUNK)

    def _report(self) -> None:
        if self.transport.is_closing():
            return
        self.transport.write(REPORT.pack(self.received, time.monotonic()))
        self.timer = self.loop.call_later(REPORT_INTERVAL, self._report)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.mode == b"R":
            self._fill()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self.timer is not None:
            self.timer.cancel()


def serve_target() -> None:
    import uvloop

    raise_nofile()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Target, HOST, 0, backlog=4096)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


# ----------------------------------------------------------------------------- processes


def raise_nofile() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _child_setup() -> None:
    # The gateway and agent raise their own RLIMIT_NOFILE, the target, ssh and sshd do
    # not: give every child the hard limit, and make it die with us if the benchmark is
    # killed outright.
    raise_nofile()
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Procs:
    """Processes started by the benchmark; :meth:`stop_all` kills their process groups."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []

    def spawn(self, name: str, argv: list[str], *, env: Optional[dict[str, str]] = None,
              stdin: Any = subprocess.DEVNULL, stdout: Any = None,
              cwd: Optional[Path] = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout if stdout is not None else log,
                                stderr=log, env=env, start_new_session=True, preexec_fn=_child_setup,
                                cwd=cwd)
        log.close()
        proc.bench_name = name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def wait_for(predicate: Any, timeout: float, what: str, proc: Optional[subprocess.Popen] = None,
              procs: Optional[Procs] = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            name = getattr(proc, "bench_name", "?")
            raise RuntimeError(f"{what}: {name} exited ({proc.returncode}):\n"
                               f"{procs.log(name)[-2000:] if procs else ''}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.05)


def tcp_accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def start_target(procs: Procs) -> int:
    """The echo/sink/source server in its own process; returns its port."""
    proc = procs.spawn("target", [sys.executable, str(Path(__file__)), "target"], stdout=subprocess.PIPE)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        raise RuntimeError(f"target server did not start: {line!r} {procs.log('target')}")
    return int(line)


# ----------------------------------------------------------------------------- relay


def _api(port: int, method: str, path: str, token: str, body: Any = None,
         context: Optional[ssl.SSLContext] = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    scheme = "https" if context is not None else "http"
    req = urllib.request.Request(f"{scheme}://{HOST}:{port}{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


class Relay:
    """``relay gateway`` + one ``relay agent`` as processes (uvloop, log level warning)."""

    def __init__(self, procs: Procs, log_level: str = "warning", *, source: Optional[Path] = None,
                 name: str = "", extra_env: Optional[dict[str, str]] = None,
                 agent_args: tuple[str, ...] = (), tls: Optional[tuple[Path, Path, Path]] = None) -> None:
        """``agent_args``: more ``relay agent`` options (e.g. ``--service``).
        ``tls``: (certificate, key, CA) PEM files: the gateway serves TLS with them, and
        the agent dials ``wss://`` trusting the CA.
        ``source``: run the relay package found in that directory instead (an A/B
        baseline, e.g. a ``git worktree`` of another commit with the extensions copied in)."""
        self.procs = procs
        relay = ROOT / ".venv" / "bin" / "relay"
        self.cmd = [str(relay)] if relay.exists() and source is None else [sys.executable, "-m", "relay"]
        self.port = _free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if source is not None:
            env["PYTHONPATH"] = str(source)
        env.update(extra_env or {})
        data = procs.workdir / f"relay-data{name}"
        # ``python -m relay`` puts the working directory first on sys.path: run a baseline
        # from its own directory, or it would import this checkout's relay after all.
        cwd = source
        self.context: Optional[ssl.SSLContext] = None
        gateway_tls: list[str] = []
        agent_tls: list[str] = []
        scheme = "http"
        if tls is not None:
            cert, key, ca = tls
            gateway_tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
            agent_tls = ["--ca-cert", str(ca)]
            self.context = ssl.create_default_context(cafile=str(ca))
            scheme = "https"
        self.gateway = procs.spawn(f"gateway{name}", [*self.cmd, "gateway", "--listen", f"{HOST}:{self.port}",
                                               "--data", str(data), "--log-level", log_level, *gateway_tls],
                                   env=env, cwd=cwd)
        gwlog = f"gateway{name}"
        wait_for(lambda: "listening on" in procs.log(gwlog), 20, "relay gateway", self.gateway, procs)
        self.keys = dict(re.findall(r"^  (sk|dk|ak)  (\S+)$", procs.log(gwlog), re.M))
        self.agent = procs.spawn(f"agent{name}", [*self.cmd, "agent", "--gateway", f"{scheme}://{HOST}:{self.port}",
                                           "--name", "bench", "--log-level", log_level, *agent_tls, *agent_args],
                                 env={**env, "RELAY_AGENT_KEY": self.keys["ak"]}, cwd=cwd)
        self.agent_id = wait_for(self._online_agent, 20, "relay agent", self.agent, procs)

    def _online_agent(self) -> Optional[str]:
        status, body = _api(self.port, "GET", "/api/v1/agents", self.keys["sk"], context=self.context)
        online = [a for a in body["agents"] if a["online"]] if status == 200 else []
        return online[0]["agent_id"] if online else None

    def tunnel(self, target_port: int) -> int:
        """Open a tcp tunnel to the agent's 127.0.0.1:target_port; returns the hub port."""
        status, body = _api(self.port, "POST", f"/api/v1/agents/{self.agent_id}/tunnel", self.keys["sk"],
                            {"target_port": target_port, "tunnel_protocol": "tcp"}, context=self.context)
        if status != 200:
            raise RuntimeError(f"tunnel: {status} {body}")
        return int(body["hub_port"])


# ----------------------------------------------------------------------------- OpenSSH


def start_ssh_forward(procs: Procs, sshd: Any, name: str, targets: list[int], tty: bool) -> list[int]:
    """``ssh -R`` from the "agent side" to the private sshd, one connection carrying a
    remote forward per target; ``tty``: ``-tt ... sleep 3600`` (sets TCP_NODELAY)
    instead of ``-N``. Returns the forwarded ports on the "gateway host"."""
    ports = [_free_port() for _ in targets]
    forwards = []
    for port, target in zip(ports, targets, strict=True):
        forwards += ["-R", f"{HOST}:{port}:{HOST}:{target}"]
    argv = sshd.ssh_args()
    head, dest = argv[:-1], argv[-1]
    opts = ["-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=0"]
    if tty:
        argv = [*head, *opts, *forwards, "-tt", dest, "sleep 3600"]
    else:
        argv = [*head, *opts, *forwards, "-N", dest]
    proc = procs.spawn(name, argv, stdin=subprocess.PIPE)  # an open stdin keeps -tt's session alive
    wait_for(lambda: all(tcp_accepts(p) for p in ports), 20, f"ssh forward {name}", proc, procs)
    return ports


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    if sys.argv[1:] == ["target"]:
        serve_target()
    else:
        sys.exit("usage: _topology.py target")
