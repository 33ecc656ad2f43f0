"""GroupNorm-synchronised tiled VAE (pisa_sr.vae_tiled) against the untiled VAE and ComfyUI's own tiled nodes.

Tiny random LDM autoencoders (ComfyUI's AutoencoderKL, 4 levels so the 8x factor holds), CPU, fp32. Every norm
has random affine parameters, so equal statistics are not trivially equal outputs. The acceptance numbers of the
tiled-VAE issue are measured here and printed (run pytest with -s to see them).
"""
from __future__ import annotations

import math
import weakref

import comfy.sd
import pytest
import torch
import torch.nn.functional as F
from comfy.ldm.models.autoencoder import AutoencoderKL
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from host import comfy_nodes
from pisa_sr import vae_tiled
from pisa_sr.vae_tiled import auto_tile_size, tiled_decode, tiled_encode

# Exactness bound for fp32 (the algorithm is exact; only summation order differs): absolute, relative to range.
FP32_REL = 1e-4


def _ddconfig(attn_resolutions=()):
    return {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2, 2, 4], "num_res_blocks": 1, "attn_resolutions": list(attn_resolutions), "dropout": 0.0}


def _tiny_vae(seed: int, attn_resolutions=()) -> comfy.sd.VAE:
    """A ComfyUI VAE with seeded random weights: convs ~ randn/sqrt(fan_in), norm scales 1 +- 0.3, biases 0.1."""
    dd = _ddconfig(attn_resolutions)
    ae = AutoencoderKL(ddconfig=dd, embed_dim=4)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in ae.state_dict().items():
        if k.endswith("weight") and v.ndim > 1:
            sd[k] = torch.randn(v.shape, generator=g) / math.sqrt(v[0].numel())
        elif k.endswith("weight"):  # GroupNorm scale
            sd[k] = 1 + 0.3 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
    sd["decoder.conv_out.weight"] *= 0.5  # keep the decoded image mostly inside [-1, 1] so clamping hides little
    vae = comfy.sd.VAE(sd=sd, config={"params": {"embed_dim": 4, "ddconfig": dd}})
    vae.first_stage_model.eval()
    return vae


