"""Load PiSA LoRAs: read pisa_sr.pkl / .safetensors and merge both LoRA sets into a clone of the user's MODEL."""
from __future__ import annotations

import hashlib
import threading

from ..pisa_sr.checkpoint import CheckpointError, PisaLoras, load_bytes, read_file
from ..pisa_sr.errors import PisaError
from . import compat
from .base_model import check_sd2_eps, check_weight_dtype
from .compat import io
from .errors import names_refusals
from .pisa_model import ATTACHMENT_KEY, PisaModelInfo, attached_info

NODE = "Load PiSA LoRAs"
_cache: dict[bytes, PisaLoras] = {}
_cache_lock = threading.Lock()


def read_loras(path: str) -> PisaLoras:
    """Validated LoRAs, cached by a hash of the bytes read: a replaced file is reloaded whatever its size and mtime,
    and re-queued prompts skip the validation."""
    data = read_file(path)
    key = hashlib.blake2b(data, digest_size=32).digest()
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    loras = load_bytes(data, path)
    with _cache_lock:
        _cache.clear()  # one checkpoint at a time is the norm; keep memory flat
        _cache[key] = loras
    return loras


def apply_pisa_loras(model, loras: PisaLoras, file_name: str = ""):
    """A clone of ``model`` with pix and sem merged (release default mode) and the PiSA info attached."""
    if attached_info(model) is not None:
        raise PisaError("this MODEL already carries PiSA-SR LoRAs (Load PiSA LoRAs is chained twice); applying them "
                        "again would stack them. Connect Load Checkpoint's MODEL straight to this node.")
    check_sd2_eps(model)
    check_weight_dtype(model)
    module_map = compat.diffusers_to_comfy_modules(model)
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    for lset in loras.sets():
        for name, pair in lset.pairs.items():
            target = module_map.get(name)
            if target is None:
                raise CheckpointError(
                    f"the {lset.kind} LoRA targets '{name}', which this UNet does not have. The LoRA file and the "
                    "base model do not match: PiSA-SR needs Stable Diffusion 2.1-base.")
            want = shapes.get(target + ".weight")
            if want != pair.weight_shape():
                raise CheckpointError(
                    f"the {lset.kind} LoRA for '{name}' has shape {pair.weight_shape()} but the model's weight "
                    f"is {want or 'missing'}. The LoRA file and the base model do not match: PiSA-SR needs "
                    "Stable Diffusion 2.1-base.")
    clone = model.clone()
    for lset in loras.sets():
        n = compat.add_lora_patches(clone, lset.pairs, module_map, loras.alpha)
        if n != len(lset.pairs):
            raise CheckpointError(f"ComfyUI accepted {n} of {len(lset.pairs)} {lset.kind} LoRA modules; the LoRA "
                                  "does not fit this model.")
    compat.attach(clone, ATTACHMENT_KEY, PisaModelInfo(loras, module_map, file_name))
    return clone


class PiSALoadLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiSA_LoadLoRAs",
            display_name=NODE,
            category="image/upscaling/PiSA-SR",
            description="Applies PiSA-SR's pixel-level and semantic-level LoRAs to your SD 2.1-base model. The "
                        "model you connect is left untouched; the output is a patched copy.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL of Load Checkpoint with Stable Diffusion 2.1-base "
                               "(v2-1_512-ema-pruned); other families are refused."),
                io.Combo.Input("lora_name", options=compat.lora_file_choices(),
                               tooltip="pisa_sr.pkl from the PiSA-SR release (or its .safetensors conversion), in "
                               "ComfyUI/models/pisa_sr/."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="SD 2.1-base with both PiSA-SR LoRAs; "
                                     "connect to Dual-Guided One-Step Sample.")],
        )

    @classmethod
    @names_refusals(NODE)
    def execute(cls, model, lora_name) -> io.NodeOutput:
        path = compat.lora_file_path(lora_name)
        if path is None:
            raise PisaError(f"'{lora_name}' was not found in models/pisa_sr or models/loras. Download "
                            "pisa_sr.pkl from the PiSA-SR release into ComfyUI/models/pisa_sr/ and refresh.")
        return io.NodeOutput(apply_pisa_loras(model, read_loras(path), lora_name))
