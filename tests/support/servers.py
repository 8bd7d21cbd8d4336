"""Real servers for end-to-end tests: sshd, PostgreSQL, Redis and nginx.

Load as a pytest plugin (``pytest_plugins = ["tests.support.servers"]`` in tests/conftest.py,
or ``-p tests.support.servers``). Each fixture starts a private instance on 127.0.0.1 on a free
port, with its own config and data in a temporary directory, waits (bounded) until it
really serves, and stops it at the end of the session. Nothing depends on, or touches,
the machine's system services.

A missing binary is a hard failure, never a skip: the tests are meant to run against
real servers, and ``scripts/bootstrap --system-deps`` installs them.

The ``start_*`` context managers are public too, for tests that need a server of their
own (e.g. one they may kill).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import glob
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

__all__ = [
    "NginxServer",
    "PostgresServer",
    "RedisServer",
    "SshdServer",
    "free_port",
    "nginx_server",
    "postgres_server",
    "redis_server",
    "require_binary",
    "sshd_server",
    "start_nginx",
    "start_postgres",
    "start_redis",
    "start_sshd",
]

HOST = "127.0.0.1"
#: Upper bound on how long any server may take to become ready.
READY_TIMEOUT = 20.0
#: Upper bound on a graceful stop before the process group is SIGKILLed.
STOP_TIMEOUT = 10.0
_INSTALL_HINT = "run `scripts/bootstrap --system-deps` to install the test servers"
# sshd and nginx live in sbin, which a non-login shell (CI) may not have on PATH.
_EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/local/sbin")


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def require_binary(name: str) -> str:
    """Return the absolute path of executable ``name``, or fail the test naming the fix."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *_EXTRA_PATH])
    path = shutil.which(name, path=search)
    if path is None:
        pytest.fail(f"required binary {name!r} not found: {_INSTALL_HINT}", pytrace=False)
    return path


def _postgres_bin_dir() -> Path:
    """The newest PostgreSQL server bin dir (Debian keeps initdb/postgres out of PATH)."""

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", Path(path).parent.parent.name))

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")  # non-Debian layouts put it on PATH
    if initdb is None:
        pytest.fail(f"PostgreSQL server binaries (initdb) not found: {_INSTALL_HINT}", pytrace=False)
    return Path(initdb).parent


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return text[-limit:] if text else "<empty>"


def _tcp_accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:
    """Child-side safety net: get SIGKILL if pytest dies without running teardown.

    Runs after the uid switch in subprocess's child (so the kernel does not clear it).
    """
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# A watchdog per server: if pytest is killed outright (CI timeout, kill -9) teardown never
# runs, and while the server's main process gets _die_with_parent's SIGKILL, its children
# may outlive it (nginx workers do). The watchdog gets SIGTERM when pytest dies and
# SIGKILLs the server's whole process group. SIGTERM is blocked before asking for it, so
# it cannot kill the watchdog before it has acted; the ppid check covers pytest dying
# before the request took effect.
_WATCHDOG = """
import ctypes, os, signal, sys
pgid, parent = int(sys.argv[1]), int(sys.argv[2])
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() == parent:
    signal.sigwait({signal.SIGTERM})
try:
    os.killpg(pgid, signal.SIGKILL)
except ProcessLookupError:
    pass
"""


def _start_watchdog(pgid: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(pgid), str(os.getpid())],
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # a terminal's Ctrl-C must not take the watchdog down
    )


def _stop(proc: subprocess.Popen[bytes], stop_signal: int) -> None:
    """Stop ``proc`` gracefully, then SIGKILL its whole process group (workers, backends)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(stop_signal)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
    # The server is its own session/group leader (start_new_session), so this reaches
    # any child it left behind, and nothing of ours.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=STOP_TIMEOUT)


@contextlib.contextmanager
def _running(
    name: str,
    argv: list[str],
    log_path: Path,
    ready: Callable[[], bool],
    *,
    stop_signal: int = signal.SIGTERM,
    user: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` (stdout+stderr to ``log_path``) until ``ready()``; stop it on exit."""
    account = pwd.getpwnam(user) if user else None
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,  # own process group: teardown can kill all of it
            user=account.pw_uid if account else None,
            group=account.pw_gid if account else None,
            extra_groups=[] if account else None,  # drop root's supplementary groups
            preexec_fn=_die_with_parent,
        )
    watchdog = _start_watchdog(proc.pid)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"{name} exited with code {proc.returncode} before becoming ready.\n"
                    f"command: {' '.join(argv)}\nlog {log_path}:\n{_tail(log_path)}",
                    pytrace=False,
                )
            if ready():
                break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{name} not ready within {READY_TIMEOUT:.0f}s.\n"
                    f"command: {' '.join(argv)}\nlog {log_path}:\n{_tail(log_path)}",
                    pytrace=False,
                )
            time.sleep(0.05)
        yield proc
    finally:
        _stop(proc, stop_signal)
        watchdog.kill()  # SIGKILL: the group is already gone, nothing left for it to do
        watchdog.wait(timeout=STOP_TIMEOUT)


