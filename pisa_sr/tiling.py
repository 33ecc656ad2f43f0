"""The release's latent tile grid and Gaussian blending weights.

The release crashes when one side is shorter than the tile; here each axis is planned on its own, so a thin image
simply gets one tile along its short side.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .runtime import host64


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """The release's offsets ``i * (tile - overlap)``, last tile edge-aligned; ``tile`` is clamped to ``length``."""
    if length <= 0 or tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need length > 0 and 0 <= overlap < tile, got {length}, {overlap}, {tile}")
    tile = min(tile, length)
    stride = tile - overlap
    count = 1 if length <= tile else 1 + math.ceil((length - tile) / stride)
    return [i * stride for i in range(count - 1)] + [length - tile]


@dataclass(frozen=True)
class Tile:
    """One tile: rows ``y0:y0+h`` and columns ``x0:x0+w``."""

    y0: int
    x0: int
    h: int
    w: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y0 + self.h), slice(self.x0, self.x0 + self.w)


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """Row-major grid covering ``height x width``; every tile has the same shape (so tiles can be batched)."""
    th, tw = min(tile, height), min(tile, width)
    return [Tile(y, x, th, tw) for y in axis_starts(height, tile, overlap) for x in axis_starts(width, tile, overlap)]


def needs_tiling(height: int, width: int, tile: int) -> bool:
    """The release's area trigger: tile only when ``h*w > tile*tile``. ``tile <= 0`` means never tile."""
    return tile > 0 and height * width > tile * tile


def gaussian_weights(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The release's blending weight ``[h, w]``: per axis ``exp(-(x - mid)^2 / (2 * 0.01 * n^2))`` (sigma = n / 10),
    without the normalising constant, which cancels when dividing by the weight sum. Computed in fp64 on the CPU
    (the release's numpy) and rounded there, so no fp64 reaches ``device``."""
    def ramp(n: int) -> torch.Tensor:
        x = host64(torch.arange(n))
        return torch.exp(-((x - (n - 1) / 2) ** 2) / (2 * 0.01 * n * n))

    return torch.outer(ramp(h), ramp(w)).to(dtype).to(device)
