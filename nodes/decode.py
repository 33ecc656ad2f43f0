"""Tiled VAE Decode: decode, colour-fix against the resized LQ, restore the release's output size."""
from __future__ import annotations

import torch

from ..pisa_sr.checks import check_choice, check_latent
from ..pisa_sr.color import COLOR_FIXES, apply_color_fix
from ..pisa_sr.errors import PisaError
from ..pisa_sr.heap import trims_heap
from ..pisa_sr.resize import resize_output
from . import compat, live, vae_ops
from .compat import io
from .errors import CATEGORY, names_refusals
from .lq_info import LQInfo, lq_info_of
from .preview import comparison_ui

NODE = "PiSA Tiled VAE Decode"


def lq_reference(latent: dict, batch: int, color_fix: str) -> LQInfo | None:
    """The LATENT's LQ reference; refused when colour fix needs it and it is missing, or it has another batch."""
    info = lq_info_of(latent)
    if info is None and color_fix != "none":
        raise PisaError(f"this LATENT does not carry the resized LQ image needed for colour fix "
                        f"'{color_fix}'. Connect the chain PiSA Encode LQ -> Sample -> this node without nodes in "
                        "between that rebuild the latent, or set color_fix to none.")
    if info is not None and info.lq_u8.shape[0] != 1 and info.batch != batch:
        raise PisaError(f"the latent batch ({batch}) does not match the LQ batch ({info.batch}). Decode the "
                        "LATENT that came from the same PiSA Encode LQ.")
    return info


def decode_hq(latent: dict, vae, color_fix: str, vae_tile_size: int = 0, vae_ram_budget: float = 0.0,
              on_decoded=None) -> torch.Tensor:
    """The IMAGE [B,H,W,3] of a checked LATENT (see decode_frames)."""
    z = check_latent(latent, "Dual-Guided One-Step Sample")
    check_choice("colour fix", color_fix, COLOR_FIXES)
    return decode_frames(z, lq_reference(latent, z.shape[0], color_fix), vae, color_fix, vae_tile_size,
                         vae_ram_budget, on_decoded)


def decode_frames(z: torch.Tensor, info: LQInfo | None, vae, color_fix: str, vae_tile_size: int = 0,
                  vae_ram_budget: float = 0.0, on_decoded=None) -> torch.Tensor:
    """The IMAGE [B,H,W,3], decoded and colour-fixed one frame at a time into the output (``on_decoded(i, out)``
    sees frame i's truncated decoder output before its colour fix: the live loupe keeps its AdaIN statistics).
    Beyond the IMAGE and one
    frame's decoder output (truncated and colour-fixed in place), a frame costs its LQ as fp32 (12 bytes per pixel)
    and the wavelet fix's planes (pisa_sr.color); the resize back only follows the small-image pre-resize, so its
    output is at most ``upscale`` x 1024 px long (pisa_sr.resize)."""
    b = z.shape[0]
    img: torch.Tensor | None = None
    for i in range(b):
        out = vae_ops.decode(vae, z[i:i + 1], int(vae_tile_size), float(vae_ram_budget))
        if info is not None:
            h, w = info.lq_u8.shape[1:3]
            if (h, w) != tuple(out.shape[-2:]):
                raise PisaError(f"the latent decodes to {out.shape[-1]}x{out.shape[-2]} px but the LQ reference "
                                f"is {w}x{h}; the latent was resized between nodes.")
            if color_fix != "none":  # on the release's 8-bit (truncated) decoder output, to stay equal to it
                out = out.clamp_(0, 1).mul_(255.0).floor_().div_(255.0)
                if on_decoded is not None:
                    on_decoded(i, out)
                out = apply_color_fix(out, info.lq_float_bchw(i), color_fix)
        frame = out.clamp_(0, 1).movedim(1, -1)
        if info is not None and info.plan.resize_back:
            frame = resize_output(frame, info.plan.output)
        if img is None:
            img = frame.new_empty((b, *frame.shape[1:]))
        img[i:i + 1] = frame
    return img


class PiSADecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiSA_Decode",
            display_name=NODE,
            category=CATEGORY,
            **compat.search_aliases(),
            description="Decodes the PiSA-SR latent, corrects colour against the resized input and restores the "
                        "output size the release produces.",
            inputs=[
                io.Latent.Input("latent", tooltip="The LATENT from Dual-Guided One-Step Sample."),
                io.Vae.Input("vae", tooltip="The same VAE that encoded the LQ image."),
                io.Combo.Input("color_fix", options=list(COLOR_FIXES), default="adain",
                               tooltip="Colour correction against the input: adain (release default), wavelet, "
                               "or none."),
                *vae_ops.inputs("output px", " (no seams)"),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="The upscaled image.")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],  # the live preview's record of the decoder
        )

    @classmethod
    @names_refusals(NODE)
    @trims_heap
    def execute(cls, latent, vae, color_fix="adain", vae_tile_size=0, vae_ram_budget=0.0) -> io.NodeOutput:
        rec = live.decoder_record(latent, cls.hidden, color_fix, vae_tile_size, vae_ram_budget)
        img = decode_hq(latent, vae, color_fix, vae_tile_size, vae_ram_budget, rec and rec.keep_stats)
        ui = comparison_ui(img, lq_info_of(latent))
        if rec is not None:
            ui = live.decoder_ui(rec, img, ui)
        return io.NodeOutput(img, ui=ui)
