"""The conformance suite: the same tests on every agent/gateway pairing.

Each test is written once against :class:`tests.conformance.harness.Env` and runs on
asyncio agent <-> asyncio gateway, trio agent <-> asyncio gateway, asyncio agent <-> trio
host and trio agent <-> trio host (``PAIRINGS``), always through the real agent to real
TCP servers on 127.0.0.1. scripts/test runs the suite with compiled extensions and again
with ``RELAY_NO_EXTENSIONS=1``.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import resource
import struct

import pytest
import trio

from relay import __version__
from relay.mux.connection import MuxConfig
from relay.mux.errors import ErrorCode
from tests.conformance.harness import AGENT_NAME, GATEWAY_PAIRINGS, Env, conformance, run_pairing

DEFAULTS = MuxConfig()


@conformance()
async def test_open(env: Env) -> None:
    """The agent says hello (same info from both agents) and a stream reaches a target."""
    hello = await env.hello()
    # The keys both agents send (the asyncio agent may add newer ones, e.g. services).
    assert {key: hello.get(key) for key in ("name", "labels", "version", "limits")} == {
        "name": AGENT_NAME, "labels": ["conformance", "x"], "version": __version__,
        "limits": {"max_streams": DEFAULTS.max_streams}}
    conn = await env.open_stream_to(env.targets.echo)
    await conn.send(b"hello through the tunnel")
    await conn.send_eof()
    assert await conn.receive_all() == b"hello through the tunnel"
    await conn.close()


@conformance()
async def test_large_transfer_both_ways(env: Env) -> None:
    """8 MiB up and 8 MiB down at the same time (an echo), byte for byte (sha256)."""
    payload = os.urandom(8 * 1024 * 1024)
    conn = await env.open_stream_to(env.targets.echo)
    received = hashlib.sha256()
    count = 0

    async def send() -> None:
        view = memoryview(payload)
        for offset in range(0, len(payload), 256 * 1024):
            await conn.send(view[offset:offset + 256 * 1024])
        await conn.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while data := await conn.receive(256 * 1024):
            received.update(data)
            count += len(data)
    assert count == len(payload)
    assert received.digest() == hashlib.sha256(payload).digest()
    await conn.close()


@conformance()
async def test_half_close(env: Env) -> None:
    """The client shuts down its sending side and still receives the answer, which the
    target can only give after seeing that EOF."""
    payload = os.urandom(1024 * 1024 + 7)
    conn = await env.open_stream_to(env.targets.digest)
    await conn.send(payload)
    await conn.send_eof()
    answer = await conn.receive_all()
    assert answer == struct.pack(">Q", len(payload)) + hashlib.sha256(payload).digest()
    await conn.close()


@conformance()
async def test_reset(env: Env) -> None:
    """The target aborts its connection (RST): the client sees a reset or EOF promptly,
    and the session is unharmed."""
    conn = await env.open_stream_to(env.targets.abort)
    with trio.fail_after(5):
        greeting = b""
        while len(greeting) < 3:
            greeting += await conn.receive(3 - len(greeting))
        assert greeting == b"bye"
        try:
            assert await conn.receive(1024) == b""
        except trio.BrokenResourceError:
            pass
    await conn.close()
    again = await env.open_stream_to(env.targets.echo)
    await again.send(b"still fine")
    await again.send_eof()
    assert await again.receive_all() == b"still fine"
    await again.close()


@conformance(timeout=60)
async def test_backpressure_with_a_stalled_reader(env: Env) -> None:
    """A target that stops reading stops the client after a bounded amount; agent and
    gateway hold no more than their windows and queues; it all resumes when it reads."""
    total = 32 * 1024 * 1024
    chunk = os.urandom(64 * 1024)
    env.targets.digest_gate = trio.Event()  # the digest server waits before reading
    conn = await env.open_stream_to(env.targets.digest)
    sent = 0

    async def produce() -> None:
        nonlocal sent
        while sent < total:
            await conn.send(chunk)
            sent += len(chunk)
        await conn.send_eof()

    # Bound: one stream window (auto-tuning may grow it to max_window) plus one send
    # queue per side, and slack for a read in flight.
    bound = DEFAULTS.max_window + DEFAULTS.send_queue_limit + 1024 * 1024
    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        # Wait until the client is stuck: no progress for half a second.
        last = -1
        while sent != last:
            last = sent
            await trio.sleep(0.5)
        assert sent < total, "the client was never stopped"
        assert env.targets.digest_read[0] == 0
        agent_held, gateway_held = await env.memory()
        assert agent_held <= bound and gateway_held <= bound, (agent_held, gateway_held)
        env.targets.digest_gate.set()  # the reader resumes: everything flows again
    answer = await conn.receive_all()
    expected = hashlib.sha256(chunk * (total // len(chunk))).digest()
    assert answer == struct.pack(">Q", total) + expected
    await conn.close()


@conformance(timeout=90)
async def test_1000_concurrent_streams(env: Env) -> None:
    """1,000 streams open at once through one agent connection, each echoing its own
    bytes (4 sockets per stream in the process: raise the fd limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    count = 1000
    all_echoed = trio.Event()
    echoed = 0
    limiter = trio.CapacityLimiter(100)  # connects in waves: listen backlogs are finite
    peak = 0

    async def one(i: int) -> None:
        nonlocal echoed
        message = b"stream %04d" % i
        async with limiter:
            conn = await env.open_stream_to(env.targets.echo)
            await conn.send(message)
            got = b""
            while len(got) < len(message):
                got += await conn.receive(64)
            assert got == message
        echoed += 1
        if echoed == count:
            all_echoed.set()
        await all_echoed.wait()  # hold every stream open until all have echoed
        await conn.send_eof()
        assert await conn.receive_all() == b""
        await conn.close()

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)
        await all_echoed.wait()
        peak = await env.agent_open_streams()
    assert peak >= count
    with trio.fail_after(10):  # and they all finish
        while await env.agent_open_streams():
            await trio.sleep(0.05)


