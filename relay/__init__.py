"""relay: a high-performance tunnel relay.

``relay.EXTENSIONS`` is True when every compiled hot path is in use and False when the
pure-Python twins are (``RELAY_NO_EXTENSIONS=1`` or no compiler at install time).
"""
from relay import _ext
from relay.mux import frames as _frames  # noqa: F401 - loads the codec selection

__version__ = "0.1.0"


def _all_compiled() -> bool:
    try:
        from relay import ws as _ws  # noqa: F401 - loads the WebSocket framer selection
    except ImportError:
        pass
    _ext.load_compiled_sources()
    return bool(_ext.LOADED) and all(_ext.LOADED.values())


EXTENSIONS: bool = _all_compiled()
