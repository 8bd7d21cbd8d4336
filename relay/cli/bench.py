"""``relay bench``: measure a relay path, or load-test an HTTP URL (relay.bench).

Registered on :data:`relay.cli.main` by importing this module (relay/cli/__init__.py does). It
imports nothing heavy until it runs: the ``bench`` extra (rich, hdrhistogram, psutil,
matplotlib) is checked first, and its absence is one line saying what to install.
"""
from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import click

from relay.cli import main

__all__ = ["bench"]

ROW_NAMES = ("download", "upload", "streams", "latency", "connect", "http")
#: Exit status of a run ended by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130


def _require_extra() -> None:
    from relay.bench import require_extra

    try:
        require_extra()
    except ImportError as exc:
        raise click.ClickException(str(exc)) from None


def _parse_rows(ctx: click.Context, param: Any, value: Optional[str]) -> tuple[str, ...]:
    if not value:
        return ROW_NAMES
    rows = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [r for r in rows if r not in ROW_NAMES]
    if unknown or not rows:
        raise click.BadParameter(f"unknown row {', '.join(unknown) or repr(value)}: choose from {', '.join(ROW_NAMES)}")
    return tuple(r for r in ROW_NAMES if r in rows)


def _writable(ctx: click.Context, param: Any, value: Optional[Path]) -> Optional[Path]:
    """A file we can create: its directory exists (checked before minutes of measuring)."""
    if value is None:
        return None
    parent = value.parent if str(value.parent) else Path(".")
    if not parent.is_dir():
        raise click.BadParameter(f"directory {str(parent)!r} does not exist")
    if value.is_dir():
        raise click.BadParameter(f"{str(value)!r} is a directory")
    return value


def _loop_run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(coro)
    return uvloop.run(coro)


def _out_console() -> Any:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a pipe or a file: wide enough that no row wraps
        console = Console(width=170, no_color=True)
    return console


class _OneLineErrors:
    """A command whose usage errors are one ``Error:`` line (exit status 2), without
    click's usage banner: the message names the option at fault."""

    def make_context(self, info_name: Optional[str], args: list[str], parent: Optional[click.Context] = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)  # type: ignore[misc]  # a click.Command mixin
        except click.UsageError as exc:
            raise _usage(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]  # a click.Command mixin
        except click.UsageError as exc:
            raise _usage(exc) from None


class _UsageError(click.ClickException):
    """A usage error printed as one ``Error:`` line, with click's usage exit status."""

    exit_code = 2


def _usage(exc: click.UsageError) -> click.ClickException:
    return _UsageError(exc.format_message())


class _BenchGroup(_OneLineErrors, click.Group):
    pass


class _BenchCommand(_OneLineErrors, click.Command):
    pass


_BENCH_HELP = """Measure the path from this machine through a gateway to an agent.

\b
What to measure (one of):
  --local                      start a gateway, an agent and the targets on this
                               machine (all stopped afterwards); measure through the
                               relay and the direct path (and --compare ssh: OpenSSH
                               reverse forwarding)
  --agent NAME --gateway URL --key sk-...
                               an agent of your gateway that runs `relay agent --bench`;
                               relay bench opens a tcp and an http tunnel to its bench
                               target and closes them at the end
  --tunnel URL                 tunnels already open to a bench target: a ws(s)://.../tcp
                               URL (byte rows) and/or an http(s)://.../tunnel/TOKEN/ URL
                               (the http row); repeatable

\b
Rows (the table has one line per row and path; medians of --repeat runs, min–max):
  download   one stream, agent -> here: MB/s (10^6 bytes/s) after --warmup
  upload     one stream, here -> agent: MB/s counted where the bytes land (the target)
  streams    --streams streams at once, agent -> here: total MB/s; detail: the slowest
             and fastest stream and fairness = slowest/fastest (1.00: even)
  latency    a --message-size message echoed back, one at a time on one stream: the p50
             round trip in µs; detail: p90, p99, p99.9, max (an HDR histogram)
  connect    a new connection and its first exchange, one at a time: connections/s;
             detail: setup latency p50, p99 in ms
  http       HTTP/1.1 keep-alive GETs at --concurrency through an http tunnel:
             requests/s; detail: latency p50, p99 in ms, share of 2xx answers, the
             engine (wrk when installed, else a Python client)
vs direct: the row's median over the direct path's (--local). CPU cores: CPU seconds
per second of each local process (gateway, agent, relay connect, sshd, ssh, and this
client) during the measurement. A note says when a figure is limited by the client
(it used most of its core) or by this machine's core count.

\b
Ctrl-C stops the run cleanly and prints what was measured (exit status 130); a path
that breaks ends the run with an error and the partial table (exit status 1).
`relay bench http URL` load-tests any HTTP URL (see its --help).
"""


