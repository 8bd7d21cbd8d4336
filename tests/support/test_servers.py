"""Smoke tests: each real-server fixture serves its real client, and stops cleanly.

These guard the e2e fixtures themselves, so a relay test that fails through a tunnel
can't be blamed on a server that never worked.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import psutil
import pytest

from tests.support.servers import (
    NginxServer,
    PostgresServer,
    RedisServer,
    SshdServer,
    require_binary,
    start_nginx,
    start_postgres,
    start_redis,
    start_sshd,
)

pytestmark = pytest.mark.e2e

TIMEOUT = 60  # seconds for any one client command


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a client with no stdin and a bounded wait, capturing text output."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)  # type: ignore[call-overload]


# ------------------------------------------------------------------------------ sshd


def test_ssh_true(sshd_server: SshdServer) -> None:
    result = run([*sshd_server.ssh_args(), "true"])
    assert result.returncode == 0, result.stderr


def test_ssh_echo(sshd_server: SshdServer) -> None:
    result = run([*sshd_server.ssh_args(), "echo", "hello-through-sshd"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello-through-sshd\n"


def test_ssh_stdin_roundtrip(sshd_server: SshdServer) -> None:
    payload = "".join(f"line {i}\n" for i in range(10_000))
    result = run([*sshd_server.ssh_args(), "cat"], input=payload, stdin=None)
    assert result.returncode == 0, result.stderr
    assert result.stdout == payload


def test_scp_roundtrip(sshd_server: SshdServer, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    remote = tmp_path / "remote.bin"
    back = tmp_path / "back.bin"
    up = run([*sshd_server.scp_args(), str(src), sshd_server.remote(remote)])
    assert up.returncode == 0, up.stderr
    down = run([*sshd_server.scp_args(), sshd_server.remote(remote), str(back)])
    assert down.returncode == 0, down.stderr
    assert back.read_bytes() == src.read_bytes()


def test_ssh_rejects_unknown_key(sshd_server: SshdServer, tmp_path: Path) -> None:
    # Proves login is really gated by the generated key, not open to anyone.
    other = tmp_path / "other_key"
    subprocess.run([require_binary("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                   check=True, timeout=TIMEOUT)  # fmt: skip
    argv = sshd_server.ssh_args()
    argv[argv.index("-i") + 1] = str(other)
    result = run([*argv, "true"])
    assert result.returncode == 255
    assert "Permission denied" in result.stderr


def test_ssh_args_port_override(sshd_server: SshdServer) -> None:
    argv = sshd_server.ssh_args(port=12345)
    assert argv[argv.index("-p") + 1] == "12345"
    scp = sshd_server.scp_args(port=12345)
    assert scp[scp.index("-P") + 1] == "12345"


# -------------------------------------------------------------------------- postgres


def test_psql_select_1(postgres_server: PostgresServer) -> None:
    result = run([postgres_server.tool("psql"), "-X", "-A", "-t", "-c", "select 1"], env=postgres_server.env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


def test_psql_over_tcp_not_socket(postgres_server: PostgresServer) -> None:
    # Tunnels carry TCP: make sure env() really reaches the server over 127.0.0.1.
    result = run(
        [postgres_server.tool("psql"), "-X", "-A", "-t", "-c", "select inet_server_addr(), inet_server_port()"],
        env=postgres_server.env(),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"127.0.0.1|{postgres_server.port}"


def test_pgbench(postgres_server: PostgresServer) -> None:
    env = postgres_server.env()
    init = run([postgres_server.tool("pgbench"), "-i", "-s", "1", "-q"], env=env)
    assert init.returncode == 0, init.stderr
    bench = run([postgres_server.tool("pgbench"), "-c", "2", "-t", "20", "-n"], env=env)
    assert bench.returncode == 0, bench.stderr
    assert "number of transactions actually processed: 40/40" in bench.stdout


# ----------------------------------------------------------------------------- redis


def test_redis_ping(redis_server: RedisServer) -> None:
    result = run([*redis_server.cli_args(), "ping"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "PONG"


def test_redis_set_get(redis_server: RedisServer) -> None:
    assert run([*redis_server.cli_args(), "set", "relay:k", "v42"]).stdout.strip() == "OK"
    assert run([*redis_server.cli_args(), "get", "relay:k"]).stdout.strip() == "v42"


# ----------------------------------------------------------------------------- nginx


@pytest.mark.parametrize("path", ["/1k.bin", "/1m.bin"])
def test_curl_static_file(nginx_server: NginxServer, tmp_path: Path, path: str) -> None:
    out = tmp_path / "download"
    result = run([require_binary("curl"), "-sS", "-o", str(out), "-w", "%{http_code} %{size_download}",
                  nginx_server.url(path)])  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"200 {nginx_server.files[path]}"
    assert out.read_bytes() == nginx_server.content(path)


def test_nginx_keepalive(nginx_server: NginxServer) -> None:
    # Two requests in one curl run: the second must reuse the first's connection.
    url = nginx_server.url("/1k.bin")
    result = run([require_binary("curl"), "-sS", "-o", "/dev/null", "-o", "/dev/null",
                  "-w", "%{http_code} %{num_connects}\n", url, url])  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["200 1", "200 0"]


def test_nginx_missing_file_is_404(nginx_server: NginxServer) -> None:
    result = run([require_binary("curl"), "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                  nginx_server.url("/nope")])  # fmt: skip
    assert result.stdout == "404"


# ------------------------------------------------------------------------- teardown


def _tree(pid: int) -> list[psutil.Process]:
    proc = psutil.Process(pid)
    return [proc, *proc.children(recursive=True)]


@pytest.mark.parametrize("start", ["sshd", "postgres", "redis", "nginx"])
def test_stop_leaves_no_process(start: str, tmp_path: Path) -> None:
    starters = {
        "sshd": lambda: start_sshd(tmp_path),
        "postgres": start_postgres,
        "redis": lambda: start_redis(tmp_path),
        "nginx": lambda: start_nginx(tmp_path),
    }
    with starters[start]() as server:
        procs = _tree(server.pid)
        if start in ("postgres", "nginx"):
            assert len(procs) > 1, "expected worker/backend children"
    _, alive = psutil.wait_procs(procs, timeout=5)
    assert alive == [], f"left running: {alive}"
    if start == "postgres":
        assert not server.data_dir.exists(), "temp cluster dir not removed"
