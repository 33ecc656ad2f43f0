"""Tile grids and Gaussian blending weights, shared by the latent sampler and the VAE tiler.

The release places tiles at ``i * (tile - overlap)`` and aligns the last tile of each axis to the edge; it crashes
when one side is shorter than the tile. Here each axis is planned on its own, so thin images simply get one tile
along their short side.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis, as the release computes them (last tile edge-aligned).

    ``tile`` is clamped to ``length`` (one tile across a short side); ``overlap`` must be below ``tile``.
    """
    if length <= 0 or tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need length > 0 and 0 <= overlap < tile, got {length}, {overlap}, {tile}")
    tile = min(tile, length)
    stride = tile - overlap
    count = 1 if length <= tile else 1 + math.ceil((length - tile) / stride)
    starts = [i * stride for i in range(count - 1)] + [length - tile]
    return starts


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
    ys = axis_starts(height, tile, overlap)
    xs = axis_starts(width, tile, overlap)
    return [Tile(y, x, th, tw) for y in ys for x in xs]


def needs_tiling(height: int, width: int, tile: int) -> bool:
    """The release's area trigger: tile only when ``h*w > tile*tile``. ``tile <= 0`` means never tile."""
    return tile > 0 and height * width > tile * tile


def gaussian_weights(h: int, w: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Separable 2-D blending weight ``[h, w]`` of the release: per axis ``exp(-(x - mid)^2 / (2 * 0.01 * n^2))``
    (sigma = n / 10), without its normalising constant, which cancels when dividing by the weight sum."""
    def ramp(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64, device=device)
        return torch.exp(-((x - (n - 1) / 2) ** 2) / (2 * 0.01 * n * n))

    return torch.outer(ramp(h), ramp(w)).to(dtype)