@main.group(cls=_BenchGroup, invoke_without_command=True, help=_BENCH_HELP,
            short_help="Measure a relay path, or load-test an HTTP URL.")
@click.option("--local", is_flag=True, help="Start a gateway, an agent and targets here and measure them.")
@click.option("--compare", type=click.Choice(["ssh"]), multiple=True,
              help="With --local: also measure OpenSSH reverse forwarding (ssh -R) to the same target.")
@click.option("--agent", "agent_ref", metavar="NAME", help="Agent (name or id) running `relay agent --bench`.")
@click.option("--gateway", "gateway_url", envvar="RELAY_GATEWAY", show_envvar=True, metavar="URL",
              help="With --agent: the gateway's base URL.")
@click.option("--key", envvar="RELAY_KEY", show_envvar=True, metavar="sk-...",
              help="With --agent: a team key (sk-, dk-) or user JWT that opens tunnels.")
@click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), envvar="RELAY_CA_CERT",
              show_envvar=True, help="Trust this CA (PEM) for an https gateway.")
@click.option("--bench-port", type=click.IntRange(1, 65535), default=7099, show_default=True, metavar="PORT",
              help="With --agent: the agent's --bench-port.")
@click.option("--tunnel", "tunnels", multiple=True, metavar="URL",
              help="A tcp (ws://...) or http tunnel URL to a bench target (repeatable).")
@click.option("--via", type=click.Choice(["auto", "hub", "ws"]), default="auto", show_default=True,
              help="Byte rows through the tcp tunnel's hub port (hub), through relay connect over the gateway's "
                   "WebSocket (ws), or the hub port when reachable from here (auto).")
@click.option("--rows", callback=_parse_rows, metavar="ROW,...", help=f"Only these rows ({','.join(ROW_NAMES)}).")
@click.option("--duration", type=click.FloatRange(min=0.05, max=3600), default=1.0, show_default=True,
              metavar="SECONDS", help="Measured time of each row, per repetition and path.")
@click.option("--warmup", type=click.FloatRange(min=0, max=600), default=0.2, show_default=True, metavar="SECONDS",
              help="Time before each measurement that is not counted.")
@click.option("--repeat", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Repetitions of each row: the table shows their median and min–max.")
@click.option("--streams", type=click.IntRange(2, 1000), default=8, show_default=True,
              help="Concurrent streams of the streams row.")
@click.option("--concurrency", type=click.IntRange(1, 10000), default=16, show_default=True,
              help="Connections of the http row.")
@click.option("--message-size", type=click.IntRange(1, 1 << 20), default=64, show_default=True, metavar="BYTES",
              help="Message of the latency row.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), callback=_writable, metavar="FILE",
              help="Also write the results as JSON (its schema: relay.bench.report.JSON_SCHEMA).")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), callback=_writable, metavar="FILE.png",
              help="Also draw throughput over time and the latency distribution into a PNG (matplotlib).")
