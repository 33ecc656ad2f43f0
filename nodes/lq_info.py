"""What Encode LQ stores in the LATENT for the decoder: the resized LQ (colour reference) and the size plan."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..pisa_sr.resize import ResizePlan

LATENT_KEY = "pisa_sr"


@dataclass(frozen=True)
class LQInfo:
    lq_u8: torch.Tensor  # [B,H,W,3] uint8 at the model size: the release's colour-fix source
    plan: ResizePlan

    def lq_float_bchw(self, index: int) -> torch.Tensor:
        """Frame ``index`` ([1,3,H,W] float in [0, 1]); a one-frame LQ serves every index."""
        i = index if self.lq_u8.shape[0] > 1 else 0
        return self.lq_u8[i:i + 1].to(torch.float32).div(255.0).movedim(-1, 1)


def lq_info_of(latent: dict[str, Any]) -> LQInfo | None:
    info = latent.get(LATENT_KEY) if isinstance(latent, dict) else None
    return info if isinstance(info, LQInfo) else None
