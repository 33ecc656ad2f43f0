"""PiSA Lambda Sweep, PiSA Labelled Grid and PiSA Quality Score as registered nodes, on the tiny CPU models.

Sweep equivalence (the issue's bound: fp32 max abs difference <= 1e-5 on the output LATENT).
The sweep evaluates eps_pix and eps_sem once, in the sampler's adjustable (two rows per image) UNet call, and forms
every setting as a linear combination. The sampler evaluates most settings with that same call, so they must agree
to 1e-5. Some settings take a one-pass path in the sampler ((l, l), (l, 0) and (0, 0)). That path calls the UNet
with half as many rows, and the host's CPU kernels are not batch-size invariant. So a one-pass setting is compared
with the sampler run at the same UNet batch: the latent given twice, which is exactly the sweep's rows. The
batch-size effect itself is measured and printed: it is the host's own, and PiSA_Sample shows it too.
"""
from __future__ import annotations

import math

import pytest
import torch

import host
from helpers import make_image, pil_to_image, run_node
from pisa_sr import learned_metrics
from pisa_sr.guidance import Pass, plan_passes
from pisa_sr.grid import grid_layout, labelled_grid
from pisa_sr.metrics import psnr_y, sharpness
from pisa_sr.resize import ResizePlan
from pisa_sr.sweep import choose_best_per_image, format_label, sweep_labels

TOL = 1e-5
NODES = ("PiSA_LambdaSweep", "PiSA_LabelledGrid", "PiSA_QualityScore")
# Every sampler plan: DUAL, SEM (lp == ls), PIX (ls == 0) and NONE (both 0).
PAIRS = [(0.5, 1.5), (1.3, 0.7), (1.0, 1.0), (1.0, 0.0), (0.0, 0.0)]


@pytest.fixture(scope="module")
def lat1(world):
    """One 40x36 image at x4: model size 568x512, latent 64x71 (untiled at tile_size 96)."""
    (lat,) = run_node("PiSA_EncodeLQ", image=pil_to_image(make_image(40, 36, seed=1)), vae=world.comfy_vae,
                      upscale=4, resize_filter="bicubic")
    return lat


def _crop(lat, windows):
    """A batch of latent windows ``(y, x)`` of 32x40 with their matching 256x320 LQ references: a valid PiSA LATENT
    (the decoder colour-fixes it) at a quarter of the cost of the full 64x71 latent."""
    info = lat["pisa_sr"]
    LQInfo = host.pack("nodes.lq_info").LQInfo
    z = torch.cat([lat["samples"][:, :, y:y + 32, x:x + 40] for y, x in windows]).contiguous()
    lq = torch.cat([info.lq_u8[:, 8 * y:8 * y + 256, 8 * x:8 * x + 320] for y, x in windows]).contiguous()
    return {"samples": z, "pisa_sr": LQInfo(lq_u8=lq, plan=ResizePlan((320, 256), None, (320, 256), (320, 256),
                                                                       (320, 256)))}


@pytest.fixture(scope="module")
def small(lat1):
    return _crop(lat1, [(0, 0)])


@pytest.fixture(scope="module")
def small2(lat1):
    return _crop(lat1, [(0, 0), (32, 31)])


def _sweep(model, cond, lat, pairs, tile, overlap, **kw):
    return run_node("PiSA_LambdaSweep", model=model, positive=cond, latent=lat, tile_size=tile, tile_overlap=overlap,
                    settings="; ".join(f"{lp!r},{ls!r}" for lp, ls in pairs), **kw)


def _sample(model, cond, lat, lp, ls, tile, overlap):
    (hq,) = run_node("PiSA_Sample", model=model, positive=cond, latent=lat, lambda_pix=lp, lambda_sem=ls,
                     tile_size=tile, tile_overlap=overlap)
    return hq["samples"]


