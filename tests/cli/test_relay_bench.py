"""``relay bench`` (issue 15) against real processes, in short mode; speed is never
asserted, only the structure of what is printed and written:

* ``relay bench --local --compare ssh``: every row on every path in the table, the JSON
  valid against its schema, the PNG decodes at its size;
* an agent without ``--bench``: one-line refusal, exit status 1;
* the agent killed mid-run: an error line, the partial table, exit status 1;
* SIGINT mid-run: exit status 130, the partial table, no child process left;
* ``relay bench http``: Python engine flat out and at a rate, wrk; statuses counted;
* bad arguments and a missing ``bench`` extra: one ``Error:`` line each.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import psutil
import pytest

from relay.bench.plot import DPI, PLOT_SIZE
from relay.bench.report import JSON_SCHEMA
from tests.gateway.test_faults import RelayProcs, wait_for
from tests.support.servers import free_port, require_binary

pytestmark = pytest.mark.timeout(240)

ROWS = ("download", "upload", "streams", "latency", "connect", "http")
#: Short mode: enough to exercise every row, far too short to mean anything.
SHORT = ("--duration", "0.25", "--warmup", "0.05")


class BenchRelay(RelayProcs):
    """A gateway and an agent ``faults``, with ``--bench`` on a free port or without."""

    def __init__(self, workdir: Path, bench: bool, allow: tuple[str, ...] = (), backend: str = "asyncio") -> None:
        self.bench = bench
        self.bench_port = free_port()
        self.allow = allow
        self.backend = backend
        super().__init__(workdir)

    def start_agent(self) -> None:
        extra = ["--bench", "--bench-port", str(self.bench_port)] if self.bench else []
        extra += [arg for target in self.allow for arg in ("--allow", target)]
        self.agent = self._spawn("agent", "--gateway", f"http://127.0.0.1:{self.port}", "--name", "faults", *extra,
                                 "--backend", self.backend, log=self.workdir / "agent.log",
                                 env={"RELAY_AGENT_KEY": self.keys["ak"]})
        self.agent_id = wait_for(self.online_agent, what="agent online")

    def bench_args(self) -> list[str]:
        return ["--agent", "faults", "--gateway", f"http://127.0.0.1:{self.port}", "--bench-port", str(self.bench_port)]


@pytest.fixture
def bench_relay(tmp_path: Path) -> Iterator[BenchRelay]:
    procs = BenchRelay(tmp_path, bench=True)
    try:
        yield procs
    finally:
        procs.close()


def relay_bench(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", "bench", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


class Running:
    """``relay bench ARGS`` in the background, its output in files."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.out, self.err = workdir / "bench.out", workdir / "bench.err"
        self.proc = subprocess.Popen([sys.executable, "-m", "relay", "bench", *args], stdin=subprocess.DEVNULL,
                                     stdout=self.out.open("wb"), stderr=self.err.open("wb"),
                                     env={**os.environ, **(env or {})})

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def finished_measurements(self) -> int:
        """Lines the progress display printed for finished measurements."""
        return sum(1 for line in self.stderr().splitlines() if line.split()[:1] and line.split()[0] in ROWS)

    def wait(self, timeout: float = 60) -> tuple[int, str, str]:
        code = self.proc.wait(timeout)
        return code, self.out.read_text(errors="replace"), self.stderr()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def table_rows(stdout: str) -> list[tuple[str, str]]:
    """``(row, path)`` of every line of the table (a blank row cell repeats the last)."""
    found, row = [], ""
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃|").split("│")]
        if len(cells) < 3:
            continue
        if cells[0] in ROWS:
            row = cells[0]
        elif cells[0] or not row or not cells[1]:  # a title, or a wrapped cell's next line
            continue
        found.append((row, cells[1]))
    return found


# ----------------------------------------------------------------------------- --local


def test_local_end_to_end_with_ssh_json_and_plot(tmp_path: Path) -> None:
    require_binary("sshd")
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    result = relay_bench("--local", "--compare", "ssh", *SHORT, "--repeat", "2", "--json", str(json_path),
                         "--plot", str(plot_path))
    assert result.returncode == 0, result.stderr + result.stdout
    assert set(table_rows(result.stdout)) == {(row, path) for row in ROWS for path in ("relay", "direct", "ssh -R")}, \
        result.stdout
    assert "vs direct" in result.stdout and "CPU cores" in result.stdout

    document = json.loads(json_path.read_text())
    jsonschema.validate(document, JSON_SCHEMA)
    assert document["status"] == "complete" and document["error"] is None
    assert {(r["row"], r["path"]) for r in document["rows"]} == \
        {(row, path) for row in ROWS for path in ("relay", "direct", "ssh -R")}
    for row in document["rows"]:
        assert len(row["values"]) == 2 and row["min"] <= row["median"] <= row["max"]
        assert row["cpu_cores"].keys() >= {"client"}
    relay_rows = [r for r in document["rows"] if r["path"] == "relay"]
    assert all({"gateway", "agent"} <= r["cpu_cores"].keys() for r in relay_rows)
    latency = next(r for r in relay_rows if r["row"] == "latency")
    assert latency["detail"]["p50"] <= latency["detail"]["p99"] <= latency["detail"]["p99.9"] <= latency["detail"]["max"]
    streams = next(r for r in relay_rows if r["row"] == "streams")
    assert 0 < streams["detail"]["fairness"] <= 1 and streams["detail"]["streams"] == 8
    http = next(r for r in relay_rows if r["row"] == "http")
    assert http["http"][0]["statuses"].keys() == {"200"}

    from matplotlib.image import imread

    image = imread(plot_path)
    assert image.shape[:2] == (int(PLOT_SIZE[1] * DPI), int(PLOT_SIZE[0] * DPI))


