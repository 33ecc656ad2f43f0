"""Write a tiny random-weight SD 2.x (eps) checkpoint that ComfyUI's Load Checkpoint detects, plus a PiSA-SR LoRA
file in the release layout that fits it. Used by the example runner and the real-server tests, because real weights
cannot be downloaded here. The UNet is tiny; ComfyUI fixes the VAE (83.7 M) and the OpenCLIP-H text tower (354 M)
at full size, so the checkpoint is about 950 MB in fp16.

    python scripts/make_tiny_weights.py OUT_DIR     (needs PISA_COMFY_DIR; prints the two file paths)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
VERSION = "1"  # bump when the generated weights change
CKPT_NAME = f"pisa_tiny_sd2_v{VERSION}.safetensors"
LORA_NAME = f"pisa_tiny_lora_v{VERSION}.pkl"
RELEASE_PATTERNS = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
                    "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj"]


def _init(module, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def unet_config() -> dict:
    """What comfy.model_detection finds in the file: SD 2.x (320 channels, 1024 context, linear proj), 2 levels."""
    return {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
            "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
            "context_dim": 1024, "use_linear_in_transformer": True, "num_res_blocks": [1, 1],
            "channel_mult": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
            "transformer_depth_middle": -2, "use_temporal_resblock": False, "use_temporal_attention": False}


def release_lora_dict(unet_cfg: dict, shapes: dict, seed: int = 7, rank: int = 4) -> dict:
    """The release's module selection rule over the diffusers names of this UNet, with random LoRA weights."""
    import torch
    import comfy.utils

    g = torch.Generator().manual_seed(seed)
    mapping = comfy.utils.unet_to_diffusers(unet_cfg)
    lists = {"encoder": [], "decoder": [], "others": []}
    for dk in sorted(mapping):
        if not dk.endswith(".weight") or "norm" in dk or "diffusion_model." + mapping[dk] not in shapes:
            continue
        for pat in RELEASE_PATTERNS:
            if pat in dk:
                part = ("encoder" if ("down_blocks" in dk or "conv_in" in dk) else
                        "decoder" if ("up_blocks" in dk or "conv_out" in dk) else "others")
                lists[part].append(dk[: -len(".weight")])
                break
    sd = {"lora_rank_unet_pix": rank, "lora_rank_unet_sem": rank, "state_dict_unet": {}}
    for kind in ("pix", "sem"):
        for part, names in lists.items():
            sd[f"unet_lora_{part}_modules_{kind}"] = list(names)
            for name in names:
                w = shapes["diffusion_model." + mapping[name + ".weight"]]
                if len(w) == 4:
                    a = torch.randn(rank, w[1], w[2], w[3], generator=g) / (w[1] * w[2] * w[3]) ** 0.5
                    b = torch.randn(w[0], rank, 1, 1, generator=g) * 0.3 / rank ** 0.5
                else:
                    a = torch.randn(rank, w[1], generator=g) / w[1] ** 0.5
                    b = torch.randn(w[0], rank, generator=g) * 0.3 / rank ** 0.5
                sd["state_dict_unet"][f"{name}.lora_A.default_{part}_{kind}.weight"] = a.half()
                sd["state_dict_unet"][f"{name}.lora_B.default_{part}_{kind}.weight"] = b.half()
    return sd


def make(out_dir: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path, lora_path = os.path.join(out_dir, CKPT_NAME), os.path.join(out_dir, LORA_NAME)
    if os.path.exists(ckpt_path) and os.path.exists(lora_path):
        return ckpt_path, lora_path
    from comfy_boot import boot

    boot()
    import torch
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils
    from comfy.ldm.models.autoencoder import AutoencoderKL

    t0 = time.time()
    cfg = unet_config()
    mc = comfy.supported_models.SD20(cfg)
    mc.set_inference_dtype(torch.float32, None)
    base = mc.get_model({})
    _init(base.diffusion_model, 0)
    cpu = torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    ae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    _init(ae, 1)
    vae = comfy.sd.VAE(sd=ae.state_dict())
    clip = comfy.sd.CLIP(mc.clip_target(), parameters=0)
    _init(clip.cond_stage_model, 2)
    shapes = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    tmp = ckpt_path[: -len(".safetensors")] + ".tmp.safetensors"
    comfy.sd.save_checkpoint(tmp, model, clip, vae)
    sd = {k: v.half() for k, v in comfy.utils.load_torch_file(tmp).items()}
    comfy.utils.save_torch_file(sd, tmp)
    lora = release_lora_dict(cfg, shapes)
    torch.save(lora, lora_path + ".tmp")
    os.replace(lora_path + ".tmp", lora_path)
    os.replace(tmp, ckpt_path)
    print(f"make_tiny_weights: built in {time.time() - t0:.1f}s", file=sys.stderr)
    return ckpt_path, lora_path


def cache_dir() -> str:
    return os.environ.get("PISA_WEIGHTS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "comfyui-pisa-sr",
                                                                  "weights")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", nargs="?", default=cache_dir())
    a = ap.parse_args()
    c, l = make(a.out_dir)
    print(c)
    print(l)
