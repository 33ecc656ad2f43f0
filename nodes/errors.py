"""The one place a refusal gets its node's name: the core raises PisaError without knowing which node called it."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from ..pisa_sr.errors import PisaError

F = TypeVar("F", bound=Callable)


def names_refusals(node: str) -> Callable[[F], F]:
    """Decorator for a node's ``execute``: a PisaError raised inside reads ``"<node>: <message>"``, same type."""
    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except PisaError as e:
                raise type(e)(f"{node}: {e}") from None
        return wrapper  # type: ignore[return-value]
    return deco
