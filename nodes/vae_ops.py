"""VAE encode/decode for the nodes: the synchronised tiler of pisa_sr.vae_tiled, with the tile chosen from free
device memory (or the user's override) and an out-of-memory retry at smaller tiles that is logged, never silent.
"""
from __future__ import annotations

import logging

import torch

from ..pisa_sr.errors import PisaError
from ..pisa_sr.vae_tiled import auto_tile_size, parked_bytes, tiled_decode, tiled_encode
from . import compat

log = logging.getLogger("PiSA-SR")


def _offload_device(vae, device: torch.device, w: int, h: int, is_decoder: bool, tile_peak_guess: int) -> torch.device:
    """Park the full-size maps on the compute device when they fit there too (no host round trips)."""
    if device.type == "cpu":
        return device
    parked = parked_bytes(w, h, is_decoder=is_decoder, dtype_bytes=compat.dtype_bytes(compat.vae_dtype(vae)),
                          base_channels=compat.vae_base_channels(vae))
    if parked + tile_peak_guess < 0.7 * compat.vae_free_memory(vae):
        return device
    return torch.device("cpu")


def _run(kind: str, node: str, vae, fn, size_wh: tuple[int, int], tile_override: int, unit: int, smallest: int):
    """Shared retry loop: ``fn(tile, offload, progress)``; tile in the tiler's unit (latent px or image px)."""
    w, h = size_wh
    dtype = compat.vae_dtype(vae)
    free = compat.vae_free_memory(vae)
    is_dec = kind == "decode"
    if tile_override > 0:
        tile = max(smallest, tile_override)
    else:
        tile = auto_tile_size(free, w, h, is_decoder=is_dec, dtype_bytes=compat.dtype_bytes(dtype),
                              base_channels=compat.vae_base_channels(vae))
    offload = _offload_device(vae, compat.vae_device(vae), w, h, is_dec, 0)
    bar = compat.progress_bar(1)
    while True:
        try:
            return fn(tile, offload, lambda d, t: bar.update_absolute(d, t))
        except Exception as e:
            if not compat.is_oom(e):
                raise
            compat.soft_empty_cache()
            if offload.type != "cpu":
                offload = torch.device("cpu")
                log.warning("%s: out of device memory; retrying with the tiles' full-size maps parked in RAM.", node)
                continue
            new = max(smallest, (min(tile, max(w, h)) // 2) // unit * unit)
            if new >= tile or tile <= smallest:
                raise PisaError(f"{node}: out of device memory even with {tile} px VAE tiles. Free memory (close "
                                "other models) or lower the image size.") from None
            log.warning("%s: out of device memory at VAE tile %d; retrying with tile %d (the result is identical, "
                        "only slower).", node, tile, new)
            tile = new


def encode(vae, lq_bhwc: torch.Tensor, tile_px: int, node: str) -> torch.Tensor:
    """Raw latent (posterior mode) [B,4,H/8,W/8] fp32 on the CPU from images [B,H,W,3] in [0,1]."""
    b, h, w, _ = lq_bhwc.shape
    compat.vae_load(vae, [1, 3, h, w], encode=True)
    dev, dt = compat.vae_device(vae), compat.vae_dtype(vae)
    ae = compat.vae_module(vae)

    def fn(tile, offload, progress):
        out = []
        for i in range(b):
            # contiguous NCHW like the release's ToTensor: a channels_last view would make every conv and
            # GroupNorm run in that layout, which rounds differently (see sample_eps)
            x = lq_bhwc[i:i + 1].movedim(-1, 1).contiguous().to(torch.float32) * 2.0 - 1.0
            z = tiled_encode(ae, x.to(dev, dt), tile, progress=progress, check_interrupt=compat.throw_if_interrupted,
                             offload_device=offload)
            out.append(z.to("cpu", torch.float32))
        return torch.cat(out, 0).contiguous()

    return _run("encode", node, vae, fn, (w, h), tile_px, 64, 128)


def decode(vae, z_raw: torch.Tensor, tile_px: int, node: str) -> torch.Tensor:
    """Images [B,3,8h,8w] in [0,1] (fp32, CPU) from a raw latent, clamped as the release does."""
    b, _, h, w = z_raw.shape
    compat.vae_load(vae, [1, 4, h, w], encode=False)
    dev, dt = compat.vae_device(vae), compat.vae_dtype(vae)
    ae = compat.vae_module(vae)

    def fn(tile, offload, progress):
        out = []
        for i in range(b):
            x = tiled_decode(ae, z_raw[i:i + 1].to(dev, dt), tile, progress=progress,
                             check_interrupt=compat.throw_if_interrupted, offload_device=offload)
            out.append((x.to("cpu", torch.float32).clamp(-1, 1) + 1.0) / 2.0)
        return torch.cat(out, 0)

    tile_latent = tile_px // 8 if tile_px > 0 else 0
    return _run("decode", node, vae, fn, (w, h), tile_latent, 8, 16)
