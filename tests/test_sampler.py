"""The sampler's execution plans: one batched forward for adjustable mode, tile batching, thin latents, hook hygiene,
the out-of-memory fallback and the precision option (fp32, CPU, tiny random weights).

Measured here (fp32, CPU): see the printed lines (pytest -s); the bounds are ONE_PASS_TOL, REF_TOL, BF16_REL_TOL.
"""
from __future__ import annotations

import logging

import pytest
import torch

import host
from helpers import run_node

ONE_PASS_TOL = 5e-5  # absolute, for |eps| up to ~8: fp32 batch-shape-dependent rounding, amplified by the mix
REF_TOL = 1e-4  # the equivalence bound of test_equivalence.py
BF16_REL_TOL = 0.05  # bf16 vs fp32: max abs eps difference / max |eps|
PAIRS = [(0.5, 1.5), (1.3, 0.7)]


def _sample():
    return host.pack("nodes.sample")


def _compat():
    return host.pack("nodes.compat")


def _unet():
    return host.pack("nodes.unet")


def _sampling():
    return host.pack("pisa_sr.sampling")


def _unet_fn(model, context):
    """The injected ``unet(x)`` the node glue builds: eps at t=1 with the context bound."""
    unet = _unet()
    sigma = unet.sigma_t1(model)
    return lambda x: unet.unet_eps_t1(model, x, context.expand(x.shape[0], -1, -1), sigma)


def _eps_fn(model, context, lp, ls, **kw):
    info = host.pack("nodes.pisa_model").info_of(model)
    removal = host.pack("nodes.pisa_model").sem_removal_targets(model, info)
    return _sampling().make_eps_fn(_unet_fn(model, context), removal, lp, ls, **kw)


def _latent(h: int, w: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(1, 4, h, w, generator=g) * 4.0}  # raw SD latent scale (x 0.18215 inside)


def _eps(model, cond, lat, lp, ls, tile=96, overlap=32, **kw):
    return _sample().sample_eps(model, lat, cond, lp, ls, tile, overlap, **kw)


def _all_hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in model.model.modules())


class CallLog:
    """Wraps unet.unet_eps_t1: records (batch, active forward hooks) per call; can raise on chosen calls."""

    def __init__(self, monkeypatch, model, fail=None):
        self.calls: list[tuple[int, int]] = []
        self.fail = fail or (lambda i: None)
        unet = _unet()
        real = unet.unet_eps_t1

        def wrapped(m, z, context, sigma):
            i = len(self.calls)
            self.calls.append((z.shape[0], _all_hooks(model)))
            exc = self.fail(i)
            if exc is not None:
                raise exc
            return real(m, z, context, sigma)

        monkeypatch.setattr(unet, "unet_eps_t1", wrapped)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():  # nodes run under inference mode; no_grad keeps the session's weights usable elsewhere
        yield


# ---------------------------------------------------------------------------------------------- one pass vs two
def test_one_pass_equals_two_pass_and_reference(world, pisa_model, ref):
    x = pisa_model.model.process_latent_in(_latent(24, 32)["samples"])
    _compat().load_model(pisa_model, [2, 4, 24, 32])
    worst = 0.0
    for lp, ls in PAIRS:
        one = _eps_fn(pisa_model, world.context, lp, ls, one_pass=True)
        two = _eps_fn(pisa_model, world.context, lp, ls, one_pass=False)
        a, b = one(x), two(x)
        want = ref.eps(x, default=False, lambda_pix=lp, lambda_sem=ls)
        d = (a - b).abs().max().item()
        worst = max(worst, d)
        print(f"({lp},{ls}) one-pass vs two-pass {d:.2e}; one-pass vs ref {(a - want).abs().max():.2e}; "
              f"two-pass vs ref {(b - want).abs().max():.2e}; |eps| max {want.abs().max():.2f}")
        assert d <= ONE_PASS_TOL
        assert (a - want).abs().max().item() <= REF_TOL
        assert (b - want).abs().max().item() <= REF_TOL
        assert want.abs().max() > 0.1
    # both: [eps_pix, eps_sem] from one call equals the two separate passes
    one = _eps_fn(pisa_model, world.context, 1.0, 1.0, one_pass=True, both=True)
    two = _eps_fn(pisa_model, world.context, 1.0, 1.0, one_pass=False, both=True)
    a, b = one(x), two(x)
    assert a.shape == (1, 8, 24, 32)
    assert (a - b).abs().max().item() <= ONE_PASS_TOL
    pix = ref.eps(x, default=False, lambda_pix=1.0, lambda_sem=0.0)
    sem = ref.eps(x, default=True)
    assert (a[:, :4] - pix).abs().max().item() <= REF_TOL
    assert (a[:, 4:] - sem).abs().max().item() <= REF_TOL
    print(f"worst one-pass vs two-pass: {worst:.2e}")


