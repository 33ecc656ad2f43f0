"""Generate the example workflows, in ComfyUI's UI format (example_workflows/*.json, drag-and-drop) and API format
(example_workflows/api/*.json, what /prompt takes), and the subgraph blueprint (subgraphs/*.json, listed in the node
library), from one description so they can never disagree.

    python scripts/build_workflows.py            # rewrite the files
    python scripts/build_workflows.py --check    # exit 1 if any file is out of date (run by the tests)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_UI = os.path.join(REPO, "example_workflows")
OUT_API = os.path.join(OUT_UI, "api")
OUT_BLUEPRINTS = os.path.join(REPO, "subgraphs")
EXAMPLE_IMAGE = "pisa_sr_example.png"
SD21_CKPT = "v2-1_512-ema-pruned.safetensors"
PISA_LORA = "pisa_sr.pkl"

# Input/output signatures of the node classes the examples use: (link inputs, widget inputs in order, outputs).
SIGS: dict[str, tuple[list[tuple[str, str]], list[str], list[tuple[str, str]]]] = {
    "CheckpointLoaderSimple": ([], ["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], ["text"], [("CONDITIONING", "CONDITIONING")]),
    "LoadImage": ([], ["image", "upload"], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
    "PreviewImage": ([("images", "IMAGE")], [], []),
    "PiSA_LoadLoRAs": ([("model", "MODEL")], ["lora_name"], [("MODEL", "MODEL")]),
    "PiSA_EncodeLQ": ([("image", "IMAGE"), ("vae", "VAE")], ["upscale", "resize_filter", "vae_tile_size"],
                      [("LATENT", "LATENT")]),
    "PiSA_Sample": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("latent", "LATENT")],
                    ["lambda_pix", "lambda_sem", "tile_size", "tile_overlap"], [("LATENT", "LATENT")]),
    "PiSA_Decode": ([("latent", "LATENT"), ("vae", "VAE")], ["color_fix", "vae_tile_size"], [("IMAGE", "IMAGE")]),
    "PiSA_LambdaSweep": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("latent", "LATENT"), ("vae", "VAE")],
                         ["settings", "tile_size", "tile_overlap", "choose_best", "fidelity_floor_db", "color_fix"],
                         [("latents", "LATENT"), ("labels", "STRING"), ("lambda_pix", "FLOAT"), ("lambda_sem", "FLOAT"),
                          ("best", "LATENT"), ("report", "STRING"), ("images", "IMAGE")]),
    "PiSA_QualityScore": ([("images", "IMAGE"), ("reference", "IMAGE")], ["metric", "crop_border"],
                          [("scores_text", "STRING"), ("scores", "FLOAT")]),
    "PiSA_LabelledGrid": ([("images", "IMAGE"), ("labels", "STRING"), ("scores", "STRING")], ["columns", "font_size"],
                          [("IMAGE", "IMAGE")]),
    "PreviewAny": ([("source", "*")], [], []),
    "ImageBatch": ([("image1", "IMAGE"), ("image2", "IMAGE")], [], [("IMAGE", "IMAGE")]),
    "LoadVideo": ([], ["file", "upload"], [("VIDEO", "VIDEO")]),
    "GetVideoComponents": ([("video", "VIDEO")], [], [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")]),
    "CreateVideo": ([("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")], ["fps"], [("VIDEO", "VIDEO")]),
    "SaveVideo": ([("video", "VIDEO")], ["filename_prefix", "format", "codec"], []),
    # ComfyUI-Distributed 1.4.4 (a separate custom-node pack, installed on the master and every worker)
    "DistributedValue": ([], ["default_value", "worker_values"], [("value", "*")]),
    "DistributedCollector": ([("images", "IMAGE"), ("audio", "AUDIO")], ["load_balance"],
                             [("images", "IMAGE"), ("audio", "AUDIO")]),
    "PiSA_DistributedSlice": ([("images", "IMAGE"), ("participant", "INT")], ["participants"],
                              [("IMAGE", "IMAGE")]),
    "PiSA_CheckFrames": ([("images", "IMAGE"), ("source", "IMAGE")], [], [("IMAGE", "IMAGE"), ("report", "STRING")]),
}
UI_ONLY_WIDGETS = {"upload"}
EXAMPLE_VIDEO = "pisa_sr_example.mp4"
# Participant index for PiSA Distributed Slice: 0 on the master (default_value), k on the k-th worker.
WORKER_VALUES = json.dumps({"_type": "INT", "1": "1", "2": "2"})  # front-end widgets that are not prompt inputs
UI_ONLY_NODES = {"MarkdownNote": ([], ["text"], [])}  # front-end nodes (notes): UI format only, not in the API twin
# UI sizes where the default would clip a widget: the sampler carries the fidelity/perception pad of web/, the
# decoder grows its before/after preview after a run, the loaders show their preview.
SIZES = {"PiSA_Sample": [340, 420], "PiSA_Decode": [340, 130], "SaveImage": [360, 400], "LoadImage": [320, 320],
         "MarkdownNote": [360, 250], "PiSA_LambdaSweep": [360, 330], "PreviewAny": [360, 220]}
NOTE_COLORS = {"color": "#432", "bgcolor": "#653"}


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    widgets: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)  # input name -> (source node id, source output slot)
    title: str | None = None


WEIGHTS_NOTE = ("**Weights**: `v2-1_512-ema-pruned.safetensors` (SD 2.1-base) in `models/checkpoints`, `pisa_sr.pkl` "
                "(PiSA-SR release) in `models/pisa_sr`. Keep the prompt empty (the release's setting).")


def basic_graph(lambda_pix=1.0, lambda_sem=1.0, tile_size=96, tile_overlap=32, upscale=4, color_fix="adain",
                vae_tile_size=0,
                prefix="PiSA-SR", note: str | None = None, sampler_title: str | None = None) -> list[Node]:
    nodes = [
        Node(1, "CheckpointLoaderSimple", (20, 80), {"ckpt_name": SD21_CKPT}, title="Load Checkpoint (SD 2.1-base)"),
        Node(2, "CLIPTextEncode", (400, 330), {"text": ""}, {"clip": (1, 1)}, title="Empty prompt (release setting)"),
        Node(3, "LoadImage", (20, 420), {"image": EXAMPLE_IMAGE, "upload": "image"}, title="Low-quality image"),
        Node(4, "PiSA_LoadLoRAs", (400, 80), {"lora_name": PISA_LORA}, {"model": (1, 0)}),
        Node(5, "PiSA_EncodeLQ", (400, 560), {"upscale": upscale, "resize_filter": "bicubic",
                                               "vae_tile_size": vae_tile_size},
             {"image": (3, 0), "vae": (1, 2)}),
        Node(6, "PiSA_Sample", (780, 80), {"lambda_pix": lambda_pix, "lambda_sem": lambda_sem,
                                          "tile_size": tile_size, "tile_overlap": tile_overlap},
             {"model": (4, 0), "positive": (2, 0), "latent": (5, 0)}, title=sampler_title),
        Node(7, "PiSA_Decode", (1160, 80), {"color_fix": color_fix, "vae_tile_size": vae_tile_size},
             {"latent": (6, 0), "vae": (1, 2)}),
        Node(8, "SaveImage", (1540, 80), {"filename_prefix": prefix}, {"images": (7, 0)}),
    ]
    if note:
        nodes.append(Node(9, "MarkdownNote", (780, 580), {"text": note + "\n\n" + WEIGHTS_NOTE}, title="Read me"))
    return nodes


SWEEP_NOTE = (
    "## Lambda sweep: the whole fidelity / perception range at once\n"
    "**PiSA Lambda Sweep** computes eps_pix and eps_sem once and forms every (lambda_pix, lambda_sem) setting from "
    "them: 9 settings cost about one adjustable sample plus the decodes. `settings` takes a list (`0.5,1; 1,1; 1,1.5`) "
    "or a grid (`pix=0.5:1.5:0.5 sem=0.5:1.5:0.5`, this file).\n\n"
    "- **images** (every setting decoded once) -> **PiSA Labelled Grid**: one contact sheet, each tile labelled with "
    "its lambdas and its score from **PiSA Quality Score**\n"
    "- **best**: choose_best picks the setting with the best score whose PSNR against the pixel-only output (1, 0) "
    "stays above fidelity_floor_db; **report** says which and why\n\n"
    "sharpness / noise are heuristics; musiq, clipiqa and maniqa need pyiqa and its weights already installed "
    "(nothing is downloaded).")


def sweep_graph(settings="pix=0.5:1.5:0.5 sem=0.5:1.5:0.5", choose_best="sharpness", floor_db=28.0) -> list[Node]:
    """Sweep (decodes every setting once) -> score -> labelled grid, and the chosen setting decoded on its own."""
    nodes = [n for n in basic_graph() if n.id <= 5]
    nodes += [
        Node(6, "PiSA_LambdaSweep", (780, 80), {"settings": settings, "tile_size": 96, "tile_overlap": 32,
                                               "choose_best": choose_best, "fidelity_floor_db": floor_db,
                                               "color_fix": "adain"},
             {"model": (4, 0), "positive": (2, 0), "latent": (5, 0), "vae": (1, 2)}),
        Node(8, "PiSA_QualityScore", (1160, 260), {"metric": choose_best, "crop_border": 4}, {"images": (6, 6)}),
        Node(9, "PiSA_LabelledGrid", (1540, 80), {"columns": 3, "font_size": 0},
             {"images": (6, 6), "labels": (6, 1), "scores": (8, 0)}),
        Node(10, "SaveImage", (1920, 80), {"filename_prefix": "PiSA-SR_sweep_grid"}, {"images": (9, 0)},
             title="Save grid"),
        Node(11, "PiSA_Decode", (1160, 480), {"color_fix": "adain", "vae_tile_size": 0},
             {"latent": (6, 4), "vae": (1, 2)}, title="Decode best setting"),
        Node(12, "SaveImage", (1540, 480), {"filename_prefix": "PiSA-SR_sweep_best"}, {"images": (11, 0)},
             title="Save best"),
        Node(13, "PreviewAny", (780, 640), {}, {"source": (6, 5)}, title="Sweep report"),
        Node(14, "MarkdownNote", (400, 760), {"text": SWEEP_NOTE + "\n\n" + WEIGHTS_NOTE}, title="Read me"),
    ]
    return nodes


DISTRIBUTED_NOTE = (
    "## Spread over GPUs and machines (ComfyUI-Distributed)\n"
    "Install ComfyUI-Distributed, this pack and the same model files under the same names on the master and every "
    "worker, add the workers in the Distributed panel, then queue with **Queue Distributed** (plain Queue runs the "
    "master's share only and is refused by PiSA Check Frames).\n\n"
    "- **PiSA Distributed Slice** gives each participant its share: `participants` = 1 + workers; the "
    "DistributedValue says who is who (0 = master, worker values 1, 2, ... in the panel's order)\n"
    "- **PiSA Check Frames** passes the collected frames on only if every one came back, in order; otherwise the "
    "run stops with an error naming what is missing and nothing is saved")


def distributed_graph(video: bool) -> list[Node]:
    """Source frames -> this participant's share -> the four PiSA nodes -> Distributed Collector -> Check Frames."""
    nodes = [n for n in basic_graph() if n.id in (1, 2, 4)]
    if video:
        nodes += [Node(3, "LoadVideo", (20, 420), {"file": EXAMPLE_VIDEO, "upload": "video"}, title="Low-quality video"),
                  Node(16, "GetVideoComponents", (20, 760), {}, {"video": (3, 0)})]
        frames = (16, 0)
    else:
        nodes += [Node(3, "LoadImage", (20, 420), {"image": EXAMPLE_IMAGE, "upload": "image"}, title="Image 1"),
                  Node(13, "LoadImage", (20, 760), {"image": EXAMPLE_IMAGE, "upload": "image"}, title="Image 2"),
                  Node(14, "LoadImage", (20, 1100), {"image": EXAMPLE_IMAGE, "upload": "image"}, title="Image 3"),
                  Node(15, "ImageBatch", (20, 1440), {}, {"image1": (3, 0), "image2": (13, 0)}),
                  Node(16, "ImageBatch", (20, 1540), {}, {"image1": (15, 0), "image2": (14, 0)}, title="All images")]
        frames = (16, 0)
    nodes += [
        Node(10, "DistributedValue", (400, 250), {"default_value": "0", "worker_values": WORKER_VALUES},
             title="Participant (0 = master)"),
        Node(11, "PiSA_DistributedSlice", (400, 420), {"participants": 3}, {"images": frames, "participant": (10, 0)}),
        Node(5, "PiSA_EncodeLQ", (400, 600), {"upscale": 4, "resize_filter": "bicubic", "vae_tile_size": 0},
             {"image": (11, 0), "vae": (1, 2)}),
        Node(6, "PiSA_Sample", (780, 80), {"lambda_pix": 1.0, "lambda_sem": 1.0, "tile_size": 96, "tile_overlap": 32},
             {"model": (4, 0), "positive": (2, 0), "latent": (5, 0)}),
        Node(7, "PiSA_Decode", (1160, 80), {"color_fix": "adain", "vae_tile_size": 0},
             {"latent": (6, 0), "vae": (1, 2)}),
        Node(12, "DistributedCollector", (1160, 300), {"load_balance": False}, {"images": (7, 0)}),
        Node(17, "PiSA_CheckFrames", (1540, 300), {}, {"images": (12, 0), "source": frames}),
        Node(18, "PreviewAny", (1540, 480), {}, {"source": (17, 1)}, title="Frames report"),
    ]
    if video:  # the source's own audio and fps: the collector's audio would repeat it once per participant
        nodes += [Node(19, "CreateVideo", (1920, 300), {"fps": 30.0},
                       {"images": (17, 0), "audio": (16, 1), "fps": (16, 2)}),
                  Node(8, "SaveVideo", (2300, 300), {"filename_prefix": "video/PiSA-SR", "format": "auto",
                                                     "codec": "auto"}, {"video": (19, 0)})]
    else:
        nodes.append(Node(8, "SaveImage", (1920, 300), {"filename_prefix": "PiSA-SR_distributed"},
                          {"images": (17, 0)}))
    nodes.append(Node(9, "MarkdownNote", (780, 640), {"text": DISTRIBUTED_NOTE + "\n\n" + WEIGHTS_NOTE},
                      title="Read me"))
    return nodes


