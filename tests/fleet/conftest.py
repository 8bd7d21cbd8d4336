"""Fixtures every fleet test module shares."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.gateway.test_faults import Targets


@pytest.fixture(scope="module")
def targets() -> Iterator[Targets]:
    """The echo, source and burst targets on 127.0.0.1 (one set per test module)."""
    running = Targets()
    try:
        yield running
    finally:
        running.close()
