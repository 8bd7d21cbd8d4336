"""relay.aio sessions and streams over real TCP on 127.0.0.1, under asyncio and uvloop."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import random
import tracemalloc

import pytest
import uvloop

from relay.aio import (
    MuxSession,
    SessionClosedError,
    StreamRefused,
    StreamResetError,
    WebSocketTransport,
    connect_tcp,
    serve_tcp,
)
from relay.mux.connection import MuxConfig
from relay.mux.errors import ErrorCode

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request):
    """``run(async_fn, timeout)``: run a test body on a fresh loop of each kind, bounded."""
    factory = LOOPS[request.param]

    def runner(fn, timeout: float = 30.0):
        async def bounded():
            async with asyncio.timeout(timeout):
                return await fn()

        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(bounded())

    return runner


@contextlib.asynccontextmanager
async def session_pair(client_config=None, server_config=None, **server_kwargs):
    """A client MuxSession connected over loopback TCP to a server MuxSession."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future = loop.create_future()
    server = await serve_tcp(lambda s: accepted.set_result(s) if not accepted.done() else None,
                             "127.0.0.1", 0, config=server_config, **server_kwargs)
    port = server.sockets[0].getsockname()[1]
    client = await connect_tcp("127.0.0.1", port, config=client_config)
    server_session = await accepted
    try:
        await client.wait_established()
        await server_session.wait_established()
        yield client, server_session
    finally:
        client.abort()
        server_session.abort()
        server.close()
        await server.wait_closed()


async def echo_handler(stream):
    """Accept and echo until EOF, then end our side."""
    stream.accept()
    while True:
        data = await stream.read(64 * 1024)
        if not data:
            break
        stream.write(data)
        await stream.drain()
    stream.write_eof()


def test_open_accept_echo(run):
    async def main():
        seen = []

        async def handler(stream):
            seen.append(stream.metadata)
            await echo_handler(stream)

        async with session_pair(on_stream=handler) as (client, server):
            stream = await client.open_stream({"protocol": "tcp", "target": "127.0.0.1:22"})
            assert stream.stream_id % 2 == 1  # the dialling side uses odd ids
            for message in (b"hello", b"x" * 100_000, b"!"):
                stream.write(message)
                await stream.drain()
                assert await stream.readexactly(len(message)) == message
            stream.write_eof()
            assert await stream.read() == b""
            assert stream.at_eof()
            await stream.wait_closed()
            assert stream.finished
            assert seen == [{"protocol": "tcp", "target": "127.0.0.1:22"}]
            assert client.streams == {}

    run(main)


def test_opens_past_the_receive_budget_are_refused_streams(run):
    """Every open reserves its initial window from the session window: with room for 4,
    the 5th open is refused (TOO_MANY_STREAMS) without reaching the wire, and room comes
    back when a stream ends."""
    async def main():
        async def handler(stream):
            stream.accept()

        small = MuxConfig(initial_window=16 * 1024, session_window=64 * 1024)
        async with session_pair(client_config=small, on_stream=handler) as (client, server):
            streams = [await client.open_stream({}) for _ in range(4)]
            with pytest.raises(StreamRefused) as info:
                await client.open_stream({})
            assert info.value.error_code == ErrorCode.TOO_MANY_STREAMS
            assert "budget" in info.value.message
            streams[0].abort()
            assert (await client.open_stream({})).answered

    run(main)


def test_refuse_with_code_and_message(run):
    async def main():
        async def handler(stream):
            if stream.metadata.get("target") == "forbidden":
                raise StreamRefused(ErrorCode.NOT_ALLOWED, "target not allowed")
            stream.accept()

        async with session_pair(on_stream=handler) as (client, server):
            with pytest.raises(StreamRefused) as info:
                await client.open_stream({"target": "forbidden"})
            assert info.value.error_code == ErrorCode.NOT_ALLOWED
            assert info.value.message == "target not allowed"
            assert isinstance(info.value, ConnectionRefusedError)
            ok = await client.open_stream({"target": "fine"})
            assert ok.answered

    run(main)


