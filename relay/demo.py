"""``relay demo``: a gateway, an agent and a sample service in one process.

Starts, on one uvloop loop:

* two sample services on free loopback ports: a tiny HTTP "hello" page and a TCP echo;
* a gateway (state in a temporary directory unless ``--data``) with a team ``demo`` and
  fresh ``sk-``/``ak-`` keys;
* an agent of that team that may reach only the two sample services;

then opens an http tunnel to the page and a tcp tunnel to the echo service, prints what
to try (Python one-liners, ``relay connect``, ``relay tunnel list``: nothing that a
fresh machine may lack) and runs until Ctrl-C (or
``--exit-after SECONDS``). Start-up progress goes to stderr, one line per step.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Optional

import click

from relay.cli import main

__all__ = ["demo", "run_demo"]

#: Bound on each start-up step (the agent's first connection is the slow one).
STARTUP_TIMEOUT = 20.0
HELLO_PAGE = (b"<!doctype html><title>relay demo</title>\n"
              b"<h1>hello from relay demo</h1>\n"
              b"<p>This page came from a service on the agent's machine, through an http tunnel.</p>\n")


# --------------------------------------------------------------------------- sample services


async def _hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A minimal HTTP/1.1 server: every request gets the hello page (keep-alive aware)."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            length = int(headers.get("content-length", "0") or 0)
            if length:
                await reader.readexactly(length)  # a body we ignore
            close = headers.get("connection", "").lower() == "close" or lines[0].endswith("HTTP/1.0")
            body = b"" if lines[0].startswith("HEAD ") else HELLO_PAGE
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                         b"Content-Length: %d\r\n%s\r\n" % (len(HELLO_PAGE),
                                                          b"Connection: close\r\n" if close else b"") + body)
            await writer.drain()
            if close:
                break
    writer.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo every byte back; half-close when the client does."""
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    writer.close()


@contextlib.asynccontextmanager
async def sample_services() -> AsyncIterator[tuple[int, int]]:
    """The hello page and the echo service on free loopback ports: ``(http, echo)``."""
    web = await asyncio.start_server(_hello, "127.0.0.1", 0)
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    try:
        yield web.sockets[0].getsockname()[1], echo.sockets[0].getsockname()[1]
    finally:
        web.close()
        echo.close()


# --------------------------------------------------------------------------- the demo


async def _demo_keys(store: Any) -> tuple[str, dict[str, str]]:
    """The ``demo`` team (created if missing) and fresh sk-/ak- keys for it. With a
    reused ``--data`` the old keys stay valid; only the new ones are printed."""
    for team in await store.list_teams():
        if team.name == "demo":
            return team.id, {kind: str((await store.create_credential(team.id, kind))[1]) for kind in ("sk", "ak")}
    team, keys = await store.create_team_with_keys("demo", ("sk", "ak"))
    return team.id, {kind: str(key) for kind, key in keys.items()}


async def _until(predicate: Callable[[], bool], what: str, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise click.ClickException(f"relay demo: {what} did not happen within {timeout:.0f}s")
        await asyncio.sleep(0.05)


async def run_demo(host: str, port: int, data_dir: Optional[Path], *,
                   exit_after: Optional[float] = None, echo: Callable[[str], None] = print,
                   progress: Callable[[str], None] = print) -> None:
    """Run the demo until SIGINT/SIGTERM or ``exit_after`` seconds after start-up."""
    from relay.agent.client import Agent
    from relay.gateway.app import Gateway
    from relay.gateway.store import Store

    async with contextlib.AsyncExitStack() as cleanup:
        if data_dir is None:
            data_dir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="relay-demo-")))
        async with sample_services() as (web_port, echo_port):
            progress(f"[1/4] sample services: hello page on 127.0.0.1:{web_port}, echo on 127.0.0.1:{echo_port}")
            store = Store.open(data_dir)
            cleanup.push_async_callback(store.close)
            team_id, keys = await _demo_keys(store)
            gateway = Gateway(store)
            await gateway.start(host, port)
            try:
                progress(f"[2/4] gateway listening on {gateway.url}")
                agent = Agent(gateway.url, keys["ak"], name="demo-agent", labels=["demo"],
                              allow=[f"127.0.0.1:{web_port}", f"127.0.0.1:{echo_port}"],
                              backoff_initial=0.2, backoff_max=5.0)
                agent_task = asyncio.get_running_loop().create_task(agent.run())
                try:
                    await _until(lambda: agent_task.done() or (
                        agent.agent_id is not None and gateway.registry.get(team_id, agent.agent_id) is not None),
                        "the agent's connection")
                    if agent_task.done():
                        agent_task.result()  # raises why it stopped
                    assert agent.agent_id is not None and gateway.tunnels is not None
                    progress(f"[3/4] agent {agent.name} connected (id {agent.agent_id})")
                    web = await gateway.tunnels.open(team_id, agent.agent_id, web_port, "http")
                    tcp = await gateway.tunnels.open(team_id, agent.agent_id, echo_port, "tcp")
                    progress("[4/4] tunnels open")
                    _print_tips(echo, gateway.url, keys["sk"], agent.agent_id, web, tcp, data_dir, exit_after)
                    await _wait_for_stop(exit_after)
                finally:
                    agent_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await agent_task
                    agent.close()
            finally:
                await gateway.close()


