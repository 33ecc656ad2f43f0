"""Live lambda preview (issue 21): one preview update (fit view, loupe) against queueing the graph again at the new
setting, both through ComfyUI's executor in-process (bench/_comfy_side.py), with the pack's own route building the
preview prompt. Re-queueing keeps the loaders and Encode LQ cached (ComfyUI's cache), so a re-run costs the UNet
step, the full decode and the colour fix; a preview costs the decode of the view (fit: the whole frame, then an area
downscale; loupe: a crop with its halo). Goal: a loupe at 1024 px output >= 10x faster than a re-run.

    eval "$(bash scripts/setup_host.sh)"; export PISA_COMFY_DIR
    "$PISA_HOST_PYTHON" bench/bench_live.py --cpu                    # tiny weights and the full-size SD VAE, 512 + 1024
    "$PISA_HOST_PYTHON" bench/bench_live.py --cpu --vaes tiny --runs 3

Milliseconds of process CPU time (all threads; --wall: wall clock, right on an idle machine or a GPU), fastest of
--runs after one warm-up per case (--runs 1: no warm-up beyond the first queue, which loads the models and encodes
the LQ), settings alternating so nothing is answered from the cache. No assertions.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tests"))

SIZES = {512: 128, 1024: 256}  # output px -> LQ px at x4 (no pre-resize)
SETTINGS = [(0.5, 1.0), (1.2, 0.4), (0.8, 1.5)]
FIT_SIZE, LOUPE_SIZE = 512, 256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--comfy-dir", default=os.environ.get("PISA_COMFY_DIR"))
    ap.add_argument("--sizes", type=int, nargs="*", default=[512, 1024], choices=sorted(SIZES))
    ap.add_argument("--vaes", nargs="*", default=["tiny", "sd"], choices=["tiny", "sd"],
                    help="tiny: the tests' tiny UNet and VAE; sd: the tiny UNet with the full-size SD VAE")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wall", action="store_true", help="wall-clock time (default on a GPU) instead of process CPU")
    args = ap.parse_args()

    import _comfy_side

    base = _comfy_side.boot(args.comfy_dir, cpu=args.cpu)
    import torch

    import _weights
    import numpy as np

    torch.set_num_threads(args.threads)
    live = _comfy_side.comfy_boot.pack("nodes.live")
    node_id = _comfy_side.comfy_boot.pack("pisa_sr.live").PREVIEW_NODE_ID
    device = "cpu" if args.cpu else "cuda"
    wall = args.wall or not args.cpu
    clock = time.perf_counter if wall else time.process_time
    print(f"live preview bench: {device}, {args.threads} thread(s), {'wall' if wall else 'process CPU'} ms, fastest of {args.runs} "
          f"(fit <= {FIT_SIZE} px, loupe {LOUPE_SIZE} px); load: {os.getloadavg()[0]:.1f} (1 min avg)", flush=True)
    for vae in args.vaes:
        arch = _weights.TINY if vae == "tiny" else dataclasses.replace(
            _weights.TINY, name="tiny UNet + SD VAE", vae=_weights.FULL.vae, comfy_vae=_weights.FULL.comfy_vae)
        weights = _weights.build(arch, 0)
        pipe = _comfy_side.OurPipeline(weights, None, None, base)
        ex = pipe.executor
        for out_px in args.sizes:
            lq = SIZES[out_px]
            pil = _weights.make_image(lq, lq, seed=lq)
            _comfy_side._REGISTRY["image"] = torch.from_numpy(np.asarray(pil).astype(np.float32) / 255.0)[None]

            def execute(prompt: dict, outputs: list[str]) -> None:
                ex.execute(prompt, str(uuid.uuid4()), {}, outputs)
                if not ex.success:
                    raise RuntimeError([m for m in ex.status_messages if m[0] == "execution_error"])

            def queue(lp: float, ls: float) -> str:
                execute(_comfy_side.graph(lp, ls, run=out_px), ["7"])  # a new run value per image: re-encoded
                return ex.history_result["outputs"]["5"]["pisa_live"][0]["token"]

            def preview(token: str, lp: float, ls: float, **view) -> None:
                status, answer = live.answer({"token": token, "lambda_pix": lp, "lambda_sem": ls, "seq": 0, **view})
                if status != 200:
                    raise RuntimeError(answer)
                execute(answer["prompt"], [node_id])

            def best(fn) -> float:
                times = []
                for r in range(args.runs + (args.runs > 1)):  # with several runs, the first is a warm-up
                    lp, ls = SETTINGS[r % len(SETTINGS)]
                    t = clock()
                    fn(lp, ls)
                    times.append(clock() - t)
                return min(times[1:] if args.runs > 1 else times)

            queue(0.8, 1.5)  # loads the models, encodes the LQ (cached from here on)
            t_rerun = best(lambda lp, ls: queue(lp, ls))
            token = queue(0.8, 1.5)  # adjustable: both eps kept
            t_fit = best(lambda lp, ls: preview(token, lp, ls, view="fit", size=FIT_SIZE))
            t_loupe = best(lambda lp, ls: preview(token, lp, ls, view="loupe", size=LOUPE_SIZE, x=out_px // 2,
                                                  y=out_px // 2))
            label = f"[{arch.name}, {out_px} px output]"
            print(f"{label} re-run {1e3 * t_rerun:.0f} ms | fit {1e3 * t_fit:.0f} ms ({t_rerun / t_fit:.1f}x faster) | "
                  f"loupe {1e3 * t_loupe:.0f} ms ({t_rerun / t_loupe:.1f}x faster) | load {os.getloadavg()[0]:.1f}",
                  flush=True)
        pipe = ex = None  # the executor and its cache go before the next VAE
        _comfy_side._REGISTRY.clear()
    print(f"store: {len(live.STORE)} entries, {live.STORE.nbytes() / 2 ** 20:.1f} MiB")


if __name__ == "__main__":
    main()