def _smooth_image(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    """[B,3,H,W] in [-1,1]: smooth colour fields plus fine noise, like a photo more than white noise."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.randn(b, 3, max(1, h // 16), max(1, w // 16), generator=g), size=(h, w),
                        mode="bilinear", align_corners=False)
    x = 0.6 * low + 0.15 * torch.randn(b, 3, h, w, generator=g)
    return x.clamp(-1, 1)


def _psnr(a: torch.Tensor, b: torch.Tensor, peak: float) -> float:
    mse = (a.double() - b.double()).square().mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def _to_image(x: torch.Tensor) -> torch.Tensor:
    """Decoder output -> ComfyUI IMAGE ([B,H,W,3] in [0,1]), as VAE.decode's process_output does."""
    return ((x.float() + 1) / 2).clamp(0, 1).movedim(1, -1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on the shared 2-core host, 2 threads under load make every op wait for a time slice."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vae() -> comfy.sd.VAE:
    return _tiny_vae(1)


@pytest.fixture(scope="module")
def decoded(vae):
    """One 32x32 latent decoded four ways: ours tiled (4x4 tiles of 8), untiled raw, ComfyUI untiled and tiled."""
    ae = vae.first_stage_model
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        raw_ref = ae.decode(z)
    raw_ours = tiled_decode(ae, z, 8)
    with torch.inference_mode():  # as ComfyUI runs nodes
        img_ref = vae.decode(z)
        # ComfyUI's defaults (512 px tiles, 64 px overlap) scaled to this 256 px image: 64 px tiles, 16 px overlap.
        (img_comfy,) = comfy_nodes().VAEDecodeTiled().decode(vae, {"samples": z}, 64, 16)
    return {"z": z, "raw_ref": raw_ref, "raw_ours": raw_ours, "img_ref": img_ref, "img_ours": _to_image(raw_ours),
            "img_comfy": img_comfy}


def test_tiled_decode_equals_untiled_and_beats_comfy_tiled(decoded):
    ref, ours = decoded["raw_ref"], decoded["raw_ours"]
    assert ours.shape == ref.shape == (1, 3, 256, 256)
    peak = (ref.max() - ref.min()).item()
    psnr_raw = _psnr(ours, ref, peak)
    max_abs = (ours - ref).abs().max().item()
    psnr_ours = _psnr(decoded["img_ours"], decoded["img_ref"], 1.0)
    psnr_comfy = _psnr(decoded["img_comfy"], decoded["img_ref"], 1.0)
    print(f"\n[decode 4x4 tiles] ours vs untiled: PSNR {psnr_raw:.1f} dB (raw, peak=range {peak:.2f}), "
          f"{psnr_ours:.1f} dB (image), max abs diff {max_abs:.3g}; ComfyUI VAEDecodeTiled: {psnr_comfy:.1f} dB")
    assert psnr_raw >= 50 and psnr_ours >= 50
    assert max_abs <= FP32_REL * peak
    assert psnr_ours - psnr_comfy >= 10


def test_tiled_encode_equals_untiled_and_beats_comfy_tiled(vae):
    ae = vae.first_stage_model
    x = _smooth_image(1, 256, 256, seed=3)
    pixels = ((x + 1) / 2).movedim(1, -1)  # ComfyUI IMAGE
    ours = tiled_encode(ae, x, 64)  # 4x4 tiles of 64 px
    with torch.inference_mode():  # as ComfyUI runs nodes
        ref = vae.encode(pixels)  # raw latent (posterior mode), what Encode LQ gets untiled
        (comfy_tiled,) = comfy_nodes().VAEEncodeTiled().encode(vae, pixels, 64, 16)
    comfy_tiled = comfy_tiled["samples"]
    assert ours.shape == ref.shape == comfy_tiled.shape == (1, 4, 32, 32)
    peak = (ref.max() - ref.min()).item()
    psnr_ours, psnr_comfy = _psnr(ours, ref, peak), _psnr(comfy_tiled, ref, peak)
    max_abs = (ours - ref).abs().max().item()
    print(f"\n[encode 4x4 tiles] ours vs untiled latent: PSNR {psnr_ours:.1f} dB (peak=range {peak:.2f}), "
          f"max abs diff {max_abs:.3g}; ComfyUI VAEEncodeTiled: {psnr_comfy:.1f} dB")
    assert psnr_ours >= 50
    assert max_abs <= FP32_REL * peak
    assert psnr_ours - psnr_comfy >= 10


def _seam_ratio(img: torch.Tensor, cuts: list[int]) -> float:
    """Mean |gradient| across tile-boundary rows/columns over the mean across all other rows/columns."""
    dy = (img[..., 1:, :] - img[..., :-1, :]).abs()  # dy[k]: between rows k and k+1
    dx = (img[..., :, 1:] - img[..., :, :-1]).abs()
    edge = torch.zeros(dy.shape[-2], dtype=torch.bool)
    edge[[c - 1 for c in cuts]] = True
    edge_x = torch.zeros(dx.shape[-1], dtype=torch.bool)
    edge_x[[c - 1 for c in cuts]] = True
    boundary = torch.cat([dy[..., edge, :].flatten(), dx[..., edge_x].flatten()]).double().mean()
    interior = torch.cat([dy[..., ~edge, :].flatten(), dx[..., ~edge_x].flatten()]).double().mean()
    return (boundary / interior).item()


def test_no_seams(decoded):
    cuts = [64, 128, 192]  # 4 tiles of 8 latent px per axis -> boundaries every 64 output px
    seam = _seam_ratio(decoded["raw_ours"], cuts) / _seam_ratio(decoded["raw_ref"], cuts)
    comfy = _seam_ratio(decoded["img_comfy"].movedim(-1, 1), cuts)
    comfy /= _seam_ratio(decoded["img_ref"].movedim(-1, 1), cuts)
    print(f"\n[seams] boundary/interior gradient ratio, tiled over untiled: ours {seam:.5f} "
          f"(ComfyUI tiled at the same lines, for reference: {comfy:.4f})")
    assert abs(seam - 1) <= 0.02


def test_no_colour_shift(decoded):
    ours, ref, comfy = (decoded[k].reshape(-1, 3).double() for k in ("img_ours", "img_ref", "img_comfy"))
    d_mean = (ours.mean(0) - ref.mean(0)).abs().max().item()
    d_std = (ours.std(0) - ref.std(0)).abs().max().item()
    c_mean = (comfy.mean(0) - ref.mean(0)).abs().max().item()
    c_std = (comfy.std(0) - ref.std(0)).abs().max().item()
    print(f"\n[colour] max per-channel |delta| in 1/255: ours mean {d_mean * 255:.2e} std {d_std * 255:.2e}; "
          f"ComfyUI tiled mean {c_mean * 255:.3f} std {c_std * 255:.3f}")
    assert d_mean <= 0.5 / 255 and d_std <= 0.5 / 255


@pytest.mark.parametrize("whole_mid", [None, False])
def test_attention_exact_in_both_mid_modes_and_in_levels(whole_mid):
    """The tiled (streamed) attention is exact too, for the mid block and for attention inside a level."""
    ae = _tiny_vae(4, attn_resolutions=[32]).first_stage_model  # attention in the latent-resolution level too
    z = torch.randn(2, 4, 24, 20, generator=torch.Generator().manual_seed(5))  # batch 2: per-sample statistics
    x = _smooth_image(2, 160, 192, seed=6)
    with torch.no_grad():
        ref_d, ref_e = ae.decode(z), ae.encode(x)
    out_d = tiled_decode(ae, z, 8, whole_mid=whole_mid)
    out_e = tiled_encode(ae, x, 64, whole_mid=whole_mid)
    for out, ref in ((out_d, ref_d), (out_e, ref_e)):
        assert out.shape == ref.shape
        peak = (ref.max() - ref.min()).item()
        assert (out - ref).abs().max().item() <= FP32_REL * peak
        assert _psnr(out, ref, peak) >= 50


@pytest.mark.parametrize("lat_h,lat_w", [(1, 128), (125, 3), (65, 33)])
def test_thin_and_odd_shapes(vae, lat_h, lat_w):
    ae = vae.first_stage_model
    z = torch.randn(1, 4, lat_h, lat_w, generator=torch.Generator().manual_seed(7))
    x = _smooth_image(1, lat_h * 8, lat_w * 8, seed=8)
    with torch.no_grad():
        ref_d, ref_e = ae.decode(z), ae.encode(x)
    out_d = tiled_decode(ae, z, 16)
    out_e = tiled_encode(ae, x, 128)
    assert out_d.shape == (1, 3, lat_h * 8, lat_w * 8)
    assert out_e.shape == (1, 4, lat_h, lat_w)
    for out, ref in ((out_d, ref_d), (out_e, ref_e)):
        assert (out - ref).abs().max().item() <= FP32_REL * (ref.max() - ref.min()).item()


class _LiveBytes(TorchDispatchMode):
    """Live tensor bytes by storage, split into full-size maps and the per-tile working set.

    Every aten op's outputs pass through here; an output whose storage is not one of the op's inputs' is a new
    allocation, and a weakref finalizer on the storage (torch keeps one Python object per storage) counts it
    free. A storage is a "full map" when it was created as a 4-D tensor spanning the whole image at some decoder
    resolution (h*s x w*s): on a GPU these are the maps parked in host memory between steps (and the output);
    everything else is the working set the compute device holds (tiles read from the parked maps are copies, as
    they would be on a GPU). Weights and the input existed before and are not counted. With the whole-map mid
    block its latent-size maps count as full maps too, so the assertions use the tiled mid block, where the split
    is exact.
    """

    def __init__(self, h: int, w: int):
        super().__init__()
        self.full_shapes = {(h * s, w * s) for s in (1, 2, 4, 8)}
        self.live: dict[int, tuple[int, str]] = {}
        self.now = {"work": 0, "full": 0}
        self.peak = {"work": 0, "full": 0}

    def _free(self, key: int) -> None:
        nbytes, kind = self.live.pop(key)
        self.now[kind] -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key in seen or key in self.live or st.nbytes() == 0:
                continue
            kind = "full" if t.ndim == 4 and tuple(t.shape[-2:]) in self.full_shapes else "work"
            self.live[key] = (st.nbytes(), kind)
            self.now[kind] += st.nbytes()
            self.peak[kind] = max(self.peak[kind], self.now[kind])
            weakref.finalize(st, self._free, key)
        return out


def _measure(ae, size: int, tile: int, whole_mid) -> dict[str, int]:
    z = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(9))
    with _LiveBytes(size, size) as mem:
        out = tiled_decode(ae, z, tile, whole_mid=whole_mid)
        del out
    return mem.peak


def test_peak_memory_scales_with_tile_not_image(vae):
    """Peak bytes on CPU, measured with the _LiveBytes dispatch mode (see its docstring for the method)."""
    ae = vae.first_stage_model
    small, large = _measure(ae, 16, 8, False), _measure(ae, 32, 8, False)  # 2x2 vs 4x4 tiles: 4x the area
    bigger_tile = _measure(ae, 32, 16, False)
    default_small, default_large = _measure(ae, 16, 8, None), _measure(ae, 32, 8, None)
    mib = 1 / 2**20
    print(f"\n[memory, tile 8, tiled mid] working set {small['work'] * mib:.2f} -> {large['work'] * mib:.2f} MiB "
          f"for 4x the area; parked full maps {small['full'] * mib:.2f} -> {large['full'] * mib:.2f} MiB; "
          f"tile 16 working set {bigger_tile['work'] * mib:.2f} MiB")
    print(f"[memory, tile 8, whole mid] working set {default_small['work'] * mib:.2f} -> "
          f"{default_large['work'] * mib:.2f} MiB (includes the latent-size mid block); full maps "
          f"{default_small['full'] * mib:.2f} -> {default_large['full'] * mib:.2f} MiB")
    assert large["work"] <= 1.1 * small["work"]  # independent of the image size...
    assert bigger_tile["work"] >= 2.5 * large["work"]  # ...but grows with the tile (4x its area)
    assert large["full"] >= 3 * small["full"]  # the parked maps (host memory) do scale with the image
    # the auto-size estimate's per-tile term (before its device safety factor) covers the measured working set
    for tile, measured in ((8, large["work"]), (16, bigger_tile["work"])):
        assert vae_tiled._tile_bytes(tile, is_decoder=True, dtype_bytes=4, base_channels=32) >= measured


def _module_state(ae):
    return {k: v.clone() for k, v in ae.state_dict().items()}


def _no_hooks(ae) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks) for m in ae.modules())


