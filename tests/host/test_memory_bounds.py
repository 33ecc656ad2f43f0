"""Issue 23, node side: what grows with the picture outside the VAE has a stated bound, held here in live tensor bytes
(tests/helpers.LiveBytes: every tensor allocated inside the measured call and alive at the peak; what existed before,
weights and inputs, is not counted). The VAE itself is stubbed where it would dominate (its bounds are the tiled
VAE's, tests/host/test_vae_tiled.py), so each bound is the node's own. Units: one fp32 [H,W,3] image of the picture.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import host
from helpers import LiveBytes, random_latent
from helpers import no_grad  # noqa: F401  (autouse fixture)

decode = host.pack("nodes.decode")
preview = host.pack("nodes.preview")
from pisa_sr import color, resize
LQInfo = host.pack("nodes.lq_info").LQInfo


def _lq_latent(h: int, w: int, frames: int = 1) -> dict:
    """A Sample-shaped LATENT for an h x w px picture with its 8-bit LQ reference."""
    g = torch.Generator().manual_seed(h + w + frames)
    plan = resize.ResizePlan((w // 4, h // 4), None, (w, h), (w, h), (w, h))
    lq = (torch.rand(frames, h, w, 3, generator=g) * 255).round().to(torch.uint8)
    return {"samples": torch.randn(frames, 4, h // 8, w // 8, generator=g), "pisa_sr": LQInfo(lq_u8=lq, plan=plan)}


@pytest.mark.parametrize("color_fix", ["none", "adain", "wavelet"])
def test_decode_colour_fix_works_in_place(monkeypatch, color_fix):
    """Decode, per frame beyond the IMAGE: the decoder's output (1 image), which is truncated to 8 bits and colour-
    fixed in place, the LQ frame in fp32 (1, not for 'none') and the fix's working set (tests/core/test_color.py: adain
    none, wavelet 2/3 image + 3 bands)."""
    h, w = 512, 384
    band = 256 << 10
    monkeypatch.setattr(color, "BAND_BYTES", band)
    lat = _lq_latent(h, w)
    g = torch.Generator().manual_seed(1)
    monkeypatch.setattr(decode.vae_ops, "decode",  # the decoder's output, [1,3,H,W] fp32 in [0,1], as vae_ops gives it
                        lambda vae, z, tile, ram_gib=0.0: torch.rand(1, 3, h, w, generator=g))
    one = h * w * 3 * 4
    bound = {"none": one, "adain": 2 * one, "wavelet": (2 + 2 / 3) * one + 3 * band}[color_fix] + 1024
    with LiveBytes() as mem:
        img = decode.decode_hq(lat, None, color_fix)
    extra = mem.peak - img.untyped_storage().nbytes()
    print(f"\n[decode {color_fix}] extra beyond the IMAGE: {extra / one:.3f} images (bound {bound / one:.3f})")
    assert img.shape == (1, h, w, 3) and 0 <= img.min() and img.max() <= 1
    assert extra <= bound


def test_preview_shrinks_band_by_band(monkeypatch):
    """The before/after preview of a 2048 x 1536 result: nothing full-size is copied (the LQ is uint8; its whole fp32
    copy was two images); beyond the two previews, one band of input rows and its column means (BAND_BYTES each at
    most, 1 MiB here). The previews equal area-resizing the whole images up to fp32 rounding."""
    h, w = 2048, 1536
    result = torch.rand(1, h, w, 3)
    info = _lq_latent(h, w)["pisa_sr"]
    saved = []
    monkeypatch.setattr(preview, "preview_images", lambda t: saved.append(t) or [{}])
    monkeypatch.setattr(preview, "BAND_BYTES", 1 << 20)
    with LiveBytes() as mem:
        ui = preview.comparison_ui(result, info)
    assert len(ui["images"]) == len(ui[preview.LQ_KEY]) == 1
    res, lq = saved
    small = preview.preview_size(h, w)
    assert res.shape == lq.shape == (1, *small, 3) == (1, 1024, 768, 3)
    whole = F.interpolate(result.movedim(-1, 1), size=small, mode="area").clamp(0, 1).movedim(1, -1)
    whole_lq = F.interpolate(info.lq_u8.float().div(255).movedim(-1, 1), size=small, mode="area").movedim(1, -1)
    assert (res - whole).abs().max().item() <= 1e-6 and (lq - whole_lq.clamp(0, 1)).abs().max().item() <= 1e-6
    previews = 2 * res.numel() * 4
    print(f"\n[preview] peak {mem.peak / 2**20:.1f} MiB: the two previews {previews / 2**20:.1f} MiB + a band; one "
          f"full fp32 image is {h * w * 12 / 2**20:.1f} MiB")
    assert mem.peak <= previews + 2 * preview.BAND_BYTES


def test_encode_resize_writes_the_8bit_reference_without_float_copies():
    """Encode LQ's x4 resize (270 x 480 -> 1080 x 1920 here; a 1080p photo -> 7680 x 4320 in use): the torch side
    holds only the input frame (fp32 and uint8), whatever the output size; the result is Pillow's, byte for byte."""
    image = torch.rand(1, 270, 480, 3, generator=torch.Generator().manual_seed(2))
    plan = resize.plan_resize(480, 270, 4)
    out = torch.empty(1, plan.model[1], plan.model[0], 3, dtype=torch.uint8)
    with LiveBytes() as mem:
        got = resize.resize_batch(image, plan, "bicubic", out=out)
    assert got is out
    u8 = (image[0] * 255).round().to(torch.uint8).numpy()
    want = np.asarray(Image.fromarray(u8).resize(plan.upscaled, Image.Resampling.BICUBIC))
    assert np.array_equal(out[0].numpy(), want)
    print(f"\n[resize] torch-side peak {mem.peak / 2**20:.2f} MiB; output {out.numel() / 2**20:.2f} MiB uint8 "
          f"({out.numel() * 4 / 2**20:.1f} MiB as fp32)")
    assert mem.peak <= image.numel() * (4 + 1)


