"""Build the Cython hot paths unless RELAY_NO_EXTENSIONS is set or no compiler works.

The pure-Python twins under relay/ are always installed; the compiled modules shadow
them at import time (see relay/_ext.py).
"""
import os

from setuptools import setup
from setuptools.command.build_ext import build_ext

EXTENSIONS = [
    ("relay.mux._codec", "ext/_codec.pyx"),
    ("relay.ws._framing", "ext/_framing.pyx"),
]
#: The core's per-message path, compiled from its own Python source: the .pxd next to
#: each file makes its classes extension types with typed fields, so the same file is
#: both the compiled module and its pure-Python twin (see relay/_ext.py).
COMPILED_SOURCES = [
    ("relay.mux.flow", "relay/mux/flow.py"),
    ("relay.mux.stream", "relay/mux/stream.py"),
    ("relay.mux.events", "relay/mux/events.py"),
    ("relay.mux.connection", "relay/mux/connection.py"),
    ("relay.binding", "relay/binding.py"),
    ("relay.aio.stream", "relay/aio/stream.py"),
    ("relay.aio.session", "relay/aio/session.py"),
    ("relay.aio.transport", "relay/aio/transport.py"),
    ("relay.gateway.http.proxy", "relay/gateway/http/proxy.py"),
    ("relay.gateway.http.tunnel_proxy", "relay/gateway/http/tunnel_proxy.py"),
    ("relay.gateway.http.traffic", "relay/gateway/http/traffic.py"),
    ("relay.gateway.web.inspector", "relay/gateway/web/inspector.py"),
    ("relay.gateway.fleet.bridge", "relay/gateway/fleet/bridge.py"),
]


class OptionalBuildExt(build_ext):
    """A failed compile leaves the pure-Python twin in charge instead of failing the install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any toolchain failure means "no extension"
            print(f"relay: building the C extensions failed ({exc}); using pure Python")

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"relay: building {ext.name} failed ({exc}); using pure Python")


def extensions():
    if os.environ.get("RELAY_NO_EXTENSIONS"):
        return []
    from Cython.Build import cythonize
    from setuptools import Extension

    def build(pairs):
        return [Extension(name, [src], extra_compile_args=["-O3"]) for name, src in pairs if os.path.exists(src)]

    hand_written = cythonize(build(EXTENSIONS), language_level=3, compiler_directives={
        "boundscheck": False, "wraparound": False, "cdivision": True,
    })
    # Python semantics kept: annotations are documentation, not C types (``data: bytes``
    # still takes a bytearray), indexing and division work as in Python, and a typed
    # variable that holds None raises instead of crashing if an edit ever dereferences it.
    # Only the .pxd declarations and ``@cython.locals`` type anything.
    from_source = cythonize(build(COMPILED_SOURCES), language_level=3, compiler_directives={
        "annotation_typing": False, "nonecheck": True,
    })
    return hand_written + from_source


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
