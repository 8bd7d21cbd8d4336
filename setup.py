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

    modules = [
        Extension(name, [src], extra_compile_args=["-O3"])
        for name, src in EXTENSIONS
        if os.path.exists(src)
    ]
    return cythonize(modules, language_level=3, compiler_directives={
        "boundscheck": False, "wraparound": False, "cdivision": True,
    })


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
