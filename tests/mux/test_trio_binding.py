"""relay.trio: sessions and streams over memory streams, real TCP, trio-websocket, and
against the asyncio binding. Every test body is bounded by ``trio.fail_after``."""
from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import queue
import struct
import threading
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from relay.mux.connection import MuxConfig
from relay.mux.errors import ErrorCode
from relay.trio import (
    MuxStream,
    SessionClosedError,
    StreamRefused,
    StreamResetError,
    TrioMuxSession,
    WebSocketStream,
)
from relay.trio.stream import SEND_SLICE

KINDS = ["memory", "tcp"]


def run(fn, timeout: float = 30.0, **kwargs):
    """Run ``fn()`` under trio, failing if it takes longer than ``timeout`` seconds."""

    async def bounded():
        with trio.fail_after(timeout):
            return await fn()

    return trio.run(bounded, **kwargs)


async def transport_pair(kind: str) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """Two connected byte streams: in memory, or a real TCP connection on 127.0.0.1."""
    if kind == "memory":
        return trio.testing.memory_stream_pair()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    while True:
        server = await listeners[0].accept()
        # Other programs on this machine may dial a port they believe free: keep only
        # the connection that really comes from our client.
        if server.socket.getpeername() == client.socket.getsockname():
            break
        await server.aclose()
    for listener in listeners:
        await listener.aclose()
    return client, server


@asynccontextmanager
async def session_pair(kind: str, client_config=None, server_config=None, client_handler=None, server_handler=None):
    """A client TrioMuxSession connected to a server one, both running; aborted after."""
    left, right = await transport_pair(kind)
    client = TrioMuxSession(left, client=True, config=client_config, handler=client_handler)
    server = TrioMuxSession(right, client=False, config=server_config, handler=server_handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await nursery.start(server.run)
        await client.wait_established()
        await server.wait_established()
        try:
            yield client, server
        finally:
            client.abort()
            server.abort()


async def open_pair(opener: TrioMuxSession, acceptor: TrioMuxSession, metadata=None) -> tuple[MuxStream, MuxStream]:
    """Open a stream on ``opener`` and accept it on ``acceptor``: its two ends."""
    accepted = []

    async def accept():
        accepted.append(await acceptor.accept_stream())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        opened = await opener.open_stream(metadata or {})
    return opened, accepted[0]


async def echo(stream: MuxStream) -> None:
    """Stream handler: accept, echo until EOF, then end our side."""
    stream.accept()
    while True:
        data = await stream.receive_some()
        if not data:
            break
        await stream.send_all(data)
    await stream.send_eof()


async def receive_all(stream: MuxStream) -> bytes:
    parts = []
    while True:
        data = await stream.receive_some()
        if not data:
            return b"".join(parts)
        parts.append(data)


# ---------------------------------------------------------------------- the trio contract


@pytest.mark.parametrize("kind", KINDS)
def test_check_half_closeable_stream(kind):
    """trio's own generic stream checks, clogged variants included."""
    # Clogged streams: a small window and send queue, filled until send_all must wait.
    small = MuxConfig(initial_window=1024, send_queue_limit=4096)

    async def main():
        async with session_pair(kind) as (a, b), session_pair(kind, small, small) as (ca, cb):

            async def stream_maker():
                return await open_pair(a, b)

            async def clog(stream, conn):
                while True:
                    await trio.testing.wait_all_tasks_blocked()
                    if not conn.writable(stream.stream_id) or conn.send_blocked(stream.stream_id):
                        return  # send_all would wait now
                    room = small.send_queue_limit - conn.queued_bytes(stream.stream_id)
                    await stream.send_all(b"x" * room)

            async def clogged_stream_maker():
                # Clogged both ways: trio's checks also use the pair flipped.
                s1, s2 = await open_pair(ca, cb)
                await clog(s1, ca.connection)
                await clog(s2, cb.connection)
                return s1, s2

            await trio.testing.check_half_closeable_stream(stream_maker, clogged_stream_maker)

    run(main, timeout=60)


# ---------------------------------------------------------------------- data paths


@pytest.mark.parametrize("kind", KINDS)
def test_large_transfer_both_ways(kind):
    """16 MiB each way on one stream at once, checked with sha256."""
    size = 16 * 1024 * 1024
    up = os.urandom(size)
    down = os.urandom(size)

    async def main():
        async with session_pair(kind) as (a, b):
            s1, s2 = await open_pair(a, b, {"target": "bulk"})
            got = {}

            async def send(stream, data):
                view = memoryview(data)
                for offset in range(0, len(data), 1 << 20):
                    await stream.send_all(view[offset:offset + (1 << 20)])
                await stream.send_eof()

            async def receive(stream, key):
                digest = hashlib.sha256()
                total = 0
                while True:
                    data = await stream.receive_some(256 * 1024)
                    if not data:
                        break
                    digest.update(data)
                    total += len(data)
                got[key] = (total, digest.hexdigest())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, s1, up)
                nursery.start_soon(send, s2, down)
                nursery.start_soon(receive, s2, "up")
                nursery.start_soon(receive, s1, "down")
            assert got["up"] == (size, hashlib.sha256(up).hexdigest())
            assert got["down"] == (size, hashlib.sha256(down).hexdigest())
            assert s1.finished and s2.finished
            await s1.aclose()
            await s2.aclose()
            assert a.streams == {} and b.streams == {}

    run(main, timeout=120)


