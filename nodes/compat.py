"""Every ComfyUI call whose shape may change between releases lives here (checked on 0.3.75; see README for newer).

Node files import ComfyUI only through this module, so a host upgrade is fixed in one place.
"""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Any

import torch

import comfy.lora
import comfy.model_management as mm
import comfy.model_sampling as model_sampling  # noqa: F401  (the sampling classes the SD2 check compares with)
import comfy.patcher_extension
import comfy.utils
import folder_paths
from comfy.model_base import ModelType  # noqa: F401
try:  # the V3 API version this pack targets; newer releases still ship it, `latest` is the fallback
    from comfy_api.v0_0_2 import ComfyExtension, io, ui  # noqa: F401
except ImportError:  # pragma: no cover
    from comfy_api.latest import ComfyExtension, io, ui  # noqa: F401

from ..pisa_sr import runtime

MODEL_FOLDER = "pisa_sr"
LORA_EXTENSIONS = {".pkl", ".pt", ".pth", ".safetensors"}


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


def lora_folder_hint() -> str:
    """Where a LoRA file is looked for, as a user reads it: models/pisa_sr with its full path(s), or models/loras."""
    paths = folder_paths.get_folder_paths(MODEL_FOLDER) if MODEL_FOLDER in folder_paths.folder_names_and_paths else []
    return f"models/pisa_sr ({', '.join(paths) or 'not registered'}) or models/loras"


def lora_file_path(name: str) -> str | None:
    for folder in (MODEL_FOLDER, "loras"):
        try:
            p = folder_paths.get_full_path(folder, name)
        except Exception:
            p = None
        if p:
            return p
    return None


# ---------------------------------------------------------------- MODEL attachments
def attachment(model: Any, key: str) -> Any:
    getter = getattr(model, "get_attachment", None)
    return getter(key) if callable(getter) else None


def attach(model: Any, key: str, value: Any) -> None:
    model.set_attachments(key, value)


# ---------------------------------------------------------------- LoRA application
def diffusers_to_comfy_modules(model: Any) -> dict[str, str]:
    """Diffusers UNet module name -> ComfyUI module path (``diffusion_model....``), for weight-bearing modules."""
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    out = {}
    for dk, ck in mapping.items():
        if dk.endswith(".weight") and ck.endswith(".weight"):
            out[dk[: -len(".weight")]] = "diffusion_model." + ck[: -len(".weight")]
    return out


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


# ---------------------------------------------------------------- memory
# Newer-ComfyUI branches below are feature-detected, never version-compared. Upstream reference: issue 13's reading of
# ComfyUI master (comfy/model_patcher.py ModelPatcherDynamic, comfy/model_management.py, main.py). The stored index
# this pack was written against holds comfy/model_patcher.py only at e73c9170197ccbd63f202958ef8371c0299dcc5c and
# 000a21a0c1b6d300b31c27e1202d61ca787f3fac, both older than ModelPatcherDynamic: these branches were READ from the
# issue, not run. tests/test_compat_branches.py drives each with a stand-in shaped as described there.
def is_dynamic(model: Any) -> bool:
    """True for ComfyUI's dynamic-VRAM patcher (ModelPatcherDynamic.is_dynamic(); absent in 0.3.75)."""
    check = getattr(model, "is_dynamic", None)
    return bool(check()) if callable(check) else False


def load_model(model: Any, batch_shape: list[int]) -> None:
    """Claim device memory through ComfyUI's manager (applies patches, evicts other models as needed), then run the
    patcher's pre_run callbacks as ComfyUI's own samplers do before calling the UNet (0.3.75 model_patcher.py
    ModelPatcher.pre_run; the dynamic patcher binds its per-call state there)."""
    need = memory_required(model, batch_shape)
    mm.load_models_gpu([model], memory_required=need, minimum_memory_required=need)
    drop_double_lowvram_patches(model)
    pre_run = getattr(model, "pre_run", None)
    if callable(pre_run):
        pre_run()


def drop_double_lowvram_patches(model: Any) -> int:
    """Undo a double LoRA application that a repeated partial load (--lowvram) can leave; returns how many.

    0.3.75 comfy/model_patcher.py ModelPatcher.load: a module whose weight an earlier partial load merged with its
    patches (``comfy_patched_weights``; the original kept in ``backup``) can be put on the cast-time path by a later
    partial load, which then adds a LowVramPatch for the same patches on top of the merged weight: the LoRA applies
    twice (measured: eps off by 2.2 on the tiny models). The merged weight is already right, so that cast-time patch
    is dropped. Modules and patchers without these attributes (other versions) are left alone.
    """
    backup = getattr(model, "backup", None)
    if not isinstance(backup, dict) or not backup:
        return 0
    dropped = 0
    for module in model.model.modules():
        if getattr(module, "comfy_patched_weights", False) is not True:
            continue
        for attr in ("weight_function", "bias_function"):
            fns = getattr(module, attr, None)
            if not fns:
                continue
            keep = [f for f in fns if getattr(f, "key", None) not in backup]
            dropped += len(fns) - len(keep)
            setattr(module, attr, keep)
    return dropped


def memory_required(model: Any, shape: list[int]) -> int:
    try:
        return int(model.memory_required(shape))
    except Exception:
        return int(torch.Size(shape).numel() * 4 * 1024)


