"""Install the pack with the real ComfyUI-Manager (comfyui-manager 4.3, its command line cm-cli) into a fresh copy of
the host's ComfyUI folder (0.3.75 or 0.30.0), from a git URL of a clone of this repo, then start that ComfyUI and use
the pack.

The URL is http://127.0.0.1:<port>/ComfyUI-PiSA-SR.git: a bare clone of this repo's HEAD served over git's dumb HTTP
protocol by a local web server, the closest real path to the GitHub URL users paste. cm-cli refuses a plain path and
a file:///... URL (it takes any string without a host for a registry id and looks it up). cm-cli needs no security
level for a git URL; ComfyUI 0.3.75 has no --enable-manager (0.30.0's switch for the Manager's web UI), and the
command line needs none on either host. The Manager runs in its own venv (setup_host.sh) that also sees the host venv; the server
runs with that venv's python, so it sees whatever the Manager installed.

What the real Manager cannot reach here, and so stays a static check: the Comfy Registry install path (a zip of the
git-tracked files plus `includes`, fetched from api.comfy.org). That everything the pack needs is git-tracked is
proven by the clone working; the metadata is read by ComfyUI's and the Manager's own readers.
"""
from __future__ import annotations

import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import host
from comfy_server import PACK_NAME, ComfyServer, use_files
from run_example import example_image

CATEGORY = "image/upscaling/PiSA-SR"
CORE_NODES = ["PiSA_LoadLoRAs", "PiSA_EncodeLQ", "PiSA_Sample", "PiSA_Decode"]
WORKFLOWS = sorted(p.stem for p in (host.REPO / "example_workflows").glob("*.json"))
# ComfyUI-Manager never installs these from a pack's requirements.txt (cm_global.pip_blacklist).
MANAGER_SKIPS = {"torch", "torchvision", "torchaudio", "torchsde"}
PYPROJECT = tomllib.loads((host.REPO / "pyproject.toml").read_text())
MANAGER_VENV = Path(os.environ.get("PISA_HOST_PYTHON", sys.executable)).parents[1]
MANAGER_VENV = MANAGER_VENV.with_name(MANAGER_VENV.name + "-manager-4.3")  # built by scripts/setup_host.sh


def git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


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


