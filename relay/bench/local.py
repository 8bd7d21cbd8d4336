"""``relay bench --local``: a gateway, an agent with ``--bench`` and (``--compare ssh``)
a private sshd with an ``ssh -R`` reverse forward, all on this machine and all stopped
afterwards, whatever ends the run.

Every process is this one's child in a session of its own (a terminal's Ctrl-C reaches
only ``relay bench``, which then stops them in order) and gets SIGTERM from the kernel
if ``relay bench`` itself dies (PR_SET_PDEATHSIG), so none is ever left behind. Their
output goes to log files in a temporary directory, quoted in errors.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from relay.bench import BenchError
from relay.bench.paths import BenchPath

__all__ = ["LocalRelay", "Processes"]

#: Seconds a process may take to be ready.
READY_TIMEOUT = 30.0
#: Seconds a process may take to stop after SIGTERM before it is killed.
STOP_TIMEOUT = 5.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


class Processes:
    """Child processes by role; :meth:`check` says if one died, :meth:`close` stops all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def spawn(self, role: str, argv: list[str], env: Optional[dict[str, str]] = None) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{role.replace(' ', '_')}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                    start_new_session=True, preexec_fn=_die_with_parent)
        self.procs[role] = proc
        self.logs[role] = log
        return proc

    def relay(self, role: str, *args: str, env: Optional[dict[str, str]] = None) -> subprocess.Popen[bytes]:
        """``python -m relay ARGS`` (this interpreter, so the same install)."""
        return self.spawn(role, [sys.executable, "-m", "relay", *args], env)

    def wait_for(self, role: str, pattern: str, what: str, timeout: float = READY_TIMEOUT) -> re.Match[str]:
        """The first match of ``pattern`` in ``role``'s log; BenchError if it exits first."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.logs[role].read_text(errors="replace"), re.M)
            if found:
                return found
            dead = self.check()
            if dead:
                raise BenchError(dead)
            if time.monotonic() > deadline:
                raise BenchError(f"the {role} did not {what} within {timeout:.0f} s: {_tail(self.logs[role])}")
            time.sleep(0.05)

    def check(self) -> Optional[str]:
        """Why the run cannot go on, if a process exited."""
        for role, proc in self.procs.items():
            if proc.poll() is not None:
                return f"the {role} exited (status {proc.returncode}): {_tail(self.logs[role]) or 'no output'}"
        return None

    def close(self) -> None:
        """SIGTERM every process (the last started first), then SIGKILL what is left."""
        procs = list(self.procs.values())[::-1]
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: anything it started too
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT)
        self.procs.clear()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalRelay:
    """The processes of ``--local`` and the paths through them."""

    def __init__(self, note: Callable[[str], None]) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
        self.procs = Processes(self.workdir)
        self.note = note
        self.notes: list[str] = []

    def start(self, via: str = "hub", compare: tuple[str, ...] = ()) -> list[BenchPath]:
        """Start everything; the paths: ``relay``, ``direct`` and any comparison."""
        from relay.cli.tunnel import ApiClient

        procs = self.procs
        self.note("starting a gateway and an agent with --bench on 127.0.0.1 ...")
        gateway = procs.relay("gateway", "gateway", "--listen", "127.0.0.1:0", "--data", str(self.workdir / "data"),
                              "--log-level", "warning")
        url = procs.wait_for("gateway", r"listening on (http://\S+)", "start").group(1)
        keys = dict(re.findall(r"^  (sk|dk|ak)  (\S+)", procs.wait_for("gateway", r"^  ak  ", "print its keys")
                               .string, re.M))
        agent = procs.relay("agent", "agent", "--gateway", url, "--name", "bench-local", "--bench", "--bench-port", "0",
                            "--log-level", "info", env={"RELAY_AGENT_KEY": keys["ak"], "RELAY_KEY": ""})
        bench_port = int(procs.wait_for("agent", r"bench target listening on 127\.0\.0\.1:(\d+)", "start its target")
                         .group(1))
        api = ApiClient(url, keys["sk"])
        deadline = time.monotonic() + READY_TIMEOUT
        agent_id = None
        while agent_id is None:
            online = [a for a in api.agents() if a.get("name") == "bench-local" and a.get("online")]
            if online:
                agent_id = online[0]["agent_id"]
                break
            dead = procs.check()
            if dead:
                raise BenchError(dead)
            if time.monotonic() > deadline:
                raise BenchError(f"the agent did not come online: {_tail(procs.logs['agent'])}")
            time.sleep(0.1)
        tcp = api.call("POST", f"/api/v1/agents/{agent_id}/tunnel", {"target_port": bench_port, "tunnel_protocol": "tcp"})
        http = api.call("POST", f"/api/v1/agents/{agent_id}/tunnel", {"target_port": bench_port, "tunnel_protocol": "http"})
        relay_processes = {"gateway": gateway.pid, "agent": agent.pid}
        if via == "ws":
            from relay.bench.remote import start_connect

            address = start_connect(procs, tcp["tunnel_url"])
            relay_processes["connect"] = procs.procs["connect"].pid
            how = ("client → relay connect → WebSocket to the gateway → one multiplexed WebSocket → agent → "
                   "bench target; HTTP through an http tunnel URL")
        else:
            address = ("127.0.0.1", int(tcp["hub_port"]))
            how = ("client → gateway hub port → one multiplexed WebSocket → agent → bench target; "
                   "HTTP through an http tunnel URL; everything on 127.0.0.1")
        paths = [
            BenchPath("relay", how, address, http["tunnel_url"], relay_processes),
            BenchPath("direct", "client → bench target, no relay (the same target, inside the agent process)",
                      ("127.0.0.1", bench_port), f"http://127.0.0.1:{bench_port}/", {"agent": agent.pid}),
        ]
        if "ssh" in compare:
            ssh_path = self._start_ssh(bench_port)
            if ssh_path is not None:
                paths.append(ssh_path)
        return paths

    def _start_ssh(self, bench_port: int) -> Optional[BenchPath]:
        """A private sshd and ``ssh -R`` to the bench target, or None (and a note) when
        OpenSSH is not installed."""
        search = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
        sshd, ssh, keygen = (shutil.which(name, path=search) for name in ("sshd", "ssh", "ssh-keygen"))
        if not (sshd and ssh and keygen):
            self.notes.append("ssh -R: skipped, OpenSSH (ssh, sshd, ssh-keygen) is not installed")
            return None
        self.note("starting a private sshd and ssh -R for the comparison ...")
        work = self.workdir / "ssh"
        work.mkdir()
        for name in ("host_key", "client_key"):
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(work / name)], check=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=30)
        shutil.copyfile(work / "client_key.pub", work / "authorized_keys")
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        port, remote_port = free_port(), free_port()
        (work / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {work / 'host_key'}\nPidFile {work / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {work / 'authorized_keys'}\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
            "UseDNS no\nAllowTcpForwarding yes\nGatewayPorts no\nX11Forwarding no\nPrintMotd no\nLogLevel ERROR\n")
        sshd_proc = self.procs.spawn("sshd", [sshd, "-D", "-e", "-f", str(work / "sshd_config")])
        deadline = time.monotonic() + READY_TIMEOUT
        while not _banner(port):
            dead = self.procs.check()
            if dead:
                raise BenchError(dead)
            if time.monotonic() > deadline:
                raise BenchError(f"sshd did not start: {_tail(self.procs.logs['sshd'])}")
            time.sleep(0.05)
        user = pwd.getpwuid(os.geteuid()).pw_name
        ssh_proc = self.procs.spawn("ssh", [
            ssh, "-N", "-i", str(work / "client_key"), "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=15",
            "-R", f"127.0.0.1:{remote_port}:127.0.0.1:{bench_port}", "-p", str(port), f"{user}@127.0.0.1"])
        while not _accepts(remote_port):
            dead = self.procs.check()
            if dead:
                raise BenchError(dead)
            if time.monotonic() > deadline:
                raise BenchError(f"ssh -R did not start forwarding: {_tail(self.procs.logs['ssh'])}")
            time.sleep(0.05)
        return BenchPath("ssh -R", "client → sshd's forwarded port → one SSH connection → ssh -R client → bench "
                                   "target (OpenSSH reverse forwarding, the same machine)",
                         ("127.0.0.1", remote_port), f"http://127.0.0.1:{remote_port}/",
                         {"sshd": sshd_proc.pid, "ssh": ssh_proc.pid})

    def check(self) -> Optional[str]:
        return self.procs.check()

    def close(self) -> None:
        try:
            self.procs.close()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _banner(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            return sock.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False
