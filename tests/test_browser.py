"""The real ComfyUI front end (comfyui-frontend-package 1.32.9) in headless Chromium, with this pack and tiny weights.

Loads each example workflow as a user would, checks the web extension (fidelity/perception pad on the sampler,
before/after slider on the decoder) by simulated pointer input on the canvas, queues each workflow and checks its
output. Needs Debian's chromium (/usr/bin/chromium) and pip's playwright in the host venv (.ci/run installs both).
Screenshots go to the pytest tmp dir; the main ones are also copied to docs/screenshots/ for the README.
"""
from __future__ import annotations

import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import host

sys.path.insert(0, str(host.REPO / "scripts"))
import make_tiny_weights  # noqa: E402
from comfy_server import ComfyServer  # noqa: E402
from run_example import example_image  # noqa: E402

from playwright.sync_api import sync_playwright  # noqa: E402  (installed by .ci/run)

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
# Every shipped example workflow must load cleanly; these three are also queued from the browser (the pad and the
# before/after slider are theirs).
# The distributed examples need ComfyUI-Distributed's nodes, which this server does not have (tests/test_distributed.py)
ALL_WORKFLOWS = sorted(p.stem for p in (host.REPO / "example_workflows").glob("*.json") if "distributed" not in p.stem)
WORKFLOWS = ["pisa_sr_basic", "pisa_sr_adjustable", "pisa_sr_large_tiled"]
# Input image per workflow: (width, height). The large one is tiled by the sampler: at x4 it works at 640x512 px,
# a latent of 80x64 > 64^2 (its tile_size), so the tile path runs.
INPUTS = {"pisa_sr_basic": (128, 128), "pisa_sr_adjustable": (128, 128), "pisa_sr_large_tiled": (160, 128)}
DEFAULT_INPUT = (128, 128)
EXT_NAME = "comfyui-pisa-sr.ui"
PAD, COMPARE = "pisa_sr_pad", "pisa_sr_compare"
DOCS_SHOTS = host.REPO / "docs" / "screenshots"
PROMPT_TIMEOUT_S = 1200  # the tiny model on a loaded 2-core CPU: 40-160 s per 512 px prompt, more when busy


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def server():
    ckpt, lora = make_tiny_weights.make(make_tiny_weights.cache_dir())
    srv = ComfyServer(models={"checkpoints": [ckpt], "pisa_sr": [lora]})
    srv.tiny = {"ckpt": Path(ckpt).name, "lora": Path(lora).name}
    srv.images = {}
    for wf in ALL_WORKFLOWS:
        w, h = INPUTS.get(wf, DEFAULT_INPUT)
        name = f"lq_{w}x{h}.png"
        if not (srv.base / "input" / name).exists():
            example_image(str(srv.base / "input" / name), w, h)
        srv.images[wf] = name
    # no first-run dialogs, no minimap over the graph in the screenshots
    (srv.base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(
        {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}))
    with srv:
        yield srv
    srv.cleanup()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = tmp_path_factory.mktemp("screenshots")
    print(f"\nscreenshots: {d}")
    return d


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


def open_front_end(browser, server, block_extension: bool = False):
    """A fresh browser context on the server's front end, with test probes installed through the public API."""
    ctx = browser.new_context(viewport={"width": 1600, "height": 900})
    pg = ctx.new_page()
    pg.console_lines, pg.blocked = [], []
    pg.on("console", lambda m: pg.console_lines.append(f"{m.type}: {m.text}"))
    pg.on("pageerror", lambda e: pg.console_lines.append(f"pageerror: {e}"))
    if block_extension:
        pg.route("**/extensions/ComfyUI-PiSA-SR/pisa_sr.js",
                 lambda route: (pg.blocked.append(route.request.url), route.abort()))
    pg.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
    pg.goto(server.url, timeout=300_000)
    pg.wait_for_function("() => window.app && window.app.graph && window.app.canvas && window.LiteGraph",
                         timeout=300_000)
    # what loadGraphData reports missing, and the execution events
    pg.evaluate("""async () => {
        const { api } = await import('/scripts/api.js');
        window.__t = { missing: null, events: [] };
        app.registerExtension({ name: 'pisa-sr.test-probe',
            afterConfigureGraph(missing) { window.__t.missing = (missing || []).map(m => m.type ?? m); } });
        for (const ev of ['executed', 'execution_error', 'execution_success', 'execution_interrupted'])
            api.addEventListener(ev, (e) => window.__t.events.push({ type: ev, detail: e.detail }));
    }""")
    return pg


