"""Colour correction of the SR output against the resized LQ image (the release's adain and wavelet fixes)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import PisaError

__all__ = ["COLOR_FIXES", "COLOR_FIX_SCOPES", "adain_fix", "wavelet_fix", "check_color_fix", "apply_color_fix",
           "ClipStats", "adain_with"]

COLOR_FIXES = ("adain", "wavelet", "none")
COLOR_FIX_SCOPES = ("frame", "clip")


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


class ClipStats:
    """Per-channel mean and std of a whole clip, gathered one frame at a time (AdaIN over all frames together).

    The same unbiased variance + 1e-5 as the release's per-image AdaIN, over every pixel of every frame, so a
    one-frame clip gives exactly the per-image statistics. Frames are merged in fp64 (Chan's parallel formula).
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Merge the frames ``x`` [B,C,H,W]."""
        flat = x.movedim(1, 0).reshape(x.shape[1], -1).double()
        n, mean = flat.shape[1], flat.mean(1)
        m2 = (flat - mean[:, None]).square().sum(1)
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * n / total)
        self.n = total

    def mean_std(self, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
        """([1,C,1,1], [1,C,1,1]) fp32."""
        var = self.m2 / max(1, self.n - 1) + eps
        return (self.mean.float().reshape(1, -1, 1, 1), var.sqrt().float().reshape(1, -1, 1, 1))


def adain_with(target: torch.Tensor, target_stats: ClipStats, source_stats: ClipStats) -> torch.Tensor:
    """AdaIN of frames ``target`` with clip-level statistics: one affine map per channel for every frame."""
    tm, ts = target_stats.mean_std()
    sm, ss = source_stats.mean_std()
    return ((target.float() - tm) / ts * ss + sm).clamp(0, 1)


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
    _, high = _low_high(target)
    low, _ = _low_high(source)
    return high + low


def check_color_fix(method: str) -> None:
    if method not in COLOR_FIXES:
        raise PisaError(f"unknown colour fix '{method}'; choose one of {', '.join(COLOR_FIXES)}.")


def apply_color_fix(target: torch.Tensor, source: torch.Tensor, method: str) -> torch.Tensor:
    """Both [B,C,H,W] in [0,1]; the result is clamped to [0,1] as the release does."""
    check_color_fix(method)
    if method == "none":
        return target
    if method == "adain":
        out = adain_fix(target.float(), source.float())
    else:
        out = wavelet_fix(target.float(), source.float())
    return out.clamp(0, 1)