WORKFLOWS = {
    "pisa_sr_basic": basic_graph(),
    # Adjustable mode: less pixel-level cleanup, more semantic detail than the release default (1, 1).
    "pisa_sr_adjustable": basic_graph(
        lambda_pix=0.8, lambda_sem=1.5, prefix="PiSA-SR_adjustable", sampler_title="Sample (adjustable: pix 0.8, sem 1.5)",
        note="## Adjustable mode\n"
             "Two dials, one UNet call: **lambda_pix** (pixel level: fidelity, noise and artefact removal) and "
             "**lambda_sem** (semantic level: generated detail and texture). Drag the dot on the sampler's "
             "*fidelity / perception* pad (right = more detail, up = stronger cleanup) or type the numbers.\n\n"
             "- (1, 1): the release default (dashed ring)\n"
             "- lambda_sem 0: most faithful, pixel-only\n"
             "- lambda_pix 0.8, lambda_sem 1.5 (this file): keeps more of the input, adds detail\n\n"
             "After a run, drag the slider on *PiSA Tiled VAE Decode* to compare the resized input with the result."),
    # Large images: the sampler works on overlapping latent tiles (blended with Gaussian weights), so memory stays
    # flat. 64 latent px = 512 image px tiles (SD 2.1-base's native size) suit GPUs with less memory.
    "pisa_sr_large_tiled": basic_graph(
        tile_size=64, tile_overlap=24, prefix="PiSA-SR_large", sampler_title="Sample (large image: 64 px latent tiles)",
        note="## Large images: tiling\n"
             "The sampler splits the latent (1/8 of the image size) into overlapping **tile_size** tiles once its "
             "area exceeds tile_size^2, and blends them with Gaussian weights, so there are no seams and memory stays "
             "flat.\n\n"
             "- tile_size 64 / tile_overlap 24 (this file): 512 px tiles, for GPUs with less memory\n"
             "- 96 / 32: the release's setting (768 px tiles)\n"
             "- tile_size 0: never tile (fastest if it fits)\n\n"
             "Lower tile_size if you run out of memory; keep the overlap at about a third of the tile. The VAE "
             "tiles on its own: **vae_tile_size** on Encode LQ and Decode is 0 = automatic from free memory; a "
             "fixed size (e.g. 1024) caps memory and gives the same image."),
    # Lambda sweep: every setting from one adjustable pass, a labelled contact sheet, and the quality-guided choice.
    "pisa_sr_lambda_sweep": sweep_graph(),
    # Many images or video frames over a master and workers (ComfyUI-Distributed); nothing lost, or a loud failure.
    "pisa_sr_distributed_batch": distributed_graph(video=False),
    "pisa_sr_distributed_video": distributed_graph(video=True),
}