def test_progress_counts_and_interruption(vae):
    ae = vae.first_stage_model
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(10))
    x = _smooth_image(1, 256, 256, seed=11)
    runs = ((lambda **kw: tiled_decode(ae, z, 8, **kw), 16), (lambda **kw: tiled_encode(ae, x, 64, **kw), 16))
    for run, n_tiles in runs:
        calls, checks = [], []
        first = run(progress=lambda d, t, calls=calls: calls.append((d, t)),
                    check_interrupt=lambda checks=checks: checks.append(1))
        total = calls[-1][1]
        assert [d for d, _ in calls] == list(range(1, total + 1))  # once per tile step, in order
        assert all(t == total for _, t in calls)
        assert len(checks) == total  # checked before every unit
        assert (total - 1) % n_tiles == 0 and total > 10 * n_tiles  # one whole-map mid unit + tiles x steps

        class Stop(Exception):
            pass

        def stop_after(k):
            seen = []

            def check():
                seen.append(1)
                if len(seen) > k:
                    raise Stop

            return check

        state = _module_state(ae)
        for k in (5, total // 2):
            with pytest.raises(Stop):
                run(check_interrupt=stop_after(k))
        assert all(torch.equal(v, state[n]) for n, v in ae.state_dict().items())
        assert _no_hooks(ae)
        again = run()
        assert torch.equal(again, first)


def test_single_tile_uses_plain_path(vae):
    ae = vae.first_stage_model
    z = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(12))
    calls = []
    out = tiled_decode(ae, z, 16, progress=lambda d, t: calls.append((d, t)))
    with torch.no_grad():
        assert torch.equal(out, ae.decode(z))
    assert calls == [(1, 1)]


