"""Each newer-ComfyUI branch of nodes/compat.py, driven by a stand-in shaped like that version's object (issue 13).

The newest backend (ModelPatcherDynamic, default on NVIDIA) could only be read, not run here; these tests pin what
the pack does when it meets those objects, and that the 0.3.75 path (the real host) is unchanged.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import comfy.model_management as mm
import comfy.patcher_extension
import host
from conftest import run_node
from helpers import make_image, pil_to_image

GIB = 1 << 30


@pytest.fixture(scope="module")
def compat():
    return host.pack("nodes.compat")


class DynamicPatcher:
    """Shaped like ModelPatcherDynamic as issue 13 reads it: is_dynamic(), its own get_free_memory(device), and a
    memory_required padded by x1.3 + 1 GiB."""

    load_device = torch.device("cpu")

    def __init__(self, per_item: int, free: int):
        self.per_item, self.free, self.asked = per_item, free, []

    def is_dynamic(self) -> bool:
        return True

    def get_free_memory(self, device):
        self.asked.append(device)
        return self.free

    def memory_required(self, shape):
        return int(1.3 * shape[0] * self.per_item) + GIB


def test_is_dynamic(compat, world):
    assert compat.is_dynamic(DynamicPatcher(1, 1))
    assert not compat.is_dynamic(world.model)  # 0.3.75's ModelPatcher has no is_dynamic


def test_free_memory_asks_the_dynamic_patcher(compat, world, monkeypatch):
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: 7)
    dyn = DynamicPatcher(1, 12345)
    assert compat.free_memory(dyn) == 12345 and dyn.asked == [torch.device("cpu")]
    assert compat.free_memory(world.model) == 7  # 0.3.75: the manager's query


def test_padded_estimate_is_counted_once_per_call(compat, monkeypatch):
    """With the dynamic patcher's padding a per-tile estimate of 1.3*t + 1 GiB would allow one tile per call."""
    unet = host.pack("nodes.unet")
    per = 200 << 20  # 200 MiB per tile and pass
    free = 3 * GIB
    dyn = DynamicPatcher(per, free)
    fixed, slope = compat.per_item_memory(dyn, [2, 4, 96, 96])
    assert slope == int(1.3 * 4 * per) - int(1.3 * 2 * per)  # the padding's constant drops out
    n = unet.tiles_per_call_for(dyn, [1, 4, 96, 96], 2)
    assert n == int((0.8 * free - fixed) // slope)
    assert n > 1
    assert dyn.memory_required([n * 2, 4, 96, 96]) <= 0.8 * free + 1  # the chosen batch fits the padded estimate


def test_linear_estimate_matches_per_tile_division(compat, world):
    """0.3.75's memory_required is proportional to the batch: the slope form changes nothing there."""
    fixed, per = compat.per_item_memory(world.model, [2, 4, 24, 24])
    assert abs(per - compat.memory_required(world.model, [2, 4, 24, 24])) <= 1  # int() of a float estimate
    assert fixed <= 1


def test_load_model_runs_pre_run_callbacks(compat, world):
    """ComfyUI's samplers call the patcher's pre_run before the UNet; so does the pack (0.3.75 ModelPatcher)."""
    m = world.model.clone()
    seen = []
    m.add_callback(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, lambda patcher: seen.append(patcher))
    compat.load_model(m, [1, 4, 8, 8])
    assert seen == [m]


def test_vae_ops_enter_the_vae_device_context(compat, world, monkeypatch):
    """Newer ComfyUI wraps VAE work in mm.cuda_device_context(vae.device); the pack's VAE ops do the same."""
    entered = []

    @contextlib.contextmanager
    def cuda_device_context(device):
        entered.append(device)
        yield

    assert isinstance(compat.vae_device_context(world.comfy_vae), contextlib.nullcontext)  # 0.3.75: none
    monkeypatch.setattr(mm, "cuda_device_context", cuda_device_context, raising=False)
    image = pil_to_image(make_image(16, 16, seed=3))
    (lat,) = run_node("PiSA_EncodeLQ", image=image, vae=world.comfy_vae, upscale=1, resize_filter="bicubic")
    assert entered and all(torch.device(d) == torch.device(world.comfy_vae.device) for d in entered)
    assert torch.isfinite(lat["samples"]).all()
