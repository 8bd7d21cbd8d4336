"""Real HTTP/1.1 upstream servers for the HTTP tunnel tests (asyncio + h11, wsproto).

:class:`WebApp` serves, on 127.0.0.1:

* ``GET /``: an HTML page with relative links (``sub/page.html``, ``static/app.js``,
  ``static/style.css``) whose script fetches ``api/info`` and opens a WebSocket to
  ``ws`` *relative to its own URL*, then writes the echo into the DOM (the ComfyUI
  pattern: a page behind a path prefix talking back to its own origin).
* ``ANY /echo...``: JSON of what arrived: method, target, headers, body length and
  sha256 (the body is read as it streams, never held).
* ``GET /sse?n=&interval=``: Server-Sent Events, one every ``interval`` seconds, each
  carrying the server's send time (``time.time()``).
* ``GET /chunks?n=&size=&interval=``: a chunked body sent piece by piece.
* ``GET /download?size=[&chunked=1]``: ``size`` bytes of :func:`payload`.
* ``POST|PUT /upload``: the body's length and sha256 (streamed).
* ``GET /hop``: a response full of hop-by-hop headers (to see them stripped).
* ``GET /ws`` (WebSocket): echoes text and binary messages.
* ``OPTIONS *``: ``204`` with ``Allow``.

Run standalone (a separate process for the memory test):
``python -m tests.support.webapps --port PORT`` prints ``listening PORT`` when ready.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import ssl as _ssl
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

import h11
import wsproto
import wsproto.events as ws_events

__all__ = ["WebApp", "payload", "payload_sha256", "INDEX_HTML", "WS_GREETING"]

#: What the page's script sends over its WebSocket (the echo comes back prefixed).
WS_GREETING = "hello through the tunnel"

INDEX_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>relay test app</title>
<link rel="stylesheet" href="static/style.css">
</head><body>
<h1>relay test app</h1>
<p><a id="sub" href="sub/page.html">a relative link</a></p>
<p id="info">info: pending</p>
<p id="echo">echo: pending</p>
<script src="static/app.js"></script>
</body></html>
"""

APP_JS = """
const info = document.getElementById('info');
const out = document.getElementById('echo');
fetch('api/info').then(r => r.json()).then(j => { info.textContent = 'info: ' + j.app; })
  .catch(e => { info.textContent = 'info failed: ' + e; });
const url = new URL('ws', location.href);
url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
const ws = new WebSocket(url.href);
ws.onopen = () => ws.send('%s');
ws.onmessage = (e) => { out.textContent = 'echo: ' + e.data; ws.close(); };
ws.onerror = () => { out.textContent = 'echo: websocket error'; };
""" % WS_GREETING

STYLE_CSS = "body { font-family: sans-serif; background: #eef; } #echo { color: #060; font-size: 2em; }\n"
SUB_PAGE = '<!doctype html><html><body><p id="sub">sub page</p><a href="../">back</a></body></html>\n'

_BLOCK = random.Random(20261123).randbytes(1024 * 1024)


def payload(size: int, chunk: int = 1024 * 1024) -> Iterator[bytes]:
    """``size`` deterministic bytes in pieces of at most ``chunk``: 1 MiB blocks, each
    starting with its own index, so a reordered or repeated block changes the checksum.
    The bytes do not depend on ``chunk``."""
    sent = 0
    index = 0
    while sent < size:
        block = index.to_bytes(8, "big") + _BLOCK[8:]
        block = block[:size - sent]
        for start in range(0, len(block), chunk):
            yield block[start:start + chunk]
        sent += len(block)
        index += 1


def payload_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for piece in payload(size):
        digest.update(piece)
    return digest.hexdigest()


