"""Backpressure end to end in relay.aio: slow readers, splices to real local sockets.

Real TCP on 127.0.0.1, under asyncio and uvloop. Buffered amounts are read from the
sessions' own counters and asserted against the configured windows and queue limits.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import socket
import struct

import pytest
import uvloop

from relay.aio import StreamSplice, connect_stream_to, connect_tcp, serve_tcp
from relay.mux.connection import MuxConfig

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
#: Small limits make the bounds visible: 64 KiB windows, 128 KiB send queues.
WINDOW = 64 * 1024
QUEUE_LIMIT = 128 * 1024
CHUNK = 16 * 1024


def small_config() -> MuxConfig:
    # max_window == initial_window: auto-tuning must not move the bound under test.
    return MuxConfig(initial_window=WINDOW, max_window=WINDOW, send_queue_limit=QUEUE_LIMIT)


@pytest.fixture(params=sorted(LOOPS))
def run(request):
    factory = LOOPS[request.param]

    def runner(fn, timeout: float = 30.0):
        async def bounded():
            async with asyncio.timeout(timeout):
                return await fn()

        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(bounded())

    return runner


@contextlib.asynccontextmanager
async def session_pair(config=None, **server_kwargs):
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future = loop.create_future()
    server = await serve_tcp(accepted.set_result, "127.0.0.1", 0, config=config, **server_kwargs)
    client = await connect_tcp("127.0.0.1", server.sockets[0].getsockname()[1], config=config)
    server_session = await accepted
    try:
        await client.wait_established()
        yield client, server_session
    finally:
        client.abort()
        server_session.abort()
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def local_server(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def echo_connection(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()


async def fill_until_drain_blocks(stream, data: bytes) -> int:
    """Write ``data`` in chunks until ``drain`` stays blocked; returns bytes written."""
    written = 0
    while written < len(data):
        stream.write(data[written:written + CHUNK])
        written += CHUNK
        try:
            await asyncio.wait_for(stream.drain(), 0.1)
        except TimeoutError:
            return written
    raise AssertionError("drain never blocked although nothing is read")


def test_stalled_reader_blocks_writer_with_bounded_buffers(run):
    data = os.urandom(8 * 1024 * 1024)

    async def main():
        streams: asyncio.Queue = asyncio.Queue()

        def handler(stream):
            stream.accept()
            streams.put_nowait(stream)

        async with session_pair(small_config(), on_stream=handler) as (client, server):
            stream = await client.open_stream()
            remote = await streams.get()
            written = await fill_until_drain_blocks(stream, data)
            await asyncio.sleep(0.1)  # give any excess a chance to show up
            # Nothing beyond one window travelled, nothing beyond the queue limit waits.
            assert remote._buffered <= WINDOW
            assert server.connection.buffered_received <= WINDOW
            assert client.connection.queued_bytes(stream.stream_id) <= QUEUE_LIMIT + CHUNK
            assert written <= WINDOW + QUEUE_LIMIT + CHUNK
            # The reader resumes: the writer unblocks and every byte arrives in order.
            writer = asyncio.create_task(_write_rest(stream, data, written))
            received = await remote.read()
            await writer
            assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()

    run(main)


async def _write_rest(stream, data, start):
    for i in range(start, len(data), CHUNK):
        stream.write(data[i:i + CHUNK])
        await stream.drain()
    stream.write_eof()


def test_one_stalled_stream_does_not_block_others(run):
    async def main():
        streams: asyncio.Queue = asyncio.Queue()

        def handler(stream):
            stream.accept()
            streams.put_nowait(stream)

        async with session_pair(small_config(), on_stream=handler) as (client, server):
            stalled = await client.open_stream()
            await streams.get()  # never read
            await fill_until_drain_blocks(stalled, os.urandom(4 * 1024 * 1024))
            busy = await client.open_stream()
            busy_remote = await streams.get()
            data = os.urandom(4 * 1024 * 1024)
            writer = asyncio.create_task(_write_rest(busy, data, 0))
            assert await busy_remote.read() == data
            await writer

    run(main)


def test_splice_to_local_echo_server_32mib(run):
    data = os.urandom(32 * 1024 * 1024)

    async def main():
        async with local_server(echo_connection) as port:
            splices = []

            async def handler(stream):  # the agent's job: connect the stream to a local port
                splices.append(await connect_stream_to(stream, "127.0.0.1", port))

            async with session_pair(on_stream=handler) as (client, server):
                stream = await client.open_stream({"target": f"127.0.0.1:{port}"})
                writer = asyncio.create_task(_write_rest(stream, data, 0))
                digest = hashlib.sha256()
                total = 0
                while chunk := await stream.read(1 << 20):
                    digest.update(chunk)
                    total += len(chunk)
                await writer
                assert total == len(data)
                assert digest.digest() == hashlib.sha256(data).digest()
                await stream.wait_closed()
                await splices[0].wait_closed()

    run(main, timeout=60)


def test_finished_splices_leave_no_reference_cycle(run):
    """A connection spliced to a stream, once both have ended, is freed by reference
    counting: no stream/splice cycle is left for the cyclic collector, whose pauses every
    connection in flight would wait out (a hub port serves one such pair per connection)."""
    from relay.aio.stream import MuxStream

    async def main():
        async with local_server(echo_connection) as port:
            splices: list = []

            async def handler(stream):
                splices.append(await connect_stream_to(stream, "127.0.0.1", port))

            async with session_pair(on_stream=handler) as (client, server):
                gc.collect()
                gc.disable()
                try:
                    for i in range(20):
                        stream = await client.open_stream({"target": f"127.0.0.1:{port}"})
                        stream.write(b"ping %d" % i)
                        stream.write_eof()
                        assert await stream.read() == b"ping %d" % i
                        await stream.wait_closed()
                        for _ in range(200):  # the handler's task appends once connected
                            if splices:
                                break
                            await asyncio.sleep(0.01)
                        await splices.pop().wait_closed()
                    del stream
                    for _ in range(200):  # each connection_lost ran: the server's streams finished
                        if not server._streams:
                            break
                        await asyncio.sleep(0.01)
                    assert not server._streams
                    gc.set_debug(gc.DEBUG_SAVEALL)
                    gc.collect()
                    cyclic = [o for o in gc.garbage if isinstance(o, (MuxStream, StreamSplice))]
                finally:
                    gc.set_debug(0)
                    gc.garbage.clear()
                    gc.enable()
                assert cyclic == []

    run(main)


def test_splice_connect_failure_refuses_stream(run):
    async def main():
        with_closed_port = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = with_closed_port.sockets[0].getsockname()[1]
        with_closed_port.close()
        await with_closed_port.wait_closed()

        async def handler(stream):
            await connect_stream_to(stream, "127.0.0.1", port)

        async with session_pair(on_stream=handler) as (client, server):
            from relay.aio import StreamRefused
            from relay.mux.errors import ErrorCode

            with pytest.raises(StreamRefused) as info:
                await client.open_stream()
            assert info.value.error_code == ErrorCode.CONNECT_FAILED
            assert "cannot connect" in info.value.message

    run(main)


def test_slow_local_consumer_behind_splice_keeps_memory_bounded(run):
    data = os.urandom(16 * 1024 * 1024)

    async def main():
        consumer_go = asyncio.Event()
        digest_done: asyncio.Future = asyncio.get_running_loop().create_future()

        async def slow_consumer(reader, writer):
            await consumer_go.wait()  # reads nothing at first: kernel buffers fill, then ours
            digest = hashlib.sha256()
            total = 0
            while chunk := await reader.read(65536):
                digest.update(chunk)
                total += len(chunk)
                await asyncio.sleep(0)
            digest_done.set_result((total, digest.digest()))
            writer.close()

        async with local_server(slow_consumer) as port:
            splices: list[StreamSplice] = []

            async def handler(stream):
                splices.append(await connect_stream_to(stream, "127.0.0.1", port))

            config = small_config()
            async with session_pair(config, on_stream=handler) as (client, server):
                stream = await client.open_stream()
                writer = asyncio.create_task(_write_rest(stream, data, 0))
                peak_held = peak_local_buffer = peak_unacked = 0
                for _ in range(40):  # 2 s of a consumer that reads nothing
                    await asyncio.sleep(0.05)
                    if splices:
                        splice = splices[0]
                        peak_held = max(peak_held, splice._held)
                        peak_local_buffer = max(peak_local_buffer, splice.transport.get_write_buffer_size())
                        peak_unacked = max(peak_unacked, server.connection.buffered_received)
                assert not writer.done()  # the sender is held back by flow control
                assert client.connection.queued_bytes(stream.stream_id) <= QUEUE_LIMIT + CHUNK
                # The splice holds at most one window of unacknowledged bytes, and the
                # local transport's buffer at most its high-water mark plus that window.
                assert peak_unacked <= WINDOW and peak_held <= WINDOW
                high_water = splices[0].transport.get_write_buffer_limits()[1]
                assert peak_local_buffer <= high_water + WINDOW
                consumer_go.set()
                total, digest = await digest_done
                await writer
                assert total == len(data) and digest == hashlib.sha256(data).digest()

    run(main, timeout=60)


def test_splice_pauses_local_reading_when_remote_reader_stalls(run):
    """Gateway-style splice: a local client's bytes go into a stream nobody reads."""

    async def main():
        remote_streams: asyncio.Queue = asyncio.Queue()

        def handler(stream):
            stream.accept()
            remote_streams.put_nowait(stream)

        async with session_pair(small_config(), on_stream=handler) as (client, server):
            splices: list[StreamSplice] = []

            def splice_factory():  # each local connection opens one stream at once
                splice = StreamSplice(client.open_stream_nowait({"kind": "hub"}))
                splices.append(splice)
                return splice

            hub = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # port holder
            hub.close()
            hub = await asyncio.get_running_loop().create_server(splice_factory, "127.0.0.1", 0)
            port = hub.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            remote = await remote_streams.get()
            data = os.urandom(16 * 1024 * 1024)
            sent = 0
            blocked = False
            while sent < len(data):
                writer.write(data[sent:sent + 65536])
                sent += 65536
                try:
                    await asyncio.wait_for(writer.drain(), 0.2)
                except TimeoutError:
                    blocked = True
                    break
            assert blocked, "the local client was never pushed back"
            splice = splices[0]
            assert splice._reading_paused
            assert client.connection.queued_bytes(splice.stream.stream_id) <= QUEUE_LIMIT + 256 * 1024
            assert remote._buffered <= WINDOW
            # the remote reader wakes up: everything flows, then EOF crosses the splice
            consume = asyncio.create_task(remote.read())
            rest = asyncio.create_task(_finish_writer(writer, data, sent))
            received = await consume
            await rest
            assert received == data
            remote.write(b"bye")
            remote.write_eof()
            assert await reader.read() == b"bye"
            writer.close()
            await splice.wait_closed()
            hub.close()

    run(main, timeout=60)


