"""What the core uses of the ``cython`` module, for running it uncompiled where Cython is
not installed: the type declarations become no-ops, exactly as Cython's own pure-Python
module makes them."""
from __future__ import annotations

from typing import Any, Callable

longlong = int


def locals(**declarations: Any) -> Callable[[Callable], Callable]:  # noqa: A001 - cython's name
    """``@cython.locals(name=type)``: a C type for a local variable when compiled."""
    return lambda function: function
