"""Isolation and interruption, in-process (issue 4, items 3-4 without the server).

* The base MODEL a user connects is never changed: after PiSA runs (merged, pix-only and two-pass lambdas), loading
  it the way KSampler does gives weights bit-identical to a model that never met PiSA, and KSampler's output is
  bit-identical too.
* A run that raises inside a tile, or is interrupted, leaves no forward hooks on any UNet module, and the next run
  gives exactly the clean result.
* Interrupting stops within one tile: no UNet call starts after the flag is set.

All runs use one tile per UNet call (free memory is reported as tiny), so "tile" and "call" coincide and a clean run
and a rerun batch their tiles identically. Runs are under ``torch.no_grad()``, as a server runs nodes (it uses
inference mode; no_grad avoids leaving inference tensors in the session-wide models other tests share).
"""
from __future__ import annotations

import pytest
import torch

import comfy.model_management as mm
import host
import tiny_models
from conftest import run_node
from pisa_sr.tiling import plan_tiles

TILE, OVERLAP = 16, 8
LAMBDAS = [(1.0, 1.0), (1.0, 0.0), (0.5, 1.5)]  # merged (no hooks), pix-only (hooks), two-pass batched (hooks)


@pytest.fixture(scope="module")
def compat():
    return host.pack("nodes.compat")


def unet_module():
    return host.pack("nodes.unet")


@pytest.fixture(scope="module")
def latent():
    """A 24x24 latent: 2x2 tiles of 16 with overlap 8 (no VAE needed: the sampler only reads 'samples')."""
    return {"samples": torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(11))}


@pytest.fixture(autouse=True)
def one_tile_per_call(compat, monkeypatch):
    monkeypatch.setattr(compat, "free_memory", lambda device=None: 1)
    yield
    mm.interrupt_current_processing(False)


def n_tiles(lat) -> int:
    _, _, h, w = lat["samples"].shape
    return len(plan_tiles(h, w, TILE, OVERLAP))


def sample(model, world, lat, lp, ls):
    with torch.no_grad():
        (out,) = run_node("PiSA_Sample", model=model, positive=world.conditioning, latent=lat, lambda_pix=lp,
                          lambda_sem=ls, tile_size=TILE, tile_overlap=OVERLAP)
    return out["samples"]


