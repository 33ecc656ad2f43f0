"""Thin and odd images go through the whole graph (encode, tiled sample, tiled decode) with the release's size rule.

The release crashes on thin latents (tile weights built before the tile is clamped); ours must not.
"""
from __future__ import annotations

import pytest
import torch

from helpers import make_image, pil_to_image, pipeline


@pytest.mark.parametrize("w,h,upscale,expect", [
    (8, 1024, 4, (32, 4096)),    # no pre-resize (capped): works at 32x4096, latent 4x512 -> thin latent tiles
    (1000, 24, 4, (4000, 96)),   # pre-resized to 1024x24, works at 4096x96, resized back to 4x the input
    (517, 263, 2, (1032, 520)),  # 1034x526 rescaled to multiples of 8 (as the release), latent 129x65: thin tiles
])
def test_thin_and_odd_sizes(world, pisa_model, w, h, upscale, expect):
    img, lat, hq = pipeline(pisa_model, world.comfy_vae, world.conditioning, pil_to_image(make_image(w, h, 5)),
                            upscale=upscale, lambda_pix=0.8, lambda_sem=1.2)
    assert tuple(img.shape) == (1, expect[1], expect[0], 3)
    assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    assert img.std() > 0.01  # not a blank image


def test_vae_tile_override_equals_auto(world, pisa_model):
    """A forced small VAE tile (synchronised GroupNorm, global attention) gives the untiled result."""
    from conftest import run_node

    image = pil_to_image(make_image(150, 140, 6))
    (lat_auto,) = run_node("PiSA_EncodeLQ", image=image, vae=world.comfy_vae, upscale=4, resize_filter="bicubic",
                           vae_tile_size=0)
    (lat_tiled,) = run_node("PiSA_EncodeLQ", image=image, vae=world.comfy_vae, upscale=4, resize_filter="bicubic",
                            vae_tile_size=128)
    # fp32 rounding only: GroupNorm statistics are merged in fp64 across tiles vs torch's fp32 group_norm; through
    # eight norms of a random-weight encoder that stays far below 1e-4 of the latent's range (PSNR ~ 100 dB+).
    scale = lat_auto["samples"].abs().max()
    rel = ((lat_auto["samples"] - lat_tiled["samples"]).abs().max() / scale).item()
    print(f"encode tiled(128 px) vs auto: max abs diff / max |latent| = {rel:.2e}")
    assert rel < 1e-4
    (hq,) = run_node("PiSA_Sample", model=pisa_model, positive=world.conditioning, latent=lat_auto)
    # color_fix none: compare the decoders themselves, before the release's 8-bit step (which can turn a 1e-6
    # difference into a one-level flip that colour fix then rescales).
    (a,) = run_node("PiSA_Decode", latent=hq, vae=world.comfy_vae, color_fix="none", vae_tile_size=0)
    (b,) = run_node("PiSA_Decode", latent=hq, vae=world.comfy_vae, color_fix="none", vae_tile_size=128)
    diff = (a - b).abs().max().item()
    print(f"decode tiled(128 px) vs auto: max abs diff {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("override,decode_tile,encode_tile", [(0, None, None), (1, 16, 128), (7, 16, 128),
                                                              (64, 16, 128), (200, 25, 200)])
def test_small_vae_tile_sizes_mean_the_smallest_tile(world, monkeypatch, override, decode_tile, encode_tile):
    """vae_tile_size 1..128 means the smallest tile (128 px) on both nodes; only 0 is automatic (it used to be
    1..7 too on the decoder, silently)."""
    import host
    from conftest import run_node

    vae_ops = host.pack("nodes.vae_ops")
    tiles = []

    def recorder(real):
        def run(ae, x, tile, **kw):
            tiles.append(tile)
            return real(ae, x, tile, **kw)
        return run

    monkeypatch.setattr(vae_ops, "tiled_decode", recorder(vae_ops.tiled_decode))
    monkeypatch.setattr(vae_ops, "tiled_encode", recorder(vae_ops.tiled_encode))
    monkeypatch.setattr(vae_ops.compat, "vae_free_memory", lambda vae: 1 << 40)  # automatic = one whole tile
    run_node("PiSA_Decode", latent={"samples": torch.randn(1, 4, 32, 40)}, vae=world.comfy_vae, color_fix="none",
             vae_tile_size=override)
    run_node("PiSA_EncodeLQ", image=torch.rand(1, 512, 576, 3), vae=world.comfy_vae, upscale=1,
             resize_filter="bicubic", vae_tile_size=override)
    assert tiles == [decode_tile or 40, encode_tile or 576]
