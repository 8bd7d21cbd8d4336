"""One buffered HTTP/1.1 exchange on a stream: the request written, the whole response
read and parsed with httptools (llhttp, the parser of the proxy engine), for callers that
want the answer as a value (invoke, the service health probes).

On a mux stream the response is read the way the proxy engine reads one
(:mod:`relay.gateway.http.proxy`): the parser is the stream's *sink*, fed every batch of
frames the session hands over, with no task or read call per piece, and the exchange
ends in one future. Anything else with ``write``/``drain``/``read`` (a TCP connection to
an external service) is read in a loop into the same parser.

The stream may carry the next exchange when this one ended cleanly:
:attr:`Answer.reusable` says so (a complete response, the target neither said
``Connection: close`` nor spoke HTTP/1.0 nor framed the body by closing, and sent
nothing after it).
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional

import httptools

from relay.aio.stream import MuxStream

__all__ = ["Answer", "ResponseTooLarge", "http_exchange", "request_head"]

#: Bytes taken per read from a stream that is not a mux stream.
READ_SIZE = 256 * 1024
#: Largest response head accepted.
MAX_HEAD = 64 * 1024


class ResponseTooLarge(Exception):
    """The response body is over the caller's limit."""


class _Stop(Exception):
    """Stops the parser after the head of a response to HEAD (llhttp cannot be told that
    such a response has no body)."""


class Answer:
    """A whole response: ``status``, raw ``headers`` (``(name, value)`` as sent), ``body``
    and whether the stream may carry another exchange (``reusable``)."""

    __slots__ = ("status", "headers", "body", "reusable")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, reusable: bool) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.reusable = reusable


def request_head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    """An HTTP/1.1 request head. The caller has checked every piece (a method token, a
    target and header values of printable ASCII, header names tokens)."""
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers]
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


