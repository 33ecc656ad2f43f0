"""Thin and odd images go through the whole graph (encode, tiled sample, tiled decode) with the release's size rule.

The release crashes on thin latents (tile weights built before the tile is clamped); ours must not.
"""
from __future__ import annotations

import pytest
import torch

import host
from helpers import encode_lq, make_image, max_diff, pil_to_image, pipeline, run_node


@pytest.mark.parametrize("w,h,upscale,expect", [
    (8, 1024, 4, (32, 4096)),    # no pre-resize (capped): works at 32x4096, latent 4x512 -> thin latent tiles
    (1000, 24, 4, (4000, 96)),   # pre-resized to 1024x24, works at 4096x96, resized back to 4x the input
    (517, 263, 2, (1032, 520)),  # 1034x526 rescaled to multiples of 8 (as the release), latent 129x65: thin tiles
])
def test_thin_and_odd_sizes(world, pisa_model, w, h, upscale, expect):
    img, _, _ = pipeline(pisa_model, world.comfy_vae, world.conditioning, pil_to_image(make_image(w, h, 5)),
                            upscale=upscale, lambda_pix=0.8, lambda_sem=1.2)
    assert tuple(img.shape) == (1, expect[1], expect[0], 3)
    assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    assert img.std() > 0.01  # not a blank image


def test_vae_tile_override_equals_auto(world, pisa_model):
    """A forced small VAE tile (synchronised GroupNorm, global attention) gives the untiled result."""
    image = pil_to_image(make_image(150, 140, 6))
    lat_auto, lat_tiled = (encode_lq(world.comfy_vae, image, vae_tile_size=t) for t in (0, 128))
    # fp32 rounding only: GroupNorm statistics are merged in fp64 across tiles vs torch's fp32 group_norm; through
    # eight norms of a random-weight encoder that stays far below 1e-4 of the latent's range (PSNR ~ 100 dB+).
    rel = ((lat_auto["samples"] - lat_tiled["samples"]).abs().max() / lat_auto["samples"].abs().max()).item()
    print(f"encode tiled(128 px) vs auto: max abs diff / max |latent| = {rel:.2e}")
    assert rel < 1e-4
    (hq,) = run_node("PiSA_Sample", model=pisa_model, positive=world.conditioning, latent=lat_auto)
    # color_fix none: compare the decoders themselves, before the release's 8-bit step (which can turn a 1e-6
    # difference into a one-level flip that colour fix then rescales).
    a, b = (run_node("PiSA_Decode", latent=hq, vae=world.comfy_vae, color_fix="none", vae_tile_size=t)[0]
            for t in (0, 128))
    diff = max_diff(a, b)
    print(f"decode tiled(128 px) vs auto: max abs diff {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("override,decode_tile,encode_tile", [(0, 40, 576), (1, 16, 128), (7, 16, 128),
                                                              (64, 16, 128), (200, 25, 200)])
def test_small_vae_tile_sizes_mean_the_smallest_tile(world, monkeypatch, override, decode_tile, encode_tile):
    """vae_tile_size 1..128 means the smallest tile (128 px) on both nodes; only 0 is automatic (it used to be
    1..7 too on the decoder, silently)."""
    vae_ops = host.pack("nodes.vae_ops")
    tiles = []

    def recorder(real):
        def run(ae, x, tile, **kw):
            tiles.append(tile)
            return real(ae, x, tile, **kw)
        return run

    for name in ("tiled_decode", "tiled_encode"):
        monkeypatch.setattr(vae_ops, name, recorder(getattr(vae_ops, name)))
    monkeypatch.setattr(vae_ops.compat, "vae_free_memory", lambda vae: 1 << 40)  # automatic = one whole tile
    run_node("PiSA_Decode", latent={"samples": torch.randn(1, 4, 32, 40)}, vae=world.comfy_vae, color_fix="none",
             vae_tile_size=override)
    encode_lq(world.comfy_vae, torch.rand(1, 512, 576, 3), upscale=1, vae_tile_size=override)
    assert tiles == [decode_tile, encode_tile]
