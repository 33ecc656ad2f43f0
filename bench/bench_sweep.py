"""Cost of a 9-setting PiSA Lambda Sweep relative to one adjustable Dual-Guided One-Step Sample (and to 9 samples).

The sweep evaluates eps_pix and eps_sem once (the adjustable sampler's UNet call) and forms every setting as a linear
combination, so its cost should be about one adjustable sample however many settings it has. Measured on the tiny
random-weight CPU models of the tests (tests/tiny_models.py), in-process through the registered nodes; the ratio,
not the absolute time, is the result. No assertions.

    eval "$(bash scripts/setup_host.sh)"; export PISA_COMFY_DIR
    "$PISA_HOST_PYTHON" bench/bench_sweep.py              # 9 settings, latent 64x71 (untiled) and 128x142 (tiled)
    "$PISA_HOST_PYTHON" bench/bench_sweep.py --choose     # also: choose_best=sharpness (decodes and scores all 9)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402

import host  # noqa: E402  (boots the ComfyUI 0.3.75 test host; needs PISA_COMFY_DIR)
import tiny_models  # noqa: E402
from helpers import make_image, pil_to_image  # noqa: E402

SETTINGS = "pix=0.5:1.5:0.5 sem=0.5:1.5:0.5"  # 3 x 3 = 9 settings
WALL = False


def run(node_id: str, **inputs):
    return host.node(node_id).execute(**inputs).result


def timed(fns: dict, runs: int) -> dict:
    """Fastest of ``runs`` timings per case after a warm-up, the cases interleaved so that a busy neighbour slows
    them alike. Process CPU time (all threads) by default: on a shared machine wall time mostly measures the
    neighbours; ``--wall`` switches to wall-clock time."""
    clock = time.perf_counter if WALL else time.process_time
    for fn in fns.values():
        fn()  # warm-up
    best = {k: float("inf") for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = clock()
            fn()
            best[k] = min(best[k], clock() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="timed runs per case (fastest reported), after a warm-up")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--choose", action="store_true", help="also time choose_best=sharpness against sample+decode")
    ap.add_argument("--wall", action="store_true", help="report wall-clock instead of process CPU time")
    args = ap.parse_args()
    global WALL
    WALL = args.wall
    torch.set_num_threads(args.threads)

    world = tiny_models.tiny_world(seed=0)
    torch.save(world.ckpt, host.BASE_DIR / "models" / "pisa_sr" / "bench_sweep.pkl")
    (model,) = run("PiSA_LoadLoRAs", model=world.model, lora_name="bench_sweep.pkl")
    cond, vae = world.conditioning, world.comfy_vae
    n_settings = len(host.pack("pisa_sr.sweep").parse_lambda_pairs(SETTINGS))

    print(f"PiSA Lambda Sweep bench: tiny CPU models, {args.threads} thread(s), fastest of {args.runs} run(s), "
          f"{'wall-clock' if WALL else 'process CPU'} seconds")
    # 40x36 is pre-resized (short side x4 < 512) to a 568x512 model image: latent 64x71, one tile. 284x256 x4 is
    # 1136x1024: latent 128x142, tiled 2x2 at 96/32.
    for w, h in ((40, 36), (284, 256)):
        (lat,) = run("PiSA_EncodeLQ", image=pil_to_image(make_image(w, h, seed=1)), vae=vae, upscale=4,
                     resize_filter="bicubic")
        lh, lw = lat["samples"].shape[-2:]
        label = f"latent {lh}x{lw}, " + ("tiled 96/32" if lh * lw > 96 * 96 else "untiled")

        def sample(lp=0.5, ls=1.5):
            return run("PiSA_Sample", model=model, positive=cond, latent=lat, lambda_pix=lp, lambda_sem=ls,
                       tile_size=96, tile_overlap=32)

        def sweep(**kw):
            return run("PiSA_LambdaSweep", model=model, positive=cond, latent=lat, settings=SETTINGS,
                       tile_size=96, tile_overlap=32, **kw)

        pairs = host.pack("pisa_sr.sweep").parse_lambda_pairs(SETTINGS)
        t = timed({"one": sample, "sweep": sweep}, args.runs)
        t_one, t_sweep = t["one"], t["sweep"]
        t_each = timed({"each": lambda: [sample(lp, ls) for lp, ls in pairs]}, max(1, args.runs // 2))["each"]
        print(f"[{label}] one adjustable PiSA_Sample {t_one:.3f} s | {n_settings}-setting sweep {t_sweep:.3f} s "
              f"| {n_settings} x PiSA_Sample {t_each:.3f} s")
        print(f"[{label}] sweep / one adjustable sample = {t_sweep / t_one:.2f}x; "
              f"{n_settings} samples / sweep = {t_each / t_sweep:.2f}x faster")
        if args.choose:
            def sample_decode():
                (hq,) = sample()
                return run("PiSA_Decode", latent=hq, vae=vae, color_fix="adain")

            t = timed({"sd": sample_decode,
                       "choose": lambda: sweep(choose_best="sharpness", fidelity_floor_db=0.0, vae=vae)}, args.runs)
            t_sd, t_choose = t["sd"], t["choose"]
            print(f"[{label}] choose_best=sharpness sweep {t_choose:.3f} s = {t_choose / t_sd:.2f}x one "
                  f"sample + decode ({t_sd:.3f} s); it decodes {n_settings} settings + the pix-only reference")


if __name__ == "__main__":
    main()
