"""The bench target of ``relay agent --bench``: a TCP server on the agent's loopback that
sources, sinks and echoes bytes and answers HTTP, for ``relay bench`` to measure the
path from a client through the gateway to this agent (relay.bench_protocol says what
it speaks).

It is opt-in: without ``--bench`` nothing listens, and a bench run against the agent is
refused (its probe finds no target). With it, the target is one more allowed target of
the agent, reached like any other (tunnels to ``127.0.0.1:PORT``), so what is measured
is the path every tunnel takes. It serves only what a benchmark needs: no files, no
shell, bounded lines and bodies it throws away.

The target is a plain local server, apart from the agent: the trio agent (``relay agent
--backend trio --bench``) runs it on an asyncio loop of its own in a thread
(:meth:`BenchTarget.start_in_thread`), so both agents serve the very same target.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any, Optional

import httptools

from relay.bench_protocol import HTTP_MARKER, MAX_HTTP_BYTES, VERSION, parse_command, reply

__all__ = ["BenchTarget"]

log = logging.getLogger("relay.agent.bench")

#: Bytes per write of a download, and the zeros it sends.
CHUNK = 256 * 1024
_ZEROS = bytes(CHUNK)
#: Read size of sinks and echoes.
READ_SIZE = 256 * 1024


class BenchTarget:
    """The target server. ``await BenchTarget.start(host, port)`` listens (port 0: any
    free one, see :attr:`port`); :meth:`close` stops it and its connections."""

    def __init__(self, server: asyncio.Server) -> None:
        self._server = server
        self._tasks: set[asyncio.Task[Any]] = set()
        sockname = server.sockets[0].getsockname()
        self.host: str = sockname[0]
        self.port: int = sockname[1]

    @classmethod
    async def start(cls, host: str = "127.0.0.1", port: int = 0) -> BenchTarget:
        """Listen on ``host:port``; OSError if the address is taken."""
        holder: list[BenchTarget] = []

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            target = holder[0]
            if task is not None:
                target._tasks.add(task)
            try:
                await _serve(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                pass  # a client that went away mid-run: nothing to tell anyone
            finally:
                writer.close()
                if task is not None:
                    target._tasks.discard(task)

        server = await asyncio.start_server(on_client, host, port, limit=READ_SIZE)
        target = cls(server)
        holder.append(target)
        log.info("bench target listening on %s:%d (relay bench measures through it)", target.host, target.port)
        return target

    @classmethod
    def start_in_thread(cls, host: str = "127.0.0.1", port: int = 0) -> tuple["BenchTarget", Callable[[], None]]:
        """:meth:`start` on an event loop in a daemon thread of its own (for a program
        that runs no asyncio loop): the target and a function that stops it and the
        thread. OSError if the address is taken."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="relay-bench-target", daemon=True)
        thread.start()
        try:
            target = asyncio.run_coroutine_threadsafe(cls.start(host, port), loop).result(30)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            raise

        def stop() -> None:
            loop.call_soon_threadsafe(target.close)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)

        return target, stop

    @property
    def address(self) -> str:
        """``HOST:PORT`` of the target (as an allowlist entry)."""
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        """Stop listening and end every open connection."""
        self._server.close()
        for task in list(self._tasks):
            task.cancel()


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One connection: a bench command line, else HTTP."""
    first = await reader.readline()
    mode = parse_command(first)
    if mode is None:
        if first:
            await _serve_http(first, reader, writer)
        return
    writer.write(reply("ok", VERSION))
    if mode == "hello":
        await writer.drain()
    elif mode == "source":
        while True:
            writer.write(_ZEROS)
            await writer.drain()
    elif mode == "sink":
        count = 0
        while data := await reader.read(READ_SIZE):
            count += len(data)
        writer.write(reply("done", count))
        await writer.drain()
    elif mode == "echo":
        await writer.drain()
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()


class _Request:
    """httptools callbacks: the requests of one connection, in order."""

    def __init__(self) -> None:
        self.url = b""
        self.body_bytes = 0
        self.done: list[tuple[bytes, bytes, int, bool]] = []  # method, url, body bytes, keep-alive
        self.parser: Any = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_method(), self.url, self.body_bytes, self.parser.should_keep_alive()))
        self.url = b""
        self.body_bytes = 0


def _response(status: str, body: bytes, keep_alive: bool, length: Optional[int] = None) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Length: {len(body) if length is None else length}\r\n"
            f"Content-Type: text/plain\r\n{HTTP_MARKER}: {VERSION}\r\n"
            f"{'' if keep_alive else 'Connection: close' + chr(13) + chr(10)}\r\n").encode() + body


async def _serve_http(first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 keep-alive: ``GET /``, ``GET /bytes/N``, ``POST /sink`` (module docstring)."""
    request = _Request()
    parser = httptools.HttpRequestParser(request)
    request.parser = parser
    data = first
    while True:
        try:
            parser.feed_data(data)
        except httptools.HttpParserError:
            writer.write(_response("400 Bad Request", b"bad request\n", False))
            await writer.drain()
            return
        for method, url, body_bytes, keep_alive in request.done:
            path = url.split(b"?", 1)[0]
            if path.startswith(b"/bytes/") and path[7:].isdigit() and method in (b"GET", b"HEAD"):
                count = min(int(path[7:]), MAX_HTTP_BYTES)
                writer.write(_response("200 OK", b"", keep_alive, length=count))
                while count > 0 and method == b"GET":
                    part = min(count, CHUNK)
                    writer.write(_ZEROS[:part])
                    count -= part
                    await writer.drain()
            elif path == b"/sink":
                writer.write(_response("200 OK", f"{body_bytes}\n".encode(), keep_alive))
            elif path == b"/":
                writer.write(_response("200 OK", b"relay bench target\n", keep_alive))
            else:
                writer.write(_response("404 Not Found", b"not found\n", keep_alive))
            if not keep_alive:
                await writer.drain()
                return
        request.done.clear()
        await writer.drain()
        data = await reader.read(READ_SIZE)
        if not data:
            return

