"""An OpenAI-compatible test server (asyncio + h11) for the container service tests.

:class:`OpenAIServer` serves, on 127.0.0.1:

* ``GET /health``: 200 ``ok``, or 503 while ``healthy`` is False.
* ``GET /v1/models``: one model, ``relay-test``.
* ``POST /v1/chat/completions``: the last user message echoed back as a completion; with
  ``"stream": true`` Server-Sent Events, ``chunks`` of them ``delay`` seconds apart, each
  ``choices[0].delta.content`` being ``"w{i} "`` and carrying ``server_time`` (when it was
  written), then ``data: [DONE]``.
* ``ANY /echo...``: the request body back as is; headers ``x-echo-method``,
  ``x-echo-target`` and ``x-echo-headers`` (JSON of what arrived), ``x-served-by``.
* ``GET /big?size=N``: N bytes.

Every response carries ``x-served-by: NAME`` (which instance answered). ``requests``
counts what arrived.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

import h11

__all__ = ["OpenAIServer"]


class OpenAIServer:
    """See the module docstring. ``await start()``, ``await close()``."""

    def __init__(self, name: str = "s1", *, chunks: int = 5, delay: float = 0.3) -> None:
        self.name = name
        self.chunks = chunks
        self.delay = delay
        self.healthy = True
        self.requests = 0
        #: Send times (time.time()) of the streamed chunks of the last streamed completion.
        self.sent_at: list[float] = []
        self.port = 0
        self._server: Optional[asyncio.AbstractServer] = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> "OpenAIServer":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening (new connections are refused) and end open ones."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = h11.Connection(h11.SERVER)

        async def next_event() -> Any:
            while True:
                event = conn.next_event()
                if event is not h11.NEED_DATA:
                    return event
                conn.receive_data(await reader.read(65536))

        async def send(*events: Any) -> None:
            for event in events:
                data = conn.send(event)
                if data:
                    writer.write(data)
            await writer.drain()

        try:
            while True:
                event = await next_event()
                if not isinstance(event, h11.Request):
                    break
                body = bytearray()
                while True:
                    part = await next_event()
                    if isinstance(part, h11.Data):
                        body += part.data
                    elif isinstance(part, h11.EndOfMessage):
                        break
                    else:
                        raise ConnectionError("request body cut")
                self.requests += 1
                await self._answer(event, bytes(body), send)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _answer(self, request: h11.Request, body: bytes, send: Any) -> None:
        split = urlsplit(request.target.decode())
        method = request.method.decode()
        base = [("x-served-by", self.name)]

        async def respond(status: int, payload: bytes, headers: list[tuple[str, str]]) -> None:
            hdrs = base + headers + [("content-length", str(len(payload)))]
            events: list[Any] = [h11.Response(status_code=status, headers=hdrs)]
            if payload and method != "HEAD":
                events.append(h11.Data(data=payload))
            await send(*events, h11.EndOfMessage())

        def as_json(value: Any, status: int = 200) -> Any:
            return respond(status, json.dumps(value).encode(), [("content-type", "application/json")])

        if split.path == "/health":
            await respond(200 if self.healthy else 503, b"ok" if self.healthy else b"down",
                          [("content-type", "text/plain")])
        elif split.path.startswith("/echo"):
            seen = {n.decode(): v.decode("latin-1") for n, v in request.headers}
            await respond(200, body, [("content-type", "application/octet-stream"),
                                      ("x-echo-method", method), ("x-echo-target", request.target.decode()),
                                      ("x-echo-headers", json.dumps(seen))])
        elif split.path == "/big":
            size = int(parse_qs(split.query).get("size", ["0"])[0])
            await respond(200, b"x" * size, [("content-type", "application/octet-stream")])
        elif split.path == "/v1/models":
            await as_json({"object": "list", "data": [
                {"id": "relay-test", "object": "model", "created": 0, "owned_by": "relay"}]})
        elif split.path == "/v1/chat/completions" and method == "POST":
            await self._completion(json.loads(body or b"{}"), respond, send, base)
        else:
            await as_json({"error": {"message": f"no route {split.path}"}}, 404)

    async def _completion(self, req: dict[str, Any], respond: Any, send: Any,
                          base: list[tuple[str, str]]) -> None:
        messages = req.get("messages") or [{"content": ""}]
        text = f"echo: {messages[-1].get('content', '')}"
        created = int(time.time())
        if not req.get("stream"):
            value = {"id": "chatcmpl-1", "object": "chat.completion", "created": created,
                     "model": req.get("model", "relay-test"),
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": text}}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
            await respond(200, json.dumps(value).encode(), [("content-type", "application/json")])
            return
        await send(h11.Response(status_code=200, headers=base + [
            ("content-type", "text/event-stream"), ("cache-control", "no-cache")]))
        self.sent_at = []
        for i in range(self.chunks):
            if i:
                await asyncio.sleep(self.delay)
            now = time.time()
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": created,
                     "model": req.get("model", "relay-test"), "server_time": now,
                     "choices": [{"index": 0, "finish_reason": None,
                                  "delta": {"role": "assistant", "content": f"w{i} "}}]}
            self.sent_at.append(now)
            await send(h11.Data(data=f"data: {json.dumps(chunk)}\n\n".encode()))
        await send(h11.Data(data=b"data: [DONE]\n\n"), h11.EndOfMessage())


def main() -> None:
    """``python -m tests.support.openai_server --port PORT``: serve until killed."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    async def serve() -> None:
        server = await OpenAIServer().start(args.port)
        print(f"listening {server.port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
