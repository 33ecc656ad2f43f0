"""Learned no-reference scores (MUSIQ, CLIP-IQA, MANIQA) through the optional ``pyiqa`` package, strictly from files
already on disk: pyiqa's checkpoints (<torch hub dir>/pyiqa), OpenAI's CLIP (<torch hub dir>/clip) and MANIQA's timm
backbone (Hugging Face hub cache) are checked before a metric is built, which happens with the downloaders disabled.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import sys
import threading
from typing import Iterator

import torch

from .checks import check_choice, check_rgb as _check_image
from .errors import PisaError
from .runtime import host64

_CLIP_RN50_SHA256 = "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"
_MANIQA_BACKBONE = "vit_base_patch8_224"
_PYIQA_FILES = {"musiq": ("musiq_koniq_ckpt-e95806b9.pth",), "clipiqa": (), "maniqa": ("ckpt_koniq10k.pt",)}

_lock = threading.Lock()
_metric_cache: dict[tuple[str, str], object] = {}


def _pyiqa_installed() -> bool:
    return "pyiqa" in sys.modules or importlib.util.find_spec("pyiqa") is not None


def _stamp(path: str) -> tuple[str, int, int]:
    """(path, size, mtime): the key of the cached checks below."""
    st = os.stat(path)
    return path, st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _tensors_only(path: str, size: int, mtime_ns: int) -> bool:
    """pyiqa unpickles its checkpoints without ``weights_only``: a file reaches it only if the guarded load (tensors
    and plain containers, no code) accepts it."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return True
    except Exception:  # noqa: BLE001  (any refusal or corruption: not handed to pyiqa)
        return False


def _maniqa_backbone_cached() -> tuple[bool, str]:
    """Whether the hub repository timm loads the backbone from is in the local hub cache (no network), and its id."""
    hub_id = "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k"  # timm's default, if timm cannot say
    with contextlib.suppress(Exception):  # older/newer timm APIs, or no timm
        from timm.models import get_pretrained_cfg

        hub_id = get_pretrained_cfg(_MANIQA_BACKBONE).hf_hub_id or hub_id
    try:
        from huggingface_hub import try_to_load_from_cache

        found = [try_to_load_from_cache(hub_id, f) for f in ("model.safetensors", "pytorch_model.bin")]
    except Exception:  # noqa: BLE001  (no hub client, or a malformed cache: "not available", not a crash)
        return False, hub_id
    return any(isinstance(p, str) and os.path.isfile(p) for p in found), hub_id


def learned_metric_status(name: str) -> tuple[bool, str]:
    """``(available, reason)`` for a learned metric, from the file system only (pyiqa is not imported)."""
    key = name.lower()
    check_choice("learned metric", key, _PYIQA_FILES)
    fetch = (f"once outside ComfyUI, e.g. python -c \"import pyiqa; pyiqa.create_metric('{key}')\"; "
             "this node never downloads.")
    if not _pyiqa_installed():
        return False, (f"the '{key}' score needs the optional 'pyiqa' package, which is not installed in this "
                       f"Python. Install it (pip install pyiqa) and fetch its weights {fetch}")
    missing = []
    # pyiqa's own cache dir once it is loaded (fixed at its import), else the same default computed now.
    pyiqa_dir = getattr(sys.modules.get("pyiqa.utils.download_util"), "DEFAULT_CACHE_DIR", None)
    for filename in _PYIQA_FILES[key]:
        path = os.path.join(pyiqa_dir or os.path.join(torch.hub.get_dir(), "pyiqa"), filename)
        if not os.path.isfile(path):
            missing.append(path)
        elif not _tensors_only(*_stamp(path)):
            return False, (f"the '{key}' weight file {path} is refused: it holds more than tensors (loading it "
                           "could run code) or is damaged. Delete it and fetch it again with pyiqa outside ComfyUI.")
    if key == "clipiqa":  # a TorchScript archive, not a checkpoint: accepted only with its published SHA-256
        path = os.path.join(torch.hub.get_dir(), "clip", "RN50.pt")
        if not os.path.isfile(path):
            missing.append(path)
        elif _sha256(*_stamp(path)) != _CLIP_RN50_SHA256:
            missing.append(f"{path} (incomplete or corrupt: SHA-256 mismatch)")
    if key == "maniqa":
        cached, hub_id = _maniqa_backbone_cached()
        if not cached:
            missing.append(f"Hugging Face hub cache entry {hub_id} (timm backbone {_MANIQA_BACKBONE})")
    if missing:
        return False, (f"pyiqa is installed but the '{key}' weights are not on this machine: missing "
                       f"{'; '.join(missing)}. Fetch them {fetch}")
    return True, "ok"


def _refuse_download(*args: object, **kwargs: object) -> None:
    raise RuntimeError("pisa_sr.metrics: network download refused (learned metrics only use local weights)")


def _guarded_clip_download(url: str, root: str, *args: object, **kwargs: object) -> str:
    """Stand-in for pyiqa's CLIP downloader: the local file if it has the SHA-256 in its URL (as CLIP's own check)."""
    path = os.path.join(root, os.path.basename(url))
    if os.path.isfile(path) and _sha256(*_stamp(path)) == url.split("/")[-2]:
        return path
    raise RuntimeError(f"pisa_sr.metrics: CLIP weights {path} missing or corrupt; download refused")


_OFFLINE_PATCHES = (
    ("huggingface_hub.constants", "HF_HUB_OFFLINE", True),
    ("huggingface_hub.file_download", "HF_HUB_OFFLINE", True),
    ("pyiqa.utils.download_util", "download_url_to_file", _refuse_download),
    ("pyiqa.utils.download_util", "download_file_from_google_drive", _refuse_download),
    ("pyiqa.archs.clip_model", "_download", _guarded_clip_download),
)


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Patch the loaded libraries' module attributes and restore them after; process-wide while they last (another
    thread using huggingface_hub or pyiqa meanwhile is offline too)."""
    saved = []
    try:
        for module, attr, value in _OFFLINE_PATCHES:
            obj = sys.modules.get(module)
            if hasattr(obj, attr):
                saved.append((obj, attr, getattr(obj, attr)))
                setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def learned_score(img: torch.Tensor, name: str) -> torch.Tensor:
    """``[B]`` float64 (CPU), higher is better, the metric built once per device; PisaError if weights are missing."""
    _check_image(img)
    key = name.lower()
    ok, reason = learned_metric_status(key)
    if not ok:
        raise PisaError(reason)
    cache_key = (key, str(img.device))
    with _lock:
        if cache_key not in _metric_cache:
            try:
                import pyiqa  # with the modules _offline patches, imported before it so the patches reach them

                for module in ("pyiqa.utils.download_util", "pyiqa.archs.clip_model"):
                    with contextlib.suppress(ImportError):
                        importlib.import_module(module)
                with _offline():
                    _metric_cache[cache_key] = pyiqa.create_metric(key, device=img.device).eval()
            except Exception as exc:  # noqa: BLE001  (surface as the node-level error the user can act on)
                raise PisaError(f"pyiqa could not build '{key}' from the local weights: {exc}") from exc
        metric = _metric_cache[cache_key]
    with torch.no_grad():
        out = metric(img.permute(0, 3, 1, 2).to(torch.float32).clamp(0.0, 1.0))
    return host64(torch.as_tensor(out)).reshape(img.shape[0], -1).mean(dim=1)
