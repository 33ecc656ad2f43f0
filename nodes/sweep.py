"""PiSA Lambda Sweep: every (lambda_pix, lambda_sem) setting from one evaluation of eps_pix and eps_sem.

eps and the tile blending are linear in both lambdas, so the UNet runs once per tile (adjustable mode, both outputs)
and each setting is one cheap linear combination. Outputs are described in their tooltips.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace

import torch

from comfy_execution.graph_utils import ExecutionBlocker  # stops the nodes fed from it, which report its message

from ..pisa_sr import metrics
from ..pisa_sr.checks import check_choice
from ..pisa_sr.color import COLOR_FIXES
from ..pisa_sr.errors import PisaError
from ..pisa_sr.heap import trims_heap
from ..pisa_sr.learned_metrics import learned_metric_status
from ..pisa_sr.sweep import MAX_SETTINGS, choose_best_per_image, format_label, parse_lambda_pairs, sweep_labels, \
    sweep_latents
from . import compat
from .compat import io
from .decode import decode_frames, lq_reference
from .errors import CATEGORY, names_refusals
from .lq_info import LATENT_KEY, lq_info_of
from .sample import sample_eps

NODE = "PiSA Lambda Sweep"
log = logging.getLogger("PiSA-SR")

CHOOSE_BEST = ("off", *(name for name, spec in metrics.METRICS.items() if not spec.needs_reference))
REFERENCE_SETTING = (1.0, 0.0)  # the pix-only output the fidelity floor is measured against
DEFAULT_SETTINGS = "pix=0.5:1.5:0.5 sem=0.5:1.5:0.5"
BEST_MARK = " [best]"


def _repeat_extras(latent: dict, samples: torch.Tensor, settings: int, batch: int) -> dict:
    """The LATENT of a setting-major batch, LQ reference and batch_index repeated as RepeatLatentBatch does."""
    out = dict(latent, samples=samples)
    info = lq_info_of(latent)
    # A batch-1 LQ reference applies to every image; a batch-B one repeats so row s * B + b keeps image b's: marked
    # as repeated, not copied (S x B copies of an 8K image would be S x B x 200 MB).
    if info is not None and batch > 1 and settings > 1 and info.batch == batch:
        out[LATENT_KEY] = replace(info, repeats=info.repeats * settings)
    index = out.get("batch_index")
    if isinstance(index, list) and index:
        offset = max(index) - min(index) + 1
        out["batch_index"] = [x + i * offset for i in range(settings) for x in index]
    return out


def decode_settings(latent: dict, z_hq_raw: torch.Tensor, settings: int, batch: int, vae, color_fix: str,
                    metric: str | None = None, ref_raw: torch.Tensor | None = None):
    """Each setting decoded once as PiSA Tiled VAE Decode does -> (images, quality[s][b], fidelity[s][b]); the scores
    (``metric``, and PSNR on Y vs the decoded pix-only ``ref_raw``) are empty without ``metric``. Beyond the S x B
    output this holds one setting's B images (and the reference's B)."""
    hooks = compat.hooks()
    info = lq_reference(latent, batch, color_fix)
    ref = None if metric is None else decode_frames(ref_raw, info, vae, color_fix)
    steps = settings + (ref is not None)
    images, quality, fidelity = None, [], []
    for s in range(settings):
        hooks.check_interrupt()
        img = decode_frames(z_hq_raw[s * batch:(s + 1) * batch], info, vae, color_fix)
        if images is None:
            images = img.new_empty((settings * batch, *img.shape[1:]))
        images[s * batch:(s + 1) * batch] = img
        if ref is not None:
            quality.append([float(v) for v in metrics.score(img, metric)])
            fidelity.append([float(v) for v in metrics.psnr_y(img, ref.to(img.device), crop_border=0)])
        del img
        hooks.progress(s + 1 + (ref is not None), steps)
    return images, quality, fidelity


def report_text(pairs, batch: int, metric: str, floor: float, quality, fidelity, chosen) -> str:
    lines = [f"{NODE}: {len(pairs)} setting(s) x {batch} image(s); latents are setting-major "
             f"(batch index = setting * {batch} + image)."]
    if chosen is None:
        lines.append("choose_best: off ('best' is setting 1).")
        lines += [f"{s + 1}: {format_label(lp, ls)}" for s, (lp, ls) in enumerate(pairs)]
        return "\n".join(lines)
    spec = metrics.METRICS[metric]
    lines.append(f"choose_best: {metric} ({'higher' if spec.direction > 0 else 'lower'} is better; "
                 f"{spec.description}), fidelity floor {floor:g} dB = PSNR on Y of each decoded setting vs the "
                 f"decoded pix-only output (lambda_pix 1, lambda_sem 0).")
    for b, (s, why) in enumerate(chosen):
        lp, ls = pairs[s]
        who = f"image {b + 1}" if batch > 1 else "chosen"
        lines.append(f"{who}: {format_label(lp, ls)} ({why})")
    for s, (lp, ls) in enumerate(pairs):
        cells = "; ".join(f"{metric} {metrics.format_score(quality[s][b])}, "
                          f"PSNR {metrics.format_score(fidelity[s][b], ' dB')}" for b in range(batch))
        lines.append(f"{s + 1}: {format_label(lp, ls)}: {cells}")
    return "\n".join(lines)


class PiSALambdaSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiSA_LambdaSweep",
            display_name=NODE,
            category=CATEGORY,
            **compat.search_aliases(),
            description="Every (lambda_pix, lambda_sem) setting from one evaluation of eps_pix and eps_sem (equal "
                        "to running Dual-Guided One-Step Sample per setting); optionally picks the best one.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from Load PiSA LoRAs."),
                io.Conditioning.Input("positive", tooltip="CLIPTextEncode with an EMPTY prompt, as for the sampler."),
                io.Latent.Input("latent", tooltip="The LATENT from PiSA Encode LQ (a batch of B images is fine)."),
                io.String.Input("settings", multiline=True, default=DEFAULT_SETTINGS,
                                tooltip=f"Up to {MAX_SETTINGS} (lambda_pix, lambda_sem) settings: a list '0.5,1; "
                                "1,1' or a grid 'pix=0.5:1.5:0.5 sem=0.5:1.5:0.5' (see README)."),
                io.Int.Input("tile_size", default=96, min=0, max=1024, step=8,
                             tooltip="Latent tile size, as in Dual-Guided One-Step Sample (0 = never tile).",
                             **compat.advanced()),
                io.Int.Input("tile_overlap", default=32, min=0, max=512, step=8,
                             tooltip="Overlap between latent tiles (Gaussian blending); below tile_size.",
                             **compat.advanced()),
                io.Combo.Input("choose_best", options=list(CHOOSE_BEST), default="off",
                               tooltip="off, or the score that picks 'best' per image: sharpness / noise "
                               "(heuristics) or musiq / clipiqa / maniqa (need pyiqa and its weights)."),
                io.Float.Input("fidelity_floor_db", default=28.0, min=0.0, max=100.0, step=0.5,
                               tooltip="choose_best only picks settings within this PSNR (dB) of the pixel-only "
                               "output; 0 = no floor."),
                io.Combo.Input("color_fix", options=list(COLOR_FIXES), default="adain",
                               tooltip="Colour fix of the decoded 'images' (and of what choose_best scores); set it "
                               "like your PiSA Tiled VAE Decode."),
                io.Vae.Input("vae", optional=True,
                             tooltip="The VAE (the one that encoded the LQ image). Needed for choose_best and for "
                             "'images'; when connected, every setting is decoded once here."),
            ],
            outputs=[
                io.Latent.Output(display_name="latents", tooltip="Every setting's latent, setting-major (batch "
                                 "index = setting x B + image); connect to PiSA Tiled VAE Decode."),
                io.String.Output(display_name="labels", tooltip="One label per latent, one per line; connect to "
                                 "PiSA Labelled Grid."),
                io.Float.Output(display_name="lambda_pix", is_output_list=True,
                                tooltip="lambda_pix of each setting, as a list."),
                io.Float.Output(display_name="lambda_sem", is_output_list=True,
                                tooltip="lambda_sem of each setting, as a list."),
                io.Latent.Output(display_name="best", tooltip="The chosen setting per input image (the first "
                                 "setting when choose_best is off)."),
                io.String.Output(display_name="report", tooltip="The settings, their scores and the choice, as "
                                 "text."),
                io.Image.Output(display_name="images", tooltip="Every setting decoded once, in the order of "
                                "'latents' (needs the vae); connect to PiSA Labelled Grid instead of decoding again."),
            ],
        )

    @classmethod
    @names_refusals(NODE)
    @trims_heap
    def execute(cls, model, positive, latent, settings=DEFAULT_SETTINGS, tile_size=96, tile_overlap=32,
                choose_best="off", fidelity_floor_db=28.0, color_fix="adain", vae=None) -> io.NodeOutput:
        try:
            pairs = parse_lambda_pairs(settings)
        except PisaError as e:
            raise PisaError(f"settings: {e}") from None  # which input: the parser quotes only the fragment
        check_choice("choose_best", choose_best, CHOOSE_BEST)
        if choose_best != "off" and metrics.METRICS[choose_best].learned:
            ok, reason = learned_metric_status(choose_best)
            if not ok:
                raise PisaError(f"choose_best = '{choose_best}': {reason} Or pick 'sharpness' or 'noise', which "
                                "need no weights.")
        if choose_best != "off" and vae is None:
            raise PisaError(f"choose_best = '{choose_best}' decodes every setting to score it: connect the VAE (the "
                            "one that encoded the LQ image), or set choose_best to off.")
        floor = float(fidelity_floor_db)
        if not math.isfinite(floor):
            raise PisaError("fidelity_floor_db must be a finite number of dB, e.g. 28.")
        if vae is not None:  # refused before the UNet runs, not after
            check_choice("colour fix", color_fix, COLOR_FIXES)

        z, eps = sample_eps(model, latent, positive, 1.0, 1.0, tile_size, tile_overlap, both=True)  # on the CPU
        c = z.shape[1]
        eps_pix, eps_sem = eps[:, :c], eps[:, c:]
        batch, n = z.shape[0], len(pairs)
        z_hq = sweep_latents(z, eps_pix, eps_sem, pairs)
        for s in range(n):  # in place, a setting at a time: no second S x B copy
            z_hq[s * batch:(s + 1) * batch] = compat.latent_out(model, z_hq[s * batch:(s + 1) * batch])
        labels = sweep_labels(pairs, batch)

        chosen = quality = fidelity = None
        best_idx = [0] * batch
        if choose_best != "off":
            ref = compat.latent_out(model, sweep_latents(z, eps_pix, eps_sem, [REFERENCE_SETTING]))
            images, quality, fidelity = decode_settings(latent, z_hq, n, batch, vae, color_fix, choose_best,
                                                        ref.to(torch.float32))
            chosen = choose_best_per_image(quality, fidelity, floor, metrics.METRICS[choose_best].direction > 0)
            best_idx = [s for s, _ in chosen]
            for b, s in enumerate(best_idx):
                labels[s * batch + b] += BEST_MARK
        elif vae is not None:
            images = decode_settings(latent, z_hq, n, batch, vae, color_fix)[0]
        else:
            images = ExecutionBlocker(f"{NODE}: 'images' needs the vae input connected (the VAE that encoded the LQ "
                                    "image); or decode 'latents' with PiSA Tiled VAE Decode.")
        best = dict(latent, samples=torch.stack([z_hq[s * batch + b] for b, s in enumerate(best_idx)]))
        report = report_text(pairs, batch, choose_best, floor, quality, fidelity, chosen)
        if chosen is not None:
            log.info("%s", report)
        return io.NodeOutput(_repeat_extras(latent, z_hq, n, batch), "\n".join(labels), [p for p, _ in pairs],
                             [s for _, s in pairs], best, report, images)
