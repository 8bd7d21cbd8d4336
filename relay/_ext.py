"""Choose between the compiled hot paths and their pure-Python twins.

``RELAY_NO_EXTENSIONS=1`` in the environment (at build or import time) selects the
pure-Python code. Two kinds of hot path exist:

* hand-written Cython (``ext/*.pyx``) with a separate Python twin: every module that
  uses one imports it through :func:`load`;
* Python modules compiled from their own source (:data:`COMPILED_SOURCES`, typed by the
  ``.pxd`` beside them): the extension module sits next to the ``.py`` under the same
  name and Python's import system prefers it; with ``RELAY_NO_EXTENSIONS`` a finder
  installed here imports the ``.py`` instead.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType
from typing import Optional, Sequence

NO_EXTENSIONS: bool = bool(os.environ.get("RELAY_NO_EXTENSIONS"))

#: Modules compiled from their own Python source when extensions are built (setup.py).
COMPILED_SOURCES: tuple[str, ...] = (
    "relay.mux.flow", "relay.mux.stream", "relay.mux.events", "relay.mux.connection",
    "relay.binding", "relay.aio.stream", "relay.aio.session", "relay.aio.transport",
    "relay.gateway.http.proxy", "relay.gateway.http.tunnel_proxy", "relay.gateway.http.traffic",
    "relay.gateway.web.inspector",
    "relay.gateway.fleet.bridge",
)

#: Names of the compiled modules actually in use, filled in as they load.
LOADED: dict[str, bool] = {}


def load(compiled: str, pure: str) -> ModuleType:
    """Import ``compiled`` unless extensions are disabled or missing; else ``pure``."""
    if not NO_EXTENSIONS:
        try:
            module = importlib.import_module(compiled)
        except ImportError:
            pass
        else:
            LOADED[compiled] = True
            return module
    LOADED[compiled] = False
    return importlib.import_module(pure)


def is_compiled(module: ModuleType) -> bool:
    """True when ``module`` was loaded from an extension module (not Python source)."""
    path = getattr(module, "__file__", None) or ""
    return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def load_compiled_sources() -> None:
    """Import the :data:`COMPILED_SOURCES` modules and note in :data:`LOADED` whether
    each came from its compiled build."""
    for name in COMPILED_SOURCES:
        LOADED[name] = is_compiled(importlib.import_module(name))


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Import the :data:`COMPILED_SOURCES` modules from their ``.py`` files even where
    a compiled build of them sits alongside (the pure-Python run)."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None
                  ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname not in COMPILED_SOURCES:
            return None
        leaf = fullname.rpartition(".")[2] + ".py"
        for entry in path or ():
            source = os.path.join(entry, leaf)
            if os.path.isfile(source):
                return importlib.util.spec_from_file_location(fullname, source)
        return None


if NO_EXTENSIONS and not any(isinstance(f, _SourceFirst) for f in sys.meta_path):
    sys.meta_path.insert(0, _SourceFirst())
