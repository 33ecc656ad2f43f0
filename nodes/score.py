"""PiSA Quality Score: full-reference (PSNR, SSIM) and no-reference (heuristic or learned) scores of an IMAGE batch."""
from __future__ import annotations

import math

import torch

from ..pisa_sr import metrics
from ..pisa_sr.errors import PisaError
from .compat import io

NODE = "PiSA Quality Score"


def check_images(images, node: str) -> torch.Tensor:
    """An IMAGE batch ``[B,H,W,C]`` (C = 3 or 4), non-empty and finite -> its RGB channels."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] not in (3, 4):
        raise PisaError(f"{node}: expected an IMAGE batch [B,H,W,3], got {getattr(images, 'shape', type(images))}. "
                        "Connect an IMAGE output (e.g. PiSA Tiled VAE Decode).")
    if min(images.shape[:3]) == 0:
        raise PisaError(f"{node}: the image batch is empty ({tuple(images.shape)}).")
    if not torch.isfinite(images).all():
        raise PisaError(f"{node}: the images contain NaN or infinite values; the node that produced them is broken.")
    return images[..., :3]


def score_line(metric: str, value: float) -> str:
    unit = " dB" if metric == "psnr" else ""
    if math.isnan(value):
        return f"{metric} n/a"
    if math.isinf(value):
        return f"{metric} inf{unit}"
    return f"{metric} {value:.4g}{unit}"


class PiSAQualityScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiSA_QualityScore",
            display_name=NODE,
            category="image/upscaling/PiSA-SR",
            description="Scores every image of a batch. Full-reference (needs a reference image): PSNR and SSIM "
                        "as the SR literature computes them. No-reference: two weight-free heuristics, or the "
                        "learned MUSIQ / CLIP-IQA / MANIQA when pyiqa and their weights are already installed.",
            inputs=[
                io.Image.Input("images", tooltip="The images to score (a batch: one score per image)."),
                io.Combo.Input("metric", options=list(metrics.METRICS), default="sharpness",
                               tooltip="psnr / ssim (higher is better; need 'reference'): on the Y channel of "
                               "BT.601 YCbCr (studio range 16..235, as MATLAB rgb2ycbcr), after dropping "
                               "crop_border px on every side; SSIM with an 11x11 Gaussian window (sigma 1.5), data "
                               "range 255. Scored on the float image: round to 8 bits first to match papers exactly. "
                               "sharpness (RMS Sobel gradient of luma, higher = crisper) and noise (Immerkaer noise "
                               "sigma of luma in 0..255 levels, lower is better) are HEURISTICS, not perceived "
                               "quality: noise raises sharpness, texture raises noise. musiq / clipiqa / maniqa "
                               "(higher is better) are the learned scores the PiSA-SR paper reports; they run only "
                               "if the optional pyiqa package and its weights are ALREADY on this machine. This "
                               "node never downloads; otherwise it stops and says what to install."),
                io.Image.Input("reference", optional=True,
                               tooltip="Ground-truth image for psnr / ssim, the same size as the images; batch 1 "
                               "(compared with every image) or the same batch. Ignored by the other metrics."),
                io.Int.Input("crop_border", default=4, min=0, max=64, step=1,
                             tooltip="Pixels dropped on every side before psnr / ssim; the SR convention is the "
                             "scale factor (4 for x4). Ignored by the other metrics."),
            ],
            outputs=[
                io.String.Output(display_name="scores_text", tooltip="One line per image, e.g. 'psnr 27.31 dB'; "
                                 "connect to PiSA Labelled Grid's scores to annotate the tiles."),
                io.Float.Output(display_name="scores", is_output_list=True,
                                tooltip="The scores as a FLOAT list (one value per image; a node fed from it runs "
                                "once per image). inf = identical to the reference (psnr)."),
            ],
        )

    @classmethod
    def execute(cls, images, metric="sharpness", reference=None, crop_border=4) -> io.NodeOutput:
        images = check_images(images, NODE)
        if reference is not None:
            reference = check_images(reference, NODE)
        key = str(metric).strip().lower()
        if key not in metrics.METRICS:
            raise PisaError(f"{NODE}: unknown metric {metric!r}; choose from {', '.join(metrics.METRICS)}.")
        if metrics.METRICS[key].needs_reference and reference is None:
            raise PisaError(f"{NODE}: '{key}' is a full-reference metric: connect the ground-truth image to "
                            "'reference', or pick a no-reference metric (sharpness, noise, musiq, ...).")
        try:
            values = [float(v) for v in metrics.score(images, key, reference, int(crop_border))]
        except PisaError as e:
            raise PisaError(f"{NODE}: {e}") from None
        return io.NodeOutput("\n".join(score_line(key, v) for v in values), values)
