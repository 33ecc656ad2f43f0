"""What only other devices and precisions would show, made to fail on the CPU (issue 24).

- float64/complex: MPS has none, DirectML and some XPUs lack it, consumer GPUs run it at 1/32..1/64 speed. Every
  tensor here is on the CPU, so "fp64 on the device" cannot be read off a tensor; where fp64 is *made* can. The
  guard fails on any op that makes float64/complex data (from none) outside ``pisa_sr.runtime.host64`` (move to the
  CPU first, then widen), and on any op that moves such data to a device: what is not made there would be made on
  the device of its inputs (the model's, the IMAGE's). It wraps every node that computes.
- Out of memory: each backend's error shape fed to every retry path (sampler, VAE encode/decode, the whole-map mid
  block).
- bf16: the guard asks the model's load_device, not counting emulation, with the device facts monkeypatched.
- A bf16 IMAGE one bf16 step above 1.0 is clamped, not refused as HDR.
The fp16 VAE overflow and the bf16 refusal are refusals: tests/host/test_bad_input.py.
"""
from __future__ import annotations

import logging
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import host
from helpers import LiveBytes, make_image, no_grad, pil_to_image, run_node  # noqa: F401  (no_grad: autouse)

from pisa_sr import checks, frames, metrics, runtime, vae_tiled
from pisa_sr.errors import PisaError

ONE_PASS_TOL = 5e-5  # as tests/host/test_sampler.py
WIDE = (torch.float64, torch.complex64, torch.complex128)
PACK_DIRS = (str(host.REPO), os.path.dirname(host.pack().__file__))  # the core, and the pack as ComfyUI loaded it


def _wide(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in WIDE


class DeviceFloat64Guard(TorchDispatchMode):
    """Records every op that makes float64/complex data outside ``host64`` or moves such data to a device."""

    def __init__(self):
        super().__init__()
        self.violations: list[str] = []
        self.host64_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        wide_in = any(_wide(t) for t in tree_flatten((args, kwargs))[0])
        made = not wide_in and any(_wide(t) for t in tree_flatten(out)[0])
        moved = wide_in and func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None
        if made or moved:
            if _inside(runtime.host64.__code__):
                self.host64_ops += 1
            else:
                self.violations.append(f"{func} {'moves' if moved else 'makes'} {_dtypes(out)} at {_where()}")
        return out


def _dtypes(out) -> str:
    return ",".join(str(t.dtype) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))


def _inside(code) -> bool:
    f = sys._getframe(2)
    while f is not None:
        if f.f_code is code:
            return True
        f = f.f_back
    return False