async def _wait_for_stop(exit_after: Optional[float]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if exit_after is not None:
        loop.call_later(exit_after, stop.set)
    await stop.wait()


def relay_invocation() -> str:
    """How to run ``relay`` again from a shell, as a string that works when pasted.

    The bare name only when it is on PATH and is this very program; else the absolute
    path of the script that started us (``.venv/bin/relay`` run by path); else
    ``PYTHON -m relay`` with this interpreter (``python -m relay demo``)."""
    import os
    import shutil

    argv0 = Path(sys.argv[0])
    if argv0.name == "relay":
        on_path = shutil.which("relay")
        if on_path is not None and os.path.realpath(on_path) == os.path.realpath(argv0):
            return "relay"
        if argv0.exists():
            return shlex.quote(str(argv0.resolve()))
    return f"{shlex.quote(sys.executable)} -m relay"


def python_invocation() -> str:
    """This interpreter, quoted: the one client every set-up of relay guarantees."""
    return shlex.quote(sys.executable)


def _print_tips(echo: Callable[[str], None], url: str, sk: str, agent_id: str, web: dict[str, Any],
                tcp: dict[str, Any], data_dir: Path, exit_after: Optional[float]) -> None:
    """What to try, as copy-paste commands. The sk- key is printed: it was made for this
    demo (a throwaway team in a temporary directory unless --data).

    Every command uses only relay itself and the Python that runs it (curl, nc or telnet
    may be missing on a fresh machine); the http tunnel is also a URL for a browser."""
    relay = relay_invocation()
    python = python_invocation()
    hub = f"127.0.0.1:{tcp['hub_port']}"
    # One line of Python each: fetch a URL, and send a line over TCP and print the echo.
    fetch = f"{python} -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())'"
    talk = (f"{python} -c 'import socket, sys; s = socket.create_connection((\"127.0.0.1\", int(sys.argv[1]))); "
            f"s.sendall(b\"hello\\n\"); print(s.recv(100).decode(), end=\"\")'")
    lines = [
        "",
        "relay demo is running" + (f" for {exit_after:g}s" if exit_after is not None else " (Ctrl-C to stop)"),
        f"  gateway      {url}   (data: {data_dir})",
        f"  API key      {sk}   (team 'demo')",
        f"  agent        demo-agent  {agent_id}",
        f"  http tunnel  {web['tunnel_url']}   -> hello page (open it in a browser)",
        f"  tcp tunnel   hub port {hub}, {tcp['tunnel_url']}   -> echo",
        "",
        "Try: (relay as named here; nothing else needs installing)",
        f"  {fetch} {web['tunnel_url']}",
        f"  {talk} {tcp['hub_port']}",
        f"  {relay} connect {tcp['tunnel_url']} --listen 127.0.0.1:9000 &   # then the line above with 9000",
        f"  RELAY_GATEWAY={url} RELAY_KEY={sk} {relay} tunnel list",
        "",
    ]
    for line in lines:
        echo(line)


@main.command()
@click.option("--listen", default="127.0.0.1:0", show_default=True, metavar="HOST:PORT",
              help="Gateway address (port 0: any free port).")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Keep the gateway's state here (default: a temporary directory).")
@click.option("--exit-after", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Stop after this many seconds (default: run until Ctrl-C).")
@click.option("--log-level", type=click.Choice(("debug", "info", "warning", "error")), default="warning",
              show_default=True, help="Logging verbosity.")
def demo(listen: str, data_dir: Optional[Path], exit_after: Optional[float], log_level: str) -> None:
    """Gateway, agent and a sample service in one command; prints what to try."""
    from relay.cli.run import _run, _setup_logging, _split_host_port
    from relay.gateway.store import StoreError

    host, port = _split_host_port(listen, "--listen", allow_zero=True)
    _setup_logging(log_level)
    logging.getLogger("relay").setLevel(getattr(logging, log_level.upper()))
    try:
        _run(run_demo(host, port, data_dir, exit_after=exit_after, echo=click.echo,
                      progress=lambda line: click.echo(line, err=True)))
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"relay demo: {exc.strerror or exc}") from None
    except KeyboardInterrupt:
        pass
