"""Small shared helpers for tests."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from conftest import run_node  # noqa: F401  (re-exported)
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
