"""Dual-Guided One-Step Sample: one UNet call at t=1, ``z_hq = z_lq - eps``, tiled over the latent."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace

import torch

from ..pisa_sr import sampling
from ..pisa_sr.checks import check_finite, check_latent
from ..pisa_sr.errors import PisaError
from ..pisa_sr.guidance import LAMBDA_MAX, LAMBDA_MIN, Pass, combine_eps
from ..pisa_sr.heap import trims_heap
from ..pisa_sr.tiling import needs_tiling, plan_tiles
from . import compat, live, unet
from .compat import io
from .errors import CATEGORY, names_refusals
from .pisa_model import info_of, sem_removal_targets

NODE = "Dual-Guided One-Step Sample"


def conditioning_context(positive, width: int) -> torch.Tensor:
    """The text embedding [1,77,width] of CONDITIONING; refused unless it is as wide as the UNet's context."""
    try:
        ctx = positive[0][0]
    except (TypeError, IndexError, KeyError):
        ctx = None
    if not isinstance(ctx, torch.Tensor) or ctx.dim() != 3:
        raise PisaError("'positive' must be CONDITIONING from CLIPTextEncode (an empty prompt is the release's "
                        "setting).")
    if ctx.shape[-1] != width:
        raise PisaError(f"the conditioning width is {ctx.shape[-1]} but this UNet takes {width}: it comes from "
                        "another text encoder. Use CLIPTextEncode with the CLIP of the SD 2.1-base checkpoint.")
    check_finite(ctx, "conditioning")
    return ctx[:1]