def _where() -> str:
    """The innermost frame of the pack's own code (else of anything outside torch) that issued the op."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(PACK_DIRS) and "/tests/" not in name:
            return f"{name.rsplit('/', 2)[-2]}/{name.rsplit('/', 1)[-1]}:{f.f_lineno} ({f.f_code.co_name})"
        f = f.f_back
    return "outside the pack"


def assert_clean(guard: DeviceFloat64Guard) -> None:
    assert not guard.violations, "float64/complex on the model/IMAGE device:\n" + "\n".join(
        sorted(set(guard.violations)))


def test_the_guard_fails_on_device_float64_and_passes_host64():
    """The guard is not vacuous: what the pack did before issue 24 is caught, host64 is not."""
    x = torch.rand(4)
    with DeviceFloat64Guard() as g:
        torch.arange(3, dtype=torch.float64, device=x.device)  # tiling.gaussian_weights at 35ae6b9
        x.to(x.device, torch.float64)  # vae_tiled statistics at 35ae6b9
        x.double()  # frames.check_frames at 35ae6b9
        torch.ones(2, dtype=torch.complex64)
    assert len(g.violations) == 4
    with DeviceFloat64Guard() as g:
        y = runtime.host64(x)
        (y * 2).sum().float()  # what is derived on the CPU from host64's result is fine
    assert g.violations == [] and g.host64_ops == 1
    with DeviceFloat64Guard() as g:
        y.to(x.device, torch.float32)  # moving fp64 to a device (here the CPU stands in for it)
    assert len(g.violations) == 1


# ---------------------------------------------------------------------------------------- float64 through the nodes
def _encode(world, seeds, tile):
    """Encode LQ of 40x36 images at x4 (model size 568x512, latent 64x71) -> (LATENT, the guard's violations)."""
    img = torch.cat([pil_to_image(make_image(40, 36, seed=s)) for s in seeds])
    with DeviceFloat64Guard() as g:
        (lat,) = run_node("PiSA_EncodeLQ", image=img, vae=world.comfy_vae, upscale=4, resize_filter="bicubic",
                          vae_tile_size=tile)
    return lat, g


@pytest.fixture(scope="module")
def encoded(world):
    """One image with the untiled VAE, a batch of two with the tiled VAE (256 px tiles)."""
    return _encode(world, (1,), 0), _encode(world, (1, 2), 256)


@pytest.fixture(scope="module")
def lat1(encoded):
    return encoded[0][0]


@pytest.fixture(scope="module")
def lat2(encoded):
    return encoded[1][0]


def test_encode_lq(encoded):
    for _, guard in encoded:
        assert_clean(guard)


@pytest.mark.parametrize("tile,lp,ls", [(0, 1.0, 1.0), (0, 0.8, 1.3), (32, 1.0, 1.0), (32, 0.8, 1.3)])
def test_sampler(world, pisa_model, lat2, tile, lp, ls):
    """Untiled and tiled, default and adjustable, batch 2."""
    with DeviceFloat64Guard() as g:
        run_node("PiSA_Sample", model=pisa_model, positive=world.conditioning, latent=lat2, lambda_pix=lp,
                 lambda_sem=ls, tile_size=tile, tile_overlap=8)
    assert_clean(g)


@pytest.mark.parametrize("color_fix", ["adain", "wavelet"])
def test_tiled_decode(world, lat1, color_fix):
    with DeviceFloat64Guard() as g:
        run_node("PiSA_Decode", latent=lat1, vae=world.comfy_vae, color_fix=color_fix, vae_tile_size=256)
    assert_clean(g)


def test_sweep_and_scores(world, pisa_model, lat1):
    with DeviceFloat64Guard() as g:
        images = run_node("PiSA_LambdaSweep", model=pisa_model, positive=world.conditioning, latent=lat1,
                          settings="0.5,1.5; 1,1", tile_size=32, tile_overlap=8, choose_best="sharpness",
                          vae=world.comfy_vae)[6]
        for metric in ("psnr", "ssim", "sharpness", "noise"):
            run_node("PiSA_QualityScore", images=images, metric=metric, reference=images[:1])
        frames.check_frames(images, images)
    assert_clean(g)


# ---------------------------------------------------------------------------------------- bounded fp64 scores
def test_fp64_scores_work_in_bands():
    """The scores' fp64 working set is a band of 2^18 map pixels, not the image: the same peak (within 5 %) for an
    image 4x taller, and at most 20 fp64 copies of one band with SSIM's 10 halo rows (42 MB here; SSIM keeps the two
    RGB bands, 5 moment images, their two blur passes and its terms; measured 19.3), where the 256x5120 image's
    luma alone is 10 MB."""
    w = 256
    peaks = {}
    for h in (1280, 5120):
        g = torch.Generator().manual_seed(h)
        a, b = torch.rand(1, h, w, 3, generator=g), torch.rand(1, h, w, 3, generator=g)
        for name, fn in (("psnr", lambda: metrics.psnr_y(a, b, 0)), ("ssim", lambda: metrics.ssim_y(a, b, 0)),
                         ("sharpness", lambda: metrics.sharpness(a)), ("noise", lambda: metrics.noise_sigma(a))):
            with LiveBytes(lambda t: "fp64" if t.dtype == torch.float64 else "other") as live:
                fn()
            peaks[name, h] = live.peak_by.get("fp64", 0)
    print({k: f"{v / 1e6:.1f} MB" for k, v in peaks.items()})
    band = 8 * ((1 << 18) // w + 10) * w
    for name in ("psnr", "ssim", "sharpness", "noise"):
        assert peaks[name, 5120] <= 1.05 * peaks[name, 1280], name
        assert 0 < peaks[name, 5120] <= 20 * band, (name, peaks[name, 5120] / band)


def test_banded_scores_equal_whole_image_scores(monkeypatch):
    """Banding changes only the fp64 summation order."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.rand(2, 70, 50, 3, generator=g), torch.rand(1, 70, 50, 3, generator=g)
    fns = (lambda: metrics.psnr_y(a, b), lambda: metrics.ssim_y(a, b), lambda: metrics.sharpness(a),
           lambda: metrics.noise_sigma(a))
    whole = [f() for f in fns]
    monkeypatch.setattr(metrics, "_BAND_PX", 7 * 50)  # bands of 7 rows, the last one short
    for f, want in zip(fns, whole):
        assert torch.allclose(f(), want, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------- out of memory
class AcceleratorError(RuntimeError):
    """Shaped like torch.AcceleratorError from CUDA: a RuntimeError with an error_code."""

    def __init__(self, msg: str, error_code: int):
        super().__init__(msg)
        self.error_code = error_code


OOM_SHAPES = {  # what each backend raises (messages abridged from the real ones)
    "cuda": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                           "capacity of 7.79 GiB of which 1.12 GiB is free."),
    "cuda-accelerator-error": lambda: AcceleratorError("CUDA error: memory allocation failure", error_code=2),
    "rocm": lambda: torch.OutOfMemoryError("HIP out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                           "capacity of 15.98 GiB of which 0 bytes is free."),
    "mps": lambda: RuntimeError("MPS backend out of memory (MPS allocated: 17.75 GB, other allocations: 1.02 GB, "
                                "max allowed: 18.13 GB). Tried to allocate 256.00 MB on private pool. Use "
                                "PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit for memory allocations"),
    "xpu": lambda: RuntimeError("XPU out of memory. Tried to allocate 1.50 GiB (GPU 0; 15.56 GiB total capacity)"),
    "xpu-level-zero": lambda: RuntimeError("level_zero backend failed with error: 39 "
                                           "(UR_RESULT_ERROR_OUT_OF_DEVICE_MEMORY)"),
    "directml": lambda: RuntimeError("Could not allocate tensor with 1073741824 bytes. There is not enough GPU "
                                     "video memory available!"),
    "host": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                                 "memory: you tried to allocate 34359738368 bytes. Error code 12"),
    "host-windows": lambda: RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1073741824 "
                                         "bytes."),
    "python": lambda: MemoryError(),
}
NOT_OOM = [RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"), ValueError("out of range"),
           AcceleratorError("CUDA error: an illegal memory access was encountered", error_code=700),
           Exception("any error (ComfyUI's OOM_EXCEPTION on DirectML is Exception)")]


def test_one_predicate_knows_every_backend():
    for kind, make in OOM_SHAPES.items():
        assert runtime.is_oom(make()), kind
    for exc in NOT_OOM:
        assert not runtime.is_oom(exc), exc
    for module in ("nodes.compat", "nodes.vae_ops", "pisa_sr.sampling", "pisa_sr.vae_tiled"):  # no other copy
        m = host.pack(module)
        assert getattr(m, "is_oom", runtime.is_oom) is runtime.is_oom and not hasattr(m, "_OOM"), module


def _fail_first(monkeypatch, module, name: str, make):
    """``module.name`` raising ``make()`` on its first call, then itself."""
    real, calls = getattr(module, name), []

    def once(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise make()
        return real(*a, **k)

    monkeypatch.setattr(module, name, once)
    return calls


@pytest.mark.parametrize("kind", OOM_SHAPES)
def test_sampler_retries_every_oom_shape(world, pisa_model, monkeypatch, caplog, kind):
    """An OOM in the UNet call retries (fewer tiles per call, then two passes): same result up to the batch-shape
    rounding of test_sampler.ONE_PASS_TOL (absolute, |eps| up to ~8)."""
    lat = {"samples": torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(3))}

    def sample():
        return run_node("PiSA_Sample", model=pisa_model, positive=world.conditioning, latent=lat, lambda_pix=0.8,
                        lambda_sem=1.3, tile_size=16, tile_overlap=4)[0]["samples"]

    want = sample()
    calls = _fail_first(monkeypatch, host.pack("nodes.unet"), "unet_eps_t1", OOM_SHAPES[kind])
    with caplog.at_level(logging.WARNING, logger="PiSA-SR"):
        got = sample()
    assert "PiSA-SR: out of memory; retrying" in caplog.text and len(calls) > 1
    assert (got - want).abs().max().item() <= ONE_PASS_TOL


VAE_RUNS = {  # (vae_ops function, the tiled-VAE function it calls, input, the tile an OOM at the whole size halves to)
    "encode": ("encode", "tiled_encode", lambda: torch.rand(1, 256, 256, 3, generator=torch.Generator().manual_seed(4)),
               128),
    "decode": ("decode", "tiled_decode", lambda: torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(4)),
               128),
}


@pytest.fixture(scope="module")
def vae_direct(world):
    """Each VAE run at the halved tile, the result an OOM retry must give."""
    vae_ops = host.pack("nodes.vae_ops")
    return {k: getattr(vae_ops, fn)(world.comfy_vae, make(), tile) for k, (fn, _, make, tile) in VAE_RUNS.items()}


@pytest.mark.parametrize("kind", OOM_SHAPES)
@pytest.mark.parametrize("run", VAE_RUNS)
def test_vae_encode_and_decode_retry_every_oom_shape(world, vae_direct, monkeypatch, caplog, run, kind):
    """An OOM in the tiled VAE retries with smaller tiles: the result is the one that tile gives directly."""
    vae_ops = host.pack("nodes.vae_ops")
    fn, inner, make, _ = VAE_RUNS[run]
    calls = _fail_first(monkeypatch, vae_ops, inner, OOM_SHAPES[kind])
    with caplog.at_level(logging.WARNING, logger="PiSA-SR"):
        got = getattr(vae_ops, fn)(world.comfy_vae, make(), 0)  # automatic: the whole image on the CPU, then half
    assert "PiSA-SR VAE: out of memory at tile" in caplog.text
    assert len(calls) == 2 and torch.equal(got, vae_direct[run])


@pytest.mark.parametrize("kind", OOM_SHAPES)
def test_whole_mid_block_falls_back_on_every_oom_shape(monkeypatch, caplog, kind):
    from test_vae_tiled import _tiny_vae

    ae = _tiny_vae(13).first_stage_model
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(14))
    want = vae_tiled.tiled_decode(ae, z, 8, whole_mid=False)
    _fail_first(monkeypatch, ae.decoder.mid.block_1, "forward", OOM_SHAPES[kind])
    with caplog.at_level(logging.WARNING):
        got = vae_tiled.tiled_decode(ae, z, 8, whole_mid=None)
    assert "running it tiled" in caplog.text
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------- bf16
def _cuda(monkeypatch, majors: dict[int, int], hip_archs: dict[int, str] | None = None):
    """Device facts: compute capability major per CUDA index (or ROCm gfx arch), current device 0, and torch's
    own bf16 answer True everywhere (it counts emulation)."""
    def props(d):
        i = torch.device(d).index or 0
        return SimpleNamespace(major=majors.get(i, 0), gcnArchName=(hip_archs or {}).get(i, ""))

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.version, "hip", "6.2" if hip_archs else None)


def test_bf16_native_asks_the_device_and_not_emulation(monkeypatch):
    _cuda(monkeypatch, {0: 8, 1: 7})  # current device Ampere, the model's Turing
    assert runtime.bf16_native("cuda:0") and not runtime.bf16_native("cuda:1")
    _cuda(monkeypatch, {}, {0: "gfx1030", 1: "gfx1100:xnack-", 2: "gfx90a:sramecc+:xnack-"})  # RDNA2, RDNA3, MI200
    assert [runtime.bf16_native(f"cuda:{i}") for i in range(3)] == [False, True, True]
    assert runtime.bf16_native("cpu")
    assert not runtime.bf16_native("mps")  # no MPS on this machine: the probe fails, as on macOS < 14
    real = torch.ones
    monkeypatch.setattr(torch, "ones", lambda *a, device=None, **k: real(*a, **k))  # a device where it runs
    assert runtime.bf16_native("mps") and runtime.bf16_native("xpu")


def test_precision_guard_uses_the_models_load_device(monkeypatch):
    unet = host.pack("nodes.unet")
    monkeypatch.setattr(unet, "compute_dtype", lambda m: torch.float32)
    monkeypatch.setattr(unet, "with_compute_dtype", lambda m, d: ("clone", d))
    _cuda(monkeypatch, {0: 8, 1: 7})
    with pytest.raises(PisaError, match="cuda:1 has no native bf16"):
        unet.model_for_precision(SimpleNamespace(load_device=torch.device("cuda:1")), "bf16")
    assert unet.model_for_precision(SimpleNamespace(load_device=torch.device("cuda:0")), "bf16")[0] == "clone"
    assert unet.model_for_precision(SimpleNamespace(load_device=torch.device("cuda:1")), "fp16")[0] == "clone"


# ---------------------------------------------------------------------------------------- IMAGE dtype slack
def test_bf16_image_one_step_over_one_is_not_hdr(world):
    step = 2.0 ** -7  # one bf16 step above 1.0
    img = torch.full((1, 16, 16, 3), 0.5, dtype=torch.bfloat16)
    img[0, 0, 0] = 1 + step
    checks.check_image(img)
    run_node("PiSA_EncodeLQ", image=img, vae=world.comfy_vae, upscale=4, resize_filter="bicubic")
    img[0, 0, 0] = 1 + 2 * step
    with pytest.raises(PisaError, match="an IMAGE holds 0..1"):
        checks.check_image(img)
    with pytest.raises(PisaError, match="an IMAGE holds 0..1"):  # fp32 keeps the 1/255 slack
        checks.check_image(img.float().clamp(max=1 + step))