@pytest.fixture
def stub_unet(monkeypatch):
    """The sampler's UNet call stubbed (eps = a fresh tensor per chunk), so the sampler's own tensors are what is
    seen; the sampler module."""
    sample = host.pack("nodes.sample")
    monkeypatch.setattr(sample.sampling, "sample_eps", lambda z, *a, both=False, **k: torch.rand(
        z.shape[0], 8 if both else 4, *z.shape[2:]))
    return sample


def test_sample_eps_holds_one_chunk_not_the_batch(world, pisa_model, stub_unet):
    """The sweep's eps: each chunk (one frame here) leaves the device as it is made, so beyond the gathered (z, eps)
    it holds at most two chunks (the one being made, the one being copied) besides a constant (the conditioning
    checks), the same for 4 frames as for 8; it used to keep every chunk until the end. The UNet is stubbed (eps =
    a fresh tensor per chunk) so the chunks are what is seen."""
    sample = stub_unet
    chunk = (4 + 8) * 48 * 40 * 4  # z and eps of one frame, fp32

    def extra(frames: int) -> int:
        lat = random_latent(48, 40, b=frames)
        with LiveBytes() as mem:
            z, eps = sample.sample_eps(pisa_model, lat, world.conditioning, 1.0, 1.0, 0, 0, both=True,
                                       tiles_per_call=1)
        assert z.device.type == eps.device.type == "cpu" and eps.shape == (frames, 8, 48, 40)
        return mem.peak - z.untyped_storage().nbytes() - eps.untyped_storage().nbytes()

    extra(1)  # the first call patches the model's weights (kept): not this test's subject
    four, eight = extra(4), extra(8)
    print(f"\n[sample_eps] working memory beyond (z, eps): 4 frames {four / chunk:.2f} chunks, 8 frames "
          f"{eight / chunk:.2f} chunks")
    assert eight <= four + chunk // 8 and eight <= 2 * chunk + 1024  # + scalars


@pytest.mark.parametrize("lambdas", [(0.8, 1.2), (1.0, 1.0)], ids=["adjustable", "default"])
def test_sample_kept_holds_its_stated_latents(world, pisa_model, stub_unet, lambdas):
    """What the sampler keeps for the live preview (issue 21) is bounded in latents: it returns the output, z_lq and
    the eps it computed (adjustable: eps_pix and eps_sem, one [B,2C] tensor; default: one merged eps), and while it
    combines them it holds at most two more latents of transients (the release's combination and ``z - eps``), for 4
    frames as for 8 (the UNet stubbed: stub_unet)."""
    sample = stub_unet
    latent = lambda frames: 4 * 48 * 40 * 4 * frames  # noqa: E731  (one fp32 [B,4,48,40] latent)

    def held(frames: int) -> tuple[int, int]:
        lat = random_latent(48, 40, b=frames)
        with LiveBytes() as mem:
            out = sample.sample_kept(pisa_model, lat, world.conditioning, *lambdas, 0, 0, tiles_per_call=1)
        kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in out if t is not None}
        return sum(kept.values()), mem.peak - sum(kept.values())

    held(1)  # the first call patches the model's weights (kept): not this test's subject
    for frames in (4, 8):
        kept, extra = held(frames)
        print(f"\n[sample_kept {lambdas}] {frames} frames: returns {kept / latent(frames):.2f} latents, "
              f"transients {extra / latent(frames):.2f} latents")
        assert kept == latent(frames) * (4 if lambdas != (1.0, 1.0) else 3)  # out, z, eps (2 latents / 1)
        assert extra <= 2 * latent(frames) + 2 * 4 * 48 * 40 * 4 + 1024  # + one chunk's z and eps, scalars