def frame_chunks(model, latent: dict, positive, lambda_pix: float, lambda_sem: float, tile_size: int,
                 tile_overlap: int, *, precision: str = "auto", both: bool = False, one_pass: bool = True,
                 tiles_per_call: int | None = None, scaled: bool = False
                 ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """(frames, z_lq scaled, eps fp32) per chunk of the batch, on the model's device. A chunk is as many whole frames
    as one UNet call of ``tiles_per_call`` tiles takes (None: as free memory allows; at least one frame), so device
    memory is bounded by the call. ``both`` gives C = 8: eps_pix then eps_sem. ``scaled``: the samples are already
    in the UNet's space (a live preview's kept z_lq)."""
    info = info_of(model)
    plan = sampling.plan(lambda_pix, lambda_sem, both)
    sampling.check_tiles(tile_size, tile_overlap)
    raw = check_latent(latent, "PiSA Encode LQ")
    if latent.get("noise_mask") is not None:
        raise PisaError("this LATENT carries a noise mask (e.g. from Set Latent Noise Mask). PiSA-SR restores the "
                        "whole image and cannot keep masked areas: remove the mask node.")
    context = conditioning_context(positive, compat.unet_config(model).get("context_dim"))
    model = unet.model_for_precision(model, precision)
    dev = model.load_device
    b, _, h, w = raw.shape
    tiled = needs_tiling(h, w, tile_size)
    th, tw = (min(tile_size, h), min(tile_size, w)) if tiled else (h, w)
    passes = 0 if plan is Pass.NONE else 2 if plan is Pass.DUAL else 1
    if passes:
        compat.load_model(model, [passes, 4, th, tw])
    if tiles_per_call is None:
        tiles_per_call = unet.tiles_per_call_for(model, [1, 4, th, tw], passes) if passes else 1
    tiles_per_frame = len(plan_tiles(h, w, tile_size, tile_overlap)) if tiled else 1
    frames = max(1, tiles_per_call // tiles_per_frame)
    sigma = unet.sigma_t1(model)
    ctx = context.to(dev)

    def call(x: torch.Tensor, eager: bool = False) -> torch.Tensor:
        with compat.device_context(dev):
            return unet.unet_eps_t1(model, x, ctx.expand(x.shape[0], -1, -1), sigma, eager=eager)

    removal = sem_removal_targets(model, info) if plan in (Pass.PIX, Pass.DUAL) else []
    hooks = compat.hooks()
    calls_per_chunk = -(-frames * tiles_per_frame // tiles_per_call)  # for one progress bar over all chunks
    total = -(-b // frames) * calls_per_chunk
    with compat.unet_session(model) if passes else contextlib.nullcontext():
        for start in range(0, b, frames):
            part = slice(start, min(b, start + frames))
            # Contiguous NCHW: a channels_last latent (CPU VAEEncode) runs the UNet channels_last, whose GroupNorm
            # sums in another order (eps moved 2e-4); one layout keeps tiled, untiled and batched calls identical.
            z = raw[part].to(dev, torch.float32)
            z = (z if scaled else compat.latent_in(model, z)).contiguous()
            done = start // frames * calls_per_chunk
            chunk_hooks = replace(hooks, progress=lambda d, t, done=done: hooks.progress(min(total, done + d),
                                                                                         total))
            eps = sampling.sample_eps(z, call, removal, lambda_pix, lambda_sem, tile_size, tile_overlap,
                                      tiles_per_call=tiles_per_call, one_pass=one_pass, both=both,
                                      hooks=chunk_hooks, bypass_unet=lambda x: call(x, eager=True))
            yield part, z, eps


def sample_eps(model, latent: dict, positive, lambda_pix: float, lambda_sem: float, tile_size: int,
               tile_overlap: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_lq scaled, eps [B,C,h,w] fp32) for the whole batch, on the CPU: each chunk is moved off the device as it
    is produced, so the device holds one chunk's latents (see frame_chunks) however long the batch."""
    z_all = eps_all = None
    for part, z, eps in frame_chunks(model, latent, positive, lambda_pix, lambda_sem, tile_size, tile_overlap, **kw):
        if z_all is None:
            b = latent["samples"].shape[0]
            z_all = torch.empty((b, *z.shape[1:]), dtype=z.dtype)
            eps_all = torch.empty((b, *eps.shape[1:]), dtype=eps.dtype)
        z_all[part], eps_all[part] = z, eps
    return z_all, eps_all


def sample_kept(model, latent: dict, positive, lambda_pix: float, lambda_sem: float, tile_size: int,
                tile_overlap: int, precision: str = "auto", tiles_per_call: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(``z_lq - eps`` as a raw latent, z_lq scaled, eps_pix, eps_sem), fp32 on the CPU: the output and what a live
    preview keeps. Adjustable mode evaluates both eps (``both``, as the sweep does) and combines them here; a one-pass
    mode keeps its one eps (the other is None) and scales it by its lambda. The device holds one chunk at a time
    (frame_chunks); the host holds z_lq and the eps (3 latents in adjustable mode) beside the output."""
    p = sampling.plan(lambda_pix, lambda_sem)
    lp, ls = {Pass.DUAL: (lambda_pix, lambda_sem), Pass.SEM: (1.0, 1.0), Pass.PIX: (1.0, 0.0)}.get(p, (0.0, 0.0))
    z, eps = sample_eps(model, latent, positive, lp, ls, tile_size, tile_overlap, precision=precision,
                        tiles_per_call=tiles_per_call, both=p is Pass.DUAL)
    eps_pix = eps_sem = None
    if p is Pass.DUAL:
        c = z.shape[1]
        eps_pix, eps_sem = eps[:, :c], eps[:, c:]
        eps = combine_eps(eps_pix, eps_sem, lambda_pix, lambda_sem)
    elif p is not Pass.NONE:
        if p is Pass.SEM:
            eps_sem = eps
        else:
            eps_pix = eps
        eps = eps if lambda_pix == 1.0 else eps * lambda_pix
    out = compat.latent_out(model, z - eps).to(torch.float32)
    return out, z, eps_pix, eps_sem


def sample_hq(model, latent: dict, positive, lambda_pix: float, lambda_sem: float, tile_size: int,
              tile_overlap: int, precision: str = "auto", tiles_per_call: int | None = None) -> torch.Tensor:
    """``z_lq - eps`` as a raw latent, fp32 on the CPU (see sample_kept)."""
    return sample_kept(model, latent, positive, lambda_pix, lambda_sem, tile_size, tile_overlap, precision,
                       tiles_per_call)[0]


class PiSASample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiSA_Sample",
            display_name=NODE,
            category=CATEGORY,
            **compat.search_aliases(),
            description="PiSA-SR's single diffusion step: eps = lambda_pix*eps_pix + lambda_sem*(eps_sem - "
                        "eps_pix), z_hq = z_lq - eps. The defaults (1, 1) are the release's default mode.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from Load PiSA LoRAs."),
                io.Conditioning.Input("positive", tooltip="CLIPTextEncode with an EMPTY prompt (the release's "
                                      "setting); a prompt is allowed but changes the result."),
                io.Latent.Input("latent", tooltip="The LATENT from PiSA Encode LQ."),
                io.Float.Input("lambda_pix", default=1.0, min=LAMBDA_MIN, max=LAMBDA_MAX, step=0.05,
                               tooltip="Pixel-level guidance (fidelity, artefact removal); 1.0 = release default."),
                io.Float.Input("lambda_sem", default=1.0, min=LAMBDA_MIN, max=LAMBDA_MAX, step=0.05,
                               tooltip="Semantic-level guidance (generated detail); 1.0 = release default, "
                               "0 = pixel-only."),
                io.Int.Input("tile_size", default=96, min=0, max=1024, step=8,
                             tooltip="Latent tile size (image px / 8); 96 is the release's. 0 = never tile."),
                io.Int.Input("tile_overlap", default=32, min=0, max=512, step=8,
                             tooltip="Overlap between latent tiles (Gaussian blending); below tile_size."),
                io.Combo.Input("precision", options=list(unet.PRECISIONS), default="auto", optional=True,
                               tooltip="UNet compute precision; auto = what ComfyUI chose when loading the model."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The high-quality latent; connect to PiSA "
                                      "Tiled VAE Decode.")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],  # the live preview's record of the run
        )

    @classmethod
    @names_refusals(NODE)
    @trims_heap
    def execute(cls, model, positive, latent, lambda_pix=1.0, lambda_sem=1.0, tile_size=96,
                tile_overlap=32, precision="auto") -> io.NodeOutput:
        samples, z, eps_pix, eps_sem = sample_kept(model, latent, positive, lambda_pix, lambda_sem, tile_size,
                                                   tile_overlap, precision)
        out = dict(latent, samples=samples)
        hidden = cls.hidden
        if hidden is None or hidden.unique_id is None or not isinstance(hidden.prompt, dict):
            return io.NodeOutput(out)  # called outside a prompt (tests, scripts): nothing to preview
        ctx = conditioning_context(positive, compat.unet_config(model).get("context_dim"))
        token = live.register_run(str(hidden.unique_id), hidden.prompt, model, z, eps_pix, eps_sem, ctx,
                                  lambda_pix, lambda_sem, {"tile_size": tile_size, "tile_overlap": tile_overlap,
                                                           "precision": precision})
        out[live.LATENT_KEY] = token
        return io.NodeOutput(out, ui=live.sampler_ui(token, lambda_pix, lambda_sem,
                                                              eps_pix is None or eps_sem is None))
