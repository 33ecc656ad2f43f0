"""Small shared helpers for tests."""
from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from synthetic_weights import make_image  # noqa: F401  (re-exported)


def pil_to_image(img: Image.Image) -> torch.Tensor:
    """PIL -> ComfyUI IMAGE [1,H,W,3] float (as LoadImage does)."""
    return torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)[None]


def pipeline(model, vae, conditioning, image, *, upscale=4, lambda_pix=1.0, lambda_sem=1.0, tile_size=96,
             tile_overlap=32, color_fix="adain", resize_filter="bicubic"):
    """Encode LQ -> Sample -> Decode through the registered nodes; returns (image, latent_in, latent_out)."""
    (lat,) = run_node("PiSA_EncodeLQ", image=image, vae=vae, upscale=upscale, resize_filter=resize_filter)
    (hq,) = run_node("PiSA_Sample", model=model, positive=conditioning, latent=lat, lambda_pix=lambda_pix,
                     lambda_sem=lambda_sem, tile_size=tile_size, tile_overlap=tile_overlap)
    (img,) = run_node("PiSA_Decode", latent=hq, vae=vae, color_fix=color_fix)
    return img, lat, hq


def encode_lq(vae, image, upscale=4, **kw) -> dict:
    """The Encode LQ node (bicubic pre-resize); returns its LATENT."""
    return run_node("PiSA_EncodeLQ", image=image, vae=vae, upscale=upscale, resize_filter="bicubic", **kw)[0]


def random_latent(h: int, w: int, seed: int = 0, b: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(b, 4, h, w, generator=g) * 4.0}  # raw SD latent scale (x 0.18215 inside)


def sample_eps(model, cond, latent, lp, ls, tile=96, overlap=32, **kw):
    """nodes.sample.sample_eps with the node's default tiling; returns (z, eps)."""
    import host

    return host.pack("nodes.sample").sample_eps(model, latent, cond, lp, ls, tile, overlap, **kw)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def forward_hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in model.model.modules())


def log_unet_calls(monkeypatch, model, fail=lambda i: None) -> list[tuple[int, int]]:
    """Wraps nodes.unet.unet_eps_t1; returns the list it fills with (batch, active forward hooks) per call.
    ``fail(i)`` may return an exception to raise on call i."""
    import host

    unet, calls = host.pack("nodes.unet"), []
    real = unet.unet_eps_t1

    def wrapped(m, z, context, sigma, **kw):
        calls.append((z.shape[0], forward_hooks(model)))
        if (exc := fail(len(calls) - 1)) is not None:
            raise exc
        return real(m, z, context, sigma, **kw)

    monkeypatch.setattr(unet, "unet_eps_t1", wrapped)
    return calls


@pytest.fixture(autouse=True)
def no_grad():
    """Import into a module to run its tests without autograd (nodes run under inference mode)."""
    with torch.no_grad():
        yield


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages allocated inside the mode and still alive: every aten op's outputs pass through
    here, an output whose storage is none of the op's inputs' is a new allocation, and a finalizer on the storage
    counts it free. What existed before (weights, inputs) is not counted; a kernel's internal scratch is not seen.
    ``classify(tensor) -> str`` splits the count by kind (``now_by`` / ``peak_by``); ``now`` / ``peak`` are the total."""

    def __init__(self, classify=None):
        super().__init__()
        self.classify = classify or (lambda t: "all")
        self.live: dict[int, tuple[int, str]] = {}
        self.now = self.peak = 0
        self.now_by: dict[str, int] = {}
        self.peak_by: dict[str, int] = {}

    def _free(self, key: int) -> None:
        nbytes, kind = self.live.pop(key)
        self.now -= nbytes
        self.now_by[kind] -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key in seen or key in self.live or st.nbytes() == 0:
                continue
            kind = self.classify(t)
            self.live[key] = (st.nbytes(), kind)
            self.now += st.nbytes()
            self.peak = max(self.peak, self.now)
            self.now_by[kind] = self.now_by.get(kind, 0) + st.nbytes()
            self.peak_by[kind] = max(self.peak_by.get(kind, 0), self.now_by[kind])
            weakref.finalize(st, self._free, key)
        return out


def tensor_bytes(obj) -> int:
    """Storage bytes of a tensor, or of the tensors in a dict / an LQInfo (a node's output)."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if hasattr(obj, "lq_u8"):
        return tensor_bytes(obj.lq_u8)
    return 0


def run_node(node_id: str, **inputs):
    """Call a registered node's execute() the way unit tests of V3 nodes do; returns its outputs tuple."""
    import host

    return host.node(node_id).execute(**inputs).result
