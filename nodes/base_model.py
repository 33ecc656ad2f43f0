"""The base-model policy of Load PiSA LoRAs: only an SD 2.x epsilon-prediction UNet (PiSA-SR is trained on 2.1-base)."""
from __future__ import annotations

from typing import Any

import torch

from ..pisa_sr.errors import PisaError
from . import compat

EXPECTED = ("PiSA-SR needs Stable Diffusion 2.1-base (512 px, epsilon prediction), e.g. "
            "v2-1_512-ema-pruned.safetensors loaded with Load Checkpoint.")


def check_sd2_eps(model: Any) -> None:
    """Refuse anything that is not an SD 2.x epsilon-prediction UNet with the stock noise schedule."""
    if (cfg := compat.model_config(model)) is None:
        raise PisaError(f"the MODEL input is not a diffusion model. {EXPECTED}")
    name = type(cfg).__name__
    unet = getattr(cfg, "unet_config", {}) or {}
    if name != "SD20":
        kind = {"SD15": "an SD 1.x", "SDXL": "an SDXL", "SDXLRefiner": "an SDXL refiner"}.get(name, f"a {name}")
        raise PisaError(f"the connected model is {kind} checkpoint. {EXPECTED}")
    if unet.get("adm_in_channels") is not None:
        raise PisaError(f"the connected model is an SD 2.x unCLIP checkpoint. {EXPECTED}")
    if unet.get("in_channels", 4) != 4:
        raise PisaError(f"the connected model is an SD 2.x inpainting/depth checkpoint "
                        f"({unet.get('in_channels')} input channels). {EXPECTED}")
    if unet.get("context_dim") != 1024 or not unet.get("use_linear_in_transformer", False):
        raise PisaError(f"the connected model is not an SD 2.x UNet. {EXPECTED}")
    if (mtype := compat.model_type(model)) != compat.ModelType.EPS:
        raise PisaError(f"the connected model predicts {getattr(mtype, 'name', '?')} "
                        f"(e.g. SD 2.1 768-v is v-prediction). {EXPECTED}")
    ms = model.get_model_object("model_sampling")
    kinds = compat.model_sampling
    if not isinstance(ms, kinds.EPS) or isinstance(ms, kinds.V_PREDICTION) \
            or not isinstance(ms, kinds.ModelSamplingDiscrete):
        raise PisaError(f"the model's sampling was changed to {type(ms).__name__} (e.g. by a ModelSampling node). "
                        f"Connect the model straight from Load Checkpoint. {EXPECTED}")
    # Same class but other sigmas (ModelSamplingDiscrete with zsnr, a changed schedule): t=1 would mean another sigma.
    try:
        stock = kinds.ModelSamplingDiscrete(cfg).sigmas
    except (TypeError, AttributeError):  # another constructor on this ComfyUI version: keep the class checks only
        stock = ms.sigmas
    if ms.sigmas.shape != stock.shape or not torch.allclose(ms.sigmas.float().cpu(), stock.float().cpu(), rtol=1e-4,
                                                            atol=1e-6):
        raise PisaError("the model's noise schedule was changed (e.g. a ModelSamplingDiscrete node with zsnr). "
                        f"Connect the model straight from Load Checkpoint. {EXPECTED}")


FP8_DTYPES = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
              if hasattr(torch, n)}


def check_weight_dtype(model: Any) -> None:
    """Refuse fp8-stored UNet weights: rounding the merged LoRA into fp8 moved eps by as much as eps itself on the
    test models (docs/errors.md), so the result would be silently wrong."""
    if compat.weight_dtype(model) in FP8_DTYPES:
        raise PisaError("the UNet is stored in fp8 (UNETLoader weight_dtype fp8_*), which is too coarse to hold "
                        "PiSA-SR's LoRAs. Load it with weight_dtype default, or use Load Checkpoint.")
