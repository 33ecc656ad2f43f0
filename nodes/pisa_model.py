"""What Load PiSA LoRAs attaches to the MODEL clone, and how the sampler turns it into bypass hooks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..pisa_sr.bypass import BypassTarget
from ..pisa_sr.checkpoint import PisaLoras
from ..pisa_sr.errors import PisaError
from . import compat

ATTACHMENT_KEY = "pisa_sr"


@dataclass(frozen=True)
class PisaModelInfo:
    """The LoRAs merged into this MODEL clone (pix + sem) and where each module lives in ComfyUI's UNet."""

    loras: PisaLoras
    module_map: dict[str, str]  # diffusers module name -> ComfyUI module path


def attached_info(model: Any) -> PisaModelInfo | None:
    info = compat.attachment(model, ATTACHMENT_KEY)
    return info if isinstance(info, PisaModelInfo) else None


def info_of(model: Any) -> PisaModelInfo:
    info = attached_info(model)
    if info is None:
        raise PisaError("this MODEL carries no PiSA-SR LoRAs. Connect it through 'Load PiSA LoRAs' "
                        "(Load Checkpoint with SD 2.1-base -> Load PiSA LoRAs -> this node).")
    return info


def sem_removal_targets(model: Any, info: PisaModelInfo) -> list[BypassTarget]:
    """Hooks that subtract the sem LoRA in the activations, turning the merged pix+sem model into pix only."""
    return [BypassTarget(compat.unet_module(model, info.module_map[name]), pair, sign=-1.0)
            for name, pair in info.loras.sem.pairs.items()]