@pytest.fixture(scope="module")
def page(browser, server):
    pg = open_front_end(browser, server)
    yield pg
    pg.context.close()


# ------------------------------------------------------------------------------------------------ helpers
def workflow_for_server(server, name: str) -> dict:
    """The shipped UI workflow with the tiny model files and the test input image selected."""
    data = json.loads((host.REPO / "example_workflows" / f"{name}.json").read_text())
    for n in data["nodes"]:
        if n["type"] == "CheckpointLoaderSimple":
            n["widgets_values"][0] = server.tiny["ckpt"]
        elif n["type"] == "PiSA_LoadLoRAs":
            n["widgets_values"][0] = server.tiny["lora"]
        elif n["type"] == "LoadImage":
            n["widgets_values"][0] = server.images[name]
    return data


def api_twin_for_server(server, name: str) -> dict:
    prompt = json.loads((host.REPO / "example_workflows" / "api" / f"{name}.json").read_text())
    for n in prompt.values():
        ins = n["inputs"]
        if n["class_type"] == "CheckpointLoaderSimple":
            ins["ckpt_name"] = server.tiny["ckpt"]
        elif n["class_type"] == "PiSA_LoadLoRAs":
            ins["lora_name"] = server.tiny["lora"]
        elif n["class_type"] == "LoadImage":
            ins["image"] = server.images[name]
    return prompt


def load_workflow(page, data: dict, name: str) -> None:
    page.evaluate("() => { window.__t.missing = null; }")
    page.evaluate("async ([d, name]) => { await app.loadGraphData(d, true, true, name); }", [data, name])
    page.wait_for_function("() => window.__t.missing !== null", timeout=60_000)
    page.wait_for_timeout(500)


def node_id(page, type_: str) -> int:
    return page.evaluate("(t) => app.graph.nodes.find(n => n.type === t).id", type_)


def focus(page, nid: int, scale: float, at=(300, 130)) -> None:
    """Zoom the canvas and put node ``nid``'s top-left corner at canvas pixel ``at``."""
    page.evaluate("""([id, s, ax, ay]) => {
        const n = app.graph.getNodeById(id), ds = app.canvas.ds;
        ds.scale = s; ds.offset[0] = ax / s - n.pos[0]; ds.offset[1] = ay / s - n.pos[1];
        app.canvas.setDirty(true, true); app.canvas.draw(true, true);
    }""", [nid, scale, at[0], at[1]])
    page.wait_for_timeout(300)


def fit_all(page) -> None:
    """Show the whole graph in the part of the canvas not covered by the side bar and the top bar."""
    page.evaluate("""() => {
        let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
        for (const n of app.graph.nodes) {
            x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 36);
            x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
        }
        const r = app.canvas.canvas.getBoundingClientRect(), ds = app.canvas.ds;
        const ux = 70, uy = 130, uw = r.width - ux - 20, uh = r.height - uy - 20;
        const s = Math.min(uw / (x1 - x0), uh / (y1 - y0), 1.2);
        ds.scale = s;
        ds.offset[0] = (ux + (uw - s * (x1 - x0)) / 2) / s - x0;
        ds.offset[1] = uy / s - y0;
        app.canvas.deselectAll?.();
        app.canvas.setDirty(true, true);
    }""")
    page.wait_for_timeout(300)


def geometry(page, nid: int, widget: str) -> dict:
    """The node position, a widget's last-drawn rectangles (node coordinates) and the canvas transform."""
    return page.evaluate("""([id, name]) => {
        const n = app.graph.getNodeById(id), w = n.widgets.find(w => w.name === name);
        const r = app.canvas.canvas.getBoundingClientRect(), ds = app.canvas.ds;
        return { pos: [...n.pos], box: w.box ?? null, rect: w.rect ?? null, resetBox: w.resetBox ?? null,
                 offset: [...ds.offset], scale: ds.scale, left: r.left, top: r.top };
    }""", [nid, widget])


def to_screen(g: dict, x: float, y: float) -> tuple[float, float]:
    """Node coordinates -> page pixels: (pos + xy + offset) * scale, plus the canvas element's position."""
    return (g["left"] + (g["pos"][0] + x + g["offset"][0]) * g["scale"],
            g["top"] + (g["pos"][1] + y + g["offset"][1]) * g["scale"])


