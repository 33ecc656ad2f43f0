"""Lambda sweeps: parse the settings, combine two UNet outputs into every setting, pick the best one.

``eps = lambda_pix * eps_pix + lambda_sem * (eps_sem - eps_pix)`` is linear in both lambdas, so any number of settings
costs one evaluation of ``eps_pix`` and ``eps_sem`` plus a cheap combination each.
"""
from __future__ import annotations

import itertools
import math
import re
from typing import Optional, Sequence

import torch

from .errors import PisaError
from .guidance import check_lambda, combine_eps

MAX_SETTINGS = 64

_KEYS = {k: name for name in ("pix", "sem") for k in (name, f"l{name}", f"lambda_{name}", f"λ{name}", f"λ_{name}")}


def _number(text: str, fragment: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise PisaError(f"{text.strip()!r} is not a number (in {fragment!r})") from None


def _range_values(spec: str, key: str, fragment: str) -> list[float]:
    """``start:stop:step`` (inclusive, either direction) or a single value."""
    parts = spec.split(":")
    if len(parts) not in (1, 3):
        raise PisaError(f"{fragment!r}: a range is start:stop:step (e.g. pix=0.5:1.5:0.25) or a single value")
    nums = [_number(p, fragment) for p in parts]
    if len(nums) == 1:
        return [check_lambda(key, nums[0])]
    start, stop, step = check_lambda(key, nums[0]), check_lambda(key, nums[1]), nums[2]
    if not math.isfinite(step) or step == 0:
        raise PisaError(f"{fragment!r}: step must be a non-zero number")
    if (stop - start) * step < 0:
        raise PisaError(f"{fragment!r}: step {step:g} moves away from stop {stop:g}")
    steps = (stop - start) / step
    if not math.isfinite(steps) or steps > MAX_SETTINGS - 1 + 1e-9:
        raise PisaError(f"{fragment!r} gives more than {MAX_SETTINGS} values, the most one sweep allows")
    values = []
    for i in range(math.floor(steps + 1e-9) + 1):
        v = float(f"{start + i * step:.12g}")  # 12 digits: 0.1-style steps read back as typed (0.3, not 0.300..04)
        values.append(check_lambda(key, stop if abs(v - stop) <= 1e-9 * abs(step) else v))
    return values


def _parse_grid(text: str) -> list[tuple[float, float]]:
    values: dict[str, list[float]] = {}
    for token in re.split(r"[\s;,]+", re.sub(r"\s*([=:])\s*", r"\1", text.strip())):
        if not token:
            continue
        key, sep, spec = token.partition("=")
        if not sep or not spec:
            raise PisaError(f"{token!r}: expected pix=<value or start:stop:step> or sem=<...>")
        name = _KEYS.get(key.strip().lower())
        if name is None:
            raise PisaError(f"{token!r}: unknown name {key!r}; use pix= and sem=")
        if name in values:
            raise PisaError(f"{token!r}: {name} is given twice")
        values[name] = _range_values(spec, f"lambda_{name}", token)
    pix, sem = values.get("pix", [1.0]), values.get("sem", [1.0])  # a lambda left out stays at the default 1.0
    if len(pix) * len(sem) > MAX_SETTINGS:
        raise PisaError(f"{len(pix)} x {len(sem)} = {len(pix) * len(sem)} settings; at most {MAX_SETTINGS} are allowed")
    return list(itertools.product(pix, sem))


def _parse_list(text: str) -> list[tuple[float, float]]:
    pairs = []
    for raw in re.split(r"[;\n]+", text):
        fragment = inner = raw.strip()
        if not fragment:
            continue
        if inner[0] in "([" and inner[-1] in ")]":
            inner = inner[1:-1]
        parts = [p for p in re.split(r"\s*,\s*|\s+", inner.strip()) if p]
        if len(parts) != 2:
            raise PisaError(f"{fragment!r}: each setting is two numbers 'lambda_pix, lambda_sem'")
        pairs.append((check_lambda("lambda_pix", _number(parts[0], fragment)),
                      check_lambda("lambda_sem", _number(parts[1], fragment))))
        if len(pairs) > MAX_SETTINGS:
            raise PisaError(f"more than {MAX_SETTINGS} settings; split the sweep")
    return pairs


def parse_lambda_pairs(text: str) -> list[tuple[float, float]]:
    """``[(lambda_pix, lambda_sem), ...]`` from a list ``"0.5,1; 1,1"`` or a grid ``"pix=0.5:1.5:0.5 sem=1"`` (pix
    outer, sem inner); errors quote the fragment at fault."""
    if not isinstance(text, str):
        raise PisaError(f"lambda settings must be text, got {type(text).__name__}")
    pairs = _parse_grid(text) if "=" in text else _parse_list(text)
    if not pairs:
        raise PisaError("no lambda settings given: write pairs like '0.5,1; 1,1' or a grid like 'pix=0.5:1.5:0.5'")
    return pairs


def _short(v: float) -> str:
    s = f"{v:.2f}"
    return s if abs(float(s) - v) < 1e-9 else f"{v:.6g}"


def format_label(lp: float, ls: float) -> str:
    """``"pix 1.00 / sem 1.50"`` (ASCII: Pillow's built-in font has no Greek); more decimals only when needed."""
    return f"pix {_short(float(lp))} / sem {_short(float(ls))}"


def combine(eps_pix: torch.Tensor, eps_sem: torch.Tensor, pairs: Sequence[tuple[float, float]],
            dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Every setting's ``lp*eps_pix + ls*(eps_sem - eps_pix)`` in fp32 -> ``[S, *eps_pix.shape]`` of ``dtype``
    (default: ``eps_pix``'s)."""
    if eps_pix.shape != eps_sem.shape:
        raise PisaError(f"eps_pix {tuple(eps_pix.shape)} and eps_sem {tuple(eps_sem.shape)} differ in shape")
    if not pairs:
        raise PisaError("combine needs at least one (lambda_pix, lambda_sem) pair")
    eps_sem = eps_sem.to(eps_pix.device)
    out = torch.empty((len(pairs), *eps_pix.shape), dtype=dtype or eps_pix.dtype, device=eps_pix.device)
    for i, (lp, ls) in enumerate(pairs):  # the sampler's combination, so a sweep reproduces it bit for bit
        out[i] = combine_eps(eps_pix, eps_sem, check_lambda("lambda_pix", lp), check_lambda("lambda_sem", ls))
    return out


def sweep_latents(z: torch.Tensor, eps_pix: torch.Tensor, eps_sem: torch.Tensor,
                  pairs: Sequence[tuple[float, float]]) -> torch.Tensor:
    """The sampler's ``z - eps(lp, ls)`` for every setting, fp32, setting-major (row ``s * B + b``) -> ``[S*B, C, h,
    w]``; a setting at a time, so beyond the output it holds three latents of ``z``'s size."""
    if not pairs:
        raise PisaError("a sweep needs at least one (lambda_pix, lambda_sem) pair")
    b = z.shape[0]
    zf = z.to(device=eps_pix.device, dtype=torch.float32)
    out = torch.empty((len(pairs) * b, *z.shape[1:]), dtype=torch.float32, device=eps_pix.device)
    for s, pair in enumerate(pairs):
        out[s * b:(s + 1) * b] = zf - combine(eps_pix, eps_sem, [pair], dtype=torch.float32)[0]
    return out


def sweep_labels(pairs: Sequence[tuple[float, float]], batch: int = 1) -> list[str]:
    """One label per row of ``sweep_latents``' output; ``" / img k"`` is added when ``batch > 1``."""
    return [format_label(lp, ls) + (f" / img {b + 1}" if batch > 1 else "") for lp, ls in pairs for b in range(batch)]


def choose_best(quality: Sequence[float], fidelity: Sequence[float], floor: float,
                higher_is_better: bool = True) -> tuple[int, str]:
    """(0-based index, why) of the best-quality setting among those with ``fidelity >= floor``; NaN scores are
    ignored, ties go to the earliest; when none meets the floor, the highest-fidelity one (and the reason)."""
    q, f, floor = [float(v) for v in quality], [float(v) for v in fidelity], float(floor)
    if len(q) != len(f):
        raise PisaError(f"{len(q)} quality scores but {len(f)} fidelity scores")
    if not q:
        raise PisaError("choose_best needs at least one setting")
    if math.isnan(floor):
        raise PisaError("the fidelity floor must be a number, got NaN")
    # NaN marks a score that could not be computed (and compares False); infinities (identical images' PSNR) are valid.
    passing = [i for i in range(len(q)) if f[i] >= floor]
    ranked = [i for i in passing if not math.isnan(q[i])]
    if ranked:
        sign = 1.0 if higher_is_better else -1.0
        best = min(ranked, key=lambda i: (-sign * q[i], i))
        return best, (f"setting {best + 1} of {len(q)}: {'highest' if higher_is_better else 'lowest'} quality "
                      f"{q[best]:.4g} among {len(ranked)} setting(s) with fidelity >= {floor:g} (its fidelity "
                      f"{f[best]:.4g})")
    valid_f = [i for i in range(len(f)) if not math.isnan(f[i])]
    if not valid_f:
        return 0, f"no setting has a valid fidelity score; returning setting 1 of {len(q)}"
    best = min(valid_f, key=lambda i: (-f[i], i))
    why = (f"{len(passing)} setting(s) reached the fidelity floor {floor:g} but none has a valid quality score"
           if passing else f"no setting reached the fidelity floor {floor:g}")
    return best, f"{why}; returning the highest-fidelity setting {best + 1} of {len(q)} (fidelity {f[best]:.4g})"


def choose_best_per_image(quality: Sequence[Sequence[float]], fidelity: Sequence[Sequence[float]], floor: float,
                          higher_is_better: bool = True) -> list[tuple[int, str]]:
    """``choose_best`` per image: ``quality[s][b]``, ``fidelity[s][b]`` are setting ``s``'s scores of image ``b``."""
    if not quality or len(quality) != len(fidelity):
        raise PisaError(f"{len(quality)} settings of quality scores but {len(fidelity)} of fidelity scores")
    batch = len(quality[0])
    if batch == 0 or any(len(row) != batch for row in [*quality, *fidelity]):
        raise PisaError("every setting needs one quality and one fidelity score per image")
    return [choose_best([row[b] for row in quality], [row[b] for row in fidelity], floor, higher_is_better)
            for b in range(batch)]
