"""``relay gateway`` and ``relay agent``: the long-running commands.

Registered on :data:`relay.cli.main` by importing this module (relay/cli/__init__.py does). Both
run on uvloop. Errors are one line on stderr and a non-zero exit status.
"""
from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Optional

import click

from relay.cli import data_dir_option, main, store_option
from relay.config import config_option

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")  # relay.logs.LOG_FORMATS (not imported: --help stays fast)
#: Where ``relay agent --key`` comes from when not given, first set wins: the agent's own
#: name (so one shell can hold an ak- key for the agent beside an sk- key for the API),
#: then RELAY_KEY, the name every other command reads its key from.
AGENT_KEY_ENVVARS = ("RELAY_AGENT_KEY", "RELAY_KEY")


def check_agent_key(key: str) -> None:
    """A one-line usage error unless ``key`` is an ak- key, naming where it came from
    (never the key itself)."""
    if key.startswith("ak-"):
        return
    import os

    source = next((name for name in AGENT_KEY_ENVVARS if os.environ.get(name) == key), None)
    where = f" (from {source})" if source else ""
    raise click.BadParameter(f"an agent key starts with 'ak-'{where}; create one with "
                             f"`relay admin key create --team TEAM --kind ak`", param_hint="--key")


def _setup_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr at ``level`` as text or JSON lines, secrets redacted (relay.logs)."""
    from relay.logs import setup_logging

    setup_logging(level, fmt)


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on uvloop (asyncio's loop if uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(coro)
    return uvloop.run(coro)


def raise_nofile_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit; returns the soft
    limit now in force.

    Every stream is a socket in the gateway (the hub client) and in the agent (the
    target), so 10,000 idle streams need more than the usual soft limit of 1024, while
    the hard limit is usually far higher. Raising the soft limit up to the hard one needs
    no privilege; doing it here spares every deployment its ``ulimit -n``.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # e.g. an unlimited hard limit above fs.nr_open
            logging.getLogger("relay").debug("cannot raise RLIMIT_NOFILE to %s", hard)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def prepare_process() -> None:
    """Process-wide settings of a command that moves data (gateway, agent, ``relay
    connect``, ``relay http``/``tcp``): the file descriptor limit raised, and freed heap
    kept for the next read (relay.heap)."""
    from relay.heap import keep_freed_heap

    raise_nofile_limit()
    keep_freed_heap()


def _select_backend(ctx: click.Context, param: Any, value: str) -> None:
    """``relay agent --backend trio``: run :func:`_trio_agent` for this invocation instead
    of the asyncio body, with the same options. Called from the option's callback (before
    the command runs), it replaces the command's invocation on this click context only,
    so the asyncio command stays untouched."""
    if value == "trio":
        prepare_process()  # the trio body does not return to agent() below

        def invoke(callback: Any, **params: Any) -> Any:
            return _trio_agent(**params)

        ctx.invoke = invoke  # type: ignore[method-assign]  # on this context only (see above)


def _trio_agent(gateway_urls: tuple[str, ...], key: str, name: Optional[str], labels: tuple[str, ...],
                allow: tuple[str, ...], ca_cert: Any, log_level: str, log_format: str = "text",
                api_key: Optional[str] = None, bench_port: int = 0, connections: Optional[int] = None,
                services: tuple[str, ...] = (), terminal_shell: Optional[str] = None,
                terminal_user: Optional[str] = None, bench: bool = False, **options: Any) -> None:
    """The body of ``relay agent`` on trio (relay.agent.trio_client.TrioAgent): same
    checks, logging and one-line errors as the asyncio one, the same declared services,
    built-in task handlers and bench target (on an asyncio loop in a thread of its own:
    relay.agent.bench)."""
    import ssl

    import trio

    from relay.agent.client import AgentAuthError
    from relay.agent.services import parse_service
    from relay.agent.trio_client import TrioAgent
    from relay.collector import settle

    unsupported = sorted({"tunnels": "--tunnel"}.get(name, "--" + name.replace("_", "-"))
                         for name, value in options.items() if value)
    if unsupported:  # options the asyncio agent grew that this one does not serve yet
        raise click.UsageError(f"--backend trio does not support {', '.join(unsupported)} yet")
    gateway_url, *more_gateways = gateway_urls
    check_agent_key(key)
    for entry in allow:
        _split_host_port(entry, "--allow")
    try:
        specs = [parse_service(text) for text in services]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--service") from None
    terminal = _terminal_spec(terminal_shell, terminal_user)
    _setup_logging(log_level, log_format)
    stop_bench = None
    if bench:
        from relay.agent.bench import BenchTarget

        try:
            bench_target, stop_bench = BenchTarget.start_in_thread("127.0.0.1", bench_port)
        except OSError as exc:
            raise _bench_port_error(bench_port, exc) from None
        if allow:  # an explicit allowlist: the target is allowed implicitly, like a service's
            allow = (*allow, bench_target.address)
    try:
        context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert is not None else None
        agent = TrioAgent(gateway_url, key, name=name, labels=labels, allow=allow, ssl_context=context,
                          more_gateways=more_gateways, connections=connections, terminal=terminal)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--gateway") from None
    agent.tasks.register_builtins()  # echo, sleep, count (relay.agent.tasks), as on asyncio
    agent.services = specs
    settle()  # start-up's objects out of the collector's way (relay.collector)
    try:
        trio.run(agent.run)
    except AgentAuthError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass
    finally:
        if stop_bench is not None:
            stop_bench()


def _bench_port_error(port: int, exc: OSError) -> click.ClickException:
    return click.ClickException(f"--bench cannot listen on 127.0.0.1:{port}: {exc.strerror or exc} "
                                "(another --bench-port?)")


def _terminal_spec(shell: Optional[str], user: Optional[str]) -> Any:
    """The web terminal ``--terminal SHELL`` and ``--terminal-user NAME`` ask for
    (relay.agent.terminal.TerminalSpec), None without them; usage errors otherwise."""
    if user and not shell:
        raise click.UsageError("--terminal-user needs --terminal SHELL (the web terminal is off without it)")
    if not shell:
        return None
    from relay.agent.terminal import TerminalSpec

    try:
        return TerminalSpec.create(shell, user)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--terminal") from None


def _split_host_port(value: str, what: str, allow_zero: bool = False) -> tuple[str, int]:
    from relay.agent.client import parse_host_port

    try:
        if allow_zero and value.endswith(":0"):  # port 0: the system picks a free port
            return parse_host_port(value[:-1] + "1")[0], 0
        return parse_host_port(value)
    except ValueError:
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}", param_hint=what) from None


_log_option = click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info",
                           envvar="RELAY_LOG_LEVEL", show_envvar=True, show_default=True, help="Logging verbosity.")
_log_format_option = click.option(
    "--log-format", type=click.Choice(LOG_FORMATS), default="text", envvar="RELAY_LOG_FORMAT", show_envvar=True,
    show_default=True, help="Log lines on stderr: text, or one JSON object per line (secrets redacted either way; "
                            "the gateway logs one access line per proxied HTTP request on relay.access).")


@main.command()
@config_option("gateway")
@click.option("--listen", default="127.0.0.1:8080", show_default=True, envvar="RELAY_LISTEN", show_envvar=True,
              metavar="HOST:PORT", help="Address to serve HTTP, the API and agents on (port 0: any).")
@data_dir_option
@store_option
@click.option("--public-url", envvar="RELAY_PUBLIC_URL", show_envvar=True, metavar="URL",
              help="Base URL clients reach this gateway at (for tunnel URLs).")
@click.option("--hub-host", default="127.0.0.1", show_default=True, envvar="RELAY_HUB_HOST", show_envvar=True,
              help="Address TCP and UDP tunnel hub ports listen on. The default serves this machine only; "
                   "0.0.0.0 (or one interface's address) lets other machines reach them.")
@click.option("--public-hub-host", default="0.0.0.0", show_default=True, envvar="RELAY_PUBLIC_HUB_HOST",
              show_envvar=True,
              help="Address the hub ports of public Tunnels API tunnels (public: true) listen on.")
@click.option("--session-ttl", type=click.FloatRange(min=0), default=0.0, show_default=True,
              envvar="RELAY_SESSION_TTL", show_envvar=True, metavar="SECONDS",
              help="A tunnel session (POST /agents/{id}/tunnel) without its own ttl closes this long "
                   "after it opened (0: never).")
@click.option("--session-idle-timeout", type=click.FloatRange(min=0), default=3600.0, show_default=True,
              envvar="RELAY_SESSION_IDLE_TIMEOUT", show_envvar=True, metavar="SECONDS",
              help="A tunnel session without its own idle_timeout closes after this long with no "
                   "connection or request through it (0: never).")
@click.option("--udp-idle-timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              envvar="RELAY_UDP_IDLE_TIMEOUT", show_envvar=True, metavar="SECONDS",
              help="A udp tunnel's flow (one client address) ends after this long without a datagram.")
@click.option("--tunnel-domain", envvar="RELAY_TUNNEL_DOMAIN", show_envvar=True, metavar="DOMAIN",
              help="Also serve every HTTP tunnel at a host of its own, LABEL.DOMAIN (tunnel_host_url), "
                   "for apps that need the root path; needs a wildcard DNS record *.DOMAIN.")
@click.option("--jwt-key", envvar="RELAY_JWT_KEY", show_envvar=True, metavar="KEY",
              help="HMAC secret (32+ bytes; HS256) or PEM public key (RS256/ES256) verifying user "
                   "JWTs: claims sub, exp and teams (team ids) or team_id; callers send X-Team-ID.")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), envvar="RELAY_TLS_CERT", show_envvar=True,
              help="PEM certificate chain: serve HTTPS/WSS.")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), envvar="RELAY_TLS_KEY", show_envvar=True,
              help="PEM private key of --tls-cert.")
@click.option("--allow-private-egress", is_flag=True, default=False, envvar="RELAY_ALLOW_PRIVATE_EGRESS", show_envvar=True,
              help="Let external services and webhooks reach loopback, link-local and private "
                   "addresses (refused by default; the gateway's own ports never are).")
@click.option("--redis", "redis_url", envvar="RELAY_REDIS", metavar="URL",
              help="Join a fleet: its live registry in Redis (redis://host:port/db). See docs/FLEET.md.")
@click.option("--fleet-secret", envvar="RELAY_FLEET_SECRET", metavar="SECRET",
              help="Secret shared by the fleet's gateways (peer sessions). Prefer the environment variable.")
@click.option("--fleet-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path), envvar="RELAY_FLEET_CA",
              show_envvar=True, metavar="FILE",
              help="Mutual TLS between the fleet's gateways: the CA (PEM) that signed every gateway's "
                   "--tls-cert. Peers dial with their certificate and accept only ones it signed. "
                   "Replaces or adds to --fleet-secret.")
@click.option("--advertise", envvar="RELAY_ADVERTISE", metavar="URL",
              help="URL the other gateways reach this one at (default: --public-url or the listening address). "
                   "With --workers: a HOST (or http://HOST) each worker advertises with its own peer port, "
                   "which then listens on --listen's host, so other machines' gateways join the fleet.")
@click.option("--gateway-id", envvar="RELAY_GATEWAY_ID", metavar="ID",
              help="This gateway's id in the fleet (default: a random one per start).")
@click.option("--workers", type=click.IntRange(min=1, max=256), default=1, show_default=True,
              envvar="RELAY_WORKERS", show_envvar=True, metavar="N",
              help="Run N gateway processes sharing --listen (SO_REUSEPORT) as a fleet on this machine; "
                   "needs --redis. A parent supervises them: restarts one that dies, stops all on "
                   "SIGTERM/SIGINT. See docs/FLEET.md.")
@_log_option
@_log_format_option
def gateway(listen: str, data_dir: Path, store_url: Optional[str], public_url: Optional[str], hub_host: str,
            public_hub_host: str, session_ttl: float, session_idle_timeout: float,
            jwt_key: Optional[str], tls_cert: Optional[Path], tls_key: Optional[Path],
            allow_private_egress: bool, udp_idle_timeout: float, redis_url: Optional[str],
            fleet_secret: Optional[str], advertise: Optional[str], gateway_id: Optional[str],
            log_level: str, fleet_ca: Optional[Path] = None, tunnel_domain: Optional[str] = None,
            log_format: str = "text", workers: int = 1) -> None:
    """Run the gateway: agent endpoint, control API, tunnels."""
    from relay.gateway.app import run_gateway
    from relay.gateway.fleet import FleetConfig
    from relay.gateway.fleet.workers import worker_spec
    from relay.gateway.store import StoreError

    host, port = _split_host_port(listen, "--listen", allow_zero=True)
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    try:
        worker = worker_spec()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if worker is None and workers > 1:
        _supervise_workers(workers, host, port, listen, redis_url=redis_url, advertise=advertise,
                           gateway_id=gateway_id, fleet_secret=fleet_secret, fleet_ca=fleet_ca)
        return
    if worker is not None:  # one of --workers' processes: its own id and peer address
        gateway_id, advertise = worker.gateway_id, worker.advertise
    fleet = None
    if redis_url:
        if not fleet_secret and fleet_ca is None:
            raise click.UsageError("--redis needs --fleet-secret (or RELAY_FLEET_SECRET) or --fleet-ca: "
                                   "peers authenticate with it")
        if fleet_ca is not None and tls_cert is None:
            raise click.UsageError("--fleet-ca needs --tls-cert and --tls-key: gateways present them to each other")
        if gateway_id is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", gateway_id):
            raise click.BadParameter("letters, digits, '.', '_' and '-' only, at most 64", param_hint="--gateway-id")
        fleet = FleetConfig(redis_url, fleet_secret or "", gateway_id=gateway_id or "", advertise=advertise,
                            ca_file=fleet_ca)
    elif fleet_secret or advertise or gateway_id or fleet_ca:
        raise click.UsageError("--fleet-secret, --fleet-ca, --advertise and --gateway-id need --redis")
    _setup_logging(log_level, log_format)
    prepare_process()
    try:
        _run(run_gateway(host, port, data_dir, public_url=public_url, hub_host=hub_host,
                         public_hub_host=public_hub_host, session_ttl=session_ttl,
                         session_idle_timeout=session_idle_timeout,
                         jwt_key=jwt_key, tls_cert=tls_cert, tls_key=tls_key,
                         allow_private_egress=allow_private_egress, store_url=store_url,
                         udp_idle_timeout=udp_idle_timeout,
                         fleet=fleet,
                         tunnel_domain=tunnel_domain,
                         echo=lambda line: click.echo(line),
                         reuse_port=worker is not None,
                         peer_listen=(worker.peer_host, worker.peer_port) if worker is not None else None))
    except (StoreError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    except KeyboardInterrupt:
        pass


def _supervise_workers(count: int, host: str, port: int, listen: str, *, redis_url: Optional[str],
                       advertise: Optional[str], gateway_id: Optional[str], fleet_secret: Optional[str],
                       fleet_ca: Optional[Path] = None) -> None:
    """``relay gateway --workers N``: check the combination, reserve the address, then
    run the workers until SIGTERM/SIGINT (relay.gateway.fleet.workers)."""
    import os
    import sys

    from relay.gateway.fleet.workers import advertise_host, reserve_address, supervise

    if not redis_url:
        raise click.UsageError("--workers needs --redis (or RELAY_REDIS): the workers are a fleet, and a fleet "
                               "keeps its live registry in Redis; see docs/FLEET.md")
    advertised, peer_host = "", "127.0.0.1"
    if advertise:  # workers other machines' gateways reach: peer ports on --listen's host
        try:
            advertised = advertise_host(advertise)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--advertise") from None
        peer_host = host or "0.0.0.0"
    if fleet_ca is not None:
        raise click.UsageError("--workers reach each other over loopback, authenticated by the fleet secret "
                               "(one is made when none is given): drop --fleet-ca")
    if gateway_id is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,56}", gateway_id):
        raise click.BadParameter("letters, digits, '.', '_' and '-' only, at most 56 with --workers",
                                 param_hint="--gateway-id")
    try:
        reserved = reserve_address(host, port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    bound = reserved.getsockname()
    argv = list(sys.argv[1:])
    env = dict(os.environ)
    if port == 0:  # one port for every worker: the one the system gave the parent
        env["RELAY_LISTEN"] = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        argv = _without_option(argv, "--listen")
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    click.echo(f"relay gateway: {count} workers on {shown}:{bound[1]} (pid {os.getpid()} supervises)")
    try:
        status = supervise(count, argv, gateway_id=gateway_id, fleet_secret=fleet_secret,
                           echo=lambda line: click.echo(line), env=env, advertise=advertised, peer_host=peer_host)
    finally:
        reserved.close()
    if status:
        raise SystemExit(status)


def _without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


@main.command()
@config_option("agent")
@click.option("--gateway", "gateway_urls", required=True, multiple=True, envvar="RELAY_GATEWAY", show_envvar=True,
              metavar="URL", help="Gateway URL, e.g. http://gw.example.com:8080 (https/wss for TLS). Repeat it for "
                                  "the gateways of a fleet (or give one name that resolves to several addresses): "
                                  "the agent holds --connections of them at once, and after a drop dials another.")
@click.option("--connections", type=click.IntRange(1, 16), envvar="RELAY_AGENT_CONNECTIONS", show_envvar=True,
              metavar="N", help="Sessions held at once, each to another gateway of a fleet, so losing one "
                                "gateway loses only the streams it carried. [default: 2 with several gateway "
                                "addresses, else 1]")
@click.option("--key", required=True, envvar=list(AGENT_KEY_ENVVARS), show_envvar=True, metavar="ak-...",
              help="Agent key (ak-) of the team to join. Prefer the environment: RELAY_AGENT_KEY, "
                   "else RELAY_KEY (the name every command reads its key from).")
@click.option("--name", envvar="RELAY_AGENT_NAME", show_envvar=True,
              help="Agent name (default: the host name); stable across restarts.")
@click.option("--label", "labels", multiple=True, metavar="L", envvar="RELAY_AGENT_LABELS", show_envvar=True,
              help="Advertise a label (repeatable; the variable: space-separated).")
@click.option("--allow", "allow", multiple=True, metavar="HOST:PORT", envvar="RELAY_AGENT_ALLOW", show_envvar=True,
              help="Allow streams to this target (repeatable; the variable: space-separated). "
                   "Default: loopback hosts only, any port.")
@click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              envvar="RELAY_CA_CERT", show_envvar=True, help="Trust this CA (PEM) for an https/wss gateway.")
@click.option("--service", "services", multiple=True,
              metavar="SLUG=HOST:PORT[,health=/health][,prompt=TEXT][,openapi=PATH][,label=L]",
              help="Declare a container service (repeatable; see relay.agent.services).")
@click.option("--tunnel", "tunnels", multiple=True, metavar="http:PORT|tcp:PORT", envvar="RELAY_AGENT_TUNNELS",
              show_envvar=True, help="Open this tunnel to 127.0.0.1:PORT once connected, print its URL, close it "
                                     "on exit (repeatable; needs --api-key; see relay http).")
@click.option("--api-key", envvar="RELAY_KEY", show_envvar=True, metavar="sk-...",
              help="Team key (sk-, dk-) or user JWT that opens the --tunnel tunnels.")
@click.option("--bench", is_flag=True, default=False, envvar="RELAY_AGENT_BENCH", show_envvar=True,
              help="Serve the bench target that relay bench measures through (source, sink, echo, HTTP) "
                   "on 127.0.0.1:--bench-port. Off by default: without it relay bench is refused.")
@click.option("--bench-port", type=click.IntRange(0, 65535), default=7099, show_default=True,
              envvar="RELAY_AGENT_BENCH_PORT", show_envvar=True, metavar="PORT",
              help="Port of the --bench target on 127.0.0.1 (0: any free port, logged at start).")
@click.option("--terminal", "terminal_shell", envvar="RELAY_AGENT_TERMINAL", show_envvar=True, metavar="SHELL",
              help="Serve a web terminal running SHELL (an absolute path, e.g. /bin/bash) to whoever holds a "
                   "tunnel session's admin_token. Off by default.")
@click.option("--terminal-user", envvar="RELAY_AGENT_TERMINAL_USER", show_envvar=True, metavar="NAME",
              help="Run the terminal's shells as this user (needs root unless it is the agent's own). "
                   "Default: the agent's user.")
@click.option("--backend", type=click.Choice(["asyncio", "trio"]), default="asyncio", show_default=True,
              envvar="RELAY_AGENT_BACKEND", show_envvar=True, expose_value=False,
              help="Event loop to run on: asyncio (uvloop) or trio.",
              callback=_select_backend)
@_log_option
@_log_format_option
def agent(gateway_urls: tuple[str, ...], key: str, name: Optional[str], labels: tuple[str, ...],
          allow: tuple[str, ...], ca_cert: Optional[Path], log_level: str,
          services: tuple[str, ...] = (), log_format: str = "text", tunnels: tuple[str, ...] = (),
          api_key: Optional[str] = None, bench: bool = False, bench_port: int = 7099,
          terminal_shell: Optional[str] = None, terminal_user: Optional[str] = None,
          connections: Optional[int] = None) -> None:
    """Run an agent: dial out to the gateway and serve allowed targets."""
    gateway_url, *more_gateways = gateway_urls
    from relay.agent.client import Agent, AgentAuthError
    from relay.collector import settle

    check_agent_key(key)
    for entry in allow:
        _split_host_port(entry, "--allow")
    from relay.agent.services import parse_service

    try:
        specs = [parse_service(text) for text in services]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--service") from None
    from relay.cli.expose import parse_tunnel_spec

    try:
        tunnel_specs = [parse_tunnel_spec(text) for text in tunnels]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--tunnel") from None
    if tunnel_specs and not api_key:
        raise click.UsageError("--tunnel needs a team key to open it: --api-key or RELAY_KEY (sk-, dk-)")
    terminal = _terminal_spec(terminal_shell, terminal_user)
    if allow:  # like declared services, a declared tunnel's target is allowed implicitly
        allow = (*allow, *(spec.target for spec in tunnel_specs))
    _setup_logging(log_level, log_format)
    prepare_process()

    async def serve() -> None:
        nonlocal allow
        bench_target = None
        if bench:
            from relay.agent.bench import BenchTarget

            try:
                bench_target = await BenchTarget.start("127.0.0.1", bench_port)
            except OSError as exc:
                raise _bench_port_error(bench_port, exc) from None
            if allow:  # an explicit allowlist: the target is allowed implicitly, like a service's
                allow = (*allow, bench_target.address)
        try:
            await _serve_agent()
        finally:
            if bench_target is not None:
                bench_target.close()

    async def _serve_agent() -> None:
        try:
            context = None
            if ca_cert is not None:
                import ssl

                context = ssl.create_default_context(cafile=str(ca_cert))
            the_agent = Agent(gateway_url, key, name=name, labels=labels, allow=allow,
                              ssl_context=context, more_gateways=more_gateways, terminal=terminal,
                              connections=connections)
            the_agent.tasks.register_builtins()  # echo, sleep, count (relay.agent.tasks)
            the_agent.services = specs
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--gateway") from None
        if tunnel_specs:
            from relay.cli.expose import expose
            from relay.cli.tunnel import ApiClient

            assert api_key is not None
            await expose(the_agent, ApiClient(gateway_url, api_key, ca_cert), tunnel_specs,
                         echo=click.echo, live=False)
            return
        settle()  # start-up's objects out of the collector's way (relay.collector)
        await the_agent.run()

    try:
        _run(serve())
    except AgentAuthError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass


# --------------------------------------------------------------------------- connect


@main.command()
@click.argument("tunnel_url")
@click.option("--listen", default="127.0.0.1:0", show_default=True, metavar="HOST:PORT",
              help="Local address to accept connections on (port 0: any free port).")
@click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              envvar="RELAY_CA_CERT", show_envvar=True, help="Trust this CA (PEM) for a wss:// tunnel URL.")
@click.option("--mode", type=click.Choice(("auto", "mux", "plain")), default="auto", show_default=True,
              envvar="RELAY_CONNECT_MODE", show_envvar=True,
              help="mux: one multiplexed WebSocket carries every connection (a stream each); plain: one "
                   "WebSocket per connection; auto: mux, or plain against a gateway that lacks it.")
@click.option("--udp", is_flag=True, default=False,
              help="Reach a udp tunnel: listen for datagrams on --listen; each local flow "
                   "(client address) is one WebSocket to TUNNEL_URL (.../udp).")
@click.option("--idle-timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              metavar="SECONDS", help="With --udp: a flow ends after this long without a datagram.")
@_log_option
def connect(tunnel_url: str, listen: str, ca_cert: Optional[Path], udp: bool, idle_timeout: float,
            log_level: str, mode: str = "auto") -> None:
    """Reach a TCP tunnel: every connection to --listen becomes one stream to its target.

    TUNNEL_URL is the ws(s)://.../tunnel/TOKEN/tcp URL the tunnel API returned. By
    default one multiplexed WebSocket to it carries every connection, reopened if it
    drops (docs/PROTOCOL.md section 14). With --udp, the .../tunnel/TOKEN/udp URL of a
    udp tunnel: every local flow of datagrams becomes one flow to its target (section 16.2).
    """
    kind = "udp" if udp else "tcp"
    if not tunnel_url.startswith(("ws://", "wss://")) or "/tunnel/" not in tunnel_url:
        raise click.BadParameter(f"expected a ws(s)://HOST/tunnel/TOKEN/{kind} URL", param_hint="TUNNEL_URL")
    host, port = _split_host_port(listen, "--listen", allow_zero=True)
    _setup_logging(log_level)
    prepare_process()  # every local connection is a socket here
    context = None
    if ca_cert is not None:
        import ssl

        context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        if udp:
            from relay.connect.udp import run_connect_udp

            _run(run_connect_udp(tunnel_url, host, port, ssl_context=context, idle_timeout=idle_timeout,
                                 echo=lambda line: click.echo(line)))
        else:
            from relay.connect.tcp import TunnelUnavailable, run_connect

            try:
                _run(run_connect(tunnel_url, host, port, ssl_context=context, mode=mode,
                                 echo=lambda line: click.echo(line)))
            except TunnelUnavailable as exc:
                raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    except KeyboardInterrupt:
        pass
