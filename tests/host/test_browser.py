"""The real ComfyUI front end in headless Chromium, with this pack and tiny weights, over a matrix: the front end the
host pins (comfyui-frontend-package in the host venv: 1.32.9 on ComfyUI 0.3.75, 1.47.12 on 0.30.0) and the newest on
PyPI (1.58.1, cached by scripts/setup_host.sh), each with the classic canvas renderer and with the Vue-nodes renderer
(setting Comfy.VueNodes.Enabled).

Loads each example workflow as a user would, drives the web extension (fidelity/perception pad on the sampler,
before/after slider on the decoder) with pointer events at screen coordinates, reads back the widget values (and, with
Vue nodes, the numbers the node shows) and the prompt the front end queues, queues the adjustable workflow and checks
its output; on the newest front end also opens the basic example as an app (App mode) and runs it there. One server
per front end; a queued prompt is the same in both renderers, so the second one is answered from the server's cache.
Needs Debian's chromium (/usr/bin/chromium) and pip's playwright in the host venv. Screenshots go to the pytest tmp
dir; those of 1.58.1 with Vue nodes on the first host are also copied to docs/screenshots/ (README), but for the App
mode one, which comes from the host that serves /api/jobs (0.30.0).
"""
from __future__ import annotations

import importlib.metadata
import io
import json
import os
import shutil
import sys
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import host

sys.path.insert(0, str(host.REPO / "scripts"))
import make_tiny_weights  # noqa: E402
from comfy_server import ComfyServer  # noqa: E402
from run_example import example_image  # noqa: E402

from playwright.sync_api import sync_playwright  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
# the host venv's front end (what the host's requirements.txt pins); the newest on PyPI (setup_host.sh caches it)
PINNED, NEWEST = importlib.metadata.version("comfyui-frontend-package"), "1.58.1"
VUE_IGNORES_HIDE_OUTPUT_IMAGES = {"1.32.9"}  # read in the bundles: 1.47.12's and 1.58.1's Vue preview checks it
MATRIX = [f"{fe}-{mode}" for fe in (PINNED, NEWEST) for mode in ("classic", "vue")]
# Every shipped example workflow must load cleanly; the adjustable one is also queued from the browser (the pad and
# the before/after slider are its subject). The others run through the API in test_server.py and test_install.py.
# The distributed examples need ComfyUI-Distributed's nodes, which this server does not have (tests/host/test_distributed.py).
ALL_WORKFLOWS = sorted(p.stem for p in (host.REPO / "example_workflows").glob("*.json") if "distributed" not in p.stem)
QUEUED = "pisa_sr_adjustable"
INPUT = (64, 64)  # the queued input: a 256 px result keeps each run short on a 2-core CPU
EXT_NAME = "comfyui-pisa-sr.ui"
PAD, COMPARE = "pisa_sr_pad", "pisa_sr_compare"
DOCS_SHOTS = host.REPO / "docs" / "screenshots"
PROMPT_TIMEOUT_S = 1200  # hang guard only: an honest run takes 20-250 s on a loaded 2-core CPU
# Without the extension the queued prompt and the decoder's preview are the front end's alone, the same in both
# renderers: one run per front end, in a different renderer each (every cell still types and checks the prompt).
# On a second host (PISA_SECOND_HOST=1) only its pinned front end runs that way: 1.58.1 ran it on the first host, and the
# graph it queues is the one every cell checks against the API twin; this host's backend runs in every queue cell.
RUN_WITHOUT_EXTENSION = ({f"{PINNED}-classic"} if os.environ.get("PISA_SECOND_HOST") == "1"
                         else {f"{PINNED}-vue", f"{NEWEST}-classic"})
# Test probes, installed through the public API: what loadGraphData reports missing, the execution events, and small
# lookups the other snippets share (a widget by name, a node's element, where a classic node's (0, 0) is on the page).
PROBE = """async () => {
    const { api } = await import('/scripts/api.js');
    window.__t = { missing: null, events: [],
        w: (id, k) => app.graph.getNodeById(id).widgets.find(w => w.name === k),
        q: (id, sel = '') => document.querySelector(`[data-node-id="${id}"] ${sel}`),
        at: (n) => { const r = app.canvas.canvas.getBoundingClientRect(), ds = app.canvas.ds;
            return { k: ds.scale, ox: r.left + (n.pos[0] + ds.offset[0]) * ds.scale,
                     oy: r.top + (n.pos[1] + ds.offset[1]) * ds.scale }; } };
    app.registerExtension({ name: 'pisa-sr.test-probe',
        afterConfigureGraph(missing) { window.__t.missing = (missing || []).map(m => m.type ?? m); } });
    for (const ev of ['executed', 'execution_error', 'execution_success', 'execution_interrupted'])
        api.addEventListener(ev, (e) => window.__t.events.push({ type: ev, detail: e.detail }));
}"""


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def servers():
    """server(version): the one running server for that front end (the previous one is stopped first)."""
    ckpt, lora = make_tiny_weights.make(make_tiny_weights.cache_dir())
    state: dict = {"version": None, "srv": None}

    def get(version: str) -> ComfyServer:
        if state["version"] == version:
            return state["srv"]
        if state["srv"] is not None:
            state["srv"].cleanup()
        args = []
        if version != PINNED:
            static = host.COMFY_DIR.parent / f"frontend-{version}" / "comfyui_frontend_package" / "static"
            assert static.is_dir(), f"{static} is missing: scripts/setup_host.sh installs it"
            args = ["--front-end-root", str(static)]
        srv = ComfyServer(models={"checkpoints": [ckpt], "pisa_sr": [lora]}, extra_args=args)
        # each loader's input and the test's file for it
        srv.tiny = {"CheckpointLoaderSimple": ("ckpt_name", Path(ckpt).name), "PiSA_LoadLoRAs": ("lora_name",
                    Path(lora).name), "LoadImage": ("image", "lq_{}x{}.png".format(*INPUT))}
        example_image(str(srv.base / "input" / srv.tiny["LoadImage"][1]), *INPUT)
        state.update(version=version, srv=srv.start())
        return srv

    yield get
    if state["srv"] is not None:
        state["srv"].cleanup()


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


