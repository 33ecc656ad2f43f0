"""Dual guidance: ``eps = lambda_pix * eps_pix + lambda_sem * (eps_sem - eps_pix)``, and when one pass suffices.

eps_pix comes from W + dpix, eps_sem from W + dpix + dsem (the release's adjustable mode). Two settings need only
one UNet pass: lambda_sem == lambda_pix (then eps = lambda * eps_sem, the merged "default" model) and
lambda_sem == 0 (eps = lambda_pix * eps_pix); both zero needs no pass at all.
"""
from __future__ import annotations

import enum
import math

import torch

from .errors import PisaError

# Generous around the paper's [0, 2]; still refuses typos (10 for 1.0) that would only blow the image out.
LAMBDA_MIN, LAMBDA_MAX = -2.0, 4.0


class Pass(enum.Enum):
    NONE = "none"  # both lambdas zero: eps = 0, z_hq = z_lq
    SEM = "sem"  # one pass on W + dpix + dsem (default mode), eps = lambda * eps_sem
    PIX = "pix"  # one pass on W + dpix, eps = lambda_pix * eps_pix
    DUAL = "dual"  # eps_pix and eps_sem both needed


def check_lambda(name: str, value: object) -> float:
    """``value`` as a float if it is a finite number in [LAMBDA_MIN, LAMBDA_MAX], else a PisaError naming ``name``."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and LAMBDA_MIN <= v <= LAMBDA_MAX):
        raise PisaError(f"{name} = {value!r} is outside [{LAMBDA_MIN:g}, {LAMBDA_MAX:g}] or not a number. "
                        "Use 1.0 for the release default; 0..2 is the useful range.")
    return v


def plan_passes(lambda_pix: float, lambda_sem: float) -> Pass:
    if lambda_pix == 0 and lambda_sem == 0:
        return Pass.NONE
    if lambda_sem == lambda_pix:
        return Pass.SEM
    if lambda_sem == 0:
        return Pass.PIX
    return Pass.DUAL


def combine_eps(eps_pix: torch.Tensor, eps_sem: torch.Tensor, lambda_pix: float, lambda_sem: float) -> torch.Tensor:
    """The release's combination, accumulated in fp32."""
    p = eps_pix.to(torch.float32)
    return lambda_pix * p + lambda_sem * (eps_sem.to(torch.float32) - p)
