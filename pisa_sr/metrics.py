"""Image quality scores for comparing super-resolution outputs (ComfyUI IMAGE tensors, ``[B,H,W,C]`` in ``[0,1]``).

Full-reference scores (PSNR, SSIM) follow the convention of the SR literature (BasicSR, the PiSA-SR tables) so a
number printed here can be put next to a paper's: luma of BT.601 YCbCr in the ``[16,235]`` studio range, a border of
``crop_border`` pixels dropped on every side, SSIM with an 11x11 Gaussian window (sigma 1.5) and data range 255. They
are computed on the float image as given; papers score saved 8-bit PNGs, so round to 1/255 first to match them exactly.

No-reference scores come in two kinds:

* heuristics that need no weights (``sharpness``, ``noise``): cheap, deterministic, and honest about what they are:
  they measure edges and fine-grain variation, not perceived quality. Noise raises sharpness; texture raises noise.
* learned scores (``musiq``, ``clipiqa``, ``maniqa``, the ones the PiSA-SR paper reports) through the optional
  ``pyiqa`` package, used only when it and its weight files are already on this machine. Nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .errors import PisaError

__all__ = [
    "MetricSpec",
    "METRICS",
    "LEARNED_METRICS",
    "rgb_to_y",
    "psnr_y",
    "ssim_y",
    "sharpness",
    "noise_sigma",
    "learned_metric_status",
    "learned_score",
    "score",
]


@dataclass(frozen=True)
class MetricSpec:
    """What a score means: ``direction`` +1 if higher is better, -1 if lower is better."""

    direction: int
    needs_reference: bool
    learned: bool
    description: str


METRICS: dict[str, MetricSpec] = {
    "psnr": MetricSpec(+1, True, False, "PSNR on Y (BT.601, [16,235]) in dB, border-cropped; inf if identical"),
    "ssim": MetricSpec(+1, True, False, "SSIM on Y (BT.601), 11x11 Gaussian window sigma 1.5, border-cropped"),
    "sharpness": MetricSpec(+1, False, False, "heuristic: RMS Sobel gradient of luma (0..255 levels per pixel)"),
    "noise": MetricSpec(-1, False, False, "heuristic: Immerkaer noise sigma of luma (0..255 levels)"),
    "musiq": MetricSpec(+1, False, True, "MUSIQ (KonIQ weights) via pyiqa, about 0..100"),
    "clipiqa": MetricSpec(+1, False, True, "CLIP-IQA (RN50) via pyiqa, 0..1"),
    "maniqa": MetricSpec(+1, False, True, "MANIQA (KonIQ weights) via pyiqa, about 0..1"),
}

LEARNED_METRICS: tuple[str, ...] = tuple(name for name, spec in METRICS.items() if spec.learned)

# BT.601 luma as MATLAB's rgb2ycbcr computes it on [0,1] RGB: the result lies in [16,235].
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0

_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5  # 11 taps: int(3.5 * sigma + 0.5), the truncation scikit-image and BasicSR's 11x11 window share
_SSIM_K1, _SSIM_K2 = 0.01, 0.03
_DATA_RANGE = 255.0


def _check_image(img: torch.Tensor, what: str = "image") -> None:
    if not isinstance(img, torch.Tensor):
        raise PisaError(f"{what} must be a torch.Tensor, got {type(img).__name__}")
    if img.ndim != 4 or img.shape[-1] != 3:
        raise PisaError(f"{what} must be an IMAGE tensor [B,H,W,3], got shape {tuple(img.shape)}")
    if img.shape[0] == 0 or img.shape[1] == 0 or img.shape[2] == 0:
        raise PisaError(f"{what} is empty: shape {tuple(img.shape)}")


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """BT.601 luma ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` of RGB ``[B,H,W,3]`` in [0,1] -> ``[B,H,W]``, [16,235].

    This is MATLAB's ``rgb2ycbcr`` (studio range), which the SR literature's "PSNR/SSIM on Y" uses; computed in
    float64 so the metrics built on it do not inherit half-precision rounding.
    """
    _check_image(img)
    x = img.to(torch.float64)
    r, g, b = x.unbind(-1)
    return _Y_OFFSET + _Y_WEIGHTS[0] * r + _Y_WEIGHTS[1] * g + _Y_WEIGHTS[2] * b


def _pair_to_y(
    img: torch.Tensor, ref: torch.Tensor, crop_border: int, min_side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Y planes of image and reference, border-cropped; a single reference is compared with every image."""
    _check_image(img, "image")
    _check_image(ref, "reference")
    if img.shape[1:3] != ref.shape[1:3]:
        raise PisaError(
            f"image and reference sizes differ: {tuple(img.shape[1:3])} vs {tuple(ref.shape[1:3])} (H, W); "
            "resize one of them first"
        )
    if ref.shape[0] not in (1, img.shape[0]):
        raise PisaError(f"reference batch {ref.shape[0]} must be 1 or match the image batch {img.shape[0]}")
    crop_border = int(crop_border)
    if crop_border < 0:
        raise PisaError(f"crop_border must be >= 0, got {crop_border}")
    h, w = img.shape[1] - 2 * crop_border, img.shape[2] - 2 * crop_border
    if h < min_side or w < min_side:
        raise PisaError(
            f"image {tuple(img.shape[1:3])} is too small for crop_border={crop_border}: "
            f"{min_side}x{min_side} px must remain"
        )
    y, y_ref = rgb_to_y(img), rgb_to_y(ref.to(img.device))
    if crop_border:
        y = y[:, crop_border:-crop_border, crop_border:-crop_border]
        y_ref = y_ref[:, crop_border:-crop_border, crop_border:-crop_border]
    return y, y_ref.expand_as(y)


def psnr_y(img: torch.Tensor, ref: torch.Tensor, crop_border: int = 4) -> torch.Tensor:
    """PSNR in dB on BT.601 luma (0..255 scale, peak 255) after dropping ``crop_border`` px per side -> ``[B]`` float64.

    Identical images give ``inf`` (as scikit-image and BasicSR do) rather than an arbitrary cap, so "perfect" is
    never confused with a finite score. ``ref`` may have batch 1 to score every image against one reference.
    """
    y, y_ref = _pair_to_y(img, ref, crop_border, 1)
    mse = (y - y_ref).square().mean(dim=(1, 2))
    return 10.0 * torch.log10(_DATA_RANGE**2 / mse)  # mse == 0 -> inf, without a warning


def _gaussian_taps(device: torch.device) -> torch.Tensor:
    x = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    g = torch.exp(-(x * x) / (2.0 * _SSIM_SIGMA**2))
    return g / g.sum()


def _blur_valid(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of ``[N,1,H,W]`` keeping only the fully covered ('valid') region."""
    k = taps.numel()
    x = F.conv2d(x, taps.view(1, 1, 1, k))
    return F.conv2d(x, taps.view(1, 1, k, 1))


def ssim_y(img: torch.Tensor, ref: torch.Tensor, crop_border: int = 4) -> torch.Tensor:
    """SSIM on BT.601 luma after dropping ``crop_border`` px per side -> ``[B]`` float64 (1 for identical images).

    The SR convention (BasicSR's ``calculate_ssim``, scikit-image with ``gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255``): 11x11 Gaussian window, K1=0.01, K2=0.03, population
    (co)variances, mean of the SSIM map over the positions where the window fits inside the cropped image.
    """
    y, y_ref = _pair_to_y(img, ref, crop_border, 2 * _SSIM_RADIUS + 1)
    b = y.shape[0]
    taps = _gaussian_taps(y.device)
    # One batched filter pass over the five moment images.
    stack = torch.cat([y, y_ref, y * y, y_ref * y_ref, y * y_ref], dim=0).unsqueeze(1)
    mu_x, mu_y, e_xx, e_yy, e_xy = _blur_valid(stack, taps).squeeze(1).split(b, dim=0)
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov = e_xy - mu_x * mu_y
    c1 = (_SSIM_K1 * _DATA_RANGE) ** 2
    c2 = (_SSIM_K2 * _DATA_RANGE) ** 2
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return (num / den).mean(dim=(1, 2))


def _luma_full_range(img: torch.Tensor) -> torch.Tensor:
    """BT.601 luma rescaled to 0..255 (``0.299 R + 0.587 G + 0.114 B`` times 255), ``[B,1,H,W]`` float64.

    The heuristics report in these units so that noise of std ``s`` (0..255) added equally to R, G and B reads as
    ``s``; independent noise per channel reads about ``0.67 s``.
    """
    return ((rgb_to_y(img) - _Y_OFFSET) * (255.0 / 219.0)).unsqueeze(1)


def sharpness(img: torch.Tensor) -> torch.Tensor:
    """Heuristic sharpness: RMS Sobel gradient magnitude of luma (levels per pixel, 0..255 scale) -> ``[B]``.

    Blur lowers it and crisp edges raise it, which is what separates the fidelity end of the lambda range from the
    detail end; but noise and halos raise it too, so read it next to ``noise``, not as perceived quality.
    """
    _check_image(img)
    if img.shape[1] < 3 or img.shape[2] < 3:
        raise PisaError(f"sharpness needs at least 3x3 pixels, got {tuple(img.shape[1:3])}")
    y = _luma_full_range(img)
    # Sobel normalised by 1/8 so a ramp of one level per pixel has gradient 1.
    sx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64, device=y.device) / 8
    kernels = torch.stack([sx, sx.t()]).unsqueeze(1)
    g = F.conv2d(y, kernels)
    return g.square().sum(dim=1).mean(dim=(1, 2)).sqrt()


def noise_sigma(img: torch.Tensor) -> torch.Tensor:
    """Heuristic noise level: Immerkaer's fast estimate of Gaussian noise std on luma (0..255 levels) -> ``[B]``.

    J. Immerkaer, "Fast Noise Variance Estimation", CVIU 64(2), 1996: the mask ``[1,-2,1]^T [1,-2,1]`` cancels
    image content that is locally linear along either axis, and ``sqrt(pi/2) / 6 * mean|response|`` is unbiased for
    white Gaussian noise. Texture and sharp edges leak into it, so it overestimates on detailed images.
    Lower is better.
    """
    _check_image(img)
    if img.shape[1] < 3 or img.shape[2] < 3:
        raise PisaError(f"noise_sigma needs at least 3x3 pixels, got {tuple(img.shape[1:3])}")
    y = _luma_full_range(img)
    d = torch.tensor([1.0, -2.0, 1.0], dtype=torch.float64, device=y.device)
    mask = torch.outer(d, d).view(1, 1, 3, 3)
    response = F.conv2d(y, mask)
    return math.sqrt(math.pi / 2.0) / 6.0 * response.abs().mean(dim=(1, 2, 3))


# ----------------------------------------------------------------------------------------------------------------
# Learned metrics through pyiqa, strictly from files already on disk.
#
# Where pyiqa (chaofengc/IQA-PyTorch) keeps its weights: `load_file_from_url` caches into
# `os.path.join(torch.hub.get_dir(), "pyiqa")` under the URL's file name; its CLIP loader caches OpenAI CLIP into
# `torch.hub.get_dir()/clip` and re-downloads on a SHA-256 mismatch (the hash is part of the URL); MANIQA also builds
# timm's `vit_base_patch8_224` with pretrained=True, which comes from the Hugging Face hub cache.
# We check every one of those files before constructing a metric, so pyiqa's own code never needs the network, and
# we additionally disable its downloader and put the hub client offline while it builds.

_CLIP_RN50_SHA256 = "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"
_MANIQA_BACKBONE = "vit_base_patch8_224"
_MANIQA_BACKBONE_HUB_ID = "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k"


@dataclass(frozen=True)
class _LearnedSpec:
    pyiqa_name: str
    pyiqa_files: tuple[str, ...] = ()  # under <torch hub dir>/pyiqa
    clip_file: Optional[tuple[str, str]] = None  # (file under <torch hub dir>/clip, sha256)
    timm_backbone: Optional[str] = None


_LEARNED: dict[str, _LearnedSpec] = {
    "musiq": _LearnedSpec("musiq", pyiqa_files=("musiq_koniq_ckpt-e95806b9.pth",)),
    "clipiqa": _LearnedSpec("clipiqa", clip_file=("RN50.pt", _CLIP_RN50_SHA256)),
    "maniqa": _LearnedSpec("maniqa", pyiqa_files=("ckpt_koniq10k.pt",), timm_backbone=_MANIQA_BACKBONE),
}

_lock = threading.Lock()
_metric_cache: dict[tuple[str, str], object] = {}
_sha_cache: dict[tuple[str, int, int], str] = {}
_tensors_only_cache: dict[tuple[str, int, int], bool] = {}


def _pyiqa_installed() -> bool:
    if "pyiqa" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("pyiqa") is not None
    except (ImportError, ValueError):
        return False


def _torch_hub_dir() -> str:
    return torch.hub.get_dir()  # honours torch.hub.set_dir and $TORCH_HOME, as pyiqa does


def _pyiqa_cache_dir() -> str:
    loaded = sys.modules.get("pyiqa.utils.download_util")
    cache = getattr(loaded, "DEFAULT_CACHE_DIR", None)
    return cache if isinstance(cache, str) else os.path.join(_torch_hub_dir(), "pyiqa")


def _sha256(path: str) -> str:
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]


def _tensors_only(path: str) -> bool:
    """Whether torch loads ``path`` with ``weights_only=True``. pyiqa unpickles its checkpoints without that guard,
    so a file is handed to it only when the guarded load (tensors and plain containers, no code) accepts it."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _tensors_only_cache:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            _tensors_only_cache[key] = True
        except Exception:  # noqa: BLE001  (any refusal or corruption: not handed to pyiqa)
            _tensors_only_cache[key] = False
    return _tensors_only_cache[key]


def _hub_cached(repo_id: str) -> Optional[str]:
    """Path of a Hugging Face hub weight file already in the local cache (no network), else None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            found = try_to_load_from_cache(repo_id, filename)
        except Exception:  # noqa: BLE001  (a malformed cache must read as "not available", not crash a node)
            found = None
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _timm_hub_id(model_name: str) -> str:
    """The hub repository timm loads ``model_name``'s default pretrained weights from (only asked if timm is here)."""
    if importlib.util.find_spec("timm") is not None:
        try:
            from timm.models import get_pretrained_cfg

            cfg = get_pretrained_cfg(model_name)
            hub_id = getattr(cfg, "hf_hub_id", None)
            if hub_id:
                return hub_id
        except Exception:  # noqa: BLE001  (older/newer timm APIs: fall back to the known id)
            pass
    return _MANIQA_BACKBONE_HUB_ID


def learned_metric_status(name: str) -> tuple[bool, str]:
    """``(available, reason)`` for a learned metric, from the file system only: nothing is imported or downloaded."""
    key = name.lower()
    if key not in _LEARNED:
        raise PisaError(f"unknown learned metric {name!r}; choose from {', '.join(_LEARNED)}")
    spec = _LEARNED[key]
    if not _pyiqa_installed():
        return False, (
            f"the '{key}' score needs the optional 'pyiqa' package, which is not installed in this Python. "
            f"Install it (pip install pyiqa) and fetch its weights once outside ComfyUI, e.g. "
            f"python -c \"import pyiqa; pyiqa.create_metric('{spec.pyiqa_name}')\"; this node never downloads."
        )
    missing = []
    for filename in spec.pyiqa_files:
        path = os.path.join(_pyiqa_cache_dir(), filename)
        if not os.path.isfile(path):
            missing.append(path)
        elif not _tensors_only(path):
            return False, (
                f"the '{key}' weight file {path} is refused: it holds more than tensors (loading it could run code) "
                "or is damaged. Delete it and fetch it again with pyiqa outside ComfyUI.")
    if spec.clip_file is not None:
        filename, sha = spec.clip_file
        path = os.path.join(_torch_hub_dir(), "clip", filename)
        if not os.path.isfile(path):
            missing.append(path)
        elif _sha256(path) != sha:
            missing.append(f"{path} (incomplete or corrupt: SHA-256 mismatch)")
    if spec.timm_backbone is not None:
        hub_id = _timm_hub_id(spec.timm_backbone)
        if _hub_cached(hub_id) is None:
            missing.append(f"Hugging Face hub cache entry {hub_id} (timm backbone {spec.timm_backbone})")
    if missing:
        return False, (
            f"pyiqa is installed but the '{key}' weights are not on this machine: missing "
            + "; ".join(missing)
            + f". Fetch them once outside ComfyUI, e.g. python -c \"import pyiqa; "
            f"pyiqa.create_metric('{spec.pyiqa_name}')\"; this node never downloads."
        )
    return True, "ok"


def _refuse_download(*args: object, **kwargs: object) -> None:
    raise RuntimeError("pisa_sr.metrics: network download refused (learned metrics only use local weights)")


@contextmanager
def _offline() -> Iterator[None]:
    """While pyiqa builds a metric: hub client offline, pyiqa's and CLIP's downloaders disabled; restored after.

    Patched on the libraries' own module objects (no environment variables, no process-wide sockets) and restored
    after, so other nodes running at the same time are unaffected.
    """
    patches: list[tuple[object, str, object]] = []

    def patch(obj: object, attr: str, value: object) -> None:
        if obj is not None and hasattr(obj, attr):
            patches.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, value)

    try:
        for mod in ("huggingface_hub.constants", "huggingface_hub.file_download"):
            patch(sys.modules.get(mod), "HF_HUB_OFFLINE", True)
        patch(sys.modules.get("pyiqa.utils.download_util"), "download_url_to_file", _refuse_download)
        patch(sys.modules.get("pyiqa.utils.download_util"), "download_file_from_google_drive", _refuse_download)
        patch(sys.modules.get("pyiqa.archs.clip_model"), "_download", _guarded_clip_download)
        yield
    finally:
        for obj, attr, value in reversed(patches):
            setattr(obj, attr, value)


def _guarded_clip_download(url: str, root: str, *args: object, **kwargs: object) -> str:
    """Stand-in for pyiqa's CLIP downloader: return the verified local file, never fetch."""
    path = os.path.join(root, os.path.basename(url))
    expected = url.rstrip("/").split("/")[-2] if url.count("/") >= 2 else ""
    if os.path.isfile(path) and (not expected or _sha256(path) == expected):
        return path
    raise RuntimeError(f"pisa_sr.metrics: CLIP weights {path} missing or corrupt; download refused")


def _build_metric(name: str, device: torch.device) -> object:
    spec = _LEARNED[name]
    import pyiqa  # imported outside the offline window on purpose (see _offline)

    for mod in ("pyiqa.utils.download_util", "pyiqa.archs.clip_model"):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass
    with _offline():
        metric = pyiqa.create_metric(spec.pyiqa_name, device=device)
    if hasattr(metric, "eval"):
        metric.eval()
    return metric


def learned_score(img: torch.Tensor, name: str) -> torch.Tensor:
    """Learned no-reference score ``[B]`` (float64) from pyiqa: MUSIQ, CLIP-IQA or MANIQA, higher is better.

    Raises ``PisaError`` (a ValueError) saying what is missing and how to get it when pyiqa or the weights are not
    present; never downloads. The built metric is cached per device. pyiqa unpickles its checkpoints without
    ``weights_only``, so each one must first pass torch's ``weights_only=True`` load; OpenAI's CLIP file (a
    TorchScript archive) is accepted only with its published SHA-256.
    """
    _check_image(img)
    key = name.lower()
    ok, reason = learned_metric_status(key)
    if not ok:
        raise PisaError(reason)
    cache_key = (key, str(img.device))
    with _lock:
        metric = _metric_cache.get(cache_key)
        if metric is None:
            try:
                metric = _build_metric(key, img.device)
            except Exception as exc:  # noqa: BLE001  (surface as the node-level error the user can act on)
                raise PisaError(f"pyiqa could not build '{key}' from the local weights: {exc}") from exc
            _metric_cache[cache_key] = metric
    x = img.permute(0, 3, 1, 2).to(torch.float32).clamp(0.0, 1.0)
    with torch.no_grad():
        out = metric(x)
    out = torch.as_tensor(out).detach().to(torch.float64).reshape(img.shape[0], -1)
    return out.mean(dim=1).to(img.device)


def score(
    img: torch.Tensor, metric: str, ref: Optional[torch.Tensor] = None, crop_border: int = 4
) -> torch.Tensor:
    """Score every image of a batch with ``metric`` (a key of ``METRICS``) -> ``[B]`` float64.

    ``METRICS[metric].direction`` says which way is better (``noise`` is the only lower-is-better one);
    ``psnr`` and ``ssim`` need ``ref`` (batch 1 or B), the others ignore it.
    """
    key = metric.strip().lower() if isinstance(metric, str) else metric
    if key not in METRICS:
        raise PisaError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if METRICS[key].needs_reference:
        if ref is None:
            raise PisaError(f"'{key}' is a full-reference metric: connect the ground-truth image to 'reference', or "
                            "pick a no-reference metric (sharpness, noise, musiq, ...).")
        return psnr_y(img, ref, crop_border) if key == "psnr" else ssim_y(img, ref, crop_border)
    if key == "sharpness":
        return sharpness(img)
    if key == "noise":
        return noise_sigma(img)
    return learned_score(img, key)


def format_score(value: float, unit: str = "") -> str:
    """A score for a label or report: 4 significant digits; NaN (could not be computed) reads ``n/a``."""
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf" + unit
    return f"{value:.4g}{unit}"