def open_front_end(browser, server, vue: bool, block_extension: bool = False):
    """A fresh browser context on the server's front end, with the test probes installed."""
    # the user's settings, read by the front end at load: no first-run dialogs, no minimap, the renderer
    (server.base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(
        {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.VueNodes.Enabled": vue,
         "Comfy.OnboardingCoachmarks.Seen": ["appMode"]}))  # 1.58.1's App-mode tour, shown on a first app
    pg = browser.new_context(viewport={"width": 1600, "height": 900}).new_page()
    pg.vue, pg.server = vue, server
    pg.console_lines, pg.blocked, pg.posted = [], [], []
    pg.on("console", lambda m: pg.console_lines.append(f"{m.type}: {m.text}"))
    pg.on("pageerror", lambda e: pg.console_lines.append(f"pageerror: {e}"))
    pg.on("request", lambda r: pg.posted.append(r.post_data_json)
          if r.method == "POST" and r.url.endswith("/prompt") else None)
    if block_extension:
        pg.route("**/extensions/ComfyUI-PiSA-SR/pisa_sr.js",
                 lambda route: (pg.blocked.append(route.request.url), route.abort()))
    pg.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
    pg.goto(server.url, timeout=300_000)
    pg.wait_for_function("() => window.app && window.app.graph && window.app.canvas && window.LiteGraph",
                         timeout=300_000)
    pg.evaluate(PROBE)
    return pg


@pytest.fixture(scope="module", params=MATRIX)
def page(request, browser, servers):
    version, mode = request.param.split("-")
    pg = open_front_end(browser, servers(version), mode == "vue")
    pg.version = version
    yield pg
    pg.context.close()


# ------------------------------------------------------------------------------------------------ helpers
def workflow(server, name: str, api: bool = False) -> dict:
    """A shipped example, UI workflow or its API twin, on the tiny model files and the test input image."""
    data = json.loads((host.REPO / "example_workflows" / ("api" if api else ".") / f"{name}.json").read_text())
    for n in data.values() if api else data["nodes"]:
        if pick := server.tiny.get(n["class_type" if api else "type"]):
            (n["inputs"] if api else n["widgets_values"])[pick[0] if api else 0] = pick[1]
    return data


def ui_prompt(page) -> dict:
    return page.evaluate("async () => (await app.graphToPrompt()).output")


def assert_prompt_is_twin(page, name: str) -> None:
    """The UI workflow converts to the same prompt as its API twin (every twin input, same value)."""
    prompt, twin = ui_prompt(page), workflow(page.server, name, api=True)
    assert set(prompt) == set(twin), (sorted(prompt), sorted(twin))
    for nid, node in twin.items():
        got = prompt[nid]
        assert (got["class_type"], {k: got["inputs"].get(k) for k in node["inputs"]}) == \
            (node["class_type"], node["inputs"]), (name, nid)


def load_workflow(page, name: str) -> None:
    page.evaluate("async ([d, name]) => { window.__t.missing = null; await app.loadGraphData(d, true, true, name); }",
                  [workflow(page.server, name), name])
    page.wait_for_function("() => window.__t.missing !== null", timeout=60_000)
    page.wait_for_timeout(800)
    assert page.evaluate("() => window.__t.missing") == []
    # no widget value the front end would refuse: numbers out of range, combo values not offered
    assert page.evaluate("""() => {
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
    }""") == []


def node_id(page, type_: str) -> int:
    return page.evaluate("(t) => app.graph.nodes.find(n => n.type === t).id", type_)


def focus(page, nid: int, scale: float, at=(300, 130)) -> None:
    """Zoom the canvas and put node ``nid``'s top-left corner at canvas pixel ``at``."""
    page.evaluate("""([id, s, ax, ay]) => {
        const n = app.graph.getNodeById(id), ds = app.canvas.ds;
        ds.scale = s; ds.offset[0] = ax / s - n.pos[0]; ds.offset[1] = ay / s - n.pos[1];
        app.canvas.setDirty(true, true); app.canvas.draw(true, true);
    }""", [nid, scale, at[0], at[1]])
    page.wait_for_timeout(500)


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
    page.wait_for_timeout(500)


