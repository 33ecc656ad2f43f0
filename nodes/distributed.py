"""Two small nodes for runs spread over ComfyUI-Distributed participants (master + workers): PiSA Distributed Slice
picks a participant's share of the frames by a rule that cannot drop one, PiSA Check Frames refuses a collected
result that is not every frame in order. ComfyUI-Distributed itself is not imported: its nodes are wired around."""
from __future__ import annotations

from ..pisa_sr.checks import check_image
from ..pisa_sr.frames import check_frames, share
from .compat import io
from .errors import CATEGORY, names_refusals

SLICE = "PiSA Distributed Slice"
CHECK = "PiSA Check Frames"


class PiSADistributedSlice(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiSA_DistributedSlice",
            display_name=SLICE,
            category=CATEGORY,
            description="This participant's share of a batch or video: the frames split into equal contiguous "
                        "shares, master first, then the workers in their listed order (the order the Distributed "
                        "Collector gathers them in).",
            inputs=[
                io.Image.Input("images", tooltip="The whole batch or all video frames (the same on every "
                               "participant)."),
                io.Int.Input("participant", default=0, min=0, max=1024, step=1,
                             tooltip="0 on the master, k on the k-th worker: connect a DistributedValue with "
                             "default 0 and worker values 1, 2, ... (type INT)."),
                io.Int.Input("participants", default=3, min=1, max=1024, step=1,
                             tooltip="1 (the master) + the number of workers."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="This participant's frames; connect to PiSA "
                                     "Encode LQ.")],
        )

    @classmethod
    @names_refusals(SLICE)
    def execute(cls, images, participant, participants) -> io.NodeOutput:
        return io.NodeOutput(share(check_image(images), int(participant), int(participants)))


class PiSACheckFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiSA_CheckFrames",
            display_name=CHECK,
            category=CATEGORY,
            description="Passes the collected frames on only if every source frame came back once, in order; "
                        "otherwise stops the run with an error naming what is missing, so nothing partial is saved.",
            inputs=[
                io.Image.Input("images", tooltip="The upscaled frames from the Distributed Collector."),
                io.Image.Input("source", tooltip="All low-quality frames (what PiSA Distributed Slice was given)."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="The same frames, checked; connect to Save "
                                     "Image or Create Video."),
                     io.String.Output(display_name="report", tooltip="One line: how many frames came back.")],
        )

    @classmethod
    @names_refusals(CHECK)
    def execute(cls, images, source) -> io.NodeOutput:
        images, source = check_image(images), check_image(source)
        return io.NodeOutput(images, check_frames(images, source))