def _ssh_keygen(path: Path) -> None:
    subprocess.run(
        [require_binary("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", "relay-tests", "-f", str(path)],
        check=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


# ------------------------------------------------------------------------------ sshd


@dataclasses.dataclass(frozen=True)
class SshdServer:
    """A private sshd that accepts ``key_path`` for ``user``."""

    host: str
    port: int
    user: str
    key_path: Path  # client private key (public half is in authorized_keys)
    config_path: Path
    log_path: Path
    pid: int

    def ssh_options(self) -> list[str]:
        """Common ssh/scp options: our key, no host key checks or prompts, quiet."""
        return [
            "-i", str(self.key_path),
            "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=10",
        ]  # fmt: skip

    def ssh_args(self, port: int | None = None) -> list[str]:
        """``ssh`` argv up to and including the destination; append the remote command.

        ``port`` points ssh elsewhere (e.g. a tunnel's local port) with the same key.
        """
        return [
            require_binary("ssh"),
            *self.ssh_options(),
            "-p", str(port or self.port),
            f"{self.user}@{self.host}",
        ]  # fmt: skip

    def scp_args(self, port: int | None = None) -> list[str]:
        """``scp`` argv without the operands; use :meth:`remote` to name remote paths."""
        return [require_binary("scp"), *self.ssh_options(), "-P", str(port or self.port)]

    def remote(self, path: str | os.PathLike[str]) -> str:
        """``user@host:path`` for scp."""
        return f"{self.user}@{self.host}:{path}"


@contextlib.contextmanager
def start_sshd(workdir: Path) -> Iterator[SshdServer]:
    """Run a private sshd in ``workdir`` on a free port; key-only login as the current user."""
    sshd = require_binary("sshd")
    user = pwd.getpwuid(os.geteuid()).pw_name
    host_key = workdir / "ssh_host_ed25519_key"
    client_key = workdir / "id_ed25519"
    _ssh_keygen(host_key)
    _ssh_keygen(client_key)
    authorized_keys = workdir / "authorized_keys"
    shutil.copyfile(client_key.with_suffix(".pub"), authorized_keys)
    # sshd refuses to start without its privilege-separation dir.
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)

    port = free_port()
    config = workdir / "sshd_config"
    config.write_text(
        f"""\
ListenAddress {HOST}
Port {port}
HostKey {host_key}
PidFile {workdir / "sshd.pid"}
AuthorizedKeysFile {authorized_keys}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
# The temp dir's ownership/modes are not what sshd insists on for a home dir.
StrictModes no
UsePAM no
UseDNS no
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
PrintLastLog no
# Tests push many parallel sessions through tunnels; don't throttle them.
MaxStartups 200
MaxSessions 200
# scp uses the SFTP protocol since OpenSSH 9.0.
Subsystem sftp internal-sftp
LogLevel INFO
"""
    )
    log_path = workdir / "sshd.log"
    # sshd's banner is the first thing it sends once it serves connections.
    with _running(
        "sshd",
        [sshd, "-D", "-e", "-f", str(config)],
        log_path,
        lambda: _banner_starts_with(port, b"SSH-"),
    ) as proc:
        yield SshdServer(HOST, port, user, client_key, config, log_path, proc.pid)


def _banner_starts_with(port: int, prefix: bytes) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as sock:
            sock.settimeout(2.0)
            return sock.recv(64).startswith(prefix)
    except OSError:
        return False


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdServer]:
    """A private sshd on 127.0.0.1 for the session; see :class:`SshdServer`."""
    with start_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


# -------------------------------------------------------------------------- postgres


