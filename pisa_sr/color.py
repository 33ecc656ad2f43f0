"""Colour correction of the SR output against the resized LQ image (the release's adain and wavelet fixes).

Memory: both fixes overwrite ``target`` (fp32) instead of building new full-size images. AdaIN needs only
per-channel statistics (reductions, no copy). The wavelet fix runs one channel at a time (its blur is depthwise) and
blurs in bands of rows: two single-channel planes (2/3 of one [C,H,W] image) plus about 20 x BAND_BYTES for a band,
its padding and the convolution's scratch (which is ~17x its input: a whole 8192 px plane would add 4.5 GB).
Both equal the release's formulas bit for bit, except the wavelet fix on planes of at most _ONEDNN_MIN pixels (about
143 x 143), where PyTorch picks another convolution kernel for one channel than for three (at most 2 ulp apart;
tests/core/test_color.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_choice

COLOR_FIXES = ("adain", "wavelet", "none")
WAVELET_LEVELS = 5
BAND_BYTES = 4 << 20  # fp32 rows blurred at once
# PyTorch's CPU convolution leaves oneDNN for its own slow kernel (other rounding) on a one-channel input of at most
# this many elements (ConvParams::use_mkldnn in aten/src/ATen/native/Convolution.cpp; checked on torch 2.14).
_ONEDNN_MIN = 20480


def channel_stats(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) of [B,C,H,W] as AdaIN uses them, each [B,C,1,1]."""
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    var = flat.var(dim=2, unbiased=True) + eps  # the release: unbiased variance + 1e-5
    return flat.mean(dim=2).reshape(b, c, 1, 1), var.sqrt().reshape(b, c, 1, 1)


def adain_fix(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Match each channel's mean and std of ``target`` [B,C,H,W] (fp32, overwritten and returned) to ``source``."""
    return adain_with_stats(target, channel_stats(target), channel_stats(source))


def adain_with_stats(target: torch.Tensor, target_stats, source_stats) -> torch.Tensor:
    """AdaIN with given statistics (a live loupe uses its whole picture's on a crop); ``target`` overwritten."""
    (tm, ts), (sm, ss) = target_stats, source_stats
    return target.sub_(tm).div_(ts).mul_(ss).add_(sm)  # the release's (t - tm) / ts * ss + sm, in place


def _blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """The release's dilated binomial blur with replicate padding, on a [B,1,H,W] plane -> a new contiguous plane,
    in bands of rows: the CPU convolution's scratch (~17x its input) and the padding then cost a band, not a plane.
    Bands of more than _ONEDNN_MIN input elements keep every band on the kernel a whole plane gets (bit for bit)."""
    b, _, h, w = x.shape
    k = (torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16)[None, None]
    out = torch.empty((b, 1, h, w), dtype=x.dtype, device=x.device)
    padded_w = w + 2 * radius
    rows = max(BAND_BYTES // (b * padded_w * x.element_size()), _ONEDNN_MIN // (b * padded_w) + 1)
    cuts = [h * i // max(1, h // rows) for i in range(max(1, h // rows) + 1)]  # even bands, none below ``rows``
    for i, j in zip(cuts, cuts[1:]):
        top, bottom = max(0, i - radius), min(h, j + radius)
        band = F.pad(x[:, :, top:bottom].contiguous(),
                     (radius, radius, radius - (i - top), radius - (bottom - j)), mode="replicate")
        out[:, :, i:j] = F.conv2d(band, k, dilation=radius)
        del band
    return out


def _low(x: torch.Tensor, high: torch.Tensor | None = None) -> torch.Tensor:
    """The release's wavelet decomposition of a [B,1,H,W] plane -> its lowest band (a new plane). With ``high`` =
    ``x`` (fp32, writable) the plane is overwritten with the sum of its high bands, in the release's order."""
    for i in range(WAVELET_LEVELS):
        low = _blur(x, 2 ** i)
        if high is not None and i == 0:
            high.sub_(low)  # the release's zeros + (x - low), on x itself (it is not read again)
        elif high is not None:
            step = max(1, BAND_BYTES // (x.shape[0] * x.shape[3] * x.element_size()))
            for a in range(0, x.shape[2], step):  # high += x - low, its temporary a band at a time
                high[:, :, a:a + step] += x[:, :, a:a + step] - low[:, :, a:a + step]
        x = low
    return x


def wavelet_fix(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Keep ``target``'s high frequencies, take ``source``'s low frequencies (5 dilated blur levels); ``target``
    [B,C,H,W] (fp32) is overwritten and returned."""
    for c in range(target.shape[1]):
        plane = target[:, c:c + 1]
        _low(plane, high=plane)
        plane += _low(source[:, c:c + 1])  # the release's high + low
    return target


def apply_color_fix(target: torch.Tensor, source: torch.Tensor, method: str) -> torch.Tensor:
    """Both [B,C,H,W] in [0,1]; the result is clamped to [0,1] as the release does. An fp32 ``target`` is
    overwritten with the result (no full-size copy); another dtype is fixed in an fp32 copy."""
    check_choice("colour fix", method, COLOR_FIXES)
    if method == "none":
        return target
    fix = adain_fix if method == "adain" else wavelet_fix
    return fix(target.float(), source.float()).clamp_(0, 1)
