"""Seeded random weights shared by both sides of the benchmark: a diffusers UNet + VAE (the release side) whose exact
tensors are also handed to ComfyUI (our side), a release-layout PiSA-SR LoRA dict, and a fixed text conditioning.

``full`` is the SD 2.1-base architecture (UNet 865 M parameters: 320/640/1280/1280 channels, 5/10/20/20 heads,
1024-wide context, linear projections; the standard SD VAE, 83.7 M). ``tiny`` is the architecture of
tests/tiny_models.py (same seeds; the init rule, LoRA layout and test image come from tests/synthetic_weights.py),
so ``--cpu --tiny`` finishes in seconds. Real weights cannot be downloaded here, and speed does not depend on weight
values; the random init is scaled so activations stay in range.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from synthetic_weights import init_weights, make_image, synthetic_checkpoint  # noqa: E402,F401  (one copy)

SCALING = 0.18215


@dataclass(frozen=True)
class Arch:
    name: str
    unet: dict  # diffusers UNet2DConditionModel kwargs
    vae: dict  # diffusers AutoencoderKL kwargs
    comfy_unet: dict  # the same UNet as a ComfyUI unet_config
    comfy_vae: dict | None  # ComfyUI VAE config (None: let ComfyUI detect the standard SD VAE)
    lora_rank: int = 4


FULL = Arch(
    "sd21-base",
    unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
              block_out_channels=(320, 640, 1280, 1280),
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
              cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
              norm_num_groups=32),
    vae=dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
             latent_channels=4, norm_num_groups=32, sample_size=512),
    comfy_unet={"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
                "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
                "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
                "context_dim": 1024, "num_head_channels": 64,
                "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                "use_temporal_attention": False, "use_temporal_resblock": False},
    comfy_vae=None,
)

TINY = Arch(  # tests/tiny_models.py
    "tiny",
    unet=dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=1024,
              attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32),
    vae=dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32,) * 4, layers_per_block=1,
             latent_channels=4, norm_num_groups=32, sample_size=256),
    comfy_unet={"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
                "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 32,
                "context_dim": 1024, "use_linear_in_transformer": True, "num_res_blocks": [1, 1],
                "channel_mult": [1, 2], "transformer_depth": [1, 0], "transformer_depth_output": [1, 1, 0, 0],
                "transformer_depth_middle": 1, "use_temporal_resblock": False, "use_temporal_attention": False,
                "num_head_channels": 16},
    comfy_vae={"params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
        "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}},
)


@dataclass
class Weights:
    arch: Arch
    unet: torch.nn.Module  # diffusers, fp32, CPU, no LoRA
    vae: torch.nn.Module  # diffusers, fp32, CPU
    ckpt: dict  # release-layout LoRA dict
    context: torch.Tensor  # [1, 77, 1024] fixed stand-in for CLIPTextEncode("")


def build(arch: Arch, seed: int = 0) -> Weights:
    """Same seeds as tests/tiny_models.tiny_world (UNet seed, VAE seed+1, LoRA seed+2, context seed+3)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel(**arch.unet)
    init_weights(unet, seed)
    vae = AutoencoderKL(**arch.vae)
    init_weights(vae, seed + 1, affine_noise=0.1)
    ckpt = synthetic_checkpoint(unet, seed + 2, arch.lora_rank)
    g = torch.Generator().manual_seed(seed + 3)
    context = torch.randn(1, 77, 1024, generator=g)
    return Weights(arch, unet.eval().requires_grad_(False), vae.eval().requires_grad_(False), ckpt, context)
