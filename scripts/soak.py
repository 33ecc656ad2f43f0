"""Soak: many PiSA prompts with varied sizes and lambdas against ONE real ComfyUI server; checks every output's
size and reports the server's resident memory after prompt 10 and after the last one (target: growth < 5%).

    bash scripts/soak.sh [--prompts 50] [--ckpt SD21.safetensors --pisa pisa_sr.pkl]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from comfy_server import REPO, ComfyServer  # noqa: E402
from pisa_sr.resize import plan_resize  # noqa: E402
from run_example import example_image  # noqa: E402

SIZES = [(64, 64), (96, 80), (130, 128), (48, 120), (200, 72), (136, 136)]
LAMBDAS = [(1.0, 1.0), (0.8, 1.2), (1.0, 0.0), (0.5, 1.5), (1.3, 0.7), (1.2, 1.2)]
FIXES = ["adain", "wavelet", "none"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--ckpt")
    ap.add_argument("--pisa")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.ckpt:
        ckpt, pisa = a.ckpt, a.pisa
    else:
        import make_tiny_weights

        ckpt, pisa = make_tiny_weights.make(make_tiny_weights.cache_dir())
    base = json.load(open(os.path.join(REPO, "example_workflows", "api", "pisa_sr_basic.json")))
    rng = random.Random(a.seed)
    srv = ComfyServer(models={"checkpoints": [ckpt], "pisa_sr": [pisa]})
    images = {}
    for w, h in SIZES:
        images[(w, h)] = os.path.basename(example_image(str(srv.base / "input" / f"lq_{w}x{h}.png"), w, h))
    rss = {}
    t0 = time.time()
    failures = 0
    with srv:
        for i in range(1, a.prompts + 1):
            (w, h), (lp, ls), fix = rng.choice(SIZES), rng.choice(LAMBDAS), rng.choice(FIXES)
            tile = rng.choice([96, 48, 0])
            p = json.loads(json.dumps(base))
            for node in p.values():
                ins = node["inputs"]
                ct = node["class_type"]
                if ct == "CheckpointLoaderSimple":
                    ins["ckpt_name"] = os.path.basename(ckpt)
                elif ct == "PiSA_LoadLoRAs":
                    ins["lora_name"] = os.path.basename(pisa)
                elif ct == "LoadImage":
                    ins["image"] = images[(w, h)]
                elif ct == "PiSA_Sample":
                    ins.update(lambda_pix=lp, lambda_sem=ls, tile_size=tile)
                elif ct == "PiSA_Decode":
                    ins["color_fix"] = fix
            t = time.time()
            entry = srv.run(p, timeout=1800)
            from PIL import Image

            (out,) = srv.output_images(entry)
            size = Image.open(out).size
            want = plan_resize(w, h, 4).output
            ok = size == want
            failures += not ok
            print(f"{i:3d} {w}x{h} lambdas=({lp},{ls}) tile={tile} fix={fix}: {size} {'ok' if ok else 'WRONG ' + str(want)}"
                  f" {time.time() - t:.1f}s rss={srv.rss_bytes() / 2**20:.0f} MiB", flush=True)
            if i in (10, a.prompts):
                rss[i] = srv.rss_bytes()
    srv.cleanup()
    growth = (rss[a.prompts] - rss[10]) / rss[10] * 100 if 10 in rss else float("nan")
    print(f"prompts={a.prompts} failures={failures} wall={time.time() - t0:.0f}s "
          f"rss@10={rss.get(10, 0) / 2**20:.0f} MiB rss@{a.prompts}={rss[a.prompts] / 2**20:.0f} MiB "
          f"growth={growth:.2f}%")
    return 0 if failures == 0 and (growth < 5 or a.prompts < 10) else 1


if __name__ == "__main__":
    sys.exit(main())
