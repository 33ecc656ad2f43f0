"""Before/after previews for PiSA Tiled VAE Decode: the result (``images``) and the resized LQ (``pisa_lq``) as
small temp images, which web/compare.js draws with a slider. They never change the IMAGE or fail the node.

Memory: a preview is shrunk band by band (BAND_BYTES of fp32 input rows, or one output row's if more); nothing
full-size is copied. Only an input smaller than the preview in some side is enlarged whole.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .compat import ui
from .lq_info import LQInfo

log = logging.getLogger("PiSA-SR")

PREVIEW_MAX_SIDE = 1024  # larger results are downscaled for the preview only (cheap to save and to send)
BAND_BYTES = 16 << 20  # fp32 input rows shrunk at once (at least one output row's)
LQ_KEY = "pisa_lq"


def _float01(img: torch.Tensor) -> torch.Tensor:
    return img.to(torch.float32).div_(255.0) if img.dtype == torch.uint8 else img.to(torch.float32)


def resize_bhwc(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B,H,W,C] float in [0,1] or uint8 -> float [B,h,w,C] at ``size`` (h, w): area when shrinking, else bilinear."""
    h_in, w_in = img.shape[1:3]
    if (h_in, w_in) == tuple(size):
        return _float01(img)
    if size[0] > h_in or size[1] > w_in:
        x = _float01(img).movedim(-1, 1)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return x.clamp(0, 1).movedim(1, -1)
    return _shrink(img, size)


def _shrink(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """F.interpolate's area mode (output row i averages input rows [i*H//h, ceil((i+1)*H/h)), columns likewise), a
    band at a time: columns first, then rows. Equal to the whole-image call up to fp32 rounding (mean of means)."""
    (h_in, w_in), (h, w) = img.shape[1:3], size
    out = torch.empty((img.shape[0], h, w, img.shape[3]), dtype=torch.float32)
    rows = max(1, BAND_BYTES // (w_in * img.shape[3] * 4) * h // h_in)  # output rows per band
    for i0 in range(0, h, rows):
        i1 = min(h, i0 + rows)
        a0, b1 = i0 * h_in // h, -(-i1 * h_in // h)
        band = _float01(img[:, a0:b1]).movedim(-1, 1)
        cols = F.adaptive_avg_pool2d(band, (b1 - a0, w)).movedim(1, -1)  # rows kept, columns averaged
        for i in range(i0, i1):
            out[:, i] = cols[:, i * h_in // h - a0:-(-(i + 1) * h_in // h) - a0].mean(1)
        del band, cols  # before the next band is made
    return out.clamp_(0, 1)


def preview_size(h: int, w: int) -> tuple[int, int]:
    s = min(1.0, PREVIEW_MAX_SIDE / max(h, w))
    return max(1, round(h * s)), max(1, round(w * s))


def comparison_images(result: torch.Tensor, info: LQInfo | None,
                      first: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(result preview, LQ preview or None) at one preview size; result frame k's LQ is latent frame ``first + k``."""
    size = preview_size(*result.shape[1:3])
    res = resize_bhwc(result.detach().cpu(), size)
    if info is None:
        return res, None
    lq = [resize_bhwc(info.frame_u8(first + k).cpu(), size) for k in range(result.shape[0])]
    return res, lq[0] if len(lq) == 1 else torch.cat(lq)


def preview_images(images: torch.Tensor) -> list:
    """Save ``images`` [B,H,W,3] as temp previews; the UI entries a node returns to show them."""
    return ui.PreviewImage(images).values


def comparison_ui(result: torch.Tensor, info: LQInfo | None) -> dict | None:
    """The decode node's UI output, or None (logged) if the previews could not be written; a frame at a time, so a
    long batch costs one frame's preview tensors."""
    try:
        out = {"images": []} if info is None else {"images": [], LQ_KEY: []}
        for i in range(result.shape[0]):
            res, lq = comparison_images(result[i:i + 1], info, i)
            out["images"] += preview_images(res)
            if lq is not None:
                out[LQ_KEY] += preview_images(lq)
        return out
    except Exception as e:  # a preview must never cost the user their result
        log.warning("PiSA-SR: could not write the before/after preview: %s", e)
        return None
