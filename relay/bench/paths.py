"""What ``relay bench`` measures through: a :class:`BenchPath` names where byte
connections go (a TCP address that leads to a bench target: a hub port, a ``relay
connect`` listener, ``ssh -R``'s port, or the target itself) and where HTTP goes, and
which local processes carry it (their CPU time is reported).

:func:`open_mode` opens one connection in a bench mode (relay.bench_protocol);
:func:`probe` checks that a path really ends at a bench target, so an agent run without
``--bench`` is refused with a clear line, not measured as a broken link.
"""
from __future__ import annotations

import asyncio
import socket
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Optional

from relay.bench import BenchError, BenchRefused
from relay.bench_protocol import HTTP_MARKER, command, parse_reply

__all__ = ["BenchPath", "open_mode", "probe", "probe_http", "abort"]

#: Seconds a probe or a connection's first answer may take.
ANSWER_TIMEOUT = 10.0
#: StreamReader buffer of a bench connection (big reads for bulk rows).
READ_LIMIT = 1 << 20


@dataclass
class BenchPath:
    """One way from this machine to a bench target."""

    #: Short name, a table column value: ``relay``, ``direct``, ``ssh -R``.
    name: str
    #: How it is reached, for the notes under the table.
    how: str
    #: Where byte connections go, or None (an HTTP tunnel only).
    tcp: Optional[tuple[str, int]] = None
    #: Base URL of the target's HTTP side through this path, or None.
    http_url: Optional[str] = None
    #: Local processes carrying this path, by role (``gateway``, ``agent``, ...): pids.
    processes: dict[str, int] = field(default_factory=dict)
    #: A private CA (PEM) for an https ``http_url``.
    ca_cert: Optional[str] = None

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "how": self.how, "tcp": f"{self.tcp[0]}:{self.tcp[1]}" if self.tcp else None,
                "http": bool(self.http_url), "processes": sorted(self.processes)}


def abort(writer: asyncio.StreamWriter) -> None:
    """Close a connection at once with a reset (SO_LINGER 0): no TIME_WAIT left behind
    by thousands of short connections, no waiting for a slow peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


async def open_mode(path: BenchPath, mode: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection through ``path`` in ``mode``, its ``ok`` read; BenchError if the
    path does not lead to a bench target that answers."""
    if path.tcp is None:
        raise BenchError(f"{path.name} has no byte path")
    host, port = path.tcp
    try:
        reader, writer = await asyncio.open_connection(host, port, limit=READ_LIMIT)
    except OSError as exc:
        raise BenchError(f"cannot connect to {host}:{port} ({path.name}): {exc.strerror or exc}") from None
    try:
        writer.write(command(mode))
        async with asyncio.timeout(ANSWER_TIMEOUT):
            line = await reader.readline()
    except (OSError, TimeoutError) as exc:
        abort(writer)
        if isinstance(exc, TimeoutError):
            why = f"no answer within {ANSWER_TIMEOUT:.0f} s"
        else:
            why = f"the connection was {'reset' if isinstance(exc, ConnectionResetError) else 'cut'}"
        raise BenchError(f"{path.name}: {why} before the bench target answered "
                         f"(the agent, its target or the gateway is not there)") from None
    except BaseException:
        abort(writer)
        raise
    words = parse_reply(line)
    if not words or words[0] != "ok":
        abort(writer)
        raise BenchError(f"{path.name} did not answer as a bench target "
                         f"({'the connection was closed' if not line else 'an unexpected answer'})")
    return reader, writer


async def probe(path: BenchPath, refusal: str) -> None:
    """One ``hello`` through ``path``; BenchRefused(``refusal`` + why) if it fails."""
    try:
        _, writer = await open_mode(path, "hello")
    except BenchError as exc:
        raise BenchRefused(f"{refusal} ({exc})") from None
    abort(writer)


def probe_http(url: str, refusal: str, timeout: float = ANSWER_TIMEOUT, ca_cert: object = None) -> None:
    """``GET url``; BenchRefused unless the bench target answers (its marker header)."""
    import ssl

    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert is not None else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            if resp.headers.get(HTTP_MARKER) is None:
                raise BenchRefused(f"{refusal} (HTTP {resp.status} from something else)")
    except urllib.error.HTTPError as exc:
        raise BenchRefused(f"{refusal} (HTTP {exc.code} {exc.reason})") from None
    except (urllib.error.URLError, OSError) as exc:
        raise BenchRefused(f"{refusal} ({getattr(exc, 'reason', exc)})") from None