class _Exchange:
    """One request on one connection: read the body as it streams, write the answer."""

    def __init__(self, app: "WebApp", conn: h11.Connection, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, request: h11.Request) -> None:
        self.app = app
        self.conn = conn
        self.reader = reader
        self.writer = writer
        self.request = request
        split = urlsplit(request.target.decode())
        self.path = split.path
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.headers = [(n.decode(), v.decode("latin-1")) for n, v in request.headers]

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.reader.read(256 * 1024))

    async def body(self) -> AsyncIterator[bytes]:
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                yield event.data
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise ConnectionError(f"unexpected {event!r} in a request body")

    async def send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def respond(self, status: int, body: bytes = b"", content_type: str = "text/plain",
                      headers: Optional[list[tuple[str, str]]] = None) -> None:
        hdrs = [("content-type", content_type), ("content-length", str(len(body)))] + (headers or [])
        await self.send(h11.Response(status_code=status, headers=hdrs))
        if body and self.request.method != b"HEAD":
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())

    async def respond_json(self, value: Any, status: int = 200) -> None:
        await self.respond(status, json.dumps(value).encode(), "application/json")


class WebApp:
    """The test upstream (see the module docstring). ``await start()``, ``await close()``."""

    def __init__(self) -> None:
        self.port = 0
        self._server: Optional[asyncio.AbstractServer] = None
        #: TCP connections accepted so far (keep-alive reuse shows as few of them).
        self.connections = 0
        #: Body bytes ``/download`` handed to its socket so far (backpressure shows as a
        #: number that stops growing while the client does not read).
        self.download_sent = 0
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0,
                    ssl: Optional[_ssl.SSLContext] = None) -> "WebApp":
        """Listen (HTTPS with ``ssl``, a server context)."""
        self._server = await asyncio.start_server(self._serve, host, port, ssl=ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> "WebApp":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                exchange = None
                while exchange is None:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(256 * 1024)
                        conn.receive_data(data)
                        continue
                    if isinstance(event, h11.Request):
                        exchange = _Exchange(self, conn, reader, writer, event)
                    else:
                        return  # ConnectionClosed
                if await self._route(exchange):
                    return  # upgraded: the WebSocket ended the connection
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _route(self, ex: _Exchange) -> bool:
        """Answer one request; True if it was upgraded to a WebSocket."""
        method = ex.request.method.decode()
        path = ex.path
        if method == "OPTIONS":
            await _drain_body(ex)
            await ex.send(h11.Response(status_code=204, headers=[
                ("allow", "GET, HEAD, POST, PUT, DELETE, OPTIONS")]))
            await ex.send(h11.EndOfMessage())
            return False
        if path.startswith("/echo"):
            await self._echo(ex, method)
            return False
        if path == "/ws":
            return await self._websocket(ex)
        if path == "/upload" and method in ("POST", "PUT"):
            digest, length = hashlib.sha256(), 0
            async for chunk in ex.body():
                digest.update(chunk)
                length += len(chunk)
            await ex.respond_json({"length": length, "sha256": digest.hexdigest()})
            return False
        await _drain_body(ex)
        if method not in ("GET", "HEAD"):
            await ex.respond_json({"error": "method not allowed"}, 405)
        elif path == "/":
            await ex.respond(200, INDEX_HTML.encode(), "text/html; charset=utf-8")
        elif path == "/static/app.js":
            await ex.respond(200, APP_JS.encode(), "text/javascript")
        elif path == "/static/style.css":
            await ex.respond(200, STYLE_CSS.encode(), "text/css")
        elif path == "/sub/page.html":
            await ex.respond(200, SUB_PAGE.encode(), "text/html")
        elif path == "/api/info":
            await ex.respond_json({"app": "relay-webapp", "path": path})
        elif path == "/sse":
            await self._sse(ex)
        elif path == "/chunks":
            await self._chunks(ex)
        elif path == "/download":
            await self._download(ex)
        elif path == "/hop":
            await ex.respond(200, b"hop", headers=[
                ("connection", "x-private-hop"), ("x-private-hop", "secret"),
                ("keep-alive", "timeout=5"), ("proxy-authenticate", "Basic"),
                ("trailer", "x-trailer"), ("x-end-to-end", "kept")])
        else:
            await ex.respond_json({"error": "not found", "path": path}, 404)
        return False

    async def _echo(self, ex: _Exchange, method: str) -> None:
        digest, length = hashlib.sha256(), 0
        async for chunk in ex.body():
            digest.update(chunk)
            length += len(chunk)
        await ex.respond_json({"method": method, "target": ex.request.target.decode(),
                               "headers": ex.headers, "body_length": length,
                               "body_sha256": digest.hexdigest()})

    async def _sse(self, ex: _Exchange) -> None:
        count = int(ex.query.get("n", "5"))
        interval = float(ex.query.get("interval", "0.2"))
        await ex.send(h11.Response(status_code=200, headers=[
            ("content-type", "text/event-stream"), ("cache-control", "no-cache")]))
        for i in range(count):
            if i:
                await asyncio.sleep(interval)
            event = json.dumps({"i": i, "sent": time.time()})
            await ex.send(h11.Data(data=f"id: {i}\ndata: {event}\n\n".encode()))
        await ex.send(h11.EndOfMessage())

    async def _chunks(self, ex: _Exchange) -> None:
        count = int(ex.query.get("n", "5"))
        size = int(ex.query.get("size", "10"))
        interval = float(ex.query.get("interval", "0.1"))
        await ex.send(h11.Response(status_code=200, headers=[("content-type", "application/octet-stream")]))
        for i in range(count):
            if i:
                await asyncio.sleep(interval)
            await ex.send(h11.Data(data=bytes([48 + i % 10]) * size))
        await ex.send(h11.EndOfMessage())

    async def _download(self, ex: _Exchange) -> None:
        size = int(ex.query.get("size", "0"))
        headers = [("content-type", "application/octet-stream")]
        if ex.query.get("chunked") != "1":
            headers.append(("content-length", str(size)))
        await ex.send(h11.Response(status_code=200, headers=headers))
        if ex.request.method != b"HEAD":
            for piece in payload(size, 256 * 1024):
                await ex.send(h11.Data(data=piece))
                self.download_sent += len(piece)
        await ex.send(h11.EndOfMessage())

    async def _websocket(self, ex: _Exchange) -> bool:
        """Echo WebSocket: wsproto handshake on the raw request, then echo messages."""
        ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        ws.initiate_upgrade_connection(ex.request.headers, ex.request.target)
        event = next(ws.events())
        if not isinstance(event, ws_events.Request):
            await ex.respond_json({"error": "bad websocket request"}, 400)
            return False
        ex.writer.write(ws.send(ws_events.AcceptConnection()))
        pending, _ = ex.conn.trailing_data
        if pending:
            ws.receive_data(pending)
        text: list[str] = []
        data: list[bytes] = []
        while True:
            for event in ws.events():
                if isinstance(event, ws_events.TextMessage):
                    text.append(event.data)
                    if event.message_finished:
                        ex.writer.write(ws.send(ws_events.Message(data="echo: " + "".join(text))))
                        text.clear()
                elif isinstance(event, ws_events.BytesMessage):
                    data.append(bytes(event.data))
                    if event.message_finished:
                        ex.writer.write(ws.send(ws_events.Message(data=b"".join(data))))
                        data.clear()
                elif isinstance(event, ws_events.Ping):
                    ex.writer.write(ws.send(event.response()))
                elif isinstance(event, ws_events.CloseConnection):
                    ex.writer.write(ws.send(event.response()))
                    await ex.writer.drain()
                    return True
            await ex.writer.drain()
            chunk = await ex.reader.read(65536)
            if not chunk:
                return True
            ws.receive_data(chunk)


async def _drain_body(ex: _Exchange) -> None:
    async for _ in ex.body():
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    async def serve() -> None:
        app = await WebApp().start(port=args.port)
        print(f"listening {app.port}", flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop
        uvloop.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
