"""Encode LQ: resize the low-quality image the release's way and VAE-encode it."""
from __future__ import annotations

import torch

from ..pisa_sr.checks import check_image
from ..pisa_sr.heap import trims_heap
from ..pisa_sr.resize import FILTERS, plan_resize, resize_batch
from . import compat, vae_ops
from .compat import io
from .errors import CATEGORY, names_refusals
from .lq_info import LATENT_KEY, LQInfo

NODE = "PiSA Encode LQ"
MIN_SIDE = 8


def encode_lq(image: torch.Tensor, vae, upscale: int, resize_filter: str, vae_tile_size: int = 0,
              vae_ram_budget: float = 0.0) -> dict:
    """One frame at a time (resize into the 8-bit LQ reference, encode its float copy), so memory does not grow with
    the batch beyond the LATENT itself; every frame's result is what it would be alone. Beyond the LATENT and the
    encoder's own working memory, a frame costs the resize's (see resize_batch) and then one fp32 copy of the resized
    frame (12 bytes per pixel: 380 MiB at 7680x4320) that the encoder reads."""
    image = check_image(image, min_side=MIN_SIDE)
    plan = plan_resize(image.shape[2], image.shape[1], int(upscale))
    b, (w, h) = image.shape[0], plan.model
    z: torch.Tensor | None = None
    lq_u8 = torch.empty(b, h, w, 3, dtype=torch.uint8)
    for i in range(b):
        frame = resize_batch(image[i:i + 1], plan, resize_filter, out=lq_u8[i:i + 1])
        zi = vae_ops.encode(vae, frame.to(torch.float32).div_(255.0), int(vae_tile_size), float(vae_ram_budget))
        if z is None:
            z = zi.new_empty((b, *zi.shape[1:]))
        z[i:i + 1] = zi
    return {"samples": z, LATENT_KEY: LQInfo(lq_u8=lq_u8, plan=plan)}


class PiSAEncodeLQ(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiSA_EncodeLQ",
            display_name=NODE,
            category=CATEGORY,
            **compat.search_aliases(),
            description="Resizes the low-quality image by the upscale factor exactly as the PiSA-SR release does "
                        "and encodes it with the VAE. The LATENT remembers the resized image for colour fix and "
                        "the output size.",
            inputs=[
                io.Image.Input("image", tooltip="The low-quality image(s) to upscale (0..1 values; batches work)."),
                io.Vae.Input("vae", tooltip="The VAE of your SD 2.1-base checkpoint (Load Checkpoint's VAE)."),
                io.Int.Input("upscale", default=4, min=1, max=8, step=1,
                             tooltip="Upscale factor; PiSA-SR was trained for x4. Small images are pre-enlarged to "
                             "512 px as in the release, and the output is resized back to upscale x input."),
                io.Combo.Input("resize_filter", options=list(FILTERS), default="bicubic",
                               tooltip="Filter of the x upscale resize; bicubic is the release's."),
                *vae_ops.inputs("image px"),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The encoded LQ image; connect to Dual-Guided "
                                      "One-Step Sample.")],
        )

    @classmethod
    @names_refusals(NODE)
    @trims_heap
    def execute(cls, image, vae, upscale=4, resize_filter="bicubic", vae_tile_size=0,
                vae_ram_budget=0.0) -> io.NodeOutput:
        return io.NodeOutput(encode_lq(image, vae, upscale, resize_filter, vae_tile_size, vae_ram_budget))
