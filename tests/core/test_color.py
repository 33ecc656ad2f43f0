"""The colour fixes (pisa_sr/color.py) against the release's formulas (tests/reference.py), and their memory bound.

Issue 23: the fixes overwrite their fp32 target instead of building full-size copies. Same output bit for bit; the
extra live tensor bytes (tests/helpers.LiveBytes) stay within the stated bound: AdaIN needs only per-channel
statistics, the wavelet fix two single-channel planes (one channel at a time) and a few bands of rows.
"""
from __future__ import annotations

import pytest
import torch

from helpers import LiveBytes
from pisa_sr import color
from pisa_sr.color import apply_color_fix
from reference import ReleaseReference, adain


RELEASE = {"adain": adain, "wavelet": ReleaseReference._wavelet}
SMALL_PLANE_TOL = 4 * 2 ** -23  # 4 ulp at 1.0 (see test_fix_equals_the_release)
BAND = 256 << 10  # color.BAND_BYTES for the memory test: 1.7 bands per plane at 512 x 384


def _pair(h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(1, 3, h, w, generator=g) * 0.6 + 0.3  # other statistics than the source's
    source = torch.rand(1, h, w, 3, generator=g).movedim(-1, 1)  # channels-last, as the decoder passes the LQ
    return target, source


@pytest.mark.parametrize("method", ["adain", "wavelet"])
@pytest.mark.parametrize("contiguous_source", [False, True])
@pytest.mark.parametrize("size,band", [((512, 384), None), ((512, 384), 64 << 10), ((96, 80), None)])
def test_fix_equals_the_release(monkeypatch, method, contiguous_source, size, band):
    """Bit for bit, in one band or many, except the wavelet fix on planes of at most 20480 px (color._ONEDNN_MIN):
    there PyTorch's CPU convolution takes another kernel for one channel than for the release's three (measured:
    at most 2.1e-7, 2 ulp, from 8x8 to 96x80; none from 128x160 to 768x1024)."""
    if band is not None:
        monkeypatch.setattr(color, "BAND_BYTES", band)  # about 40 rows: a dozen bands per blur
    target, source = _pair(*size, seed=1)
    source = source.contiguous() if contiguous_source else source
    want = RELEASE[method](target, source).clamp(0, 1)
    work = target.clone()
    got = apply_color_fix(work, source, method)
    tol = SMALL_PLANE_TOL if method == "wavelet" and size[0] * size[1] <= color._ONEDNN_MIN else 0.0
    assert (got - want).abs().max().item() <= tol
    assert got.data_ptr() == work.data_ptr()  # an fp32 target is overwritten, not copied
    assert (got - target).abs().max() > 0.05  # the fix did something: not vacuous


def test_other_dtypes_and_none_leave_the_target_alone():
    target, source = _pair(32, 24, seed=2)
    half = target.to(torch.bfloat16)
    kept = half.clone()
    got = apply_color_fix(half, source, "adain")
    assert got.dtype == torch.float32 and torch.equal(half, kept)  # fixed in an fp32 copy
    assert torch.equal(got, adain(kept.float(), source).clamp(0, 1))
    assert apply_color_fix(target, source, "none") is target


@pytest.mark.parametrize("method", ["adain", "wavelet"])
def test_extra_bytes_stay_within_the_stated_bound(monkeypatch, method):
    """AdaIN: statistics only (a few bytes). Wavelet: two single-channel planes, 2/3 of the image, plus three bands
    (one band with its blur halo, the convolution's output band and the high-band sum's temporary band)."""
    monkeypatch.setattr(color, "BAND_BYTES", BAND)
    target, source = _pair(512, 384, seed=3)
    one = target.numel() * target.element_size()
    bound = 0.01 * one if method == "adain" else 2 / 3 * one + 3 * BAND
    with LiveBytes() as mem:
        apply_color_fix(target, source, method)
    print(f"\n[{method}] extra live bytes: {mem.peak / one:.3f} x one fp32 image (bound {bound / one:.3f})")
    assert mem.peak <= bound
