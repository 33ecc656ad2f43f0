"""Dual-Guided One-Step Sample: one UNet call at t=1, ``z_hq = z_lq - eps``, tiled over the latent."""
from __future__ import annotations

import logging
from typing import Callable

import torch

from ..pisa_sr.bypass import LowRankBypass
from ..pisa_sr.errors import PisaError
from ..pisa_sr.guidance import LAMBDA_MAX, LAMBDA_MIN, Pass, check_lambdas, combine_eps, plan_passes
from ..pisa_sr.heap import trims_heap
from ..pisa_sr.latent_tiles import count_steps, run_tiled
from . import compat
from .compat import io
from .pisa_model import info_of, sem_removal_targets

NODE = "Dual-Guided One-Step Sample"
log = logging.getLogger("PiSA-SR")
MAX_TILES_PER_CALL = 8  # a 96x96 latent tile already fills a GPU; more tiles per call only add peak memory
PRECISIONS: dict[str, torch.dtype | None] = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16,
                                             "fp32": torch.float32}


def conditioning_context(positive, node: str) -> torch.Tensor:
    try:
        ctx = positive[0][0]
    except (TypeError, IndexError, KeyError):
        ctx = None
    if not isinstance(ctx, torch.Tensor) or ctx.dim() != 3:
        raise PisaError(f"{node}: 'positive' must be CONDITIONING from CLIPTextEncode (an empty prompt is the "
                        "release's setting).")
    if ctx.shape[-1] != 1024 and ctx.shape[-1] < 8:
        raise PisaError(f"{node}: unexpected conditioning width {ctx.shape[-1]}.")
    if not torch.isfinite(ctx).all():
        raise PisaError(f"{node}: the conditioning contains NaN or infinite values.")
    return ctx[:1]


