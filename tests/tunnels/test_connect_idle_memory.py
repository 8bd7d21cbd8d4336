"""What an idle connection through ``relay connect`` keeps, in traced memory (issue 14:
memory per idle connection at most the hub port's).

One process holds the whole chain, on real sockets: ``relay connect``'s connector
(:class:`relay.connect.tcp.MuxConnector`, its local listener and one mux session), the
gateway's end of that session joining each stream to a stream towards the agent
(:func:`relay.gateway.fleet.bridge.join_streams`), and the agent's end, which answers
one byte and then idles. Each local connection carries one byte each way and goes idle;
the traced memory it keeps, on every end together, must stay below a bound that the
code before these cuts exceeded (per splice a future and an empty list, per join an
empty list, per receiving stream end an entry in the session's set of receiving streams
kept until the stream closed). tracemalloc sees Python objects only, not the event
loop's C buffers: this pins what the Python code keeps, not RSS (bench/e2e_connect.py
measures RSS).
"""
from __future__ import annotations

import asyncio
import gc
import socket
import tracemalloc

import pytest
import uvloop

from relay import EXTENSIONS
from relay.aio import MuxSession, connect_tcp, serve_tcp
from relay.connect.tcp import MuxConnector
from relay.gateway.fleet.bridge import join_streams

#: Bytes per idle connection, every end together. Measured on this code: 5,057 (uvloop)
#: and 5,249 (asyncio) compiled, 5,724 and 5,906 pure Python; before the cuts, 5,522
#: and 5,718 compiled, 6,229 and 6,396 pure Python.
BOUND = 5400 if EXTENSIONS else 6100

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


async def _pair(on_stream) -> tuple[MuxSession, MuxSession, asyncio.AbstractServer]:
    """A client session connected over loopback TCP to a server session."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future = loop.create_future()

    def on_session(session: MuxSession) -> None:
        if not accepted.done():
            accepted.set_result(session)

    server = await serve_tcp(on_session, "127.0.0.1", 0, on_stream=on_stream)
    client = await connect_tcp("127.0.0.1", server.sockets[0].getsockname()[1])
    server_session = await accepted
    await client.wait_established()
    await server_session.wait_established()
    return client, server_session, server


@pytest.mark.timeout(120)
@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_an_idle_connection_through_relay_connect_keeps_little(loop_name):
    count = 300

    async def main() -> float:
        loop = asyncio.get_running_loop()
        answered: list[object] = []

        def agent_stream(stream) -> None:  # the agent: one byte back, then idle
            stream.accept()

            async def answer() -> None:
                assert await stream.readexactly(1) == b"?"
                stream.write(b"!")
                await stream.drain()
                answered.append(stream)

            loop.create_task(answer())

        to_agent, agent, agent_server = await _pair(agent_stream)
        joins: list[object] = []

        def gateway_stream(incoming) -> None:  # the gateway: the bridge of a tunnel's stream
            joins.append(join_streams(incoming, to_agent.open_stream_nowait({"protocol": "tcp"})))

        connect_session, gateway, gateway_server = await _pair(gateway_stream)
        connector = MuxConnector("ws://127.0.0.1:1/tunnel/unused/tcp", mode="mux")
        connector.session = connect_session  # as run() sets it once the session is up
        listener = await loop.create_server(connector.protocol, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        # Made before measuring: the local clients are not part of relay.
        socks = [socket.socket() for _ in range(count + 20)]
        for sock in socks:
            sock.setblocking(False)

        async def one_exchange(sock: socket.socket) -> None:  # a byte each way, then idle
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, b"?")
            assert await loop.sock_recv(sock, 1) == b"!"

        try:
            for sock in socks[:20]:  # first-use allocations are not per connection
                await one_exchange(sock)
            await asyncio.sleep(0.1)
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for i in range(20, count + 20, 50):
                    await asyncio.gather(*(one_exchange(sock) for sock in socks[i:i + 50]))
                for _ in range(200):
                    if len(answered) == count + 20:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.1)
                gc.collect()
                per_connection = (tracemalloc.get_traced_memory()[0] - before) / count
            finally:
                tracemalloc.stop()
            assert len(answered) == count + 20
            assert len(joins) == count + 20
            assert connect_session.is_closed is False
            return per_connection
        finally:
            for sock in socks:
                sock.close()
            listener.close()
            connector.stop()
            for session in (connect_session, gateway, to_agent, agent):
                session.abort()
            for server in (gateway_server, agent_server):
                server.close()

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        per_connection = runner.run(main())
    print(f"traced bytes per idle connection through relay connect, every end: {per_connection:.0f}")
    assert per_connection < BOUND
