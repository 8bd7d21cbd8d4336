"""The accelerated run uses compiled code for every hot path; the pure run uses none."""
from __future__ import annotations

import importlib
import importlib.machinery
import os
from pathlib import Path

import pytest

import relay
from relay import _ext, ws
from relay.mux import frames

PURE = bool(os.environ.get("RELAY_NO_EXTENSIONS"))


def _is_compiled(module_name: str) -> bool:
    module = importlib.import_module(module_name)
    return any(module.__file__.endswith(suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def test_every_twin_selected_as_the_mode_demands() -> None:
    assert set(_ext.LOADED) == {"relay.mux._codec", "relay.ws._framing", *_ext.COMPILED_SOURCES}
    assert all(loaded is not PURE for loaded in _ext.LOADED.values()), _ext.LOADED
    assert relay.EXTENSIONS is not PURE


def test_codec_objects_come_from_the_selected_module() -> None:
    expected = "relay.mux._codec_py" if PURE else "relay.mux._codec"
    assert frames.FrameDecoder.__module__ == expected
    assert frames.COMPILED is not PURE
    assert ws.COMPILED is not PURE


def test_compiled_modules_are_real_extension_modules() -> None:
    if PURE:
        assert not _is_compiled("relay.mux._codec_py")
    else:
        assert _is_compiled("relay.mux._codec")
        assert _is_compiled("relay.ws._framing")


def test_core_compiled_from_its_source_only_in_the_accelerated_run() -> None:
    """The core's modules are their own twins: the extension built from the .py (typed by
    the .pxd) in the accelerated run, the .py itself, found by relay._ext's finder past
    the extension beside it, in the pure run."""
    from relay.mux.connection import MuxConnection
    from relay.mux.flow import ReceiveWindow
    from relay.mux.stream import Stream

    for name in _ext.COMPILED_SOURCES:
        assert _is_compiled(name) is not PURE, name
    # Compiled, the classes are extension types with typed fields: no instance __dict__,
    # and a C integer field refuses what is not an integer.
    window = ReceiveWindow(1024)
    if PURE:
        window.credit = "not checked"
    else:
        with pytest.raises(TypeError):
            window.credit = "not an int"
        with pytest.raises(AttributeError):
            MuxConnection(True).no_such_field = 1
    assert Stream(1, True, 10, window).recv is window


def test_compiled_core_is_not_older_than_its_source() -> None:
    """An edited core source with a stale extension beside it would silently test old
    code in the accelerated run: scripts/bootstrap rebuilds when the sources change."""
    if PURE:
        pytest.skip("the pure run uses the sources themselves")
    for name in _ext.COMPILED_SOURCES:
        module = importlib.import_module(name)
        built = Path(module.__file__)
        for source in (built.parent / (name.rpartition(".")[2] + suffix) for suffix in (".py", ".pxd")):
            assert built.stat().st_mtime >= source.stat().st_mtime, (
                f"{built.name} is older than {source.name}: rebuild with BOOTSTRAP_FORCE=1 scripts/bootstrap")
