"""PiSA Quality Score: full-reference (PSNR, SSIM) and no-reference (heuristic or learned) scores of an IMAGE batch."""
from __future__ import annotations

from ..pisa_sr import metrics
from ..pisa_sr.checks import check_image
from .compat import io
from .errors import CATEGORY, names_refusals

NODE = "PiSA Quality Score"


class PiSAQualityScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiSA_QualityScore",
            display_name=NODE,
            category=CATEGORY,
            description="Scores every image of a batch: PSNR / SSIM against a reference, or a no-reference "
                        "heuristic or learned score.",
            inputs=[
                io.Image.Input("images", tooltip="The images to score (a batch: one score per image)."),
                io.Combo.Input("metric", options=list(metrics.METRICS), default="sharpness",
                               tooltip="psnr / ssim need 'reference'; sharpness and noise are weight-free "
                               "heuristics; musiq / clipiqa / maniqa need pyiqa and its weights (see README)."),
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
    @names_refusals(NODE)
    def execute(cls, images, metric="sharpness", reference=None, crop_border=4) -> io.NodeOutput:
        images = check_image(images)
        reference = None if reference is None else check_image(reference)
        values = [float(v) for v in metrics.score(images, metric, reference, int(crop_border))]
        unit = " dB" if metric == "psnr" else ""
        return io.NodeOutput("\n".join(f"{metric} {metrics.format_score(v, unit)}" for v in values), values)
