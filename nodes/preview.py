"""Before/after previews for PiSA Tiled VAE Decode: the result (``images``) and the resized LQ (``pisa_lq``) as
small temp images, which web/pisa_sr.js draws with a slider. They never change the IMAGE or fail the node.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch
import torch.nn.functional as F

from . import compat
from .lq_info import LQInfo

log = logging.getLogger("PiSA-SR")

PREVIEW_MAX_SIDE = 1024  # larger results are downscaled for the preview only (cheap to save and to send)
LQ_KEY = "pisa_lq"


def resize_bhwc(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B,H,W,C] float in [0,1] to ``size`` (h, w); area-averaged when shrinking, bilinear when enlarging."""
    if tuple(img.shape[1:3]) == tuple(size):
        return img
    x = img.movedim(-1, 1).to(torch.float32)
    if size[0] <= x.shape[-2] and size[1] <= x.shape[-1]:
        x = F.interpolate(x, size=size, mode="area")
    else:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0, 1).movedim(1, -1)


def comparison_images(result: torch.Tensor, info: LQInfo | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(result preview, LQ preview or None), both [B,h,w,3] float at the same preview size."""
    h, w = result.shape[1:3]
    s = min(1.0, PREVIEW_MAX_SIDE / max(h, w))
    size = (max(1, round(h * s)), max(1, round(w * s)))
    res = resize_bhwc(result.detach().cpu().to(torch.float32), size)
    if info is None:
        return res, None
    lq = info.lq_u8.detach().cpu().to(torch.float32).div(255.0)
    if lq.shape[0] != res.shape[0]:
        lq = lq[:1].expand(res.shape[0], -1, -1, -1)
    return res, resize_bhwc(lq, size)


def comparison_ui(result: torch.Tensor, info: LQInfo | None) -> dict | None:
    """The decode node's UI output, or None (logged) if the previews could not be written. One frame at a time, so a
    long batch costs one frame's preview tensors, not a second copy of the IMAGE."""
    try:
        out = {"images": []} if info is None else {"images": [], LQ_KEY: []}
        for i in range(result.shape[0]):
            one = None if info is None else replace(info, lq_u8=info.lq_u8[i:i + 1] if info.lq_u8.shape[0] > 1
                                                    else info.lq_u8)
            res, lq = comparison_images(result[i:i + 1], one)
            out["images"] += compat.preview_images(res)
            if lq is not None:
                out[LQ_KEY] += compat.preview_images(lq)
        return out
    except Exception as e:  # a preview must never cost the user their result
        log.warning("PiSA-SR: could not write the before/after preview: %s", e)
        return None
