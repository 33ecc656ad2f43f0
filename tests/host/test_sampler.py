"""The sampler's execution plans: one batched forward for adjustable mode, tile batching, thin latents, hook hygiene,
the out-of-memory fallback and the precision option (fp32, CPU, tiny random weights).

Measured here (fp32, CPU): see the printed lines (pytest -s); the bounds are ONE_PASS_TOL, REF_TOL, BF16_REL_TOL.
"""
from __future__ import annotations

import logging

import comfy.model_management as mm
import pytest
import torch

import host
from helpers import (encode_lq, forward_hooks, log_unet_calls, make_image, max_diff, pil_to_image, random_latent,
                     run_node, sample_eps)
from helpers import no_grad  # noqa: F401  (autouse fixture)
from pisa_sr.sampling import make_eps_fn

ONE_PASS_TOL = 5e-5  # absolute, for |eps| up to ~8: fp32 batch-shape-dependent rounding, amplified by the mix
REF_TOL = 1e-4  # the equivalence bound of test_equivalence.py
BF16_REL_TOL = 0.05  # bf16 vs fp32: max abs eps difference / max |eps|
PAIRS = [(0.5, 1.5), (1.3, 0.7)]

compat, unet = host.pack("nodes.compat"), host.pack("nodes.unet")


def _eps_fn(model, context, lp, ls, **kw):
    """make_eps_fn as the node glue calls it: eps at t=1 with the context bound, the model's sem removal targets."""
    sigma, pm = unet.sigma_t1(model), host.pack("nodes.pisa_model")
    removal = pm.sem_removal_targets(model, pm.info_of(model))
    return make_eps_fn(
        lambda x: unet.unet_eps_t1(model, x, context.expand(x.shape[0], -1, -1), sigma), removal, lp, ls, **kw)


# ---------------------------------------------------------------------------------------------- one pass vs two
def test_one_pass_equals_two_pass_and_reference(world, pisa_model, ref):
    x = pisa_model.model.process_latent_in(random_latent(24, 32)["samples"])
    compat.load_model(pisa_model, [2, 4, 24, 32])
    for lp, ls in PAIRS:
        a, b = (_eps_fn(pisa_model, world.context, lp, ls, one_pass=p)(x) for p in (True, False))
        want = ref.eps(x, default=False, lambda_pix=lp, lambda_sem=ls)
        print(f"({lp},{ls}) one-pass vs two-pass {max_diff(a, b):.2e}; one-pass vs ref {max_diff(a, want):.2e}; "
              f"two-pass vs ref {max_diff(b, want):.2e}; |eps| max {want.abs().max():.2f}")
        assert max_diff(a, b) <= ONE_PASS_TOL
        assert max_diff(a, want) <= REF_TOL and max_diff(b, want) <= REF_TOL
        assert want.abs().max() > 0.1
    # both: [eps_pix, eps_sem] from one call equals the two separate passes
    a, b = (_eps_fn(pisa_model, world.context, 1.0, 1.0, one_pass=p, both=True)(x) for p in (True, False))
    assert a.shape == (1, 8, 24, 32)
    assert max_diff(a, b) <= ONE_PASS_TOL
    assert max_diff(a[:, :4], ref.eps(x, default=False, lambda_pix=1.0, lambda_sem=0.0)) <= REF_TOL
    assert max_diff(a[:, 4:], ref.eps(x, default=True)) <= REF_TOL


def test_unet_eps_is_the_raw_unet_output(world, pisa_model):
    """unet.unet_eps_t1 returns the diffusion model's own output (captured by a wrapper), bit for bit, not the
    fp32 recovery ``(x - denoised) / sigma`` that would amplify rounding 25x."""
    z = pisa_model.model.process_latent_in(random_latent(16, 24, seed=9)["samples"])
    compat.load_model(pisa_model, [1, 4, 16, 24])
    s = unet.sigma_t1(pisa_model)
    eps = unet.unet_eps_t1(pisa_model, z, world.context, s)
    xc = z * torch.sqrt(1.0 + s * s) / (s * s + 1.0) ** 0.5  # exactly what apply_model hands the UNet
    raw = pisa_model.model.diffusion_model(xc, timesteps=torch.ones(1), context=world.context,
                                           transformer_options={})
    assert torch.equal(eps, raw.float())


def test_one_pass_difference_is_batching_noise(world, pisa_model):
    """One call on [z, z] vs two calls differs only by the plain UNet's own batch-2 vs batch-1 fp32 difference
    (GEMM blocking changes with the row count; ~1.4e-5 on this contiguous latent) amplified by the guidance mix, not
    by the bypass: bounded by that measured floor times the mix's coefficients."""
    lat = encode_lq(world.comfy_vae, pil_to_image(make_image(40, 36, seed=1)))
    z = pisa_model.model.process_latent_in(lat["samples"])
    compat.load_model(pisa_model, [2, *z.shape[1:]])
    s = unet.sigma_t1(pisa_model)
    single = unet.unet_eps_t1(pisa_model, z, world.context, s)
    double = unet.unet_eps_t1(pisa_model, torch.cat([z, z]), world.context.expand(2, -1, -1), s)
    floor = max_diff(double[:1], single)
    d = max_diff(*(_eps_fn(pisa_model, world.context, 0.5, 1.5, one_pass=p)(z) for p in (True, False)))
    print(f"latent {tuple(z.shape)}: plain UNet batch-2 vs batch-1 {floor:.2e}; one-pass vs two-pass (0.5,1.5) "
          f"{d:.2e}")
    assert d <= 2.5 * 2 * floor + 1e-5  # |mix coefficients| sum to 2.5 (-1 x pix + 1.5 x sem); x2 for both halves


