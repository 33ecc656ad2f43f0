"""The pack's ComfyUI V3 nodes (thin: each translates ComfyUI types into calls of the pisa_sr core)."""
from __future__ import annotations

from .compat import ComfyExtension, io
from .decode import PiSADecode
from .distributed import PiSACheckFrames, PiSADistributedSlice
from .encode_lq import PiSAEncodeLQ
from .live import register_server
from .live_preview import PiSALivePreview
from .load_loras import PiSALoadLoRAs, register_model_folder
from .sample import PiSASample
from .score import PiSAQualityScore
from .sweep import PiSALambdaSweep
from .grid import PiSALabelledGrid


class PiSAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [PiSALoadLoRAs, PiSAEncodeLQ, PiSASample, PiSADecode, PiSALambdaSweep, PiSALabelledGrid,
                PiSAQualityScore, PiSADistributedSlice, PiSACheckFrames, PiSALivePreview]


async def comfy_entrypoint() -> ComfyExtension:
    register_model_folder()
    register_server()  # the live preview's route (issue 21)
    return PiSAExtension()
