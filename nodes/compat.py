"""Every ComfyUI call whose shape may change between releases (checked on 0.3.75; README lists newer), so a host
upgrade is fixed in one place."""
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
# the V3 API version this pack targets; upstream: comfyanonymous/ComfyUI comfy_api/version_list.py @ 17ca834fd57c
# still lists v0_0_2 (with v0_0_3 and latest); `latest` is the fallback should it ever be dropped
try:
    from comfy_api.v0_0_2 import ComfyExtension, io, ui  # noqa: F401
except ImportError:  # pragma: no cover
    from comfy_api.latest import ComfyExtension, io, ui  # noqa: F401

from ..pisa_sr import runtime

MODEL_FOLDER = "pisa_sr"
LORA_EXTENSIONS = {".pkl", ".pt", ".pth", ".safetensors"}


# ---------------------------------------------------------------- model folder
def register_model_folder() -> None:
    """``models/pisa_sr`` for the checkpoint, merged with an entry extra_model_paths.yaml may have created."""
    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    paths, exts = folder_paths.folder_names_and_paths.get(MODEL_FOLDER, ([], set()))
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[MODEL_FOLDER] = (paths, set(exts) | LORA_EXTENSIONS)


def lora_file_choices() -> list[str]:
    """Files in models/pisa_sr, then files in models/loras whose name mentions pisa."""
    names = list(folder_paths.get_filename_list(MODEL_FOLDER))
    return names + [n for n in folder_paths.get_filename_list("loras") if n not in names
                    and "pisa" in os.path.basename(n).lower() and os.path.splitext(n)[1].lower() in LORA_EXTENSIONS]


def lora_folder_hint() -> str:
    """Where a LoRA file is looked for, as a user reads it: models/pisa_sr with its full path(s), or models/loras."""
    return f"models/pisa_sr ({', '.join(folder_paths.get_folder_paths(MODEL_FOLDER))}) or models/loras"


def lora_file_path(name: str) -> str | None:
    for folder in (MODEL_FOLDER, "loras"):
        with contextlib.suppress(Exception):
            if p := folder_paths.get_full_path(folder, name):
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
    return {dk.removesuffix(".weight"): "diffusion_model." + ck.removesuffix(".weight") for dk, ck in mapping.items()
            if dk.endswith(".weight") and ck.endswith(".weight")}


def add_lora_patches(model: Any, pairs: dict[str, Any], module_map: dict[str, str], alpha: float) -> int:
    """Patch ``model`` (a clone) through ComfyUI's own LoRA loader; returns the patched key count. Passing alpha
    makes ComfyUI's scale ``alpha / rank`` equal peft's, so the merge is the release's."""
    lora_sd: dict[str, torch.Tensor] = {}
    for name, pair in pairs.items():
        lora_sd.update({f"{name}.lora_up.weight": pair.up, f"{name}.lora_down.weight": pair.down,
                        f"{name}.alpha": torch.tensor(alpha)})
    key_map = {name: module_map[name] + ".weight" for name in pairs}
    return len(model.add_patches(comfy.lora.load_lora(lora_sd, key_map, log_missing=False), 1.0, 1.0))


