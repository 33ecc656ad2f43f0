"""PiSA Labelled Grid: one contact sheet from an IMAGE batch, each tile labelled (e.g. with its lambdas and scores)."""
from __future__ import annotations

from ..pisa_sr.checks import check_image
from ..pisa_sr.errors import PisaError
from ..pisa_sr.grid import labelled_grid
from .compat import io
from .errors import CATEGORY, names_refusals

NODE = "PiSA Labelled Grid"


def split_lines(text, n: int, what: str, fix: str) -> list[str]:
    """``n`` labels from one-per-line text; blank text means ``n`` empty labels."""
    if text is None or not str(text).strip():
        return [""] * n
    lines = str(text).splitlines()
    while len(lines) > n and not lines[-1].strip():
        lines.pop()  # tolerate trailing blank lines
    if len(lines) != n:
        raise PisaError(f"{n} image(s) but {len(lines)} {what} line(s). {fix}")
    return lines


class PiSALabelledGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiSA_LabelledGrid",
            display_name=NODE,
            category=CATEGORY,
            description="Lays an IMAGE batch out as one grid image, each tile labelled in its top-left corner, for "
                        "judging sweep settings side by side and for sharing. Tiles are copied unchanged; only the "
                        "label boxes are drawn.",
            inputs=[
                io.Image.Input("images", tooltip="The decoded batch, e.g. PiSA Tiled VAE Decode of PiSA Lambda "
                               "Sweep's latents."),
                io.String.Input("labels", optional=True, force_input=True,
                                tooltip="One label per image, one per line (PiSA Lambda Sweep's labels)."),
                io.String.Input("scores", optional=True, force_input=True,
                                tooltip="Optional: one score line per image (PiSA Quality Score's scores_text)."),
                io.Int.Input("columns", default=0, min=0, max=64, step=1,
                             tooltip="Tiles per row; 0 = automatic (near-square)."),
                io.Int.Input("font_size", default=0, min=0, max=256, step=1,
                             tooltip="Label height in px; 0 = automatic."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="One grid image (batch 1); connect to Save "
                                     "Image or Preview Image.")],
        )

    @classmethod
    @names_refusals(NODE)
    def execute(cls, images, labels=None, scores=None, columns=0, font_size=0) -> io.NodeOutput:
        images = check_image(images)
        n = images.shape[0]
        names = split_lines(labels, n, "label", "Connect the labels output of PiSA Lambda Sweep for the same batch "
                            "(one line per image), or leave labels unconnected.")
        extra = split_lines(scores, n, "score", "Connect the scores text of PiSA Quality Score run on the same "
                            "batch, or leave scores unconnected.")
        text = [" | ".join(p for p in (a.strip(), b.strip()) if p) for a, b in zip(names, extra)]
        return io.NodeOutput(labelled_grid(images, text, columns=int(columns) or None,
                                           font_size=int(font_size) if int(font_size) > 0 else None))