@conformance()
async def test_agent_reconnect(env: Env) -> None:
    """The agent's connection is cut abruptly; the agent reconnects by itself and a new
    stream works."""
    before = await env.wait_agent()
    conn = await env.open_stream_to(env.targets.echo)
    await env.drop_agent_connection()
    with trio.fail_after(5):  # the stream of the lost connection ends promptly
        try:
            await conn.receive_all()
        except trio.BrokenResourceError:
            pass
    await conn.close()
    await env.wait_agent(other_than=before)
    conn = await env.open_stream_to(env.targets.echo)
    await conn.send(b"after the reconnect")
    await conn.send_eof()
    assert await conn.receive_all() == b"after the reconnect"
    await conn.close()


@conformance()
async def test_refusals(env: Env) -> None:
    """Targets off the allowlist are refused with NOT_ALLOWED and the same message from
    both agents; an unreachable one with CONNECT_FAILED."""
    code, message = await env.refusal("10.255.255.1:9")
    assert code == "NOT_ALLOWED"
    assert message == (f"target 10.255.255.1:9 is not allowed by agent {AGENT_NAME!r} "
                       "(allowed: loopback hosts only)")
    code, message = await env.refusal(env.targets.closed)
    assert code == "CONNECT_FAILED"
    assert message.startswith(f"cannot connect to {env.targets.closed}: ")


# ---------------------------------------------------------------------- the trio agent itself


