"""Write a tiny random-weight SD 2.x (eps) checkpoint that ComfyUI's Load Checkpoint detects, plus a PiSA-SR LoRA
file in the release layout that fits it. Used by the example runner and the real-server tests, because real weights
cannot be downloaded here. The UNet is tiny; ComfyUI fixes the VAE (83.7 M) and the OpenCLIP-H text tower (354 M)
at full size, so the checkpoint is about 950 MB in fp16.

    python scripts/make_tiny_weights.py [OUT_DIR] [--full]   (needs PISA_COMFY_DIR; prints the two file paths)
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.join(os.path.dirname(HERE), "tests"))  # synthetic_weights.py: the one copy of the rules
VERSION = "2"  # bump when the generated weights change
CKPT_NAME = f"pisa_tiny_sd2_v{VERSION}.safetensors"
LORA_NAME = f"pisa_tiny_lora_v{VERSION}.pkl"
FULL_CKPT_NAME = f"pisa_full_sd21base_random_v{VERSION}.safetensors"  # gpu_check.py: full-size random weights
FULL_LORA_NAME = f"pisa_full_lora_v{VERSION}.pkl"


def unet_config() -> dict:
    """What comfy.model_detection finds in the file: SD 2.x (320 channels, 1024 context, linear proj), 2 levels."""
    return {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
            "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
            "context_dim": 1024, "use_linear_in_transformer": True, "num_res_blocks": [1, 1],
            "channel_mult": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
            "transformer_depth_middle": -2, "use_temporal_resblock": False, "use_temporal_attention": False}


def full_unet_config() -> dict:
    """SD 2.1-base's UNet (865 M): 320/640/1280/1280 channels, 2 res blocks a level, 64-channel heads."""
    return {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
            "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
            "context_dim": 1024, "use_linear_in_transformer": True, "num_res_blocks": [2, 2, 2, 2],
            "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
            "num_head_channels": 64, "use_temporal_resblock": False, "use_temporal_attention": False}


def release_lora_dict(unet_cfg: dict, shapes: dict, seed: int = 7) -> dict:
    """The release's LoRA layout over the diffusers names of this ComfyUI UNet (``shapes``: its state dict shapes)."""
    import comfy.utils
    import torch
    from synthetic_weights import release_lora_dict as lora_dict

    mapping = comfy.utils.unet_to_diffusers(unet_cfg)
    named = {dk: shapes["diffusion_model." + ck] for dk, ck in sorted(mapping.items())
             if "diffusion_model." + ck in shapes}
    return lora_dict(named, seed, rank=4, strength=0.3, dtype=torch.float16)


def make(out_dir: str, full: bool = False) -> tuple[str, str]:
    """(checkpoint, LoRA file) paths, built once into ``out_dir``; ``full`` = the SD 2.1-base UNet (GPU checks)."""
    os.makedirs(out_dir, exist_ok=True)
    names = (FULL_CKPT_NAME, FULL_LORA_NAME) if full else (CKPT_NAME, LORA_NAME)
    ckpt_path, lora_path = (os.path.join(out_dir, n) for n in names)
    if os.path.exists(ckpt_path) and os.path.exists(lora_path):
        return ckpt_path, lora_path
    from comfy_boot import boot
    from synthetic_weights import init_weights

    boot()
    import torch
    import comfy.sd
    import comfy.supported_models
    import comfy.utils
    from comfy.ldm.models.autoencoder import AutoencoderKL

    t0 = time.time()
    cfg = full_unet_config() if full else unet_config()
    mc = comfy.supported_models.SD20(cfg)
    mc.set_inference_dtype(torch.float32, None)
    base = mc.get_model({})
    init_weights(base.diffusion_model, 0, affine_noise=0.0)
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    ae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    init_weights(ae, 1, affine_noise=0.0)
    vae = comfy.sd.VAE(sd=ae.state_dict())
    clip = comfy.sd.CLIP(mc.clip_target(), parameters=0)
    init_weights(clip.cond_stage_model, 2, affine_noise=0.0)
    shapes = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    tmp = ckpt_path[: -len(".safetensors")] + ".tmp.safetensors"
    # The keys comfy.sd.save_checkpoint writes (no patches, so nothing to load first), cast to fp16 in memory and
    # written once: the full-size file is 2.6 GB instead of a 5.2 GB fp32 write, read back and rewritten.
    # ComfyUI 0.30.0's BaseModel.state_dict_for_saving takes the UNet's state dict first (its ModelPatcher hands it
    # over); 0.3.75's reads it itself (comfy/model_base.py of each host). Same keys and bytes either way.
    lead = ()
    if "unet_state_dict" in inspect.signature(base.state_dict_for_saving).parameters:
        lead = (base.diffusion_model.state_dict(),)
    sd = base.state_dict_for_saving(*lead, clip.get_sd(), vae.get_sd(), None)
    sd = {k: sd.pop(k).half().contiguous() for k in list(sd)}
    comfy.utils.save_torch_file(sd, tmp)
    del sd
    lora = release_lora_dict(cfg, shapes)
    torch.save(lora, lora_path + ".tmp")
    os.replace(lora_path + ".tmp", lora_path)
    os.replace(tmp, ckpt_path)
    print(f"make_tiny_weights: built in {time.time() - t0:.1f}s ({os.path.getsize(ckpt_path) / 2 ** 30:.2f} GiB)",
          file=sys.stderr)
    return ckpt_path, lora_path


def cache_dir() -> str:
    return os.environ.get("PISA_WEIGHTS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "comfyui-pisa-sr",
                                                                  "weights")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", nargs="?", default=cache_dir())
    ap.add_argument("--full", action="store_true", help="the SD 2.1-base-shaped UNet (865 M) for the GPU check")
    a = ap.parse_args()
    c, l = make(a.out_dir, full=a.full)
    print(c)
    print(l)
