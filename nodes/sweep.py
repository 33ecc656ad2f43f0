"""PiSA Lambda Sweep: every (lambda_pix, lambda_sem) setting from one evaluation of eps_pix and eps_sem.

``eps = lambda_pix*eps_pix + lambda_sem*(eps_sem - eps_pix)`` is linear in both lambdas and the tile blending is
linear too, so the sweep runs the UNet once per tile (adjustable mode, both outputs) and forms every setting by a
linear combination: the cost of one adjustable sample plus one cheap combination per setting.

Outputs (documented in the tooltips):
  latents     every setting, setting-major: batch index ``s * B + b`` = setting ``s`` applied to input image ``b``;
              the PiSA LQ reference is repeated to match, so PiSA Tiled VAE Decode colour-fixes it as usual.
  labels      one line per latent in that batch (for PiSA Labelled Grid).
  lambda_pix, lambda_sem   FLOAT lists, one value per setting (list outputs: a node fed from them runs per setting).
  best        the chosen setting per input image (batch B) when choose_best is on; the first setting otherwise.
  report      the settings, their scores and the choice, as text.
  images      every setting decoded (needs the vae input), in the order of 'latents': with choose_best on, the
              images it decoded to score; with it off, decoded here so a grid needs no second decode. Without a
              vae the output is blocked with a message, so a node fed from it says what to connect.
"""
from __future__ import annotations

import logging
import math

import torch

from ..pisa_sr import metrics
from ..pisa_sr.color import COLOR_FIXES
from ..pisa_sr.errors import PisaError
from ..pisa_sr.heap import trims_heap
from ..pisa_sr.sweep import MAX_SETTINGS, choose_best_per_image, format_label, parse_lambda_pairs, sweep_labels, \
    sweep_latents
from . import compat
from .compat import io
from .decode import decode_hq
from .lq_info import LATENT_KEY, LQInfo, lq_info_of
from .sample import sample_eps

NODE = "PiSA Lambda Sweep"
log = logging.getLogger("PiSA-SR")

CHOOSE_BEST = ("off", "sharpness", "noise", "musiq", "clipiqa", "maniqa")
REFERENCE_SETTING = (1.0, 0.0)  # the pix-only output the fidelity floor is measured against
DEFAULT_SETTINGS = "pix=0.5:1.5:0.5 sem=0.5:1.5:0.5"
BEST_MARK = " [best]"