def test_trio_agent_policy_matches_the_asyncio_agent() -> None:
    """URL handling, allowlist (declared services included), the hello and backoff:
    both agents decide them with the same code (relay.agent.base and policy) and must
    agree."""
    from relay.agent import Agent
    from relay.agent.trio_client import TrioAgent

    for url in ("http://gw:8080", "https://gw.example.com", "ws://gw/prefix/", "gw:9000"):
        assert TrioAgent(url, "ak-x").gateway_url == Agent(url, "ak-x").gateway_url
    allow = ["127.0.0.1:22", "[::1]:80", "db.lan:5432"]
    for kwargs in ({}, {"allow": allow}):
        trio_agent, aio_agent = TrioAgent("http://gw", "ak-x", **kwargs), Agent("http://gw", "ak-x", **kwargs)
        for host, port in [("127.0.0.1", 22), ("LOCALHOST", 5432), ("::1", 80), ("db.lan", 5432),
                           ("10.0.0.1", 22), ("127.0.0.1", 23)]:
            assert trio_agent.is_allowed(host, port) == aio_agent.is_allowed(host, port)
    from relay.agent.services import parse_service
    from relay.mux.connection import MuxConfig

    trio_agent, aio_agent = TrioAgent("http://gw", "ak-x", allow=allow), Agent("http://gw", "ak-x", allow=allow)
    for agent in (trio_agent, aio_agent):
        agent.services = [parse_service("svc=127.0.0.1:8000")]
        agent.instance_id = "same"
    assert trio_agent.is_allowed("127.0.0.1", 8000) and aio_agent.is_allowed("127.0.0.1", 8000)
    assert trio_agent.hello_info(MuxConfig()) == aio_agent.hello_info(MuxConfig())
    delays = [TrioAgent("http://gw", "ak-x").backoff_delay(i) for i in range(12)]
    assert 0.4 <= delays[0] <= 0.6 and 0.8 <= delays[1] <= 1.2
    assert all(24 <= d <= 36 for d in delays[8:])
    assert "ak-secret" not in repr(TrioAgent("http://gw", "ak-secret"))


def test_relay_agent_backend_trio_cli(tmp_path) -> None:
    """``relay agent --backend trio`` runs the trio agent (against a trio host here): it
    serves a stream; a wrong key is a one-line error and a non-zero exit."""
    import functools
    import subprocess
    import sys

    from relay.trio.gateway import serve_agents
    from tests.conformance.harness import TRIO_HOST_KEY, start_targets

    async def main() -> None:
        sessions = []

        async def handler(session, principal) -> None:
            sessions.append(session)
            await session.wait_closed()

        async with trio.open_nursery() as nursery:
            targets = await start_targets(nursery)
            server = await nursery.start(functools.partial(
                serve_agents, handler, "127.0.0.1", 0, authenticate=lambda token: token == TRIO_HOST_KEY))
            argv = [sys.executable, "-m", "relay", "agent", "--backend", "trio", "--name", "cli-trio",
                    "--gateway", f"http://127.0.0.1:{server.port}", "--log-level", "warning"]
            wrong = await trio.run_process(argv + ["--key", "ak-wrong"], capture_stdout=True,
                                           capture_stderr=True, check=False)
            assert wrong.returncode == 1
            assert wrong.stderr.decode().strip().splitlines() == [
                "Error: the gateway rejected the agent key: server refused the WebSocket upgrade with HTTP 401"]
            process = await trio.lowlevel.open_process(argv + ["--key", TRIO_HOST_KEY], stdin=subprocess.DEVNULL)
            try:
                with trio.fail_after(20):
                    while not sessions:
                        await trio.sleep(0.05)
                    assert sessions[0].peer_info["name"] == "cli-trio"
                    stream = await sessions[0].open_stream({"protocol": "tcp", "target": targets.echo})
                    await stream.send_all(b"via the CLI agent")
                    await stream.send_eof()
                    received = b""
                    while data := await stream.receive_some():
                        received += data
                    assert received == b"via the CLI agent"
            finally:
                process.kill()
                await process.wait()
            nursery.cancel_scope.cancel()

    async def bounded() -> None:
        with trio.fail_after(40):
            await main()

    trio.run(bounded)


def test_relay_agent_backend_trio_refuses_what_it_does_not_serve() -> None:
    """``--tunnel`` (opened through the asyncio API client) is the one agent option the
    trio body refuses: a usage error naming it, before anything starts."""
    from click.testing import CliRunner

    from relay.cli import main

    result = CliRunner().invoke(main, ["agent", "--gateway", "http://127.0.0.1:1", "--key", "ak-" + "x" * 30,
                                       "--backend", "trio", "--tunnel", "http:80", "--api-key", "sk-x"])
    assert result.exit_code == 2 and "--backend trio does not support --tunnel yet" in result.output


