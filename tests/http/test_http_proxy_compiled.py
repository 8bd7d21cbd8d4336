"""The HTTP proxy engine is its own twin (relay/gateway/http/proxy.pxd): compiled in the
accelerated run, with extension types that keep what the rest of the gateway relies on."""
from __future__ import annotations

import asyncio
import gc
import os

import pytest

from relay import _ext
from relay.gateway.http import proxy as http_proxy
from relay.gateway.http.proxy import ProxyConnection, ProxyStats, RequestHead, Upstream

PURE = bool(os.environ.get("RELAY_NO_EXTENSIONS"))


def test_engine_compiled_only_in_the_accelerated_run() -> None:
    assert "relay.gateway.http.proxy" in _ext.COMPILED_SOURCES
    assert _ext.is_compiled(http_proxy) is not PURE


def test_connection_is_a_protocol_by_its_methods() -> None:
    """asyncio and uvloop only call a protocol's methods; the compiled class cannot
    inherit asyncio.Protocol, so neither twin does."""
    conn = ProxyConnection(lambda head: None)
    for name in ("connection_made", "data_received", "eof_received", "connection_lost",
                 "pause_writing", "resume_writing"):
        assert callable(getattr(conn, name)), name
    assert not isinstance(conn, asyncio.Protocol)


def test_stats_hold_their_clients_weakly() -> None:
    """ProxyStats.clients is a WeakSet of connections (closed when a tunnel goes away)."""
    stats = ProxyStats()
    conn = ProxyConnection(lambda head: None)
    stats.clients.add(conn)
    assert stats.as_dict()["client_connections"] == 1
    del conn
    gc.collect()
    assert stats.as_dict()["client_connections"] == 0


def test_dataclasses_keep_their_fields_and_defaults() -> None:
    upstream = Upstream(open_stream=lambda: None, key=("k", 1), target=b"/x")
    assert upstream.headers == [] and upstream.host == b"localhost" and upstream.host_override is None
    assert upstream.drop_headers == frozenset() and isinstance(upstream.stats, ProxyStats)
    assert Upstream(open_stream=None, key=1, target=b"/").headers is not upstream.headers
    stats = ProxyStats(requests=2)
    stats.fail("boom")
    assert stats.as_dict() == {"requests": 2, "active_requests": 0, "websockets": 0, "active_websockets": 0,
                               "bytes_in": 0, "bytes_out": 0, "errors": 1, "last_error": "boom",
                               "client_connections": 0}
    head = RequestHead(b"GET", b"/", b"1.1", [(b"Host", b"host", b"x")])
    assert head.headers == [(b"host", b"x")] and repr(head) == "<RequestHead b'GET' b'/'>"


def test_compiled_fields_are_typed() -> None:
    """Compiled, the engine's objects have declared fields only, and counters and flags
    are C values."""
    if PURE:
        pytest.skip("the pure run's classes are plain Python classes")
    conn = ProxyConnection(lambda head: None)
    with pytest.raises(AttributeError):
        conn.no_such_field = 1
    with pytest.raises(TypeError):
        ProxyStats().requests = "not an int"
    with pytest.raises(TypeError):
        conn._exchange = object()  # a typed reference takes its own type (or None) only
