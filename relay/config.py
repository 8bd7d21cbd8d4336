"""Configuration files for ``relay gateway`` and ``relay agent``.

SPEC section 5: configuration by flags, environment variables and a TOML file, in that
precedence. The file is given by ``--config PATH`` or ``RELAY_CONFIG``; one table per
command::

    [gateway]
    listen = "0.0.0.0:8080"
    data = "/var/lib/relay"
    public_url = "https://relay.example.com"

    [agent]
    gateway = "https://relay.example.com"
    name = "box1"
    labels = ["gpu", "ssh"]
    allow = ["127.0.0.1:22", "127.0.0.1:5432"]

A key is the option's flag without dashes (``public-url`` or ``public_url``) or its
parameter name (``labels`` for ``--label``, ``data_dir`` for ``--data``). Values become
click's ``default_map`` (click's documented hook for defaults from a config file), so
click itself applies the precedence: command line > environment > file > built-in
default. Unknown tables or keys, and values of the wrong shape, are one-line errors.

Secrets (``key``, ``jwt_key``) are better kept in the environment; in a file readable by
other users they still work, with a warning on stderr.
"""
from __future__ import annotations

import stat
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

__all__ = ["ConfigError", "SECTIONS", "config_option", "default_map_for", "load_config"]

F = TypeVar("F", bound=Callable[..., Any])

#: Tables a config file may have: one per command that reads it.
SECTIONS = ("gateway", "agent")
#: Keys holding secrets: a file with them should not be readable by other users.
SECRET_KEYS = frozenset({"key", "jwt_key", "fleet_secret"})


class ConfigError(click.ClickException):
    """A config file that cannot be used; click prints it as one ``Error:`` line."""


def load_config(path: Path) -> dict[str, dict[str, Any]]:
    """Parse ``path`` and check its tables; ConfigError if unreadable, not TOML or odd."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message names the line and column; keep it on one line.
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for name, table in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"config file {path}: unknown table [{name}] "
                              f"(known: {', '.join(f'[{s}]' for s in SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: {name} must be a table ([{name}])")
    return data


def _aliases(param: click.Option) -> set[str]:
    """Names a file may use for ``param``: its flags without dashes, and its own name."""
    names = {opt.lstrip("-").replace("-", "_") for opt in param.opts if opt.startswith("--")}
    if param.name:
        names.add(param.name)
    return names


def default_map_for(command: click.Command, table: dict[str, Any], path: Path,
                    section: str) -> dict[str, Any]:
    """Turn one table of the file into a ``default_map`` for ``command`` (keyed by
    parameter name), checking every key against the command's options."""
    by_alias: dict[str, click.Option] = {}
    for param in command.params:
        if isinstance(param, click.Option) and param.expose_value and param.name != "help":
            for alias in _aliases(param):
                by_alias[alias] = param
    result: dict[str, Any] = {}
    for key, value in table.items():
        option = by_alias.get(key.replace("-", "_"))
        if option is None:
            known = sorted({p.opts[0].lstrip("-").replace("-", "_") for p in by_alias.values()})
            raise ConfigError(f"config file {path}: unknown key {key!r} in [{section}] "
                              f"(known: {', '.join(known)})")
        assert option.name is not None  # an option that exposes its value has a name
        result[option.name] = _check_value(option, value, f"{path}: [{section}] {key}")
    return result


def _check_value(param: click.Option, value: Any, where: str) -> Any:
    """Refuse values click would misread (a string for a list option is iterated by
    character; a table is never meaningful). click converts the rest as for a flag."""
    scalar = (str, int, float, bool)
    if param.multiple:
        if isinstance(value, scalar) and not isinstance(value, bool):
            return [value]  # labels = "gpu" means one label
        if not isinstance(value, list) or not all(isinstance(v, scalar) for v in value):
            raise ConfigError(f"config file {where} must be a list of strings")
        return value
    if param.is_flag:
        if not isinstance(value, bool):
            raise ConfigError(f"config file {where} must be true or false")
        return value
    if not isinstance(value, scalar) or isinstance(value, bool):
        raise ConfigError(f"config file {where} must be a string or a number")
    return str(value) if isinstance(value, float) else value


def _warn_if_exposed(path: Path, table: dict[str, Any]) -> None:
    secrets = sorted(k for k in table if k.replace("-", "_") in SECRET_KEYS)
    if not secrets:
        return
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        click.echo(f"warning: {path} holds {', '.join(secrets)} and is readable by other users; "
                   f"chmod 600 it or use the environment instead", err=True)


def config_option(section: str) -> Callable[[F], F]:
    """The ``--config PATH`` option (env ``RELAY_CONFIG``) of a command reading table
    ``[section]``. Eager, so its values are in ``ctx.default_map`` before click resolves
    the other options."""

    def apply(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is None or ctx.resilient_parsing:
            return
        path = Path(value)
        table = load_config(path).get(section, {})
        _warn_if_exposed(path, table)
        ctx.default_map = {**(ctx.default_map or {}),
                           **default_map_for(ctx.command, table, path, section)}

    return click.option(
        "--config", type=click.Path(dir_okay=False, path_type=Path), envvar="RELAY_CONFIG",
        metavar="PATH", is_eager=True, expose_value=False, callback=apply, show_envvar=True,
        help=f"TOML file with a [{section}] table of defaults (flags and environment win).")