def test_serve_agents_checks_keys_and_survives_a_failing_handler() -> None:
    """401 without a valid key (before any upgrade), 404 off the agent path, 500 if the
    check itself fails; a handler that raises ends only its agent's session."""
    import functools

    from trio_websocket import ConnectionRejected, open_websocket

    from relay.agent.trio_client import TrioAgent
    from relay.trio.gateway import serve_agents

    def authenticate(token):
        if token == "ak-boom":
            raise RuntimeError("database down")
        return token == "ak-good" and {"team": "t"}

    seen = []

    async def handler(session, principal) -> None:
        seen.append(principal)
        if len(seen) == 1:
            raise RuntimeError("handler bug")
        await session.wait_closed()

    async def status(port: int, path: str, key=None) -> int:
        headers = [(b"Authorization", b"Bearer " + key.encode())] if key else []
        try:
            async with open_websocket("127.0.0.1", port, path, use_ssl=False, extra_headers=headers):
                return 101
        except ConnectionRejected as exc:
            return exc.status_code

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(functools.partial(
                serve_agents, handler, "127.0.0.1", 0, authenticate=authenticate))
            path = "/api/v1/agent/connect"
            assert await status(server.port, path) == 401
            assert await status(server.port, path, "ak-wrong") == 401
            assert await status(server.port, path, "ak-boom") == 500
            assert await status(server.port, "/elsewhere", "ak-good") == 404
            agent = TrioAgent(f"http://127.0.0.1:{server.port}", "ak-good", name="a")
            await agent.run_once()  # the failing handler's session is closed; it returns
            nursery.start_soon(agent.run)
            with trio.fail_after(10):
                while len(seen) < 2 or not agent.connected:
                    await trio.sleep(0.02)
            assert seen == [{"team": "t"}, {"team": "t"}]
            nursery.cancel_scope.cancel()

    async def bounded() -> None:
        with trio.fail_after(30):
            await main()

    trio.run(bounded)


@pytest.mark.parametrize("pairing", ["asyncio-trio", "trio-trio"])
def test_a_tls_stream_is_spoken_tls(pairing: str, tmp_path) -> None:
    """A stream with ``"tls": true`` (an https tunnel's share link): both agents speak TLS
    to the target, its certificate not verified (a self-signed one here), and what the
    target echoes inside TLS comes back in the clear. A target that does not speak TLS
    (a plain echo server answers the ClientHello with itself) fails the handshake: the
    stream is refused CONNECT_FAILED, where a plain connection would have been accepted."""
    import ssl

    from tests.gateway.test_gateway_e2e import _self_signed

    cert, key = _self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def body(env: Env) -> None:
        from relay.trio import StreamRefused

        async def tls_echo(stream: trio.SocketStream) -> None:
            wrapped = trio.SSLStream(stream, server_tls, server_side=True)
            try:
                while data := await wrapped.receive_some(65536):
                    await wrapped.send_all(data)
            except trio.BrokenResourceError:
                pass
            finally:
                await trio.aclose_forcefully(wrapped)

        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        await env.nursery.start(trio.serve_listeners, tls_echo, [listener])
        tls_target = "127.0.0.1:%d" % listener.socket.getsockname()[1]
        session = env._current_gateway_session()
        stream = await session.open_stream({"protocol": "tcp", "target": tls_target, "tls": True})
        await stream.send_all(b"inside TLS")
        received = b""
        with trio.fail_after(10):
            while len(received) < len(b"inside TLS"):
                received += await stream.receive_some(64)
        assert received == b"inside TLS"
        await stream.aclose()

        with pytest.raises(StreamRefused) as caught:
            await session.open_stream({"protocol": "tcp", "target": env.targets.echo, "tls": True})
        code, message = ErrorCode(caught.value.error_code).name, caught.value.message
        assert code == "CONNECT_FAILED" and message.startswith(f"cannot connect to {env.targets.echo}: ")
        # The same target without "tls" is served as before.
        conn = await env.open_stream_to(env.targets.echo)
        await conn.send(b"plain")
        await conn.send_eof()
        assert await conn.receive_all() == b"plain"
        await conn.close()

    run_pairing(pairing, tmp_path, body, 30.0)


