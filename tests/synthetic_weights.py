"""Seeded synthetic data shared by the tests and the benchmarks (boots nothing): the init rule for random diffusers
models, a LoRA dict in the release's exact pisa_sr.pkl layout made with the release's module selection rule, and a
structured test image. One copy, so the benchmark's ``--tiny`` models are the tests' models by construction.
"""
from __future__ import annotations

import torch

RELEASE_PATTERNS = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
                    "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj"]


def init_weights(module: torch.nn.Module, seed: int, affine_noise: float = 0.2) -> None:
    """Seeded fan-in scaled normal matrices and affine params near (1, 0): activations stay in range through a
    random network, so comparisons are not vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + affine_noise * torch.randn(p.shape, generator=g))
            else:
                p.copy_(affine_noise * torch.randn(p.shape, generator=g))


def release_module_lists(names) -> dict[str, list[str]]:
    """The release's module selection rule (initialize_unet in pisasr.py) over diffusers UNet parameter names."""
    enc, dec, oth = [], [], []
    for n in names:
        if "bias" in n or "norm" in n:
            continue
        for pattern in RELEASE_PATTERNS:
            if pattern in n and ("down_blocks" in n or "conv_in" in n):
                enc.append(n.replace(".weight", ""))
                break
            elif pattern in n and ("up_blocks" in n or "conv_out" in n):
                dec.append(n.replace(".weight", ""))
                break
            elif pattern in n:
                oth.append(n.replace(".weight", ""))
                break
    return {"encoder": enc, "decoder": dec, "others": oth}


def release_lora_dict(shapes: dict[str, tuple], seed: int = 3, rank: int = 4, strength: float = 0.5,
                      dtype: torch.dtype = torch.float32) -> dict:
    """A dict in the exact pisa_sr.pkl layout with random (non-zero) LoRA weights for a UNet whose diffusers
    parameter names and shapes are ``shapes`` (in parameter order)."""
    g = torch.Generator().manual_seed(seed)
    lists = release_module_lists(shapes)
    sd: dict = {"lora_rank_unet_pix": rank, "lora_rank_unet_sem": rank, "state_dict_unet": {}}
    for kind in ("pix", "sem"):
        for part, names in lists.items():
            sd[f"unet_lora_{part}_modules_{kind}"] = list(names)
            for name in names:
                w = shapes[name + ".weight"]
                if len(w) == 4:
                    a = torch.randn(rank, w[1], w[2], w[3], generator=g) / (w[1] * w[2] * w[3]) ** 0.5
                    b = torch.randn(w[0], rank, 1, 1, generator=g) * strength / rank ** 0.5
                else:
                    a = torch.randn(rank, w[1], generator=g) / (w[1] ** 0.5)
                    b = torch.randn(w[0], rank, generator=g) * strength / rank ** 0.5
                sd["state_dict_unet"][f"{name}.lora_A.default_{part}_{kind}.weight"] = a.to(dtype)
                sd["state_dict_unet"][f"{name}.lora_B.default_{part}_{kind}.weight"] = b.to(dtype)
    return sd


def synthetic_checkpoint(unet, seed: int = 3, rank: int = 4, strength: float = 0.5) -> dict:
    """:func:`release_lora_dict` for a diffusers ``unet``."""
    return release_lora_dict({n: tuple(p.shape) for n, p in unet.named_parameters()}, seed, rank, strength)


def make_image(w: int, h: int, seed: int = 0):
    """A structured RGB test image as PIL (gradients, texture, noise): something for colour fix and tiling."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 0.5 + 0.4 * np.sin(x / max(w, 1) * 6.28 * 1.5)
    gch = 0.5 + 0.4 * np.cos(y / max(h, 1) * 6.28)
    b = 0.5 + 0.3 * np.sin((x + y) / 7.0)
    img = np.stack([r, gch, b], -1) + 0.05 * g.standard_normal((h, w, 3))
    return Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
