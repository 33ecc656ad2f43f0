"""What Encode LQ stores in the LATENT for the decoder: the resized LQ (colour reference) and the size plan."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..pisa_sr.resize import ResizePlan

LATENT_KEY = "pisa_sr"


@dataclass(frozen=True)
class LQInfo:
    lq_u8: torch.Tensor  # [N,H,W,3] uint8 at the model size: the release's colour-fix source
    plan: ResizePlan
    # The reference stands for lq_u8 repeated this many times along the batch (a sweep's setting-major rows), without
    # the copies: row r is frame r % N.
    repeats: int = 1

    @property
    def batch(self) -> int:
        """The latent batch this reference belongs to; a one-frame reference (N = 1) serves any batch."""
        return self.lq_u8.shape[0] * self.repeats

    def frame_u8(self, index: int) -> torch.Tensor:
        """Frame ``index`` as a [1,H,W,3] uint8 view."""
        i = index % self.lq_u8.shape[0]
        return self.lq_u8[i:i + 1]

    def lq_float_bchw(self, index: int) -> torch.Tensor:
        """Frame ``index`` ([1,3,H,W] float in [0, 1]): one fp32 copy of the frame, a channels-last view."""
        return self.frame_u8(index).to(torch.float32).div_(255.0).movedim(-1, 1)


def lq_info_of(latent: dict[str, Any]) -> LQInfo | None:
    info = latent.get(LATENT_KEY) if isinstance(latent, dict) else None
    return info if isinstance(info, LQInfo) else None
