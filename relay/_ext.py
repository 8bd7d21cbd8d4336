"""Choose between the compiled hot paths and their pure-Python twins.

``RELAY_NO_EXTENSIONS=1`` in the environment (at build or import time) selects the
pure-Python code. Every module that has a twin imports through :func:`load`.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

NO_EXTENSIONS: bool = bool(os.environ.get("RELAY_NO_EXTENSIONS"))

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
