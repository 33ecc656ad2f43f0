"""PiSA Live Preview: one setting of a kept run decoded as PiSA Tiled VAE Decode decodes it, sent to the front end
as the ``pisa_sr.live`` websocket event. Only the route's preview prompts use it (hidden from the node library)."""
from __future__ import annotations

import base64
import io as _io
import math
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from ..pisa_sr.color import adain_with_stats, channel_stats, wavelet_fix
from ..pisa_sr.errors import PisaError
from ..pisa_sr.guidance import LAMBDA_MAX, LAMBDA_MIN
from ..pisa_sr.heap import trims_heap
from ..pisa_sr.live import (MAX_SIZE, MIN_SIZE, VIEWS, Decoder, LiveEntry, Request, check_bounds, crop_box, fit_size,
                            latent_window)
from . import compat, live, vae_ops
from .compat import io
from .decode import decode_frames
from .errors import CATEGORY, names_refusals
from .lq_info import LQInfo, lq_info_of
from .preview import resize_bhwc
from .sample import sample_eps

NODE = "PiSA Live Preview"
STATUS_LAZY = "computing the pixel pass"


def fill_missing_eps(entry: LiveEntry, model) -> None:
    """eps_pix and eps_sem, once, from the very call a queued adjustable run makes (the sampler's code path, one
    UNet call on [z, z], the run's tiles, precision and conditioning), replacing the one eps a one-pass run kept.
    Only then does a preview equal the queued image: the kept eps came from a batch-1 call, and the UNet's batch-1
    vs batch-2 rounding, amplified by the VAE, moved default-mode previews by 2/255 on some CPUs."""
    if model is None:
        raise PisaError("this run still needs its other eps pass and the preview prompt has no model. Ask the "
                        "route for a new preview prompt.")
    s = entry.sampling
    _, eps = sample_eps(model, {"samples": entry.z_lq}, [[entry.context, {}]], 1.0, 1.0, s["tile_size"],
                        s["tile_overlap"], precision=s.get("precision", "auto"), both=True, scaled=True)
    c = entry.z_lq.shape[1]
    entry.eps_pix, entry.eps_sem = eps[:, :c], eps[:, c:]


def frame_info(info: LQInfo | None, frame: int) -> LQInfo | None:
    return None if info is None else replace(info, lq_u8=info.frame_u8(frame), repeats=1)


def render(entry: LiveEntry, dec: Decoder, info: LQInfo | None, vae, req: Request
           ) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """(picture [1,h,w,3] in [0,1], (x0, y0, width, height) of what it shows, in output px)."""
    z = entry.latent(req.frame, req.lambda_pix, req.lambda_sem)
    finfo = frame_info(info, req.frame)
    out_w, out_h = dec.out_size
    key = (dec.node_id, req.frame, req.lambda_pix, req.lambda_sem)
    whole = req.view == "fit" or (finfo is not None and finfo.plan.resize_back)  # resized back: not 1:1 latent px
    if whole:
        img = decode_frames(z, finfo, vae, dec.color_fix, dec.vae_tile_size, dec.vae_ram_budget,
                            lambda i, out: entry.put_stats(key, channel_stats(out)))
        if req.view == "fit":
            return resize_bhwc(img, fit_size(out_h, out_w, req.size)), (0, 0, out_w, out_h)
        x0, y0, w, h = box = crop_box(out_w, out_h, req.x, req.y, req.size)
        return img[:, y0:y0 + h, x0:x0 + w], box
    box = crop_box(out_w, out_h, req.x, req.y, req.size)
    (rows, cols), (ox, oy) = latent_window(box, z.shape[2], z.shape[3])
    out = vae_ops.decode(vae, z[:, :, rows, cols].contiguous(), dec.vae_tile_size, dec.vae_ram_budget)
    if finfo is not None and dec.color_fix != "none":
        out = out.clamp_(0, 1).mul_(255.0).floor_().div_(255.0)  # as decode_frames: the release's 8-bit output
        lq = finfo.lq_float_bchw(0)
        if dec.color_fix == "adain":  # the whole frame's statistics when a decode at this setting kept them
            stats = entry.stats.get(key) or channel_stats(out)
            out = adain_with_stats(out, stats, channel_stats(lq))
        else:  # local: the halo covers the blur's reach
            r0, c0 = rows.start * 8, cols.start * 8
            src = lq[:, :, r0:r0 + out.shape[2], c0:c0 + out.shape[3]].contiguous()
            out = wavelet_fix(out, src)
    _, _, w, h = box
    out = out.clamp_(0, 1)[:, :, oy:oy + h, ox:ox + w]
    return out.movedim(1, -1), box


