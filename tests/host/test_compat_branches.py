"""Each newer-ComfyUI branch of nodes/compat.py, driven by a stand-in shaped like the upstream object it follows.

The newest backend (ModelPatcherDynamic, default on NVIDIA) could only be read, not run here. Each stand-in names the
upstream file and commit it mimics (the stored public index holds one version per file, so the commits differ); the
tests pin what the pack does when it meets those objects, and that the 0.3.75 path (the real host) is unchanged.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.patcher_extension
import host
from helpers import make_image, pil_to_image, run_node

GIB = 1 << 30
CUDA1 = torch.device("cuda", 1)  # a device object only: nothing is allocated on it


@pytest.fixture(scope="module")
def compat():
    return host.pack("nodes.compat")


class NewestBaseModel:
    """Shaped like BaseModel in Comfy-Org/ComfyUI comfy/model_base.py @ 094c74c1b7f9: memory_required(input_shape,
    cond_shapes={}) is linear in batch x latent area (0.15 MiB x memory_usage_factor per latent pixel without
    flash attention); current_patcher is what the patcher's pre_run/cleanup set."""

    memory_usage_factor = 2.0
    current_patcher = None

    def memory_required(self, input_shape, cond_shapes={}):  # noqa: B006  (upstream's signature)
        return input_shape[0] * math.prod(input_shape[2:]) * 0.15 * self.memory_usage_factor * (1024 * 1024)


class NewestPatcher:
    """Shaped like ModelPatcher in Comfy-Org/ComfyUI comfy/model_patcher.py @ 08d0e510f4e5: is_dynamic() -> False,
    get_free_memory(device) (mm.get_free_memory plus comfy_aimdo's evictable VRAM), memory_required(input_shape)
    forwarding to the BaseModel, pre_run() / cleanup() setting and clearing model.current_patcher."""

    def __init__(self, free: int, load_device=CUDA1):
        self.model, self.load_device, self.free = NewestBaseModel(), load_device, free
        self.asked: list = []  # devices get_free_memory was asked about
        self.padded_asked: list = []  # shapes the patcher's own memory_required was asked about
        self.events: list[str] = []

    def is_dynamic(self) -> bool:
        return False

    def get_free_memory(self, device):
        self.asked.append(device)
        return self.free

    def memory_required(self, input_shape):
        self.padded_asked.append(list(input_shape))
        return self.model.memory_required(input_shape=input_shape)

    def pre_run(self):
        self.model.current_patcher = self
        self.events.append("pre_run")

    def cleanup(self):
        self.model.current_patcher = None
        self.events.append("cleanup")


class NewestDynamicPatcher(NewestPatcher):
    """Shaped like ModelPatcherDynamic in Comfy-Org/ComfyUI comfy/model_patcher.py @ 08d0e510f4e5 (a ModelPatcher
    subclass; a CPU load device is rerouted to ModelPatcher, so it always has an accelerator): is_dynamic() -> True,
    memory_required padded x1.3 + 1 GiB ("only used when using the ModelPatcherDynamic after ModelPatcher")."""

    def is_dynamic(self) -> bool:
        return True

    def memory_required(self, input_shape):
        return super().memory_required(input_shape) * 1.3 + (1024 ** 3)


def record_device_context(monkeypatch) -> list:
    """Installs a stand-in shaped like cuda_device_context(device) in Comfy-Org/ComfyUI comfy/model_management.py @
    02b2b3886164: a context manager taking a torch.device that acts only for a cuda device with an index (here it
    records that device, else None, instead of setting torch.cuda's current device). Returns the record."""
    entered: list = []

    @contextlib.contextmanager
    def cuda_device_context(device):
        entered.append(device if device.type == "cuda" and device.index is not None else None)
        yield

    monkeypatch.setattr(mm, "cuda_device_context", cuda_device_context, raising=False)
    return entered


@pytest.mark.parametrize("cls", [NewestPatcher, NewestDynamicPatcher])
def test_free_memory_asks_the_patcher(compat, world, monkeypatch, cls):
    """Newest core sizes batches with model.current_patcher.get_free_memory(device) (samplers.py @ 311c01406130)
    for either patcher; 0.3.75's ModelPatcher has no such method, so the manager's query stays."""
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: 7)
    p = cls(12345)
    assert compat.free_memory(p) == 12345 and p.asked == [CUDA1]
    # the host's own patcher: 0.3.75's has no get_free_memory (the manager is asked); 0.30.0's ModelPatcher has it
    # (mm.get_free_memory + comfy_aimdo's evictable VRAM, none on the CPU), and compat asks it (test below)
    assert compat.free_memory(world.model) == 7