# ---------------------------------------------------------------- memory
# Newer-ComfyUI branches below are feature-detected, never version-compared. Run: 0.3.75 (CPU). Read only, from the
# stored public index (one stored version per file, so the commits differ per file; none of them was run):
#   Comfy-Org/ComfyUI comfy/model_patcher.py @ 08d0e510f4e5   (ModelPatcher, ModelPatcherDynamic)
#   Comfy-Org/ComfyUI comfy/model_management.py @ 02b2b3886164 (cuda_device_context, get_free_memory)
#   Comfy-Org/ComfyUI comfy/samplers.py @ 311c01406130         (CFGGuider.outer_sample, _calc_cond_batch)
#   Comfy-Org/ComfyUI comfy/sampler_helpers.py @ 53757775fa60  (estimate_memory, prepare_sampling)
#   Comfy-Org/ComfyUI comfy/sd.py @ 033046cc4fac               (VAE.encode / VAE.decode)
#   comfyanonymous/ComfyUI main.py @ 002f2bedd6e4              (ModelPatcherDynamic becomes CoreModelPatcher on NVIDIA)
# tests/test_compat_branches.py drives each branch with a stand-in shaped like the object named in its comment.
def load_model(model: Any, batch_shape: list[int]) -> None:
    """Claim device memory through ComfyUI's manager (applies patches, evicts other models as needed). 0.3.75
    ModelPatcher.load: a later partial load (--lowvram) can add a cast-time LowVramPatch to a module whose weight an
    earlier one already merged (``comfy_patched_weights``, original in ``backup``), applying the LoRA twice (eps off
    by 2.2 on the tiny models); that patch is dropped. Patchers without ``backup`` are left alone."""
    # upstream: Comfy-Org/ComfyUI comfy/sampler_helpers.py @ 53757775fa60 (prepare_sampling calls
    # load_models_gpu(models, memory_required=, minimum_memory_required=) as 0.3.75 does; unchanged signature)
    need = memory_required(model, batch_shape)
    mm.load_models_gpu([model], memory_required=need, minimum_memory_required=need)
    if backup := getattr(model, "backup", None):
        for module in model.model.modules():
            if getattr(module, "comfy_patched_weights", False) is True:
                for attr in ("weight_function", "bias_function"):
                    if fns := getattr(module, attr, None):
                        setattr(module, attr, [f for f in fns if getattr(f, "key", None) not in backup])


@contextlib.contextmanager
def unet_session(model: Any):
    """Bracket the UNet calls as ComfyUI's sampler does: pre_run() before (binds ``model.model.current_patcher``,
    ON_PRE_RUN callbacks), cleanup() after (ON_CLEANUP callbacks)."""
    # upstream: Comfy-Org/ComfyUI comfy/samplers.py @ 311c01406130 (CFGGuider.outer_sample: pre_run() inside
    # cuda_device_context(load_device), cleanup() in its finally); the same pair in 0.3.75 without the context
    with device_context(model.load_device):
        model.pre_run()
    try:
        yield
    finally:
        model.cleanup()


def memory_required(model: Any, shape: list[int]) -> int:
    """Bytes one UNet call on ``shape`` needs, by the diffusion model's own estimate (what ComfyUI's sampler uses)."""
    # upstream: Comfy-Org/ComfyUI comfy/sampler_helpers.py @ 53757775fa60 (estimate_memory) and comfy/samplers.py
    # @ 311c01406130 (_calc_cond_batch) ask the BaseModel, not the patcher; ModelPatcherDynamic.memory_required
    # (comfy/model_patcher.py @ 08d0e510f4e5) pads that x1.3 + 1 GiB for mixed-patcher loads only. On 0.3.75
    # ModelPatcher.memory_required forwards to the same BaseModel call.
    try:
        return int(model.model.memory_required(input_shape=list(shape)))
    except Exception:
        return int(torch.Size(shape).numel() * 4 * 1024)


def per_item_memory(model: Any, shape: list[int]) -> tuple[int, int]:
    """(fixed, per-item) bytes of a UNet call on ``shape`` with batch n = ``fixed + n * per_item``: the slope between
    batch 1 and 2, so a constant term counts once per call, not per tile (0.3.75's and the newest are linear)."""
    one = memory_required(model, list(shape))
    per = max(memory_required(model, [2 * shape[0], *shape[1:]]) - one, 1)
    return max(one - per, 0), per


def patcher_free_memory(patcher: Any, device: Any) -> int:
    """Free memory on ``device`` as ``patcher`` sees it: newer ComfyUI counts what dynamic VRAM can evict."""
    # upstream: Comfy-Org/ComfyUI comfy/model_patcher.py @ 08d0e510f4e5 (ModelPatcher.get_free_memory(device) on
    # every patcher: mm.get_free_memory + comfy_aimdo's evictable VRAM); comfy/model_management.py @ 02b2b3886164
    # (its get_free_memory comment says to ask the patcher). 0.3.75 patchers have no such method.
    dev = torch.device(device)
    getter = getattr(patcher, "get_free_memory", None)
    return int(getter(dev)) if callable(getter) else int(mm.get_free_memory(dev))


