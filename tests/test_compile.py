"""PiSA_Sample on a MODEL from ComfyUI's TorchCompileModel (its own ``set_torch_compile_wrapper``, backend "eager"
so it runs on the CPU): every mode must equal the uncompiled MODEL's result, whatever ran before on the same
compiled model. Dynamo does not guard on module hooks (``skip_nnmodule_hook_guards``), so a graph traced during a
hook-free default call would otherwise serve pixel-only and adjustable calls without the sem-removal hooks (off by
~30 and ~13 in the latent on this tiny model).

Tolerance: COMPILED_TOL absolute on raw latents of magnitude ~30-40 (measured: 0, the eager backend runs the same ops).
"""
from __future__ import annotations

import pytest
import torch

import host  # noqa: F401  (boots ComfyUI before comfy_api is imported)
from comfy_api.torch_helpers import set_torch_compile_wrapper
from helpers import max_diff, random_latent, run_node

COMPILED_TOL = 1e-5
# (lambda_pix, lambda_sem, frames), in this order on one compiled model: the default mode is traced first, then
# pixel-only reuses its batch-2 shape, adjustable on one frame calls the UNet on [z, z] (batch 2 again), on two
# frames on batch 4, and the default mode must still be right after the hooked calls.
RUNS = [(1.0, 1.0, 2), (1.0, 0.0, 2), (0.8, 1.3, 1), (0.8, 1.3, 2), (1.0, 1.0, 2)]


@pytest.fixture
def compiled(pisa_model):
    """A clone of the PiSA MODEL as TorchCompileModel returns it; dynamo's caches are cleared before and after, so
    no graph of another test is reused."""
    torch._dynamo.reset()
    m = pisa_model.clone()
    set_torch_compile_wrapper(model=m, backend="eager")
    yield m
    torch._dynamo.reset()


def test_compiled_model_gives_the_uncompiled_result(world, pisa_model, compiled):
    counters = torch._dynamo.utils.counters["stats"]

    def sample(model, lp, ls, frames):
        lat = random_latent(24, 24, seed=1, b=frames)
        with torch.inference_mode():  # as ComfyUI's executor runs nodes
            return run_node("PiSA_Sample", model=model, positive=world.conditioning, latent=lat, lambda_pix=lp,
                            lambda_sem=ls)[0]["samples"]

    for i, (lp, ls, frames) in enumerate(RUNS):
        graphs = counters["unique_graphs"]
        got, want = sample(compiled, lp, ls, frames), sample(pisa_model, lp, ls, frames)
        print(f"({lp},{ls}) x{frames} frames: compiled vs uncompiled {max_diff(got, want):.2e}, "
              f"|latent| max {want.abs().max():.1f}")
        if i == 0:
            assert counters["unique_graphs"] > graphs  # the default mode really ran the compiled UNet
        assert got.shape == want.shape == (frames, 4, 24, 24)
        assert max_diff(got, want) <= COMPILED_TOL
        assert want.abs().max() > 1.0
