"""VAE encode/decode for the nodes: pisa_sr.vae_tiled with the tile chosen from free device memory (or the user's
override), a host-memory check for the parked maps, and a logged out-of-memory retry at smaller tiles.
"""
from __future__ import annotations

import logging

import torch

from ..pisa_sr.errors import PisaError
from ..pisa_sr.vae_tiled import auto_tile_size, parked_bytes, tiled_decode, tiled_encode
from . import compat

log = logging.getLogger("PiSA-SR")
GIB = 1 << 30


def _run(vae, one, batch: int, size_wh: tuple[int, int], tile_override: int, is_decoder: bool) -> torch.Tensor:
    """``one(i, tile, offload, hooks)`` for every sample, retried whole on OOM; tile in latent px or image px."""
    w, h = size_wh
    unit, smallest = (8, 16) if is_decoder else (64, 128)
    try:
        base_channels = int(vae.first_stage_model.decoder.conv_out.weight.shape[1])
    except AttributeError:
        base_channels = 128
    kw = {"is_decoder": is_decoder, "dtype_bytes": vae.vae_dtype.itemsize, "base_channels": base_channels}
    device = torch.device(vae.device)
    tile = (max(smallest, tile_override) if tile_override > 0
            else auto_tile_size(compat.vae_free_memory(vae), w, h, **kw))
    parked = parked_bytes(w, h, **kw) if tile < max(w, h) else 0
    offload = device if device.type == "cpu" or parked < 0.7 * compat.vae_free_memory(vae) else torch.device("cpu")
    if offload.type == "cpu" and parked > (ram := compat.free_ram()):
        raise PisaError(f"the tiled VAE needs about {parked / GIB:.1f} GiB of RAM for its full-size maps but only "
                        f"{ram / GIB:.1f} GiB is free. Lower upscale or the image size, or close other programs.")
    hooks = compat.hooks()
    while True:
        try:
            with compat.device_context(vae.device):
                return torch.cat([one(i, tile, offload, hooks) for i in range(batch)], 0).contiguous()
        except Exception as e:
            if not hooks.is_oom(e):
                raise
            del e
            hooks.empty_cache()
            if offload.type != "cpu":
                offload = torch.device("cpu")
                log.warning("PiSA-SR VAE: out of memory; retrying with the tiles' full-size maps parked in RAM.")
                continue
            new = max(smallest, (min(tile, max(w, h)) // 2) // unit * unit)
            if new >= tile or tile <= smallest:
                raise PisaError(f"out of memory even with {tile * (8 if is_decoder else 1)} px VAE tiles. Free "
                                "memory (close other models) or lower the image size.") from None
            log.warning("PiSA-SR VAE: out of memory at tile %d; retrying with tile %d (the result is identical, "
                        "only slower).", tile, new)
            tile = new


def encode(vae, lq_bhwc: torch.Tensor, tile_px: int) -> torch.Tensor:
    """Raw latent (posterior mode) [B,4,H/8,W/8] fp32 on the CPU from images [B,H,W,3] in [0,1]."""
    b, h, w, _ = lq_bhwc.shape
    compat.vae_load(vae, [1, 3, h, w], encode=True)
    dev, dt = torch.device(vae.device), vae.vae_dtype

    def one(i, tile, offload, hooks):
        # contiguous NCHW like the release's ToTensor: a channels_last view would make every conv and GroupNorm
        # run in that layout, which rounds differently (see sample_eps)
        x = lq_bhwc[i:i + 1].movedim(-1, 1).contiguous().to(torch.float32) * 2.0 - 1.0
        z = tiled_encode(vae.first_stage_model, x.to(dev, dt), tile, progress=hooks.progress,
                         check_interrupt=hooks.check_interrupt, offload_device=offload)
        return z.to("cpu", torch.float32)

    return _run(vae, one, b, (w, h), tile_px, is_decoder=False)


def decode(vae, z_raw: torch.Tensor, tile_px: int) -> torch.Tensor:
    """Images [B,3,8h,8w] in [0,1] (fp32, CPU) from a raw latent, clamped as the release does; ``tile_px`` 0 =
    automatic, else image px (at least the smallest tile, 128 px)."""
    b, _, h, w = z_raw.shape
    compat.vae_load(vae, [1, 4, h, w], encode=False)
    dev, dt = torch.device(vae.device), vae.vae_dtype

    def one(i, tile, offload, hooks):
        x = tiled_decode(vae.first_stage_model, z_raw[i:i + 1].to(dev, dt), tile, progress=hooks.progress,
                         check_interrupt=hooks.check_interrupt, offload_device=offload)
        return (x.to("cpu", torch.float32).clamp(-1, 1) + 1.0) / 2.0

    return _run(vae, one, b, (w, h), -(-tile_px // 8) if tile_px > 0 else 0, is_decoder=True)
