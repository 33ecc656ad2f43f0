"""Every ComfyUI call whose shape may change between releases lives here (checked on 0.3.75; see README for newer).

Node files import ComfyUI only through this module, so a host upgrade is fixed in one place.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch

import comfy.lora
import comfy.model_base
import comfy.model_management as mm
import comfy.model_sampling
import comfy.patcher_extension
import comfy.utils
import folder_paths
try:  # the V3 API version this pack targets; newer releases still ship it, `latest` is the fallback
    from comfy_api.v0_0_2 import ComfyExtension, io, ui  # noqa: F401
except ImportError:  # pragma: no cover
    from comfy_api.latest import ComfyExtension, io, ui  # noqa: F401

from ..pisa_sr.errors import PisaError

log = logging.getLogger("PiSA-SR")

MODEL_FOLDER = "pisa_sr"
LORA_EXTENSIONS = {".pkl", ".pt", ".pth", ".safetensors"}
ATTACHMENT_KEY = "pisa_sr"


# ---------------------------------------------------------------- model folder
def register_model_folder() -> None:
    """``models/pisa_sr`` for the checkpoint; merge with an entry extra_model_paths.yaml may have created."""
    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    entry = folder_paths.folder_names_and_paths.get(MODEL_FOLDER)
    if entry is None:
        folder_paths.folder_names_and_paths[MODEL_FOLDER] = ([default], set(LORA_EXTENSIONS))
    else:
        paths, exts = entry
        if default not in paths:
            paths.append(default)
        exts = set(exts) | LORA_EXTENSIONS
        folder_paths.folder_names_and_paths[MODEL_FOLDER] = (paths, exts)


def lora_file_choices() -> list[str]:
    """Files in models/pisa_sr, then files in models/loras whose name mentions pisa."""
    names = list(folder_paths.get_filename_list(MODEL_FOLDER))
    try:
        extra = [n for n in folder_paths.get_filename_list("loras") if "pisa" in os.path.basename(n).lower()
                 and os.path.splitext(n)[1].lower() in LORA_EXTENSIONS]
    except Exception:
        extra = []
    return names + [n for n in extra if n not in names]


def lora_file_path(name: str) -> str | None:
    for folder in (MODEL_FOLDER, "loras"):
        try:
            p = folder_paths.get_full_path(folder, name)
        except Exception:
            p = None
        if p:
            return p
    return None


# ---------------------------------------------------------------- base model checks
def check_sd2_eps(model: Any, node: str) -> None:
    """Refuse anything that is not an SD 2.x epsilon-prediction UNet (PiSA-SR is trained on SD 2.1-base)."""
    expected = ("PiSA-SR needs Stable Diffusion 2.1-base (512 px, epsilon prediction), e.g. "
                "v2-1_512-ema-pruned.safetensors loaded with Load Checkpoint.")
    base = getattr(model, "model", None)
    cfg = getattr(base, "model_config", None)
    if base is None or cfg is None:
        raise PisaError(f"{node}: the MODEL input is not a diffusion model. {expected}")
    name = type(cfg).__name__
    unet = getattr(cfg, "unet_config", {}) or {}
    if name != "SD20":
        kind = {"SD15": "an SD 1.x", "SDXL": "an SDXL", "SDXLRefiner": "an SDXL refiner"}.get(name, f"a {name}")
        raise PisaError(f"{node}: the connected model is {kind} checkpoint. {expected}")
    if unet.get("adm_in_channels") is not None:
        raise PisaError(f"{node}: the connected model is an SD 2.x unCLIP checkpoint. {expected}")
    if unet.get("in_channels", 4) != 4:
        raise PisaError(f"{node}: the connected model is an SD 2.x inpainting/depth checkpoint "
                        f"({unet.get('in_channels')} input channels). {expected}")
    if unet.get("context_dim") != 1024 or not unet.get("use_linear_in_transformer", False):
        raise PisaError(f"{node}: the connected model is not an SD 2.x UNet. {expected}")
    if getattr(base, "model_type", None) != comfy.model_base.ModelType.EPS:
        raise PisaError(f"{node}: the connected model predicts {getattr(base.model_type, 'name', '?')} "
                        f"(e.g. SD 2.1 768-v is v-prediction). {expected}")
    ms = model.get_model_object("model_sampling")
    if not isinstance(ms, comfy.model_sampling.EPS) or isinstance(ms, comfy.model_sampling.V_PREDICTION) \
            or not isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete):
        raise PisaError(f"{node}: the model's sampling was changed to {type(ms).__name__} (e.g. by a "
                        f"ModelSampling node). Connect the model straight from Load Checkpoint. {expected}")
    # Same class but other sigmas (ModelSamplingDiscrete with zsnr, a changed schedule): t=1 would mean another sigma.
    try:
        stock = comfy.model_sampling.ModelSamplingDiscrete(base.model_config)
        same = torch.allclose(ms.sigmas.float().cpu(), stock.sigmas.float().cpu(), rtol=1e-4, atol=1e-6)
    except Exception:
        same = True  # cannot build a reference schedule on this ComfyUI version: keep the class checks only
    if not same:
        raise PisaError(f"{node}: the model's noise schedule was changed (e.g. a ModelSamplingDiscrete node with "
                        f"zsnr). Connect the model straight from Load Checkpoint. {expected}")


# ---------------------------------------------------------------- LoRA application
def diffusers_to_comfy_modules(model: Any) -> dict[str, str]:
    """Diffusers UNet module name -> ComfyUI module path (``diffusion_model....``), for weight-bearing modules."""
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    out = {}
    for dk, ck in mapping.items():
        if dk.endswith(".weight") and ck.endswith(".weight"):
            out[dk[: -len(".weight")]] = "diffusion_model." + ck[: -len(".weight")]
    return out


def model_state_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.model.state_dict().items()}


def add_lora_patches(model: Any, pairs: dict[str, Any], module_map: dict[str, str], alpha: float) -> int:
    """Patch ``model`` (a clone) with low-rank pairs via ComfyUI's own LoRA loader; returns patched key count.

    Passing alpha makes ComfyUI's scale ``alpha / rank`` equal peft's, so the merge is the release's.
    """
    lora_sd: dict[str, torch.Tensor] = {}
    key_map: dict[str, str] = {}
    for name, pair in pairs.items():
        lora_sd[f"{name}.lora_up.weight"] = pair.up
        lora_sd[f"{name}.lora_down.weight"] = pair.down
        lora_sd[f"{name}.alpha"] = torch.tensor(alpha)
        key_map[name] = module_map[name] + ".weight"
    patches = comfy.lora.load_lora(lora_sd, key_map, log_missing=False)
    accepted = model.add_patches(patches, 1.0, 1.0)
    return len(accepted)


def get_module(model: Any, path: str) -> torch.nn.Module:
    return model.model.get_submodule(path)


# ---------------------------------------------------------------- UNet call
def load_model(model: Any, batch_shape: list[int]) -> None:
    """Claim device memory through ComfyUI's manager (applies patches, evicts other models as needed)."""
    try:
        need = model.memory_required(batch_shape)
    except Exception:
        need = 0
    mm.load_models_gpu([model], memory_required=need, minimum_memory_required=need)