def geometry(page, nid: int, widget: str) -> dict:
    """Where a widget's last-drawn rectangles (in the coordinates it draws in) lie on the page: screen = o + k * xy.
    The classic renderer draws widgets in node coordinates on the graph canvas; the Vue-nodes renderer draws each
    custom widget on its own canvas inside the node's DOM element."""
    return page.evaluate("""([id, name]) => {
        const w = __t.w(id, name), el = __t.q(id, 'canvas'), r = el?.getBoundingClientRect();
        return { box: w.box ?? null, rect: w.rect ?? null, resetBox: w.resetBox ?? null, y: w.y,
                 ...(el ? { ox: r.left, oy: r.top, k: r.width / el.clientWidth } : __t.at(app.graph.getNodeById(id))) };
    }""", [nid, widget])


def to_screen(g: dict, x: float, y: float) -> tuple[float, float]:
    return g["ox"] + x * g["k"], g["oy"] + y * g["k"]


def lambdas(page, nid: int) -> dict:
    """The widget values, and the numbers the node shows (Vue nodes: its input elements, labelled with the widget
    name in both versions; classic: the canvas draws the widget value itself)."""
    return page.evaluate("""(id) => {
        const shown = (k) => { const i = __t.q(id, `:is(input[aria-label="${k}"], [aria-label="${k}"] input)`);
                               return i ? Number(i.value) : __t.w(id, k).value; };
        const [p, s] = [__t.w(id, 'lambda_pix'), __t.w(id, 'lambda_sem')];
        return { pix: p.value, sem: s.value, shown: [shown('lambda_pix'), shown('lambda_sem')],
                 pix_range: [p.options.min, p.options.max], sem_range: [s.options.min, s.options.max] }; }""", nid)


def assert_lambdas(page, nid: int, pix: float, sem: float) -> None:
    got = lambdas(page, nid)
    assert (got["pix"], got["sem"]) == (pix, sem), got
    if page.vue:
        assert page.evaluate("(id) => document.querySelectorAll(`[data-node-id='${id}'] input[role=spinbutton]`).length",
                             nid) >= 2
    assert got["shown"] == [pix, sem], got  # values written = values shown


def pad(page, sid: int):
    """The pad's geometry, the lambda widgets' ranges, and at(pix, sem): where that setting lies on the page
    (x = lambda_sem left to right, y = lambda_pix bottom to top)."""
    g, lam = geometry(page, sid, PAD), lambdas(page, sid)
    assert g["box"] is not None, "the pad was never drawn"
    b, (slo, shi), (plo, phi) = g["box"], lam["sem_range"], lam["pix_range"]

    def at(pix: float, sem: float) -> tuple[float, float]:
        return to_screen(g, b["x0"] + (sem - slo) / (shi - slo) * (b["x1"] - b["x0"]),
                         b["y1"] - (pix - plo) / (phi - plo) * (b["y1"] - b["y0"]))
    return g, lam, at


def is_dot(img: Image.Image, xy) -> bool:
    """The pad's current-setting dot (#ffb347), blended a little by antialiasing, is at page point xy."""
    r, g, b = img.getpixel(tuple(round(v) for v in xy))
    return r > 200 and 140 < g < 215 and b < 120


def drag(page, start, end, steps: int = 8) -> None:
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=steps)
    page.mouse.up()
    page.wait_for_timeout(250)


def click_mid(page, g: dict, r: dict) -> None:
    page.mouse.click(*to_screen(g, (r["x0"] + r["x1"]) / 2, (r["y0"] + r["y1"]) / 2))
    page.wait_for_timeout(250)


def type_number(page, nid: int, name: str, value: str) -> None:
    """Type a number into a widget as a user would: the canvas prompt dialog (classic) or the node's input (Vue)."""
    if page.vue:
        loc = page.locator(f'[data-node-id="{nid}"] :is(input[aria-label="{name}"], [aria-label="{name}"] input)')
        box = loc.bounding_box()
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        assert page.evaluate("() => document.activeElement?.tagName") == "INPUT", f"{name}: the click did not focus"
        page.keyboard.press("Control+A")
        page.keyboard.type(value)
        page.keyboard.press("Enter")
    else:
        g = geometry(page, nid, name)
        page.mouse.click(*to_screen(g, 170, g["y"] + 10))
        dialog_input = page.locator(".graphdialog input.value").first
        dialog_input.wait_for(timeout=10_000)
        dialog_input.fill(value)
        dialog_input.press("Enter")
    page.wait_for_timeout(400)


def screenshot(page, path: Path, clip: dict | None = None) -> Image.Image:
    page.evaluate("() => app.canvas.draw(true, true)")
    page.wait_for_timeout(100)
    return Image.open(io.BytesIO(page.screenshot(path=str(path), clip=clip))).convert("RGB")


def readme_shot(page, shots: Path, name: str, clip: dict | None = None) -> None:
    """A screenshot the README shows: the newest front end with Vue nodes is copied to docs/screenshots/."""
    path = shots / f"{name}{'_vue' if page.vue else ''}.png"
    screenshot(page, path, clip)
    if page.version == NEWEST and page.vue and os.environ.get("PISA_SECOND_HOST") != "1":
        shutil.copy(path, DOCS_SHOTS / path.name)


def node_clip(page, nid: int) -> dict:
    """The page rectangle of a whole node (title included), with a small margin."""
    return page.evaluate("""(id) => {
        let r = __t.q(id)?.getBoundingClientRect();
        if (!r) {
            const n = app.graph.getNodeById(id), o = __t.at(n), t = LiteGraph.NODE_TITLE_HEIGHT;
            r = { left: o.ox, top: o.oy - t * o.k, width: n.size[0] * o.k, height: (n.size[1] + t) * o.k };
        }
        return { x: r.left - 10, y: r.top - 10, width: r.width + 20, height: r.height + 20 };
    }""", nid)


