"""What the core uses of the ``cython`` module, for running it uncompiled where Cython is
not installed: the type declarations become no-ops, exactly as Cython's own pure-Python
module makes them."""
from __future__ import annotations

import dataclasses as _dataclasses
from types import SimpleNamespace
from typing import Any, Callable

compiled = False
longlong = int


def _dataclass(**options: Any) -> Callable[[type], type]:
    """``@cython.dataclasses.dataclass(...)``: a standard-library dataclass with
    ``__slots__``, as fixed as the extension type's fields (Cython's decorator takes no
    ``slots`` option)."""
    return _dataclasses.dataclass(slots=True, **options)


dataclasses = SimpleNamespace(dataclass=_dataclass, field=_dataclasses.field)


def locals(**declarations: Any) -> Callable[[Callable], Callable]:  # noqa: A001 - cython's name
    """``@cython.locals(name=type)``: a C type for a local variable when compiled."""
    return lambda function: function
