"""The PiSA MODEL as the core sampler needs it: ``unet(x) -> eps`` at t = 1, in the chosen precision."""
from __future__ import annotations

from typing import Any

import torch

from ..pisa_sr.checks import check_choice
from ..pisa_sr.errors import PisaError
from ..pisa_sr.runtime import bf16_native
from . import compat
from .compat import compute_dtype

EPS_CAPTURE_KEY = "pisa_sr_eps"
DTYPE_CLONES_KEY = "pisa_sr_dtype_clones"
MAX_TILES_PER_CALL = 8  # a 96x96 latent tile already fills a GPU; more tiles per call only add peak memory
PRECISIONS: dict[str, torch.dtype | None] = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16,
                                             "fp32": torch.float32}


def sigma_t1(model: Any) -> torch.Tensor:
    ms = model.get_model_object("model_sampling")
    return ms.sigma(torch.tensor([1.0])).float().reshape(1)


def unet_eps_t1(model: Any, z: torch.Tensor, context: torch.Tensor, sigma: torch.Tensor, *,
                eager: bool = False) -> torch.Tensor:
    """eps = unet(z, t=1, context) in fp32 through ``apply_model`` (wrappers, patches and casting are ComfyUI's).

    ``x = z*sqrt(1+sigma^2)`` undoes apply_model's c_in. eps is captured by an outermost DIFFUSION_MODEL wrapper:
    recovering it from ``x - sigma*eps`` (the fallback) would divide fp32 rounding by sigma (0.04), 25x the error.
    ``eager``: bypass TorchCompileModel's compiled UNet. Calls with the sem-removal hooks need it: dynamo does not
    guard on module hooks, so a graph traced without them would silently serve a hooked call (and vice versa).
    """
    dev = model.load_device
    s = sigma.to(dev, torch.float32).expand(z.shape[0])
    x = z.to(dev, torch.float32) * torch.sqrt(1.0 + s * s).reshape(-1, 1, 1, 1)
    captured: list[torch.Tensor] = []

    def capture(executor, *args, **kwargs):
        y = executor(*args, **kwargs)
        captured.append(y)
        return y

    topts = compat.options_with_outer_unet_wrapper(model, EPS_CAPTURE_KEY, capture, eager=eager)
    out = compat.apply_model(model, x, s, context.to(dev), topts)
    if len(captured) == 1 and captured[0].shape == z.shape:
        return captured[0].float()
    return (x - out.float()) / s.reshape(-1, 1, 1, 1)


class _DtypeClones(dict):
    """dtype -> compute-dtype clone, attached to the MODEL: a stable clone per dtype spares a queued prompt from
    re-applying every LoRA; a clone of the MODEL starts empty, so no cached clone stands in for other patches."""

    def on_model_patcher_clone(self) -> "_DtypeClones":
        return _DtypeClones()


def with_compute_dtype(model: Any, dtype: torch.dtype) -> Any:
    """A cached clone of ``model`` computing in ``dtype`` via manual-cast ops (the ModelComputeDtype node's way):
    weights stay stored as loaded, LoRAs merged, and are cast layer by layer."""
    cache = compat.attachment(model, DTYPE_CLONES_KEY)
    if not isinstance(cache, _DtypeClones):
        cache = _DtypeClones()
        compat.attach(model, DTYPE_CLONES_KEY, cache)
    if dtype not in cache:
        clone = model.clone()
        clone.set_model_compute_dtype(dtype)
        cache[dtype] = clone
    return cache[dtype]


def model_for_precision(model: Any, precision: str) -> Any:
    """``model`` itself for auto (or when it already computes in that dtype), else a cached compute-dtype clone."""
    check_choice("precision", precision, PRECISIONS)
    dtype = PRECISIONS[precision]
    if dtype is None or dtype == compute_dtype(model):
        return model
    if dtype == torch.bfloat16 and not bf16_native(model.load_device):
        raise PisaError(f"{model.load_device} has no native bf16 (emulated it is slow or unsupported). Use auto, "
                        "fp16 or fp32.")
    return with_compute_dtype(model, dtype)


def per_item_memory(model: Any, shape: list[int]) -> tuple[int, int]:
    """(fixed, per-item) bytes of a UNet call on ``shape`` with batch n = ``fixed + n * per_item``: the slope between
    batch 1 and 2, so a constant term counts once per call, not per tile (0.3.75's and the newest are linear)."""
    one = compat.memory_required(model, list(shape))
    per = max(compat.memory_required(model, [2 * shape[0], *shape[1:]]) - one, 1)
    return max(one - per, 0), per


def tiles_per_call_for(model: Any, tile_shape: list[int], passes: int) -> int:
    """As many tiles per UNet call as free memory allows (at least 1, at most MAX_TILES_PER_CALL)."""
    fixed, per_tile = per_item_memory(model, [passes] + tile_shape[1:])
    free = compat.free_memory(model)
    return max(1, min(MAX_TILES_PER_CALL, int((0.8 * free - fixed) // per_tile)))