# ---------------------------------------------------------------------------------------------- calls per plan
@pytest.mark.parametrize("lp,ls,both,calls,batch,hooked", [
    (1.0, 1.0, False, 4, 1, False),  # default mode: one plain forward per tile
    (0.7, 0.7, False, 4, 1, False),  # lambda_sem == lambda_pix: the same plain forward, scaled
    (0.8, 0.0, False, 4, 1, True),  # pix only: one forward with the sem removal hooks
    (0.8, 1.2, False, 4, 2, True),  # adjustable: one forward on [z, z]
    (1.0, 1.0, True, 4, 2, True),  # sweep: eps_pix and eps_sem from one forward
    (0.0, 0.0, False, 0, 0, False),  # nothing to compute
])
def test_unet_calls_per_tile(monkeypatch, world, pisa_model, lp, ls, both, calls, batch, hooked):
    log = log_unet_calls(monkeypatch, pisa_model)
    z, eps = sample_eps(pisa_model, world.conditioning, random_latent(28, 28), lp, ls, 16, 4, both=both,
                        tiles_per_call=1)  # 2x2 tiles
    assert [(b, n > 0) for b, n in log] == [(batch, hooked)] * calls
    assert eps.shape == (1, 8 if both else 4, 28, 28)
    assert forward_hooks(pisa_model) == 0