def free_memory(model: Any) -> int:
    """Free device memory for ``model``'s UNet calls."""
    # upstream: Comfy-Org/ComfyUI comfy/samplers.py @ 311c01406130 (_calc_cond_batch sizes its batch with
    # model.current_patcher.get_free_memory(x_in.device))
    return patcher_free_memory(model, model.load_device)


def vae_load(vae: Any, memory_bytes: int) -> None:
    """Load the VAE through ComfyUI, claiming ``memory_bytes`` of device working memory beside its weights: ComfyUI
    unloads other models only as far as that needs."""
    # upstream: Comfy-Org/ComfyUI comfy/sd.py @ 033046cc4fac (VAE.decode/encode call load_models_gpu with
    # memory_required = memory_used_decode/encode of the whole batch, force_full_load = disable_offload)
    mm.load_models_gpu([vae.patcher], memory_required=int(memory_bytes),
                       force_full_load=getattr(vae, "disable_offload", False))


def device_context(device: Any):
    """The current-CUDA-device context newer ComfyUI runs model work in (a model on a second GPU); none on 0.3.75."""
    # upstream: Comfy-Org/ComfyUI comfy/model_management.py @ 02b2b3886164 (cuda_device_context(device): sets
    # torch.cuda's current device to a cuda device with an index, restores it after); comfy/sd.py @ 033046cc4fac
    # (VAE.encode/decode run load, batch sizing and the model inside cuda_device_context(self.device));
    # comfy/samplers.py @ 311c01406130 (sampling inside cuda_device_context(model_patcher.load_device))
    ctx = getattr(mm, "cuda_device_context", None)
    return ctx(torch.device(device)) if callable(ctx) else contextlib.nullcontext()


def vae_free_memory(vae: Any) -> int:
    # upstream: Comfy-Org/ComfyUI comfy/sd.py @ 033046cc4fac (VAE.decode/encode size batches with
    # self.patcher.get_free_memory(self.device))
    return patcher_free_memory(vae.patcher, vae.device)


# ---------------------------------------------------------------- UNet internals
def compute_dtype(model: Any) -> torch.dtype:
    """The dtype the UNet computes in: a compute-dtype override, else ComfyUI's manual cast, else the weights'."""
    # model_config's, not model.model.manual_cast_dtype: another clone may have patched that
    d = model.object_patches.get("manual_cast_dtype", model.model.model_config.manual_cast_dtype)
    return d if d is not None else model.model.get_dtype()


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


# ---------------------------------------------------------------- progress, interruption, previews
def hooks() -> runtime.Hooks:
    """ComfyUI's progress bar, interrupt check and cache release, for the core's long loops (the out-of-memory test is
    pisa_sr.runtime.is_oom: ComfyUI's counts every exception as one on DirectML)."""
    bar = comfy.utils.ProgressBar(1)
    return runtime.Hooks(progress=lambda d, t: bar.update_absolute(d, t),
                         check_interrupt=mm.throw_exception_if_processing_interrupted,
                         empty_cache=mm.soft_empty_cache)


def preview_images(images: torch.Tensor) -> list:
    """Save ``images`` [B,H,W,3] as temp previews; the UI entries a node returns to show them."""
    return ui.PreviewImage(images).values


def free_ram() -> int:
    """Available host memory (what ComfyUI reports for the CPU device)."""
    return int(mm.get_free_memory(torch.device("cpu")))


def temp_directory() -> str:
    """ComfyUI's temp directory (emptied at its start), where the tiled VAE spills maps beyond its RAM budget."""
    return folder_paths.get_temp_directory()