def test_free_memory_asks_the_hosts_real_patcher(compat, world, monkeypatch):
    """On a host whose ModelPatcher has get_free_memory (0.30.0), the pack asks that real method for the UNet and
    the VAE, on their own devices; where it has none (0.3.75), the manager's answer is used for both."""
    vae = world.comfy_vae
    if not hasattr(comfy.model_patcher.ModelPatcher, "get_free_memory"):
        monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: 11)
        assert compat.free_memory(world.model) == 11 and compat.vae_free_memory(vae) == 11
        return
    asked = []
    real = comfy.model_patcher.ModelPatcher.get_free_memory

    def spy(self, device):
        asked.append((self, device))
        return real(self, device)

    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "get_free_memory", spy)
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: 7)
    assert compat.free_memory(world.model) == 7 and compat.vae_free_memory(vae) == 7  # no aimdo VRAM on the CPU
    assert asked == [(world.model, torch.device(world.model.load_device)), (vae.patcher, torch.device(vae.device))]


def test_vae_free_memory_asks_the_vae_patcher(compat, world, monkeypatch):
    """VAE.encode/decode size batches with self.patcher.get_free_memory(self.device) (sd.py @ 033046cc4fac)."""
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: 7)
    vae = world.comfy_vae
    assert compat.vae_free_memory(vae) == 7  # 0.3.75
    p = NewestDynamicPatcher(54321)
    monkeypatch.setattr(vae, "patcher", p)
    assert compat.vae_free_memory(vae) == 54321 and p.asked == [torch.device(vae.device)]


def test_estimate_is_the_diffusion_models_not_the_padded_one(compat):
    """Core estimates UNet memory with the BaseModel (sampler_helpers.py @ 53757775fa60, samplers.py @
    311c01406130); ModelPatcherDynamic's padded x1.3 + 1 GiB estimate is not what sizes a sampler's batch."""
    dyn = NewestDynamicPatcher(3 * GIB)
    shape = [2, 4, 96, 96]
    assert compat.memory_required(dyn, shape) == int(dyn.model.memory_required(shape))
    assert dyn.padded_asked == []
    assert dyn.memory_required(shape) > compat.memory_required(dyn, shape) + GIB  # what the pack no longer reads


def test_tiles_per_call_under_the_dynamic_patcher(compat):
    """Several 32x32 tiles (two passes each) per call fit 3 GiB under the dynamic patcher; its padded estimate
    would have allowed one."""
    unet = host.pack("nodes.unet")
    dyn = NewestDynamicPatcher(3 * GIB)
    tile = [1, 4, 32, 32]
    fixed, per = unet.per_item_memory(dyn, [2] + tile[1:])
    assert fixed == 0 and per == int(dyn.model.memory_required([2] + tile[1:]))  # linear: no fixed part
    n = unet.tiles_per_call_for(dyn, tile, 2)
    assert n == min(unet.MAX_TILES_PER_CALL, int(0.8 * dyn.free // per)) and n > 1
    assert dyn.asked == [CUDA1] and dyn.padded_asked == []
    assert dyn.memory_required([4] + tile[1:]) > 0.8 * dyn.free  # padded: two tiles of two passes do not fit


def test_linear_estimate_matches_per_tile_division(compat, world):
    """0.3.75's ModelPatcher.memory_required forwards to the BaseModel: the slope form changes nothing there."""
    fixed, per = host.pack("nodes.unet").per_item_memory(world.model, [2, 4, 24, 24])
    assert abs(per - world.model.memory_required([2, 4, 24, 24])) <= 1  # int() of a float estimate
    assert fixed <= 1


def test_unet_session_brackets_like_the_sampler(compat, monkeypatch):
    """CFGGuider.outer_sample (samplers.py @ 311c01406130): pre_run() inside cuda_device_context(load_device),
    the UNet calls, cleanup() in a finally."""
    entered = record_device_context(monkeypatch)
    p = NewestDynamicPatcher(GIB)
    with pytest.raises(RuntimeError):
        with compat.unet_session(p):
            assert p.model.current_patcher is p and p.events == ["pre_run"]
            raise RuntimeError("a failing UNet call")
    assert p.events == ["pre_run", "cleanup"] and p.model.current_patcher is None
    assert entered == [CUDA1]


def test_sampler_node_runs_pre_run_and_cleanup(world, pisa_model, monkeypatch):
    """The PiSA sampler brackets its UNet calls with the real 0.3.75 patcher's ON_PRE_RUN / ON_CLEANUP callbacks
    (0.3.75's KSampler does the same) and enters the device context around each UNet call when ComfyUI has one."""
    m, seen = pisa_model.clone(), []
    m.add_callback(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, lambda patcher: seen.append(("pre_run", patcher)))
    m.add_callback(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, lambda patcher: seen.append(("cleanup", patcher)))
    entered = record_device_context(monkeypatch)
    lat = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))}
    (out,) = run_node("PiSA_Sample", model=m, positive=world.conditioning, latent=lat)
    assert seen == [("pre_run", m), ("cleanup", m)]
    assert entered and all(e is None for e in entered)  # the CPU host: entered, and a no-op as upstream's is
    assert torch.isfinite(out["samples"]).all()


