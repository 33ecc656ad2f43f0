"""Colour correction of the SR output against the resized LQ image (the release's adain and wavelet fixes)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import PisaError

COLOR_FIXES = ("adain", "wavelet", "none")


def _mean_std(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    var = flat.var(dim=2, unbiased=True) + eps  # the release: unbiased variance + 1e-5
    return flat.mean(dim=2).reshape(b, c, 1, 1), var.sqrt().reshape(b, c, 1, 1)


def adain_fix(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Match each channel's mean and std of ``target`` [B,C,H,W] to ``source``."""
    sm, ss = _mean_std(source)
    tm, ts = _mean_std(target)
    return (target - tm) / ts * ss + sm


def _wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    k = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16
    k = k[None, None].repeat(x.shape[1], 1, 1, 1)
    x = F.pad(x, (radius,) * 4, mode="replicate")
    return F.conv2d(x, k, groups=k.shape[0], dilation=radius)


def _low_high(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _wavelet_blur(x, 2 ** i)
        high += x - low
        x = low
    return low, high


def wavelet_fix(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Keep ``target``'s high frequencies, take ``source``'s low frequencies (5 dilated blur levels)."""
    return _low_high(target)[1] + _low_high(source)[0]


def check_color_fix(method: str) -> None:
    if method not in COLOR_FIXES:
        raise PisaError(f"unknown colour fix '{method}'; choose one of {', '.join(COLOR_FIXES)}.")


def apply_color_fix(target: torch.Tensor, source: torch.Tensor, method: str) -> torch.Tensor:
    """Both [B,C,H,W] in [0,1]; the result is clamped to [0,1] as the release does."""
    check_color_fix(method)
    if method == "none":
        return target
    fix = adain_fix if method == "adain" else wavelet_fix
    return fix(target.float(), source.float()).clamp(0, 1)
