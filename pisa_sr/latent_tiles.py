"""Run an eps function over a latent, tiled with Gaussian blending as in the release, several tiles per call.

``eps_fn`` maps a batch of latent tiles ``[N,4,th,tw]`` to ``[N,C,th,tw]`` (C may differ from 4: a sweep returns
eps_pix and eps_sem side by side). Blending is linear, so it commutes with any linear combination of eps.
"""
from __future__ import annotations

from typing import Callable

import torch

from .tiling import gaussian_weights, needs_tiling, plan_tiles

EpsFn = Callable[[torch.Tensor], torch.Tensor]


def run_tiled(z: torch.Tensor, eps_fn: EpsFn, tile: int, overlap: int, tiles_per_call: int = 1,
              progress: Callable[[int, int], None] | None = None,
              check_interrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """eps for the whole latent ``z`` [B,4,h,w], fp32 on ``z``'s device; untiled when ``needs_tiling`` says so.

    Memory on ``z``'s device beyond ``eps_fn``'s own: the fp32 output ``[B,C,h,w]`` (latent size: 16 MiB per frame
    at C = 4 for an 8192 px output, 32 MiB for a sweep's C = 8), the ``[h,w]`` weight sum, and one call's stacked
    tiles and result; nothing at image size, and nothing kept per tile."""
    b, _, h, w = z.shape
    tiles = plan_tiles(h, w, tile, overlap) if needs_tiling(h, w, tile) else None
    total = -(-b * (len(tiles) if tiles else 1) // tiles_per_call)  # eps_fn calls, for the progress bar
    done = 0

    def step(x: torch.Tensor) -> torch.Tensor:
        nonlocal done
        if check_interrupt is not None:
            check_interrupt()
        y = eps_fn(x).to(z.device, torch.float32)
        done += 1
        if progress is not None:
            progress(done, total)
        return y

    if tiles is None:
        out = None
        for i in range(0, b, tiles_per_call):
            y = step(z[i:i + tiles_per_call])
            if out is None:
                out = y.new_empty((b, *y.shape[1:]))
            out[i:i + y.shape[0]] = y
        return out

    weight = gaussian_weights(tiles[0].h, tiles[0].w, torch.float32, z.device)
    jobs = [(i, t) for i in range(b) for t in tiles]
    out = None
    wsum = torch.zeros((1, 1, h, w), dtype=torch.float32, device=z.device)
    for t in tiles:
        ys, xs = t.slices
        wsum[..., ys, xs] += weight
    for start in range(0, len(jobs), tiles_per_call):
        chunk = jobs[start:start + tiles_per_call]
        y = step(torch.stack([z[i, :, t.slices[0], t.slices[1]] for i, t in chunk]))
        if out is None:
            out = torch.zeros((b, y.shape[1], h, w), dtype=torch.float32, device=z.device)
        for (i, t), yi in zip(chunk, y):
            ys, xs = t.slices
            out[i, :, ys, xs] += yi * weight
    return out.div_(wsum)
