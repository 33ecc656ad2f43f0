"""What Load PiSA LoRAs attaches to the MODEL clone, and how the sampler turns it into bypass hooks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..pisa_sr.bypass import BypassTarget
from ..pisa_sr.checkpoint import PisaLoras
from ..pisa_sr.errors import PisaError
from . import compat


@dataclass(frozen=True)
class PisaModelInfo:
    """The LoRAs merged into this MODEL clone (pix + sem) and where each module lives in ComfyUI's UNet."""

    loras: PisaLoras
    module_map: dict[str, str]  # diffusers module name -> ComfyUI module path
    file_name: str


def info_of(model: Any, node: str) -> PisaModelInfo:
    info = model.get_attachment(compat.ATTACHMENT_KEY) if hasattr(model, "get_attachment") else None
    if not isinstance(info, PisaModelInfo):
        raise PisaError(f"{node}: this MODEL carries no PiSA-SR LoRAs. Connect it through 'Load PiSA LoRAs' "
                        "(Load Checkpoint with SD 2.1-base -> Load PiSA LoRAs -> this node).")
    return info


def sem_removal_targets(model: Any, info: PisaModelInfo) -> list[BypassTarget]:
    """Hooks that subtract the sem LoRA in the activations, turning the merged pix+sem model into pix only."""
    return [BypassTarget(compat.get_module(model, info.module_map[name]), pair, sign=-1.0)
            for name, pair in info.loras.sem.pairs.items()]
