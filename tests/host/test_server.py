"""The shipped example workflow through a real ComfyUI server (main.py --cpu), as a user would run it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import host
from comfy_server import ComfyServer, use_files
from run_example import example_image

pytestmark = pytest.mark.slow
NODE_IDS = ["PiSA_LoadLoRAs", "PiSA_EncodeLQ", "PiSA_Sample", "PiSA_Decode"]


@pytest.fixture(scope="module")
def server(tiny_weights):
    ckpt, lora = tiny_weights
    srv = ComfyServer(models={"checkpoints": [ckpt], "pisa_sr": [lora]})
    srv.tiny = (os.path.basename(ckpt), os.path.basename(lora))
    with srv:
        yield srv
    srv.cleanup()


@pytest.mark.one_host("scripts/build_workflows.py writes the files from its own tables; no ComfyUI")
def test_workflow_files_are_generated_and_current():
    r = subprocess.run([sys.executable, str(host.REPO / "scripts" / "build_workflows.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_tiny_weights_built_on_this_host_load_as_sd2(tmp_path):
    """Whichever host builds the weights cache first writes the file every host loads (0.30.0 once wrote the VAE
    unprefixed and dropped the text encoder: Load Checkpoint could not detect it)."""
    import comfy.sd
    import comfy.supported_models
    import make_tiny_weights

    ckpt, _ = make_tiny_weights.make(str(tmp_path))
    model, *_ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)
    assert type(model.model.model_config) is comfy.supported_models.SD20


def test_nodes_registered_with_tooltips(server):
    info = server.get("/object_info")
    for nid in NODE_IDS:
        assert nid in info, f"{nid} missing from /object_info"
        node = info[nid]
        assert node["category"] == "image/upscaling/PiSA-SR"
        for name, spec in {**node["input"]["required"], **node["input"].get("optional", {})}.items():
            assert isinstance(spec, list) and len(spec) > 1 and spec[1].get("tooltip"), f"{nid}.{name} has no tooltip"
    spec = info["PiSA_LoadLoRAs"]["input"]["required"]["lora_name"]
    options = spec[1].get("options") if spec[0] == "COMBO" else spec[0]  # V3 combos: ["COMBO", {"options": [...]}]
    assert server.tiny[1] in options


def test_every_node_has_a_help_page_the_server_serves(server):
    """The node library's help panel fetches /extensions/<pack folder>/docs/<NODE_ID>.md (front end 1.58.1,
    NodeHelpService.fetchCustomNodeHelp) and resolves relative links against that folder: each page is served as
    text (an HTML answer counts as missing there), describes every input and output of its node, and each link
    leads somewhere that exists."""
    import re
    import tomllib
    import urllib.request
    from comfy_server import PACK_NAME

    repo_url = tomllib.loads((host.REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    info = server.get("/object_info")
    ours = {nid: n for nid, n in info.items() if n.get("python_module") == f"custom_nodes.{PACK_NAME}"}
    assert len(ours) == 10, sorted(ours)
    pages = {p.stem for p in (host.REPO / "web" / "docs").glob("*.md")}
    assert pages == set(ours), f"pages without a node: {pages - set(ours)}; nodes without a page: {set(ours) - pages}"
    base = f"/extensions/{PACK_NAME}/docs/"
    examples = {p.stem for p in (host.REPO / "example_workflows").glob("*.json")}
    for nid, node in ours.items():
        with urllib.request.urlopen(server.url + base + nid + ".md", timeout=30) as r:
            assert "text/html" not in r.headers.get("Content-Type", ""), nid
            text = r.read().decode()
        assert text.startswith(f"# {node['display_name']}\n"), nid
        names = [*node["input"]["required"], *node["input"].get("optional", {}), *node["output_name"]]
        missing = [n for n in names if f"**{n}**" not in text]
        assert not missing, f"{nid}.md does not describe {missing}"
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith("https://"):
                if target.startswith(repo_url + "/"):
                    path = target[len(repo_url) + 1:].split("/", 2)[2]  # blob|tree/main/<path>
                    assert (host.REPO / path).exists(), f"{nid}.md links to {target}: no {path} in the pack"
                continue
            assert "://" not in target and not target.startswith("/"), f"{nid}.md: {target} would not resolve"
            with urllib.request.urlopen(server.url + base + target, timeout=30) as r:
                kind = r.headers.get("Content-Type", "")
                assert r.status == 200 and not kind.startswith("text/html"), (nid, target, kind)
                if target.endswith(".svg"):
                    assert kind.startswith("image/svg+xml"), (target, kind)  # else <img> shows nothing
        for name in re.findall(r"`(pisa_sr_[a-z_]+)`", text):
            assert name in examples, f"{nid}.md names the example {name}, which does not exist"


def test_sweep_workflow_runs_on_real_server(server):
    """The sweep example as shipped, but 2 settings instead of 3x3 (every full-size VAE decode costs seconds on a
    CPU): settings -> labelled grid from the sweep's own decodes, the chosen setting decoded alone, and the report."""
    prompt = json.loads((host.REPO / "example_workflows" / "api" / "pisa_sr_lambda_sweep.json").read_text())
    ids = {node["_meta"]["title"]: nid for nid, node in prompt.items()}
    (sweep,) = [n for n in prompt.values() if n["class_type"] == "PiSA_LambdaSweep"]
    assert sweep["inputs"]["settings"] == "pix=0.5:1.5:0.5 sem=0.5:1.5:0.5"  # the shipped 3x3
    sweep["inputs"]["settings"] = "pix=0.5:1.5:1 sem=1"
    (grid_node,) = [n for n in prompt.values() if n["class_type"] == "PiSA_LabelledGrid"]
    grid_node["inputs"]["columns"] = 2
    assert not [n for n in prompt.values() if n["class_type"] == "PiSA_Decode" and n["inputs"]["latent"][1] == 0]
    image = example_image(str(server.base / "input" / "pisa_sr_example.png"), 96, 80)
    entry = server.run(use_files(prompt, *server.tiny, image))
    by_node = {nid: server.output_images({"outputs": {nid: out}}) for nid, out in entry["outputs"].items()}
    (grid,) = by_node[ids["Save grid"]]
    (best,) = by_node[ids["Save best"]]
    assert Image.open(best).size == (96 * 4, 80 * 4)
    pad = 4  # the grid's gap between and around tiles
    assert Image.open(grid).size == (2 * 96 * 4 + 3 * pad, 80 * 4 + 2 * pad)
    report = " ".join(entry["outputs"][ids["Sweep report"]]["text"])
    assert "2 setting(s)" in report and "choose_best: sharpness" in report and "chosen: pix " in report, report