def mean_abs_diff(a: Image.Image, b: Image.Image, frac_box: tuple[float, float, float, float]) -> float:
    """Mean absolute 8-bit difference of two same-size screenshots inside a box given in fractions of the size."""
    box = tuple(int(f * a.size[i % 2]) for i, f in enumerate(frac_box))
    return float(np.abs(np.asarray(a.crop(box), np.float32) - np.asarray(b.crop(box), np.float32)).mean())


def pisa_console_problems(page) -> list[str]:
    """Warnings of the extension (it logs '[PiSA-SR] ...' instead of throwing) and errors raised in its file."""
    return [line for line in page.console_lines if "[PiSA-SR]" in line or "pisa_sr.js" in line]


def run_setting(page, test: str) -> tuple[float, float]:
    """The (lambda_pix, lambda_sem) a test queues with: different for every run on one server, so the executor
    re-runs the sampler and the decoder (a cached node sends no ``executed`` event, and these tests read the
    decoder's UI output) while the checkpoint, text and LQ encodings stay cached from the server's first run."""
    return {("queue", False): (0.8, 1.5), ("queue", True): (0.7, 1.4),
            ("plain", False): (2, 2), ("plain", True): (2, 3)}[(test, page.vue)]


def queue(page, sid: int, pix: float, sem: float) -> dict:
    """Queue from the browser and wait for execution_success (fail on an error); the prompt the front end sent
    carries the sampler's (pix, sem). Returns {node id: executed output}."""
    page.posted.clear()
    page.evaluate("() => { window.__t.events = []; app.queuePrompt(0); }")
    deadline = time.time() + PROMPT_TIMEOUT_S
    while True:
        events = page.evaluate("() => window.__t.events")
        for ev in events:
            if ev["type"] in ("execution_error", "execution_interrupted"):
                raise AssertionError(f"{ev['type']}: {json.dumps(ev['detail'])[:3000]}")
        if any(ev["type"] == "execution_success" for ev in events):
            break
        if time.time() > deadline:
            raise TimeoutError(f"the prompt did not finish in {PROMPT_TIMEOUT_S}s")
        page.wait_for_timeout(1000)
    assert page.evaluate("() => app.lastNodeErrors") in (None, {})
    assert len(page.posted) == 1, page.posted
    sent = page.posted[0]["prompt"][str(sid)]["inputs"]
    assert (sent["lambda_pix"], sent["lambda_sem"]) == (pix, sem), sent
    return {str(ev["detail"]["node"]): ev["detail"]["output"] for ev in events if ev["type"] == "executed"}


def wait_for_preview(page, nid: int) -> None:
    """Wait until the front end's own image preview of a node shows one loaded image: node.imgs (classic, and Vue
    nodes of 1.58) or an image element in the node (Vue nodes of 1.32 leave node.imgs unset)."""
    page.wait_for_function("""(id) => {
        const ok = (i) => i.length === 1 && i[0].complete && i[0].naturalWidth > 0, el = __t.q(id);
        return ok(app.graph.getNodeById(id).imgs ?? []) || (el !== null && ok([...el.querySelectorAll('img')]));
    }""", arg=nid, timeout=60_000)


# ------------------------------------------------------------------------------------------------ tests
def test_front_end_and_renderer_are_the_ones_asked_for(page):
    assert page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__") == page.version
    load_workflow(page, QUEUED)
    vue_nodes = page.evaluate("() => document.querySelectorAll('[data-node-id]').length")
    assert (vue_nodes > 0) == page.vue, vue_nodes
    assert "registerExtension" in page.server.get_bytes("/extensions/ComfyUI-PiSA-SR/pisa_sr.js").decode()
    assert EXT_NAME in page.evaluate("() => app.extensions.map(e => e.name)")
    assert pisa_console_problems(page) == []


@pytest.mark.parametrize("name", ALL_WORKFLOWS)
def test_workflow_loads_cleanly(page, shots, name):
    load_workflow(page, name)  # nothing missing, no widget value the front end would refuse
    assert page.evaluate("() => [...document.querySelectorAll('.p-dialog')].filter(d => d.offsetParent !== null)"
                         ".map(d => d.innerText.slice(0, 300))") == []  # no visible dialog
    assert page.evaluate("() => [...document.querySelectorAll('.p-toast-message-error, .p-toast-message-warn')]"
                         ".map(t => t.innerText.slice(0, 300))") == []  # no error or warning toast
    assert_prompt_is_twin(page, name)
    # Every sampler carries the pad.
    pads = page.evaluate("""() => app.graph.nodes.filter(n => n.type === 'PiSA_Sample')
        .map(n => n.widgets.some(w => w.name === 'pisa_sr_pad'))""")
    samplers = sum(n["type"] == "PiSA_Sample" for n in workflow(page.server, name)["nodes"])
    assert len(pads) == samplers and all(pads), pads
    fit_all(page)
    screenshot(page, shots / f"{page.version}_{page.vue}_{name}_loaded.png")
    assert pisa_console_problems(page) == []


