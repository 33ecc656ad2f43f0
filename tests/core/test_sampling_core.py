"""The sampler's algorithm (pisa_sr.sampling) with a plain torch module as the injected ``unet(x)``: no ComfyUI.

The stand-in UNet is a small conv net whose first conv carries "pix + sem" merged; subtracting the sem LoRA in the
activations must give the net with only "pix", so every plan can be checked against two explicit nets.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from helpers import no_grad  # noqa: F401  (autouse fixture)
from pisa_sr.bypass import BypassTarget
from pisa_sr.checkpoint import LoraPair
from pisa_sr.errors import PisaError
from pisa_sr.runtime import Hooks, is_oom
from pisa_sr.sampling import check_tiles, make_eps_fn, sample_eps
from pisa_sr.tiling import axis_starts


TOL = 1e-5  # fp32, a few hundred multiply-adds per output


class Nets:
    """``sem`` (weights W + d) and ``pix`` (weights W) as two nets, plus the LoRA pair of d on ``sem``'s first conv."""

    def __init__(self, kernel: int = 3):
        g = torch.Generator().manual_seed(0)
        self.pix = torch.nn.Sequential(torch.nn.Conv2d(4, 8, kernel, padding=kernel // 2), torch.nn.SiLU(),
                                       torch.nn.Conv2d(8, 4, kernel, padding=kernel // 2))
        self.sem = copy.deepcopy(self.pix)
        down = torch.randn(2, 4, kernel, kernel, generator=g) * 0.3
        up = torch.randn(8, 2, 1, 1, generator=g) * 0.3
        with torch.no_grad():
            self.sem[0].weight += 0.5 * torch.einsum("or,rikl->oikl", up.flatten(1), down)
        self.removal = [BypassTarget(self.sem[0], LoraPair(down=down, up=up, scale=0.5), sign=-1.0)]
        self.calls: list[tuple[int, int]] = []  # (batch, forward hooks active on the LoRA'd conv)

    def unet(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[0], len(self.sem[0]._forward_hooks)))
        return self.sem(x)

    def want(self, x: torch.Tensor, lp: float, ls: float) -> torch.Tensor:
        p, s = self.pix(x), self.sem(x)
        return lp * p + ls * (s - p)


def _x(h: int = 12, w: int = 10, b: int = 1) -> torch.Tensor:
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("lp,ls", [(1.0, 1.0), (0.7, 0.7), (0.8, 0.0), (0.5, 1.5), (1.3, 0.7), (0.0, 0.0)])
@pytest.mark.parametrize("one_pass", [True, False])
def test_eps_fn_equals_the_guidance_formula_on_two_explicit_nets(lp, ls, one_pass):
    nets = Nets()
    x = _x(b=2)
    eps = make_eps_fn(nets.unet, nets.removal, lp, ls, one_pass=one_pass)(x)
    assert eps.dtype == torch.float32 and eps.shape == x.shape
    assert (eps - nets.want(x, lp, ls)).abs().max().item() <= TOL
    assert nets.want(x, 1.0, 1.0).abs().max() > 0.1 and (nets.want(x, 1, 0) - nets.want(x, 1, 1)).abs().max() > 0.01
    assert len(nets.sem[0]._forward_hooks) == 0


@pytest.mark.parametrize("lp,ls,both,one_pass,calls", [
    (1.0, 1.0, False, True, [(2, 0)]),  # default mode: one plain call
    (0.7, 0.7, False, True, [(2, 0)]),  # equal lambdas: the same call, scaled
    (0.8, 0.0, False, True, [(2, 1)]),  # pix only: one call with the sem removal hook
    (0.8, 1.2, False, True, [(4, 1)]),  # adjustable: one call on [x, x], hook on the first half
    (0.8, 1.2, False, False, [(2, 1), (2, 0)]),  # the low-memory form: two calls
    (1.0, 1.0, True, True, [(4, 1)]),  # a sweep's eps_pix and eps_sem: one call
    (0.0, 0.0, False, True, []),  # nothing to compute
])
def test_calls_per_plan(lp, ls, both, one_pass, calls):
    nets = Nets()
    x = _x(b=2)
    eps = make_eps_fn(nets.unet, nets.removal, lp, ls, one_pass=one_pass, both=both)(x)
    assert nets.calls == calls
    if both:
        assert eps.shape == (2, 8, 12, 10)
        assert (eps[:, :4] - nets.pix(x)).abs().max().item() <= TOL
        assert (eps[:, 4:] - nets.sem(x)).abs().max().item() <= TOL


def test_tiled_sampling_blends_to_the_untiled_result_for_a_pointwise_unet():
    """With 1x1 convs eps is pointwise, so Gaussian-blended tiles must give the untiled eps exactly (up to fp32)."""
    nets = Nets(kernel=1)
    x = _x(28, 40)
    whole = sample_eps(x, nets.unet, nets.removal, 0.5, 1.5, 0, 0)
    for tpc in (1, 4, 6):
        nets.calls.clear()
        tiled = sample_eps(x, nets.unet, nets.removal, 0.5, 1.5, 16, 4, tiles_per_call=tpc)
        assert (tiled - whole).abs().max().item() <= TOL
        assert len(nets.calls) == -(-6 // tpc)  # 2 x 3 tiles of 16 with overlap 4
    assert (whole - nets.want(x, 0.5, 1.5)).abs().max().item() <= TOL


def test_progress_and_interrupt_hooks():
    nets = Nets()
    seen = []

    class Stop(Exception):
        pass

    def interrupt():
        if len(seen) == 2:
            raise Stop

    hooks = Hooks(progress=lambda d, t: seen.append((d, t)), check_interrupt=interrupt)
    with pytest.raises(Stop):
        sample_eps(_x(28, 40), nets.unet, nets.removal, 0.5, 1.5, 16, 4, hooks=hooks)
    assert seen == [(1, 6), (2, 6)] and len(nets.calls) == 2
    assert len(nets.sem[0]._forward_hooks) == 0  # stopped inside a run: no hook left behind


def _failing(nets: Nets, fail):
    def unet(x):
        i = len(nets.calls)
        out = nets.unet(x)
        if (exc := fail(i)) is not None:
            raise exc
        return out
    return unet


CUDA_OOM = torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
HOST_OOM = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                        "tried to allocate 12884901888 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("error", [CUDA_OOM, HOST_OOM], ids=["device", "host"])
def test_out_of_memory_halves_tiles_per_call_then_splits_the_passes(error, caplog):
    nets = Nets()
    x = _x(28, 40)
    base = sample_eps(x, nets.unet, nets.removal, 0.8, 1.2, 16, 4, tiles_per_call=4)
    nets.calls.clear()
    emptied = []
    first_fails = _failing(nets, lambda i: error if i == 0 else None)
    caplog.set_level(logging.WARNING, logger="PiSA-SR")
    eps = sample_eps(x, first_fails, nets.removal, 0.8, 1.2, 16, 4, tiles_per_call=4,
                     hooks=Hooks(empty_cache=lambda: emptied.append(1)))
    assert [b for b, _ in nets.calls] == [8, 4, 4, 4]  # 4 tiles x [z, z] failed; then 2 tiles x 2 per call
    assert "retrying with 2 tile(s) per UNet call" in caplog.text and emptied == [1]
    assert (eps - base).abs().max().item() <= TOL

    nets.calls.clear()
    eps = sample_eps(x, first_fails, nets.removal, 0.8, 1.2, 16, 4, tiles_per_call=1)
    assert "two UNet passes per tile" in caplog.text
    assert nets.calls[0] == (2, 1) and nets.calls[1:] == [(1, 1), (1, 0)] * 6  # then pix and sem per tile
    assert (eps - base).abs().max().item() <= TOL

    with pytest.raises(PisaError, match="out of memory even with one tile per call. Lower tile_size"):
        sample_eps(x, _failing(nets, lambda i: error), nets.removal, 0.8, 1.2, 16, 4, tiles_per_call=1)
    assert len(nets.sem[0]._forward_hooks) == 0


def test_other_errors_are_not_retried():
    nets = Nets()
    with pytest.raises(RuntimeError, match="boom"):
        sample_eps(_x(28, 40), _failing(nets, lambda i: RuntimeError("boom")), nets.removal, 0.8, 1.2, 16, 4,
                   tiles_per_call=4)
    assert len(nets.calls) == 1 and len(nets.sem[0]._forward_hooks) == 0


def test_is_oom():
    assert is_oom(CUDA_OOM) and is_oom(HOST_OOM) and is_oom(MemoryError())
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) and not is_oom(ValueError("x"))


def test_tile_arguments():
    check_tiles(96, 32)
    check_tiles(0, 32)  # no tiling: the overlap is unused
    for tile, overlap in ((32, 32), (16, 32)):
        with pytest.raises(PisaError, match="tile_overlap .* must be smaller than tile_size"):
            check_tiles(tile, overlap)
    with pytest.raises(PisaError, match=">= 0"):
        check_tiles(-8, 0)
    with pytest.raises(ValueError):
        axis_starts(512, 32, 32)  # never a 1-px advance
    assert axis_starts(200, 96, 32) == [0, 64, 104] and axis_starts(8, 96, 32) == [0]


def test_lambdas_are_checked_before_any_unet_call():
    nets = Nets()
    for lp, ls in ((4.5, 1.0), (1.0, float("nan"))):
        with pytest.raises(PisaError, match="outside \\[-2, 4\\] or not a number. Use 1.0"):
            sample_eps(_x(), nets.unet, nets.removal, lp, ls, 96, 32)
    assert nets.calls == []
