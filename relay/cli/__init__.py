"""The ``relay`` command line.

``main`` is the top-level click group. A subcommand is one decorated function::

    @main.command()
    @data_dir_option
    def gateway(data_dir: Path, ...) -> None:
        ...

(or ``@main.group()`` for a family of commands, like ``admin``). Errors are one line
on stderr and a non-zero exit: raise :class:`click.ClickException`.

One module per family of commands: ``admin`` (teams and keys in the store), ``run``
(gateway, agent, connect), ``expose`` (relay http/tcp), ``tunnel`` (tunnel sessions),
``tunnels`` (the Tunnels API), ``bench``; ``relay demo`` lives in relay.demo.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from relay import __version__
from relay.gateway.store import default_data_dir

F = TypeVar("F", bound=Callable[..., Any])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="relay")
def main() -> None:
    """relay: a tunnel relay. Agents dial out to a gateway over one WebSocket;
    the gateway carries HTTP and TCP streams to them."""


def data_dir_option(func: F) -> F:
    """The shared ``--data DIR`` option (env ``RELAY_DATA``): the gateway's state directory."""
    return click.option(
        "--data", "data_dir", envvar="RELAY_DATA", metavar="DIR",
        type=click.Path(file_okay=False, path_type=Path), default=default_data_dir,
        show_default="$XDG_DATA_HOME/relay", show_envvar=True,
        help="Data directory holding the gateway's SQLite state.",
    )(func)


def store_option(func: F) -> F:
    """The shared ``--store URL`` option (env ``RELAY_STORE``): which database holds the
    state (relay.gateway.store.open_store); SQLite in ``--data`` when not given."""
    return click.option(
        "--store", "store_url", envvar="RELAY_STORE", metavar="URL", default=None, show_envvar=True,
        help="Where the state is kept: sqlite:///PATH (or a path) or postgresql://USER:PASSWORD@HOST:PORT/DB "
             "(needs relay[postgres]); default: SQLite in --data.",
    )(func)


def json_option(func: F) -> F:
    """``--json``: print one JSON document instead of text."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print machine-readable JSON.")(func)


# --------------------------------------------------------------------------- registration

from relay import demo  # noqa: E402,F401 - register their commands
from relay.cli import admin, bench, expose, run, tunnel, tunnels  # noqa: E402,F401 - register their commands


def _show_envvars(command: click.Command) -> None:
    """Every option that reads an environment variable says so in ``--help`` (click's
    ``show_envvar``), including options added later by any module: set here, once all
    commands are registered, so no command can forget it."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _show_envvars(sub)
    for param in command.params:
        if isinstance(param, click.Option) and param.envvar:
            param.show_envvar = True


_show_envvars(main)