def test_pad_sets_lambdas_by_pointer(page, shots):
    load_workflow(page, QUEUED)
    sid = node_id(page, "PiSA_Sample")
    focus(page, sid, 1.5)
    assert_lambdas(page, sid, 0.8, 1.5)
    g, lam, at = pad(page, sid)
    assert is_dot(screenshot(page, shots / "pad_before.png"), at(0.8, 1.5))

    # 1. drag the dot to (pix 1.5, sem 0.5): the Vue-nodes renderer once set lambda_pix to its minimum on release
    drag(page, at(0.8, 1.5), at(1.5, 0.5))
    assert_lambdas(page, sid, 1.5, 0.5)
    # the pad draws the new setting (the dot moved with the pointer)
    img = screenshot(page, shots / "pad_dragged.png")
    assert is_dot(img, at(1.5, 0.5)) and not is_dot(img, at(0.8, 1.5))

    # 2. values snap to 0.05: aim between grid steps
    drag(page, at(1.5, 0.5), at(0.62, 2.23))
    assert_lambdas(page, sid, 0.6, 2.25)

    # 3. dragging past the pad's corner clamps to the widgets' min/max
    drag(page, at(0.6, 2.25), to_screen(g, g["box"]["x1"] + 40, g["box"]["y1"] + 30))
    assert_lambdas(page, sid, lam["pix_range"][0], lam["sem_range"][1])

    # 4. the "default" button restores the release default (1, 1)
    click_mid(page, g, g["resetBox"])
    assert_lambdas(page, sid, 1.0, 1.0)

    # 5. numbers typed into the widgets move the dot (whole numbers: the Vue nodes of 1.32 drop a typed ".")
    type_number(page, sid, "lambda_pix", "2")
    type_number(page, sid, "lambda_sem", "3")
    assert_lambdas(page, sid, 2, 3)
    img = screenshot(page, shots / "pad_after_widget_edit.png")
    assert is_dot(img, at(2, 3)) and not is_dot(img, at(1.0, 1.0)), "the pad missed a typed edit"

    # the UI's prompt carries the values the pad set, and the pad is not a prompt input or a saved widget value
    inputs = ui_prompt(page)[str(sid)]["inputs"]
    assert (inputs["lambda_pix"], inputs["lambda_sem"]) == (2, 3) and PAD not in inputs, inputs
    saved = page.evaluate("(id) => app.graph.serialize().nodes.find(n => String(n.id) === String(id)).widgets_values", sid)
    assert saved[:4] == [2, 3, 96, 32] and None not in saved, saved

    # the pad is drawn inside its node: its canvas (Vue nodes) ends where the node ends
    if page.vue:
        inside = page.evaluate("""(id) => { const el = __t.q(id);
            const c = el.querySelector('canvas').getBoundingClientRect(), r = el.getBoundingClientRect();
            return [c.bottom <= r.bottom + 1, c.right <= r.right + 1, c.height, r.height]; }""", sid)
        assert inside[0] and inside[1], inside

    # a README-sized crop of the pad
    drag(page, at(2, 3), at(0.8, 1.5))
    assert_lambdas(page, sid, 0.8, 1.5)
    readme_shot(page, shots, "pisa_sr_pad", clip=node_clip(page, sid))
    assert pisa_console_problems(page) == []


