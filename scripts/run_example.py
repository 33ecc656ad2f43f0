"""Run an example workflow through a real headless ComfyUI server and write the output image.

Without arguments it uses tiny generated weights (random, so the picture is not meaningful: this proves the graph
runs end to end). With --ckpt (SD 2.1-base) and --pisa (pisa_sr.pkl) it runs the real model.

    bash scripts/run_example.sh [--image LQ.png] [--ckpt v2-1_512-ema-pruned.safetensors --pisa pisa_sr.pkl]
                                [--workflow pisa_sr_basic] [--out out/pisa_sr_example.png] [--set 6.lambda_sem=1.5]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from comfy_server import REPO, ComfyServer, use_files  # noqa: E402


def example_image(path: str, w: int = 128, h: int = 128) -> str:
    """A procedural low-quality test picture (no binary files in the repo)."""
    import numpy as np
    from PIL import Image, ImageFilter

    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([0.5 + 0.4 * np.sin(x / 9.0), 0.5 + 0.4 * np.cos(y / 13.0), 0.5 + 0.3 * np.sin((x + y) / 7.0)], -1)
    img[(x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(w, h) / 4) ** 2] = (0.9, 0.8, 0.2)
    pil = Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))
    pil.save(path)
    return path


def parse_set(items: list[str]) -> list[tuple[str, str, object]]:
    out = []
    for it in items:
        key, _, val = it.partition("=")
        node, _, name = key.partition(".")
        try:
            v = json.loads(val)
        except json.JSONDecodeError:
            v = val
        out.append((node, name, v))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workflow", default="pisa_sr_basic", help="name in example_workflows/api/")
    ap.add_argument("--image", help="low-quality input image (default: a generated 128x128 picture)")
    ap.add_argument("--ckpt", help="SD 2.1-base checkpoint (default: tiny generated weights)")
    ap.add_argument("--pisa", help="pisa_sr.pkl or its .safetensors conversion (default: tiny generated LoRA)")
    ap.add_argument("--out", default=os.path.join(REPO, "out", "pisa_sr_example.png"))
    ap.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                    help="override an input of the API graph, e.g. 6.lambda_sem=1.5")
    ap.add_argument("--timeout", type=float, default=900)
    a = ap.parse_args()

    if bool(a.ckpt) != bool(a.pisa):
        ap.error("give both --ckpt and --pisa, or neither (tiny generated weights)")
    if a.ckpt:
        ckpt, pisa = os.path.abspath(a.ckpt), os.path.abspath(a.pisa)
    else:
        import make_tiny_weights

        ckpt, pisa = make_tiny_weights.make(make_tiny_weights.cache_dir())
    prompt = json.load(open(os.path.join(REPO, "example_workflows", "api", a.workflow + ".json")))
    srv = ComfyServer(models={"checkpoints": [ckpt], "pisa_sr": [pisa]})
    image = a.image or example_image(str(srv.base / "input" / "pisa_sr_example.png"))
    if a.image:
        shutil.copy(a.image, srv.base / "input" / os.path.basename(a.image))
    use_files(prompt, ckpt, pisa, image)
    for nid, name, v in parse_set(a.set):
        prompt[nid]["inputs"][name] = v
    t0 = time.time()
    with srv.running():
        print(f"ComfyUI up on {srv.url} in {time.time() - t0:.1f}s; running {a.workflow} ...", flush=True)
        t1 = time.time()
        entry = srv.run(prompt, timeout=a.timeout)
        images = srv.output_images(entry)
        if not images:
            raise RuntimeError("the workflow finished but wrote no image")
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        shutil.copy(images[0], a.out)
        from PIL import Image

        size = Image.open(a.out).size
        print(f"done in {time.time() - t1:.1f}s: {a.out} ({size[0]}x{size[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