# App mode (front ends 1.47.12 and 1.58.1: src/stores/appModeStore.ts, workflowService.ts in 1.58.1's source maps):
# extra.linearData lists the app's inputs as [node id, widget name] (the front end upgrades a node id to its widget id
# on load) and its outputs as node ids; extra.linearMode true opens the workflow as an app, false or absent in the
# graph. The basic example opens as an app (upload an image, set the factor and the two dials, Run); the others keep
# the graph open, since their subject is on it (the pad, the tiling note, the grid), and show the same app on the
# "App" toggle. The distributed ones have none: App mode's Run is a plain queue, which they refuse (Queue Distributed).
APP_INPUTS = [(3, "image"), (5, "upscale"), (6, "lambda_pix"), (6, "lambda_sem")]
APPS: dict[str, tuple[list[tuple[int, str]], list[int], bool]] = {
    "pisa_sr_basic": (APP_INPUTS, [8], True),
    "pisa_sr_adjustable": (APP_INPUTS, [8], False),
    "pisa_sr_large_tiled": (APP_INPUTS, [8], False),
    "pisa_sr_lambda_sweep": ([(3, "image"), (5, "upscale"), (6, "settings")], [12, 10], False),
}


def app_extra(name: str, nodes: list[Node]) -> dict:
    if name not in APPS:
        return {}
    inputs, outputs, opens_as_app = APPS[name]
    by_id = {n.id: n for n in nodes}
    assert all(w in by_id[i].widgets for i, w in inputs) and all(by_id[o].type == "SaveImage" for o in outputs)
    return {"linearMode": opens_as_app, "linearData": {"inputs": [[i, w] for i, w in inputs], "outputs": outputs}}