@click.pass_context
def bench(ctx: click.Context, local: bool, compare: tuple[str, ...], agent_ref: Optional[str],
          gateway_url: Optional[str], key: Optional[str], ca_cert: Optional[Path], bench_port: int,
          tunnels: tuple[str, ...], via: str, rows: tuple[str, ...], duration: float, warmup: float, repeat: int,
          streams: int, concurrency: int, message_size: int, json_path: Optional[Path],
          plot_path: Optional[Path]) -> None:
    if ctx.invoked_subcommand is not None:
        return
    if compare and not local:
        raise click.UsageError("--compare needs --local")
    chosen = [name for name, given in (("--local", local), ("--agent", agent_ref), ("--tunnel", tunnels)) if given]
    if not chosen:
        raise click.UsageError("say what to measure: --local, --agent NAME (with --gateway and --key), "
                               "or --tunnel URL")
    if len(chosen) > 1:
        raise click.UsageError(f"{' and '.join(chosen)} cannot be combined: choose one")
    if agent_ref and not (gateway_url and key):
        raise click.UsageError("--agent needs --gateway URL and --key (or RELAY_GATEWAY and RELAY_KEY)")
    if plot_path is not None and plot_path.suffix.lower() != ".png":
        raise click.BadParameter("the chart is a PNG: give a FILE.png", param_hint="--plot")
    kinds: dict[str, str] = {}
    if tunnels:
        from relay.bench.remote import classify_tunnel_url

        for url in tunnels:
            try:
                kind = classify_tunnel_url(url)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--tunnel") from None
            if kind in kinds:
                raise click.BadParameter(f"two {kind} tunnel URLs: give at most one of each", param_hint="--tunnel")
            kinds[kind] = url
    _require_extra()
    from relay.bench.measure import Settings

    settings = Settings(duration=duration, warmup=warmup, streams=streams, message_size=message_size,
                        concurrency=concurrency)
    mode = "local" if local else "remote" if agent_ref else "tunnel"
    code = _run_bench(mode, settings, repeat, list(rows), json_path, plot_path,
                      setup=lambda started, note: _setup(mode, started, note, compare=compare, via=via,
                                                       gateway_url=gateway_url, key=key, ca_cert=ca_cert,
                                                       agent_ref=agent_ref, bench_port=bench_port, kinds=kinds))
    ctx.exit(code)


class _Setup:
    """What a mode started, for cleanup."""

    def __init__(self) -> None:
        self.local: Any = None
        self.remote: Any = None
        self.notes: list[str] = []

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
        if self.local is not None:
            self.local.close()


def _setup(mode: str, started: list[Any], note: Any, *, compare: tuple[str, ...], via: str, gateway_url: Optional[str],
           key: Optional[str], ca_cert: Optional[Path], agent_ref: Optional[str], bench_port: int,
           kinds: dict[str, str]) -> tuple[list[Any], _Setup]:
    """The paths of ``mode``, and what to close afterwards (added to ``started`` before
    anything is started, so a failure or Ctrl-C halfway still stops it)."""
    import urllib.parse

    from relay.bench.local import LocalRelay
    from relay.bench.remote import RemoteTunnels, tunnel_paths

    state = _Setup()
    if mode == "local":
        state.local = LocalRelay(note)
        started.append(state)
        paths = state.local.start(via="ws" if via == "ws" else "hub", compare=compare)
        state.notes = state.local.notes
        return paths, state
    local = LocalRelay(note)  # only for a relay connect process and its log
    state.local = local
    started.append(state)
    if mode == "remote":
        assert gateway_url is not None and key is not None and agent_ref is not None
        state.remote = RemoteTunnels(gateway_url, key, agent_ref, bench_port, ca_cert)
        note(f"opening a tcp and an http tunnel to {agent_ref}'s bench target (127.0.0.1:{bench_port}) ...")
        tcp, http = state.remote.open()
        host = urllib.parse.urlsplit(state.remote.api.base_url).hostname
        path = tunnel_paths(local.procs, tcp=tcp, http_url=http["tunnel_url"], via=via, gateway_host=host,
                            agent=agent_ref, bench_port=bench_port, ca_cert=ca_cert)
    else:
        tcp_url = kinds.get("tcp")
        path = tunnel_paths(local.procs, tcp={"tunnel_url": tcp_url} if tcp_url else None,
                            http_url=kinds.get("http"), via="ws", gateway_host=None, agent="behind the tunnel",
                            bench_port=bench_port, ca_cert=ca_cert)
    return [path], state