def lambdas(page, nid: int) -> dict:
    return page.evaluate("""(id) => { const n = app.graph.getNodeById(id);
        const get = (k) => n.widgets.find(w => w.name === k);
        return { pix: get('lambda_pix').value, sem: get('lambda_sem').value,
                 pix_range: [get('lambda_pix').options.min, get('lambda_pix').options.max],
                 sem_range: [get('lambda_sem').options.min, get('lambda_sem').options.max] }; }""", nid)


def pad_point(g: dict, lam: dict, pix: float, sem: float) -> tuple[float, float]:
    """Where (pix, sem) lies on the pad: x = lambda_sem left to right, y = lambda_pix bottom to top."""
    b = g["box"]
    (slo, shi), (plo, phi) = lam["sem_range"], lam["pix_range"]
    x = b["x0"] + (sem - slo) / (shi - slo) * (b["x1"] - b["x0"])
    y = b["y1"] - (pix - plo) / (phi - plo) * (b["y1"] - b["y0"])
    return to_screen(g, x, y)


def drag(page, start, end, steps: int = 8) -> None:
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=steps)
    page.mouse.up()
    page.wait_for_timeout(200)


def screenshot(page, path: Path, clip: dict | None = None) -> Image.Image:
    page.evaluate("() => app.canvas.draw(true, true)")
    png = page.screenshot(path=str(path), clip=clip)
    return Image.open(io.BytesIO(png)).convert("RGB")


def mean_abs_diff(a: Image.Image, b: Image.Image, frac_box: tuple[float, float, float, float]) -> float:
    """Mean absolute 8-bit difference of two same-size screenshots inside a box given in fractions of the size."""
    box = tuple(int(f * (a.width if i % 2 == 0 else a.height)) for i, f in enumerate(frac_box))
    x = np.asarray(a.crop(box), dtype=np.float32)
    y = np.asarray(b.crop(box), dtype=np.float32)
    return float(np.abs(x - y).mean())


def to_docs(path: Path) -> None:
    DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, DOCS_SHOTS / path.name)


def visible_dialogs(page) -> list[str]:
    return page.evaluate("""() => [...document.querySelectorAll('.p-dialog')]
        .filter(d => d.offsetParent !== null).map(d => d.innerText.slice(0, 300))""")


def error_toasts(page) -> list[str]:
    return page.evaluate("""() => [...document.querySelectorAll('.p-toast-message-error, .p-toast-message-warn')]
        .map(t => t.innerText.slice(0, 300))""")


def widget_problems(page) -> list[str]:
    """Widgets whose value the front end would not accept: numbers out of range, combo values not offered."""
    return page.evaluate("""() => {
        const bad = [];
        for (const n of app.graph.nodes) for (const w of n.widgets ?? []) {
            if (w.type === 'number') {
                const v = w.value, o = w.options ?? {};
                if (typeof v !== 'number' || !Number.isFinite(v) || (o.min != null && v < o.min) ||
                    (o.max != null && v > o.max)) bad.push(`${n.type}.${w.name}=${v}`);
            } else if (w.type === 'combo') {
                const vals = typeof w.options?.values === 'function' ? w.options.values() : w.options?.values;
                if (Array.isArray(vals) && !vals.includes(w.value)) bad.push(`${n.type}.${w.name}=${w.value}`);
            }
        }
        return bad;
    }""")


def pisa_console_problems(page) -> list[str]:
    """Warnings of the extension (it logs '[PiSA-SR] ...' instead of throwing) and errors raised in its file."""
    return [line for line in page.console_lines if "[PiSA-SR]" in line or "pisa_sr.js" in line]


# ------------------------------------------------------------------------------------------------ tests
def test_extension_is_served_and_registered(server, page):
    js = server.get_bytes("/extensions/ComfyUI-PiSA-SR/pisa_sr.js").decode()
    assert "registerExtension" in js
    names = page.evaluate("() => app.extensions.map(e => e.name)")
    assert EXT_NAME in names
    assert not pisa_console_problems(page), pisa_console_problems(page)