# tile 96: untiled; tile 24 / overlap 8: 2x2 tiles, all in one UNet call (and 8 in one call for the latent twice).
@pytest.mark.parametrize("tile,overlap", [(96, 32), (24, 8)], ids=["untiled", "tiled"])
def test_sweep_equals_per_setting_sampling(world, pisa_model, small, tile, overlap):
    cond = world.conditioning
    latents, labels, lps, lss, best, report, images = _sweep(pisa_model, cond, small, PAIRS, tile, overlap)
    z = latents["samples"]
    assert type(images).__name__ == "ExecutionBlocker" and "connected" in images.message  # no vae: nothing decoded
    assert z.shape == (len(PAIRS), *small["samples"].shape[1:]) and z.dtype == torch.float32
    assert lps == [p for p, _ in PAIRS] and lss == [s for _, s in PAIRS]
    assert labels.splitlines() == [format_label(*p) for p in PAIRS]
    assert torch.equal(best["samples"], z[:1])  # choose_best off: the first setting
    assert "choose_best: off" in report

    twice = {"samples": torch.cat([small["samples"]] * 2)}  # no LQ: not decoded
    worst = 0.0
    for s, (lp, ls) in enumerate(PAIRS):
        alone = _sample(pisa_model, cond, small, lp, ls, tile, overlap)
        diff = (z[s:s + 1] - alone).abs().max().item()
        plan = plan_passes(lp, ls)
        if plan in (Pass.DUAL, Pass.NONE):
            # The sampler makes the very UNet call the sweep makes (or none): the bound applies.
            print(f"[{tile}/{overlap}] ({lp},{ls}) {plan.name}: sweep vs PiSA_Sample {diff:.2e}")
            assert diff <= TOL
            worst = max(worst, diff)
            continue
        # One-pass plan: the sampler calls the UNet on half the rows. How much the host's result moves with the
        # batch size alone: the same node, setting and image, run alone and as a batch of two.
        pair = _sample(pisa_model, cond, twice, lp, ls, tile, overlap)
        spread = (pair[:1] - alone).abs().max().item()
        same_batch = (z[s:s + 1] - pair[:1]).abs().max().item()
        scale = alone.abs().max().item()
        print(f"[{tile}/{overlap}] ({lp},{ls}) {plan.name}: sweep vs PiSA_Sample {diff:.2e}; PiSA_Sample alone "
              f"vs in a batch of 2 {spread:.2e}; sweep vs PiSA_Sample in a batch of 2 {same_batch:.2e} "
              f"(|latent| max {scale:.1f})")
        assert diff <= max(TOL, 2 * spread)
        assert spread <= 1e-4 * scale  # host rounding, orders of magnitude below any setting's effect
    assert (z[0] - z[1]).abs().max() > 0.1 and (z[0] - z[-1]).abs().max() > 0.1  # settings differ: not vacuous
    print(f"[{tile}/{overlap}] worst sweep vs PiSA_Sample difference where both make the same UNet call: "
          f"{worst:.2e}")


def test_sweep_batch_is_setting_major_and_keeps_lq_reference(world, pisa_model, small2):
    """B=2: row s*B+b is setting s of image b; the LQ reference is repeated so the decoder colour-fixes each row
    against its own image, exactly as decoding the per-setting sample does."""
    pairs = [(0.5, 1.5), (1.3, 0.7)]  # both DUAL: the sampler makes the same UNet call
    latents, labels, lps, lss, _, _, images = _sweep(pisa_model, world.conditioning, small2, pairs, 96, 32,
                                                     vae=world.comfy_vae, color_fix="adain")
    z, b = latents["samples"], 2
    assert z.shape[0] == len(pairs) * b
    assert labels.splitlines() == sweep_labels(pairs, b) == [
        "pix 0.50 / sem 1.50 / img 1", "pix 0.50 / sem 1.50 / img 2",
        "pix 1.30 / sem 0.70 / img 1", "pix 1.30 / sem 0.70 / img 2"]
    info, lq = latents["pisa_sr"], small2["pisa_sr"].lq_u8
    assert info.batch == len(pairs) * b and info.plan == small2["pisa_sr"].plan
    assert info.lq_u8.untyped_storage().data_ptr() == lq.untyped_storage().data_ptr()  # repeated without a copy
    for row in range(len(pairs) * b):
        assert torch.equal(info.frame_u8(row), lq[row % b:row % b + 1])
    (imgs,) = run_node("PiSA_Decode", latent=latents, vae=world.comfy_vae, color_fix="adain")
    assert torch.equal(images, imgs)  # choose_best off, vae connected: 'images' is the decoded 'latents'
    for s, (lp, ls) in enumerate(pairs):
        (hq,) = run_node("PiSA_Sample", model=pisa_model, positive=world.conditioning, latent=small2, lambda_pix=lp,
                         lambda_sem=ls)
        assert (z[s * b:(s + 1) * b] - hq["samples"]).abs().max().item() <= TOL
        (want,) = run_node("PiSA_Decode", latent=hq, vae=world.comfy_vae, color_fix="adain")
        diff = (imgs[s * b:(s + 1) * b] - want).abs().max().item()
        print(f"decoded sweep vs decoded sample ({lp},{ls}): {diff * 255:.3f}/255")
        assert diff <= 1 / 255  # a latent ulp may flip one truncation to 8 bits before the colour fix
    assert small2["samples"].shape[0] == 2 and small2["pisa_sr"].lq_u8.shape[0] == 2  # input left untouched