def per_item_memory(model: Any, shape: list[int]) -> tuple[int, int]:
    """(fixed, per-item) bytes of one UNet call on ``shape`` with batch n: ``fixed + n * per_item``.

    Taken as the slope between batch 1 and 2, so a constant pad in ``memory_required`` (the dynamic patcher adds
    1 GiB and scales by 1.3, issue 13) is counted once per call, not once per tile; 0.3.75's estimate is linear.
    """
    one = memory_required(model, [shape[0]] + list(shape[1:]))
    two = memory_required(model, [2 * shape[0]] + list(shape[1:]))
    per = max(two - one, 1)
    return max(one - per, 0), per


def free_memory(model: Any) -> int:
    """Free device memory for ``model``'s UNet. The dynamic patcher's own query counts what it can evict (issue 13);
    mm.get_free_memory (0.3.75) does not know that."""
    dev = torch.device(model.load_device)
    getter = getattr(model, "get_free_memory", None)
    if is_dynamic(model) and callable(getter):
        try:
            return int(getter(dev))
        except Exception:
            pass
    return int(mm.get_free_memory(dev))


def vae_load(vae: Any, shape: list[int], encode: bool) -> None:
    """Claim memory for the VAE through ComfyUI (its own per-pixel estimate) before touching its submodules."""
    dt = vae.vae_dtype
    need = vae.memory_used_encode(shape, dt) if encode else vae.memory_used_decode(shape, dt)
    mm.load_models_gpu([vae.patcher], memory_required=need, force_full_load=getattr(vae, "disable_offload", False))


def vae_device_context(vae: Any):
    """The context core VAE.encode/decode run in on newer ComfyUI (``mm.cuda_device_context(vae.device)``: a VAE
    placed on a second GPU); a no-op on 0.3.75, which has no such call."""
    ctx = getattr(mm, "cuda_device_context", None)
    return ctx(vae.device) if callable(ctx) else contextlib.nullcontext()


def vae_free_memory(vae: Any) -> int:
    dev = torch.device(vae.device)
    getter = getattr(vae.patcher, "get_free_memory", None)  # newer ComfyUI: counts what it could free
    if callable(getter):
        try:
            return int(getter(dev))
        except Exception:
            pass
    return int(mm.get_free_memory(dev))


# ---------------------------------------------------------------- UNet internals
def compute_dtype(model: Any) -> torch.dtype:
    """The dtype the UNet computes in: a compute-dtype override, else ComfyUI's manual cast, else the weights'."""
    base = model.model
    if "manual_cast_dtype" in model.object_patches:
        d = model.object_patches["manual_cast_dtype"]
    else:
        d = base.model_config.manual_cast_dtype  # not base.manual_cast_dtype: another clone may have patched it
    return d if d is not None else base.get_dtype()


def weight_dtype(model: Any) -> torch.dtype:
    """The dtype the UNet's weights are stored in (UNETLoader's weight_dtype; fp8 there is computed via manual cast)."""
    return model.model.get_dtype()


def options_with_outer_unet_wrapper(model: Any, key: str, wrapper) -> dict:
    """transformer_options as a sampler builds them (the MODEL's own plus its patcher wrappers, merged fresh), with
    ``wrapper`` as the outermost DIFFUSION_MODEL wrapper (it sees the diffusion model's raw output)."""
    topts = copy.copy(model.model_options.get("transformer_options", {}))
    wrappers = comfy.patcher_extension.copy_nested_dicts(topts.get("wrappers", {}))
    comfy.patcher_extension.merge_nested_dicts(wrappers, model.wrappers, copy_dict1=False)
    kind = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    others = {k: v for k, v in wrappers.get(kind, {}).items() if k != key}
    wrappers[kind] = {key: [wrapper], **others}  # first key = outermost wrapper
    topts["wrappers"] = wrappers
    return topts


def blocked(message: str) -> Any:
    """An output value that stops the nodes fed from it, which then report ``message`` (ComfyUI's ExecutionBlocker)."""
    from comfy_execution.graph_utils import ExecutionBlocker

    return ExecutionBlocker(message)


# ---------------------------------------------------------------- progress, interruption, OOM, previews
def is_oom(exc: BaseException) -> bool:
    check = getattr(mm, "is_oom", None)  # newer ComfyUI also recognises accelerator OOM errors
    if callable(check):
        try:
            if check(exc):
                return True
        except Exception:
            pass
    return isinstance(exc, mm.OOM_EXCEPTION) or runtime.is_oom(exc)


def hooks() -> runtime.Hooks:
    """ComfyUI's progress bar, interrupt check, OOM test and cache release, for the core's long loops."""
    bar = comfy.utils.ProgressBar(1)
    return runtime.Hooks(progress=lambda d, t: bar.update_absolute(d, t),
                         check_interrupt=mm.throw_exception_if_processing_interrupted, is_oom=is_oom,
                         empty_cache=mm.soft_empty_cache)


def preview_images(images: torch.Tensor) -> list:
    """Save ``images`` [B,H,W,3] as temp previews; the UI entries a node returns to show them."""
    return ui.PreviewImage(images).values


def free_ram() -> int:
    """Available host memory (what ComfyUI reports for the CPU device)."""
    return int(mm.get_free_memory(torch.device("cpu")))