@pytest.mark.parametrize("name", ALL_WORKFLOWS)
def test_workflow_loads_cleanly(server, page, shots, name):
    load_workflow(page, workflow_for_server(server, name), name)
    assert page.evaluate("() => window.__t.missing") == []
    assert visible_dialogs(page) == []
    assert error_toasts(page) == []
    assert widget_problems(page) == []
    # The UI workflow converts to the same prompt as its API twin (every twin input, same value).
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    twin = api_twin_for_server(server, name)
    assert set(prompt) == set(twin), (sorted(prompt), sorted(twin))
    for nid, node in twin.items():
        assert prompt[nid]["class_type"] == node["class_type"]
        for k, v in node["inputs"].items():
            assert prompt[nid]["inputs"].get(k) == v, (name, nid, k, prompt[nid]["inputs"].get(k), v)
    # Every sampler carries the pad.
    pads = page.evaluate("""() => app.graph.nodes.filter(n => n.type === 'PiSA_Sample')
        .map(n => n.widgets.some(w => w.name === 'pisa_sr_pad'))""")
    assert all(pads) and (pads or name not in WORKFLOWS), pads
    fit_all(page)
    screenshot(page, shots / f"{name}_loaded.png")
    assert not pisa_console_problems(page), pisa_console_problems(page)


def test_pad_sets_lambdas_by_pointer(server, page, shots):
    load_workflow(page, workflow_for_server(server, "pisa_sr_adjustable"), "pisa_sr_adjustable")
    sid = node_id(page, "PiSA_Sample")
    focus(page, sid, 1.5)
    lam = lambdas(page, sid)
    assert (lam["pix"], lam["sem"]) == (0.8, 1.5)
    g = geometry(page, sid, PAD)
    assert g["box"] is not None, "the pad was never drawn"
    shot0 = screenshot(page, shots / "pad_before.png")

    # 1. drag the dot to (pix 1.5, sem 0.5)
    drag(page, pad_point(g, lam, 0.8, 1.5), pad_point(g, lam, 1.5, 0.5))
    got = lambdas(page, sid)
    assert (got["pix"], got["sem"]) == (1.5, 0.5)

    # 2. values snap to 0.05: aim between grid steps
    drag(page, pad_point(g, lam, 1.5, 0.5), pad_point(g, lam, 0.62, 2.23))
    got = lambdas(page, sid)
    assert (got["pix"], got["sem"]) == (0.6, 2.25)

    # 3. dragging past the pad's corner clamps to the widgets' min/max
    b = g["box"]
    corner = to_screen(g, b["x1"] + 40, b["y1"] + 30)
    drag(page, pad_point(g, lam, 0.6, 2.25), corner)
    got = lambdas(page, sid)
    assert (got["pix"], got["sem"]) == (lam["pix_range"][0], lam["sem_range"][1])

    # 4. the "default" button restores the release default (1, 1)
    r = g["resetBox"]
    page.mouse.click(*to_screen(g, (r["x0"] + r["x1"]) / 2, (r["y0"] + r["y1"]) / 2))
    page.wait_for_timeout(200)
    got = lambdas(page, sid)
    assert (got["pix"], got["sem"]) == (1.0, 1.0)

    # 5. editing the number widgets moves the dot: set them as a user would (canvas prompt dialog), then look
    #    for the dot's colour where the new values lie on the pad.
    for wname, value in (("lambda_pix", "0.4"), ("lambda_sem", "2.5")):
        wy = page.evaluate("([id, k]) => app.graph.getNodeById(id).widgets.find(w => w.name === k).y", [sid, wname])
        page.mouse.click(*to_screen(g, 170, wy + 10))
        dialog_input = page.locator(".graphdialog input.value").first
        dialog_input.wait_for(timeout=10_000)
        dialog_input.fill(value)
        dialog_input.press("Enter")
        page.wait_for_timeout(300)
    got = lambdas(page, sid)
    assert (got["pix"], got["sem"]) == (0.4, 2.5)
    img = screenshot(page, shots / "pad_after_widget_edit.png")
    x, y = pad_point(g, lam, 0.4, 2.5)
    px = img.getpixel((round(x), round(y)))
    assert px[0] > 200 and 140 < px[1] < 215 and px[2] < 120, f"no pad dot at ({x:.0f},{y:.0f}): {px}"
    ox, oy = pad_point(g, lam, 0.8, 1.5)  # where the dot was at the start
    assert shot0.getpixel((round(ox), round(oy)))[0] > 200
    assert img.getpixel((round(ox), round(oy)))[0] < 200

    # the UI's prompt carries the values the pad set
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert prompt[str(sid)]["inputs"]["lambda_pix"] == 0.4 and prompt[str(sid)]["inputs"]["lambda_sem"] == 2.5
    # and the pad is not a prompt input or a saved widget value
    assert PAD not in prompt[str(sid)]["inputs"]
    saved = page.evaluate("(id) => app.graph.serialize().nodes.find(n => n.id === id).widgets_values", sid)
    assert saved[:4] == [0.4, 2.5, 96, 32] and None not in saved, saved

    # a README-sized crop of the pad
    drag(page, pad_point(g, lam, 0.4, 2.5), pad_point(g, lam, 0.8, 1.5))
    nx, ny = to_screen(g, -10, -40)
    w_px = (page.evaluate("(id) => app.graph.getNodeById(id).size[0]", sid) + 20) * g["scale"]
    h_px = (page.evaluate("(id) => app.graph.getNodeById(id).size[1]", sid) + 50) * g["scale"]
    screenshot(page, shots / "pisa_sr_pad.png", clip={"x": nx, "y": ny, "width": w_px, "height": h_px})
    to_docs(shots / "pisa_sr_pad.png")
    assert not pisa_console_problems(page), pisa_console_problems(page)


