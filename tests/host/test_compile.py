"""PiSA_Sample on a MODEL from ComfyUI's TorchCompileModel (its own ``set_torch_compile_wrapper``, backend "eager"
so it runs on the CPU): every mode must equal the uncompiled MODEL's result, whatever ran before on the same
compiled model. Dynamo does not guard on module hooks (``skip_nnmodule_hook_guards``), so a graph traced during a
hook-free default call would otherwise serve pixel-only and adjustable calls without the sem-removal hooks (off by
~30 and ~13 in the latent on this tiny model).

A UNet compiled another way (an object patch of diffusion_model, as TorchCompileModel did before its wrapper) cannot
be routed around; there the hooked modes are refused (docs/errors.md) rather than silently wrong.

Tolerance: COMPILED_TOL absolute on raw latents of magnitude ~30-40 (measured: 0, the eager backend runs the same ops).
"""
from __future__ import annotations

import re

import pytest
import torch

import host  # boots ComfyUI before comfy_api is imported
from comfy_api.torch_helpers import set_torch_compile_wrapper
from helpers import forward_hooks, max_diff, random_latent, run_node

COMPILED_TOL = 1e-5
# (lambda_pix, lambda_sem, frames), in this order on one compiled model: the default mode is traced first, then
# pixel-only reuses its batch-2 shape, adjustable on one frame calls the UNet on [z, z] (batch 2 again), on two
# frames on batch 4, and the default mode must still be right after the hooked calls.
RUNS = [(1.0, 1.0, 2), (1.0, 0.0, 2), (0.8, 1.3, 1), (0.8, 1.3, 2), (1.0, 1.0, 2)]


from pisa_sr.errors import PisaError


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches cleared before and after, so no graph of another test is reused."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def sample(world, model, lp, ls, frames):
    lat = random_latent(24, 24, seed=1, b=frames)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return run_node("PiSA_Sample", model=model, positive=world.conditioning, latent=lat, lambda_pix=lp,
                        lambda_sem=ls)[0]["samples"]


def test_compiled_model_gives_the_uncompiled_result(world, pisa_model, fresh_dynamo):
    compiled = pisa_model.clone()  # as TorchCompileModel returns it
    set_torch_compile_wrapper(model=compiled, backend="eager")
    counters = torch._dynamo.utils.counters["stats"]
    for i, (lp, ls, frames) in enumerate(RUNS):
        graphs = counters["unique_graphs"]
        got, want = sample(world, compiled, lp, ls, frames), sample(world, pisa_model, lp, ls, frames)
        print(f"({lp},{ls}) x{frames} frames: compiled vs uncompiled {max_diff(got, want):.2e}, "
              f"|latent| max {want.abs().max():.1f}")
        if i == 0:
            assert counters["unique_graphs"] > graphs  # the default mode really ran the compiled UNet
        assert got.shape == want.shape == (frames, 4, 24, 24)
        assert max_diff(got, want) <= COMPILED_TOL
        assert want.abs().max() > 1.0


def test_unet_compiled_elsewhere_is_right_or_refused(world, pisa_model, fresh_dynamo):
    """Every run gives the uncompiled result or the refusal; pixel-only right after a default run (the graph traced
    without the hooks would serve it) is refused. Adjustable on two frames calls the UNet on a new shape, which
    dynamo traces with the hooks in place: right."""
    patched = pisa_model.clone()
    patched.add_object_patch("diffusion_model", torch.compile(patched.get_model_object("diffusion_model"),
                                                              backend="eager"))
    refused = []
    for lp, ls, frames in RUNS:
        want = sample(world, pisa_model, lp, ls, frames)
        try:
            got = sample(world, patched, lp, ls, frames)
        except PisaError as e:
            assert re.fullmatch(r"Dual-Guided One-Step Sample: .*without the sem-LoRA removal hooks.*"
                                r"TorchCompileModel is fine.*lambda_pix = lambda_sem\.", str(e))
            refused.append((lp, ls, frames))
        else:
            print(f"({lp},{ls}) x{frames} frames: object-patch compiled vs uncompiled {max_diff(got, want):.2e}")
            assert max_diff(got, want) <= COMPILED_TOL
        assert forward_hooks(pisa_model) == 0
    print("refused:", refused)
    assert (1.0, 0.0, 2) in refused and (1.0, 1.0, 2) not in refused
    host.pack("nodes.compat").load_model(pisa_model, [1, 4, 24, 24])  # ComfyUI undoes the patch for later tests
    assert not isinstance(pisa_model.model.diffusion_model, torch._dynamo.eval_frame.OptimizedModule)
