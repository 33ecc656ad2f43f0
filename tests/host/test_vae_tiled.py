"""GroupNorm-synchronised tiled VAE (pisa_sr.vae_tiled) against the untiled VAE and ComfyUI's own tiled nodes.

Tiny random LDM autoencoders (ComfyUI's AutoencoderKL, 4 levels so the 8x factor holds), CPU, fp32. Every norm
has random affine parameters, so equal statistics are not trivially equal outputs. The acceptance numbers of the
tiled-VAE issue are measured here and printed (run pytest with -s to see them).
"""
from __future__ import annotations

import functools
import itertools
import math

import comfy.sd
import pytest
import torch
import torch.nn.functional as F
from comfy.ldm.models.autoencoder import AutoencoderKL

from helpers import LiveBytes
from host import comfy_nodes
from pisa_sr import vae_tiled
from pisa_sr.vae_tiled import auto_tile_size, tiled_decode, tiled_encode

# Exactness bound for fp32 (the algorithm is exact; only summation order differs): absolute, relative to range.
FP32_REL = 1e-4


def _tiny_vae(seed: int, attn_resolutions=()) -> comfy.sd.VAE:
    """A ComfyUI VAE with seeded random weights: convs ~ randn/sqrt(fan_in), norm scales 1 +- 0.3, biases 0.1."""
    dd = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
          "ch_mult": [1, 2, 2, 4], "num_res_blocks": 1, "attn_resolutions": list(attn_resolutions), "dropout": 0.0}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in AutoencoderKL(ddconfig=dd, embed_dim=4).state_dict().items():
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


def _latent(h: int, w: int, seed: int, b: int = 1) -> torch.Tensor:
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed))