def tile_memory(model: Any, shape: list[int]) -> int:
    try:
        return int(model.memory_required(shape))
    except Exception:
        return int(torch.Size(shape).numel() * 4 * 1024)


def free_memory(device: torch.device | None = None) -> int:
    return int(mm.get_free_memory(device or mm.get_torch_device()))


def device_of(model: Any) -> torch.device:
    return model.load_device


def sigma_t1(model: Any) -> torch.Tensor:
    ms = model.get_model_object("model_sampling")
    return ms.sigma(torch.tensor([1.0])).float().reshape(1)


EPS_CAPTURE_KEY = "pisa_sr_eps"


def unet_transformer_options(model: Any) -> dict:
    """transformer_options as a sampler builds them: the MODEL's own plus its patcher wrappers (merged fresh)."""
    topts = copy.copy(model.model_options.get("transformer_options", {}))
    wrappers = comfy.patcher_extension.copy_nested_dicts(topts.get("wrappers", {}))
    comfy.patcher_extension.merge_nested_dicts(wrappers, model.wrappers, copy_dict1=False)
    topts["wrappers"] = wrappers
    return topts


def unet_eps_t1(model: Any, z: torch.Tensor, context: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """eps = unet(z, t=1, context) through ``apply_model`` (so wrappers, patches and casting are ComfyUI's); fp32.

    apply_model scales its input by c_in = 1/sqrt(1+sigma^2); feeding ``x = z*sqrt(1+sigma^2)`` makes the UNet see
    exactly z. The UNet's raw output (eps) is taken by an outermost DIFFUSION_MODEL wrapper: recovering it from
    apply_model's ``x - sigma*eps`` would divide fp32 rounding by sigma (0.04), a 25x larger error. If a model runs
    no such wrappers, that recovery is the fallback.
    """
    base = model.model
    dev = model.load_device
    s = sigma.to(dev, torch.float32).expand(z.shape[0])
    x = z.to(dev, torch.float32) * torch.sqrt(1.0 + s * s).reshape(-1, 1, 1, 1)
    ctx = context.to(dev)
    topts = unet_transformer_options(model)
    captured: list[torch.Tensor] = []

    def capture(executor, *args, **kwargs):
        y = executor(*args, **kwargs)
        captured.append(y)
        return y

    kind = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    others = {k: v for k, v in topts["wrappers"].get(kind, {}).items() if k != EPS_CAPTURE_KEY}
    topts["wrappers"][kind] = {EPS_CAPTURE_KEY: [capture], **others}  # first key = outermost wrapper
    out = base.apply_model(x, s, c_crossattn=ctx, transformer_options=topts)
    if len(captured) == 1 and captured[0].shape == z.shape:
        return captured[0].float()
    return (x - out.float()) / s.reshape(-1, 1, 1, 1)


# ---------------------------------------------------------------- UNet precision
DTYPE_CLONES_KEY = "pisa_sr_dtype_clones"


class _DtypeClones:
    """Per-MODEL cache of compute-dtype clones (an attachment, so its lifetime is the MODEL's).

    Reusing one clone per dtype keeps ComfyUI's loaded-model entry stable between runs, so a queued prompt does not
    re-apply every LoRA patch. A clone of the MODEL gets a fresh, empty cache (``on_model_patcher_clone``), so a
    cached clone never stands in for a model with different patches.
    """

    def __init__(self) -> None:
        self.by_dtype: dict[torch.dtype, Any] = {}

    def on_model_patcher_clone(self) -> "_DtypeClones":
        return _DtypeClones()


def compute_dtype(model: Any) -> torch.dtype:
    """The dtype the UNet computes in: a compute-dtype override, else ComfyUI's manual cast, else the weights'."""
    base = model.model
    if "manual_cast_dtype" in model.object_patches:
        d = model.object_patches["manual_cast_dtype"]
    else:
        d = base.model_config.manual_cast_dtype  # not base.manual_cast_dtype: another clone may have patched it
    return d if d is not None else base.get_dtype()


def dtype_supported(model: Any, dtype: torch.dtype) -> bool:
    dev = torch.device(model.load_device)
    if dev.type == "cuda" and dtype == torch.bfloat16:
        return bool(torch.cuda.is_bf16_supported())
    return True


def with_compute_dtype(model: Any, dtype: torch.dtype) -> Any:
    """``model`` computing in ``dtype`` through ComfyUI's manual-cast ops (what the ModelComputeDtype node does).

    Weights stay stored as loaded (LoRA patches are merged into them at load, as usual) and are cast layer by layer
    to ``dtype``; activations and attention run in ``dtype``. The clone is cached on ``model``.
    """
    cache = model.get_attachment(DTYPE_CLONES_KEY)
    if not isinstance(cache, _DtypeClones):
        cache = _DtypeClones()
        model.set_attachments(DTYPE_CLONES_KEY, cache)
    clone = cache.by_dtype.get(dtype)
    if clone is None:
        clone = model.clone()
        clone.set_model_compute_dtype(dtype)
        cache.by_dtype[dtype] = clone
    return clone


def process_latent_in(model: Any, z: torch.Tensor) -> torch.Tensor:
    return model.model.process_latent_in(z)


def process_latent_out(model: Any, z: torch.Tensor) -> torch.Tensor:
    return model.model.process_latent_out(z)


# ---------------------------------------------------------------- VAE
def vae_load(vae: Any, shape: list[int], encode: bool) -> None:
    """Claim memory for the VAE through ComfyUI (its own per-pixel estimate) before touching its submodules."""
    dt = vae.vae_dtype
    need = vae.memory_used_encode(shape, dt) if encode else vae.memory_used_decode(shape, dt)
    mm.load_models_gpu([vae.patcher], memory_required=need, force_full_load=getattr(vae, "disable_offload", False))


def vae_module(vae: Any) -> torch.nn.Module:
    """The LDM-layout autoencoder (encoder/decoder/quant_conv/post_quant_conv) of an SD VAE."""
    return vae.first_stage_model


def vae_device(vae: Any) -> torch.device:
    return torch.device(vae.device)


def vae_dtype(vae: Any) -> torch.dtype:
    return vae.vae_dtype


def vae_base_channels(vae: Any) -> int:
    try:
        return int(vae.first_stage_model.decoder.conv_out.weight.shape[1])
    except AttributeError:
        return 128


def vae_free_memory(vae: Any) -> int:
    dev = vae_device(vae)
    getter = getattr(vae.patcher, "get_free_memory", None)  # newer ComfyUI: counts what it could free
    if callable(getter):
        try:
            return int(getter(dev))
        except Exception:
            pass
    return int(mm.get_free_memory(dev))


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------- progress, interruption, OOM
def progress_bar(total: int):
    return comfy.utils.ProgressBar(total)


def blocked(message: str) -> Any:
    """An output value that stops the nodes fed from it, which then report ``message`` (ComfyUI's ExecutionBlocker)."""
    from comfy_execution.graph_utils import ExecutionBlocker

    return ExecutionBlocker(message)


def throw_if_interrupted() -> None:
    mm.throw_exception_if_processing_interrupted()


def is_oom(exc: BaseException) -> bool:
    check = getattr(mm, "is_oom", None)  # newer ComfyUI also recognises accelerator OOM errors
    if callable(check):
        try:
            return bool(check(exc))
        except Exception:
            pass
    return isinstance(exc, mm.OOM_EXCEPTION)


def soft_empty_cache() -> None:
    mm.soft_empty_cache()
