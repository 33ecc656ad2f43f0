"""Lambda sweeps: parse the settings, combine two UNet outputs into every setting, pick the best one.

PiSA-SR's adjustable output is ``eps = lambda_pix * eps_pix + lambda_sem * (eps_sem - eps_pix)``, linear in both
lambdas, so any number of settings costs one evaluation of ``eps_pix`` and ``eps_sem`` plus a cheap combination each.
"""
from __future__ import annotations

import itertools
import math
import re
from typing import Optional, Sequence

import torch

from .errors import PisaError
from .guidance import check_lambda

MAX_SETTINGS = 64

_PIX_KEYS = {"pix", "lpix", "lambda_pix", "λpix", "λ_pix"}
_SEM_KEYS = {"sem", "lsem", "lambda_sem", "λsem", "λ_sem"}


def _number(text: str, fragment: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise PisaError(f"{text.strip()!r} is not a number (in {fragment!r})") from None


def _range_values(spec: str, key: str, fragment: str) -> list[float]:
    """``start:stop:step`` (inclusive, either direction) or a single value."""
    parts = spec.split(":")
    if len(parts) == 1:
        return [check_lambda(key, _number(parts[0], fragment))]
    if len(parts) != 3:
        raise PisaError(f"{fragment!r}: a range is start:stop:step (e.g. pix=0.5:1.5:0.25) or a single value")
    start, stop, step = (_number(p, fragment) for p in parts)
    start, stop = check_lambda(key, start), check_lambda(key, stop)
    if not math.isfinite(step) or step == 0:
        raise PisaError(f"{fragment!r}: step must be a non-zero number")
    if (stop - start) * step < 0:
        raise PisaError(f"{fragment!r}: step {step:g} moves away from stop {stop:g}")
    steps = (stop - start) / step
    if not math.isfinite(steps) or steps > MAX_SETTINGS - 1 + 1e-9:
        raise PisaError(f"{fragment!r} gives more than {MAX_SETTINGS} values, the most one sweep allows")
    count = math.floor(steps + 1e-9) + 1
    values = []
    for i in range(count):
        v = float(f"{start + i * step:.12g}")  # 12 digits: 0.1-style steps read back as typed (0.3, not 0.300..04)
        if abs(v - stop) <= 1e-9 * abs(step):
            v = stop
        values.append(check_lambda(key, v))
    return values


def _parse_grid(text: str) -> list[tuple[float, float]]:
    compact = re.sub(r"\s*([=:])\s*", r"\1", text.strip())
    values: dict[str, list[float]] = {}
    for token in re.split(r"[\s;,]+", compact):
        if not token:
            continue
        key, sep, spec = token.partition("=")
        k = key.strip().lower()
        if not sep or not spec:
            raise PisaError(f"{token!r}: expected pix=<value or start:stop:step> or sem=<...>")
        if k in _PIX_KEYS:
            name = "pix"
        elif k in _SEM_KEYS:
            name = "sem"
        else:
            raise PisaError(f"{token!r}: unknown name {key!r}; use pix= and sem=")
        if name in values:
            raise PisaError(f"{token!r}: {name} is given twice")
        values[name] = _range_values(spec, f"lambda_{name}", token)
    # A sweep of one lambda keeps the other at the release default 1.0.
    pix, sem = values.get("pix", [1.0]), values.get("sem", [1.0])
    if len(pix) * len(sem) > MAX_SETTINGS:
        raise PisaError(
            f"{len(pix)} x {len(sem)} = {len(pix) * len(sem)} settings; at most {MAX_SETTINGS} are allowed"
        )
    return [(p, s) for p, s in itertools.product(pix, sem)]


def _parse_list(text: str) -> list[tuple[float, float]]:
    pairs = []
    for raw in re.split(r"[;\n]+", text):
        fragment = raw.strip()
        if not fragment:
            continue
        inner = fragment
        if inner[0] in "([" and inner[-1] in ")]":
            inner = inner[1:-1]
        parts = [p for p in re.split(r"\s*,\s*|\s+", inner.strip()) if p]
        if len(parts) != 2:
            raise PisaError(f"{fragment!r}: each setting is two numbers 'lambda_pix, lambda_sem'")
        lp = check_lambda("lambda_pix", _number(parts[0], fragment))
        ls = check_lambda("lambda_sem", _number(parts[1], fragment))
        pairs.append((lp, ls))
        if len(pairs) > MAX_SETTINGS:
            raise PisaError(f"more than {MAX_SETTINGS} settings; split the sweep")
    return pairs


def parse_lambda_pairs(text: str) -> list[tuple[float, float]]:
    """Settings ``[(lambda_pix, lambda_sem), ...]`` from a list or a grid spec, in order, at most ``MAX_SETTINGS``.

    * list: ``"0.5,1; 1,1; 1,1.5"`` -- pairs separated by ``;`` or new lines, numbers by ``,`` or spaces;
    * grid: ``"pix=0.5:1.5:0.5 sem=0.5:1.5:0.5"`` -- ``start:stop:step`` inclusive or one value, cartesian product
      with pix outer and sem inner; a lambda that is left out stays at 1.0.

    Errors are PisaErrors (ValueErrors) quoting the fragment at fault, so a node can show them as they are.
    """
    if not isinstance(text, str):
        raise PisaError(f"lambda settings must be text, got {type(text).__name__}")
    if not text.strip():
        raise PisaError("no lambda settings given: write pairs like '0.5,1; 1,1' or a grid like 'pix=0.5:1.5:0.5'")
    pairs = _parse_grid(text) if "=" in text else _parse_list(text)
    if not pairs:
        raise PisaError("no lambda settings given: write pairs like '0.5,1; 1,1' or a grid like 'pix=0.5:1.5:0.5'")
    return pairs


def _short(v: float) -> str:
    s = f"{v:.2f}"
    return s if abs(float(s) - v) < 1e-9 else f"{v:.6g}"


def format_label(lp: float, ls: float) -> str:
    """Tile label like ``"pix 1.00 / sem 1.50"``.

    ASCII on purpose: Pillow's built-in font (Aileron) has no Greek glyphs, so a lambda would draw as a box. Two
    decimals, more only when needed to tell settings apart.
    """
    return f"pix {_short(float(lp))} / sem {_short(float(ls))}"


def combine(
    eps_pix: torch.Tensor,
    eps_sem: torch.Tensor,
    pairs: Sequence[tuple[float, float]],
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Every setting's ``lp*eps_pix + ls*(eps_sem - eps_pix)``, computed in fp32 -> ``[S, *eps_pix.shape]``.

    The output dtype is ``dtype`` or else ``eps_pix``'s; the difference ``eps_sem - eps_pix`` is formed once.
    """
    if eps_pix.shape != eps_sem.shape:
        raise PisaError(f"eps_pix {tuple(eps_pix.shape)} and eps_sem {tuple(eps_sem.shape)} differ in shape")
    pairs = [(check_lambda("lambda_pix", lp), check_lambda("lambda_sem", ls)) for lp, ls in pairs]
    if not pairs:
        raise PisaError("combine needs at least one (lambda_pix, lambda_sem) pair")
    out_dtype = dtype or eps_pix.dtype
    pix = eps_pix.to(torch.float32)
    diff = eps_sem.to(device=pix.device, dtype=torch.float32) - pix
    out = torch.empty((len(pairs), *pix.shape), dtype=out_dtype, device=pix.device)
    for i, (lp, ls) in enumerate(pairs):
        out[i] = lp * pix + ls * diff  # the sampler's expression, so a sweep reproduces it bit for bit
    return out


def sweep_latents(
    z: torch.Tensor,
    eps_pix: torch.Tensor,
    eps_sem: torch.Tensor,
    pairs: Sequence[tuple[float, float]],
) -> torch.Tensor:
    """Every setting's one-step result ``z - eps(lp, ls)`` for a latent batch ``z`` ``[B,C,h,w]``, in fp32.

    Setting-major: row ``s * B + b`` is setting ``s`` applied to image ``b`` -> ``[S*B, C, h, w]``. This is the
    sampler's ``z_hq = z_lq - eps`` for each pair, from one evaluation of ``eps_pix`` and ``eps_sem``.
    """
    if z.shape != eps_pix.shape:
        raise PisaError(f"latent {tuple(z.shape)} and eps {tuple(eps_pix.shape)} differ in shape")
    eps = combine(eps_pix, eps_sem, pairs, dtype=torch.float32)  # [S,B,C,h,w]
    out = z.to(device=eps.device, dtype=torch.float32).unsqueeze(0) - eps
    return out.reshape(-1, *z.shape[1:])


def sweep_labels(pairs: Sequence[tuple[float, float]], batch: int = 1) -> list[str]:
    """One label per row of ``sweep_latents``' output (setting-major); ``" / img k"`` is added when ``batch > 1``."""
    if batch < 1:
        raise PisaError(f"batch must be >= 1, got {batch}")
    labels = []
    for lp, ls in pairs:
        for b in range(batch):
            labels.append(format_label(lp, ls) + (f" / img {b + 1}" if batch > 1 else ""))
    return labels


def choose_best(
    quality: Sequence[float],
    fidelity: Sequence[float],
    floor: float,
    higher_is_better: bool = True,
) -> tuple[int, str]:
    """Index (0-based) of the best-quality setting among those with ``fidelity >= floor``, and why it was chosen.

    This is the "pick the best of the plausible solutions with a no-reference predictor" rule: fidelity (e.g. PSNR
    against the pix-only output, higher = closer) filters out settings that drift too far, quality ranks the rest.
    NaN scores are ignored; ties go to the earliest setting. When no setting meets the floor, the highest-fidelity
    one is returned and the explanation says so.
    """
    q = [float(v) for v in quality]
    f = [float(v) for v in fidelity]
    if len(q) != len(f):
        raise PisaError(f"{len(q)} quality scores but {len(f)} fidelity scores")
    if not q:
        raise PisaError("choose_best needs at least one setting")
    floor = float(floor)
    if math.isnan(floor):
        raise PisaError("the fidelity floor must be a number, got NaN")
    sign = 1.0 if higher_is_better else -1.0
    # NaN marks a score that could not be computed; infinities (identical images' PSNR) are valid.
    passing = [i for i in range(len(q)) if f[i] >= floor]  # NaN compares False
    ranked = [i for i in passing if not math.isnan(q[i])]
    if ranked:
        best = min(ranked, key=lambda i: (-sign * q[i], i))  # ties go to the earliest setting
        word = "highest" if higher_is_better else "lowest"
        return best, (
            f"setting {best + 1} of {len(q)}: {word} quality {q[best]:.4g} among {len(ranked)} setting(s) with "
            f"fidelity >= {floor:g} (its fidelity {f[best]:.4g})"
        )

    valid_f = [i for i in range(len(f)) if not math.isnan(f[i])]
    if not valid_f:
        return 0, f"no setting has a valid fidelity score; returning setting 1 of {len(q)}"
    best = min(valid_f, key=lambda i: (-f[i], i))
    why = (
        f"{len(passing)} setting(s) reached the fidelity floor {floor:g} but none has a valid quality score"
        if passing
        else f"no setting reached the fidelity floor {floor:g}"
    )
    return best, f"{why}; returning the highest-fidelity setting {best + 1} of {len(q)} (fidelity {f[best]:.4g})"


def choose_best_per_image(
    quality: Sequence[Sequence[float]],
    fidelity: Sequence[Sequence[float]],
    floor: float,
    higher_is_better: bool = True,
) -> list[tuple[int, str]]:
    """``choose_best`` for every image of a batch: ``quality[s][b]`` and ``fidelity[s][b]`` are setting ``s``'s
    scores for image ``b``; returns one ``(setting index, why)`` per image (each image may prefer another setting)."""
    q = [[float(v) for v in row] for row in quality]
    f = [[float(v) for v in row] for row in fidelity]
    if not q or len(q) != len(f):
        raise PisaError(f"{len(q)} settings of quality scores but {len(f)} of fidelity scores")
    batch = len(q[0])
    if batch == 0 or any(len(row) != batch for row in q + f):
        raise PisaError("every setting needs one quality and one fidelity score per image")
    return [
        choose_best([row[b] for row in q], [row[b] for row in f], floor, higher_is_better) for b in range(batch)
    ]