def test_unet_eps_is_the_raw_unet_output(world, pisa_model):
    """unet.unet_eps_t1 returns the diffusion model's own output (captured by a wrapper), bit for bit, not the
    fp32 recovery ``(x - denoised) / sigma`` that would amplify rounding 25x."""
    unet = _unet()
    z = pisa_model.model.process_latent_in(_latent(16, 24, seed=9)["samples"])
    _compat().load_model(pisa_model, [1, 4, 16, 24])
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
    from helpers import make_image, pil_to_image

    unet = _unet()
    (lat,) = run_node("PiSA_EncodeLQ", image=pil_to_image(make_image(40, 36, seed=1)), vae=world.comfy_vae,
                      upscale=4, resize_filter="bicubic")
    z = pisa_model.model.process_latent_in(lat["samples"])
    _compat().load_model(pisa_model, [2, *z.shape[1:]])
    s = unet.sigma_t1(pisa_model)
    single = unet.unet_eps_t1(pisa_model, z, world.context, s)
    double = unet.unet_eps_t1(pisa_model, torch.cat([z, z]), world.context.expand(2, -1, -1), s)
    floor = (double[:1] - single).abs().max().item()
    one = _eps_fn(pisa_model, world.context, 0.5, 1.5, one_pass=True)
    two = _eps_fn(pisa_model, world.context, 0.5, 1.5, one_pass=False)
    d = (one(z) - two(z)).abs().max().item()
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
    log = CallLog(monkeypatch, pisa_model)
    z, eps = _eps(pisa_model, world.conditioning, _latent(28, 28), lp, ls, 16, 4, both=both,
                  tiles_per_call=1)  # 2x2 tiles
    assert len(log.calls) == calls
    assert all(b == batch for b, _ in log.calls)
    assert all((n > 0) == hooked for _, n in log.calls)
    assert eps.shape == (1, 8 if both else 4, 28, 28)
    assert _all_hooks(pisa_model) == 0