def test_accept_and_refuse_by_id_through_next_stream(run):
    async def main():
        async with session_pair() as (client, server):
            opens = [asyncio.create_task(client.open_stream({"n": n})) for n in range(4)]
            got = []
            async for stream in server.incoming_streams():
                got.append(stream)
                if stream.metadata["n"] % 2:
                    server.refuse(stream.stream_id, ErrorCode.CONNECT_FAILED, "no")
                else:
                    assert server.accept(stream.stream_id) is stream
                if len(got) == 4:
                    break
            results = await asyncio.gather(*opens, return_exceptions=True)
            assert [type(r) is StreamRefused for r in results] == [False, True, False, True]
            assert all(r.error_code == ErrorCode.CONNECT_FAILED for r in results[1::2])
            # the server side can open towards the client as well (even ids)
            task = asyncio.create_task(client.next_stream())
            reverse = server.open_stream_nowait({"reverse": True})
            incoming = await task
            assert incoming.metadata == {"reverse": True} and reverse.stream_id % 2 == 0
            incoming.accept()
            await reverse.wait_accepted()
            reverse.write(b"ping")
            assert await incoming.readexactly(4) == b"ping"

    run(main)


def test_64mib_each_direction_at_once(run):
    size = 64 * 1024 * 1024
    upload = os.urandom(size)
    download = os.urandom(size)

    async def main():
        server_digest: asyncio.Future = asyncio.get_running_loop().create_future()

        async def send(stream, data):
            view = memoryview(data)
            for i in range(0, len(data), 256 * 1024):
                stream.write(view[i:i + 256 * 1024])
                await stream.drain()
            stream.write_eof()

        async def receive_digest(stream):
            digest = hashlib.sha256()
            total = 0
            while chunk := await stream.read(1 << 20):
                digest.update(chunk)
                total += len(chunk)
            return total, digest.hexdigest()

        async def handler(stream):
            stream.accept()
            sender = asyncio.create_task(send(stream, download))
            server_digest.set_result(await receive_digest(stream))
            await sender

        async with session_pair(on_stream=handler) as (client, server):
            stream = await client.open_stream()
            sender = asyncio.create_task(send(stream, upload))
            got = await receive_digest(stream)
            await sender
            assert got == (size, hashlib.sha256(download).hexdigest())
            assert await server_digest == (size, hashlib.sha256(upload).hexdigest())
            await stream.wait_closed()

    run(main, timeout=120)


def test_200_concurrent_echo_streams(run):
    rng = random.Random(7)
    payloads = [rng.randbytes(rng.choice([0, 1, 100, 5000, 70_000, 300_000])) for _ in range(200)]

    async def main():
        async with session_pair(on_stream=echo_handler) as (client, server):
            async def one(data):
                stream = await client.open_stream({})
                writer = asyncio.create_task(_write_all(stream, data))
                echoed = await stream.read()
                await writer
                await stream.wait_closed()
                return echoed

            results = await asyncio.gather(*(one(p) for p in payloads))
            assert results == payloads
            assert client.streams == {} and server.streams == {}
            assert client.connection.open_streams == 0

    run(main, timeout=60)


async def _write_all(stream, data, chunk=32 * 1024):
    for i in range(0, len(data), chunk):
        stream.write(data[i:i + chunk])
        await stream.drain()
    stream.write_eof()