def hooked_modules(model) -> list[str]:
    """Every UNet module that carries a forward (pre-)hook, plus any global module hook."""
    names = [n for n, m in model.model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    g = torch.nn.modules.module
    if g._global_forward_hooks or g._global_forward_pre_hooks:
        names.append("<global>")
    return names


@pytest.fixture(scope="module")
def clean(world, pisa_model, latent, compat):
    """Clean results per lambda pair, computed before any failure is simulated."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compat, "free_memory", lambda device=None: 1)
        assert hooked_modules(world.model) == []
        return {lam: sample(pisa_model, world, latent, *lam) for lam in LAMBDAS}


@pytest.fixture(scope="module")
def never(world):
    """A model with the same weights that never met PiSA, and its KSampler output."""
    model = tiny_models.comfy_model_from_diffusers(world.unet)
    return model, ksample(model, world)


def base_weights_differ(world, never) -> list[str]:
    """Keys whose weights differ from the never-PiSA model once the base MODEL is loaded as any node loads it."""
    mm.load_models_gpu([world.model])
    ref = never[0].model.state_dict()
    base = world.model.model.state_dict()
    assert set(base) == set(ref)
    return [k for k in ref if not torch.equal(base[k], ref[k])]


def ksample(model, world) -> torch.Tensor:
    """A plain two-step KSampler run through ComfyUI's own node."""
    lat = {"samples": torch.zeros(1, 4, 16, 16)}
    with torch.no_grad():
        (out,) = host.node("KSampler")().sample(model, 7, 2, 2.0, "euler", "normal", world.conditioning,
                                                 world.conditioning, lat, 1.0)
    return out["samples"]


# ------------------------------------------------------------------------------------------------ isolation
def test_base_model_is_bit_identical_after_pisa_runs(world, pisa_model, latent, clean, never):
    for lam in LAMBDAS:
        out = sample(pisa_model, world, latent, *lam)
        assert torch.equal(out, clean[lam])  # reruns are exact, so the comparisons below can be too
        assert not torch.equal(out, latent["samples"])
    assert pisa_model.patches and not world.model.patches  # the LoRAs live on the clone only
    assert world.model.get_attachment("pisa_sr") is None and pisa_model.get_attachment("pisa_sr") is not None
    assert torch.equal(ksample(world.model, world), never[1])  # loads the base model as any KSampler would
    assert base_weights_differ(world, never) == []
    assert hooked_modules(world.model) == []
    # and the PiSA model is unaffected by the base model having run in between
    assert torch.equal(sample(pisa_model, world, latent, 0.5, 1.5), clean[(0.5, 1.5)])




# ------------------------------------------------------------------------------------------------ errors mid-run
@pytest.mark.parametrize("lam", LAMBDAS[1:])  # the two settings that hook modules
def test_exception_inside_a_tile_leaves_no_hooks_and_next_run_is_clean(world, pisa_model, latent, clean, compat,
                                                                       monkeypatch, lam):
    real = unet_module().unet_eps_t1
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure inside tile 2")
        return real(*a, **k)

    monkeypatch.setattr(unet_module(), "unet_eps_t1", failing)
    with pytest.raises(RuntimeError, match="simulated failure inside tile 2"):
        sample(pisa_model, world, latent, *lam)
    assert len(calls) == 2
    assert hooked_modules(world.model) == []
    monkeypatch.setattr(unet_module(), "unet_eps_t1", real)
    assert torch.equal(sample(pisa_model, world, latent, *lam), clean[lam])


def test_out_of_memory_in_a_tile_retries_and_matches_the_clean_run(world, pisa_model, latent, clean, compat,
                                                                   monkeypatch):
    real = unet_module().unet_eps_t1
    calls = []

    def oom_once(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise mm.OOM_EXCEPTION("simulated out of memory in tile 3")
        return real(*a, **k)

    monkeypatch.setattr(unet_module(), "unet_eps_t1", oom_once)
    lam = (0.5, 1.5)
    out = sample(pisa_model, world, latent, *lam)  # falls back to two passes per tile and finishes
    assert len(calls) > n_tiles(latent)
    # two passes instead of one batched call: equal up to fp32 rounding
    assert (out - clean[lam]).abs().max() <= 1e-5 * clean[lam].abs().max()
    assert hooked_modules(world.model) == []
    monkeypatch.setattr(unet_module(), "unet_eps_t1", real)
    assert torch.equal(sample(pisa_model, world, latent, *lam), clean[lam])


# ------------------------------------------------------------------------------------------------ interruption
@pytest.mark.parametrize("lam,k", [((0.5, 1.5), 2), ((1.0, 0.0), 1), ((1.0, 1.0), 2)])
def test_interrupt_stops_within_one_tile_and_next_run_works(world, pisa_model, latent, clean, compat, monkeypatch,
                                                            never, lam, k):
    assert n_tiles(latent) > k + 1
    real = unet_module().unet_eps_t1
    calls = []

    def interrupting(*a, **kw):
        calls.append(1)
        out = real(*a, **kw)
        if len(calls) == k:
            mm.interrupt_current_processing(True)  # what POST /interrupt does, while tile k is running
        return out

    monkeypatch.setattr(unet_module(), "unet_eps_t1", interrupting)
    with pytest.raises(mm.InterruptProcessingException):
        sample(pisa_model, world, latent, *lam)
    assert len(calls) == k  # no UNet call began after the interrupt: stopped within the tile that was running
    assert hooked_modules(world.model) == []
    mm.interrupt_current_processing(False)
    monkeypatch.setattr(unet_module(), "unet_eps_t1", real)
    assert base_weights_differ(world, never) == []
    assert torch.equal(sample(pisa_model, world, latent, *lam), clean[lam])