@dataclasses.dataclass(frozen=True)
class PostgresServer:
    """A private PostgreSQL cluster with trust auth; ``env()`` points psql/pgbench at it."""

    host: str
    port: int
    user: str
    dbname: str
    bin_dir: Path  # server's bin dir: version-matched psql, pgbench, pg_isready
    data_dir: Path
    socket_dir: Path
    log_path: Path
    pid: int

    @property
    def dsn(self) -> str:
        """libpq connection URI."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"

    def tool(self, name: str) -> str:
        """Absolute path of a client program (``psql``, ``pgbench``) of the server's version."""
        return str(self.bin_dir / name)

    def env(self, port: int | None = None) -> dict[str, str]:
        """``os.environ`` plus PG* variables for this server (or ``port``, e.g. a tunnel)."""
        return {
            **os.environ,
            "PGHOST": self.host,
            "PGPORT": str(port or self.port),
            "PGUSER": self.user,
            "PGDATABASE": self.dbname,
            "PGCONNECT_TIMEOUT": "10",
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
        }


@contextlib.contextmanager
def start_postgres() -> Iterator[PostgresServer]:
    """initdb + postgres on a free port in a fresh temp dir; removed again on exit.

    PostgreSQL refuses to run as root, so as root it runs as the ``postgres`` system
    user (created by Debian's package) in a directory that user owns. The dir is made
    with mkdtemp under /tmp rather than pytest's tmp dir, whose root-only (0700)
    parents the ``postgres`` user could not enter.
    """
    bin_dir = _postgres_bin_dir()
    run_as: str | None = None
    if os.geteuid() == 0:
        run_as = "postgres"
        try:
            account = pwd.getpwnam(run_as)
        except KeyError:
            pytest.fail(f"no 'postgres' user to run PostgreSQL as: {_INSTALL_HINT}", pytrace=False)

    workdir = Path(tempfile.mkdtemp(prefix="relay-pg-"))
    try:
        data_dir, socket_dir = workdir / "data", workdir / "sock"
        socket_dir.mkdir()
        log_path = workdir / "postgres.log"
        log_path.touch()
        if run_as:
            for path in (workdir, socket_dir, log_path):
                os.chown(path, account.pw_uid, account.pw_gid)
        # A clean environment: HOME of the server user, C locale regardless of the host's.
        env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C", "LANG": "C",
               "HOME": str(workdir), "TZ": "UTC"}  # fmt: skip
        superuser = "postgres"
        initdb = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", superuser,
             "--auth-local=trust", "--auth-host=trust", "--encoding=UTF8", "--no-locale",
             "--no-sync", "--no-instructions"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env, cwd=workdir, timeout=60,
            user=account.pw_uid if run_as else None,
            group=account.pw_gid if run_as else None,
            extra_groups=[] if run_as else None,
        )  # fmt: skip
        if initdb.returncode != 0:
            pytest.fail(f"initdb failed ({initdb.returncode}):\n{initdb.stdout.decode(errors='replace')}",
                        pytrace=False)  # fmt: skip

        port = free_port()
        argv = [
            str(bin_dir / "postgres"), "-D", str(data_dir),
            "-h", HOST, "-p", str(port), "-k", str(socket_dir),
            # Throwaway data: durability off makes pgbench -i and the tests fast.
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=200", "-c", "shared_buffers=128MB",
            "-c", "logging_collector=off",
        ]  # fmt: skip
        pg_isready = [str(bin_dir / "pg_isready"), "-q", "-h", HOST, "-p", str(port), "-U", superuser,
                      "-d", "postgres", "-t", "2"]  # fmt: skip

        def ready() -> bool:
            # A TCP accept is not enough: the server says "starting up" until recovery ends.
            if not _tcp_accepts(port):
                return False
            return subprocess.run(pg_isready, stdin=subprocess.DEVNULL, timeout=10).returncode == 0

        # SIGINT is postgres' "fast" shutdown; SIGTERM ("smart") would wait for clients.
        with _running("postgres", argv, log_path, ready, stop_signal=signal.SIGINT,
                      user=run_as, env=env, cwd=workdir) as proc:  # fmt: skip
            yield PostgresServer(HOST, port, superuser, "postgres", bin_dir, data_dir, socket_dir,
                                 log_path, proc.pid)  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL on 127.0.0.1 for the session; see :class:`PostgresServer`."""
    with start_postgres() as server:
        yield server


# ----------------------------------------------------------------------------- redis


@dataclasses.dataclass(frozen=True)
class RedisServer:
    """A private, non-persistent redis-server."""

    host: str
    port: int
    log_path: Path
    pid: int

    def cli_args(self, port: int | None = None) -> list[str]:
        """``redis-cli`` argv for this server (or ``port``, e.g. a tunnel); append a command."""
        return [require_binary("redis-cli"), "-h", self.host, "-p", str(port or self.port)]


def _redis_pong(port: int) -> bool:
    # Redis answers -LOADING while it starts; only +PONG means it serves commands.
    return _request_starts_with(port, b"PING\r\n", b"+PONG")


def _request_starts_with(port: int, request: bytes, prefix: bytes) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as sock:
            sock.settimeout(2.0)
            sock.sendall(request)
            reply = b""
            while len(reply) < len(prefix):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
            return reply.startswith(prefix)
    except OSError:
        return False


@contextlib.contextmanager
def start_redis(workdir: Path) -> Iterator[RedisServer]:
    """Run redis-server in ``workdir`` on a free port, no persistence, logging to a file."""
    redis = require_binary("redis-server")
    port = free_port()
    argv = [
        redis,
        "--port", str(port), "--bind", HOST,
        "--save", "", "--appendonly", "no", "--daemonize", "no",
        "--dir", str(workdir), "--logfile", "",  # log to stdout, i.e. our log file
        "--maxclients", "1000",
    ]  # fmt: skip
    log_path = workdir / "redis.log"
    with _running("redis-server", argv, log_path, lambda: _redis_pong(port), cwd=workdir) as proc:
        yield RedisServer(HOST, port, log_path, proc.pid)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server on 127.0.0.1 for the session; see :class:`RedisServer`."""
    with start_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