@pytest.mark.one_host("reads requirements.txt only")
def test_requirements_never_pin_torch():
    # the install lines as ComfyUI-Manager reads them: comments and blank lines dropped
    lines = [ln for raw in (host.REPO / "requirements.txt").read_text().splitlines()
             if (ln := raw.split("#", 1)[0].strip())]
    names = {m.group(0).lower().replace("_", "-") for ln in lines
             if (m := re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", ln))}
    assert not names & MANAGER_SKIPS, lines
    assert not any(line.startswith(("-", "git+", "http")) for line in lines), lines  # plain PyPI names only


# ------------------------------------------------------------------------------------------------ installed by the Manager
@pytest.fixture(scope="module")
def git_url(tmp_path_factory):
    """This repo's HEAD as a bare git repository behind a local web server (git's dumb HTTP protocol)."""
    root = tmp_path_factory.mktemp("git-http")
    bare = root / f"{PACK_NAME}.git"
    git("clone", "--quiet", "--bare", str(host.REPO), str(bare))
    git("update-server-info", cwd=bare)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}/{PACK_NAME}.git"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def installed(tmp_path_factory, git_url, tiny_weights):
    assert (MANAGER_VENV / ".complete").exists(), f"{MANAGER_VENV} is missing: scripts/setup_host.sh builds it"
    comfy = tmp_path_factory.mktemp("fresh") / "ComfyUI"
    shutil.copytree(host.COMFY_DIR, comfy, ignore=shutil.ignore_patterns("user", "__pycache__", PACK_NAME))
    r = subprocess.run([str(MANAGER_VENV / "bin" / "cm-cli"), "install", git_url, "--mode", "local"], cwd=comfy,
                       env=dict(os.environ, COMFYUI_PATH=str(comfy)), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "[INSTALLED]" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    ckpt, lora = tiny_weights
    srv = ComfyServer(comfy_dir=str(comfy), python=str(MANAGER_VENV / "bin" / "python"), base=str(comfy),
                      link_pack=False, models={"checkpoints": [ckpt], "pisa_sr": [lora]})
    srv.tiny = (Path(ckpt).name, Path(lora).name)
    srv.pack = comfy / "custom_nodes" / PACK_NAME
    with srv:
        yield srv
    shutil.rmtree(comfy, ignore_errors=True)


@pytest.mark.slow
def test_manager_installs_and_every_node_registers(installed, git_url):
    # cm-cli cloned the URL into custom_nodes: this repo's HEAD, a real git checkout the Manager can update later
    pack = installed.pack
    assert git("rev-parse", "HEAD", cwd=pack) == git("rev-parse", "HEAD", cwd=host.REPO)
    assert git("remote", "get-url", "origin", cwd=pack) == git_url
    assert not git("status", "--porcelain", cwd=pack), "the Manager's install left changes in the checkout"
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
def test_manager_reads_the_registry_metadata(installed, tmp_path):
    """The Manager's reader of a registry-installed pack (cnr_utils.read_cnr_info, which needs the .tracking file a
    registry install writes) sees the node id, version and repository of pyproject.toml."""
    pack = tmp_path / PACK_NAME
    shutil.copytree(installed.pack, pack, ignore=shutil.ignore_patterns(".git"))
    (pack / ".tracking").write_text("")
    code = ("import json, sys; from comfyui_manager.common import cnr_utils; "
            "print(json.dumps(cnr_utils.read_cnr_info(sys.argv[1])))")
    r = subprocess.run([str(MANAGER_VENV / "bin" / "python"), "-c", code, str(pack)], cwd=installed.comfy_dir,
                       env=dict(os.environ, COMFYUI_PATH=str(installed.comfy_dir), PYTHONPATH=str(installed.comfy_dir)),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cnr = json.loads(r.stdout.strip().splitlines()[-1])
    project = PYPROJECT["project"]
    assert cnr == {"id": project["name"], "original_name": project["name"], "version": project["version"],
                   "url": project["urls"]["Repository"]}, cnr


@pytest.mark.slow
def test_web_extension_and_example_workflows_are_served(installed):
    js = installed.get_bytes(f"/extensions/{PACK_NAME}/pisa_sr.js")
    assert js == (installed.pack / "web" / "pisa_sr.js").read_bytes()
    assert f"/extensions/{PACK_NAME}/pisa_sr.js" in installed.get("/extensions")  # the front end loads this list
    templates = installed.get("/workflow_templates")
    assert sorted(templates.get(PACK_NAME, [])) == sorted(WORKFLOWS)  # not the api/ twins
    for name in WORKFLOWS:
        wf = installed.get_bytes(f"/api/workflow_templates/{PACK_NAME}/{name}.json")
        assert wf == (installed.pack / "example_workflows" / f"{name}.json").read_bytes()
        # the template browser shows <name>.jpg beside each workflow
        thumb = installed.get_bytes(f"/api/workflow_templates/{PACK_NAME}/{name}.jpg")
        assert thumb[:3] == b"\xff\xd8\xff", f"{name}.jpg is not a JPEG"
        assert min(Image.open(io.BytesIO(thumb)).size) >= 200


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("pisa_sr_large_tiled", (160, 128))])  # adjustable: test_browser.py
def test_example_api_twin_runs_on_installed_pack(installed, name, size):
    prompt = json.loads((host.REPO / "example_workflows" / "api" / f"{name}.json").read_text())
    image = example_image(str(installed.base / "input" / f"lq_{size[0]}x{size[1]}.png"), *size)
    use_files(prompt, *installed.tiny, image)
    entry = installed.run(prompt, timeout=1800)
    outs = installed.output_images(entry)
    assert len(outs) == 1 and outs[0].exists()
    assert Image.open(outs[0]).size == (4 * size[0], 4 * size[1])
    # the decoder's UI output: the result and the resized LQ as temp previews of the same size
    dec = next(v for k, v in entry["outputs"].items() if prompt[k]["class_type"] == "PiSA_Decode")
    (result,), (lq,) = dec["images"], dec["pisa_lq"]
    assert result["type"] == lq["type"] == "temp"
    assert {Image.open(installed.base / "temp" / i["subfolder"] / i["filename"]).size
            for i in (result, lq)} == {(4 * size[0], 4 * size[1])}


@pytest.mark.one_host("imports __init__.py as a lone module: no ComfyUI import on that path")
def test_entry_point_tolerates_being_imported_alone():
    """pytest imports the root __init__.py as a lone module when the clone's folder name is not an identifier
    (``ComfyUI-PiSA-SR``): that must not fail, and must not register anything."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lone_entry_point", host.REPO / "__init__.py",
                                                  submodule_search_locations=None)  # a module, as pytest does
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.WEB_DIRECTORY == "./web" and not hasattr(mod, "comfy_entrypoint")
