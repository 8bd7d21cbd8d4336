"""Two MuxConnections in memory against two h2 connections, same workloads, same run.

* bulk: one stream, 64 MiB in 64 KiB writes, receiver acknowledging every frame;
* messages: 1 KiB messages spread round-robin over 100 streams;
* memory: bytes per idle open stream with 10,000 streams on one connection.
"""
from __future__ import annotations

import gc
import tracemalloc

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from relay.mux.connection import MuxConnection
from relay.mux.events import DataReceived, StreamOpened

BULK = 64 * 1024 * 1024
CHUNK = 64 * 1024
MESSAGES = 20000
MESSAGE = b"m" * 1024
STREAMS = 100
WINDOW = 256 * 1024  # our default initial stream window; h2 is raised to it
SESSION_WINDOW = 64 * 1024 * 1024


# ---------------------------------------------------------------- relay.mux


def _mux_pair():
    a, b = MuxConnection(client=True), MuxConnection(client=False)
    b.receive_data(a.data_to_send())
    a.receive_data(b.data_to_send())
    return a, b


def _mux_open(a, b, count):
    ids = [a.open_stream({"n": i}) for i in range(count)]
    for event in b.receive_data(a.data_to_send()):
        if isinstance(event, StreamOpened):
            b.accept_stream(event.stream_id)
    a.receive_data(b.data_to_send())
    return ids


def _mux_pump(a, b, expected):
    """Move a's output to b until b has received ``expected`` bytes, acknowledging all."""
    received = 0
    while received < expected:
        out = a.data_to_send(256 * 1024)
        if out:
            for event in b.receive_data(out):
                if type(event) is DataReceived:
                    received += event.flow_controlled_length
                    b.acknowledge_received_data(event.stream_id, event.flow_controlled_length)
        back = b.data_to_send()
        if back:
            a.receive_data(back)
        elif not out:
            raise AssertionError("mux stalled")
    return received


def mux_bulk():
    a, b = _mux_pair()
    (sid,) = _mux_open(a, b, 1)
    sent = received = 0
    while received < BULK:
        while sent < BULK and a.writable(sid) and a.queued_bytes(sid) < WINDOW:
            a.send_data(sid, b"x" * CHUNK)
            sent += CHUNK
        received += _mux_pump(a, b, min(WINDOW, BULK - received))
    return received


def mux_messages():
    a, b = _mux_pair()
    ids = _mux_open(a, b, STREAMS)
    received = 0
    batch = STREAMS * 10
    for start in range(0, MESSAGES, batch):
        for i in range(start, min(start + batch, MESSAGES)):
            a.send_data(ids[i % STREAMS], MESSAGE)
        received += _mux_pump(a, b, (min(start + batch, MESSAGES) - start) * len(MESSAGE))
    return received


# ---------------------------------------------------------------- h2


def _h2_pair():
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    for conn in (client, server):
        conn.local_settings = h2.settings.Settings(client=conn.config.client_side, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100000,
        })
        conn.initiate_connection()
        conn.increment_flow_control_window(SESSION_WINDOW - 65535)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    return client, server


def _h2_open(client, server, count):
    ids = []
    for _ in range(count):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, [(":method", "POST"), (":path", "/"), (":scheme", "http"), (":authority", "x")])
        ids.append(sid)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    return ids


def _h2_pump(client, server, expected):
    received = 0
    while received < expected:
        out = client.data_to_send()
        if out:
            for event in server.receive_data(out):
                if isinstance(event, h2.events.DataReceived):
                    received += event.flow_controlled_length
                    server.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        back = server.data_to_send()
        if back:
            client.receive_data(back)
        elif not out:
            raise AssertionError("h2 stalled")
    return received


def h2_bulk():
    client, server = _h2_pair()
    (sid,) = _h2_open(client, server, 1)
    received = 0
    frame = client.max_outbound_frame_size
    while received < BULK:
        window = min(client.local_flow_control_window(sid), BULK - received)
        data = b"x" * CHUNK
        sent = 0
        while sent < window:
            n = min(frame, window - sent)
            client.send_data(sid, data[:n])
            sent += n
        received += _h2_pump(client, server, sent)
    return received


def h2_messages():
    client, server = _h2_pair()
    ids = _h2_open(client, server, STREAMS)
    received = 0
    batch = STREAMS * 10
    for start in range(0, MESSAGES, batch):
        for i in range(start, min(start + batch, MESSAGES)):
            client.send_data(ids[i % STREAMS], MESSAGE)
        received += _h2_pump(client, server, (min(start + batch, MESSAGES) - start) * len(MESSAGE))
    return received


# ---------------------------------------------------------------- benchmarks


@pytest.mark.parametrize("name,run", [("relay.mux", mux_bulk), ("h2", h2_bulk)])
def test_bulk_one_stream(benchmark, record_rate, name, run):
    received = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    assert received == BULK
    record_rate(benchmark, "bulk, one stream", name, BULK / 1e6, "MB/s")


@pytest.mark.parametrize("name,run", [("relay.mux", mux_messages), ("h2", h2_messages)])
def test_messages_100_streams(benchmark, record_rate, name, run):
    received = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    assert received == MESSAGES * len(MESSAGE)
    record_rate(benchmark, "1 KiB messages, 100 streams", name, MESSAGES, "msgs/s")


def test_memory_per_idle_stream(benchmark, record_rate):
    """Traced allocations of both endpoints with 10,000 idle open streams, per stream."""
    count = 10000

    def measure():
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        a, b = _mux_pair()
        for _ in range(0, count, 1000):
            _mux_open(a, b, 1000)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert a.open_streams == count and b.open_streams == count
        return (after - before) / count

    per_stream_both_sides = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info["bytes_per_stream_per_side"] = per_stream_both_sides / 2
    print(f"\nmemory: {per_stream_both_sides / 2:.0f} bytes per idle stream per side "
          f"({per_stream_both_sides:.0f} for both ends together)")