@pytest.mark.parametrize("pairing", ["asyncio-trio", "trio-trio"])
def test_a_terminal_stream_is_refused_without_terminal(pairing: str, tmp_path) -> None:
    """An agent started without a terminal refuses a terminal stream with NOT_ALLOWED and
    the same reason from both agents (tests/tunnels/test_terminal.py runs the shell
    itself on both)."""
    async def body(env: Env) -> None:
        from relay.mux.terminal import open_metadata
        from relay.trio import StreamRefused

        session = env._current_gateway_session()
        with pytest.raises(StreamRefused) as caught:
            await session.open_stream(open_metadata("s-1", 80, 24))
        assert ErrorCode(caught.value.error_code).name == "NOT_ALLOWED"
        assert caught.value.message == (f"agent {AGENT_NAME!r} serves no terminal: start it with "
                                        "--terminal SHELL to allow one")

    run_pairing(pairing, tmp_path, body, 30.0)


# ---------------------------------------------------------------------- against the real gateway
# Services, tasks and connect bindings: both agents, the asyncio gateway (GATEWAY_PAIRINGS).


def _declare_service(agent, env: Env) -> None:
    """A service the agent declares, on a target its explicit allowlist leaves out."""
    from relay.agent.policy import parse_allowlist
    from relay.agent.services import parse_service

    agent.services = [parse_service(f"conf-svc={env.targets.http},prompt=Echoes,label=conformance")]
    agent.allow = parse_allowlist(["127.0.0.1:1"])


@conformance(pairings=GATEWAY_PAIRINGS, setup=_declare_service)
async def test_a_declared_service_is_served_through_the_service_proxy(env: Env) -> None:
    """The agent declares a service in its hello; the gateway probes its health through
    the agent and proxies requests to it (its target is allowed implicitly, though the
    agent's allowlist names another)."""
    hello = await env.hello()
    assert hello["services"] == [{"slug": "conf-svc", "target": env.targets.http, "health": "/health",
                                  "prompt": "Echoes", "openapi": None, "labels": ["conformance"]}]
    assert hello["allow"] == ["127.0.0.1:1"]
    agent_id = await env.agent_id()
    with trio.fail_after(15):
        while True:
            status, svc = await env.api("GET", "/api/v1/r/containers/conf-svc")
            if status == 200 and svc["service_status"] == "running" and svc["instances_healthy"] == 1:
                break
            await trio.sleep(0.05)
    assert svc["instances"][0]["agent_id"] == agent_id and svc["usage_prompt"] == "Echoes"
    status, answer = await env.api("POST", "/api/v1/r/invoke/conf-svc",
                                   {"method": "POST", "path": "/echo/a?b=1",
                                    "body_base64": base64.b64encode(b"ping").decode()})
    assert status == 200, answer
    assert answer["status_code"] == 200 and answer["headers"]["x-echo-target"] == "/echo/a?b=1"
    assert base64.b64decode(answer["body_base64"]) == b"ping"
    # A target off the allowlist that is no service stays refused.
    code, _ = await env.refusal("127.0.0.1:2")
    assert code == "NOT_ALLOWED"


#: What the cancellable handler saw, by task id (the type of the exception it got).
_CANCELLED: dict[str, str] = {}


def _task_handlers(agent, env: Env) -> None:
    """The built-ins, a failing handler, an async generator and one that waits until
    cancelled, all written once for both loops (they await only the task's own calls)."""
    agent.tasks.register_builtins()

    @agent.tasks.handler("fail")
    async def fail(task):
        await task.progress("about to fail")
        raise ValueError(f"bad input {task.input!r}")

    @agent.tasks.handler("lines")
    async def lines(task):
        for line in task.input:
            yield line.upper()
        task.result = {"lines": len(task.input)}

    @agent.tasks.handler("wait")
    async def wait(task):
        _CANCELLED[task.task_id] = "running"
        try:
            await task.sleep(60)
        except BaseException as exc:
            _CANCELLED[task.task_id] = type(exc).__name__
            raise
        return "never"


async def _run_task(env: Env, kind: str, task_input=None) -> tuple[dict, list]:
    status, task = await env.api("POST", "/api/v1/tasks", {"kind": kind, "input": task_input})
    assert status == 202 and task["status"] == "dispatched", task
    events = await env.events(f"/api/v1/tasks/{task['task_id']}/events")
    status, final = await env.api("GET", f"/api/v1/tasks/{task['task_id']}")
    assert status == 200
    return final, events


