"""The release's LQ resizing rules, on 8-bit images through Pillow so results match it exactly.

1. If a side is below ``process_size // upscale`` (128 at x4), pre-resize so the short side reaches it; unlike the
   release (8x1024 px -> 128x16384), capped so the long side stays <= ``2 * process_size``.
2. Resize by ``upscale`` with the chosen filter (the release: Pillow's default, bicubic).
3. Lanczos *rescale* so both sides are multiples of 8 (not a crop).
The output is resized back to ``upscale x original`` only when step 1 happened; otherwise it keeps the step-3 size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .checks import check_choice
from .errors import PisaError

PROCESS_SIZE = 512
FILTERS = {name: Image.Resampling[name.upper()] for name in ("bicubic", "lanczos", "bilinear", "nearest")}


@dataclass(frozen=True)
class ResizePlan:
    original: tuple[int, int]  # (w, h)
    pre: tuple[int, int] | None  # size after the small-image pre-resize, if any
    upscaled: tuple[int, int]  # after the x upscale resize
    model: tuple[int, int]  # multiple-of-8 size the model works at
    output: tuple[int, int]  # final image size

    @property
    def resize_back(self) -> bool:
        return self.output != self.model


def plan_resize(width: int, height: int, upscale: int, process_size: int = PROCESS_SIZE) -> ResizePlan:
    if width < 1 or height < 1:
        raise PisaError(f"image size {width}x{height} is empty.")
    threshold = process_size // upscale
    pre = None
    w, h = width, height
    if w < threshold or h < threshold:
        scale = threshold / min(w, h)
        scale = min(scale, max(1.0, 2 * process_size / max(w, h)))  # the cap on the long side
        if scale > 1.0:
            w, h = int(scale * width), int(scale * height)
            pre = (w, h)
    up = (w * upscale, h * upscale)
    model = (up[0] - up[0] % 8, up[1] - up[1] % 8)
    if model[0] < 8 or model[1] < 8:
        raise PisaError(f"image {width}x{height} is too small to upscale.")
    output = (int(upscale * width), int(upscale * height)) if pre is not None else model
    return ResizePlan((width, height), pre, up, model, output)


def _resize_u8(arr: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).resize(size, resample))


def resize_batch(images: torch.Tensor, plan: ResizePlan, filter_name: str = "bicubic",
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Apply steps 1-3 of ``plan`` to a batch -> uint8 [B,H,W,C] at ``plan.model`` size, written into ``out`` if given
    (e.g. the LATENT's LQ reference); ``/ 255`` gives the float image the release encodes.

    Memory per frame beyond ``out``: the input frame as fp32 and uint8, then Pillow's images (4 bytes per pixel,
    plus a pass of ``input height x output width``) and one 3-byte copy of its result: about 7 bytes per output
    pixel (230 MiB for a 7680x4320 result), never a float copy of the output."""
    check_choice("resize filter", filter_name, FILTERS)
    w, h = plan.model
    if out is None:
        out = torch.empty((images.shape[0], h, w, images.shape[3]), dtype=torch.uint8)
    dst = out.numpy()
    for i in range(images.shape[0]):
        # Rounding to 8 bits is lossless for images loaded from 8-bit files.
        arr = images[i].detach().to(torch.float32).clamp(0, 1).mul_(255.0).round_().to(torch.uint8).cpu().numpy()
        if plan.pre is not None:
            arr = _resize_u8(arr, plan.pre, Image.Resampling.BICUBIC)  # the release uses Pillow's default here
        arr = _resize_u8(arr, plan.upscaled, FILTERS[filter_name])
        if plan.model != plan.upscaled:
            arr = _resize_u8(arr, plan.model, Image.Resampling.LANCZOS)
        dst[i] = arr
    return out


def resize_output(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The release's final resize back to ``upscale x original``: on the 8-bit image (truncated, as torchvision's
    ToPILImage does), with Pillow's bicubic, whose 8-bit path clips between its two passes."""
    u8 = (images.detach().to(torch.float32).clamp(0, 1) * 255.0).floor().to(torch.uint8).cpu().numpy()
    out = [_resize_u8(arr, size, Image.Resampling.BICUBIC) for arr in u8]
    return torch.from_numpy(np.stack(out)).to(torch.float32) / 255.0