def test_auto_tile_size():
    gib = 2**30
    # plenty of memory: the whole image (one tile, plain path)
    assert auto_tile_size(80 * gib, 128, 128, is_decoder=True, dtype_bytes=2) == 128
    assert auto_tile_size(80 * gib, 1024, 768, is_decoder=False, dtype_bytes=2) == 1024
    # 4096 px output (512 latent) on an 8 GB card: tiles, multiples of 8 latent px, estimate within budget
    t8 = auto_tile_size(6 * gib, 512, 512, is_decoder=True, dtype_bytes=2)
    assert 16 <= t8 < 512 and t8 % 8 == 0
    assert vae_tiled._tiled_peak(t8, 512, 512, is_decoder=True, dtype_bytes=2, base_channels=128) <= 6 * gib
    assert vae_tiled._tiled_peak(t8 + 8, 512, 512, is_decoder=True, dtype_bytes=2, base_channels=128) > 6 * gib
    # monotone in free memory, never below the minimum, encode tiles multiples of 64 image px
    sizes = [auto_tile_size(f * gib, 512, 512, is_decoder=True, dtype_bytes=2) for f in (1, 2, 4, 8, 16, 64)]
    assert sizes == sorted(sizes) and sizes[0] == 16
    te = auto_tile_size(4 * gib, 4096, 4096, is_decoder=False, dtype_bytes=2)
    assert te % 64 == 0 and 128 <= te < 4096
    # fp32 needs smaller tiles than fp16
    assert auto_tile_size(6 * gib, 512, 512, is_decoder=True, dtype_bytes=4) <= t8


