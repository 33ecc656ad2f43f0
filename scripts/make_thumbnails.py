"""Make the example workflows' thumbnails (example_workflows/<name>.jpg, shown by ComfyUI's template browser) from real
runs: each API twin runs through a real headless ComfyUI, and the thumbnail puts the input (enlarged, pixelated) beside
the output, labelled with the workflow's setting.

Without arguments it uses the tiny generated test weights, which are random: the "output" half is then NOT a real
super-resolution result, and the thumbnail says so. With --ckpt (SD 2.1-base) and --pisa (pisa_sr.pkl) and an --image,
it makes real ones.

    $PISA_HOST_PYTHON scripts/make_thumbnails.py [--ckpt CKPT --pisa PISA --image LQ.png] [--only pisa_sr_basic]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from build_workflows import OUT_API, OUT_UI  # noqa: E402
from comfy_server import ComfyServer, use_files  # noqa: E402
from run_example import example_image  # noqa: E402

# Per workflow: caption, and the generated input's size (the large one is tiled: 160x128 at x4 -> 640x512 px, a latent
# of 80x64 > 64^2 tiles).
CAPTIONS = {
    "pisa_sr_basic": ("x4, release default", "lambda_pix 1.0 / lambda_sem 1.0", (128, 128)),
    "pisa_sr_adjustable": ("x4, adjustable mode", "lambda_pix 0.8 / lambda_sem 1.5", (128, 128)),
    "pisa_sr_large_tiled": ("x4, large image, tiled", "64 px latent tiles, overlap 24", (160, 128)),
    "pisa_sr_lambda_sweep": ("x4, lambda sweep", "3x3 grid of (lambda_pix, lambda_sem) settings", (128, 128)),
    # These two need ComfyUI-Distributed's nodes in the server (not installed here): their thumbnails were composed
    # with compose() from a single-participant run of the batch example in tests/host/test_distributed.py.
    "pisa_sr_distributed_batch": ("x4, batch over several GPUs", "master + workers (ComfyUI-Distributed)", (32, 32)),
    "pisa_sr_distributed_video": ("x4, video over several GPUs", "frames shared by master + workers", (32, 32)),
}
DEFAULT_CAPTION = ("x4", "", (128, 128))
THUMB_H = 256  # height of each half
TINY_NOTE = "tiny RANDOM test weights: not a real result"


def compose(lq_path: str, out_path: str, title: str, subtitle: str, tiny: bool):
    """Input (nearest-neighbour enlarged to the output size, so its pixels show) | output, with labels."""
    from PIL import Image, ImageDraw, ImageFont

    lq = Image.open(lq_path).convert("RGB")
    out = Image.open(out_path).convert("RGB")
    w = round(THUMB_H * out.width / out.height)
    left = lq.resize(out.size, Image.NEAREST).resize((w, THUMB_H), Image.LANCZOS)
    right = out.resize((w, THUMB_H), Image.LANCZOS)
    top, bottom, gap = 44, 26 if tiny else 0, 4
    W, H = 2 * w + gap, top + THUMB_H + bottom
    img = Image.new("RGB", (W, H), (24, 24, 28))
    img.paste(left, (0, top))
    img.paste(right, (w + gap, top))
    d = ImageDraw.Draw(img)
    big, small = ImageFont.load_default(size=17), ImageFont.load_default(size=12)
    d.text((8, 4), f"PiSA-SR {title}", fill=(240, 240, 240), font=big)
    d.text((8, 25), subtitle, fill=(170, 170, 180), font=small)

    def tag(x, y, text):
        box = d.textbbox((x, y), text, font=small)
        d.rectangle((box[0] - 4, box[1] - 3, box[2] + 4, box[3] + 3), fill=(0, 0, 0))
        d.text((x, y), text, fill=(255, 255, 255), font=small)

    tag(8, top + 8, f"input {lq.width}x{lq.height}")
    tag(w + gap + 8, top + 8, f"output {out.width}x{out.height}")
    if tiny:
        d.text((8, top + THUMB_H + 6), TINY_NOTE, fill=(255, 190, 90), font=small)
    return img


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="SD 2.1-base checkpoint (default: tiny generated weights)")
    ap.add_argument("--pisa", help="pisa_sr.pkl or its .safetensors conversion (default: tiny generated LoRA)")
    ap.add_argument("--image", help="low-quality input image (default: a generated test picture)")
    ap.add_argument("--only", action="append", help="workflow name(s) to redo (default: all)")
    ap.add_argument("--out-dir", default=OUT_UI)
    ap.add_argument("--timeout", type=float, default=1800)
    a = ap.parse_args()
    if bool(a.ckpt) != bool(a.pisa):
        ap.error("give both --ckpt and --pisa, or neither (tiny generated weights)")
    tiny = not a.ckpt
    if tiny:
        import make_tiny_weights

        ckpt, pisa = make_tiny_weights.make(make_tiny_weights.cache_dir())
    else:
        ckpt, pisa = os.path.abspath(a.ckpt), os.path.abspath(a.pisa)
    names = a.only or sorted(f[:-5] for f in os.listdir(OUT_API) if f.endswith(".json"))
    srv = ComfyServer(models={"checkpoints": [ckpt], "pisa_sr": [pisa]}, inputs=[a.image] if a.image else None)
    with srv.running():
        for name in names:
            title, subtitle, (w, h) = CAPTIONS.get(name, DEFAULT_CAPTION)
            if a.image:
                image = str(srv.base / "input" / os.path.basename(a.image))
            else:
                image = example_image(str(srv.base / "input" / f"lq_{w}x{h}.png"), w, h)
            prompt = json.load(open(os.path.join(OUT_API, name + ".json")))
            use_files(prompt, ckpt, pisa, image)
            t0 = time.time()
            outs = srv.output_images(srv.run(prompt, timeout=a.timeout))
            if not outs:
                raise RuntimeError(f"{name}: the workflow saved no image")
            # several saved images (e.g. a sweep's grid and its best pick): show the largest, the overview
            from PIL import Image

            out = max(outs, key=lambda p: Image.open(p).width * Image.open(p).height)
            thumb = compose(image, str(out), title, subtitle, tiny)
            dst = os.path.join(a.out_dir, name + ".jpg")
            thumb.save(dst, quality=88)
            print(f"{dst} ({thumb.width}x{thumb.height}) from a {time.time() - t0:.0f}s run", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