def _repeat_extras(latent: dict, samples: torch.Tensor, settings: int, batch: int) -> dict:
    """The LATENT dict for a setting-major batch of ``settings`` x ``batch``: the LQ reference, noise mask and
    batch_index repeated the way RepeatLatentBatch repeats them, every other key kept."""
    out = dict(latent)
    out["samples"] = samples
    info = lq_info_of(latent)
    # A batch-1 LQ reference stays batch 1 (PiSA Tiled VAE Decode applies it to every image); a batch-B one is
    # repeated per setting so row s * B + b keeps image b's reference.
    if info is not None and batch > 1 and settings > 1 and info.lq_u8.shape[0] == batch:
        out[LATENT_KEY] = LQInfo(lq_u8=info.lq_u8.repeat(settings, 1, 1, 1), plan=info.plan)
    mask = out.get("noise_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() >= 1 and mask.shape[0] > 1:
        if mask.shape[0] < batch:
            mask = mask.repeat(math.ceil(batch / mask.shape[0]), *([1] * (mask.dim() - 1)))[:batch]
        out["noise_mask"] = mask.repeat(settings, *([1] * (mask.dim() - 1)))
    index = out.get("batch_index")
    if isinstance(index, list) and index:
        offset = max(index) - min(index) + 1
        out["batch_index"] = [x + i * offset for i in range(settings) for x in index]
    return out


def _check_metric_ready(choice: str) -> None:
    if choice not in CHOOSE_BEST:
        raise PisaError(f"{NODE}: choose_best must be one of {', '.join(CHOOSE_BEST)}, got {choice!r}.")
    if choice in metrics.LEARNED_METRICS:
        ok, reason = metrics.learned_metric_status(choice)
        if not ok:
            raise PisaError(f"{NODE}: choose_best = '{choice}': {reason} Or pick 'sharpness' or 'noise', which "
                            "need no weights.")


def _fmt(v: float, unit: str = "") -> str:
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "inf" + unit
    return f"{v:.4g}{unit}"


def decode_settings(latent: dict, z_hq_raw: torch.Tensor, settings: int, batch: int, vae, color_fix: str,
                    extra_steps: int = 0):
    """Yield each setting's decoded images (batch B at a time, as PiSA Tiled VAE Decode makes them), advancing a
    progress bar of ``settings + extra_steps`` steps whose first ``extra_steps`` the caller has done."""
    bar = compat.progress_bar(settings + extra_steps)
    for s in range(settings):
        compat.throw_if_interrupted()
        yield decode_hq(dict(latent, samples=z_hq_raw[s * batch:(s + 1) * batch]), vae, color_fix)
        bar.update_absolute(s + 1 + extra_steps, settings + extra_steps)


def score_settings(latent: dict, z_hq_raw: torch.Tensor, ref_raw: torch.Tensor, settings: int, batch: int, vae,
                   color_fix: str, metric: str) -> tuple[list[list[float]], list[list[float]], torch.Tensor]:
    """Decode each setting, score it with ``metric`` and with PSNR (Y, no border crop) against the decoded pix-only
    reference; returns ``quality[s][b]``, ``fidelity[s][b]`` and the decoded images, setting-major."""
    ref_img = decode_hq(dict(latent, samples=ref_raw), vae, color_fix)
    quality: list[list[float]] = []
    fidelity: list[list[float]] = []
    images = []
    for img in decode_settings(latent, z_hq_raw, settings, batch, vae, color_fix, extra_steps=1):
        quality.append([float(v) for v in metrics.score(img, metric)])
        fidelity.append([float(v) for v in metrics.psnr_y(img, ref_img.to(img.device), crop_border=0)])
        images.append(img)
    return quality, fidelity, torch.cat(images)


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
        cells = "; ".join(
            f"{metric} {_fmt(quality[s][b])}, PSNR {_fmt(fidelity[s][b], ' dB')}" for b in range(batch))
        lines.append(f"{s + 1}: {format_label(lp, ls)}: {cells}")
    return "\n".join(lines)


class PiSALambdaSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiSA_LambdaSweep",
            display_name=NODE,
            category="image/upscaling/PiSA-SR",
            description="Every (lambda_pix, lambda_sem) setting in one go: eps_pix and eps_sem are computed once "
                        "(tiled like the sampler) and each setting is their linear combination, so a 9-setting "
                        "sweep costs about one adjustable sample plus the decodes. Results equal running "
                        "Dual-Guided One-Step Sample once per setting. Optionally picks the best setting with a "
                        "no-reference score under a fidelity floor.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from Load PiSA LoRAs."),
                io.Conditioning.Input("positive", tooltip="CLIPTextEncode with an EMPTY prompt (the release's "
                                      "setting), as for Dual-Guided One-Step Sample."),
                io.Latent.Input("latent", tooltip="The LATENT from PiSA Encode LQ (a batch of B images is fine)."),
                io.String.Input("settings", multiline=True, default=DEFAULT_SETTINGS,
                                tooltip="The (lambda_pix, lambda_sem) settings, in output order, at most "
                                f"{MAX_SETTINGS}. A list: '0.5,1; 1,1; 1,1.5' (pairs separated by ; or new "
                                "lines). Or a grid: 'pix=0.5:1.5:0.5 sem=0.5:1.5:0.5' (start:stop:step, "
                                "inclusive, pix outer and sem inner; a lambda left out stays 1.0). Each lambda "
                                "must lie in [-2, 4]; (1, 1) is the release default, (1, 0) pixel-only."),
                io.Int.Input("tile_size", default=96, min=0, max=1024, step=8,
                             tooltip="Latent tile size, as in Dual-Guided One-Step Sample (96 with overlap 32 is "
                             "the release's; tiling starts when the latent area exceeds tile_size^2; 0 = never)."),
                io.Int.Input("tile_overlap", default=32, min=0, max=512, step=8,
                             tooltip="Overlap between latent tiles, blended with Gaussian weights (sigma = tile/10)."),
                io.Combo.Input("choose_best", options=list(CHOOSE_BEST), default="off",
                               tooltip="off: no choice ('best' = the first setting). Otherwise decode every "
                               "setting (needs the vae input), score it and output the best one in 'best', per "
                               "input image. sharpness (higher is better) and noise (lower is better) are cheap "
                               "HEURISTICS, not perceived quality: sharpness also rises with noise and halos. "
                               "musiq / clipiqa / maniqa are the learned scores the PiSA-SR paper reports; they "
                               "work only if the optional pyiqa package AND its weights are already on this "
                               "machine (this node never downloads; otherwise it stops and says what to fetch)."),
                io.Float.Input("fidelity_floor_db", default=28.0, min=0.0, max=100.0, step=0.5,
                               tooltip="Only settings whose decoded image stays within this PSNR (dB, on Y, no "
                               "border crop) of the decoded pixel-only output (lambda_pix 1, lambda_sem 0) may be "
                               "chosen; higher = stay closer to the faithful result. 0 = no floor. If no setting "
                               "reaches it, the closest one is returned and the report says so. Used only when "
                               "choose_best is on."),
                io.Combo.Input("color_fix", options=list(COLOR_FIXES), default="adain",
                               tooltip="Colour fix of the decoded 'images' (and of what choose_best scores); set it "
                               "like your PiSA Tiled VAE Decode."),
                io.Vae.Input("vae", optional=True,
                             tooltip="The VAE (the one that encoded the LQ image). Needed for choose_best and for "
                             "'images'; when connected, every setting is decoded once here."),
            ],
            outputs=[
                io.Latent.Output(display_name="latents", tooltip="Every setting's latent, setting-major: batch "
                                 "index = setting x B + image (B = input batch). Connect to PiSA Tiled VAE Decode, "
                                 "then PiSA Labelled Grid."),
                io.String.Output(display_name="labels", tooltip="One label per latent in 'latents', one per line "
                                 "(e.g. 'pix 1.00 / sem 1.50'; the chosen one ends in [best]). Connect to PiSA "
                                 "Labelled Grid."),
                io.Float.Output(display_name="lambda_pix", is_output_list=True,
                                tooltip="lambda_pix of each setting, as a list (one value per setting)."),
                io.Float.Output(display_name="lambda_sem", is_output_list=True,
                                tooltip="lambda_sem of each setting, as a list (one value per setting)."),
                io.Latent.Output(display_name="best", tooltip="With choose_best on: the best setting for each "
                                 "input image (batch B). With choose_best off: the first setting."),
                io.String.Output(display_name="report", tooltip="The settings, their scores and which one was "
                                 "chosen and why, as text (e.g. for a Preview Any / Show Text node)."),
                io.Image.Output(display_name="images", tooltip="Every setting decoded once, in the order of "
                                "'latents' (needs the vae input; with choose_best on these are the scored images). "
                                "Connect to PiSA Labelled Grid instead of decoding 'latents' again."),
            ],
        )

    @classmethod
    @trims_heap
    def execute(cls, model, positive, latent, settings=DEFAULT_SETTINGS, tile_size=96, tile_overlap=32,
                choose_best="off", fidelity_floor_db=28.0, color_fix="adain", vae=None) -> io.NodeOutput:
        try:
            pairs = parse_lambda_pairs(settings)
        except PisaError as e:
            raise PisaError(f"{NODE}: settings: {e}") from None
        choice = str(choose_best)
        _check_metric_ready(choice)
        if choice != "off" and vae is None:
            raise PisaError(f"{NODE}: choose_best = '{choice}' decodes every setting to score it: connect the VAE "
                            "(the one that encoded the LQ image), or set choose_best to off.")
        floor = float(fidelity_floor_db)
        if not math.isfinite(floor):
            raise PisaError(f"{NODE}: fidelity_floor_db must be a finite number of dB, e.g. 28.")
        if vae is not None and color_fix not in COLOR_FIXES:
            raise PisaError(f"{NODE}: color_fix must be one of {', '.join(COLOR_FIXES)}.")

        z, eps = sample_eps(model, latent, positive, 1.0, 1.0, int(tile_size), int(tile_overlap), node=NODE,
                            outputs="both")
        c = z.shape[1]
        eps_pix, eps_sem = eps[:, :c].to(z.device), eps[:, c:].to(z.device)
        batch, n = z.shape[0], len(pairs)
        z_hq = compat.process_latent_out(model, sweep_latents(z, eps_pix, eps_sem, pairs))
        z_hq = z_hq.to(torch.float32).cpu()
        out = _repeat_extras(latent, z_hq, n, batch)
        labels = sweep_labels(pairs, batch)

        chosen = quality = fidelity = None
        try:
            if choice != "off":
                ref = compat.process_latent_out(model, sweep_latents(z, eps_pix, eps_sem, [REFERENCE_SETTING]))
                quality, fidelity, images = score_settings(latent, z_hq, ref.to(torch.float32).cpu(), n, batch,
                                                           vae, color_fix, choice)
                chosen = choose_best_per_image(quality, fidelity, floor, metrics.METRICS[choice].direction > 0)
            elif vae is not None:
                images = torch.cat(list(decode_settings(latent, z_hq, n, batch, vae, color_fix)))
            else:
                images = compat.blocked(f"{NODE}: 'images' needs the vae input connected (the VAE that encoded "
                                        "the LQ image); or decode 'latents' with PiSA Tiled VAE Decode.")
        except PisaError as e:
            msg = str(e)
            raise PisaError(msg if msg.startswith(NODE) else f"{NODE}: {msg}") from None
        if chosen is None:
            best_idx = [0] * batch
        else:
            best_idx = [s for s, _ in chosen]
            for b, s in enumerate(best_idx):
                labels[s * batch + b] += BEST_MARK
        best = dict(latent)
        best["samples"] = torch.stack([z_hq[s * batch + b] for b, s in enumerate(best_idx)])
        report = report_text(pairs, batch, choice, floor, quality, fidelity, chosen)
        if chosen is not None:
            log.info("%s", report)
        return io.NodeOutput(out, "\n".join(labels), [p for p, _ in pairs], [s for _, s in pairs], best, report,
                             images)