def test_sweep_memory_does_not_grow_with_the_settings(world, pisa_model, small2):
    """Issue 23: beyond its outputs the sweep holds one setting's decoded images (written into the preallocated
    S x B 'images', not concatenated) and no copy of the LQ reference per setting, so its working memory (live tensor
    bytes, tests/helpers.LiveBytes) is the same for 2 settings as for 5."""
    from helpers import LiveBytes, tensor_bytes

    def extra(pairs) -> tuple[int, int]:
        node = host.node("PiSA_LambdaSweep")
        with LiveBytes() as mem:
            out = node.execute(model=pisa_model, positive=world.conditioning, latent=small2, tile_size=96,
                               tile_overlap=32, vae=world.comfy_vae, color_fix="adain",
                               settings="; ".join(f"{lp!r},{ls!r}" for lp, ls in pairs)).result
        latents, best, images = out[0], out[4], out[6]
        assert latents["pisa_sr"].lq_u8 is small2["pisa_sr"].lq_u8 and images.shape[0] == 2 * len(pairs)
        outputs = sum(tensor_bytes(t) for t in (latents["samples"], best["samples"], images))
        return mem.peak - outputs, tensor_bytes(images) // len(pairs)

    extra([(1.0, 1.0)])  # warm-up: the first UNet call patches the model's weights (kept)
    two, setting = extra([(0.5, 1.5), (1.3, 0.7)])
    five, _ = extra([(0.5, 1.5), (1.3, 0.7), (1.0, 1.0), (0.8, 1.2), (1.5, 0.5)])
    print(f"\n[sweep, B=2] working memory beyond the outputs: 2 settings {two / 2**20:.2f} MiB, 5 settings "
          f"{five / 2**20:.2f} MiB (one setting's images {setting / 2**20:.2f} MiB)")
    assert five <= two + setting / 8  # it grew by a setting's images per setting (3 here) before


def test_choose_best_picks_argmax_under_the_floor_end_to_end(world, pisa_model, small):
    """Decode and score every setting independently, place the floor so the unconstrained sharpest setting fails
    it, and check the node returns the sharpest setting among those that pass."""
    pairs = [(0.5, 0.5), (1.0, 1.0), (0.8, 0.2), (1.0, 0.25), (1.5, 0.0)]  # spread over sharpness and PSNR
    cond, vae = world.conditioning, world.comfy_vae
    (swept, *_) = _sweep(pisa_model, cond, small, pairs, 96, 32)
    (imgs,) = run_node("PiSA_Decode", latent=swept, vae=vae, color_fix="adain")
    ref_lat = dict(small, samples=_sample(pisa_model, cond, small, 1.0, 0.0, 96, 32))
    (ref,) = run_node("PiSA_Decode", latent=ref_lat, vae=vae, color_fix="adain")
    q = sharpness(imgs).tolist()
    f = psnr_y(imgs, ref, crop_border=0).tolist()
    top = max(range(len(q)), key=q.__getitem__)
    floor = want = None
    cuts = sorted(set(f))
    for lo, hi in zip(cuts, cuts[1:]):  # the lowest floor (midway between two fidelities) that excludes the top
        passing = [i for i in range(len(q)) if f[i] >= (lo + hi) / 2]
        if top not in passing:
            floor, want = (lo + hi) / 2, max(passing, key=q.__getitem__)
            break
    assert floor is not None, f"constructed case needs a sharper setting below some floor: {q} {f}"
    assert want != top and q[want] < q[top] and f[want] >= floor > f[top]

    latents, labels, _, _, best, report, images = _sweep(pisa_model, cond, small, pairs, 96, 32,
                                                         choose_best="sharpness", fidelity_floor_db=floor,
                                                         color_fix="adain", vae=vae)
    assert torch.equal(images, imgs)  # the scored images are handed on: each setting decoded once
    print(report)
    assert torch.equal(best["samples"], latents["samples"][want:want + 1])
    assert (best["samples"] - swept["samples"][want:want + 1]).abs().max().item() == 0.0
    marked = [i for i, line in enumerate(labels.splitlines()) if line.endswith("[best]")]
    assert marked == [want]
    assert f"chosen: {format_label(*pairs[want])}" in report and f"{floor:g} dB" in report
    assert best["pisa_sr"] is small["pisa_sr"]