def test_local_via_relay_connect(tmp_path: Path) -> None:
    result = relay_bench("--local", "--via", "ws", *SHORT, "--repeat", "1", "--rows", "download,connect")
    assert result.returncode == 0, result.stderr
    assert set(table_rows(result.stdout)) == {(row, path) for row in ("download", "connect")
                                               for path in ("relay", "direct")}
    assert "client → relay connect → WebSocket" in result.stdout
    assert re.search(r"│ .*connect \d+\.\d\d", result.stdout), result.stdout  # its CPU time is counted


def test_sigint_mid_run_prints_partial_table_and_leaves_no_process(tmp_path: Path) -> None:
    run = Running(tmp_path, "--local", "--duration", "1", "--warmup", "0.05", "--repeat", "3",
                  "--json", str(tmp_path / "partial.json"))
    try:
        wait_for(lambda: run.finished_measurements() >= 2 or run.proc.poll() is not None, timeout=90,
                 what="two finished measurements")
        assert run.proc.poll() is None, run.stderr()
        children = psutil.Process(run.proc.pid).children(recursive=True)
        commands = [" ".join(c.cmdline()) for c in children]
        assert any("relay gateway" in c for c in commands) and any("relay agent" in c for c in commands), commands
        run.proc.send_signal(signal.SIGINT)
        code, stdout, stderr = run.wait(60)
    finally:
        run.kill()
    assert code == 130, stderr
    assert "Traceback" not in stderr
    assert ("download", "relay") in table_rows(stdout), stdout
    assert "interrupted (Ctrl-C)" in stdout
    document = json.loads((tmp_path / "partial.json").read_text())
    jsonschema.validate(document, JSON_SCHEMA)
    assert document["status"] == "interrupted"
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, child


# ----------------------------------------------------------------------------- a gateway and an agent


@pytest.mark.parametrize("allow", [(), ("127.0.0.1:9",)], ids=["loopback-allowed", "allowlist"])
def test_agent_without_bench_is_refused(tmp_path: Path, allow: tuple[str, ...]) -> None:
    """Nothing answers on the port (any loopback port allowed), or the gateway refuses
    the tunnel (the agent's allowlist does not name it): one line either way."""
    procs = BenchRelay(tmp_path, bench=False, allow=allow)
    try:
        result = relay_bench(*procs.bench_args(), *SHORT, "--repeat", "1", env={"RELAY_KEY": procs.keys["sk"]})
    finally:
        procs.close()
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()  # a progress note, then the refusal
    errors = [line for line in lines if line.startswith("Error: ")]
    assert errors == lines[-1:] and "relay agent --bench" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and not result.stdout
    assert procs.keys["sk"] not in result.stderr + result.stdout


def test_remote_agent_with_bench(bench_relay: BenchRelay, tmp_path: Path) -> None:
    _remote_run(bench_relay, tmp_path)


def test_remote_trio_agent_with_bench(tmp_path: Path) -> None:
    """``relay agent --backend trio --bench`` serves the same target (on an asyncio loop
    in a thread of its own), measured through the trio agent, with an allowlist that
    leaves it out (it is allowed implicitly)."""
    procs = BenchRelay(tmp_path, bench=True, allow=("127.0.0.1:1",), backend="trio")
    try:
        _remote_run(procs, tmp_path)
    finally:
        procs.close()


def _remote_run(bench_relay: BenchRelay, tmp_path: Path) -> None:
    result = relay_bench(*bench_relay.bench_args(), *SHORT, "--repeat", "1", "--rows", "download,latency,http",
                         "--json", str(tmp_path / "r.json"), env={"RELAY_KEY": bench_relay.keys["sk"]})
    assert result.returncode == 0, result.stderr
    assert set(table_rows(result.stdout)) == {("download", "relay"), ("latency", "relay"), ("http", "relay")}
    document = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(document, JSON_SCHEMA)
    assert document["mode"] == "remote"
    # the tunnels it opened are closed again
    status, body = bench_relay.api("GET", f"/api/v1/agents/{bench_relay.agent_id}")
    assert status == 200 and body.get("tunnels") == [], body