def test_queue_from_browser_and_compare_slider(page, shots):
    """The adjustable workflow, its setting dialled in on the pad from the release default, queued from the browser.
    Each renderer queues its own setting (run_setting), so the decoder really runs in each."""
    load_workflow(page, QUEUED)
    sid, did, save_id = (node_id(page, t) for t in ("PiSA_Sample", "PiSA_Decode", "SaveImage"))
    focus(page, sid, 1.4)
    g, lam, at = pad(page, sid)
    click_mid(page, g, g["resetBox"])
    assert_lambdas(page, sid, 1.0, 1.0)
    pix, sem = run_setting(page, "queue")
    drag(page, at(1.0, 1.0), at(pix, sem))
    assert_lambdas(page, sid, pix, sem)
    outputs = queue(page, sid, pix, sem)

    # the saved output image exists, at x4 the input size
    saved = outputs[str(save_id)]["images"]
    assert len(saved) == 1 and saved[0]["type"] == "output"
    out_path = page.server.base / "output" / saved[0]["subfolder"] / saved[0]["filename"]
    assert Image.open(out_path).size == (4 * INPUT[0], 4 * INPUT[1])
    # the decoder sent the result and the resized LQ previews; the extension drew them as one before/after widget
    dec = outputs[str(did)]
    assert len(dec["images"]) == 1 and len(dec["pisa_lq"]) == 1
    page.wait_for_function("(id) => { const w = __t.w(id, 'pisa_sr_compare'); return w && w.ready && w.rect; }",
                           arg=did, timeout=60_000)
    state = page.evaluate("""(id) => { const w = __t.w(id, 'pisa_sr_compare');
        return { split: w.split, after: w.after.map(i => [i.naturalWidth, i.naturalHeight, i.src]),
                 before: w.before.map(i => [i.naturalWidth, i.naturalHeight, i.src]),
                 widgets: app.graph.getNodeById(id).widgets.map(w => w.name),
                 imgs: [...(__t.q(id)?.querySelectorAll('img') ?? [])].length }; }""", did)
    assert state["after"][0][:2] == [4 * INPUT[0], 4 * INPUT[1]] and state["before"][0][:2] == state["after"][0][:2]
    assert dec["pisa_lq"][0]["filename"] in state["before"][0][2]
    assert dec["images"][0]["filename"] in state["after"][0][2]
    # one preview, not two: no canvas image preview widget (classic), no image preview element (Vue nodes). The Vue
    # nodes of 1.32.9 offer an extension no way to hide a node's image preview (1.47.12 and 1.58.1 honour
    # node.hideOutputImages): there it lies under the slider's canvas, which the extension keeps on top (the drag
    # below proves it gets the pointer).
    assert "$$canvas-image-preview" not in state["widgets"], state
    assert state["imgs"] == (1 if page.vue and page.version in VUE_IGNORES_HIDE_OUTPUT_IMAGES else 0), state

    fit_all(page)
    wait_for_preview(page, save_id)  # the Save Image node's own preview, for the screenshot
    page.mouse.move(800, 870)  # empty canvas at the bottom: no tooltip or tab preview over the graph
    page.wait_for_timeout(500)
    readme_shot(page, shots, f"{QUEUED}_done")

    # drag the slider: the split follows the pointer and the pixels between the old and new split change
    focus(page, did, 1.3)
    g = geometry(page, did, COMPARE)
    r = g["rect"]
    x0, y0 = to_screen(g, r["x"], r["y"])
    clip = {"x": x0, "y": y0, "width": r["w"] * g["k"], "height": r["h"] * g["k"]}
    slider = lambda f: to_screen(g, r["x"] + r["w"] * f, r["y"] + r["h"] * 0.75)  # noqa: E731
    before = screenshot(page, shots / "compare_mid.png", clip=clip)
    drag(page, slider(state["split"]), slider(0.15))
    split = page.evaluate("(id) => __t.w(id, 'pisa_sr_compare').split", did)
    assert abs(split - 0.15) < 0.02, split
    page.mouse.move(800, 870)  # off the slider: its hover tooltip (classic canvas) would cover the result side
    page.wait_for_timeout(500)
    after = screenshot(page, shots / "compare_left.png", clip=clip)
    # between the old and the new split the LQ gave way to the result; right of the old split nothing changed
    diff = mean_abs_diff(before, after, (0.22, 0.3, 0.45, 0.9))
    assert diff > 8, f"the slider moved but the picture did not change (mean abs diff {diff:.1f})"
    same = mean_abs_diff(before, after, (0.6, 0.3, 0.95, 0.9))
    assert same < 2, f"the result side changed when only the split moved ({same:.1f})"
    # README shot: the whole node with the slider in the middle
    drag(page, slider(0.15), slider(0.5))
    readme_shot(page, shots, "pisa_sr_compare", clip=node_clip(page, did))
    assert pisa_console_problems(page) == []


def test_graph_works_without_the_extension(page, browser, shots):
    """With pisa_sr.js blocked the workflow loads, its plain number widgets take typed values, and (one renderer per
    front end) it runs and the decoder shows the front end's own preview. The typed setting (run_setting) differs
    from every other run on the server, so that preview comes from a real run."""
    pg = open_front_end(browser, page.server, page.vue, block_extension=True)
    try:
        assert pg.blocked, "the extension was not requested"
        assert EXT_NAME not in pg.evaluate("() => app.extensions.map(e => e.name)")
        load_workflow(pg, QUEUED)
        assert not pg.evaluate("() => app.graph.nodes.some(n => (n.widgets ?? []).some(w => w.name.startsWith('pisa_sr_')))")
        assert_prompt_is_twin(pg, QUEUED)
        sid, did = node_id(pg, "PiSA_Sample"), node_id(pg, "PiSA_Decode")
        focus(pg, sid, 1.4)
        pix, sem = run_setting(pg, "plain")
        type_number(pg, sid, "lambda_pix", str(pix))
        type_number(pg, sid, "lambda_sem", str(sem))
        assert_lambdas(pg, sid, pix, sem)
        inputs = ui_prompt(pg)[str(sid)]["inputs"]
        assert (inputs["lambda_pix"], inputs["lambda_sem"]) == (pix, sem)
        if f"{page.version}-{'vue' if page.vue else 'classic'}" not in RUN_WITHOUT_EXTENSION:
            return
        fit_all(pg)
        assert queue(pg, sid, pix, sem)[str(did)]["images"]
        # the front end's ordinary preview shows the result on the decoder
        wait_for_preview(pg, did)
        screenshot(pg, shots / "without_extension.png")
    finally:
        pg.context.close()