def test_tile_batching_gives_same_result(monkeypatch, world, pisa_model):
    """Adjustable mode: batching of tiles and of [z, z] together (tile 16, overlap 4: 2 x 3 = 6 tiles)."""
    results = {}
    for n in (1, 4, 6):
        log = log_unet_calls(monkeypatch, pisa_model)
        results[n] = sample_eps(pisa_model, world.conditioning, random_latent(28, 40, seed=3), 0.8, 1.2, 16, 4,
                                tiles_per_call=n)[1]
        assert len(log) == -(-6 // n)
        monkeypatch.undo()
    for n in (4, 6):
        print(f"(0.8,1.2) {n} tiles per call vs 1: {max_diff(results[n], results[1]):.2e}")
        assert max_diff(results[n], results[1]) <= ONE_PASS_TOL


# ---------------------------------------------------------------------------------------------- thin latents
@pytest.mark.parametrize("h,w,lp,ls", [(8, 200, 0.8, 1.2), (200, 8, 0.8, 0.0), (100, 90, 1.0, 1.0)])
def test_thin_latents_untiled_match_reference(world, pisa_model, ref, h, w, lp, ls):
    """Under the release's area rule (h*w <= 96^2) these run whole; compared with the reference."""
    z, eps = sample_eps(pisa_model, world.conditioning, random_latent(h, w), lp, ls)
    assert eps.shape == (1, 4, h, w)
    assert max_diff(eps.cpu(), ref.eps(z.cpu(), default=(lp == ls == 1.0), lambda_pix=lp, lambda_sem=ls)) <= REF_TOL


@pytest.mark.parametrize("h,w", [(8, 1200), (600, 16)])
def test_thin_latents_tiled(world, pisa_model, h, w):
    """Area > 96^2 with a side < 96: the release loops forever here; we use one tile across the short side."""
    z, eps = sample_eps(pisa_model, world.conditioning, random_latent(h, w, seed=5), 1.0, 1.0)
    assert eps.shape == (1, 4, h, w) and torch.isfinite(eps).all()
    # Pixels 0..63 along the long side are covered by the first tile alone: they equal that tile's own eps.
    first = unet.unet_eps_t1(pisa_model, z[..., :96, :96], world.context, unet.sigma_t1(pisa_model)).to(eps.device)
    assert max_diff(eps[..., :64, :64], first[..., :64, :64]) <= ONE_PASS_TOL


# ---------------------------------------------------------------------------------------------- hook hygiene
def test_hooks_removed_after_return_and_raise(monkeypatch, world, pisa_model):
    def run(lp, ls):
        return run_node("PiSA_Sample", model=pisa_model, positive=world.conditioning, latent=random_latent(24, 24),
                        lambda_pix=lp, lambda_sem=ls)

    assert run(0.8, 1.2)[0]["samples"].shape == (1, 4, 24, 24) and forward_hooks(pisa_model) == 0
    log = log_unet_calls(monkeypatch, pisa_model, fail=lambda i: RuntimeError("boom inside the UNet"))
    for lp, ls in [(0.8, 1.2), (0.8, 0.0)]:
        with pytest.raises(RuntimeError, match="boom"):
            run(lp, ls)
        assert log[-1][1] > 0  # the hooks were in place when it failed...
        assert forward_hooks(pisa_model) == 0  # ...and are gone now


# ---------------------------------------------------------------------------------------------- OOM fallback
def _oom():
    return mm.OOM_EXCEPTION("CUDA out of memory (simulated)")


@pytest.mark.parametrize("w,seed,tiles_per_call,message,calls", [
    # 6 tiles: 4 tiles x [z, z] failed; then 2 tiles x 2 per call
    (40, 3, 4, "retrying with 2 tile(s) per UNet call", [(8, True)] + [(4, True)] * 3),
    # 4 tiles: [z, z] failed; then pix (hooked) and sem separately per tile
    (28, 4, 1, "two UNet passes per tile", [(2, True)] + [(1, True), (1, False)] * 4),
])
def test_oom_fallbacks(monkeypatch, world, pisa_model, caplog, w, seed, tiles_per_call, message, calls):
    lat = random_latent(28, w, seed=seed)
    base = sample_eps(pisa_model, world.conditioning, lat, 0.8, 1.2, 16, 4, tiles_per_call=tiles_per_call)[1]
    log = log_unet_calls(monkeypatch, pisa_model, fail=lambda i: _oom() if i == 0 else None)
    with caplog.at_level(logging.WARNING, logger="PiSA-SR"):
        eps = sample_eps(pisa_model, world.conditioning, lat, 0.8, 1.2, 16, 4, tiles_per_call=tiles_per_call)[1]
    assert message in caplog.text
    assert [(b, n > 0) for b, n in log] == calls
    print(f"{message}: vs one-pass {max_diff(eps, base):.2e}")
    assert max_diff(eps, base) <= ONE_PASS_TOL
    assert forward_hooks(pisa_model) == 0


def test_oom_at_every_size_is_a_clear_error(monkeypatch, world, pisa_model):
    log_unet_calls(monkeypatch, pisa_model, fail=lambda i: _oom())
    with pytest.raises(Exception, match="out of memory even with one tile per call"):
        sample_eps(pisa_model, world.conditioning, random_latent(28, 28, seed=4), 0.8, 1.2, 16, 4, tiles_per_call=1)
    assert forward_hooks(pisa_model) == 0


# ---------------------------------------------------------------------------------------------- precision
def test_precision_option(world, pisa_model, ref):
    inp = next(i for i in host.node("PiSA_Sample").define_schema().inputs if i.id == "precision")
    assert inp.default == "auto" and inp.tooltip and list(inp.options) == ["auto", "fp16", "bf16", "fp32"]

    lat = random_latent(32, 40, seed=6)
    assert unet.compute_dtype(pisa_model) == torch.float32  # what ComfyUI chose on this CPU host
    z, auto = sample_eps(pisa_model, world.conditioning, lat, 0.8, 1.2)
    _, fp32 = sample_eps(pisa_model, world.conditioning, lat, 0.8, 1.2, precision="fp32")
    assert torch.equal(auto, fp32)  # fp32 on an fp32 model is the model itself
    assert max_diff(fp32.cpu(), ref.eps(z.cpu(), default=False, lambda_pix=0.8, lambda_sem=1.2)) <= REF_TOL

    seen = []
    probe = pisa_model.model.get_submodule("diffusion_model.input_blocks.0.0")
    handle = probe.register_forward_hook(lambda m, i, o: seen.append(i[0].dtype))
    try:
        _, bf16 = sample_eps(pisa_model, world.conditioning, lat, 0.8, 1.2, precision="bf16")
    finally:
        handle.remove()
    assert seen == [torch.bfloat16]  # the UNet really ran in bf16...
    assert bf16.dtype == torch.float32  # ...and the mix and blending stayed fp32
    rel = max_diff(bf16, fp32) / fp32.abs().max().item()
    rms = ((bf16 - fp32).pow(2).mean() / fp32.pow(2).mean()).sqrt().item()
    print(f"bf16 vs fp32 eps: max abs diff {rel:.3f} of max |eps| ({fp32.abs().max():.2f}); relative RMS {rms:.4f}")
    assert 0 < rel <= BF16_REL_TOL
    clone = unet.with_compute_dtype(pisa_model, torch.bfloat16)
    assert unet.with_compute_dtype(pisa_model, torch.bfloat16) is clone  # reused: no reload per queued prompt
    assert unet.compute_dtype(clone) == torch.bfloat16 and unet.compute_dtype(pisa_model) == torch.float32

    # Back to auto: the shared weights and casting flags were restored exactly.
    assert torch.equal(sample_eps(pisa_model, world.conditioning, lat, 0.8, 1.2)[1], auto)
    (out,) = run_node("PiSA_Sample", model=pisa_model, positive=world.conditioning, latent=lat, lambda_pix=0.8,
                      lambda_sem=1.2, precision="bf16")
    assert torch.isfinite(out["samples"]).all()