@pytest.mark.parametrize("kind", KINDS)
def test_200_concurrent_streams_echo(kind):
    async def main():
        async with session_pair(kind, server_handler=echo) as (a, b):
            results = {}

            async def one(n):
                payload = os.urandom(1000 + 97 * n)
                stream = await a.open_stream({"n": n})
                async with trio.open_nursery() as nursery:

                    async def send():
                        await stream.send_all(payload)
                        await stream.send_eof()

                    nursery.start_soon(send)
                    results[n] = (await receive_all(stream)) == payload
                await stream.aclose()

            async with trio.open_nursery() as nursery:
                for n in range(200):
                    nursery.start_soon(one, n)
            assert len(results) == 200 and all(results.values())
            assert a.streams == {}
            with trio.fail_after(5):  # the server finishes its ends too
                while b.streams:
                    await trio.sleep(0.01)

    run(main, timeout=60)


@pytest.mark.parametrize("kind", KINDS)
def test_backpressure_stalled_reader(kind):
    """A reader that stops reading stops the sender: memory stays bounded by the window
    plus the send queue limit, and the transfer resumes when reading resumes."""
    config = MuxConfig(initial_window=64 * 1024, send_queue_limit=128 * 1024)
    payload = os.urandom(4 * 1024 * 1024)

    async def main():
        async with session_pair(kind, config, config) as (a, b):
            s1, s2 = await open_pair(a, b)
            done = trio.Event()

            async def send():
                await s1.send_all(payload)
                await s1.send_eof()
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                await trio.sleep(0.3)  # nobody reads s2: the sender must stall
                await trio.testing.wait_all_tasks_blocked()
                assert not done.is_set()
                assert s2._buffered <= config.initial_window
                assert b.connection.buffered_received <= config.initial_window
                assert a.connection.queued_bytes(s1.stream_id) <= config.send_queue_limit
                # still stalled a while later: no window was granted without reading
                before = s2._buffered
                await trio.sleep(0.2)
                assert s2._buffered == before and not done.is_set()
                data = await receive_all(s2)
            assert done.is_set()
            assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()

    run(main)


@pytest.mark.parametrize("kind", KINDS)
def test_stalled_readers_hold_only_their_windows_at_the_sender(kind):
    """Writers sending 1 MiB each to readers that never read: the sender's core queues at
    most each stream's window plus one slice, not ``send_queue_limit`` per stream
    (before, 20 stalled streams held 20 MiB here; 1,000 would hold 1 GB)."""
    config = MuxConfig(initial_window=16 * 1024)  # send_queue_limit: the default 1 MiB
    payload = bytes(1024 * 1024)

    async def main():
        async with session_pair(kind, config, config) as (a, b):
            pairs = [await open_pair(a, b) for _ in range(20)]
            async with trio.open_nursery() as nursery:
                for s1, _ in pairs:
                    nursery.start_soon(s1.send_all, payload)
                await trio.sleep(0.3)
                await trio.testing.wait_all_tasks_blocked()
                queued = [a.connection.queued_bytes(s1.stream_id) for s1, _ in pairs]
                assert max(queued) <= SEND_SLICE, queued  # the window itself has left
                assert b.connection.buffered_received == 20 * config.initial_window
                # A reader that resumes gets everything, the others stay stalled.
                data = await receive_all_n(pairs[0][1], len(payload))
                assert data == payload
                nursery.cancel_scope.cancel()

    run(main)