def make_eps_fn(model, info, context: torch.Tensor, lambda_pix: float, lambda_sem: float, one_pass: bool,
                outputs: str = "combined") -> tuple[Callable[[torch.Tensor], torch.Tensor], Pass]:
    """eps for a batch of latent tiles under the given lambdas (``outputs='both'`` returns [eps_pix, eps_sem]).

    The MODEL has pix+sem merged (default mode). eps_sem is a plain forward; eps_pix is a forward with the sem LoRA
    subtracted in the activations. Both together are one forward on ``[x, x]`` with the subtraction on the first
    half only (``one_pass``), or two forwards (the low-memory fallback).
    """
    sigma = compat.sigma_t1(model)
    plan = Pass.DUAL if outputs == "both" else plan_passes(lambda_pix, lambda_sem)
    ctx = context.to(compat.device_of(model))

    def unet(x: torch.Tensor) -> torch.Tensor:
        return compat.unet_eps_t1(model, x, ctx.expand(x.shape[0], -1, -1), sigma)

    bypass = LowRankBypass(sem_removal_targets(model, info)) if plan in (Pass.PIX, Pass.DUAL) else None

    def pix_only(x: torch.Tensor) -> torch.Tensor:
        bypass.rows = slice(None)
        with bypass:
            return unet(x)

    def pix_and_sem(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        if one_pass:
            bypass.rows = slice(0, n)
            with bypass:
                e = unet(torch.cat([x, x], 0))
            return e[:n], e[n:]
        return pix_only(x), unet(x)

    def eps_fn(x: torch.Tensor) -> torch.Tensor:
        if outputs == "both":
            ep, es = pix_and_sem(x)
            return torch.cat([ep.float(), es.float()], 1)
        if plan is Pass.NONE:
            return torch.zeros_like(x, dtype=torch.float32)
        if plan is Pass.SEM:
            e = unet(x).float()
            return e if lambda_pix == 1.0 else e * lambda_pix
        if plan is Pass.PIX:
            return pix_only(x).float() * lambda_pix
        ep, es = pix_and_sem(x)
        return combine_eps(ep, es, lambda_pix, lambda_sem)

    return eps_fn, plan


def tiles_per_call_for(model, tile_shape: list[int], passes: int) -> int:
    """As many tiles per UNet call as free memory allows (at least 1, at most MAX_TILES_PER_CALL)."""
    per_tile = compat.tile_memory(model, [passes] + tile_shape[1:])
    free = compat.free_memory(compat.device_of(model))
    n = int(0.8 * free // max(per_tile, 1))
    return max(1, min(MAX_TILES_PER_CALL, n))


def model_for_precision(model, precision: str, node: str = NODE):
    """``model`` itself for auto (or when it already computes in that dtype), else a cached compute-dtype clone."""
    if precision not in PRECISIONS:
        raise PisaError(f"{node}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    dtype = PRECISIONS[precision]
    if dtype is None or dtype == compat.compute_dtype(model):
        return model
    if not compat.dtype_supported(model, dtype):
        raise PisaError(f"{node}: this device does not support {precision}. Use auto, fp16 or fp32.")
    return compat.with_compute_dtype(model, dtype)


def sample_eps(model, latent: dict, positive, lambda_pix: float, lambda_sem: float, tile_size: int,
               tile_overlap: int, node: str = NODE, outputs: str = "combined",
               precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(z_lq scaled, eps [B,C,h,w] fp32), both on the model's device; the shared body of the sampler and the sweep.

    ``outputs='both'`` gives C = 8: eps_pix then eps_sem (lambdas are then only validated).
    """
    info = info_of(model, node)
    check_lambdas(lambda_pix, lambda_sem, node)
    if outputs not in ("combined", "both"):
        raise PisaError(f"{node}: outputs must be 'combined' or 'both', got {outputs!r}.")
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise PisaError(f"{node}: 'latent' must be a LATENT (connect PiSA Encode LQ).")
    raw = latent["samples"]
    if raw.dim() != 4 or raw.shape[1] != 4 or raw.shape[0] == 0:
        raise PisaError(f"{node}: expected an SD latent [B,4,h,w], got {tuple(raw.shape)}.")
    if not torch.isfinite(raw).all():
        raise PisaError(f"{node}: the latent contains NaN or infinite values.")
    if tile_size < 0 or tile_overlap < 0:
        raise PisaError(f"{node}: tile_size and tile_overlap must be >= 0.")
    context = conditioning_context(positive, node)
    model = model_for_precision(model, precision, node)
    dev = compat.device_of(model)
    # Contiguous NCHW whatever the LATENT's layout: a channels_last latent (ComfyUI's CPU VAEEncode gives one) makes
    # the whole UNet run channels_last, whose GroupNorm sums in another order; on random-weight test models that
    # alone moved eps by 2e-4. One layout keeps tiled, untiled and batched calls on the same numerics.
    z = compat.process_latent_in(model, raw.to(dev, torch.float32)).contiguous()
    b, _, h, w = z.shape
    th, tw = (min(tile_size, h), min(tile_size, w)) if tile_size > 0 and h * w > tile_size ** 2 else (h, w)
    plan = Pass.DUAL if outputs == "both" else plan_passes(lambda_pix, lambda_sem)
    if plan is Pass.NONE:
        return z, torch.zeros_like(z)
    passes = 2 if plan is Pass.DUAL else 1
    compat.load_model(model, [passes, 4, th, tw])
    tpc = tiles_per_call_for(model, [1, 4, th, tw], passes)
    with torch.no_grad():  # ComfyUI runs nodes in inference mode; direct callers must not build autograd graphs
        return _run_with_fallback(model, info, context, z, lambda_pix, lambda_sem, tile_size, tile_overlap, tpc,
                                  plan, outputs, node)


def _run_with_fallback(model, info, context: torch.Tensor, z: torch.Tensor, lambda_pix: float, lambda_sem: float,
                       tile_size: int, tile_overlap: int, tpc: int, plan: Pass, outputs: str,
                       node: str) -> tuple[torch.Tensor, torch.Tensor]:
    """run_tiled, retried on out-of-memory with half the tiles per call, then (adjustable) two passes per tile."""
    b, _, h, w = z.shape
    one_pass = True
    while True:
        eps_fn, _ = make_eps_fn(model, info, context, lambda_pix, lambda_sem, one_pass, outputs)
        total = count_steps(b, h, w, tile_size, tile_overlap, tpc)
        bar = compat.progress_bar(total)
        try:
            eps = run_tiled(z, eps_fn, tile_size, tile_overlap, tpc,
                            progress=lambda d, t: bar.update_absolute(d, t),
                            check_interrupt=compat.throw_if_interrupted)
            return z, eps
        except Exception as e:
            if not compat.is_oom(e):
                raise
            del e  # drop the traceback (it holds the failed call's activations) before retrying
            compat.soft_empty_cache()
            if tpc > 1:
                tpc = max(1, tpc // 2)
                log.warning("%s: out of memory; retrying with %d tile(s) per UNet call.", node, tpc)
            elif one_pass and plan is Pass.DUAL:
                one_pass = False
                log.warning("%s: out of memory; retrying adjustable mode as two UNet passes per tile.", node)
            else:
                raise PisaError(f"{node}: out of device memory even with one tile per call. Lower tile_size "
                                "(e.g. 64) or free memory (close other models).") from None


class PiSASample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiSA_Sample",
            display_name=NODE,
            category="image/upscaling/PiSA-SR",
            description="PiSA-SR's single diffusion step: eps = lambda_pix*eps_pix + lambda_sem*(eps_sem - "
                        "eps_pix), z_hq = z_lq - eps. The defaults (1, 1) are the release's default mode.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from Load PiSA LoRAs."),
                io.Conditioning.Input("positive", tooltip="CLIPTextEncode with an EMPTY prompt (the release's "
                                      "setting). A prompt is allowed but changes the result; CLIP Set Last Layer, "
                                      "(weights:1.2) syntax and prompts over 77 tokens differ from the release."),
                io.Latent.Input("latent", tooltip="The LATENT from PiSA Encode LQ."),
                io.Float.Input("lambda_pix", default=1.0, min=LAMBDA_MIN, max=LAMBDA_MAX, step=0.05,
                               tooltip="Pixel-level guidance: fidelity, noise and artefact removal. 1.0 = release "
                               "default; lower keeps more of the input, higher cleans harder."),
                io.Float.Input("lambda_sem", default=1.0, min=LAMBDA_MIN, max=LAMBDA_MAX, step=0.05,
                               tooltip="Semantic-level guidance: generated detail and texture. 1.0 = release "
                               "default; 0 = pixel-only (most faithful), >1 = more perceived detail. Equal to "
                               "lambda_pix, or 0, takes one UNet pass; otherwise two (batched into one call)."),
                io.Int.Input("tile_size", default=96, min=0, max=1024, step=8,
                             tooltip="Latent tile size (latent px = image px / 8). The release uses 96 with "
                             "overlap 32 and tiles only when the latent area exceeds tile_size^2. 0 = never tile."),
                io.Int.Input("tile_overlap", default=32, min=0, max=512, step=8,
                             tooltip="Overlap between latent tiles, blended with Gaussian weights (sigma = tile/10)."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto", optional=True,
                               tooltip="UNet compute precision. auto = what ComfyUI chose when loading the model "
                               "(fp16 on most GPUs, like the release). bf16/fp16/fp32 run the UNet in that dtype "
                               "through ComfyUI's manual cast (weights keep their stored precision). Tile blending "
                               "and the guidance mix are always fp32."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The high-quality latent; connect to PiSA "
                                      "Tiled VAE Decode.")],
        )

    @classmethod
    @trims_heap
    def execute(cls, model, positive, latent, lambda_pix=1.0, lambda_sem=1.0, tile_size=96,
                tile_overlap=32, precision="auto") -> io.NodeOutput:
        z, eps = sample_eps(model, latent, positive, float(lambda_pix), float(lambda_sem), int(tile_size),
                            int(tile_overlap), precision=str(precision))
        z_hq = z - eps.to(z.device)
        out = dict(latent)
        out["samples"] = compat.process_latent_out(model, z_hq).to(torch.float32).cpu()
        return io.NodeOutput(out)