def test_choose_best_per_image_constructed_cases():
    # 2 images x 4 settings; quality (higher is better) and PSNR vs pix-only.
    quality = [[5.0, 1.0], [9.0, 2.0], [7.0, 8.0], [6.0, 3.0]]
    fidelity = [[40.0, 40.0], [20.0, 35.0], [31.0, 25.0], [35.0, 33.0]]
    got = choose_best_per_image(quality, fidelity, 30.0)
    # image 1: the argmax 9.0 is under the floor; 7.0 (31 dB) is the best that passes. image 2: 8.0 fails, 3.0 wins.
    assert [s for s, _ in got] == [2, 3]
    assert "fidelity >= 30" in got[0][1]
    # lower is better (noise): smallest quality among the passing settings.
    assert [s for s, _ in choose_best_per_image(quality, fidelity, 30.0, higher_is_better=False)] == [0, 0]
    # nothing passes: the closest to the pix-only output, said so.
    (s, why), = choose_best_per_image([[1.0], [2.0]], [[10.0], [12.0]], 30.0)
    assert s == 1 and "no setting reached" in why
    # NaN quality is ignored; an inf PSNR (identical to pix-only) passes any floor.
    (s, _), = choose_best_per_image([[float("nan")], [1.0]], [[math.inf], [math.inf]], 1000.0)
    assert s == 1
    with pytest.raises(ValueError):
        choose_best_per_image([[1.0, 2.0]], [[1.0]], 0.0)


def test_sweep_refusals_come_before_any_work(world, small, monkeypatch):
    sweep = host.node("PiSA_LambdaSweep")
    kw = dict(model=None, positive=world.conditioning, latent=small)  # model=None: nothing may reach the UNet
    with pytest.raises(ValueError, match=r"PiSA Lambda Sweep: settings: .*'abc'"):
        sweep.execute(settings="1,1; abc", **kw)
    with pytest.raises(ValueError, match="PiSA Lambda Sweep.*connect the VAE"):
        sweep.execute(settings="1,1", choose_best="sharpness", **kw)
    monkeypatch.setattr(learned_metrics, "_pyiqa_installed", lambda: False)
    with pytest.raises(ValueError, match=r"PiSA Lambda Sweep: choose_best = 'musiq'.*pyiqa.*never downloads"):
        sweep.execute(settings="1,1", choose_best="musiq", vae=world.comfy_vae, **kw)


# ----------------------------------------------------------------------------------------------- grid and score
def _images():
    return torch.rand((4, 48, 64, 3), generator=torch.Generator().manual_seed(3))