def _run_bench(mode: str, settings: Any, repeat: int, rows: list[str], json_path: Optional[Path],
               plot_path: Optional[Path], setup: Any) -> int:
    """Set up, measure, tear down, report; the exit status."""
    from relay.bench import BenchError, BenchRefused
    from relay.bench.progress import Display
    from relay.bench.report import print_report
    from relay.bench.runner import Results, run_rows

    display = Display()
    results = Results(settings, repeat, [], mode)
    started: list[Any] = []
    code = 0
    try:
        try:
            paths, state = setup(started, display.note)
            results.paths = paths
            results.notes.extend(state.notes)
            check = state.local.check if state.local is not None else (lambda: None)
            results.status = _measure(results, rows, display, check, run_rows)
        except KeyboardInterrupt:
            results.status = "interrupted"
        except BenchRefused as exc:
            raise click.ClickException(str(exc)) from None
        except BenchError as exc:
            if not results.paths:
                raise click.ClickException(str(exc)) from None
            results.status, results.error = "failed", str(exc)
        finally:
            display.close()
            for state in started:
                state.close()
    except KeyboardInterrupt:  # a second Ctrl-C while stopping: stop harder, still report
        results.status = "interrupted"
    if results.status == "interrupted":
        code = EXIT_INTERRUPTED
    elif results.status == "failed":
        code = 1
    console = _out_console()
    print_report(results, console)
    _write_outputs(results, json_path, plot_path)
    if results.status == "failed":
        during = f"the run stopped during {results.stopped_in}: " if results.stopped_in else ""
        click.echo(f"Error: {during}{results.error}", err=True)
    return code


def _measure(results: Any, rows: list[str], display: Any, check: Any, run_rows: Any) -> str:
    """Run the rows on the event loop; Ctrl-C or SIGTERM ends them cleanly. The status."""
    from relay.bench import BenchError

    async def body() -> str:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        interrupted: list[bool] = []

        def interrupt() -> None:
            if not interrupted:
                interrupted.append(True)
                task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, interrupt)
        try:
            await run_rows(results, rows, display, check)
            return "complete"
        except asyncio.CancelledError:
            if interrupted:
                return "interrupted"
            raise
        except BenchError as exc:
            dead = check()  # a local process that died explains a broken path best
            results.error = f"{exc}" + (f"; {dead}" if dead and dead not in str(exc) else "")
            return "failed"
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            display.close()

    status: str = _loop_run(body())
    return status


def _write_outputs(results: Any, json_path: Optional[Path], plot_path: Optional[Path]) -> None:
    from relay.bench.report import to_json

    if json_path is not None:
        try:
            json_path.write_text(json.dumps(to_json(results), indent=2) + "\n")
        except OSError as exc:
            click.echo(f"Error: cannot write {json_path}: {exc.strerror or exc}", err=True)
    if plot_path is not None:
        from relay.bench.plot import write_plot

        try:
            write_plot(results, plot_path)
        except OSError as exc:
            click.echo(f"Error: cannot write {plot_path}: {exc.strerror or exc}", err=True)


# --------------------------------------------------------------------------- bench http


def _parse_header(ctx: click.Context, param: Any, values: tuple[str, ...]) -> list[tuple[str, str]]:
    headers = []
    for value in values:
        name, sep, text = value.partition(":")
        if not sep or not name.strip() or any(c in value for c in "\r\n"):
            raise click.BadParameter(f"expected 'Name: value', got {value!r}")
        headers.append((name.strip(), text.strip()))
    return headers


@bench.command("http", cls=_BenchCommand)
@click.argument("url")
@click.option("-c", "--connections", type=click.IntRange(1, 10000), default=16, show_default=True,
              help="Keep-alive connections, each one request at a time.")
@click.option("--rate", type=click.FloatRange(min=0.1, max=10_000_000), metavar="REQ/S",
              help="Aim at this many requests/s (open loop: latency counts from when a request was due). "
                   "Default: flat out.")