async def receive_all_n(stream: MuxStream, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        received += await stream.receive_some()
    return bytes(received)


@pytest.mark.parametrize("kind", KINDS)
def test_reset_propagates_as_broken_resource(kind):
    async def main():
        async with session_pair(kind) as (a, b):
            s1, s2 = await open_pair(a, b)
            await s1.send_all(b"hello")
            assert await s2.receive_some() == b"hello"
            s2.reset(ErrorCode.CONNECT_FAILED, "upstream went away")
            with pytest.raises(trio.BrokenResourceError) as info:
                while True:  # the reset arrives after the session loops ran
                    await s1.receive_some()
            assert isinstance(info.value, StreamResetError)
            assert info.value.error_code == ErrorCode.CONNECT_FAILED
            assert info.value.message == "upstream went away" and info.value.remote
            with pytest.raises(StreamResetError):
                await s1.send_all(b"more")
            with pytest.raises(StreamResetError):  # this side: reset locally
                await s2.receive_some()
            await s1.aclose()
            with pytest.raises(trio.ClosedResourceError):  # closed wins over broken
                await s1.send_all(b"x")
            # the session itself is unaffected
            t1, t2 = await open_pair(b, a)
            await t1.send_all(b"still fine")
            assert await t2.receive_some() == b"still fine"

    run(main)


def test_opens_past_the_receive_budget_are_refused_streams():
    """As in asyncio: with room for 4 streams in the budget, the 5th open is refused
    (TOO_MANY_STREAMS) without reaching the wire; room comes back when one ends."""
    small = MuxConfig(initial_window=16 * 1024, session_window=64 * 1024)

    async def main():
        async with session_pair("memory", small, None, server_handler=echo) as (a, b):
            streams = [await a.open_stream({}) for _ in range(4)]
            with pytest.raises(StreamRefused) as info:
                await a.open_stream({})
            assert info.value.error_code == ErrorCode.TOO_MANY_STREAMS
            assert "budget" in info.value.message
            streams[0].reset()
            await a.open_stream({})

    run(main)


def test_refused_open_raises_with_code():
    async def handler(stream):
        if stream.metadata.get("target") == "forbidden":
            raise StreamRefused(ErrorCode.NOT_ALLOWED, "target not allowed")
        await echo(stream)

    async def main():
        async with session_pair("memory", server_handler=handler) as (a, b):
            with pytest.raises(StreamRefused) as info:
                await a.open_stream({"target": "forbidden"})
            assert info.value.error_code == ErrorCode.NOT_ALLOWED
            assert info.value.message == "target not allowed"
            stream = await a.open_stream({"target": "fine"})
            await stream.send_all(b"ok")
            await stream.send_eof()
            assert await receive_all(stream) == b"ok"

    run(main)


def test_unanswered_and_failing_handlers_do_not_end_the_session():
    async def handler(stream):
        if stream.metadata["n"] == 0:
            return  # never answers: refused
        if stream.metadata["n"] == 1:
            raise RuntimeError("boom")  # refused with INTERNAL_ERROR, logged
        await echo(stream)

    async def main():
        async with session_pair("memory", server_handler=handler) as (a, b):
            with pytest.raises(StreamRefused) as info:
                await a.open_stream({"n": 0})
            assert info.value.error_code == ErrorCode.REFUSED
            with pytest.raises(StreamRefused) as info:
                await a.open_stream({"n": 1})
            assert info.value.error_code == ErrorCode.INTERNAL_ERROR
            stream = await a.open_stream({"n": 2})
            await stream.send_all(b"alive")
            await stream.send_eof()
            assert await receive_all(stream) == b"alive"

    run(main)


def test_closing_a_reader_with_unread_data_resets_the_writer():
    async def main():
        async with session_pair("memory") as (a, b):
            s1, s2 = await open_pair(a, b)
            await s1.send_all(b"unread")
            await trio.testing.wait_all_tasks_blocked()
            await s2.aclose()
            with pytest.raises(StreamResetError) as info:
                while True:
                    await s1.send_all(b"x" * 1000)
            assert info.value.error_code == ErrorCode.CANCEL

    run(main)


# ---------------------------------------------------------------------- session level


def test_control_ping_and_session_end():
    async def main():
        async with session_pair("tcp") as (a, b):
            a.send_control({"status": "idle", "labels": ["gpu"]})
            b.send_control(["task", 1])
            assert await b.next_control() == {"status": "idle", "labels": ["gpu"]}
            assert await a.next_control() == ["task", 1]
            rtt = await a.ping()
            assert 0 <= rtt < 5
            s1, s2 = await open_pair(a, b)
            # The peer's transport goes away: every stream and waiter breaks.
            await b.transport.aclose()
            with pytest.raises(trio.BrokenResourceError):
                await s1.receive_some()
            with trio.fail_after(5):
                await a.wait_closed()
            assert isinstance(a.error, SessionClosedError)
            with pytest.raises(SessionClosedError):
                await a.open_stream()
            with pytest.raises(SessionClosedError):
                await a.accept_stream()

    run(main)


def test_graceful_aclose_waits_for_streams_then_closes():
    async def main():
        left, right = trio.testing.memory_stream_pair()
        server = TrioMuxSession(right, client=False, handler=echo)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            async with TrioMuxSession(left, client=True) as client:
                stream = await client.open_stream()
                await stream.send_all(b"last words")
                closing = trio.Event()

                async def finish_stream():
                    await closing.wait()
                    await stream.send_eof()
                    assert await receive_all(stream) == b"last words"

                nursery.start_soon(finish_stream)
                closing.set()
            # leaving the block drained the stream, sent GOAWAY and closed the transport
            assert client.is_closed and client.error.error_code == ErrorCode.NO_ERROR
            with trio.fail_after(5):
                await server.wait_closed()
            assert server.goaway_received is not None
            with pytest.raises(trio.ClosedResourceError):
                await client.open_stream()

    run(main)


def test_aclose_times_out_and_resets_streams():
    async def main():
        async with session_pair("memory") as (a, b):
            s1, s2 = await open_pair(a, b)
            await a.aclose(timeout=0.2)  # s1 never finishes: reset after the timeout
            assert a.is_closed
            with pytest.raises(trio.BrokenResourceError):
                await s1.receive_some()
            with pytest.raises(trio.BrokenResourceError):
                await s2.receive_some()

    run(main)


def test_keepalive_timeout_with_a_silent_peer():
    """A peer that never speaks is declared dead after keepalive_timeout (mock clock)."""

    async def main():
        left, right = trio.testing.memory_stream_pair()  # nothing runs on `right`
        session = TrioMuxSession(left, client=True, config=MuxConfig(keepalive_interval=1, keepalive_timeout=3))
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run)
            start = trio.current_time()
            await session.wait_closed()
        assert session.error.error_code == ErrorCode.TIMEOUT
        assert 3 <= trio.current_time() - start < 4

    run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# ---------------------------------------------------------------------- other transports


