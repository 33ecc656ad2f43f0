"""One labelled contact sheet from an IMAGE batch, for judging sweep settings side by side and for sharing.

Tiles are copied unchanged (no 8-bit round trip): only the label banner in each tile's top-left corner is drawn, and
it is composited in torch from a Pillow-rendered text mask, so every pixel outside a banner equals its input.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Union

import torch
from PIL import Image, ImageDraw, ImageFont

from .checks import check_image
from .errors import PisaError

Font = Union[ImageFont.ImageFont, ImageFont.FreeTypeFont]

_BOX = 0.08  # banner background (dark) ...
_INK = 0.96  # ... and text (light): readable on any image content
_MIN_FONT = 6


def default_font_size(tile_h: int, tile_w: int) -> int:
    """Label size that scales with the tile (about 1/20 of its short side, at least 10 px) so it stays legible."""
    return max(10, round(min(tile_h, tile_w) / 20))


def grid_layout(n: int, columns: Optional[int] = None) -> tuple[int, int]:
    """``(rows, columns)`` for ``n`` tiles laid out row-major; columns default to ``ceil(sqrt(n))`` (near square)."""
    if n <= 0:
        raise PisaError("the grid needs at least one image")
    if columns is None or columns <= 0:
        columns = math.ceil(math.sqrt(n))
    columns = min(int(columns), n)
    return math.ceil(n / columns), columns


@functools.lru_cache(maxsize=32)
def _font(size: int) -> tuple[Font, bool]:
    """(font, scalable): Pillow's built-in font at ``size`` px (Pillow >= 10.1 with FreeType), else the bitmap one."""
    try:
        font = ImageFont.load_default(size=size)
        return font, isinstance(font, ImageFont.FreeTypeFont)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default(), False


def _text_mask(text: str, size: int, max_w: int, max_h: int) -> torch.Tensor:
    """Banner coverage for ``text``: float ``[h, w]`` with 0 = box, 1 = ink; shrunk to fit ``max_w`` if it can be."""
    scratch = ImageDraw.Draw(Image.new("L", (1, 1)))
    font, scalable = _font(size)
    margin = max(2, size // 4) if scalable else 3
    bbox = scratch.textbbox((0, 0), text, font=font)
    width = bbox[2] - bbox[0] + 2 * margin
    if scalable and width > max_w and size > _MIN_FONT:
        fitted = max(_MIN_FONT, int(size * (max_w - 4) / width))
        if fitted < size:
            return _text_mask(text, fitted, max_w, max_h)
    # Banner height from a reference string, so banners in one grid share a height whatever their letters.
    ref = scratch.textbbox((0, 0), "Ag|0", font=font)
    top = min(ref[1], bbox[1])
    height = max(ref[3], bbox[3]) - top + 2 * margin
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).text((margin - bbox[0], margin - top), text, font=font, fill=255)
    mask = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(height, width)
    return (mask.to(torch.float32) / 255.0)[:max_h, :max_w]


def labelled_grid(images: torch.Tensor, labels: Sequence[str], columns: Optional[int] = None, pad: int = 4,
                  font_size: Optional[int] = None, background: float = 1.0) -> torch.Tensor:
    """``images`` ``[N,H,W,C]`` row-major with ``pad`` px gaps of ``background`` -> ``[1,H',W',C]``; each non-empty
    label as light text on a dark box in its tile's top-left corner, shrunk to fit the tile's width."""
    check_image(images)
    n, h, w, c = images.shape
    labels = [str(t) for t in labels]
    if len(labels) != n:
        raise PisaError(f"{len(labels)} labels for {n} images: give exactly one label per image")
    if pad < 0:
        raise PisaError(f"pad must be >= 0, got {pad}")
    if font_size is not None and font_size <= 0:
        raise PisaError(f"font_size must be positive, got {font_size}")
    rows, cols = grid_layout(n, columns)
    size = default_font_size(h, w) if font_size is None else int(font_size)

    out = torch.full((1, rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, c), float(background),
                     dtype=images.dtype, device=images.device)
    box = torch.full((c,), _BOX, dtype=torch.float32, device=images.device)
    ink = torch.full((c,), _INK, dtype=torch.float32, device=images.device)
    if c == 4:  # keep RGBA banners opaque
        box[3] = ink[3] = 1.0
    for i in range(n):
        r, col = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        out[0, y0 : y0 + h, x0 : x0 + w] = images[i]
        if labels[i].strip():
            mask = _text_mask(labels[i], size, w, h).to(images.device).unsqueeze(-1)
            bh, bw = mask.shape[:2]
            out[0, y0 : y0 + bh, x0 : x0 + bw] = (box * (1.0 - mask) + ink * mask).to(images.dtype)
    return out