class _Reader:
    """The response parser's callbacks and what they gathered; a mux stream's sink."""

    def __init__(self, head_only: bool, limit: int) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.head_only = head_only
        self.limit = limit
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.until_eof = False  # the body ends when the target closes
        self.in_final = False  # inside the final (non-1xx) response
        self.done = False
        self.trailing = False
        self.keep_alive = False
        self.reusable = False
        self.error: Optional[BaseException] = None
        self.future: Optional[asyncio.Future] = None
        self.stream: Any = None
        self._in: list[Any] = []
        self._in_n = 0

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self.done:  # bytes after the response: the target is out of step
            self.trailing = True
            raise _Stop()
        self.headers = []
        self.in_final = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if len(self.headers) > 1000:
            raise httptools.HttpParserError("too many response headers")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            return  # 100 Continue and friends: the answer comes after
        self.status = status
        self.in_final = True
        # (asked here: llhttp forgets the message's flags once it is complete)
        self.keep_alive = self.parser.should_keep_alive()
        if self.head_only or status in (204, 304):
            self.done = True
            raise _Stop()
        framed = False
        for name, _ in self.headers:
            lname = name.lower()
            if lname == b"content-length" or lname == b"transfer-encoding":
                framed = True
        self.until_eof = not framed

    def on_body(self, body: bytes) -> None:
        if self.in_final:
            self.size += len(body)
            if self.size > self.limit:
                raise ResponseTooLarge(f"the container's response is over {self.limit} bytes")
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self.in_final:
            self.done = True

    # -- feeding

    def feed(self, data: bytes) -> None:
        """Parse ``data``; sets ``done`` (and ``reusable``) at the response's end, or raises
        (ResponseTooLarge, httptools.HttpParserError)."""
        if self.done:
            self.reusable = False  # bytes after the response: the target is out of step
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if not isinstance(cause, _Stop):
                if isinstance(cause, (ResponseTooLarge, httptools.HttpParserError)):
                    raise cause from None
                raise
        except httptools.HttpParserUpgrade:
            raise httptools.HttpParserError("unexpected 101 Switching Protocols") from None
        except httptools.HttpParserError:
            if not self.done:
                raise
            self.trailing = True  # garbage after a complete response
        if self.done:
            self.reusable = self.keep_alive and not self.trailing and not self.until_eof

    def eof(self) -> None:
        """The target ended its side: the end of a body framed by closing, else an error."""
        if self.done:
            self.reusable = False
            return
        if self.in_final and self.until_eof:
            self.done = True
            self.reusable = False
            return
        if self.status == 0 and not self.in_final:
            raise ConnectionResetError("the container closed the connection without answering")
        raise ConnectionResetError("the container closed the connection mid-response")

    def answer(self) -> Answer:
        return Answer(self.status, self.headers, b"".join(self.body), self.reusable)

    # -- a mux stream's sink (see relay.aio.stream.StreamSink)

    def _mux_data(self, data: Any, n: int) -> None:
        if not self._in:
            self.stream._session._pending_splices.append(self)
        self._in.append(data)
        self._in_n += n

    def _write_out(self) -> None:
        chunks, n = self._in, self._in_n
        if not chunks:
            return
        self._in = []
        self._in_n = 0
        stream = self.stream
        stream._session._acknowledge(stream.stream_id, n)  # buffered here, bounded by the limit
        if self.future is None or self.future.done():
            return
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        try:
            self.feed(bytes(data) if type(data) is not bytes else data)
        except Exception as exc:
            self._end(exc)
            return
        if self.done:
            self._end(None)

    def _mux_eof(self) -> None:
        self._write_out()
        if self.future is None or self.future.done():
            return
        try:
            self.eof()
        except Exception as exc:
            self._end(exc)
            return
        self._end(None)

    def _mux_reset(self, exc: BaseException) -> None:
        self._in = []
        self._in_n = 0
        self._end(exc)

    def _try_resume_reading(self) -> bool:
        return True

    def _end(self, exc: Optional[BaseException]) -> None:
        """The exchange is over: the stream goes back to plain reads (for the next user)."""
        self.stream._detach_sink()
        future = self.future
        if future is not None and not future.done():
            if exc is None:
                future.set_result(None)
            else:
                future.set_exception(exc)


async def http_exchange(stream: Any, method: str, target: str, headers: list[tuple[str, str]],
                        body: bytes = b"", limit: int = 16 * 1024 * 1024,
                        timeout: Optional[float] = None) -> Answer:
    """Send one request on ``stream`` (a mux stream, or anything with ``write``,
    ``drain`` and ``read``) and read the whole response, within ``timeout`` seconds if
    given. Raises ResponseTooLarge, httptools.HttpParserError (not valid HTTP),
    ConnectionError, TimeoutError."""
    reader = _Reader(method == "HEAD", limit)
    head = request_head(method, target, headers)
    if type(stream) is MuxStream:
        reader.stream = stream
        loop = asyncio.get_running_loop()
        future = reader.future = loop.create_future()
        # One timer, no asyncio.timeout (a context, a cancellation) per exchange.
        timer = None if timeout is None else loop.call_later(timeout, reader._end, TimeoutError())
        # One write (one frame) for a small body. The stream queues what its window does
        # not take yet (bodies are bounded by the caller): no drain, the answer is awaited.
        stream.write(head + body if body and len(body) < 65536 else head)
        if body and len(body) >= 65536:
            stream.write(body)
        stream._attach_sink(reader)  # (hands over what arrived already, and an EOF or reset)
        try:
            await future
        finally:
            if timer is not None:
                timer.cancel()
            if not future.done():  # cancelled: the stream is not left spliced
                future.cancel()
                stream._detach_sink()
        return reader.answer()
    async with asyncio.timeout(timeout):
        stream.write(head)
        if body:
            stream.write(body)
        await stream.drain()
        while not reader.done:
            data = await stream.read(READ_SIZE)
            if not data:
                reader.eof()
                break
            reader.feed(data)
    return reader.answer()
