"""What every node shares: its menu category, and the one place a refusal gets its node's name (the core raises
PisaError without knowing which node called it)."""
from __future__ import annotations

import functools

from ..pisa_sr.errors import PisaError

CATEGORY = "image/upscaling/PiSA-SR"


def names_refusals(node: str):
    """Decorator for a node's ``execute``: a PisaError raised inside reads ``"<node>: <message>"``, same type."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except PisaError as e:
                raise type(e)(f"{node}: {e}") from None
        return wrapper
    return deco
