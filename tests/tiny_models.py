"""Tiny SD2-shaped models with random, seeded weights: a diffusers UNet/VAE (the reference side) and the very same
weights as ComfyUI objects (MODEL/VAE, the node side), plus synthetic PiSA-SR checkpoints in the release layout.

Weights cannot be downloaded here, so correctness is shown on these: the math is the same at any size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import host  # noqa: F401  (ComfyUI booted)
import comfy.model_base
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.utils
from synthetic_weights import init_weights, synthetic_checkpoint  # noqa: F401  (re-exported for tests)

CONTEXT_DIM = 1024  # SD2's text width; the base-model check requires it
CHANNELS = (32, 64)
HEADS = (2, 4)  # head width 16
VAE_CH = 32


def diffusers_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=HEADS, use_linear_projection=True, norm_num_groups=32,
    )
    init_weights(unet, seed)
    return unet.eval()


def comfy_model_from_diffusers(unet, model_class=comfy.supported_models.SD20, model_type=None,
                               unet_overrides: dict | None = None, weight_dtype: torch.dtype = torch.float32):
    """A ComfyUI ModelPatcher holding exactly ``unet``'s weights (converted with ComfyUI's own key map).

    ``weight_dtype`` other than fp32 stores the weights in it and computes in fp32 through ComfyUI's manual cast
    (what UNETLoader's weight_dtype or an fp16 checkpoint give on a device that computes in another dtype).
    """
    mc = model_class({
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": CHANNELS[0],
        "context_dim": CONTEXT_DIM, "use_linear_in_transformer": True, "num_res_blocks": [1, 1],
        "channel_mult": [1, CHANNELS[1] // CHANNELS[0]], "transformer_depth": [1, 0],
        "transformer_depth_output": [1, 1, 0, 0], "transformer_depth_middle": 1,
        "use_temporal_resblock": False, "use_temporal_attention": False, **(unet_overrides or {}),
    })
    mc.unet_config["num_head_channels"] = CHANNELS[0] // HEADS[0]
    mc.set_inference_dtype(weight_dtype, None if weight_dtype == torch.float32 else torch.float32)
    base = mc.get_model({}) if model_type is None else comfy.model_base.BaseModel(mc, model_type=model_type)
    if unet is not None:
        sd = unet.state_dict()
        new = {ck: sd[dk] for dk, ck in comfy.utils.unet_to_diffusers(mc.unet_config).items() if dk in sd}
        base.diffusion_model.load_state_dict(new, strict=True)
        assert len(new) == len(sd), f"{len(sd) - len(new)} diffusers keys did not map"
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def diffusers_vae(seed: int = 1):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(VAE_CH,) * 4,
                        layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=256)
    init_weights(vae, seed, affine_noise=0.1)
    return vae.eval()


def comfy_vae_from_diffusers(vae, dtype: torch.dtype | None = None):
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": VAE_CH,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    return comfy.sd.VAE(sd=sd, config={"params": {"embed_dim": 4, "ddconfig": ddconfig}}, dtype=dtype)


@dataclass
class TinyWorld:
    unet: torch.nn.Module  # diffusers, no LoRA
    vae: torch.nn.Module  # diffusers
    model: object  # ComfyUI ModelPatcher with the same UNet weights
    comfy_vae: object  # ComfyUI VAE with the same weights
    ckpt: dict  # release-layout PiSA checkpoint
    context: torch.Tensor  # [1,77,1024] stand-in for CLIPTextEncode("")

    @property
    def conditioning(self):
        return [[self.context, {}]]


def tiny_world(seed: int = 0) -> TinyWorld:
    unet = diffusers_unet(seed)
    vae = diffusers_vae(seed + 1)
    ctx = torch.randn(1, 77, CONTEXT_DIM, generator=torch.Generator().manual_seed(seed + 3))
    return TinyWorld(unet, vae, comfy_model_from_diffusers(unet), comfy_vae_from_diffusers(vae),
                     synthetic_checkpoint(unet, seed + 2), ctx)