def test_tile_batching_gives_same_result(monkeypatch, world, pisa_model):
    lat = _latent(28, 40, seed=3)  # tile 16, overlap 4: 2 x 3 = 6 tiles
    for lp, ls in [(0.8, 1.2)]:  # adjustable: batching of tiles and of [z, z] together
        results = {}
        for n in (1, 4, 6):
            log = CallLog(monkeypatch, pisa_model)
            results[n] = _eps(pisa_model, world.conditioning, lat, lp, ls, 16, 4, tiles_per_call=n)[1]
            assert len(log.calls) == -(-6 // n)
            monkeypatch.undo()
        for n in (4, 6):
            d = (results[n] - results[1]).abs().max().item()
            print(f"({lp},{ls}) {n} tiles per call vs 1: {d:.2e}")
            assert d <= ONE_PASS_TOL


# ---------------------------------------------------------------------------------------------- thin latents
@pytest.mark.parametrize("h,w,lp,ls", [(8, 200, 0.8, 1.2), (200, 8, 0.8, 0.0), (100, 90, 1.0, 1.0)])
def test_thin_latents_untiled_match_reference(world, pisa_model, ref, h, w, lp, ls):
    """Under the release's area rule (h*w <= 96^2) these run whole; compared with the reference."""
    z, eps = _eps(pisa_model, world.conditioning, _latent(h, w), lp, ls, 96, 32)
    want = ref.eps(z.cpu(), default=(lp == ls == 1.0), lambda_pix=lp, lambda_sem=ls)
    assert eps.shape == (1, 4, h, w)
    assert (eps.cpu() - want).abs().max().item() <= REF_TOL


@pytest.mark.parametrize("h,w", [(8, 1200), (600, 16)])
def test_thin_latents_tiled(world, pisa_model, h, w):
    """Area > 96^2 with a side < 96: the release loops forever here; we use one tile across the short side."""
    z, eps = _eps(pisa_model, world.conditioning, _latent(h, w, seed=5), 1.0, 1.0, 96, 32)
    assert eps.shape == (1, 4, h, w) and torch.isfinite(eps).all()
    # Pixels 0..63 along the long side are covered by the first tile alone: they equal that tile's own eps.
    sl = (slice(None), slice(None), slice(0, min(h, 96)), slice(0, min(w, 96)))
    first = _unet().unet_eps_t1(pisa_model, z[sl], world.context, _unet().sigma_t1(pisa_model)).to(eps.device)
    core = (slice(None), slice(None), slice(0, min(h, 64)), slice(0, min(w, 64)))
    assert (eps[core] - first[core]).abs().max().item() <= ONE_PASS_TOL


# ---------------------------------------------------------------------------------------------- hook hygiene
def test_hooks_removed_after_return_and_raise(monkeypatch, world, pisa_model):
    (out,) = run_node("PiSA_Sample", model=pisa_model, positive=world.conditioning, latent=_latent(24, 24),
                      lambda_pix=0.8, lambda_sem=1.2)
    assert _all_hooks(pisa_model) == 0 and out["samples"].shape == (1, 4, 24, 24)
    log = CallLog(monkeypatch, pisa_model, fail=lambda i: RuntimeError("boom inside the UNet"))
    for lp, ls in [(0.8, 1.2), (0.8, 0.0)]:
        with pytest.raises(RuntimeError, match="boom"):
            run_node("PiSA_Sample", model=pisa_model, positive=world.conditioning, latent=_latent(24, 24),
                     lambda_pix=lp, lambda_sem=ls)
        assert log.calls[-1][1] > 0  # the hooks were in place when it failed...
        assert _all_hooks(pisa_model) == 0  # ...and are gone now


# ---------------------------------------------------------------------------------------------- OOM fallback
def _oom():
    import comfy.model_management as mm

    return mm.OOM_EXCEPTION("CUDA out of memory (simulated)")


def test_oom_retries_with_fewer_tiles(monkeypatch, world, pisa_model, caplog):
    lat = _latent(28, 40, seed=3)  # 6 tiles
    base = _eps(pisa_model, world.conditioning, lat, 0.8, 1.2, 16, 4, tiles_per_call=4)[1]
    log = CallLog(monkeypatch, pisa_model, fail=lambda i: _oom() if i == 0 else None)
    with caplog.at_level(logging.WARNING, logger="PiSA-SR"):
        eps = _eps(pisa_model, world.conditioning, lat, 0.8, 1.2, 16, 4, tiles_per_call=4)[1]
    assert "retrying with 2 tile(s) per UNet call" in caplog.text
    assert [b for b, _ in log.calls] == [8] + [4, 4, 4]  # 4 tiles x [z, z] failed; then 2 tiles x 2 per call
    assert (eps - base).abs().max().item() <= ONE_PASS_TOL
    assert _all_hooks(pisa_model) == 0


def test_oom_falls_back_to_two_passes(monkeypatch, world, pisa_model, caplog):
    lat = _latent(28, 28, seed=4)  # 4 tiles
    base = _eps(pisa_model, world.conditioning, lat, 0.8, 1.2, 16, 4, tiles_per_call=1)[1]
    log = CallLog(monkeypatch, pisa_model, fail=lambda i: _oom() if i == 0 else None)
    with caplog.at_level(logging.WARNING, logger="PiSA-SR"):
        eps = _eps(pisa_model, world.conditioning, lat, 0.8, 1.2, 16, 4, tiles_per_call=1)[1]
    assert "two UNet passes per tile" in caplog.text
    assert [b for b, _ in log.calls] == [2] + [1] * 8  # failed [z, z]; then pix and sem separately per tile
    assert [n > 0 for _, n in log.calls[1:]] == [True, False] * 4  # hooks only for the pix pass
    d = (eps - base).abs().max().item()
    print(f"two-pass fallback vs one-pass: {d:.2e}")
    assert d <= ONE_PASS_TOL
    # Out of memory at every size: a clear error, no hooks left behind.
    CallLog(monkeypatch, pisa_model, fail=lambda i: _oom())
    with pytest.raises(Exception, match="out of memory even with one tile per call"):
        _eps(pisa_model, world.conditioning, lat, 0.8, 1.2, 16, 4, tiles_per_call=1)
    assert _all_hooks(pisa_model) == 0


# ---------------------------------------------------------------------------------------------- precision
def test_precision_option(world, pisa_model, ref):
    schema = host.node("PiSA_Sample").define_schema()
    inp = next(i for i in schema.inputs if i.id == "precision")
    assert inp.default == "auto" and inp.tooltip and list(inp.options) == ["auto", "fp16", "bf16", "fp32"]

    compat = _compat()
    lat = _latent(32, 40, seed=6)
    assert compat.compute_dtype(pisa_model) == torch.float32  # what ComfyUI chose on this CPU host
    z, auto = _eps(pisa_model, world.conditioning, lat, 0.8, 1.2)
    _, fp32 = _eps(pisa_model, world.conditioning, lat, 0.8, 1.2, precision="fp32")
    want = ref.eps(z.cpu(), default=False, lambda_pix=0.8, lambda_sem=1.2)
    assert torch.equal(auto, fp32)  # fp32 on an fp32 model is the model itself
    assert (fp32.cpu() - want).abs().max().item() <= REF_TOL

    seen = []
    probe = pisa_model.model.get_submodule("diffusion_model.input_blocks.0.0")
    handle = probe.register_forward_hook(lambda m, i, o: seen.append(i[0].dtype))
    try:
        _, bf16 = _eps(pisa_model, world.conditioning, lat, 0.8, 1.2, precision="bf16")
    finally:
        handle.remove()
    assert seen == [torch.bfloat16]  # the UNet really ran in bf16...
    assert bf16.dtype == torch.float32  # ...and the mix and blending stayed fp32
    d = (bf16 - fp32).abs().max().item()
    rel = d / fp32.abs().max().item()
    rms = ((bf16 - fp32).pow(2).mean() / fp32.pow(2).mean()).sqrt().item()
    print(f"bf16 vs fp32 eps: max abs diff {d:.2e} = {rel:.3f} of max |eps| ({fp32.abs().max():.2f}); "
          f"relative RMS {rms:.4f}")
    assert 0 < rel <= BF16_REL_TOL
    clone = _unet().with_compute_dtype(pisa_model, torch.bfloat16)
    assert _unet().with_compute_dtype(pisa_model, torch.bfloat16) is clone  # reused: no reload per queued prompt
    assert compat.compute_dtype(clone) == torch.bfloat16 and compat.compute_dtype(pisa_model) == torch.float32

    # Back to auto: the shared weights and casting flags were restored exactly.
    _, again = _eps(pisa_model, world.conditioning, lat, 0.8, 1.2)
    assert torch.equal(again, auto)
    (out,) = run_node("PiSA_Sample", model=pisa_model, positive=world.conditioning, latent=lat, lambda_pix=0.8,
                      lambda_sem=1.2, precision="bf16")
    assert torch.isfinite(out["samples"]).all()