def to_api(nodes: list[Node]) -> dict:
    api = {}
    for n in nodes:
        if n.type in UI_ONLY_NODES:
            continue
        inputs = {k: v for k, v in n.widgets.items() if k not in UI_ONLY_WIDGETS}
        inputs.update({k: [str(src), slot] for k, (src, slot) in n.links.items()})
        api[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
    return api


def to_ui(nodes: list[Node], extra: dict | None = None) -> dict:
    by_id = {n.id: n for n in nodes}
    links = []
    out_links: dict[tuple[int, int], list[int]] = {}
    in_link: dict[tuple[int, str], int] = {}
    sigs = {**SIGS, **UI_ONLY_NODES}
    for n in nodes:
        link_inputs = sigs[n.type][0]
        for slot, (name, typ) in enumerate(link_inputs):
            if name not in n.links:
                continue
            src, src_slot = n.links[name]
            lid = len(links) + 1
            links.append([lid, src, src_slot, n.id, slot, typ])
            out_links.setdefault((src, src_slot), []).append(lid)
            in_link[(n.id, name)] = lid
    ui_nodes = []
    for order, n in enumerate(nodes):
        link_inputs, widget_names, outputs = sigs[n.type]
        missing = set(widget_names) - set(n.widgets) - UI_ONLY_WIDGETS
        assert not missing, (n.type, missing)
        node = {
            "id": n.id, "type": n.type, "pos": list(n.pos),
            "size": SIZES.get(n.type, [320, 60 + 26 * (len(widget_names) + 1)]),
            "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": name, "type": typ, "link": in_link.get((n.id, name)),
                        **({"widget": {"name": name}} if name in widget_names else {})} for name, typ in link_inputs],
            "outputs": [{"name": name, "type": typ, "links": out_links.get((n.id, i), []), "slot_index": i}
                        for i, (name, typ) in enumerate(outputs)],
            "properties": {} if n.type in UI_ONLY_NODES else {"Node name for S&R": n.type},
            "widgets_values": [n.widgets[w] for w in widget_names if w in n.widgets],
        }
        if n.title:
            node["title"] = n.title
        if n.type in UI_ONLY_NODES:
            node.update(NOTE_COLORS)
        ui_nodes.append(node)
    assert all(src in by_id for _, src, *_ in links)
    return {"last_node_id": max(by_id), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": extra or {}, "version": 0.4}  # no saved view: the front end fits it


BLUEPRINT = "Image Upscale (PiSA-SR)"
# The blueprint: the four PiSA nodes with the empty prompt inside. Its inputs, in order: (name, type, the inner
# inputs it feeds as (node id, input name), the value shown when placed for widget inputs).
BLUEPRINT_INPUTS = [("image", "IMAGE", [(5, "image")], None), ("model", "MODEL", [(4, "model")], None),
                    ("clip", "CLIP", [(2, "clip")], None), ("vae", "VAE", [(5, "vae"), (7, "vae")], None),
                    ("lora_name", "COMBO", [(4, "lora_name")], PISA_LORA), ("upscale", "INT", [(5, "upscale")], 4),
                    ("lambda_pix", "FLOAT", [(6, "lambda_pix")], 1.0), ("lambda_sem", "FLOAT", [(6, "lambda_sem")], 1.0)]
BLUEPRINT_OUTPUT = ("IMAGE", "IMAGE", (7, 0))


def to_blueprint() -> dict:
    """A one-node workflow whose node is the subgraph, in the format of ComfyUI's own blueprints/ (a definition in
    definitions.subgraphs; inside, links from the subgraph's input node -10 and to its output node -20)."""
    inner = [n for n in basic_graph() if n.id in (2, 4, 5, 6, 7)]
    for n in inner:  # what comes from outside is not linked inside yet
        n.links = {k: v for k, v in n.links.items() if v[0] in {m.id for m in inner}}
    ui = to_ui(inner)
    links = [{"id": lid, "origin_id": o, "origin_slot": os_, "target_id": t, "target_slot": ts, "type": typ}
             for lid, o, os_, t, ts, typ in ui["links"]]
    nodes = {n["id"]: n for n in ui["nodes"]}
    sg_inputs = []
    for slot, (name, typ, targets, _) in enumerate(BLUEPRINT_INPUTS):
        ids = []
        for node_id, input_name in targets:
            lid = len(links) + 1
            entry = next((i for i in nodes[node_id]["inputs"] if i["name"] == input_name), None)
            if entry is None:  # a widget fed from outside becomes a linked widget input
                entry = {"name": input_name, "type": typ, "widget": {"name": input_name}}
                nodes[node_id]["inputs"].append(entry)
            entry["link"] = lid
            tslot = nodes[node_id]["inputs"].index(entry)
            links.append({"id": lid, "origin_id": -10, "origin_slot": slot, "target_id": node_id, "target_slot": tslot,
                          "type": typ})
            ids.append(lid)
        sg_inputs.append({"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"pisa-sr/in/{name}")), "name": name,
                          "type": typ, "linkIds": ids, "pos": [0, 40 + 20 * slot]})
    out_name, out_type, (src, src_slot) = BLUEPRINT_OUTPUT
    lid = len(links) + 1
    links.append({"id": lid, "origin_id": src, "origin_slot": src_slot, "target_id": -20, "target_slot": 0,
                  "type": out_type})
    nodes[src]["outputs"][src_slot]["links"].append(lid)
    sg_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "pisa-sr/blueprint/image-upscale"))
    definition = {
        "id": sg_id, "version": 1, "revision": 0, "config": {}, "name": BLUEPRINT,
        "state": {"lastGroupId": 0, "lastNodeId": max(nodes), "lastLinkId": len(links), "lastRerouteId": 0},
        "inputNode": {"id": -10, "bounding": [-200, 0, 140, 40 + 20 * len(BLUEPRINT_INPUTS)]},
        "outputNode": {"id": -20, "bounding": [1600, 80, 120, 60]},
        "inputs": sg_inputs,
        "outputs": [{"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "pisa-sr/out/IMAGE")), "name": out_name,
                     "type": out_type, "linkIds": [lid], "pos": [1620, 100]}],
        "widgets": [], "groups": [], "nodes": list(nodes.values()), "links": links, "extra": {},
        "category": "image/upscaling/PiSA-SR",
        "description": "PiSA-SR one-step x4 super-resolution (SD 2.1-base + PiSA LoRAs): Load PiSA LoRAs, Encode LQ, "
                       "Dual-Guided One-Step Sample and Tiled VAE Decode with the empty prompt inside.",
    }
    widgets = [(name, value) for name, _, _, value in BLUEPRINT_INPUTS if value is not None]
    outer = {"id": 1, "type": sg_id, "pos": [0, 0], "size": [340, 220], "flags": {}, "order": 0, "mode": 0,
             "inputs": [{"name": name, "type": typ, "link": None,
                         **({"widget": {"name": name}} if value is not None else {})}
                        for name, typ, _, value in BLUEPRINT_INPUTS],
             "outputs": [{"name": out_name, "type": out_type, "links": []}], "title": BLUEPRINT,
             "properties": {"proxyWidgets": [["-1", name] for name, _ in widgets]},
             "widgets_values": [value for _, value in widgets]}
    return {"revision": 0, "last_node_id": 1, "last_link_id": 0, "nodes": [outer], "links": [], "version": 0.4,
            "definitions": {"subgraphs": [definition]}, "extra": {}}


def render() -> dict[str, str]:
    files = {}
    for name, nodes in WORKFLOWS.items():
        files[os.path.join(OUT_UI, name + ".json")] = json.dumps(to_ui(nodes, app_extra(name, nodes)), indent=2) + "\n"
        files[os.path.join(OUT_API, name + ".json")] = json.dumps(to_api(nodes), indent=2) + "\n"
    files[os.path.join(OUT_BLUEPRINTS, BLUEPRINT + ".json")] = json.dumps(to_blueprint(), indent=2) + "\n"
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    stale = []
    for path, text in render().items():
        old = open(path).read() if os.path.exists(path) else None
        if old != text:
            stale.append(path)
            if not a.check:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)
    if a.check and stale:
        print("out of date (run python scripts/build_workflows.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