@click.option("--duration", type=click.FloatRange(min=0.1, max=86400), default=5.0, show_default=True,
              metavar="SECONDS", help="How long to measure.")
@click.option("--warmup", type=click.FloatRange(min=0, max=600), default=0.2, show_default=True, metavar="SECONDS",
              help="Time before the measurement that is not counted (Python engine).")
@click.option("-X", "--method", default="GET", show_default=True, help="HTTP method.")
@click.option("-H", "--header", "headers", multiple=True, callback=_parse_header, metavar="'NAME: VALUE'",
              help="Extra request header (repeatable), e.g. 'Authorization: Bearer sk-...'.")
@click.option("-d", "--data", "body", default="", metavar="TEXT", help="Request body (Python engine).")
@click.option("--engine", type=click.Choice(["auto", "wrk", "python"]), default="auto", show_default=True,
              help="auto: wrk when installed and flat out (wrk has no target rate), else Python.")
@click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), envvar="RELAY_CA_CERT",
              show_envvar=True, help="Trust this CA (PEM) for an https URL (Python engine; wrk verifies nothing).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), callback=_writable, metavar="FILE",
              help="Also write the result as JSON.")
def bench_http(url: str, connections: int, rate: Optional[float], duration: float, warmup: float, method: str,
               headers: list[tuple[str, str]], body: str, engine: str, json_path: Optional[Path],
               ca_cert: Optional[Path] = None) -> None:
    """Load-test URL: CONNECTIONS keep-alive connections, flat out or at --rate.

    URL is any http(s) URL: a tunnel URL, a share URL, a service proxy path
    (/api/v1/r/containers/SLUG/..., with -H 'Authorization: Bearer sk-...'). Prints
    requests/s, the latency distribution (p50, p90, p99, p99.9, max), the count of each
    status and of errors, and a line on the client: how much CPU it used, and whether
    it was saturated (then the figure is the client's limit, not the server's).
    """
    from relay.bench.http_load import check_url

    try:
        check_url(url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="URL") from None
    method = method.upper()
    if not method.isalpha():
        raise click.BadParameter(f"not an HTTP method: {method!r}", param_hint="--method")
    if engine == "wrk":
        from relay.bench.http_load import wrk_available

        if rate is not None:
            raise click.UsageError("wrk has no target rate: use --engine python (or auto) with --rate")
        if wrk_available() is None:
            raise click.UsageError("--engine wrk: wrk is not installed (apt-get install wrk), or use --engine python")
        if body or method != "GET":
            raise click.UsageError("--engine wrk sends GETs only here: use --engine python for -X or -d")
    _require_extra()
    from relay.bench import BenchError
    from relay.bench.http_load import HttpLoad, run_http_load
    from relay.bench.measure import Settings, Tally
    from relay.bench.progress import Display

    if engine == "auto" and (body or method != "GET"):
        engine = "python"
    display = Display(title="relay bench http")

    async def body_run() -> tuple[Any, bool]:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        load = HttpLoad(url, connections=connections, duration=duration, warmup=warmup, rate=rate, method=method,
                        headers=headers, body=body.encode(), engine=engine, stop=stop,
                        ca_cert=str(ca_cert) if ca_cert is not None else None)
        tally = Tally("ops")
        display.begin("http", "url", 0, 1, tally, Settings(duration=duration, warmup=warmup))
        try:
            return await run_http_load(load, tally), stop.is_set()
        finally:
            display.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    try:
        result, interrupted = _loop_run(body_run())
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        raise click.ClickException("interrupted before anything was measured") from None
    from relay.bench.report import print_http_report

    print_http_report(result, _out_console(), interrupted)
    if json_path is not None:
        try:
            json_path.write_text(json.dumps({**result.to_json(), "interrupted": interrupted}, indent=2) + "\n")
        except OSError as exc:
            raise click.ClickException(f"cannot write {json_path}: {exc.strerror or exc}") from None
    if interrupted:
        sys.exit(EXIT_INTERRUPTED)