def test_help_panel_shows_the_node_page(browser, servers, shots):
    """Newest front end, Vue nodes: select the sampler with the pointer, press the selection toolbox's Node Info: the
    side panel renders web/docs/PiSA_Sample.md (its first paragraph, the input list) with the lambda map loaded."""
    pg = open_front_end(browser, servers(NEWEST), vue=True)
    try:
        load_workflow(pg, QUEUED)
        sid = node_id(pg, "PiSA_Sample")
        box = pg.locator(f'[data-node-id="{sid}"]').first.bounding_box()
        pg.mouse.click(box["x"] + 40, box["y"] + 12)  # the title bar
        pg.get_by_role("button", name="Node Info").click()
        page_md = (host.REPO / "web" / "docs" / "PiSA_Sample.md").read_text()
        first = page_md.split("\n\n")[1].split(":")[0].replace("\n", " ")  # "PiSA-SR's single diffusion step. ..."
        pg.wait_for_function("(t) => [...document.querySelectorAll('.node-help-content')]"
                             ".some(e => e.innerText.replace(/\\s+/g, ' ').includes(t))", arg=first, timeout=60_000)
        text = pg.evaluate("() => document.querySelector('.node-help-content').innerText")
        for name in ("lambda_pix", "lambda_sem", "tile_size", "precision"):
            assert name in text, name
        pg.wait_for_function("() => [...document.querySelectorAll('.node-help-content img')]"
                             ".some(i => i.src.endsWith('/docs/lambda_map.svg') && i.complete && i.naturalWidth > 0)",
                             timeout=60_000)
        pg.screenshot(path=str(shots / "help_panel.png"))
        if os.environ.get("PISA_SECOND_HOST") != "1":  # README shots come from the first host
            shutil.copy(shots / "help_panel.png", DOCS_SHOTS / "pisa_sr_help_vue.png")
        assert pisa_console_problems(pg) == []
    finally:
        pg.context.close()


