"""Stores for tests: each backend, fresh for every test, and a way to call the SQLite
store from test code that is not a coroutine.

Loaded as a pytest plugin (tests/conftest.py). ``store_url`` is parametrized over both
backends: ``sqlite`` (a file in the test's tmp_path) and ``postgresql`` (a database of
its own, created for the test in the session's private PostgreSQL, tests/support/servers.py).
A missing PostgreSQL (or asyncpg) fails those tests; it never skips them.
"""
from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from relay.gateway.store import Store, open_store
from tests.support.servers import PostgresServer

__all__ = ["BACKENDS", "PostgresDatabases", "now", "pg_databases", "pg_url", "store_url", "with_store"]

T = TypeVar("T")

#: The store backends every contract test runs against.
BACKENDS = ("sqlite", "postgresql")


def now(coro: Awaitable[T]) -> T:
    """The result of a coroutine that never waits, such as any call of the SQLite store
    (synchronous underneath), for tests that are not coroutines themselves."""
    try:
        coro.send(None)  # type: ignore[attr-defined]
    except StopIteration as stop:
        return stop.value
    coro.close()  # type: ignore[attr-defined]
    raise AssertionError("the coroutine waited: not a SQLite store call?")


class PostgresDatabases:
    """Creates empty databases in one PostgreSQL cluster, one per test."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self._names = itertools.count(1)

    def url(self, name: str) -> str:
        return f"postgresql://{self.server.user}@{self.server.host}:{self.server.port}/{name}"

    def create(self) -> str:
        """A new, empty database; its URL."""
        import asyncpg

        name = f"relay_test_{next(self._names)}"

        async def create() -> None:
            conn = await asyncpg.connect(self.server.dsn)
            try:
                await conn.execute(f"DROP DATABASE IF EXISTS {name}")
                await conn.execute(f"CREATE DATABASE {name}")
            finally:
                await conn.close()

        asyncio.run(create())
        return self.url(name)


@pytest.fixture(scope="session")
def pg_databases(postgres_server: PostgresServer) -> PostgresDatabases:
    """Database factory of the session's private PostgreSQL."""
    return PostgresDatabases(postgres_server)


@pytest.fixture
def pg_url(pg_databases: PostgresDatabases) -> str:
    """The URL of a new, empty PostgreSQL database for this test."""
    return pg_databases.create()


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store URL for this test, once per backend: a SQLite file in tmp_path, or a new
    PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path / 'store' / 'relay.db'}"
    else:
        yield request.getfixturevalue("pg_url")


def with_store(url: str, body: Callable[[Store], Awaitable[T]], **options: Any) -> T:
    """Open the store ``url`` names, ``await body(store)``, close it; from test code
    that is not a coroutine (a fresh event loop)."""

    async def run() -> T:
        store = await open_store(url, **options)
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(run())