def test_tunnel_urls_through_relay_connect(bench_relay: BenchRelay) -> None:
    urls = {}
    for protocol in ("tcp", "http"):
        status, body = bench_relay.api("POST", f"/api/v1/agents/{bench_relay.agent_id}/tunnel",
                                       {"target_port": bench_relay.bench_port, "tunnel_protocol": protocol})
        assert status == 200, body
        urls[protocol] = body["tunnel_url"]
    result = relay_bench("--tunnel", urls["tcp"], "--tunnel", urls["http"], *SHORT, "--repeat", "1",
                         "--rows", "upload,connect,http")
    assert result.returncode == 0, result.stderr
    assert set(table_rows(result.stdout)) == {("upload", "relay"), ("connect", "relay"), ("http", "relay")}
    assert "relay connect" in result.stdout
    token = urls["http"].split("/tunnel/")[1].strip("/")
    assert token not in result.stdout + result.stderr


def test_agent_killed_mid_run_ends_with_error_and_partial_table(bench_relay: BenchRelay, tmp_path: Path) -> None:
    run = Running(tmp_path, *bench_relay.bench_args(), "--duration", "1", "--warmup", "0.05", "--repeat", "3",
                  "--json", str(tmp_path / "broken.json"), env={"RELAY_KEY": bench_relay.keys["sk"]})
    try:
        wait_for(lambda: run.finished_measurements() >= 1 or run.proc.poll() is not None, timeout=60,
                 what="a finished measurement")
        assert run.proc.poll() is None, run.stderr()
        bench_relay.agent.kill()  # type: ignore[union-attr]
        code, stdout, stderr = run.wait(60)
    finally:
        run.kill()
    assert code == 1, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, stderr
    assert ("download", "relay") in table_rows(stdout), stdout
    document = json.loads((tmp_path / "broken.json").read_text())
    jsonschema.validate(document, JSON_SCHEMA)
    assert document["status"] == "failed" and document["error"]


# ----------------------------------------------------------------------------- relay bench http


@pytest.mark.parametrize("args", [
    ("--engine", "python", "-c", "4"),
    ("--engine", "python", "-c", "4", "--rate", "200"),
    ("--engine", "wrk", "-c", "4", "--duration", "1"),
])
def test_bench_http(bench_relay: BenchRelay, tmp_path: Path, args: tuple[str, ...]) -> None:
    if "wrk" in args:
        require_binary("wrk")
    out = tmp_path / "http.json"
    result = relay_bench("http", f"http://127.0.0.1:{bench_relay.bench_port}/", "--duration", "0.5", *args,
                         "--json", str(out))
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    assert document["engine"] == args[1]
    assert document["requests"] > 0 and set(document["statuses"]) == {"200"}
    assert document["latency_ms"]["p50"] <= document["latency_ms"]["p99"] <= document["latency_ms"]["max"]
    assert "client used" in result.stdout and "requests/s" in result.stdout
    if "--rate" in args:
        assert document["target_rate"] == 200.0 and "target rate" in result.stdout


