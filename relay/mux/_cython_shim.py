"""What the core uses of the ``cython`` module, for running it uncompiled where Cython is
not installed: the type declarations become no-ops, exactly as Cython's own pure-Python
module makes them.

It is also what mypy sees as ``cython`` (the modules import it under ``TYPE_CHECKING``):
mypy checks the pure-Python twin, never the compiled build.
"""
from __future__ import annotations

import dataclasses as _dataclasses
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, TypeVar

compiled = False
longlong = int

_F = TypeVar("_F", bound=Callable[..., Any])


def _dataclass(**options: Any) -> Callable[[type], type]:
    """``@cython.dataclasses.dataclass(...)``: a standard-library dataclass with
    ``__slots__``, as fixed as the extension type's fields (Cython's decorator takes no
    ``slots`` option)."""
    return _dataclasses.dataclass(slots=True, **options)


if TYPE_CHECKING:
    # For mypy the decorator is the standard library's (the one above adds only
    # ``slots=True``), so it types the classes it makes as the dataclasses they are.
    import dataclasses as dataclasses
else:
    dataclasses = SimpleNamespace(dataclass=_dataclass, field=_dataclasses.field)


def locals(**declarations: Any) -> Callable[[_F], _F]:  # noqa: A001 - cython's name
    """``@cython.locals(name=type)``: a C type for a local variable when compiled."""
    return lambda function: function