def test_labelled_grid_node_labels_and_scores():
    imgs = _images()
    labels = "\n".join(sweep_labels([(0.5, 1.0), (1.0, 1.0), (1.0, 1.5), (1.5, 1.0)]))
    (bare,) = run_node("PiSA_LabelledGrid", images=imgs, columns=2)
    (lab,) = run_node("PiSA_LabelledGrid", images=imgs, labels=labels, columns=2)
    (both,) = run_node("PiSA_LabelledGrid", images=imgs, labels=labels + "\n", scores="a 1\nb 2\nc 3\nd 4",
                       columns=2)
    rows, cols = grid_layout(4, 2)
    assert bare.shape == lab.shape == both.shape == (1, rows * 48 + (rows + 1) * 4, cols * 64 + (cols + 1) * 4, 3)
    assert torch.equal(bare, labelled_grid(imgs, [""] * 4, columns=2))  # unconnected labels: bare tiles
    assert torch.equal(lab, labelled_grid(imgs, labels.splitlines(), columns=2))
    want = [f"{a} | {b}" for a, b in zip(labels.splitlines(), ["a 1", "b 2", "c 3", "d 4"])]
    assert torch.equal(both, labelled_grid(imgs, want, columns=2))
    assert not torch.equal(lab, bare) and not torch.equal(both, lab)
    (auto,) = run_node("PiSA_LabelledGrid", images=imgs, labels=labels)
    assert auto.shape[1:3] == bare.shape[1:3]  # 4 tiles, auto columns: 2x2
    with pytest.raises(ValueError, match="PiSA Labelled Grid: 4 image.*3 label"):
        run_node("PiSA_LabelledGrid", images=imgs, labels="a\nb\nc")
    with pytest.raises(ValueError, match="PiSA Labelled Grid: 4 image.*2 score"):
        run_node("PiSA_LabelledGrid", images=imgs, labels=labels, scores="1\n2")


def test_quality_score_node_outputs_text_and_float_list(monkeypatch):
    imgs = _images()
    ref = (imgs[:1] + 0.05 * torch.randn(1, *imgs.shape[1:])).clamp(0, 1)
    text, values = run_node("PiSA_QualityScore", images=imgs, metric="psnr", reference=ref, crop_border=4)
    want = psnr_y(imgs, ref, 4).tolist()
    assert isinstance(values, list) and len(values) == 4
    assert all(isinstance(v, float) for v in values) and values == pytest.approx(want, abs=1e-12)
    assert text.splitlines() == [f"psnr {v:.4g} dB" for v in want]
    text, values = run_node("PiSA_QualityScore", images=imgs[:1], metric="psnr", reference=imgs[:1])
    assert values == [math.inf] and text == "psnr inf dB"
    text, values = run_node("PiSA_QualityScore", images=imgs, metric="sharpness")
    assert values == pytest.approx(sharpness(imgs).tolist(), abs=1e-12)
    assert len(text.splitlines()) == 4 and text.startswith("sharpness ")
    with pytest.raises(ValueError, match="PiSA Quality Score: 'ssim' is a full-reference metric"):
        run_node("PiSA_QualityScore", images=imgs, metric="ssim")
    with pytest.raises(ValueError, match="PiSA Quality Score: image and reference sizes differ"):
        run_node("PiSA_QualityScore", images=imgs, metric="psnr", reference=imgs[:, :40])
    monkeypatch.setattr(learned_metrics, "_pyiqa_installed", lambda: False)
    with pytest.raises(ValueError, match="PiSA Quality Score: .*pyiqa.*never downloads"):
        run_node("PiSA_QualityScore", images=imgs, metric="clipiqa")


def test_schemas_are_v3_with_tooltips_and_list_outputs():
    for node_id in NODES:
        schema = host.node(node_id).define_schema()
        assert schema.node_id == node_id and schema.category == "image/upscaling/PiSA-SR"
        for item in schema.inputs + schema.outputs:
            assert item.tooltip and len(item.tooltip) > 20, (node_id, item)
    sweep = host.node("PiSA_LambdaSweep").define_schema()
    assert [i.id for i in sweep.inputs][:3] == ["model", "positive", "latent"]
    ins = {i.id: i for i in sweep.inputs}
    sample = {i.id: i for i in host.node("PiSA_Sample").define_schema().inputs}
    for name in ("tile_size", "tile_overlap"):
        assert ins[name].default == sample[name].default and ins[name].min == sample[name].min
    assert ins["vae"].optional and list(ins["choose_best"].options) == ["off", "sharpness", "noise", "musiq",
                                                                        "clipiqa", "maniqa"]
    assert [o.is_output_list for o in sweep.outputs] == [False, False, True, True, False, False, False]
    assert sweep.outputs[-1].display_name == "images" and sweep.outputs[-1].io_type == "IMAGE"
    score = host.node("PiSA_QualityScore").define_schema()
    assert [o.is_output_list for o in score.outputs] == [False, True]
