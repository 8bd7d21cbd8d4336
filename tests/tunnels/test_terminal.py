"""The web terminal (seed 000's admin_token "for privileged operations (e.g.
WebTerminal)"): relay.mux.terminal, relay.agent.terminal, relay.gateway.web.terminal.

An in-process gateway and agent (real sockets on 127.0.0.1, real shells on real ptys);
the protocol-level tests speak to the gateway's WebSocket with wsproto; the browser test
drives the page in headless Chromium (Debian's ``chromium``: tests/http/test_http_tunnel_browser.py)
and types into xterm.js through the DevTools protocol. Every wait is bounded.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any, Optional
from urllib.parse import urlsplit

import psutil
import pytest
import wsproto
import wsproto.events as ws_events
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from relay.agent import Agent
from relay.agent.terminal import TerminalSpec
from relay.cli import main as cli_main
from relay.mux.terminal import (
    MAX_SIZE,
    TerminalData,
    TerminalDecoder,
    TerminalExit,
    TerminalProtocolError,
    TerminalResize,
    encode_data,
    encode_exit,
    encode_resize,
    size_from_metadata,
)
from tests.gateway.test_gateway_e2e import gateway_and_team, http, run, running_agent, wait_until
from tests.http.test_http_tunnel_browser import DevTools, chromium_binary, start_chromium

pytestmark = pytest.mark.timeout(180)

SHELL = "/bin/bash"


# ----------------------------------------------------------------------------- the framing


def test_records_survive_any_cut_and_bad_records_are_errors():
    wire = (encode_data(b"ls -l\r") + encode_resize(132, 43) + encode_data(b"x" * 70000)
            + encode_exit(-9) + encode_data(b""))
    for cut in (1, 2, 3, 5, 7, 4096):
        decoder = TerminalDecoder()
        events: list[Any] = []
        for i in range(0, len(wire), cut):
            events += decoder.feed(wire[i:i + cut])
        data = b"".join(e.data for e in events if isinstance(e, TerminalData))
        assert data == b"ls -l\r" + b"x" * 70000
        assert [e for e in events if not isinstance(e, TerminalData)] == [TerminalResize(132, 43), TerminalExit(-9)]
    with pytest.raises(TerminalProtocolError, match="kind 7"):
        TerminalDecoder().feed(b"\x07\x00\x00")
    with pytest.raises(TerminalProtocolError, match="4 bytes"):
        TerminalDecoder().feed(b"\x01\x00\x02\x00\x50")
    with pytest.raises(TerminalProtocolError, match="cols"):
        TerminalDecoder().feed(b"\x01\x00\x04\x00\x00\x00\x18")  # 0 columns
    with pytest.raises(TerminalProtocolError):
        encode_resize(MAX_SIZE + 1, 24)
    assert size_from_metadata({"protocol": "terminal"}) == (80, 24)
    assert size_from_metadata({"cols": 100, "rows": 30}) == (100, 30)
    with pytest.raises(TerminalProtocolError):
        size_from_metadata({"cols": "100", "rows": 30})


def test_terminal_spec_and_cli_refuse_bad_options(tmp_path):
    with pytest.raises(ValueError, match="absolute"):
        TerminalSpec.create("bash")
    with pytest.raises(ValueError, match="not an executable"):
        TerminalSpec.create(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no such user"):
        TerminalSpec.create(SHELL, "no-such-user-here")
    spec = TerminalSpec.create(SHELL)
    assert spec.to_info() == {"shell": SHELL, "user": spec.user}
    runner = CliRunner()
    base = ["agent", "--gateway", "http://127.0.0.1:1", "--key", "ak-" + "x" * 30]
    result = runner.invoke(cli_main, [*base, "--terminal-user", "root"])
    assert result.exit_code == 2 and "--terminal-user needs --terminal SHELL" in result.output
    result = runner.invoke(cli_main, [*base, "--terminal", "bash"])
    assert result.exit_code == 2 and "absolute path" in result.output
    result = runner.invoke(cli_main, base, env={"RELAY_AGENT_TERMINAL": "/no/such/shell"})
    assert result.exit_code == 2 and "/no/such/shell is not an executable file" in result.output
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\nterminal = "relative-shell"\n')
    result = runner.invoke(cli_main, ["agent", "--config", str(config), *base[1:]])
    assert result.exit_code == 2 and "relative-shell" in result.output
    result = runner.invoke(cli_main, [*base, "--terminal-user", "root", "--backend", "trio"])
    assert result.exit_code == 2 and "--terminal-user needs --terminal SHELL" in result.output
    result = runner.invoke(cli_main, [*base, "--terminal", "bash", "--backend", "trio"])
    assert result.exit_code == 2 and "absolute path" in result.output


def test_package_data_ships_the_page_files():
    """What the page loads is in the wheel (pyproject's package-data globs)."""
    import fnmatch
    import tomllib
    from pathlib import Path

    from relay.gateway.web import terminal

    root = Path(terminal.__file__).parents[3]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["relay"]
    for name, (path, _) in terminal.ASSETS.items():
        assert (terminal.STATIC / path).is_file(), name
        inside = (terminal.STATIC / path).relative_to(root / "relay").as_posix()
        assert any(fnmatch.fnmatch(inside, pattern) for pattern in globs), (inside, globs)
    for licence in ("LICENSE", "LICENSE.addon-fit", "VENDOR.md"):
        assert (terminal.STATIC / "xterm" / licence).is_file()


# ----------------------------------------------------------------------------- helpers


class Terminal:
    """A WebSocket client of the terminal endpoint (wsproto over asyncio streams)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ws: Any) -> None:
        self.reader, self.writer, self.ws = reader, writer, ws
        self.pending: list[Any] = []
        self.output = b""
        self.before = b""  # the output before the last match of expect()
        self.texts: list[str] = []
        self.closed: Optional[tuple[int, str]] = None

    async def send(self, data: Any) -> None:
        self.writer.write(self.ws.send(ws_events.Message(data=data)))
        await self.writer.drain()

    async def _event(self) -> Any:
        while not self.pending:
            data = await self.reader.read(65536)
            if not data:
                return None
            self.ws.receive_data(data)
            self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    async def pump(self) -> bool:
        """Take one event; False once the connection is over."""
        event = await self._event()
        if event is None:
            return False
        if isinstance(event, ws_events.BytesMessage):
            self.output += event.data
        elif isinstance(event, ws_events.TextMessage):
            self.texts.append(event.data)
        elif isinstance(event, ws_events.CloseConnection):
            self.closed = (event.code, event.reason)
            with contextlib.suppress(Exception):
                self.writer.write(self.ws.send(event.response()))
            return False
        return True

    async def expect(self, pattern: bytes, timeout: float = 20.0) -> re.Match[bytes]:
        """Read until the output not matched yet matches ``pattern``."""
        try:
            return await asyncio.wait_for(self._expect(pattern), timeout)
        except TimeoutError:
            raise AssertionError(f"no {pattern!r} within {timeout}s; output {self.output[-500:]!r}") from None

    async def _expect(self, pattern: bytes) -> re.Match[bytes]:
        if True:
            while True:
                match = re.search(pattern, self.output)
                if match is not None:
                    self.before = self.output[:match.start()]
                    self.output = self.output[match.end():]
                    return match
                if not await self.pump():
                    raise AssertionError(f"closed {self.closed} before {pattern!r}; output {self.output[-500:]!r}")

    async def until_closed(self, timeout: float = 20.0) -> tuple[int, str]:
        async with asyncio.timeout(timeout):
            while await self.pump():
                pass
        assert self.closed is not None, "the connection ended without a close frame"
        return self.closed

    def close(self, code: int = 1000) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(self.ws.send(ws_events.CloseConnection(code=code)))
        self.writer.close()


async def open_terminal(port: int, path: str, headers: Optional[dict[str, str]] = None
                        ) -> tuple[Optional[Terminal], int, Any]:
    """Upgrade ``path``: (terminal, 101, None) or (None, status, JSON error body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    writer.write(ws.send(ws_events.Request(host=f"127.0.0.1:{port}", target=path,
                                           extra_headers=[(k.encode(), v.encode()) for k, v in (headers or {}).items()])))
    body = b""
    status = 0
    async with asyncio.timeout(20):
        while True:
            data = await reader.read(65536)
            ws.receive_data(data or None)
            for event in ws.events():
                if isinstance(event, ws_events.AcceptConnection):
                    return Terminal(reader, writer, ws), 101, None
                if isinstance(event, ws_events.RejectConnection):
                    status = event.status_code
                    if not event.has_body:
                        writer.close()
                        return None, status, None
                elif isinstance(event, ws_events.RejectData):
                    body += event.data
                    if event.body_finished:
                        writer.close()
                        return None, status, json.loads(body) if body else None
            if not data:
                writer.close()
                return None, status, None


async def open_session(gw: Any, sk: str, agent_id: str, protocol: str = "tcp", port: int = 22) -> dict[str, Any]:
    status, body = await http(gw.port, "POST", f"/api/v1/agents/{agent_id}/tunnel", sk,
                              {"target_port": port, "tunnel_protocol": protocol})
    assert status == 200, body
    return body


async def get_page(port: int, path: str, headers: dict[str, str]) -> tuple[int, str]:
    """GET ``path`` (an HTML page): (status, body text)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close",
             *(f"{k}: {v}" for k, v in headers.items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    async with asyncio.timeout(10):
        raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode()


def ws_path(answer: dict[str, Any], query: str = "") -> str:
    return urlsplit(answer["terminal_url"]).path + "/ws" + query


def quiet_bash(tmp_path: Any) -> TerminalSpec:
    """The terminal spec of the tests: bash without the machine's rc files, whose
    contents (a version manager's hook waiting on a lock ...) are not ours to wait for.
    A wrapper script, since a spec names one executable; ``exec`` keeps the pid."""
    wrapper = tmp_path / "quiet-bash"
    if not wrapper.exists():
        wrapper.write_text(f"#!/bin/sh\nexec {SHELL} --norc --noprofile\n")
        wrapper.chmod(0o755)
    return TerminalSpec.create(str(wrapper))


def shells_of_this_process() -> list[psutil.Process]:
    """Children of the test process running the terminal's shell (the agent is in-process)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.cmdline()[:1] == [SHELL]:
                found.append(child)
    return found


def _proc_stat(pid: int) -> Optional[list[bytes]]:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def started(pid: int) -> Optional[bytes]:
    """The process's start time (clock ticks since boot): with the pid, who it is."""
    fields = _proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


async def resize_then_exit_3(term: Terminal) -> str:
    """Resize the pty to 132x43 (the shell sees it), then ``exit 3``: the page gets the
    exit record and a normal close, whose reason is returned."""
    await term.send(json.dumps({"resize": [132, 43]}))
    await term.send(b"stty size\r")
    await term.expect(rb"43 132")
    await term.send(b"exit 3\r")
    code, reason = await term.until_closed()
    assert (code, term.texts) == (1000, ['{"exit": 3}']), (code, reason, term.texts)
    return reason


async def shell_with_a_job(term: Terminal) -> tuple[int, Optional[bytes], int, Optional[bytes]]:
    """Start a background job in the terminal's shell: (shell pid, its start time, the
    job's pid, its start time)."""
    await term.send(b"sleep 300 & echo PIDS=$$,$!\r")
    match = await term.expect(rb"PIDS=(\d+),(\d+)")
    shell, job = int(match.group(1)), int(match.group(2))
    return shell, started(shell), job, started(job)


def pid_gone(pid: int, start: Optional[bytes] = None) -> bool:
    """The process is dead: no longer there, a zombie (a background job outliving its
    shell is an orphan, which this machine's init may leave unreaped for a while), or
    its pid now names another process (started at another time than ``start``; the
    suite starts enough processes for pids to wrap around)."""
    fields = _proc_stat(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return True
    return start is not None and len(fields) > 19 and fields[19] != start


# ----------------------------------------------------------------------------- protocol level


def test_a_shell_runs_resizes_and_its_exit_closes_the_socket(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="relay.audit")

    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), \
                running_agent(gw, keys["ak"], name="term-box", terminal=quiet_bash(tmp_path)) as agent:
            answer = await open_session(gw, keys["sk"], agent.agent_id, "tcp")
            assert answer["terminal_url"].startswith(f"{gw.url}/tunnel/") and answer["terminal_url"].endswith(
                "/_relay/terminal")
            term, status, error = await open_terminal(gw.port, ws_path(answer, "?cols=90&rows=20"),
                                                      {"X-Admin-Token": answer["admin_token"]})
            assert status == 101, error
            assert agent.shells and len(gw.terminals.live[answer["session_id"]]) == 1
            await term.send(b"stty size; echo $TERM; echo sum=$((6*7))\r")
            await term.expect(rb"20 90\s+xterm-256color\s+sum=42")
            assert "status 3" in await resize_then_exit_3(term)
            await wait_until(lambda: not agent.shells and not gw.terminals.live)

    run(main, timeout=90)
    messages = [r.getMessage() for r in caplog.records if r.name == "relay.audit"]
    opened = [m for m in messages if m.startswith("terminal opened")]
    closed = [m for m in messages if m.startswith("terminal closed")]
    assert len(opened) == 2 and len(closed) == 2, messages  # the gateway's and the agent's
    assert any("pid" in m for m in opened)  # the agent's
    assert all("for 127.0.0.1:" in m for m in opened + closed), messages  # who, on both ends
    assert any("status 3" in m for m in closed), closed


class SlowAgent(Agent):
    """An agent that waits ``answer_delay`` seconds before serving each stream."""

    answer_delay = 0.0

    async def _on_stream(self, stream: Any) -> None:
        await asyncio.sleep(self.answer_delay)
        await super()._on_stream(stream)


def test_closing_the_socket_hangs_the_shell_up(tmp_path):
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), \
                running_agent(gw, keys["ak"], SlowAgent, terminal=quiet_bash(tmp_path)) as agent:
            answer = await open_session(gw, keys["sk"], agent.agent_id, "http", 8188)
            # A client that leaves during the upgrade, before or after the agent answered
            # (this agent takes 0.3 s to): no shell is left behind.
            agent.answer_delay = 0.3
            for delay in (0, 0.01, 0.1, 0.5):
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
                writer.write(ws.send(ws_events.Request(host=f"127.0.0.1:{gw.port}", target=ws_path(answer),
                                                       extra_headers=[(b"x-admin-token",
                                                                       answer["admin_token"].encode())])))
                await writer.drain()
                await asyncio.sleep(delay)
                writer.transport.abort()
            await asyncio.sleep(0.5)  # the slow answers are in
            await wait_until(lambda: not agent.shells and not gw.terminals.live and not shells_of_this_process())
            agent.answer_delay = 0.0
            for how in ("close frame", "dropped connection", "agent dropped", "session closed"):
                term, status, error = await open_terminal(gw.port, ws_path(answer),
                                                          {"X-Admin-Token": answer["admin_token"]})
                assert status == 101, error
                shell, shell_start, job, job_start = await shell_with_a_job(term)
                assert not pid_gone(shell, shell_start) and not pid_gone(job, job_start)
                if how == "close frame":
                    term.close()
                elif how == "dropped connection":
                    term.writer.transport.abort()
                elif how == "agent dropped":  # its session's streams are reset at both ends
                    old = agent.session
                    agent.close()
                    code, reason = await term.until_closed()
                    assert code == 1011 and "reset" in reason, (code, reason)
                    await wait_until(lambda old=old: agent.session not in (None, old)  # back
                                     and any(e.session is not None and not e.session.is_closed
                                             for e in gw.registry.connected()))
                else:  # closing the tunnel session closes its terminals
                    status, body = await http(gw.port, "DELETE", urlsplit(answer["tunnel_url"]).path.rstrip("/"),
                                              headers={"X-Admin-Token": answer["admin_token"]})
                    assert status == 200, body
                    code, reason = await term.until_closed()
                    assert code == 1000 and "tunnel session was closed" in reason
                try:
                    await wait_until(lambda shell=shell, job=job, a=shell_start, b=job_start:
                                     pid_gone(shell, a) and pid_gone(job, b), timeout=15)
                except TimeoutError:
                    raise AssertionError(f"{how}: still there: shell {shell} {_proc_stat(shell)!r}, "
                                         f"job {job} {_proc_stat(job)!r}") from None
                await wait_until(lambda: not agent.shells and not gw.terminals.live)

    # As under nohup: an agent that ignores SIGHUP must not hand that on to its shells.
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        run(main, timeout=120)
    finally:
        signal.signal(signal.SIGHUP, previous)


async def scrape(gw: Any) -> dict[str, dict[tuple, float]]:
    """The gateway's /metrics, parsed by prometheus_client: samples by name and labels."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(10):
        raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_terminals_are_counted_in_metrics_and_agents_say_whether_they_serve_one(tmp_path):
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), \
                running_agent(gw, keys["ak"], name="with-term", terminal=quiet_bash(tmp_path)) as agent, \
                running_agent(gw, keys["ak"], name="plain") as plain:
            status, listed = await http(gw.port, "GET", "/api/v1/agents", keys["sk"])
            assert status == 200, listed
            assert {a["name"]: a["terminal"] for a in listed["agents"]} == {"with-term": True, "plain": False}
            for one, serves in ((agent, True), (plain, False)):
                status, detail = await http(gw.port, "GET", f"/api/v1/agents/{one.agent_id}", keys["sk"])
                assert status == 200 and detail["terminal"] is serves, detail
            status, spec = await http(gw.port, "GET", "/api/v1/openapi.json")
            assert spec["components"]["schemas"]["Agent"]["properties"]["terminal"]["type"] == "boolean"

            metrics = await scrape(gw)
            assert metrics["relay_terminals_opened_total"] == {(): 0} and metrics["relay_terminals_open"] == {(): 0}
            assert set(metrics["relay_terminals_closed_total"].values()) == {0}
            assert "relay_terminals_refused_total" not in metrics  # no refusal yet: no series

            answer = await open_session(gw, keys["sk"], agent.agent_id, "tcp")
            plain_answer = await open_session(gw, keys["sk"], plain.agent_id, "tcp")
            admin = {"X-Admin-Token": answer["admin_token"]}
            refusals = [({}, ws_path(answer)), ({"X-Admin-Token": "wrong-token"}, ws_path(answer)),
                        ({"X-Admin-Token": "wrong-again"}, ws_path(answer)),
                        ({"X-Admin-Token": plain_answer["admin_token"]},
                         "/tunnel/" + urlsplit(plain_answer["tunnel_url"]).path.split("/")[2] + "/_relay/terminal/ws")]
            for headers, path in refusals:
                term, status, _ = await open_terminal(gw.port, path, headers)
                assert term is None and status in (401, 403, 409), status

            # One terminal per way of ending: the page closes, the shell exits, the
            # session is closed. Each is counted open while it is.
            for reason in ("page_closed", "shell_exited", "session_closed"):
                term, status, error = await open_terminal(gw.port, ws_path(answer), admin)
                assert status == 101, error
                await term.send(b"echo up-$((2+3))\r")
                await term.expect(rb"up-5")
                assert (await scrape(gw))["relay_terminals_open"] == {(): 1}
                if reason == "page_closed":
                    term.close()
                elif reason == "shell_exited":
                    await term.send(b"exit 0\r")
                    await term.until_closed()
                else:
                    status, body = await http(gw.port, "DELETE", f"/api/v1/agents/{agent.agent_id}/tunnel"
                                              f"?session_id={answer['session_id']}", keys["sk"])
                    assert status == 200, body
                    await term.until_closed()
                await wait_until(lambda: not gw.terminals.live and not agent.shells)

            metrics = await scrape(gw)
            assert metrics["relay_terminals_opened_total"] == {(): 3}
            assert metrics["relay_terminals_open"] == {(): 0}
            assert metrics["relay_terminals_closed_total"] == {
                (("reason", "page_closed"),): 1, (("reason", "shell_exited"),): 1,
                (("reason", "session_closed"),): 1, (("reason", "error"),): 0}
            assert metrics["relay_terminals_refused_total"] == {
                (("code", "admin_token_required"),): 1, (("code", "invalid_admin_token"),): 2,
                (("code", "terminal_not_enabled"),): 1}
            # The session is closed: its URL now answers 404, counted like any refusal.
            term, status, _ = await open_terminal(gw.port, ws_path(answer), admin)
            assert term is None and status == 404
            assert (await scrape(gw))["relay_terminals_refused_total"][(("code", "tunnel_not_found"),)] == 1

        # The agent gone, nobody can tell: false until it says so again.
        async with gateway_and_team(tmp_path / "again") as (gw2, keys2):
            async with running_agent(gw2, keys2["ak"], name="gone", terminal=quiet_bash(tmp_path)) as gone:
                agent_id = gone.agent_id
                assert (await http(gw2.port, "GET", f"/api/v1/agents/{agent_id}", keys2["sk"]))[1]["terminal"] is True
            await wait_until(lambda: not gw2.registry.connected())
            status, detail = await http(gw2.port, "GET", f"/api/v1/agents/{agent_id}", keys2["sk"])
            assert status == 200 and detail["online"] is False and detail["terminal"] is False, detail

    run(main, timeout=120)


def test_a_flood_of_output_arrives_whole(tmp_path):
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), \
                running_agent(gw, keys["ak"], terminal=quiet_bash(tmp_path)) as agent:
            answer = await open_session(gw, keys["sk"], agent.agent_id, "tcp")
            term, status, error = await open_terminal(gw.port, ws_path(answer), {"X-Admin-Token": answer["admin_token"]})
            assert status == 101, error
            # Far more than a stream's window: the shell blocks on its tty while the
            # stream waits for window, and nothing is lost or reordered.
            size = 3_000_000
            await term.send(f"head -c {size} /dev/zero | tr '\\0' y; echo; echo E''ND\r".encode())
            await term.expect(rb"\r\nEND", timeout=60)
            runs = [len(m) for m in re.findall(rb"y{1000,}", term.before)]
            assert runs == [size], runs
            term.close()
            await wait_until(lambda: not agent.shells)

    run(main, timeout=120)


def test_admin_token_is_required_and_no_shell_starts_without_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="relay.audit")

    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), \
                running_agent(gw, keys["ak"], terminal=quiet_bash(tmp_path)) as agent:
            answer = await open_session(gw, keys["sk"], agent.agent_id, "tcp")
            other = await open_session(gw, keys["sk"], agent.agent_id, "http", 8188)
            path = ws_path(answer)
            cases = [
                ({}, path, 401, "admin_token_required"),
                ({"X-Admin-Token": "not-the-token-1"}, path, 403, "invalid_admin_token"),
                ({"X-Admin-Token": other["admin_token"]}, path, 403, "invalid_admin_token"),  # another session's
                ({}, path + "?admin_token=not-the-token-2", 403, "invalid_admin_token"),
                ({"Cookie": "relay_admin=not-the-token-3"}, path, 403, "invalid_admin_token"),
                ({"X-Admin-Token": answer["admin_token"]}, "/tunnel/" + "n" * 43 + "/_relay/terminal/ws", 404,
                 "tunnel_not_found"),
                ({"X-Admin-Token": answer["admin_token"]}, path + "?cols=0", 400, "invalid_size"),
                ({"Cookie": "relay_admin=" + answer["admin_token"], "Origin": "http://evil.example"}, path, 403,
                 "cross_origin"),
                ({"Origin": "http://evil.example"}, path + "?admin_token=" + answer["admin_token"], 403, "cross_origin"),
            ]
            for headers, target, want, code in cases:
                term, status, error = await open_terminal(gw.port, target, headers)
                assert term is None and status == want and error["error"]["code"] == code, (headers, status, error)
            assert not agent.shells and not shells_of_this_process() and gw.terminals.opened_total == 0
            # The token in the query works for clients that can set no header, and is not logged.
            term, status, _ = await open_terminal(gw.port, path + "?admin_token=" + answer["admin_token"],
                                                  {"Origin": f"http://127.0.0.1:{gw.port}"})
            assert status == 101
            await term.send(b"echo ok-$((1+1))\r")
            await term.expect(rb"ok-2")
            term.close()
            await wait_until(lambda: not agent.shells)
            return answer["admin_token"]

    admin = run(main, timeout=90)
    audit = [r.getMessage() for r in caplog.records if r.name == "relay.audit"]
    assert sum("terminal refused" in m for m in audit) >= 5, audit
    assert not any(admin in m or "not-the-token" in m for m in audit), audit


def test_an_agent_without_terminal_is_refused_clearly(tmp_path):
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys):
            async with running_agent(gw, keys["ak"], name="plain") as agent:
                answer = await open_session(gw, keys["sk"], agent.agent_id, "tcp")
                assert "terminal_url" not in answer
                path = "/tunnel/" + urlsplit(answer["tunnel_url"]).path.split("/")[2] + "/_relay/terminal"
                term, status, error = await open_terminal(gw.port, path + "/ws",
                                                          {"X-Admin-Token": answer["admin_token"]})
                assert term is None and status == 409, error
                assert error["error"]["code"] == "terminal_not_enabled"
                assert "'plain'" in error["error"]["message"] and "--terminal SHELL" in error["error"]["message"]
                status, page = await get_page(gw.port, path, {"X-Admin-Token": answer["admin_token"]})
                assert status == 409 and "serves no terminal" in page, page
                assert not shells_of_this_process()
            # An agent whose hello said --terminal but that serves none (its terminal taken
            # away after connecting): the agent itself refuses, and the gateway says why.
            async with running_agent(gw, keys["ak"], name="liar", terminal=quiet_bash(tmp_path)) as agent:
                answer = await open_session(gw, keys["sk"], agent.agent_id, "tcp")
                assert "terminal_url" in answer
                agent.terminal = None
                term, status, error = await open_terminal(gw.port, ws_path(answer),
                                                          {"X-Admin-Token": answer["admin_token"]})
                assert term is None and status == 409, error
                assert "'liar' serves no terminal" in error["error"]["message"]
                assert not agent.shells and not shells_of_this_process()

    run(main, timeout=90)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_relay_agent_terminal_option_end_to_end(tmp_path, backend):
    """``relay agent --terminal`` as a process (its option from the environment), on
    either event loop: the hello says so, the answer carries terminal_url, a shell runs
    there; output far beyond a stream's window arrives whole; closing the page hangs
    the shell and its background job up."""
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys):
            log = tmp_path / "agent.log"
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "RELAY_AGENT_KEY": keys["ak"],
                   "RELAY_AGENT_TERMINAL": quiet_bash(tmp_path).shell, "RELAY_AGENT_BACKEND": backend}
            proc = subprocess.Popen([sys.executable, "-m", "relay", "agent", "--gateway", gw.url, "--name", "cli-term"],
                                    stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                await wait_until(lambda: gw.registry.connected(), timeout=30)
                agent_id = gw.registry.connected()[0].agent_id
                answer = await open_session(gw, keys["sk"], agent_id, "tcp")
                assert answer["terminal_url"].endswith("/_relay/terminal"), answer
                term, status, error = await open_terminal(gw.port, ws_path(answer),
                                                          {"X-Admin-Token": answer["admin_token"]})
                assert status == 101, error
                await term.send(b"echo shell=$0 ppid-is-agent=$([ $PPID = " + str(proc.pid).encode() + b" ] && echo y)\r")
                await term.expect(rb"shell=" + SHELL.encode() + rb" ppid-is-agent=y")
                size = 1_000_000
                await term.send(f"head -c {size} /dev/zero | tr '\\0' y; echo; echo E''ND\r".encode())
                await term.expect(rb"\r\nEND", timeout=60)
                assert [len(m) for m in re.findall(rb"y{1000,}", term.before)] == [size]
                await resize_then_exit_3(term)
                # Closing the page hangs the shell and its job up.
                term, status, error = await open_terminal(gw.port, ws_path(answer),
                                                          {"X-Admin-Token": answer["admin_token"]})
                assert status == 101, error
                shell, shell_start, job, job_start = await shell_with_a_job(term)
                term.close()
                await wait_until(lambda: pid_gone(shell, shell_start) and pid_gone(job, job_start), timeout=15)
            finally:
                proc.terminate()
                await asyncio.to_thread(proc.wait, 15)
            text = log.read_text()
            assert "terminal opened: session" in text and "terminal closed: session" in text, text
            assert answer["admin_token"] not in text

    run(main, timeout=90)


def test_a_named_user_runs_the_shell(tmp_path):
    if os.geteuid() != 0:  # not root: only our own user may be named
        me = psutil.Process().username()
        with pytest.raises(ValueError, match="needs root"):
            TerminalSpec.create(SHELL, "root")
        assert TerminalSpec.create(SHELL, me).user == me
        return

    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), \
                running_agent(gw, keys["ak"], terminal=TerminalSpec.create(SHELL, "nobody")) as agent:
            answer = await open_session(gw, keys["sk"], agent.agent_id, "tcp")
            term, status, error = await open_terminal(gw.port, ws_path(answer),
                                                      {"X-Admin-Token": answer["admin_token"]})
            assert status == 101, error
            await term.send(b"echo who=$(id -un),$USER,$(tty)\r")
            await term.expect(rb"who=nobody,nobody,/dev/pts/\d+")
            await term.send(b"exit\r")
            code, _ = await term.until_closed()
            assert code == 1000

    run(main, timeout=60)


# ----------------------------------------------------------------------------- the browser


def test_chromium_types_into_the_page_and_resizes_the_pty(tmp_path):
    chromium_binary()

    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), \
                running_agent(gw, keys["ak"], terminal=quiet_bash(tmp_path)) as agent:
            answer = await open_session(gw, keys["sk"], agent.agent_id, "http", 8188)
            page = answer["terminal_url"]
            proc, port = await start_chromium(tmp_path / "profile", page)
            try:
                devtools = await DevTools.attach(port, page)

                async def poll(expression: str, want: Any = True, timeout: float = 30) -> Any:
                    deadline = time.monotonic() + timeout
                    while True:
                        try:
                            value = await devtools.evaluate(expression)
                        except AssertionError:  # navigating
                            value = None
                        if (value == want if want is not None else value) or time.monotonic() > deadline:
                            return value
                        await asyncio.sleep(0.1)

                async def type_line(text: str) -> None:
                    await devtools.call("Input.insertText", text=text)
                    await devtools.call("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter",
                                        windowsVirtualKeyCode=13, text="\r")
                    await devtools.call("Input.dispatchKeyEvent", type="keyUp", key="Enter", code="Enter",
                                        windowsVirtualKeyCode=13)

                screen = ("(() => { const b = window.relayTerminal.term.buffer.active; const out = [];"
                          " for (let i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true));"
                          " return out.join('\\n'); })()")
                # The sign-in form first: the admin token goes into an HttpOnly cookie.
                assert await poll("!!document.getElementById('admin_token')")
                await devtools.evaluate(f"document.getElementById('admin_token').value = "
                                        f"{json.dumps(answer['admin_token'])}; document.getElementById('open').click()")
                assert await poll("!!(window.relayTerminal && window.relayTerminal.state.open)"), \
                    await devtools.evaluate("document.documentElement.outerHTML")
                await devtools.evaluate("window.relayTerminal.term.focus()")
                await type_line("echo typed-$((40+2))")
                assert await poll(f"{screen}.includes('typed-42')"), await devtools.evaluate(screen)

                # A smaller window: the page fits the terminal and tells the pty.
                await devtools.call("Emulation.setDeviceMetricsOverride", width=640, height=400,
                                    deviceScaleFactor=1, mobile=False)
                size = "[window.relayTerminal.term.rows, window.relayTerminal.term.cols].join(' ')"
                first = await devtools.evaluate(size)
                rows_cols = await poll(f"({size}) !== {json.dumps(first)} ? {size} : ''", None, timeout=10) or first
                await type_line("stty size | sed 's/^/size=/'")
                assert await poll(f"{screen}.includes('size={rows_cols}')"), (rows_cols, await devtools.evaluate(screen))
                cols = int(rows_cols.split()[1])
                assert cols < 100, rows_cols  # 640 px of 14 px text: well under the first 1000 px

                html = await devtools.evaluate("document.documentElement.outerHTML")
                assert answer["admin_token"] not in html
                # The shell exits: the page's socket closes and the page says so.
                await type_line("exit 5")
                assert await poll("window.relayTerminal.state.closed") is True
                assert await devtools.evaluate("window.relayTerminal.state.exitStatus") == 5
                assert "exited with status 5" in await devtools.evaluate("document.getElementById('status').textContent")
                await devtools.ws.close()
            finally:
                proc.kill()
                await proc.wait()
            await wait_until(lambda: not agent.shells and not gw.terminals.live)

    run(main, timeout=150)
