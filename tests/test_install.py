"""Install the pack like a user and ComfyUI-Manager would, into a fresh ComfyUI base, and use it.

The pack folder is COPIED (not linked) into custom_nodes, its requirements.txt is installed line by line with the host
python the way ComfyUI-Manager does, then a real server starts: every node of the pack is registered with tooltips and
its category, the web extension and the example workflows (with thumbnails) are served, and the adjustable and
large-image examples' API twins run on the tiny model (pisa_sr_basic's twin runs in test_server.py).
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from PIL import Image

import host

sys.path.insert(0, str(host.REPO / "scripts"))
import make_tiny_weights  # noqa: E402
from comfy_server import PACK_NAME, ComfyServer  # noqa: E402
from run_example import example_image  # noqa: E402

CATEGORY = "image/upscaling/PiSA-SR"
CORE_NODES = ["PiSA_LoadLoRAs", "PiSA_EncodeLQ", "PiSA_Sample", "PiSA_Decode"]
WORKFLOWS = sorted(p.stem for p in (host.REPO / "example_workflows").glob("*.json"))
# ComfyUI-Manager never installs these from a pack's requirements.txt (they come with ComfyUI's own install).
MANAGER_SKIPS = {"torch", "torchvision", "torchaudio", "torchsde"}
NOT_SHIPPED = {".git", "tests", "out", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache"}
PYPROJECT = tomllib.loads((host.REPO / "pyproject.toml").read_text())


def requirement_lines(text: str) -> list[str]:
    """The install lines of a requirements.txt, as ComfyUI-Manager reads them (comments and blank lines dropped)."""
    lines = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def requirement_name(line: str) -> str:
    m = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    return m.group(0).lower().replace("_", "-") if m else ""


def ignore_unshipped(folder: str, names: list[str]) -> set[str]:
    ignored = {n for n in names if n in NOT_SHIPPED}
    if os.path.basename(folder) == "bench":
        ignored |= {"out"}
    return ignored


# ------------------------------------------------------------------------------------------------ packaging metadata
def test_pyproject_has_registry_metadata():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    name = project["name"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([._-][A-Za-z0-9]+)*", name) and len(name) < 100, name
    assert "comfyui" not in name.lower()  # the registry's naming rule
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), project["version"]
    assert len(project["description"]) > 20
    assert (host.REPO / project["license"]["file"]).is_file()
    assert project["dependencies"] == []  # nothing beyond ComfyUI's own packages
    assert project["urls"]["Repository"].startswith("https://github.com/")
    for key in ("PublisherId", "DisplayName", "Icon"):
        assert isinstance(comfy[key], str) and comfy[key], key
    assert comfy["Icon"].startswith("https://") and comfy["Icon"].endswith("/web/icon.svg")
    assert (host.REPO / "web" / "icon.svg").is_file()
    assert isinstance(comfy["includes"], list)
    # ComfyUI's own reader of this file (comfy_config) accepts it and sees the same values
    from comfy_config import config_parser

    cfg = config_parser.extract_node_configuration(str(host.REPO))
    assert cfg is not None
    assert cfg.project.name == name and cfg.project.version == project["version"]
    assert cfg.tool_comfy.publisher_id == comfy["PublisherId"] and cfg.tool_comfy.icon == comfy["Icon"]
    assert cfg.project.supported_comfyui_version == comfy["requires-comfyui"]


def test_requirements_never_pin_torch():
    lines = requirement_lines((host.REPO / "requirements.txt").read_text())
    names = {requirement_name(line) for line in lines}
    assert not names & MANAGER_SKIPS, lines
    assert not any(line.startswith(("-", "git+", "http")) for line in lines), lines  # plain PyPI names only


# ------------------------------------------------------------------------------------------------ installed copy
@pytest.fixture(scope="module")
def installed():
    ckpt, lora = make_tiny_weights.make(make_tiny_weights.cache_dir())
    srv = ComfyServer(link_pack=False, models={"checkpoints": [ckpt], "pisa_sr": [lora]})
    srv.tiny = (Path(ckpt).name, Path(lora).name)
    pack = srv.base / "custom_nodes" / PACK_NAME
    shutil.copytree(host.REPO, pack, ignore=ignore_unshipped, symlinks=False)
    # ComfyUI-Manager's install step: `pip install <line>` per requirements.txt line, torch family skipped,
    # then install.py if the pack has one.
    srv.pip_runs = []
    for line in requirement_lines((pack / "requirements.txt").read_text()):
        if requirement_name(line) in MANAGER_SKIPS:
            continue
        r = subprocess.run([srv.python, "-m", "pip", "install", line], capture_output=True, text=True)
        srv.pip_runs.append((line, r.returncode, r.stdout[-2000:] + r.stderr[-2000:]))
    if (pack / "install.py").exists():
        r = subprocess.run([srv.python, "install.py"], cwd=pack, capture_output=True, text=True)
        srv.pip_runs.append(("install.py", r.returncode, r.stdout[-2000:] + r.stderr[-2000:]))
    srv.pack = pack
    with srv:
        yield srv
    srv.cleanup()


@pytest.mark.slow
def test_copy_installs_and_registers_every_node(installed):
    assert all(rc == 0 for _, rc, _ in installed.pip_runs), installed.pip_runs
    assert not installed.pack.is_symlink() and (installed.pack / "__init__.py").is_file()
    assert not (installed.pack / "tests").exists() and not (installed.pack / ".git").exists()
    log = installed.log_path.read_text(errors="replace")
    assert "IMPORT FAILED" not in "\n".join(line for line in log.splitlines() if PACK_NAME in line), log[-3000:]
    info = installed.get("/object_info")
    ours = {k: v for k, v in info.items() if v.get("python_module", "").endswith(PACK_NAME)}
    assert set(CORE_NODES) <= set(ours), sorted(ours)
    for nid, node in ours.items():
        assert node["category"] == CATEGORY, (nid, node["category"])
        assert node.get("description"), f"{nid} has no description"
        inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        assert inputs, nid
        for name, spec in inputs.items():
            assert isinstance(spec, list) and len(spec) > 1 and spec[1].get("tooltip"), f"{nid}.{name} has no tooltip"
    lora = info["PiSA_LoadLoRAs"]["input"]["required"]["lora_name"]
    choices = lora[0] if isinstance(lora[0], list) else lora[1].get("options", [])  # old or "COMBO" form
    assert installed.tiny[1] in choices, lora


@pytest.mark.slow
def test_web_extension_and_example_workflows_are_served(installed):
    js = installed.get_bytes(f"/extensions/{PACK_NAME}/pisa_sr.js")
    assert js == (host.REPO / "web" / "pisa_sr.js").read_bytes()
    assert f"/extensions/{PACK_NAME}/pisa_sr.js" in installed.get("/extensions")  # the front end loads this list
    templates = installed.get("/workflow_templates")
    assert sorted(templates.get(PACK_NAME, [])) == sorted(WORKFLOWS)  # not the api/ twins
    for name in WORKFLOWS:
        wf = installed.get_bytes(f"/api/workflow_templates/{PACK_NAME}/{name}.json")
        assert wf == (host.REPO / "example_workflows" / f"{name}.json").read_bytes()
        # the template browser shows <name>.jpg beside each workflow
        thumb = installed.get_bytes(f"/api/workflow_templates/{PACK_NAME}/{name}.jpg")
        assert thumb[:3] == b"\xff\xd8\xff", f"{name}.jpg is not a JPEG"
        assert min(Image.open(io.BytesIO(thumb)).size) >= 200


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("pisa_sr_adjustable", (128, 128)), ("pisa_sr_large_tiled", (160, 128))])
def test_example_api_twin_runs_on_installed_pack(installed, name, size):
    prompt = json.loads((host.REPO / "example_workflows" / "api" / f"{name}.json").read_text())
    image = example_image(str(installed.base / "input" / f"lq_{size[0]}x{size[1]}.png"), *size)
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = installed.tiny[0]
        elif node["class_type"] == "PiSA_LoadLoRAs":
            node["inputs"]["lora_name"] = installed.tiny[1]
        elif node["class_type"] == "LoadImage":
            node["inputs"]["image"] = os.path.basename(image)
    entry = installed.run(prompt, timeout=1800)
    outs = installed.output_images(entry)
    assert len(outs) == 1 and outs[0].exists()
    assert Image.open(outs[0]).size == (4 * size[0], 4 * size[1])
    # the decoder's UI output: the result and the resized LQ as temp previews of the same size
    dec = next(v for k, v in entry["outputs"].items() if prompt[k]["class_type"] == "PiSA_Decode")
    assert len(dec["images"]) == 1 and len(dec["pisa_lq"]) == 1
    sizes = set()
    for item in (dec["images"][0], dec["pisa_lq"][0]):
        assert item["type"] == "temp"
        path = installed.base / "temp" / item["subfolder"] / item["filename"]
        sizes.add(Image.open(path).size)
    assert sizes == {(4 * size[0], 4 * size[1])}


def test_entry_point_tolerates_being_imported_alone():
    """pytest imports the root __init__.py as a lone module when the clone's folder name is not an identifier
    (``ComfyUI-PiSA-SR``): that must not fail, and must not register anything."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lone_entry_point", host.REPO / "__init__.py",
                                                  submodule_search_locations=None)  # a module, as pytest does
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.WEB_DIRECTORY == "./web" and not hasattr(mod, "comfy_entrypoint")