def png_data_url(img: torch.Tensor) -> str:
    """[1,h,w,3] in [0,1] as a PNG data URL, quantised as SaveImage quantises (255 * x, truncated)."""
    arr = np.clip(255.0 * img[0].cpu().numpy(), 0, 255).astype(np.uint8)
    buf = _io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class PiSALivePreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiSA_LivePreview",
            display_name=NODE,
            category=CATEGORY,
            description="Used by the live lambda preview (drag the sampler's pad after a run); it is queued by the "
                        "front end, not placed by hand. Decodes one setting of the kept run and sends it to the "
                        "decoder's view.",
            # Deprecated nodes are left out of the node library and search by the front ends (Comfy.Node.
            # ShowDeprecated, off by default) while prompts that name them still run.
            is_deprecated=True,
            is_output_node=True,
            inputs=[
                io.Vae.Input("vae", tooltip="The decoder's VAE (linked by the preview prompt)."),
                io.Latent.Input("latent", tooltip="The sampler's input LATENT (its LQ colour reference)."),
                io.String.Input("token", default="", tooltip="The run's token, from the sampler's UI output."),
                io.String.Input("decoder", default="", tooltip="The decoder's node id (empty: the latest)."),
                io.Float.Input("lambda_pix", default=1.0, min=LAMBDA_MIN, max=LAMBDA_MAX, step=0.05,
                               tooltip="The setting to show: lambda_pix."),
                io.Float.Input("lambda_sem", default=1.0, min=LAMBDA_MIN, max=LAMBDA_MAX, step=0.05,
                               tooltip="The setting to show: lambda_sem."),
                io.Combo.Input("view", options=list(VIEWS), default="fit",
                               tooltip="fit: the whole picture at most size px long; loupe: a 1:1 crop."),
                io.Int.Input("x", default=0, min=0, max=1 << 20, tooltip="Loupe centre, output px."),
                io.Int.Input("y", default=0, min=0, max=1 << 20, tooltip="Loupe centre, output px."),
                io.Int.Input("size", default=512, min=MIN_SIZE, max=MAX_SIZE,
                             tooltip="fit: max side of the picture sent; loupe: side of the crop."),
                io.Int.Input("frame", default=0, min=0, max=1 << 20, tooltip="Batch index."),
                io.Int.Input("seq", default=0, min=0, max=1 << 53, tooltip="The client's request counter."),
                io.Model.Input("model", optional=True, tooltip="Linked only while an eps pass is missing."),
            ],
            outputs=[],
        )

    @classmethod
    def fingerprint_inputs(cls, **_) -> float:
        return math.nan  # never answered from the cache: every request sends its event

    @classmethod
    @names_refusals(NODE)
    @trims_heap
    def execute(cls, vae, latent, token, decoder="", lambda_pix=1.0, lambda_sem=1.0, view="fit", x=0, y=0,
                size=512, frame=0, seq=0, model=None) -> io.NodeOutput:
        head = {"token": token, "seq": seq}
        try:
            req = Request(token, float(lambda_pix), float(lambda_sem), view, int(x), int(y), int(size), int(frame),
                          int(seq), decoder or None)
            entry = live.STORE.get(token)
            if entry is None:
                raise PisaError(live.UNKNOWN_TOKEN)
            dec = entry.decoder(req.decoder)
            check_bounds(req, entry.frames, *dec.out_size)
            if entry.eps_pix is None or entry.eps_sem is None:
                compat.send_event(live.EVENT, {**head, "status": STATUS_LAZY})
                fill_missing_eps(entry, model)
            img, (x0, y0, w, h) = render(entry, dec, lq_info_of(latent), vae, req)
        except PisaError as e:
            compat.send_event(live.EVENT, {**head, "error": f"{NODE}: {e}"})
            raise
        compat.send_event(live.EVENT, {**head, "view": view, "lambda_pix": req.lambda_pix,
                                       "lambda_sem": req.lambda_sem, "decoder": dec.node_id, "x0": x0, "y0": y0,
                                       "width": w, "height": h, "out_width": dec.out_size[0],
                                       "out_height": dec.out_size[1], "image": png_data_url(img)})
        return io.NodeOutput()
