"""Long batches (issue 14 item 4): Encode LQ, Sample and Decode give every frame of a batch exactly what that frame
gives alone, tiled and untiled, and the device never holds more frames than one UNet call takes.

Core ComfyUI's own tiled VAE is known to break the images after the first of a batch; these tests compare each frame
of a batch run with a one-frame run of the same node (fp32, CPU, tiny random weights). Where the UNet sees the same
calls (one tile per call) the frames are bit-identical; with several frames per UNet call they may differ only by
the UNet's batch-shape rounding, bounded by the equivalence bound of test_equivalence.py (EPS_TOL).
"""
from __future__ import annotations

import pytest
import torch

import host
from helpers import encode_lq, log_unet_calls, make_image, max_diff, pil_to_image, random_latent, run_node
from helpers import no_grad  # noqa: F401  (autouse fixture)
from pisa_sr.resize import ResizePlan
from pisa_sr.runtime import Hooks

EPS_TOL = 1e-4  # test_equivalence.py's eps bound
SCALE = 0.18215  # SD latent scale: a raw latent difference is the eps difference / SCALE


def _assert_frames_equal(batch: torch.Tensor, singles: list[torch.Tensor]) -> None:
    assert batch.shape[0] == len(singles)
    for i, one in enumerate(singles):
        assert torch.equal(batch[i:i + 1], one), f"frame {i}: max diff {(batch[i:i + 1] - one).abs().max():.3e}"


@pytest.mark.parametrize("vae_tile_size", [0, 128])
def test_encode_batch_equals_single_frames(world, vae_tile_size):
    # 512 x 544 px at the model size: 4 x 5 tiles of 128 px when tiled
    image = torch.cat([pil_to_image(make_image(128, 136, seed)) for seed in range(3)])
    lat = encode_lq(world.comfy_vae, image, vae_tile_size=vae_tile_size)
    singles = [encode_lq(world.comfy_vae, image[i:i + 1], vae_tile_size=vae_tile_size) for i in range(3)]
    _assert_frames_equal(lat["samples"], [s["samples"] for s in singles])
    _assert_frames_equal(lat["pisa_sr"].lq_u8, [s["pisa_sr"].lq_u8 for s in singles])
    assert not torch.equal(lat["samples"][0], lat["samples"][1])  # distinct frames really were encoded


@pytest.mark.parametrize("lp,ls", [(1.0, 1.0), (0.8, 1.2)])
@pytest.mark.parametrize("tile,shape", [(0, (24, 20)), (16, (28, 40))])  # untiled; 2 x 3 tiles of 16, overlap 4
def test_sample_batch_equals_single_frames(world, pisa_model, lp, ls, tile, shape):
    sample_hq = host.pack("nodes.sample").sample_hq
    lat = random_latent(*shape, b=3)
    args = (world.conditioning, lp, ls, tile, 4)
    batch = sample_hq(pisa_model, lat, *args, tiles_per_call=1)
    singles = [sample_hq(pisa_model, {"samples": lat["samples"][i:i + 1]}, *args, tiles_per_call=1) for i in range(3)]
    _assert_frames_equal(batch, singles)
    # the node itself (several tiles or frames per UNet call, as free memory allows): only batch-shape rounding
    (out,) = run_node("PiSA_Sample", model=pisa_model, positive=world.conditioning, latent=lat, lambda_pix=lp,
                      lambda_sem=ls, tile_size=tile, tile_overlap=4)
    diff = max_diff(out["samples"], batch) * SCALE
    print(f"({lp},{ls}) tile {tile}: node batch vs one-tile-per-call frames, eps diff {diff:.2e}")
    assert diff <= EPS_TOL


@pytest.mark.parametrize("tiled,tpc,calls", [(False, 2, [2, 2, 1]), (True, 12, [12, 12, 6]), (True, 4, [4, 2] * 5)])
def test_sample_chunks_hold_whole_frames_per_call(monkeypatch, world, pisa_model, tiled, tpc, calls):
    """5 frames; 6 tiles per frame when tiled: a chunk is as many whole frames as one call takes, else one frame."""
    log = log_unet_calls(monkeypatch, pisa_model)
    ticks = []
    hooks = Hooks(progress=lambda d, t: ticks.append((d, t)))
    monkeypatch.setattr(host.pack("nodes.compat"), "hooks", lambda: hooks)
    lat = random_latent(*((28, 40) if tiled else (12, 16)), b=5)
    out = host.pack("nodes.sample").sample_hq(pisa_model, lat, world.conditioning, 1.0, 1.0, 16 if tiled else 0,
                                              4, tiles_per_call=tpc)
    assert [b for b, _ in log] == calls
    assert ticks == [(i + 1, len(calls)) for i in range(len(calls))]  # one progress bar over all chunks
    assert out.shape == lat["samples"].shape and out.device.type == "cpu"


def _hq_latent(b: int, lq_frames: int, resize_back: bool) -> dict:
    """A LATENT as Sample returns it, with an LQ reference of ``lq_frames`` frames (1 = shared by all)."""
    h, w = 24, 20
    plan = ResizePlan(
        original=(50, 60), pre=(40, 48) if resize_back else None, upscaled=(w * 8, h * 8), model=(w * 8, h * 8),
        output=(150, 180) if resize_back else (w * 8, h * 8))
    g = torch.Generator().manual_seed(b + lq_frames)
    lq = (torch.rand(lq_frames, h * 8, w * 8, 3, generator=g) * 255).round().to(torch.uint8)
    return {"samples": torch.randn(b, 4, h, w, generator=g) * 4.0,
            "pisa_sr": host.pack("nodes.lq_info").LQInfo(lq_u8=lq, plan=plan)}


@pytest.mark.parametrize("vae_tile_size", [0, 128])
@pytest.mark.parametrize("color_fix,lq_frames,resize_back", [("adain", 3, False), ("wavelet", 3, True),
                                                             ("adain", 1, True), ("none", 3, False)])
def test_decode_batch_equals_single_frames(world, vae_tile_size, color_fix, lq_frames, resize_back):
    lat = _hq_latent(3, lq_frames, resize_back)
    info = lat["pisa_sr"]

    def decode(latent):
        return run_node("PiSA_Decode", latent=latent, vae=world.comfy_vae, color_fix=color_fix,
                        vae_tile_size=vae_tile_size)[0]

    img = decode(lat)
    _assert_frames_equal(img, [decode({"samples": lat["samples"][i:i + 1], "pisa_sr": type(info)(
        lq_u8=info.lq_u8[i:i + 1] if lq_frames > 1 else info.lq_u8, plan=info.plan)}) for i in range(3)])
    assert tuple(img.shape) == ((3, 180, 150, 3) if resize_back else (3, 192, 160, 3))


def test_decode_refuses_a_mismatched_lq_batch(world):
    lat = _hq_latent(3, 2, False)
    with pytest.raises(Exception, match="latent batch \\(3\\) does not match the LQ batch \\(2\\)"):
        run_node("PiSA_Decode", latent=lat, vae=world.comfy_vae, color_fix="adain")

