"""What the host lends a long computation (progress, interruption), the pack's one out-of-memory test, the one
way to widen to float64, and what a device natively computes, as plain functions so the core runs the same under
ComfyUI and in a bare test."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")

# Lower-cased message shapes of an out-of-memory RuntimeError, by who raises it: CUDA/ROCm ("CUDA/HIP out of
# memory", also torch.AcceleratorError's), Apple ("MPS backend out of memory"), Intel ("XPU out of memory", Level
# Zero's UR_RESULT_ERROR_OUT_OF_DEVICE_MEMORY), DirectML ("... not enough GPU video memory available!"), the host
# allocator ("DefaultCPUAllocator: can't allocate memory" / "not enough memory").
_OOM_MESSAGES = ("out of memory", "out_of_device_memory", "not enough gpu video memory", "defaultcpuallocator:")


def is_oom(exc: BaseException) -> bool:
    """Device or host out-of-memory, whatever the backend: torch's OutOfMemoryError, MemoryError, or a RuntimeError
    shaped like one (``error_code`` 2 is cudaErrorMemoryAllocation on a torch.AcceleratorError)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and (getattr(exc, "error_code", None) == 2 or any(
        s in str(exc).lower() for s in _OOM_MESSAGES))


def retry_oom(attempt: Callable[[], T], shrink: Callable[[], None], empty_cache: Callable[[], None]) -> T:
    """``attempt()``, retried after each out-of-memory error once ``empty_cache()`` ran and ``shrink()`` made the next
    try smaller (it logs what it changed, or raises PisaError when nothing is left to shrink). The failed try's
    exception is dropped first: its traceback holds that try's activations. Other errors pass through."""
    while True:
        try:
            return attempt()
        except Exception as e:
            if not is_oom(e):
                raise
            del e
        empty_cache()
        shrink()


def host64(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float64 on the CPU, moved first and widened there: the pack's only way to make float64 (MPS has
    none, DirectML/XPU may lack it, consumer GPUs run it at 1/32..1/64 speed). tests/host/test_devices.py holds it."""
    return t.detach().to("cpu").to(torch.float64)


def bf16_native(device: torch.device | str) -> bool:
    """Whether ``device`` (a model's load_device, not the current CUDA device) computes bf16 natively, emulation not
    counted: CUDA from compute capability 8 (Ampere), ROCm on CDNA2+/RDNA3+, MPS and others when a bf16 matmul runs
    there (macOS 14+), the CPU always (torch implements every op in bf16 there)."""
    d = torch.device(device)
    if d.type == "cpu":
        return True
    if d.type == "cuda":
        if torch.version.hip:  # torch answers True for every ROCm card
            arch = getattr(torch.cuda.get_device_properties(d), "gcnArchName", "")
            return arch.startswith(("gfx908", "gfx90a", "gfx94", "gfx95", "gfx11", "gfx12"))
        return torch.cuda.get_device_properties(d).major >= 8
    try:
        x = torch.ones(2, 2, dtype=torch.bfloat16, device=d)
        return bool((x @ x).float().sum().item() == 8.0)
    except (RuntimeError, TypeError):
        return False


@dataclass(frozen=True)
class Hooks:
    progress: Callable[[int, int], None] | None = None  # (done, total) after each unit of work
    check_interrupt: Callable[[], None] | None = None  # raises to stop; called before each unit
    empty_cache: Callable[[], None] = lambda: None  # after an out-of-memory error, before retrying
