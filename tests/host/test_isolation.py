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
from helpers import run_node
from pisa_sr.tiling import plan_tiles

TILE, OVERLAP = 16, 8
LAMBDAS = [(1.0, 1.0), (1.0, 0.0), (0.5, 1.5)]  # merged (no hooks), pix-only (hooks), two-pass batched (hooks)


@pytest.fixture(scope="module")
def compat():
    return host.pack("nodes.compat")


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
    return len(plan_tiles(*lat["samples"].shape[2:], TILE, OVERLAP))


def sample(model, world, lat, lp, ls):
    with torch.no_grad():
        (out,) = run_node("PiSA_Sample", model=model, positive=world.conditioning, latent=lat, lambda_pix=lp,
                          lambda_sem=ls, tile_size=TILE, tile_overlap=OVERLAP)
    return out["samples"]


def unet_calls(monkeypatch, fn) -> list:
    """Route every UNet call through ``fn(n, real, *args)``, n counting from 1 (each ``fn`` acts at one n only, so
    later reruns pass through); returns the growing list of calls."""
    unet, calls = host.pack("nodes.unet"), []
    real = unet.unet_eps_t1
    monkeypatch.setattr(unet, "unet_eps_t1", lambda *a, **k: calls.append(1) or fn(len(calls), real, *a, **k))
    return calls


def hooked_modules(model) -> list[str]:
    """Every UNet module that carries a forward (pre-)hook, plus any global module hook."""
    names = [n for n, m in model.model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    g = torch.nn.modules.module
    return names + (["<global>"] if g._global_forward_hooks or g._global_forward_pre_hooks else [])


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
def test_exception_inside_a_tile_leaves_no_hooks_and_next_run_is_clean(world, pisa_model, latent, clean, monkeypatch,
                                                                       lam):
    def failing(n, real, *a, **k):
        if n == 2:
            raise RuntimeError("simulated failure inside tile 2")
        return real(*a, **k)

    calls = unet_calls(monkeypatch, failing)
    with pytest.raises(RuntimeError, match="simulated failure inside tile 2"):
        sample(pisa_model, world, latent, *lam)
    assert len(calls) == 2
    assert hooked_modules(world.model) == []
    assert torch.equal(sample(pisa_model, world, latent, *lam), clean[lam])


def test_out_of_memory_in_a_tile_retries_and_matches_the_clean_run(world, pisa_model, latent, clean, monkeypatch):
    def oom_once(n, real, *a, **k):
        if n == 3:
            raise mm.OOM_EXCEPTION("simulated out of memory in tile 3")
        return real(*a, **k)

    lam = (0.5, 1.5)
    calls = unet_calls(monkeypatch, oom_once)
    out = sample(pisa_model, world, latent, *lam)  # falls back to two passes per tile and finishes
    assert len(calls) > n_tiles(latent)
    # two passes instead of one batched call: equal up to fp32 rounding
    assert (out - clean[lam]).abs().max() <= 1e-5 * clean[lam].abs().max()
    assert hooked_modules(world.model) == []
    assert torch.equal(sample(pisa_model, world, latent, *lam), clean[lam])


# ------------------------------------------------------------------------------------------------ interruption
@pytest.mark.parametrize("lam,k", [((0.5, 1.5), 2), ((1.0, 0.0), 1), ((1.0, 1.0), 2)])
def test_interrupt_stops_within_one_tile_and_next_run_works(world, pisa_model, latent, clean, never, monkeypatch,
                                                            lam, k):
    assert n_tiles(latent) > k + 1

    def interrupting(n, real, *a, **kw):
        out = real(*a, **kw)
        if n == k:
            mm.interrupt_current_processing(True)  # what POST /interrupt does, while tile k is running
        return out

    calls = unet_calls(monkeypatch, interrupting)
    with pytest.raises(mm.InterruptProcessingException):
        sample(pisa_model, world, latent, *lam)
    assert len(calls) == k  # no UNet call began after the interrupt: stopped within the tile that was running
    assert hooked_modules(world.model) == []
    mm.interrupt_current_processing(False)
    assert base_weights_differ(world, never) == []
    assert torch.equal(sample(pisa_model, world, latent, *lam), clean[lam])