def wait_for_prompt(page, timeout_s: float) -> dict:
    """Wait for execution_success (or fail on error); returns {node id: executed output}."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        events = page.evaluate("() => window.__t.events.map(e => ({ type: e.type, detail: e.detail }))")
        for ev in events:
            if ev["type"] in ("execution_error", "execution_interrupted"):
                raise AssertionError(f"{ev['type']}: {json.dumps(ev['detail'])[:3000]}")
        if any(ev["type"] == "execution_success" for ev in events):
            return {str(ev["detail"]["node"]): ev["detail"]["output"] for ev in events if ev["type"] == "executed"}
        page.wait_for_timeout(1000)
    raise TimeoutError(f"the prompt did not finish in {timeout_s}s")


@pytest.mark.parametrize("name", WORKFLOWS)
def test_queue_from_browser_and_compare_slider(server, page, shots, name):
    load_workflow(page, workflow_for_server(server, name), name)
    sid, did = node_id(page, "PiSA_Sample"), node_id(page, "PiSA_Decode")
    save_id = node_id(page, "SaveImage")
    if name == "pisa_sr_adjustable":
        # the workflow's own setting, dialled in on the pad from the release default
        focus(page, sid, 1.4)
        g, lam = geometry(page, sid, PAD), lambdas(page, sid)
        r = g["resetBox"]
        page.mouse.click(*to_screen(g, (r["x0"] + r["x1"]) / 2, (r["y0"] + r["y1"]) / 2))
        assert (lambdas(page, sid)["pix"], lambdas(page, sid)["sem"]) == (1.0, 1.0)
        drag(page, pad_point(g, lam, 1.0, 1.0), pad_point(g, lam, 0.8, 1.5))
        got = lambdas(page, sid)
        assert (got["pix"], got["sem"]) == (0.8, 1.5)

    page.evaluate("() => { window.__t.events = []; }")
    page.evaluate("() => { app.queuePrompt(0); }")
    outputs = wait_for_prompt(page, PROMPT_TIMEOUT_S)
    assert page.evaluate("() => app.lastNodeErrors") in (None, {})

    # the saved output image exists, at x4 the input size
    saved = outputs[str(save_id)]["images"]
    assert len(saved) == 1 and saved[0]["type"] == "output"
    out_path = server.base / "output" / saved[0]["subfolder"] / saved[0]["filename"]
    assert out_path.exists()
    w, h = INPUTS[name]
    assert Image.open(out_path).size == (4 * w, 4 * h)
    # the decoder sent the result and the resized LQ previews; the extension drew them as one before/after widget
    dec = outputs[str(did)]
    assert len(dec["images"]) == 1 and len(dec["pisa_lq"]) == 1
    page.wait_for_function("(id) => { const w = app.graph.getNodeById(id).widgets.find(w => w.name === 'pisa_sr_compare');"
                           " return w && w.ready && w.rect; }", arg=did, timeout=60_000)
    state = page.evaluate("""(id) => { const n = app.graph.getNodeById(id), w = n.widgets.find(w => w.name === 'pisa_sr_compare');
        return { split: w.split, after: w.after.map(i => [i.naturalWidth, i.naturalHeight, i.src]),
                 before: w.before.map(i => [i.naturalWidth, i.naturalHeight, i.src]),
                 widgets: n.widgets.map(w => w.name) }; }""", did)
    assert state["after"][0][:2] == [4 * w, 4 * h] and state["before"][0][:2] == [4 * w, 4 * h]
    assert dec["pisa_lq"][0]["filename"] in state["before"][0][2]
    assert dec["images"][0]["filename"] in state["after"][0][2]
    assert "$$canvas-image-preview" not in state["widgets"]  # one preview, not two

    # drag the slider: the split follows the pointer and the pixels between the old and new split change
    fit_all(page)
    page.wait_for_function("(id) => { const i = app.graph.getNodeById(id).imgs ?? [];"
                           " return i.length === 1 && i[0].complete && i[0].naturalWidth > 0; }",
                           arg=save_id, timeout=60_000)  # the Save Image node's own preview, for the screenshot
    screenshot(page, shots / f"{name}_done.png")
    focus(page, did, 1.3)
    g = geometry(page, did, COMPARE)
    r = g["rect"]
    x0, y0 = to_screen(g, r["x"], r["y"])
    x1, y1 = to_screen(g, r["x"] + r["w"], r["y"] + r["h"])
    clip = {"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0}
    before = screenshot(page, shots / f"{name}_compare_mid.png", clip=clip)
    mid_y = r["y"] + r["h"] * 0.75
    drag(page, to_screen(g, r["x"] + r["w"] * state["split"], mid_y), to_screen(g, r["x"] + r["w"] * 0.15, mid_y))
    split = page.evaluate("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'pisa_sr_compare').split", did)
    assert abs(split - 0.15) < 0.02, split
    after = screenshot(page, shots / f"{name}_compare_left.png", clip=clip)
    # between the old and the new split the LQ gave way to the result; right of the old split nothing changed
    diff = mean_abs_diff(before, after, (0.22, 0.3, 0.45, 0.9))
    assert diff > 8, f"the slider moved but the picture did not change (mean abs diff {diff:.1f})"
    same = mean_abs_diff(before, after, (0.6, 0.3, 0.95, 0.9))
    assert same < 2, f"the result side changed when only the split moved ({same:.1f})"
    # README shots: the whole node with the slider, and the whole graph after the run
    drag(page, to_screen(g, r["x"] + r["w"] * 0.15, mid_y), to_screen(g, r["x"] + r["w"] * 0.5, mid_y))
    nx, ny = to_screen(g, -10, -40)
    size = page.evaluate("(id) => app.graph.getNodeById(id).size", did)
    screenshot(page, shots / f"{name}_compare.png",
               clip={"x": nx, "y": ny, "width": (size[0] + 20) * g["scale"], "height": (size[1] + 50) * g["scale"]})
    if name == "pisa_sr_adjustable":
        shutil.copy(shots / f"{name}_compare.png", shots / "pisa_sr_compare.png")
        to_docs(shots / "pisa_sr_compare.png")
        to_docs(shots / f"{name}_done.png")
    assert not pisa_console_problems(page), pisa_console_problems(page)


def test_graph_works_without_the_extension(server, browser, shots):
    """With pisa_sr.js blocked the workflows still load and run, and the decoder shows the front end's own preview.
    Runs the workflow queued last with another color_fix: only the decoder (and the save) run again."""
    name = WORKFLOWS[-1]
    pg = open_front_end(browser, server, block_extension=True)
    try:
        assert pg.blocked, "the extension was not requested"
        assert EXT_NAME not in pg.evaluate("() => app.extensions.map(e => e.name)")
        load_workflow(pg, workflow_for_server(server, name), name)
        assert pg.evaluate("() => window.__t.missing") == []
        assert widget_problems(pg) == []
        did = node_id(pg, "PiSA_Decode")
        assert not pg.evaluate("() => app.graph.nodes.some(n => (n.widgets ?? []).some(w => w.name.startsWith('pisa_sr_')))")
        prompt = pg.evaluate("async () => (await app.graphToPrompt()).output")
        for nid, node in api_twin_for_server(server, name).items():
            for k, v in node["inputs"].items():
                assert prompt[nid]["inputs"].get(k) == v
        fit_all(pg)
        pg.evaluate("""(id) => { const w = app.graph.getNodeById(id).widgets.find(w => w.name === 'color_fix');
            w.value = 'none'; }""", did)
        pg.evaluate("() => { app.queuePrompt(0); }")
        outputs = wait_for_prompt(pg, PROMPT_TIMEOUT_S)
        assert outputs[str(did)]["images"]
        # the front end's ordinary preview shows the result on the decoder
        pg.wait_for_function("(id) => (app.graph.getNodeById(id).imgs ?? []).length === 1", arg=did, timeout=60_000)
        screenshot(pg, shots / "without_extension.png")
    finally:
        pg.context.close()