@conformance(pairings=GATEWAY_PAIRINGS, setup=_task_handlers, timeout=60)
async def test_tasks_report_progress_outputs_results_and_errors(env: Env) -> None:
    """Tasks dispatched to the agent: progress and outputs streamed in order, then the
    result; a handler's exception is the task's error; an unknown kind is an error
    naming the kinds the agent knows."""
    agent_id = await env.agent_id()
    final, events = await _run_task(env, "count", {"to": 3})
    assert final["status"] == "succeeded" and final["agent_id"] == agent_id
    assert final["result"] == {"count": 3} and final["outputs"] == [1, 2, 3]
    streamed = [(kind, data[kind]) for kind, data in events if kind != "status"]
    assert streamed == [("progress", {"done": 0, "total": 3}), ("output", 1),
                        ("progress", {"done": 1, "total": 3}), ("output", 2),
                        ("progress", {"done": 2, "total": 3}), ("output", 3),
                        ("result", {"count": 3})]
    final, _ = await _run_task(env, "lines", ["a", "b"])
    assert (final["status"], final["outputs"], final["result"]) == ("succeeded", ["A", "B"], {"lines": 2})
    final, events = await _run_task(env, "fail", 7)
    assert final["status"] == "failed" and final["error"] == "bad input 7"
    assert ("progress", "about to fail") in [(kind, data.get(kind)) for kind, data in events]
    final, _ = await _run_task(env, "sleep", {"seconds": 0.2})
    assert final["status"] == "succeeded" and final["result"] == {"slept": 0.2}
    final, _ = await _run_task(env, "nope")
    assert final["status"] == "failed"
    assert final["error"] == "no handler for task kind 'nope' (known: count, echo, fail, lines, sleep, wait)"


@conformance(pairings=GATEWAY_PAIRINGS, setup=_task_handlers, timeout=60)
async def test_a_cancel_reaches_the_handler_as_its_loops_cancellation(env: Env) -> None:
    """POST .../cancel: the handler sees its loop's cancellation where it awaits
    (asyncio.CancelledError, trio.Cancelled), the task ends cancelled, and the agent takes
    the next task at once; a connection that ends cancels its tasks too."""
    expected = "CancelledError" if env.agent_kind == "asyncio" else "Cancelled"
    status, task = await env.api("POST", "/api/v1/tasks", {"kind": "wait"})
    assert status == 202 and task["status"] == "dispatched", task
    with trio.fail_after(10):
        while _CANCELLED.get(task["task_id"]) != "running":
            await trio.sleep(0.02)
    status, cancelled = await env.api("POST", f"/api/v1/tasks/{task['task_id']}/cancel")
    assert status == 200 and cancelled["status"] == "cancelled", cancelled
    with trio.fail_after(10):
        while _CANCELLED[task["task_id"]] == "running":
            await trio.sleep(0.02)
    assert _CANCELLED[task["task_id"]] == expected
    final, _ = await _run_task(env, "echo", {"after": "cancel"})
    assert final["status"] == "succeeded" and final["result"] == {"after": "cancel"}

    # The connection drops mid-task: the task fails at the gateway, the handler is cancelled.
    status, task = await env.api("POST", "/api/v1/tasks", {"kind": "wait"})
    assert status == 202 and task["status"] == "dispatched", task
    with trio.fail_after(10):
        while _CANCELLED.get(task["task_id"]) != "running":
            await trio.sleep(0.02)
    before = await env.drop_agent_connection()
    with trio.fail_after(10):
        while _CANCELLED[task["task_id"]] == "running":
            await trio.sleep(0.02)
    assert _CANCELLED[task["task_id"]] == expected
    status, final = await env.api("GET", f"/api/v1/tasks/{task['task_id']}")
    assert final["status"] == "failed" and final["error"] == "agent disconnected", final
    await env.wait_agent(other_than=before)
    final, _ = await _run_task(env, "echo", "back")
    assert final["status"] == "succeeded" and final["result"] == "back"


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@conformance(pairings=GATEWAY_PAIRINGS, timeout=60)
async def test_connect_binds_a_local_port_that_reaches_the_tunnel(env: Env) -> None:
    """The Tunnels API's connect: the agent listens on 127.0.0.1:PORT and relays each
    connection through the tunnel's hub port to the target, half-close included; a port
    it cannot listen on is a bind_failed error with its reason; the listener survives a
    reconnect (the gateway's re-sent bind keeps it) and goes with DELETE .../bindings."""
    agent_id = await env.agent_id()
    status, tunnel = await env.api("POST", "/api/v1/tunnels", {"target": env.targets.digest,
                                                               "agent_id": agent_id, "name": "digest"})
    assert status == 201, tunnel
    connect = f"/api/v1/tunnels/{tunnel['id']}/connect"
    with socket_held() as taken:
        status, body = await env.api("POST", connect, {"agent_id": agent_id, "local_port": taken})
    assert status == 502 and body["error"]["code"] == "bind_failed", body
    assert f"cannot listen on 127.0.0.1:{taken}: " in body["error"]["message"]
    assert "in use" in body["error"]["message"], body

    local = _free_port()
    status, body = await env.api("POST", connect, {"agent_id": agent_id, "local_port": local})
    assert status == 200 and body["connection_string"] == f"tcp://127.0.0.1:{local}", body
    assert await env.bound() == {tunnel["id"]: local}

    async def digest_through(payload: bytes) -> bytes:
        conn = await trio.open_tcp_stream("127.0.0.1", local)
        await conn.send_all(payload)
        await conn.send_eof()  # the digest target answers only after the EOF
        answer = b""
        while data := await conn.receive_some(65536):
            answer += data
        await conn.aclose()
        return answer

    payload = os.urandom(300_000)
    expected = struct.pack(">Q", len(payload)) + hashlib.sha256(payload).digest()
    assert await digest_through(payload) == expected

    before = await env.drop_agent_connection()
    await env.wait_agent(other_than=before)
    with trio.fail_after(10):  # the gateway re-sends the binding; the listener stays as it is
        while await env.bound() != {tunnel["id"]: local}:
            await trio.sleep(0.05)
    assert await digest_through(payload) == expected

    status, _ = await env.api("DELETE", f"/api/v1/tunnels/{tunnel['id']}/bindings/{agent_id}")
    assert status == 204
    with trio.fail_after(10):
        while await env.bound():
            await trio.sleep(0.05)
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", local)