def test_half_close_both_ways(run):
    async def main():
        async def handler(stream):
            stream.accept()
            if stream.metadata["server_first"]:
                # The server half-closes first and still reads what the client sends.
                stream.write(b"server says bye")
                stream.write_eof()
                data = await stream.read()
                assert data == b"client keeps talking" * 1000
            else:
                request = await stream.read()  # until the client's EOF
                stream.write(b"got " + str(len(request)).encode())
                stream.write_eof()

        async with session_pair(on_stream=handler) as (client, server):
            stream = await client.open_stream({"server_first": False})
            stream.write(b"a" * 300_000)
            stream.write_eof()
            with pytest.raises(RuntimeError):
                stream.write(b"late")
            assert await stream.read() == b"got 300000"
            await stream.wait_closed()

            stream = await client.open_stream({"server_first": True})
            assert await stream.read() == b"server says bye"
            assert stream.at_eof()
            for _ in range(1000):
                stream.write(b"client keeps talking")
            await stream.drain()
            stream.write_eof()
            await stream.wait_closed()
            assert stream.exception is None

    run(main)


def test_reset_both_ways(run):
    async def main():
        server_streams: asyncio.Queue = asyncio.Queue()

        def handler(stream):
            stream.accept()
            server_streams.put_nowait(stream)

        async with session_pair(on_stream=handler) as (client, server):
            # client resets: the server's pending read fails with the code and message
            stream = await client.open_stream()
            remote = await server_streams.get()
            read = asyncio.create_task(remote.read(10))
            await asyncio.sleep(0)
            stream.abort(ErrorCode.CANCEL, "user hit ctrl-c")
            with pytest.raises(StreamResetError) as info:
                await read
            assert info.value.error_code == ErrorCode.CANCEL and info.value.remote
            assert info.value.message == "user hit ctrl-c"
            with pytest.raises(ConnectionResetError):
                stream.write(b"x")
            with pytest.raises(ConnectionResetError):
                await stream.read()

            # server resets: the client's blocked drain and read fail
            stream = await client.open_stream()
            remote = await server_streams.get()
            for _ in range(100):  # the peer never reads: fill its window and our send queue
                stream.write(b"z" * 65536)
                drain = asyncio.create_task(stream.drain())
                await asyncio.sleep(0.02)
                if not drain.done():
                    break
            assert not drain.done()
            remote.abort(ErrorCode.INTERNAL_ERROR, "backend crashed")
            with pytest.raises(StreamResetError) as info:
                await drain
            assert info.value.error_code == ErrorCode.INTERNAL_ERROR
            with pytest.raises(StreamResetError):
                await stream.readexactly(1)
            await stream.wait_closed()
            # both sides forget the stream; the session is unharmed
            await asyncio.sleep(0.05)
            assert client.streams == {} and server.streams == {}
            assert await client.ping() >= 0

    run(main)


def test_peer_dies_streams_reset_promptly(run):
    async def main():
        async with session_pair(on_stream=lambda s: s.accept()) as (client, server):
            streams = [await client.open_stream() for _ in range(3)]
            reads = [asyncio.create_task(s.read(1)) for s in streams]
            pending_open = asyncio.create_task(client.next_stream())
            await asyncio.sleep(0.01)
            server._transport.abort()  # the peer's socket dies without a word
            async with asyncio.timeout(2):
                for read in reads:
                    with pytest.raises(ConnectionResetError):
                        await read
                with pytest.raises(SessionClosedError):
                    await pending_open
                await client.wait_closed()
            assert client.is_closed
            with pytest.raises(ConnectionResetError):
                await client.open_stream()

    run(main)