def test_mid_block_out_of_memory_falls_back_to_exact_tiles(caplog):
    """A device OOM in the whole-map mid block switches to the tiled attention: logged, exact, progress ends full."""
    ae = _tiny_vae(13).first_stage_model  # private model: its attention is replaced by one that runs out of memory

    def oom(q, k, v):
        raise torch.OutOfMemoryError("simulated")

    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(14))
    x = _smooth_image(1, 128, 128, seed=15)
    with torch.no_grad():
        ref_d, ref_e = ae.decode(z), ae.encode(x)
    ae.decoder.mid.attn_1.optimized_attention = oom
    ae.encoder.mid.attn_1.optimized_attention = oom
    runs = ((lambda **kw: tiled_decode(ae, z, 8, **kw), ref_d), (lambda **kw: tiled_encode(ae, x, 64, **kw), ref_e))
    for run, ref in runs:
        calls = []
        with caplog.at_level("WARNING", logger="pisa_sr.vae_tiled"):
            out = run(progress=lambda d, t, calls=calls: calls.append((d, t)))
        assert "running it tiled" in caplog.text
        caplog.clear()
        assert [d for d, _ in calls] == list(range(1, len(calls) + 1)) and calls[-1][1] == len(calls)
        assert (out - ref).abs().max().item() <= FP32_REL * (ref.max() - ref.min()).item()
        with pytest.raises(torch.OutOfMemoryError):
            run(whole_mid=True)


def test_bf16_tiling_adds_no_error_beyond_the_dtype():
    """In bf16 (ComfyUI's usual VAE dtype) tiled and untiled are equally close to the fp32 result."""
    ae32 = _tiny_vae(16).first_stage_model
    ae16 = _tiny_vae(16).first_stage_model.to(torch.bfloat16)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(17))
    x = _smooth_image(1, 128, 128, seed=18)
    with torch.no_grad():
        ref_d, ref_e = ae32.decode(z), ae32.encode(x)
        plain_d, plain_e = ae16.decode(z.bfloat16()).float(), ae16.encode(x.bfloat16()).float()
    tiled_d = tiled_decode(ae16, z.bfloat16(), 4).float()  # 4x4 tiles
    tiled_e = tiled_encode(ae16, x.bfloat16(), 32).float()
    for name, ref, plain, tiled in (("decode", ref_d, plain_d, tiled_d), ("encode", ref_e, plain_e, tiled_e)):
        peak = (ref.max() - ref.min()).item()
        p_plain, p_tiled = _psnr(plain, ref, peak), _psnr(tiled, ref, peak)
        p_between = _psnr(tiled, plain, peak)
        print(f"\n[bf16 {name}] vs fp32: untiled {p_plain:.1f} dB, tiled {p_tiled:.1f} dB; tiled vs untiled bf16 "
              f"{p_between:.1f} dB")
        assert p_tiled >= p_plain - 1.0
        assert p_between >= 45  # the GPU benchmark target for tiled vs untiled