def _smooth_image(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    """[B,3,H,W] in [-1,1]: smooth colour fields plus fine noise, like a photo more than white noise."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.randn(b, 3, max(1, h // 16), max(1, w // 16), generator=g), size=(h, w),
                        mode="bilinear", align_corners=False)
    return (0.6 * low + 0.15 * torch.randn(b, 3, h, w, generator=g)).clamp(-1, 1)


def _psnr(a: torch.Tensor, b: torch.Tensor, peak: float) -> float:
    mse = (a.double() - b.double()).square().mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def _assert_exact(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Tiled equals untiled up to fp32 summation order; returns ref's range (the PSNR peak)."""
    peak = (ref.max() - ref.min()).item()
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= FP32_REL * peak
    return peak


def _untiled_and_tiled(ae, z, x, decode_tile: int, encode_tile: int, **kw):
    """[(tiled decode, untiled decode), (tiled encode, untiled encode)]."""
    with torch.no_grad():
        refs = ae.decode(z), ae.encode(x)
    return list(zip((tiled_decode(ae, z, decode_tile, **kw), tiled_encode(ae, x, encode_tile, **kw)), refs))


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
    z = _latent(32, 32, seed=2)
    with torch.no_grad():
        raw_ref = vae.first_stage_model.decode(z)
    raw_ours = tiled_decode(vae.first_stage_model, z, 8)
    with torch.inference_mode():  # as ComfyUI runs nodes
        img_ref = vae.decode(z)
        # ComfyUI's defaults (512 px tiles, 64 px overlap) scaled to this 256 px image: 64 px tiles, 16 px overlap.
        (img_comfy,) = comfy_nodes().VAEDecodeTiled().decode(vae, {"samples": z}, 64, 16)
    img_ours = ((raw_ours + 1) / 2).clamp(0, 1).movedim(1, -1)  # as VAE.decode's process_output does
    return {"raw_ref": raw_ref, "raw_ours": raw_ours, "img_ref": img_ref, "img_ours": img_ours, "img_comfy": img_comfy}


def test_tiled_decode_equals_untiled_and_beats_comfy_tiled(decoded):
    ours, ref = decoded["raw_ours"], decoded["raw_ref"]
    assert ours.shape == (1, 3, 256, 256)
    peak = _assert_exact(ours, ref)
    psnr_raw = _psnr(ours, ref, peak)
    psnr_ours, psnr_comfy = (_psnr(decoded[k], decoded["img_ref"], 1.0) for k in ("img_ours", "img_comfy"))
    print(f"\n[decode 4x4 tiles] ours vs untiled: PSNR {psnr_raw:.1f} dB (raw, peak=range {peak:.2f}), "
          f"{psnr_ours:.1f} dB (image); ComfyUI VAEDecodeTiled: {psnr_comfy:.1f} dB")
    assert psnr_raw >= 50 and psnr_ours >= 50
    assert psnr_ours - psnr_comfy >= 10


def test_tiled_encode_equals_untiled_and_beats_comfy_tiled(vae):
    x = _smooth_image(1, 256, 256, seed=3)
    pixels = ((x + 1) / 2).movedim(1, -1)  # ComfyUI IMAGE
    ours = tiled_encode(vae.first_stage_model, x, 64)  # 4x4 tiles of 64 px
    with torch.inference_mode():  # as ComfyUI runs nodes
        ref = vae.encode(pixels)  # raw latent (posterior mode), what Encode LQ gets untiled
        comfy = comfy_nodes().VAEEncodeTiled().encode(vae, pixels, 64, 16)[0]["samples"]
    assert ours.shape == comfy.shape == (1, 4, 32, 32)
    peak = _assert_exact(ours, ref)
    psnr_ours, psnr_comfy = _psnr(ours, ref, peak), _psnr(comfy, ref, peak)
    print(f"\n[encode 4x4 tiles] ours vs untiled latent: PSNR {psnr_ours:.1f} dB (peak=range {peak:.2f}); "
          f"ComfyUI VAEEncodeTiled: {psnr_comfy:.1f} dB")
    assert psnr_ours >= 50
    assert psnr_ours - psnr_comfy >= 10


def _seam_ratio(img: torch.Tensor, cuts: list[int]) -> float:
    """Mean |gradient| across tile-boundary rows/columns over the mean across all other rows/columns (square img)."""
    dy = (img[..., 1:, :] - img[..., :-1, :]).abs()  # dy[k]: between rows k and k+1
    dx = (img[..., :, 1:] - img[..., :, :-1]).abs()
    edge = torch.zeros(dy.shape[-2], dtype=torch.bool)
    edge[[c - 1 for c in cuts]] = True
    boundary = torch.cat([dy[..., edge, :].flatten(), dx[..., edge].flatten()]).double().mean()
    interior = torch.cat([dy[..., ~edge, :].flatten(), dx[..., ~edge].flatten()]).double().mean()
    return (boundary / interior).item()


def test_no_seams(decoded):
    cuts = [64, 128, 192]  # 4 tiles of 8 latent px per axis -> boundaries every 64 output px
    seam = _seam_ratio(decoded["raw_ours"], cuts) / _seam_ratio(decoded["raw_ref"], cuts)
    comfy = _seam_ratio(decoded["img_comfy"].movedim(-1, 1), cuts) / _seam_ratio(decoded["img_ref"].movedim(-1, 1),
                                                                                   cuts)
    print(f"\n[seams] boundary/interior gradient ratio, tiled over untiled: ours {seam:.5f} "
          f"(ComfyUI tiled at the same lines, for reference: {comfy:.4f})")
    assert abs(seam - 1) <= 0.02


def test_no_colour_shift(decoded):
    ours, ref, comfy = (decoded[k].reshape(-1, 3).double() for k in ("img_ours", "img_ref", "img_comfy"))

    def shift(img):  # max per-channel |delta| of the mean and of the std
        return [(f(img, 0) - f(ref, 0)).abs().max().item() for f in (torch.mean, torch.std)]

    (d_mean, d_std), (c_mean, c_std) = shift(ours), shift(comfy)
    print(f"\n[colour] max per-channel |delta| in 1/255: ours mean {d_mean * 255:.2e} std {d_std * 255:.2e}; "
          f"ComfyUI tiled mean {c_mean * 255:.3f} std {c_std * 255:.3f}")
    assert d_mean <= 0.5 / 255 and d_std <= 0.5 / 255


@pytest.mark.parametrize("whole_mid,tile", [(None, 8), (False, 8), (False, 4)])
def test_attention_exact_in_both_mid_modes_and_in_levels(whole_mid, tile):
    """The tiled attention is exact too, for the mid block and for attention inside a level: with its keys/values
    read whole (tile 8) and in chunks merged by log-sum-exp (tile 4: a smaller working set)."""
    ae = _tiny_vae(4, attn_resolutions=[32]).first_stage_model  # attention in the latent-resolution level too
    z = _latent(24, 20, seed=5, b=2)  # batch 2: per-sample statistics
    q_len, kv_len = vae_tiled.attention_blocks(24 * 20, 128, 4, vae_tiled._tile_bytes(
        tile, is_decoder=True, dtype_bytes=4, base_channels=32))
    assert (kv_len < 24 * 20 and q_len < 24 * 20) == (tile == 4)  # several key chunks and query blocks
    for out, ref in _untiled_and_tiled(ae, z, _smooth_image(2, 160, 192, seed=6), tile, 8 * tile,
                                       whole_mid=whole_mid):
        assert _psnr(out, ref, _assert_exact(out, ref)) >= 50


# Chunked attention vs an fp64 reference, fp32: at most this multiple of the error of PyTorch's SDPA over all keys on
# the same inputs (both are fp32 rounding; about 2e-6 absolute here).
ATTN_REL = 2.0


@pytest.mark.parametrize("kernel", ["cpu-lse", "matmul"])
def test_chunked_attention_equals_attention_over_all_keys(monkeypatch, kernel):
    """``_attend`` (key chunks merged by log-sum-exp) with PyTorch's CPU kernel and with the matmul fallback other
    devices use, against scaled-dot-product attention over all keys in fp64; uneven chunks, batch 2."""
    if kernel == "matmul":
        monkeypatch.setattr(vae_tiled, "_lse_kernel", lambda device: None)
    g = torch.Generator().manual_seed(30)
    q, k, v = (torch.randn(2, 1, n, 64, generator=g) for n in (300, 1000, 1000))
    k = k * 2  # peaked softmax rows: the merge's rescaling matters
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    chunks = [(k[:, :, a:a + 128], v[:, :, a:a + 128]) for a in range(0, 1000, 128)]
    out = vae_tiled._attend(q, iter(chunks))
    whole = F.scaled_dot_product_attention(q, k, v)
    err, sdpa_err = ((t.double() - ref).abs().max().item() for t in (out, whole))
    print(f"\n[attention, {kernel}] 8 chunks vs fp64: {err:.1e} (SDPA over all keys: {sdpa_err:.1e})")
    assert out.dtype == q.dtype and err <= ATTN_REL * sdpa_err


def test_attention_blocks_fit_the_tile_working_set_whatever_the_picture():
    """The tiled attention's query block and key chunk depend on the tile's working set, not on the picture: at
    4096 and 8192 px (the full SD VAE's mid block, 512 channels) the same sizes, within that working set."""
    for dtype_bytes, lse in ((4, True), (2, True), (4, False)):
        work = vae_tiled._tile_bytes(16, is_decoder=True, dtype_bytes=dtype_bytes, base_channels=128)
        blocks = [vae_tiled.attention_blocks(side * side, 512, dtype_bytes, work, streamed_lse=lse)
                  for side in (512, 1024)]
        assert blocks[0] == blocks[1]
        q, kv = blocks[0]
        held = 2 * kv * 512 * dtype_bytes + q * (512 * (2 * dtype_bytes + 12) + (0 if lse else 8 * kv))
        assert q >= 512 and kv >= 512 and held <= work


@pytest.mark.parametrize("lat_h,lat_w", [(1, 128), (125, 3), (65, 33)])
def test_thin_and_odd_shapes(vae, lat_h, lat_w):
    pairs = _untiled_and_tiled(vae.first_stage_model, _latent(lat_h, lat_w, seed=7),
                               _smooth_image(1, lat_h * 8, lat_w * 8, seed=8), 16, 128)
    assert [out.shape for out, _ in pairs] == [(1, 3, lat_h * 8, lat_w * 8), (1, 4, lat_h, lat_w)]
    for out, ref in pairs:
        _assert_exact(out, ref)


class _LiveBytes(LiveBytes):
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
        full = {(h * s, w * s) for s in (1, 2, 4, 8)}
        super().__init__(lambda t: "full" if t.ndim == 4 and tuple(t.shape[-2:]) in full else "work")
        self.now_by = {"work": 0, "full": 0}
        self.peak_by = {"work": 0, "full": 0}


def _measure(ae, size: int, tile: int, whole_mid) -> dict[str, int]:
    z = _latent(size, size, seed=9)  # made outside: the input is not counted
    with _LiveBytes(size, size) as mem:
        tiled_decode(ae, z, tile, whole_mid=whole_mid)
    return mem.peak_by


def test_peak_memory_scales_with_tile_not_image(vae):
    """Peak bytes on CPU, measured with the _LiveBytes dispatch mode (see its docstring for the method)."""
    ae = vae.first_stage_model
    small, large = _measure(ae, 16, 8, False), _measure(ae, 32, 8, False)  # 2x2 vs 4x4 tiles: 4x the area
    bigger_tile = _measure(ae, 32, 16, False)
    whole_small, whole_large = _measure(ae, 16, 8, None), _measure(ae, 32, 8, None)

    def mib(d):
        return f"working set {d['work'] / 2**20:.2f} MiB, full maps {d['full'] / 2**20:.2f} MiB"

    print(f"\n[memory, tile 8, tiled mid] 2x2 tiles: {mib(small)}; 4x4: {mib(large)}; tile 16: {mib(bigger_tile)}")
    print(f"[memory, tile 8, whole mid (its working set includes the latent-size mid block)] 2x2 tiles: "
          f"{mib(whole_small)}; 4x4: {mib(whole_large)}")
    assert large["work"] <= 1.1 * small["work"]  # independent of the image size...
    assert bigger_tile["work"] >= 2.5 * large["work"]  # ...but grows with the tile (4x its area)
    assert large["full"] >= 3 * small["full"]  # the parked maps (host memory) do scale with the image
    # the auto-size estimate's per-tile term (before its device safety factor) covers the measured working set
    for tile, measured in ((8, large["work"]), (16, bigger_tile["work"])):
        assert vae_tiled._tile_bytes(tile, is_decoder=True, dtype_bytes=4, base_channels=32) >= measured


class Stop(Exception):
    pass


def _stop_after(k: int):
    """A check_interrupt that raises Stop on its (k+1)-th call."""
    calls = itertools.count(1)

    def check():
        if next(calls) > k:
            raise Stop
    return check


def test_progress_counts_and_interruption(vae):
    ae = vae.first_stage_model
    runs = (functools.partial(tiled_decode, ae, _latent(32, 32, seed=10), 8),
            functools.partial(tiled_encode, ae, _smooth_image(1, 256, 256, seed=11), 64))
    for run in runs:  # 16 tiles each
        calls, checks = [], []
        first = run(progress=lambda d, t: calls.append((d, t)), check_interrupt=lambda: checks.append(1))
        total = calls[-1][1]
        assert calls == [(d, total) for d in range(1, total + 1)]  # once per tile step, in order
        assert len(checks) == total  # checked before every unit
        assert (total - 1) % 16 == 0 and total > 10 * 16  # one whole-map mid unit + tiles x steps

        state = {k: v.clone() for k, v in ae.state_dict().items()}
        for k in (5, total // 2):
            with pytest.raises(Stop):
                run(check_interrupt=_stop_after(k))
        assert all(torch.equal(v, state[n]) for n, v in ae.state_dict().items())
        assert all(not (m._forward_hooks or m._forward_pre_hooks) for m in ae.modules())
        assert torch.equal(run(), first)


def test_single_tile_uses_plain_path(vae):
    ae = vae.first_stage_model
    z = _latent(12, 10, seed=12)
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
    ae = _tiny_vae(13).first_stage_model  # private model: its mid block's last resnet runs out of memory when whole
    z, x = _latent(16, 16, seed=14), _smooth_image(1, 128, 128, seed=15)
    with torch.no_grad():
        refs = ae.decode(z), ae.encode(x)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    # the tiled path runs the block's convs and norms step by step, never its forward
    ae.decoder.mid.block_2.forward = ae.encoder.mid.block_2.forward = oom
    for run, ref in zip((functools.partial(tiled_decode, ae, z, 8), functools.partial(tiled_encode, ae, x, 64)), refs):
        calls = []
        with caplog.at_level("WARNING", logger="PiSA-SR"):
            out = run(progress=lambda d, t: calls.append((d, t)))
        assert "running it tiled" in caplog.text
        caplog.clear()
        assert [d for d, _ in calls] == list(range(1, len(calls) + 1)) and calls[-1][1] == len(calls)
        _assert_exact(out, ref)
        with pytest.raises(torch.OutOfMemoryError):
            run(whole_mid=True)


def test_bf16_tiling_adds_no_error_beyond_the_dtype():
    """In bf16 (ComfyUI's usual VAE dtype) tiled and untiled are equally close to the fp32 result."""
    ae32 = _tiny_vae(16).first_stage_model
    ae16 = _tiny_vae(16).first_stage_model.to(torch.bfloat16)
    z, x = _latent(16, 16, seed=17), _smooth_image(1, 128, 128, seed=18)
    with torch.no_grad():
        refs = ae32.decode(z), ae32.encode(x)
    pairs = _untiled_and_tiled(ae16, z.bfloat16(), x.bfloat16(), 4, 32)  # 4x4 tiles
    for name, ref, (tiled, plain) in zip(("decode", "encode"), refs, pairs):
        peak = (ref.max() - ref.min()).item()
        p_plain, p_tiled = _psnr(plain.float(), ref, peak), _psnr(tiled.float(), ref, peak)
        p_between = _psnr(tiled.float(), plain.float(), peak)
        print(f"\n[bf16 {name}] vs fp32: untiled {p_plain:.1f} dB, tiled {p_tiled:.1f} dB; tiled vs untiled bf16 "
              f"{p_between:.1f} dB")
        assert p_tiled >= p_plain - 1.0
        assert p_between >= 45  # the GPU benchmark target for tiled vs untiled