def test_vae_ops_enter_the_vae_device_context(compat, world, monkeypatch):
    """VAE.encode/decode run inside cuda_device_context(self.device) (sd.py @ 033046cc4fac); so do the pack's."""
    if hasattr(mm, "cuda_device_context"):  # 0.30.0 has it: the host's own context, a no-op for the CPU VAE
        assert not isinstance(compat.device_context(world.comfy_vae.device), contextlib.nullcontext)
    else:  # 0.3.75: none
        assert isinstance(compat.device_context(world.comfy_vae.device), contextlib.nullcontext)
    entered = record_device_context(monkeypatch)
    image = pil_to_image(make_image(16, 16, seed=3))
    (lat,) = run_node("PiSA_EncodeLQ", image=image, vae=world.comfy_vae, upscale=1, resize_filter="bicubic")
    assert entered and all(e is None for e in entered)  # the CPU VAE: entered, a no-op upstream too
    entered.clear()
    with compat.device_context(CUDA1):
        assert entered == [CUDA1]
    assert torch.isfinite(lat["samples"]).all()


@pytest.mark.parametrize("op", ["decode", "encode"])
def test_vae_claims_a_tile_not_the_untiled_estimate(op, compat, world, monkeypatch):
    """Issue 23: Decode/Encode LQ ask ComfyUI to make room for a modest tile's working set, not for ComfyUI's untiled
    per-pixel estimate (~18 GB in 16-bit for a 2048 px decode: it would unload every other model, the UNet
    included, on every prompt); that number reaches load_models_gpu as memory_required (sd.py @ 033046cc4fac)."""
    from importlib import import_module

    vae_ops = import_module(compat.__name__.rsplit(".", 1)[0] + ".vae_ops")
    seen = []

    class Loaded(Exception):
        pass

    def load_models_gpu(models, memory_required=0, **kw):
        seen.append((models, memory_required))
        raise Loaded  # what follows is the decode itself, tested elsewhere

    monkeypatch.setattr(mm, "load_models_gpu", load_models_gpu)
    vae = world.comfy_vae
    with pytest.raises(Loaded):
        if op == "decode":
            vae_ops.decode(vae, torch.zeros(1, 4, 256, 256), 0)
        else:
            vae_ops.encode(vae, torch.zeros(1, 2048, 2048, 3), 0)
    ((models, need),) = seen
    shape = [1, 4, 256, 256] if op == "decode" else [1, 3, 2048, 2048]
    untiled = getattr(vae, f"memory_used_{op}")(shape, vae.vae_dtype)
    print(f"\n{op} 2048 px ({vae.vae_dtype}): claims {need / GIB:.2f} GiB, ComfyUI's untiled {untiled / GIB:.1f} GiB")
    assert models == [vae.patcher] and 0 < need < untiled / 8


def test_search_aliases_where_the_hosts_schema_has_them(compat):
    """0.30.0's io.Schema has search_aliases (sent in /object_info, searched by front end 1.58.1): the pack's main
    nodes carry "upscale", "super resolution", "SR", "PiSA" there. 0.3.75's Schema has no such field: the nodes build
    without it and are found by name and category."""
    has = "search_aliases" in getattr(compat.io.Schema, "__dataclass_fields__", {})
    for path, cls in (("nodes.load_loras", "PiSALoadLoRAs"), ("nodes.encode_lq", "PiSAEncodeLQ"),
                      ("nodes.sample", "PiSASample"), ("nodes.decode", "PiSADecode"), ("nodes.sweep", "PiSALambdaSweep")):
        schema = getattr(host.pack(path), cls).define_schema()
        aliases = getattr(schema, "search_aliases", None)
        if has:
            assert {"upscale", "super resolution", "SR", "PiSA"} <= set(aliases), (cls, aliases)
        else:
            assert aliases is None, (cls, aliases)


def test_rarely_touched_inputs_are_advanced_where_the_host_schema_has_it(compat):
    """0.30.0's io.Input takes `advanced` (sent in /object_info; front end 1.58.1 folds such widgets under the node's
    "show advanced"): tile sizes, precision and the VAE tiling inputs are marked so, and only those. 0.3.75's Input
    has no such keyword: no input carries the field and /object_info is as before."""
    import inspect

    has = "advanced" in inspect.signature(compat.io.Input.__init__).parameters
    rare = {"tile_size", "tile_overlap", "precision", "vae_tile_size", "vae_ram_budget"}
    seen = set()
    for path, cls in (("nodes.encode_lq", "PiSAEncodeLQ"), ("nodes.sample", "PiSASample"),
                      ("nodes.decode", "PiSADecode"), ("nodes.sweep", "PiSALambdaSweep")):
        for inp in getattr(host.pack(path), cls).define_schema().inputs:
            marked = getattr(inp, "advanced", None)
            if has and inp.id in rare:
                assert marked is True and inp.as_dict()["advanced"] is True, (cls, inp.id)
                seen.add(inp.id)
            else:
                assert not marked and "advanced" not in inp.as_dict(), (cls, inp.id)
    assert seen == (rare if has else set())
