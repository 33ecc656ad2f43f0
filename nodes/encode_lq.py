"""Encode LQ: resize the low-quality image the release's way and VAE-encode it."""
from __future__ import annotations

import torch

from ..pisa_sr.errors import PisaError
from ..pisa_sr.heap import trims_heap
from ..pisa_sr.resize import FILTERS, plan_resize, resize_batch
from . import vae_ops
from .compat import io
from .lq_info import LATENT_KEY, LQInfo

NODE = "PiSA Encode LQ"
MIN_SIDE = 8


def check_image(image, node: str) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        raise PisaError(f"{node}: expected an IMAGE batch [B,H,W,C], got {getattr(image, 'shape', type(image))}.")
    b, h, w, c = image.shape
    if b == 0:
        raise PisaError(f"{node}: the image batch is empty. Connect a Load Image node that produced an image.")
    if c not in (3, 4):
        raise PisaError(f"{node}: expected RGB images (3 channels), got {c} channels.")
    if h < MIN_SIDE or w < MIN_SIDE:
        raise PisaError(f"{node}: the image is {w}x{h} px; PiSA-SR needs at least {MIN_SIDE}x{MIN_SIDE} px.")
    if not torch.isfinite(image).all():
        raise PisaError(f"{node}: the image contains NaN or infinite values; the node that produced it is broken.")
    return image[..., :3]


def encode_lq(image: torch.Tensor, vae, upscale: int, resize_filter: str, vae_tile_size: int = 0) -> dict:
    image = check_image(image, NODE)
    if not (1 <= int(upscale) <= 8):
        raise PisaError(f"{NODE}: upscale must be between 1 and 8, got {upscale}.")
    plan = plan_resize(image.shape[2], image.shape[1], int(upscale))
    lq = resize_batch(image, plan, resize_filter)
    z = vae_ops.encode(vae, lq, int(vae_tile_size), NODE)
    lq_u8 = (lq * 255.0).round().to(torch.uint8)
    return {"samples": z, LATENT_KEY: LQInfo(lq_u8=lq_u8, plan=plan)}


class PiSAEncodeLQ(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiSA_EncodeLQ",
            display_name=NODE,
            category="image/upscaling/PiSA-SR",
            description="Resizes the low-quality image by the upscale factor exactly as the PiSA-SR release does "
                        "and encodes it with the VAE. The LATENT remembers the resized image for colour fix and "
                        "the output size.",
            inputs=[
                io.Image.Input("image", tooltip="The low-quality image(s) to upscale. Batches are supported."),
                io.Vae.Input("vae", tooltip="The VAE of your SD 2.1-base checkpoint (Load Checkpoint's VAE)."),
                io.Int.Input("upscale", default=4, min=1, max=8, step=1,
                             tooltip="Upscale factor. PiSA-SR was trained for x4. Images whose short side is under "
                             "512/upscale px are first enlarged so the model works at >= 512 px (as the release "
                             "does); the output is then resized back to upscale x the input size."),
                io.Combo.Input("resize_filter", options=list(FILTERS), default="bicubic",
                               tooltip="Filter for the x upscale resize. bicubic (Pillow, antialiased) is what the "
                               "release uses; the final rescale to a multiple of 8 px is always Lanczos."),
                io.Int.Input("vae_tile_size", default=0, min=0, max=8192, step=64,
                             tooltip="VAE encoder tile size in image px. 0 = automatic from free device memory "
                             "(whole image when it fits). Tiles share GroupNorm statistics, so any tile size gives "
                             "the same latent as no tiling; smaller only saves memory and costs time. On an "
                             "out-of-memory error the node retries with smaller tiles and logs it."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The encoded LQ image; connect to Dual-Guided "
                                      "One-Step Sample.")],
        )

    @classmethod
    @trims_heap
    def execute(cls, image, vae, upscale=4, resize_filter="bicubic", vae_tile_size=0) -> io.NodeOutput:
        return io.NodeOutput(encode_lq(image, vae, upscale, resize_filter, vae_tile_size))