def test_over_trio_websocket():
    """A session over trio-websocket binary messages, both directions of opening."""
    from trio_websocket import open_websocket_url, serve_websocket

    payload = os.urandom(3 * 1024 * 1024)

    async def main():
        async with trio.open_nursery() as nursery:
            server_sessions = []

            async def on_request(request):
                ws = await request.accept()
                session = TrioMuxSession(WebSocketStream(ws), client=False, handler=echo)
                server_sessions.append(session)
                await session.run()

            server = await nursery.start(serve_websocket, on_request, "127.0.0.1", 0, None)
            port = server.port
            async with open_websocket_url(f"ws://127.0.0.1:{port}/agent", max_message_size=16 * 1024 * 1024) as ws:
                async with TrioMuxSession(WebSocketStream(ws), client=True, handler=echo) as session:
                    stream = await session.open_stream({"target": "echo"})

                    async def send():
                        await stream.send_all(payload)
                        await stream.send_eof()

                    nursery.start_soon(send)
                    assert await receive_all(stream) == payload
                    # the gateway side opens towards the agent too
                    back = await server_sessions[0].open_stream({"target": "agent-echo"})
                    await back.send_all(b"ping over ws")
                    await back.send_eof()
                    assert await receive_all(back) == b"ping over ws"
            nursery.cancel_scope.cancel()

    run(main)


class _AsyncioWebSocketServer(asyncio.Protocol):
    """The asyncio gateway's path for an agent: HTTP upgrade (relay.ws.handshake), then
    a MuxSession over relay.aio's WebSocketTransport."""

    def __init__(self, make_session):
        self._make_session = make_session
        self._buffer = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        import h11

        from relay.aio import WebSocketTransport
        from relay.ws.handshake import accept_response, parse_upgrade_request

        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        http = h11.Connection(h11.SERVER)
        http.receive_data(self._buffer[:end + 4])
        upgrade = parse_upgrade_request(http.next_event())
        self.transport.write(accept_response(upgrade))
        WebSocketTransport.attach(self.transport, self._make_session(), client=False, initial=self._buffer[end + 4:])


