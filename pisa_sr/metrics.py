"""Image quality scores for comparing super-resolution outputs (ComfyUI IMAGE tensors, ``[B,H,W,C]`` in ``[0,1]``).

PSNR/SSIM follow the SR literature's convention (BasicSR, the PiSA-SR tables) so a number can sit next to a paper's;
``sharpness`` and ``noise`` are weight-free heuristics, not perceived quality; ``musiq``, ``clipiqa`` and ``maniqa``
come from the optional ``pyiqa`` package (pisa_sr.learned_metrics).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F

from .checks import check_choice, check_rgb as _check_image
from .errors import PisaError
from .learned_metrics import learned_score
from .runtime import host64


@dataclass(frozen=True)
class MetricSpec:
    """What a score means: ``direction`` +1 if higher is better, -1 if lower is better; ``fn(img, ref,
    crop_border)`` computes it."""

    direction: int
    needs_reference: bool
    learned: bool
    description: str
    fn: Callable[[torch.Tensor, Optional[torch.Tensor], int], torch.Tensor]


_SSIM_RADIUS = 5  # 11 taps: int(3.5 * sigma + 0.5), the truncation scikit-image and BasicSR's 11x11 window share
_DATA_RANGE = 255.0
_BAND_PX = 1 << 18  # map pixels per band of the fp64 scores: SSIM's fp64 working set is about 160 bytes each


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of RGB ``[B,H,W,3]`` in [0,1] -> ``[B,H,W]`` in [16,235], as MATLAB's ``rgb2ycbcr``; float64 on the
    CPU so the metrics built on it do not inherit half-precision rounding (they call it one band at a time)."""
    _check_image(img)
    return _luma(img)


def _luma(img: torch.Tensor) -> torch.Tensor:
    r, g, b = host64(img).unbind(-1)
    return 16.0 + 65.481 * r + 128.553 * g + 24.966 * b


def _banded_mean(fn: Callable[..., torch.Tensor], imgs: list[torch.Tensor], out_h: int, out_w: int, halo: int
                 ) -> torch.Tensor:
    """``[B]`` float64 (CPU): the mean over an ``out_h x out_w`` map of ``fn(*luma bands)``, where map row i reads
    luma rows i..i+halo of each of ``imgs`` (``[B or 1,H,W,3]``). One image and one band of about ``_BAND_PX`` map
    pixels at a time, so the fp64 working set is bounded whatever the image size (tests/host/test_devices.py)."""
    rows = max(1, _BAND_PX // max(1, out_w))
    means = []
    for b in range(imgs[0].shape[0]):
        total = None
        for r0 in range(0, out_h, rows):
            r1 = min(out_h, r0 + rows)
            bands = (_luma(x[min(b, x.shape[0] - 1):][:1, r0:r1 + halo]).unsqueeze(1) for x in imgs)  # checked once
            part = fn(*bands).sum()
            total = part if total is None else total + part
        means.append(total / (out_h * out_w))
    return torch.stack(means)


def _pair(img: torch.Tensor, ref: torch.Tensor, crop_border: int, min_side: int) -> list[torch.Tensor]:
    """Image and reference, border-cropped (views); a single reference is compared with every image."""
    _check_image(img, "image")
    _check_image(ref, "reference")
    if img.shape[1:3] != ref.shape[1:3]:
        raise PisaError(f"image and reference sizes differ: {tuple(img.shape[1:3])} vs {tuple(ref.shape[1:3])} "
                        "(H, W); resize one of them first")
    if ref.shape[0] not in (1, img.shape[0]):
        raise PisaError(f"reference batch {ref.shape[0]} must be 1 or match the image batch {img.shape[0]}")
    crop_border = int(crop_border)
    if crop_border < 0:
        raise PisaError(f"crop_border must be >= 0, got {crop_border}")
    h, w = img.shape[1] - 2 * crop_border, img.shape[2] - 2 * crop_border
    if h < min_side or w < min_side:
        raise PisaError(f"image {tuple(img.shape[1:3])} is too small for crop_border={crop_border}: "
                        f"{min_side}x{min_side} px must remain")
    return [x[:, crop_border:crop_border + h, crop_border:crop_border + w] for x in (img, ref)]


def psnr_y(img: torch.Tensor, ref: torch.Tensor, crop_border: int = 4) -> torch.Tensor:
    """PSNR in dB on luma (peak 255) after dropping ``crop_border`` px per side -> ``[B]`` float64; identical images
    give ``inf`` (as scikit-image and BasicSR do), so "perfect" is never confused with a finite cap."""
    pair = _pair(img, ref, crop_border, 1)
    mse = _banded_mean(lambda y, y_ref: (y - y_ref).square(), pair, *pair[0].shape[1:3], 0)
    return 10.0 * torch.log10(_DATA_RANGE**2 / mse)  # mse == 0 -> inf, without a warning


def ssim_y(img: torch.Tensor, ref: torch.Tensor, crop_border: int = 4) -> torch.Tensor:
    """SSIM on luma after dropping ``crop_border`` px per side -> ``[B]`` float64, as BasicSR's ``calculate_ssim``
    (scikit-image with ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255``): the mean
    of the SSIM map over the positions where the 11x11 window fits."""
    pair = _pair(img, ref, crop_border, 2 * _SSIM_RADIUS + 1)
    x = host64(torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1))
    taps = torch.exp(-(x * x) / (2.0 * 1.5**2))
    taps = taps / taps.sum()
    c1, c2 = (0.01 * _DATA_RANGE) ** 2, (0.03 * _DATA_RANGE) ** 2

    def ssim_map(y: torch.Tensor, y_ref: torch.Tensor) -> torch.Tensor:
        # One separable 'valid' Gaussian pass over the five moment images.
        stack = torch.cat([y, y_ref, y * y, y_ref * y_ref, y * y_ref], dim=0)
        blurred = F.conv2d(F.conv2d(stack, taps.view(1, 1, 1, -1)), taps.view(1, 1, -1, 1))
        mu_x, mu_y, e_xx, e_yy, e_xy = blurred.unbind(0)
        var_x = e_xx - mu_x * mu_x
        var_y = e_yy - mu_y * mu_y
        cov = e_xy - mu_x * mu_y
        num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
        return num / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))

    h, w = pair[0].shape[1:3]
    return _banded_mean(ssim_map, pair, h - 2 * _SSIM_RADIUS, w - 2 * _SSIM_RADIUS, 2 * _SSIM_RADIUS)