class socket_held:
    """A port on 127.0.0.1 that something else listens on, while in the ``with``."""

    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen()
        return self._sock.getsockname()[1]

    def __exit__(self, *exc_info) -> None:
        self._sock.close()


@conformance(pairings=GATEWAY_PAIRINGS)
async def test_a_udp_tunnel_carries_datagrams_with_their_boundaries(env: Env) -> None:
    """A udp tunnel of the Tunnels API: datagrams sent to its hub port reach a UDP echo
    target behind the agent and come back one for one, each size kept (1 B to 60 KB),
    two client flows kept apart."""
    import socket

    target = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await target.bind(("127.0.0.1", 0))

    async def echo() -> None:
        with contextlib.suppress(trio.ClosedResourceError):  # closed at the end of the test
            while True:
                data, address = await target.recvfrom(65535)
                await target.sendto(data, address)

    env.nursery.start_soon(echo)
    agent_id = await env.agent_id()
    status, tunnel = await env.api("POST", "/api/v1/tunnels", {
        "target": "127.0.0.1:%d" % target.getsockname()[1], "agent_id": agent_id, "protocol": "udp"})
    assert status == 201 and tunnel["protocol"] == "udp", tunnel
    clients = []
    for _ in range(2):
        client = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await client.connect(("127.0.0.1", tunnel["hub_port"]))
        clients.append(client)
    for size in (1, 1200, 60_000):
        for i, client in enumerate(clients):
            payload = bytes([i]) * size
            with trio.fail_after(5):  # UDP may lose the first datagram of a flow: resend
                got = None
                while got is None:
                    await client.send(payload)
                    with trio.move_on_after(0.5):
                        got = await client.recv(65535)
            assert got == payload, (size, i, len(got))
    for client in clients:
        client.close()
    status, state = await env.api("GET", f"/api/v1/tunnels/{tunnel['id']}")
    assert state["udp"]["flows"] == 2, state["udp"]
    target.close()