# ----------------------------------------------------------------------------- nginx

#: Static files the nginx fixture serves, by URL path, with their sizes.
NGINX_FILES = {"/1k.bin": 1024, "/1m.bin": 1024 * 1024}


@dataclasses.dataclass(frozen=True)
class NginxServer:
    """A private nginx serving ``static_dir`` (``/1k.bin``, ``/1m.bin``) over HTTP/1.1."""

    host: str
    port: int
    static_dir: Path
    config_path: Path
    error_log: Path
    pid: int
    files: dict[str, int]  # URL path -> size in bytes

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self.port}"

    def url(self, path: str = "/", port: int | None = None) -> str:
        """Absolute URL of ``path`` on this server (or on ``port``, e.g. a tunnel)."""
        return f"http://{self.host}:{port or self.port}{path}"

    def content(self, path: str) -> bytes:
        """Exact bytes nginx serves at URL ``path`` (to compare against a download)."""
        return (self.static_dir / path.lstrip("/")).read_bytes()


@contextlib.contextmanager
def start_nginx(workdir: Path) -> Iterator[NginxServer]:
    """Run nginx (master + 2 workers, foreground) in ``workdir`` on a free port."""
    nginx = require_binary("nginx")
    static_dir = workdir / "www"
    static_dir.mkdir()
    for path, size in NGINX_FILES.items():
        # Seeded random bytes: reproducible, and no repeating pattern that could hide
        # reordered or duplicated chunks in a relayed response.
        (static_dir / path.lstrip("/")).write_bytes(random.Random(size).randbytes(size))
    tmp = workdir / "tmp"
    tmp.mkdir()

    port = free_port()
    config = workdir / "nginx.conf"
    # nginx's stderr and its error_log share one file, so a failure shows everything.
    error_log = workdir / "error.log"
    # As root, workers would otherwise drop to 'nobody', who cannot read pytest's 0700 tmp dirs.
    user_line = "user root root;" if os.geteuid() == 0 else ""
    config.write_text(
        f"""\
{user_line}
daemon off;
master_process on;
worker_processes 2;
worker_rlimit_nofile 65536;
pid {workdir / "nginx.pid"};
error_log {error_log} warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    # Load tests reuse one connection for many requests.
    keepalive_requests 100000;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {HOST}:{port};
        server_name localhost;
        root {static_dir};
        location / {{ }}
    }}
}}
"""
    )
    # -e: nginx opens its default error log before reading the config; keep it in workdir.
    argv = [nginx, "-p", str(workdir), "-c", str(config), "-e", str(error_log)]
    request = f"GET /1k.bin HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode()
    with _running(
        "nginx", argv, error_log, lambda: _request_starts_with(port, request, b"HTTP/1.1 200"),
        stop_signal=signal.SIGTERM,  # fast shutdown
    ) as proc:  # fmt: skip
        yield NginxServer(HOST, port, static_dir, config, error_log, proc.pid, dict(NGINX_FILES))


@pytest.fixture(scope="session")
def nginx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxServer]:
    """A private nginx on 127.0.0.1 for the session; see :class:`NginxServer`."""
    with start_nginx(tmp_path_factory.mktemp("nginx")) as server:
        yield server
