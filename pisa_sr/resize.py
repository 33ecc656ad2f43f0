"""The release's LQ resizing rules (its inference script), on 8-bit images through Pillow so results match it exactly.

1. If a side is below ``process_size // upscale`` (128 at x4), pre-resize so the short side reaches it.
2. Resize by ``upscale`` with the chosen filter (the release: Pillow's default, bicubic).
3. Lanczos *rescale* so both sides are multiples of 8 (not a crop).
The output is resized back to ``upscale x original`` only when step 1 happened; otherwise it keeps the step-3 size.

One deliberate difference: the release would pre-resize very thin images enormously (8x1024 px becomes 128x16384
before the x4). Step 1 is capped so the long side stays <= ``2 * process_size`` (1024 px, 4096 px after x4); for
every image whose pre-resized long side is within that bound the result is the release's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .errors import PisaError

PROCESS_SIZE = 512
FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


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
        cap = 2 * process_size / max(w, h)
        if scale > cap:
            scale = max(1.0, cap)
        if scale > 1.0:
            w, h = int(scale * width), int(scale * height)
            pre = (w, h)
    up = (w * upscale, h * upscale)
    model = (up[0] - up[0] % 8, up[1] - up[1] % 8)
    if model[0] < 8 or model[1] < 8:
        raise PisaError(f"image {width}x{height} is too small to upscale.")
    output = (int(upscale * width), int(upscale * height)) if pre is not None else model
    return ResizePlan((width, height), pre, up, model, output)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """ComfyUI IMAGE [B,H,W,C] floats in [0,1] -> uint8, rounding (lossless for images loaded from 8-bit files)."""
    return (images.detach().to(torch.float32).clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()


def _resize_u8(arr: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    img = Image.fromarray(arr)
    return np.asarray(img.resize(size, resample))


def resize_batch(images: torch.Tensor, plan: ResizePlan, filter_name: str = "bicubic") -> torch.Tensor:
    """Apply steps 1-3 of ``plan`` to a batch; returns float [B,H,W,C] in [0,1] at ``plan.model`` size."""
    if filter_name not in FILTERS:
        raise PisaError(f"unknown resize filter '{filter_name}'; choose one of {', '.join(FILTERS)}.")
    resample = FILTERS[filter_name]
    out = []
    for arr in to_uint8(images):
        if plan.pre is not None:
            arr = _resize_u8(arr, plan.pre, Image.Resampling.BICUBIC)  # the release uses Pillow's default here
        arr = _resize_u8(arr, plan.upscaled, resample)
        if plan.model != plan.upscaled:
            arr = _resize_u8(arr, plan.model, Image.Resampling.LANCZOS)
        out.append(torch.from_numpy(arr.copy()))
    return torch.stack(out).to(torch.float32) / 255.0


def resize_output(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The release's final resize back to ``upscale x original``: on the 8-bit image (truncated, as torchvision's
    ToPILImage does), with Pillow's bicubic, whose 8-bit path clips between its two passes."""
    u8 = (images.detach().to(torch.float32).clamp(0, 1) * 255.0).floor().to(torch.uint8).cpu().numpy()
    out = [torch.from_numpy(_resize_u8(arr, size, Image.Resampling.BICUBIC).copy()) for arr in u8]
    return torch.stack(out).to(torch.float32) / 255.0
