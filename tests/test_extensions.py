"""The accelerated run uses compiled code for every hot path; the pure run uses none."""
from __future__ import annotations

import importlib.machinery
import os

import relay
from relay import _ext, ws
from relay.mux import frames

PURE = bool(os.environ.get("RELAY_NO_EXTENSIONS"))


def _is_compiled(module_name: str) -> bool:
    module = importlib.import_module(module_name)
    return any(module.__file__.endswith(suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def test_every_twin_selected_as_the_mode_demands() -> None:
    assert set(_ext.LOADED) == {"relay.mux._codec", "relay.ws._framing"}
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
