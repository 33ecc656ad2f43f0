"""Load PiSA LoRAs: read pisa_sr.pkl / .safetensors and merge both LoRA sets into a clone of the user's MODEL."""
from __future__ import annotations

import hashlib
import os
import threading

import torch

import comfy.lora
import comfy.utils
import folder_paths

from ..pisa_sr.checkpoint import CheckpointError, PisaLoras, load_bytes, read_file
from ..pisa_sr.errors import PisaError
from . import compat
from .base_model import check_sd2_eps, check_weight_dtype
from .compat import io
from .errors import CATEGORY, names_refusals
from .pisa_model import ATTACHMENT_KEY, PisaModelInfo, attached_info

NODE = "Load PiSA LoRAs"
MODEL_FOLDER = "pisa_sr"
LORA_EXTENSIONS = {".pkl", ".pt", ".pth", ".safetensors"}
_cache: dict[bytes, PisaLoras] = {}
_cache_lock = threading.Lock()


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


def lora_file_path(name: object) -> str | None:
    """The file in models/pisa_sr, else in models/loras; None if neither has it (the API can send any JSON value)."""
    if not isinstance(name, str):
        return None
    return folder_paths.get_full_path(MODEL_FOLDER, name) or folder_paths.get_full_path("loras", name)


def content_key(data: bytes) -> bytes:
    """The one identity of a LoRA file: a hash of its bytes (not its name, size or mtime)."""
    return hashlib.blake2b(data, digest_size=32).digest()


def missing_file_message(lora_name: str) -> str:
    """Why a LoRA name does not resolve here, naming the file and the folder to put it in."""
    folders = ", ".join(folder_paths.get_folder_paths(MODEL_FOLDER))
    return (f"{NODE}: '{lora_name}' is not in models/pisa_sr ({folders}) or models/loras on this ComfyUI. Download "
            "pisa_sr.pkl from the PiSA-SR release into that folder under that exact name (each Distributed worker "
            "needs its own copy).")


def read_loras(path: str) -> PisaLoras:
    """Validated LoRAs, cached by content_key: a replaced file is reloaded, a re-queued prompt skips validation."""
    data = read_file(path)
    key = content_key(data)
    with _cache_lock:
        if key not in _cache:
            loras = load_bytes(data, path)
            _cache.clear()  # one checkpoint at a time is the norm; keep memory flat
            _cache[key] = loras
        return _cache[key]


def diffusers_to_comfy_modules(model) -> dict[str, str]:
    """Diffusers UNet module name -> ComfyUI module path (``diffusion_model....``), for weight-bearing modules."""
    mapping = comfy.utils.unet_to_diffusers(compat.unet_config(model))
    return {dk.removesuffix(".weight"): "diffusion_model." + ck.removesuffix(".weight") for dk, ck in mapping.items()
            if dk.endswith(".weight") and ck.endswith(".weight")}


def add_lora_patches(model, pairs: dict, module_map: dict[str, str], alpha: float) -> int:
    """Patch ``model`` (a clone) through ComfyUI's own LoRA loader; returns the patched key count. Passing alpha
    makes ComfyUI's scale ``alpha / rank`` equal peft's, so the merge is the release's."""
    lora_sd: dict[str, torch.Tensor] = {}
    for name, pair in pairs.items():
        lora_sd.update({f"{name}.lora_up.weight": pair.up, f"{name}.lora_down.weight": pair.down,
                        f"{name}.alpha": torch.tensor(alpha)})
    key_map = {name: module_map[name] + ".weight" for name in pairs}
    return len(model.add_patches(comfy.lora.load_lora(lora_sd, key_map, log_missing=False), 1.0, 1.0))


def apply_pisa_loras(model, loras: PisaLoras):
    """A clone of ``model`` with pix and sem merged (release default mode) and the PiSA info attached."""
    if attached_info(model) is not None:
        raise PisaError("this MODEL already carries PiSA-SR LoRAs (Load PiSA LoRAs is chained twice); applying them "
                        "again would stack them. Connect Load Checkpoint's MODEL straight to this node.")
    check_sd2_eps(model)
    check_weight_dtype(model)
    module_map = diffusers_to_comfy_modules(model)
    shapes = {k: tuple(v.shape) for k, v in compat.unet_weights(model).items()}
    mismatch = "The LoRA file and the base model do not match: PiSA-SR needs Stable Diffusion 2.1-base."
    for lset in loras.sets():
        for name, pair in lset.pairs.items():
            if (target := module_map.get(name)) is None:
                raise CheckpointError(f"the {lset.kind} LoRA targets '{name}', which this UNet does not have. "
                                      + mismatch)
            if (want := shapes.get(target + ".weight")) != pair.weight_shape():
                raise CheckpointError(f"the {lset.kind} LoRA for '{name}' has shape {pair.weight_shape()} but the "
                                      f"model's weight is {want or 'missing'}. {mismatch}")
    clone = model.clone()
    for lset in loras.sets():
        n = add_lora_patches(clone, lset.pairs, module_map, loras.alpha)
        if n != len(lset.pairs):
            raise CheckpointError(f"ComfyUI accepted {n} of {len(lset.pairs)} {lset.kind} LoRA modules; the LoRA "
                                  "does not fit this model.")
    compat.attach(clone, ATTACHMENT_KEY, PisaModelInfo(loras, module_map))
    return clone


class PiSALoadLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiSA_LoadLoRAs",
            display_name=NODE,
            category=CATEGORY,
            **compat.search_aliases(),
            description="Applies PiSA-SR's pixel-level and semantic-level LoRAs to your SD 2.1-base model. The "
                        "model you connect is left untouched; the output is a patched copy.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL of Load Checkpoint with Stable Diffusion 2.1-base "
                               "(v2-1_512-ema-pruned); other families are refused."),
                io.Combo.Input("lora_name", options=lora_file_choices(),
                               tooltip="pisa_sr.pkl from the PiSA-SR release (or its .safetensors conversion), in "
                               "ComfyUI/models/pisa_sr/."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="SD 2.1-base with both PiSA-SR LoRAs; "
                                     "connect to Dual-Guided One-Step Sample.")],
        )

    @classmethod
    def validate_inputs(cls, lora_name: str) -> bool | str:
        """At queue time (POST /prompt answers 400): 0.3.75 does not check a V3 combo against its options, so a
        server without the file (a Distributed worker included) would otherwise accept the prompt and fail mid-run."""
        return True if lora_file_path(lora_name) else missing_file_message(lora_name)

    @classmethod
    def fingerprint_inputs(cls, lora_name: str, **_) -> str:
        """Keyed on the file's content, so the output cache re-runs this node when the file was replaced."""
        path = lora_file_path(lora_name)
        try:
            return content_key(read_file(path)).hex() if path else lora_name
        except PisaError:
            return lora_name  # execute refuses it with the loader's message; failures are never cached

    @classmethod
    @names_refusals(NODE)
    def execute(cls, model, lora_name) -> io.NodeOutput:
        path = lora_file_path(lora_name)
        if path is None:
            raise PisaError(missing_file_message(lora_name).removeprefix(f"{NODE}: "))
        return io.NodeOutput(apply_pisa_loras(model, read_loras(path)))