def blueprint_workflow(server, pix: float, sem: float) -> dict:
    """A user's saved graph with the shipped blueprint placed: Load Checkpoint, Load Image -> the blueprint -> Save
    Image (node 5 is the blueprint; its definition travels in definitions.subgraphs, as the front end saves it)."""
    bp = json.loads((host.REPO / "subgraphs" / "Image Upscale (PiSA-SR).json").read_text())
    basic = {n["id"]: n for n in workflow(server, "pisa_sr_basic")["nodes"]}
    ckpt, image, save = basic[1], basic[3], basic[8]
    (outer,) = bp["nodes"]
    outer = dict(outer, id=5, pos=[420, 80])
    names = [i["name"] for i in outer["inputs"]]
    wiring = {"image": (image, 0, 1), "model": (ckpt, 0, 2), "clip": (ckpt, 1, 3), "vae": (ckpt, 2, 4)}
    links = [[lid, src["id"], slot, 5, names.index(name), name.upper()] for name, (src, slot, lid) in wiring.items()]
    links.append([5, 5, 0, save["id"], 0, "IMAGE"])
    outer["inputs"] = [dict(i, link=wiring[i["name"]][2] if i["name"] in wiring else None) for i in outer["inputs"]]
    outer["outputs"] = [dict(outer["outputs"][0], links=[5])]
    values = dict(zip([p[1] for p in outer["properties"]["proxyWidgets"]], outer["widgets_values"]))
    values.update(lora_name=server.tiny["PiSA_LoadLoRAs"][1], lambda_pix=pix, lambda_sem=sem)
    outer["widgets_values"] = list(values.values())
    for n, lids in ((ckpt, {0: [2], 1: [3], 2: [4]}), (image, {0: [1]})):
        n["outputs"] = [dict(o, links=lids.get(i, [])) for i, o in enumerate(n["outputs"])]
    save["inputs"] = [dict(save["inputs"][0], link=5)]
    return {"last_node_id": 8, "last_link_id": 5, "nodes": [ckpt, image, outer, save], "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4, "definitions": bp["definitions"]}


def test_blueprint_is_found_placed_and_gives_the_four_nodes_image(browser, servers, shots):
    """Newest front end: the pack's subgraph blueprint (subgraphs/) is found by typing in the node search and placed
    with its four widgets; a graph using it, queued from the browser, saves the image the four PiSA nodes give at the
    same setting through the API (same nodes, same inputs, one CPU: equal up to 1/255 rounding of the 8-bit PNG)."""
    srv = servers(NEWEST)
    pg = open_front_end(browser, srv, vue=True)
    try:
        pg.evaluate("async () => { await app.loadGraphData({nodes: [], links: [], version: 0.4}, true, true, 'new'); }")
        pg.mouse.dblclick(700, 500)  # empty canvas: the node search
        pg.keyboard.type("PiSA-SR", delay=30)
        option = pg.get_by_role("option").filter(has_text="Image Upscale (PiSA-SR)").first
        option.wait_for(timeout=60_000)
        option.click()
        placed = pg.evaluate("""() => app.graph.nodes.map(n => ({ sub: !!n.subgraph, title: n.title,
            widgets: (n.widgets ?? []).map(w => w.name) }))""")
        assert len(placed) == 1 and placed[0]["sub"] and placed[0]["title"] == "Image Upscale (PiSA-SR)", placed
        assert set(placed[0]["widgets"]) >= {"lora_name", "upscale", "lambda_pix", "lambda_sem"}, placed
        pg.screenshot(path=str(shots / "blueprint_placed.png"))

        pix, sem = 0.6, 1.3  # a setting no other test queues: the sampler and decoder really run
        pg.evaluate("async ([d]) => { window.__t.missing = null; await app.loadGraphData(d, true, true, 'bp'); }",
                    [blueprint_workflow(srv, pix, sem)])
        pg.wait_for_function("() => window.__t.missing !== null", timeout=60_000)
        assert pg.evaluate("() => window.__t.missing") == []
        pg.posted.clear()
        pg.evaluate("() => { window.__t.events = []; app.queuePrompt(0); }")
        pg.wait_for_function("() => Object.keys(app.lastNodeErrors ?? {}).length > 0 || __t.events.some(e => "
                             "['execution_success', 'execution_error', 'execution_interrupted'].includes(e.type))",
                             timeout=PROMPT_TIMEOUT_S * 1000)
        assert pg.evaluate("() => app.lastNodeErrors") in (None, {})
        events = pg.evaluate("() => window.__t.events")
        assert any(e["type"] == "execution_success" for e in events), json.dumps(events)[:3000]
        (sent,) = pg.posted
        inner = {v["class_type"]: v["inputs"] for v in sent["prompt"].values()}
        assert (inner["PiSA_Sample"]["lambda_pix"], inner["PiSA_Sample"]["lambda_sem"]) == (pix, sem), inner
        assert inner["CLIPTextEncode"]["text"] == ""
        (saved,) = [e["detail"]["output"]["images"][0] for e in events if e["type"] == "executed"
                    and sent["prompt"][str(e["detail"]["node"])]["class_type"] == "SaveImage"]
        got = np.asarray(Image.open(srv.base / "output" / saved["subfolder"] / saved["filename"]), dtype=np.int16)

        prompt = workflow(srv, "pisa_sr_basic", api=True)
        prompt["6"]["inputs"].update(lambda_pix=pix, lambda_sem=sem)
        prompt["8"]["inputs"]["filename_prefix"] = "four_nodes"
        (want_path,) = srv.output_images(srv.run(prompt))
        want = np.asarray(Image.open(want_path), dtype=np.int16)
        assert got.shape == want.shape == (4 * INPUT[1], 4 * INPUT[0], 3)
        assert np.abs(got - want).max() <= 1
        assert pisa_console_problems(pg) == []
    finally:
        pg.context.close()


def test_example_opens_as_an_app_and_runs(browser, servers, shots):
    """Newest front end, as a user would: the basic example opens in App mode (extra.linearMode) showing exactly the
    four inputs of its extra.linearData (image, upscale, lambda_pix, lambda_sem; no tile size, precision or VAE
    tiling); a lambda_sem typed into the app reaches the queued prompt; Run saves the x4 image and the app shows it."""
    srv = servers(NEWEST)
    pg = open_front_end(browser, srv, vue=True)
    try:
        load_workflow(pg, "pisa_sr_basic")
        widgets = pg.get_by_test_id("linear-widgets")
        widgets.wait_for(timeout=60_000)
        labels = [t.strip() for t in widgets.get_by_test_id("builder-widget-label").all_inner_texts()]
        assert labels == ["image", "upscale", "lambda_pix", "lambda_sem"], labels
        text = widgets.inner_text()
        assert not any(k in text for k in ("tile_size", "tile_overlap", "precision", "vae_tile", "ckpt_name")), text
        assert widgets.locator("img").evaluate_all("(e) => e.some(i => i.complete && i.naturalWidth > 0)")  # upload

        sem = 1.2  # a setting no other test queues: the sampler and decoder really run
        box = widgets.locator('[data-testid="app-mode-widget-item"]').nth(3).locator("input").first.bounding_box()
        pg.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        pg.keyboard.press("Control+A")
        pg.keyboard.type(str(sem))
        pg.keyboard.press("Enter")
        pg.wait_for_timeout(400)
        pg.posted.clear()
        pg.evaluate("() => { window.__t.events = []; }")
        pg.get_by_test_id("linear-run-button").get_by_role("button", name="Run", exact=True).click()
        pg.wait_for_function("() => __t.events.some(e => ['execution_success', 'execution_error', "
                             "'execution_interrupted'].includes(e.type))", timeout=PROMPT_TIMEOUT_S * 1000)
        events = pg.evaluate("() => window.__t.events")
        assert any(e["type"] == "execution_success" for e in events), json.dumps(events)[:3000]
        (sent,) = pg.posted
        assert (sent["prompt"]["6"]["inputs"]["lambda_pix"], sent["prompt"]["6"]["inputs"]["lambda_sem"]) == (1.0, sem)
        (saved,) = [e["detail"]["output"]["images"][0] for e in events
                    if e["type"] == "executed" and str(e["detail"]["node"]) == "8"]
        out = Image.open(srv.base / "output" / saved["subfolder"] / saved["filename"])
        assert out.size == (4 * INPUT[0], 4 * INPUT[1])
        # the app's output panel shows that saved image
        pg.wait_for_function("(f) => [...document.querySelectorAll('[data-testid=linear-center-panel] img')]"
                             ".some(i => i.src.includes(encodeURIComponent(f)) && i.complete && i.naturalWidth === "
                             f"{4 * INPUT[0]})", arg=saved["filename"], timeout=60_000)
        # 1.58.1 follows its jobs through /api/jobs (0.30.0 has it, 0.3.75 not): only there does the app see the
        # run end (on 0.3.75 "Cancel this run" stays up, the image shown all the same); the README shot comes from there
        try:
            jobs_api = bool(srv.get("/api/jobs"))
        except urllib.error.HTTPError:
            jobs_api = False
        if jobs_api:
            pg.get_by_test_id("linear-cancel-run").wait_for(state="detached", timeout=60_000)
        pg.mouse.move(1150, 500)  # empty output panel: no tooltip over the shot
        pg.wait_for_timeout(500)
        pg.screenshot(path=str(shots / "app_mode.png"))
        if jobs_api:
            shutil.copy(shots / "app_mode.png", DOCS_SHOTS / "pisa_sr_app_vue.png")
        assert pisa_console_problems(pg) == []
    finally:
        pg.context.close()