@pytest.mark.parametrize("kind", ["tcp", "websocket"])
def test_interop_with_asyncio_binding(kind):
    """A trio agent against an asyncio MuxSession (in its own thread and loop), over raw
    TCP or over WebSocket (trio-websocket client, relay.ws server): streams both ways."""
    from relay.aio import MuxSession, serve_tcp

    to_trio: queue.Queue = queue.Queue()
    stop = threading.Event()
    up = os.urandom(2 * 1024 * 1024)
    down = os.urandom(2 * 1024 * 1024)

    def asyncio_side():
        async def on_stream(stream):  # echo, reversed, so the bytes prove the round trip
            stream.accept()
            data = await stream.read()
            stream.write(data[::-1])
            await stream.drain()
            stream.write_eof()

        async def on_session(session):
            await session.wait_established()
            stream = await session.open_stream({"from": "asyncio"})
            stream.write(down)
            await stream.drain()
            stream.write_eof()
            to_trio.put(("aio got", await stream.read()))

        async def main():
            loop = asyncio.get_running_loop()
            tasks = set()
            if kind == "tcp":
                server = await serve_tcp(on_session, "127.0.0.1", 0, on_stream=on_stream)
            else:
                def make_session():
                    session = MuxSession(False, on_stream=on_stream)
                    tasks.add(loop.create_task(on_session(session)))
                    return session

                server = await loop.create_server(lambda: _AsyncioWebSocketServer(make_session), "127.0.0.1", 0)
            to_trio.put(("port", server.sockets[0].getsockname()[1]))
            await asyncio.to_thread(stop.wait, 60)
            server.close()

        try:
            asyncio.run(main())
        except BaseException as exc:  # pragma: no cover - surfaced in the trio test
            to_trio.put(("error", exc))

    thread = threading.Thread(target=asyncio_side, daemon=True)
    thread.start()

    async def take():
        # A bounded get: a thread cannot be cancelled, so it must give up by itself.
        kind, value = await trio.to_thread.run_sync(functools.partial(to_trio.get, timeout=20))
        if kind == "error":
            raise value
        return kind, value

    async def trio_echo(stream):
        stream.accept()
        data = await receive_all(stream)
        await stream.send_all(data[::-1])
        await stream.send_eof()

    async def exchange(transport):
        async with TrioMuxSession(transport, client=True, handler=trio_echo) as session:
            stream = await session.open_stream({"from": "trio"})
            async with trio.open_nursery() as nursery:

                async def send():
                    await stream.send_all(up)
                    await stream.send_eof()

                nursery.start_soon(send)
                assert await receive_all(stream) == up[::-1]
            assert await take() == ("aio got", down[::-1])

    async def main():
        what, port = await take()
        assert what == "port"
        if kind == "tcp":
            await exchange(await trio.open_tcp_stream("127.0.0.1", port))
        else:
            from trio_websocket import open_websocket_url

            url = f"ws://127.0.0.1:{port}/agent"
            async with open_websocket_url(url, max_message_size=16 * 1024 * 1024) as ws:
                await exchange(WebSocketStream(ws))

    try:
        run(main)
    finally:
        stop.set()
        thread.join(10)


def test_protocol_error_sends_goaway_then_closes():
    async def main():
        left, right = trio.testing.memory_stream_pair()
        session = TrioMuxSession(left, client=False)
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run)
            await right.send_all(b"\x09" * 64)  # frame version 9: not our protocol
            received = b""
            while chunk := await right.receive_some():  # until the session closes
                received += chunk
        # SETTINGS (type 7), then GOAWAY (type 6) carrying PROTOCOL_ERROR and the reason
        _, kind, _, _, length = struct.unpack_from(">BBHII", received, 0)
        assert kind == 7
        goaway = 12 + length
        _, kind, _, _, length = struct.unpack_from(">BBHII", received, goaway)
        assert kind == 6 and goaway + 12 + length == len(received)
        _, code = struct.unpack_from(">II", received, goaway + 12)
        assert code == ErrorCode.PROTOCOL_ERROR
        assert received.endswith(b"unsupported frame version 9")
        assert session.error.error_code == ErrorCode.PROTOCOL_ERROR

    run(main)


