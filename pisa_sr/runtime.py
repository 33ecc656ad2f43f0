"""What the host lends a long computation (progress, interruption, out-of-memory handling), as plain callables so
the core runs the same under ComfyUI and in a bare test."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

_HOST_OOM = ("DefaultCPUAllocator: can't allocate", "DefaultCPUAllocator: not enough memory")


def is_oom(exc: BaseException) -> bool:
    """Device out-of-memory (torch's OutOfMemoryError) or host out-of-memory (the CPU allocator's RuntimeError)."""
    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and any(s in str(exc) for s in _HOST_OOM))


@dataclass(frozen=True)
class Hooks:
    progress: Callable[[int, int], None] | None = None  # (done, total) after each unit of work
    check_interrupt: Callable[[], None] | None = None  # raises to stop; called before each unit
    is_oom: Callable[[BaseException], bool] = is_oom
    empty_cache: Callable[[], None] = lambda: None  # after an out-of-memory error, before retrying
