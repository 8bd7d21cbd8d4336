"""One-command expose: ``relay http PORT`` and ``relay tcp PORT`` (and ``relay agent
--tunnel``), like ``ngrok http 8080``.

::

    export RELAY_GATEWAY=http://gw:8080 RELAY_AGENT_KEY=ak-... RELAY_KEY=sk-...
    relay http 8080          # an agent that may reach 127.0.0.1:8080 only, an http tunnel
    relay tcp 22             # the same with a tcp tunnel (hub port + ws:// URL)

Each runs an agent in this process (allowed to reach exactly the exposed targets), opens
the tunnel through the control API once the agent is registered, prints its URL, then a
line of live counters whenever they change, and on Ctrl-C (SIGINT/SIGTERM) closes the
tunnel and stops. ``relay agent --tunnel http:8188 --tunnel tcp:22`` (TOML ``tunnels =
[...]``) does the same for a long-running agent, which keeps its other options.

Two keys, as the gateway has two doors: the agent key (``ak-``: ``--agent-key``,
``RELAY_AGENT_KEY``) connects the agent; the team key (``sk-``, ``dk-`` or a user JWT:
``--api-key``, ``RELAY_KEY``) opens the tunnel. The agent and the gateway still share
only the protocol: the tunnel is opened with the public API, as ``relay tunnel open``
does. A tunnel opened here is closed with the API (an ``sk-`` key) or, for an http
tunnel, with its admin token (enough for a ``dk-`` key); a tcp tunnel opened with a
``dk-`` key is left to the gateway, which closes it once the agent stays away.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import click

from relay.cli import main

__all__ = ["TunnelSpec", "expose", "parse_tunnel_spec"]

log = logging.getLogger("relay.expose")

#: How long the agent may take to register before the command gives up.
REGISTER_TIMEOUT = 30.0
#: Seconds between two looks at the tunnels' counters.
COUNTER_INTERVAL = 2.0


@dataclass(frozen=True)
class TunnelSpec:
    """One tunnel to open: protocol and the target's host and port on this machine.
    (Seed 000 tunnels reach 127.0.0.1 on the agent's machine.)"""

    protocol: str
    port: int
    host: str = "127.0.0.1"
    #: http: the Host the target gets instead of the client's.
    host_header: Optional[str] = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"


def parse_tunnel_spec(text: str) -> TunnelSpec:
    """``http:8080``, ``tcp:22`` or a bare port (http); ValueError otherwise."""
    protocol, _, port = text.strip().rpartition(":")
    protocol = protocol.lower() or "http"
    if protocol not in ("http", "tcp") or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected http:PORT, tcp:PORT or PORT, got {text!r}")
    return TunnelSpec(protocol, int(port))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


async def expose(agent: Any, api: Any, specs: list[TunnelSpec], *, echo: Callable[[str], None] = print,
                 stop: Optional[asyncio.Event] = None, live: bool = True,
                 interval: float = COUNTER_INTERVAL) -> None:
    """Run ``agent`` (a relay.agent.Agent), open ``specs`` through ``api`` (a
    relay.cli.tunnel.ApiClient) once it is registered, print the URLs and (``live``)
    the counters until ``stop`` or SIGINT/SIGTERM, then close the tunnels and the agent."""
    from relay.agent.client import AgentAuthError
    from relay.cli.tunnel import ApiError

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    task = loop.create_task(agent.run())
    opened: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(REGISTER_TIMEOUT):
            while agent.agent_id is None and not task.done():
                await asyncio.sleep(0.05)
        if task.done():
            try:
                task.result()
            except AgentAuthError as exc:
                raise click.ClickException(str(exc)) from None
            raise click.ClickException("the agent stopped before it was registered")
        agent_id = agent.agent_id
        for spec in specs:
            request: dict[str, Any] = {"target_port": spec.port, "tunnel_protocol": spec.protocol}
            if spec.host_header:
                request["host_header"] = spec.host_header
            answer = await asyncio.to_thread(api.call, "POST", f"/api/v1/agents/{urllib.parse.quote(agent_id)}/tunnel",
                                             request)
            opened.append({**answer, "spec": spec})
            host = urllib.parse.urlsplit(api.base_url).hostname
            echo(f"{spec.protocol} tunnel {answer['session_id']} -> {spec.target}")
            echo(f"  url       {answer['tunnel_url']}")
            if answer.get("tunnel_host_url"):
                echo(f"  host url  {answer['tunnel_host_url']}")
            if spec.protocol == "http":
                echo(f"  inspect   {answer['tunnel_url']}_relay/inspect   (admin token {answer['admin_token']})")
            if answer.get("hub_port") is not None:
                echo(f"  hub port  {host}:{answer['hub_port']}")
            if answer.get("terminal_url"):
                echo(f"  terminal  {answer['terminal_url']}   (sign in with the admin token)")
        echo(f"agent {agent.name} ({agent_id}) serving; Ctrl-C closes the tunnel{'s' if len(specs) > 1 else ''}")
        last = ""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()
            if stop.is_set() or not live:
                continue
            try:
                line = await asyncio.to_thread(_counters, api, agent_id, opened)
            except ApiError as exc:  # the gateway is away for a moment: say so, go on
                line = f"counters unavailable: {exc.message}"
            if line != last:
                echo(line)
                last = line
    except ApiError as exc:
        raise click.ClickException(exc.message) from None
    except TimeoutError:
        raise click.ClickException(f"the agent did not register with {api.base_url} within "
                                   f"{REGISTER_TIMEOUT:.0f}s (unreachable, or a live agent of this key "
                                   f"already has the name {agent.name!r}: --name)") from None
    finally:
        for tunnel in opened:
            closed = await asyncio.to_thread(_close, api, agent.agent_id, tunnel)
            echo(f"closed {tunnel['session_id']}" if closed else
                 f"could not close {tunnel['session_id']} (the gateway closes it once the agent stays away)")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        agent.close()


def _counters(api: Any, agent_id: str, opened: list[dict[str, Any]]) -> str:
    """One line of live counters: per http tunnel (its admin stats) requests, bytes and
    active requests; per tcp tunnel (the agent's sessions) connections."""
    parts = []
    sessions = {s["session_id"]: s for s in api.agent(agent_id).get("tunnels", [])}
    for tunnel in opened:
        if tunnel["tunnel_protocol"] == "http":
            stats = api.call_url("GET", tunnel["tunnel_url"] + "_relay/stats",
                                 headers={"X-Admin-Token": tunnel["admin_token"]})
            parts.append(f"{tunnel['spec'].port}: {stats['requests']} requests ({stats['active_requests']} active), "
                         f"{_size(stats['bytes_in'])} in, {_size(stats['bytes_out'])} out"
                         + (f", {stats['errors']} errors" if stats.get("errors") else ""))
        else:
            session = sessions.get(tunnel["session_id"], {})
            parts.append(f"{tunnel['spec'].port}: {session.get('connections', 0)} connections "
                         f"({session.get('active_connections', 0)} open)")
    return " | ".join(parts)


def _close(api: Any, agent_id: Optional[str], tunnel: dict[str, Any]) -> bool:
    """Close one opened tunnel: the API (sk- key), else its admin token (http)."""
    from relay.cli.tunnel import ApiError

    with contextlib.suppress(ApiError):
        api.call("DELETE", f"/api/v1/agents/{urllib.parse.quote(agent_id or '')}/tunnel"
                           f"?session_id={urllib.parse.quote(tunnel['session_id'])}")
        return True
    if tunnel["tunnel_protocol"] == "http":
        url = tunnel["tunnel_url"].rstrip("/")
        with contextlib.suppress(ApiError):
            api.call_url("DELETE", url, headers={"X-Admin-Token": tunnel["admin_token"]})
            return True
    return False


# --------------------------------------------------------------------------- commands


def _expose_options(func: Any) -> Any:
    from relay.cli.run import _log_format_option, _log_option

    options = [
        click.option("--gateway", "gateway_url", required=True, envvar="RELAY_GATEWAY", show_envvar=True,
                     metavar="URL", help="Gateway base URL, e.g. http://127.0.0.1:8080."),
        click.option("--agent-key", required=True, envvar="RELAY_AGENT_KEY", show_envvar=True, metavar="ak-...",
                     help="Agent key (ak-) the agent connects with."),
        click.option("--api-key", required=True, envvar="RELAY_KEY", show_envvar=True, metavar="sk-...",
                     help="Team key (sk-, dk-) or user JWT the tunnel is opened with."),
        click.option("--name", envvar="RELAY_AGENT_NAME", show_envvar=True,
                     help="Agent name (default: the host name)."),
        click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     envvar="RELAY_CA_CERT", show_envvar=True, help="Trust this CA (PEM) for an https gateway."),
        click.option("--quiet", is_flag=True, help="Print the URL only, no live counters."),
        _log_option, _log_format_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _run_expose(spec: TunnelSpec, gateway_url: str, agent_key: str, api_key: str, name: Optional[str],
                ca_cert: Optional[Path], quiet: bool, log_level: str, log_format: str) -> None:
    from relay.agent.client import Agent
    from relay.cli.run import _run, _setup_logging, check_agent_key, prepare_process
    from relay.cli.tunnel import ApiClient

    check_agent_key(agent_key)
    _setup_logging(log_level, log_format)
    prepare_process()
    api = ApiClient(gateway_url, api_key, ca_cert)

    async def body() -> None:
        import ssl

        context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert is not None else None
        try:
            agent = Agent(gateway_url, agent_key, name=name, allow=[spec.target], ssl_context=context)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--gateway") from None
        await expose(agent, api, [spec], echo=click.echo, live=not quiet)

    try:
        _run(body())
    except KeyboardInterrupt:
        pass


@main.command("http")
@click.argument("port", type=click.IntRange(1, 65535))
@click.option("--host-header", metavar="HOST[:PORT]",
              help="Send the app this Host instead of the client's (dev servers, ALLOWED_HOSTS).")
@_expose_options
def http_command(port: int, host_header: Optional[str] = None, **options: Any) -> None:
    """Expose the web app on 127.0.0.1:PORT: an agent and an http tunnel, its URL printed,
    closed on Ctrl-C."""
    _run_expose(TunnelSpec("http", port, host_header=host_header), **options)


@main.command("tcp")
@click.argument("port", type=click.IntRange(1, 65535))
@_expose_options
def tcp_command(port: int, **options: Any) -> None:
    """Expose the TCP service on 127.0.0.1:PORT: an agent and a tcp tunnel (hub port and
    ws:// URL for relay connect), closed on Ctrl-C."""
    _run_expose(TunnelSpec("tcp", port), **options)