def test_bench_http_counts_statuses_and_errors(bench_relay: BenchRelay, tmp_path: Path) -> None:
    out = tmp_path / "404.json"
    result = relay_bench("http", f"http://127.0.0.1:{bench_relay.bench_port}/missing", "--engine", "python",
                         "-c", "2", "--duration", "0.3", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert set(json.loads(out.read_text())["statuses"]) == {"404"}
    refused = relay_bench("http", f"http://127.0.0.1:{free_port()}/", "--engine", "python", "--duration", "0.3")
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "no HTTP request" in lines[0] and "connect" in lines[0], refused.stderr


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("args, message", [
    ((), "say what to measure"),
    (("--local", "--tunnel", "ws://127.0.0.1:1/tunnel/x/tcp"), "cannot be combined"),
    (("--compare", "ssh"), "--compare needs --local"),
    (("--agent", "box1"), "--agent needs --gateway"),
    (("--local", "--duration", "abc"), "--duration"),
    (("--local", "--duration", "0"), "--duration"),
    (("--local", "--repeat", "0"), "--repeat"),
    (("--local", "--rows", "download,nope"), "unknown row nope"),
    (("--local", "--plot", "chart.svg"), "PNG"),
    (("--local", "--json", "/nonexistent-dir/x.json"), "does not exist"),
    (("--local", "--compare", "iperf"), "--compare"),
    (("--tunnel", "ftp://example.com/x"), "expected a ws(s)://"),
    (("--tunnel", "http://127.0.0.1:1/tunnel/a/", "--tunnel", "http://127.0.0.1:1/tunnel/b/"), "two http"),
    (("http",), "URL"),
    (("http", "notaurl"), "expected an http(s):// URL"),
    (("http", "http://127.0.0.1:1/", "-c", "0"), "--connections"),
    (("http", "http://127.0.0.1:1/", "-H", "no-colon"), "Name: value"),
    (("http", "http://127.0.0.1:1/", "--engine", "wrk", "--rate", "10"), "no target rate"),
])
def test_bad_arguments_are_one_line(args: tuple[str, ...], message: str) -> None:
    result = relay_bench(*args, env={"RELAY_GATEWAY": "", "RELAY_KEY": ""}, timeout=60)
    assert result.returncode in (1, 2), result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr


def test_missing_extra_is_one_line() -> None:
    code = ("import sys; sys.modules['hdrh'] = None; from relay.cli import main; "
            "main(['bench', '--local'], prog_name='relay')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'relay[bench]'" in lines[0] and "hdrhistogram" in lines[0], result.stderr


def test_help_explains_every_row() -> None:
    result = relay_bench("--help")
    assert result.returncode == 0
    for row in ROWS:
        assert f"\n    {row} " in result.stdout, row
    text = " ".join(result.stdout.split())
    for words in ("fairness = slowest/fastest", "p99.9", "vs direct", "CPU cores", "limited by the client",
                  "--compare ssh", "exit status 130"):
        assert words in text, words


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_agent_bench_port_taken_is_one_line(tmp_path: Path, backend: str) -> None:
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "relay", "agent", "--gateway", "http://127.0.0.1:1",
                                 "--key", "ak-x", "--bench", "--bench-port", str(port), "--backend", backend],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: --bench cannot listen"), result.stderr



# ----------------------------------------------------------------------------- the agent's target


def test_bench_target_speaks_its_protocol() -> None:
    """relay.agent.bench on a real socket: hello, sink's count, echo, the HTTP routes,
    and anything else answered as HTTP (never as a command)."""
    import asyncio

    from relay.agent.bench import BenchTarget
    from relay.bench_protocol import HTTP_MARKER, command, parse_reply

    async def scenario() -> None:
        target = await BenchTarget.start("127.0.0.1", 0)
        try:
            async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                return await asyncio.open_connection("127.0.0.1", target.port)

            reader, writer = await connect()
            writer.write(command("hello"))
            assert parse_reply(await reader.readline()) == ["ok", "1"]
            assert await reader.read() == b""  # and closed

            reader, writer = await connect()
            writer.write(command("sink") + b"x" * 3_000_000)
            writer.write_eof()
            assert parse_reply(await reader.readline()) == ["ok", "1"]
            assert parse_reply(await reader.readline()) == ["done", "3000000"]
            writer.close()

            reader, writer = await connect()
            writer.write(command("echo"))
            await reader.readline()
            for size in (1, 64, 100_000):
                writer.write(b"e" * size)
                assert await reader.readexactly(size) == b"e" * size
            writer.close()

            reader, writer = await connect()
            writer.write(b"GET /bytes/100000 HTTP/1.1\r\nHost: t\r\n\r\n"
                         b"POST /sink HTTP/1.1\r\nHost: t\r\nContent-Length: 7\r\n\r\npayload"
                         b"GET /nope HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 10)
            assert answer.count(f"{HTTP_MARKER}: 1".encode()) == 3
            assert b"Content-Length: 100000\r\n" in answer and b"\r\n\r\n7\n" in answer
            assert answer.rstrip().endswith(b"not found")

            reader, writer = await connect()
            writer.write(b"RELAY-BENCH/1 rm -rf\n\r\n")  # not a command: HTTP, and bad HTTP
            assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 400 ")
        finally:
            target.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_bench_http_https_with_a_private_ca(tmp_path: Path) -> None:
    """--ca-cert: the Python client verifies the server against that CA; without it the
    certificate is refused and nothing is counted as an answer."""
    import http.server
    import ssl
    import threading

    import trustme

    ca = trustme.CA()
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{server.server_address[1]}/"
    try:
        out = tmp_path / "tls.json"
        trusted = relay_bench("http", url, "--engine", "python", "-c", "2", "--duration", "0.3", "--ca-cert", str(ca_pem),
                              "--json", str(out))
        assert trusted.returncode == 0, trusted.stderr
        assert set(json.loads(out.read_text())["statuses"]) == {"200"}
        untrusted = relay_bench("http", url, "--engine", "python", "-c", "2", "--duration", "0.3",
                                env={"RELAY_CA_CERT": ""})
        assert untrusted.returncode == 1 and "no HTTP request" in untrusted.stderr, untrusted.stderr
    finally:
        server.shutdown()
        server.server_close()
