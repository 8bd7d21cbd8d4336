"""What the bench target (``relay agent --bench``, relay.agent.bench) and the bench
client (``relay bench``, relay.bench) agree on: the target's tiny wire protocol.

The target is a TCP server on the agent's loopback. A connection opens with one ASCII
command line, or with an HTTP/1.1 request:

``RELAY-BENCH/1 hello``
    answered with ``RELAY-BENCH/1 ok VERSION`` and closed: the probe that tells a bench
    target from anything else listening on the port.
``RELAY-BENCH/1 source``
    ``ok``, then bytes until the client closes: the download.
``RELAY-BENCH/1 sink``
    ``ok``; the target reads until the client's EOF, then answers ``RELAY-BENCH/1 done
    COUNT`` (the bytes it received, so the upload is measured where it lands).
``RELAY-BENCH/1 echo``
    ``ok``, then every byte back until EOF: request/response latency.

Any other first line is taken as an HTTP request: ``GET /`` answers a short body,
``GET /bytes/N`` N bytes, ``POST /sink`` counts the body; every answer carries
:data:`HTTP_MARKER` so a client can tell the target from another HTTP server.

Neither end imports the other: both import this module.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["DEFAULT_PORT", "HTTP_MARKER", "MAGIC", "MAX_HTTP_BYTES", "MODES", "VERSION",
           "command", "parse_command", "parse_reply", "reply"]

#: The first token of every command and reply line.
MAGIC = "RELAY-BENCH/1"
#: The version a hello answers with.
VERSION = "1"
#: Where ``relay agent --bench`` listens unless told otherwise (127.0.0.1 only).
DEFAULT_PORT = 7099
#: The commands of a connection that is not HTTP.
MODES = ("hello", "source", "sink", "echo")
#: Header name of every HTTP answer of the target (its value: VERSION).
HTTP_MARKER = "X-Relay-Bench"
#: Largest ``GET /bytes/N`` the target serves (a typo must not stream forever).
MAX_HTTP_BYTES = 1 << 30


def command(mode: str) -> bytes:
    """The line that opens a connection in ``mode`` (one of :data:`MODES`)."""
    if mode not in MODES:
        raise ValueError(f"unknown bench mode {mode!r}")
    return f"{MAGIC} {mode}\n".encode()


def parse_command(line: bytes) -> Optional[str]:
    """The mode of a command line, or None if ``line`` is not one (e.g. HTTP)."""
    parts = line.decode("ascii", "replace").split()
    if len(parts) == 2 and parts[0] == MAGIC and parts[1] in MODES:
        return parts[1]
    return None


def reply(word: str, *args: object) -> bytes:
    """A reply line: ``RELAY-BENCH/1 WORD ARGS...``."""
    return " ".join([MAGIC, word, *(str(a) for a in args)]).encode() + b"\n"


def parse_reply(line: bytes) -> Optional[list[str]]:
    """The words after the magic of a reply line, or None if it is not one."""
    parts = line.decode("ascii", "replace").split()
    if len(parts) >= 2 and parts[0] == MAGIC:
        return parts[1:]
    return None
