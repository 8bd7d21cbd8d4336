"""Suite-wide fixtures and the guard that the accelerated run really is accelerated."""
from __future__ import annotations

import os

import pytest

import relay
from relay import _ext

pytest_plugins = ["tests.support.servers", "tests.support.store_fixtures"]

PURE = bool(os.environ.get("RELAY_NO_EXTENSIONS"))


def pytest_report_header(config) -> str:
    mode = "pure Python (RELAY_NO_EXTENSIONS=1)" if PURE else "compiled extensions"
    return f"relay: {mode}; modules: {_ext.LOADED}"


@pytest.fixture(scope="session", autouse=True)
def _implementation_in_use() -> None:
    """Fail every test if the run is not using the implementation it claims to test."""
    if PURE:
        assert not relay.EXTENSIONS, f"RELAY_NO_EXTENSIONS=1 but compiled code loaded: {_ext.LOADED}"
    else:
        assert relay.EXTENSIONS, (
            f"compiled extensions are not in use ({_ext.LOADED}); build them with "
            "scripts/bootstrap or set RELAY_NO_EXTENSIONS=1 to test the pure-Python twin"
        )