def test_replaced_lora_file_reruns_the_loader_through_the_executor(server, tiny_weights):
    """Load PiSA LoRAs' fingerprint is the file's content: ComfyUI's output cache keeps the node while the file is
    unchanged and re-runs it when the file was replaced by one of the same size and mtime."""
    import torch
    from pisa_sr.checkpoint import parse_release_dict
    from pisa_sr.convert import safetensors_bytes

    release = torch.load(tiny_weights[1], weights_only=True)

    def flip(v):  # every weight negated: same layout and byte size, other content
        if isinstance(v, dict):
            return {k: flip(x) for k, x in v.items()}
        return -v if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    flipped = flip(release)
    first, second = (safetensors_bytes(parse_release_dict(d)) for d in (release, flipped))
    assert len(first) == len(second) and first != second
    path = server.base / "models" / "pisa_sr" / "replaced_pisa.safetensors"
    path.write_bytes(first)
    stamp = path.stat()
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server.tiny[0]}},
              "2": {"class_type": "PiSA_LoadLoRAs", "inputs": {"model": ["1", 0], "lora_name": path.name}},
              "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}

    def loader_was_cached() -> bool:
        entry = server.run(prompt)
        cached = [m[1]["nodes"] for m in entry["status"]["messages"] if m[0] == "execution_cached"]
        return "2" in sum(cached, [])

    loader_was_cached()
    assert loader_was_cached()  # same file: the executor keeps the loader's output
    path.write_bytes(second)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert path.stat().st_size == stamp.st_size and path.stat().st_mtime_ns == stamp.st_mtime_ns
    assert not loader_was_cached()  # same name, size and mtime, new content: re-run
    assert loader_was_cached()


def test_example_workflow_runs_on_real_server(server):
    prompt = json.loads((host.REPO / "example_workflows" / "api" / "pisa_sr_basic.json").read_text())
    image = example_image(str(server.base / "input" / "pisa_sr_example.png"), 96, 80)
    entry = server.run(use_files(prompt, *server.tiny, image))
    outs = server.output_images(entry)
    assert len(outs) == 1 and outs[0].exists()
    # 96x80 at x4: short side 80 < 128, so the release pre-resizes to 153x128, works at 612x512 -> 608x512,
    # and resizes the result back to exactly 4x the input.
    assert Image.open(outs[0]).size == (96 * 4, 80 * 4)
    pid = server.pid
    server.stop()
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/status").read().find("zombie") >= 0