def test_keepalive_timeout_on_silent_peer(run):
    async def main():
        # A peer that accepts the TCP connection and never sends a byte.
        silent_peers = []
        server = await asyncio.start_server(lambda r, w: silent_peers.append(w), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        config = MuxConfig(keepalive_interval=0.05, keepalive_timeout=0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        client = await connect_tcp("127.0.0.1", port, config=config)
        stream = client.open_stream_nowait({})
        with pytest.raises(StreamResetError) as info:
            await stream.wait_accepted()
        assert info.value.error_code == ErrorCode.TIMEOUT
        await client.wait_closed()
        assert 0.15 <= loop.time() - started < 2.0
        for writer in silent_peers:
            writer.close()
        server.close()

    run(main)


def test_keepalive_keeps_idle_healthy_session_alive(run):
    async def main():
        config = MuxConfig(keepalive_interval=0.05, keepalive_timeout=0.3)
        async with session_pair(config, config, on_stream=echo_handler) as (client, server):
            stream = await client.open_stream()
            await asyncio.sleep(1.0)  # many keepalive periods with no application data
            assert not client.is_closed and not server.is_closed
            stream.write(b"still here")
            assert await stream.readexactly(10) == b"still here"

    run(main)


def test_control_messages_and_ping(run):
    async def main():
        received = []
        async with session_pair(on_control=received.append) as (client, server):
            client.send_control({"type": "status", "status": "idle"})
            server.send_control({"type": "task", "id": 1})
            assert await client.next_control() == {"type": "task", "id": 1}
            async with asyncio.timeout(2):
                while not received:
                    await asyncio.sleep(0.005)
            assert received == [{"type": "status", "status": "idle"}]
            rtt = await client.ping()
            assert 0 <= rtt < 1

    run(main)


def test_graceful_close_drains_open_streams(run):
    async def main():
        async with session_pair(on_stream=echo_handler) as (client, server):
            stream = await client.open_stream()
            stream.write(b"before close")
            client.close()
            assert not client.is_closed  # waits for the open stream
            assert await stream.readexactly(12) == b"before close"
            stream.write(b" and after")
            stream.write_eof()
            assert await stream.read() == b" and after"
            async with asyncio.timeout(2):
                await client.wait_closed()
                await server.wait_closed()
            assert server.goaway_received is not None
            assert server.goaway_received.error_code == ErrorCode.NO_ERROR

    run(main)


def test_protocol_error_sends_goaway_and_closes(run):
    async def main():
        accepted: asyncio.Future = asyncio.get_running_loop().create_future()
        server = await serve_tcp(accepted.set_result, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x09" * 64)  # frame version 9: not our protocol
        session = await accepted
        received = await reader.read()  # until the server closes
        assert received  # SETTINGS, then a GOAWAY (type 6) carrying PROTOCOL_ERROR
        assert b"unsupported frame version" in received
        await session.wait_closed()
        assert session.is_closed
        writer.close()
        server.close()

    run(main)


def test_as_streams_reader_writer(run):
    async def main():
        async def handler(stream):
            reader, writer = stream.as_streams()
            stream.accept()
            while line := await reader.readline():
                writer.write(line.upper())
                await writer.drain()
            writer.close()
            await writer.wait_closed()

        async with session_pair(on_stream=handler) as (client, server):
            stream = await client.open_stream()
            reader, writer = stream.as_streams()
            assert writer.get_extra_info("stream_id") == stream.stream_id
            assert writer.get_extra_info("peername")[0] == "127.0.0.1"
            writer.writelines([b"one\n", b"two\nthr", b"ee\n"])
            await writer.drain()
            assert await reader.readline() == b"ONE\n"
            assert await reader.readuntil(b"\n") == b"TWO\n"
            assert await reader.readexactly(6) == b"THREE\n"
            writer.write(b"tail")
            writer.write_eof()
            with pytest.raises(asyncio.IncompleteReadError) as info:
                await reader.readexactly(10)
            assert info.value.partial == b"TAIL"
            assert reader.at_eof()
            await writer.wait_closed()

    run(main)


def test_websocket_transport_carries_a_session(run):
    """Two sessions over WebSocket binary messages (the framing after the upgrade)."""

    async def main():
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future = loop.create_future()

        def server_factory():
            session = MuxSession(False, on_stream=echo_handler)
            accepted.set_result(session)
            return WebSocketTransport(session, client=False)

        server = await loop.create_server(server_factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, adapter = await loop.create_connection(
            lambda: WebSocketTransport(MuxSession(True), client=True), "127.0.0.1", port)
        client = adapter.session
        await client.wait_established()
        data = os.urandom(3 * 1024 * 1024)
        stream = await client.open_stream()
        writer = asyncio.create_task(_write_all(stream, data))
        assert await stream.read() == data
        await writer
        assert 0 <= await client.ping() < 1
        client.close()
        await client.wait_closed()
        await (await accepted).wait_closed()
        server.close()

    run(main)


def test_websocket_transport_small_and_large_messages_round_trip(run):
    """Request/response of random sizes on both sides of the server's join threshold:
    the server writes a small message as one joined buffer and a larger one as its
    parts, and every byte comes back in order either way."""
    from relay.aio.transport import JOIN_BELOW

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: WebSocketTransport(MuxSession(False, on_stream=echo_handler), client=False), "127.0.0.1", 0)
        _, adapter = await loop.create_connection(
            lambda: WebSocketTransport(MuxSession(True), client=True), "127.0.0.1", server.sockets[0].getsockname()[1])
        client = adapter.session
        stream = await client.open_stream()
        rng = random.Random(14)
        sizes = [rng.choice((1, 63, JOIN_BELOW - 40, JOIN_BELOW + 1, 3 * JOIN_BELOW)) for _ in range(200)]
        for size in sizes:
            message = os.urandom(size)
            stream.write(message)
            assert await stream.readexactly(size) == message
        stream.write_eof()
        assert await stream.read() == b""
        client.close()
        await client.wait_closed()
        server.close()

    run(main)


def test_closing_with_unread_data_gives_the_window_back(run):
    async def main():
        async def handler(stream):
            stream.accept()
            stream.write(b"u" * 200_000)
            stream.write_eof()

        # A window that holds the whole reply, so it can arrive before anything is read.
        roomy = MuxConfig(initial_window=256 * 1024)
        async with session_pair(client_config=roomy, on_stream=handler) as (client, server):
            stream = await client.open_stream()
            stream.write_eof()
            await stream.wait_closed()  # both sides ended; 200 kB still unread
            assert client.connection.buffered_received == 200_000
            assert await stream.read(1000) == b"u" * 1000
            stream.close()  # abandon the rest: the session window must not shrink for good
            assert client.connection.buffered_received == 0
            assert client.connection.open_streams == 0

            unanswered = server.open_stream_nowait({})
            incoming = await client.next_stream()
            incoming.close()  # closing an unanswered stream refuses it
            with pytest.raises(StreamRefused):
                await unanswered.wait_accepted()

    run(main)


def test_idle_streams_hold_no_queues(run):
    """Streams that carried a message each way and went idle keep no send or receive
    queue on either end (an empty deque is 760 bytes, and an idle stream held three per
    end): traced memory per idle stream, both ends together, stays below what those six
    queues alone took."""
    count = 200

    async def main():
        answered = []

        async def answer(stream):
            stream.accept()
            assert await stream.readexactly(1) == b"?"
            stream.write(b"!")
            await stream.drain()
            answered.append(stream)  # and idle from now on

        async with session_pair(on_stream=answer) as (client, _):
            async def one_exchange():
                stream = await client.open_stream({"n": 1})
                stream.write(b"?")
                await stream.drain()
                assert await stream.readexactly(1) == b"!"
                return stream

            warm = [await one_exchange() for _ in range(20)]  # first-use allocations
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                idle = [await one_exchange() for _ in range(count)]
                for _ in range(100):
                    if len(answered) == len(warm) + count:
                        break
                    await asyncio.sleep(0.01)
                gc.collect()
                per_stream = (tracemalloc.get_traced_memory()[0] - before) / count
            finally:
                tracemalloc.stop()
            assert len(answered) == len(warm) + len(idle)
            print(f"traced bytes per idle stream, both ends: {per_stream:.0f}")
            assert per_stream < 6 * 760

    run(main)