def test_cancelled_open_resets_the_stream():
    async def main():
        async with session_pair("memory") as (a, b):
            with trio.move_on_after(0.05):
                await a.open_stream({"n": 1})  # nobody accepts on b
            incoming = await b.next_stream()
            with trio.fail_after(5):
                while incoming.reset_error is None:
                    await trio.sleep(0.01)
            assert incoming.reset_error.error_code == ErrorCode.CANCEL
            assert a.streams == {}

    run(main)


def test_session_context_manager_lets_body_errors_through_unwrapped():
    async def main():
        left, right = trio.testing.memory_stream_pair()
        peer = TrioMuxSession(right, client=False)
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.run)
            with pytest.raises(ValueError, match="from the body"):
                async with TrioMuxSession(left, client=True) as session:
                    stream = session.open_stream_nowait()
                    raise ValueError("from the body")
            assert session.is_closed
            with pytest.raises(trio.BrokenResourceError):
                await stream.send_all(b"x")
            with trio.fail_after(5):
                await peer.wait_closed()  # the abort closed the transport: the peer saw EOF

    async def never_run():
        left, right = trio.testing.memory_stream_pair()
        session = TrioMuxSession(left, client=True)
        await session.aclose()  # never ran: closes the transport, does not wait
        assert session.is_closed
        assert await right.receive_some() == b""

    run(main)
    run(never_run)


def test_incoming_stream_is_accepted_by_using_it_and_control_backpressure():
    async def main():
        async with session_pair("memory") as (a, b):
            opened = a.open_stream_nowait({"x": 1})
            await opened.send_all(b"early data")  # allowed before the answer
            incoming = await b.next_stream()
            assert not incoming.answered and incoming.metadata == {"x": 1}
            await incoming.send_all(b"reply")  # sending answers: accepted
            await opened.wait_accepted()
            assert await opened.receive_some() == b"reply"
            assert await incoming.receive_some() == b"early data"
            # Unconsumed control messages past the limit stop the reader of the transport.
            from relay.trio.session import CONTROL_QUEUE_LIMIT

            for n in range(CONTROL_QUEUE_LIMIT + 50):
                a.send_control(n)
            await trio.testing.wait_all_tasks_blocked()
            assert len(b._controls) >= CONTROL_QUEUE_LIMIT  # checked once per transport read
            await opened.send_all(b"behind the controls")
            await trio.sleep(0.2)
            assert incoming._buffered == 0  # not read from the transport yet
            assert [await b.next_control() for _ in range(CONTROL_QUEUE_LIMIT + 50)] == list(
                range(CONTROL_QUEUE_LIMIT + 50))
            assert await incoming.receive_some() == b"behind the controls"

    run(main)


def test_receive_sizes_split_and_join_frames():
    async def main():
        roomy = MuxConfig(initial_window=256 * 1024)  # all 100 kB arrive before any read
        async with session_pair("memory", roomy, roomy) as (a, b):
            s1, s2 = await open_pair(a, b)
            data = os.urandom(100_000)
            await s1.send_all(data)
            await s1.send_eof()
            await trio.testing.wait_all_tasks_blocked()
            got = []
            for size in (1, 5, 16383, 2, 40000, 1, None, 1 << 20):
                got.append(await s2.receive_some(size))
            assert [len(part) for part in got[:6]] == [1, 5, 16383, 2, 40000, 1]
            assert all(type(part) is bytes for part in got)
            assert b"".join(got) == data
            assert await s2.receive_some() == b""
            assert b.connection.buffered_received == 0  # everything read was acknowledged

    run(main)


def test_keepalive_keeps_an_idle_healthy_session_alive():
    async def main():
        config = MuxConfig(keepalive_interval=1, keepalive_timeout=3)
        async with session_pair("memory", config, config) as (a, b):
            await trio.sleep(20)  # virtual time: a PING after each second of silence, answered
            assert not a.is_closed and not b.is_closed
            s1, s2 = await open_pair(a, b)
            await s1.send_all(b"still here")
            assert await s2.receive_some() == b"still here"

    run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_aclose_refuses_opens_nobody_accepted():
    async def main():
        left, right = trio.testing.memory_stream_pair()
        server = TrioMuxSession(right, client=False)
        client = TrioMuxSession(left, client=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await nursery.start(client.run)
            pending = client.open_stream_nowait({"late": True})
            while not server._incoming:
                await trio.sleep(0.01)
            with trio.fail_after(2):  # well under the close timeout: nothing to wait for
                await server.aclose()
            with pytest.raises(StreamRefused) as info:
                await pending.wait_accepted()
            assert info.value.error_code == ErrorCode.REFUSED

    run(main)