def _luma_filter_mean(img: torch.Tensor, what: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The mean of ``fn`` (a 'valid' 3x3 filter) over luma in 0..255 levels (at least 3x3 px): noise of std ``s``
    added equally to R, G and B reads as ``s``; independent noise per channel reads about ``0.67 s``."""
    _check_image(img)
    h, w = img.shape[1:3]
    if h < 3 or w < 3:
        raise PisaError(f"{what} needs at least 3x3 pixels, got {(h, w)}")
    return _banded_mean(lambda y: fn((y - 16.0) * (255.0 / 219.0)), [img], h - 2, w - 2, 2)


def sharpness(img: torch.Tensor) -> torch.Tensor:
    """Heuristic sharpness: RMS Sobel gradient magnitude of luma (levels per pixel) -> ``[B]``. Blur lowers it; noise
    and halos raise it too, so read it next to ``noise``, not as perceived quality."""
    # Sobel normalised by 1/8 so a ramp of one level per pixel has gradient 1.
    sx = host64(torch.tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])) / 8
    kernel = torch.stack([sx, sx.t()]).unsqueeze(1)
    return _luma_filter_mean(img, "sharpness", lambda y: F.conv2d(y, kernel).square().sum(dim=1)).sqrt()


def noise_sigma(img: torch.Tensor) -> torch.Tensor:
    """Heuristic noise std of luma (0..255 levels) -> ``[B]``, lower is better: Immerkaer, "Fast Noise Variance
    Estimation", CVIU 64(2), 1996. The mask cancels locally linear content, but texture and edges leak in."""
    d = host64(torch.tensor([1, -2, 1]))
    kernel = torch.outer(d, d).view(1, 1, 3, 3)
    return math.sqrt(math.pi / 2.0) / 6.0 * _luma_filter_mean(img, "noise_sigma",
                                                              lambda y: F.conv2d(y, kernel).abs())


def _no_reference(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    return lambda img, ref, crop_border: fn(img)


METRICS: dict[str, MetricSpec] = {
    "psnr": MetricSpec(+1, True, False, "PSNR on Y (BT.601, [16,235]) in dB, border-cropped; inf if identical", psnr_y),
    "ssim": MetricSpec(+1, True, False, "SSIM on Y (BT.601), 11x11 Gaussian window sigma 1.5, border-cropped", ssim_y),
    "sharpness": MetricSpec(+1, False, False, "heuristic: RMS Sobel gradient of luma (0..255 levels per pixel)",
                            _no_reference(sharpness)),
    "noise": MetricSpec(-1, False, False, "heuristic: Immerkaer noise sigma of luma (0..255 levels)",
                        _no_reference(noise_sigma)),
    "musiq": MetricSpec(+1, False, True, "MUSIQ (KonIQ weights) via pyiqa, about 0..100",
                        _no_reference(functools.partial(learned_score, name="musiq"))),
    "clipiqa": MetricSpec(+1, False, True, "CLIP-IQA (RN50) via pyiqa, 0..1",
                          _no_reference(functools.partial(learned_score, name="clipiqa"))),
    "maniqa": MetricSpec(+1, False, True, "MANIQA (KonIQ weights) via pyiqa, about 0..1",
                         _no_reference(functools.partial(learned_score, name="maniqa"))),
}


def score(img: torch.Tensor, metric: str, ref: Optional[torch.Tensor] = None, crop_border: int = 4) -> torch.Tensor:
    """Score every image of a batch with ``metric`` (a key of ``METRICS``, whose ``direction`` says which way is
    better) -> ``[B]`` float64; ``psnr`` and ``ssim`` need ``ref`` (batch 1 or B), the others ignore it."""
    key = metric.strip().lower() if isinstance(metric, str) else metric
    check_choice("metric", key, METRICS)
    if METRICS[key].needs_reference and ref is None:
        raise PisaError(f"'{key}' is a full-reference metric: connect the ground-truth image to 'reference', or "
                        "pick a no-reference metric (sharpness, noise, musiq, ...).")
    return METRICS[key].fn(img, ref, crop_border)


def format_score(value: float, unit: str = "") -> str:
    """A score for a label or report: 4 significant digits; NaN (could not be computed) reads ``n/a``."""
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf" + unit
    return f"{value:.4g}{unit}"