async def _finish_writer(writer, data, start):
    for i in range(start, len(data), 65536):
        writer.write(data[i:i + 65536])
        await writer.drain()
    writer.write_eof()


def test_stream_reset_aborts_local_connection_and_local_error_resets_stream(run):
    async def main():
        local_conns: asyncio.Queue = asyncio.Queue()

        async def hold(reader, writer):  # the test drives the connection itself
            local_conns.put_nowait((reader, writer))

        async with local_server(hold) as port:
            async def handler(stream):
                await connect_stream_to(stream, "127.0.0.1", port)

            async with session_pair(on_stream=handler) as (client, server):
                # stream reset -> the local connection is aborted
                stream = await client.open_stream()
                reader, writer = await local_conns.get()
                stream.abort()
                with contextlib.suppress(ConnectionResetError):
                    assert await reader.read() == b""  # closed under it (EOF or reset)
                writer.close()
                # local connection error -> the stream is reset
                stream = await client.open_stream()
                reader, writer = await local_conns.get()
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()  # linger 0: the local socket closes with a RST
                with pytest.raises(ConnectionResetError):
                    await stream.read()
                writer.close()

    run(main)


def test_splice_sets_its_socket_limits_on_both_ends(run, tmp_path):
    """The unsent cap on every spliced socket (the gateway's hub side, the agent's target
    side) and the fixed receive buffer on the target connection, set through the
    loop's transport (uvloop hands out a stand-in socket); a Unix socket refuses the TCP
    option without breaking anything."""
    from relay.aio.stream import _TCP_NOTSENT_LOWAT, TARGET_RECEIVE_BUFFER, UNSENT_LIMIT, set_socket_option

    async def main():
        target_sides: list = []

        async def remember(reader, writer):
            target_sides.append(writer)

        target = await asyncio.start_server(remember, "127.0.0.1", 0)
        target_port = target.sockets[0].getsockname()[1]
        splices: list = []

        async def handler(stream):
            splices.append(await connect_stream_to(stream, "127.0.0.1", target_port))

        async with target, session_pair(on_stream=handler) as (client, _server):
            stream = await client.open_stream()
            for _ in range(200):
                if splices:
                    break
                await asyncio.sleep(0.01)
            [splice] = splices
            sock = splice.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT) == UNSENT_LIMIT
            # The kernel doubles what it is given (and stops autotuning it).
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * TARGET_RECEIVE_BUFFER
            stream.abort()

            path = str(tmp_path / "unix.sock")
            unix = await asyncio.start_unix_server(lambda r, w: None, path)
            async with unix:
                _, writer = await asyncio.open_unix_connection(path)
                assert set_socket_option(writer.transport, socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, 1) is False
                assert set_socket_option(writer.transport, socket.SOL_SOCKET, socket.SO_RCVBUF, 8192) is True
                writer.write(b"still fine")
                await writer.drain()
                writer.close()
            for writer in target_sides:
                writer.close()

    run(main)
