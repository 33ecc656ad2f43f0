"""GPU acceptance in one command (issue 13): every example workflow through a real ComfyUI server under the default,
--lowvram and --novram settings, each output checked against an fp32 run of the same graph (--force-fp32) on the same
device; then the side-by-side benchmark rows of bench/RESULTS.md; one JSON with everything.

    bash scripts/gpu_check.sh [--json out/gpu_check.json]      # CUDA, full-size SD 2.1-base-shaped random weights
    bash scripts/gpu_check.sh --cpu --tiny                     # what CI runs so that this cannot rot

On the CPU, --lowvram / --novram change nothing in ComfyUI (no device memory to manage), so --cpu runs the default
setting only; the fp32 reference is still a separate server. Exit status 0 only if every check passed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from comfy_server import REPO, ComfyServer, use_files  # noqa: E402

MIN_PSNR_DB = 40.0  # issue 13: fp16 (and lower-memory loads) against fp32, same graph, same device
GPU_SETTINGS = {"default": [], "lowvram": ["--lowvram"], "novram": ["--novram"]}
REFERENCE = ["--force-fp32"]


def psnr_8bit(a, b) -> float:
    import numpy as np

    if a.shape != b.shape:
        return float("-inf")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def workflow_names() -> list[str]:
    return sorted(p.stem for p in (REPO / "example_workflows" / "api").glob("*.json"))


def prepared(name: str, ckpt: str, pisa: str, image: str) -> dict:
    prompt = json.loads((REPO / "example_workflows" / "api" / f"{name}.json").read_text())
    use_files(prompt, ckpt, pisa, image)
    return prompt


def run_setting(flags: list[str], names: list[str], ckpt: str, pisa: str, cpu: bool, image_px: int,
                timeout: float) -> dict:
    """{workflow: {"seconds", "images": [uint8 arrays]}} from one fresh server started with ``flags``."""
    import numpy as np
    from PIL import Image
    from run_example import example_image

    srv = ComfyServer(models={"checkpoints": [ckpt], "pisa_sr": [pisa]}, extra_args=flags, cpu=cpu)
    image = example_image(str(srv.base / "input" / "gpu_check.png"), image_px, image_px)
    out = {}
    with srv.running():
        for name in names:
            t0 = time.time()
            entry = srv.run(prepared(name, ckpt, pisa, image), timeout=timeout)
            paths = sorted(srv.output_images(entry))
            if not paths:
                raise RuntimeError(f"{name} under {flags or 'default'} wrote no image")
            out[name] = {"seconds": round(time.time() - t0, 2),
                         "images": [np.asarray(Image.open(p).convert("RGB")) for p in paths]}
    return out


def compare(runs: dict, ref: dict) -> list[dict]:
    rows = []
    for setting, per_wf in runs.items():
        for name, got in per_wf.items():
            want = ref[name]["images"]
            values = [psnr_8bit(a, b) for a, b in zip(got["images"], want)] if len(got["images"]) == len(want) \
                else [float("-inf")]
            worst = min(values)
            identical = worst == float("inf")
            rows.append({"workflow": name, "setting": setting, "images": len(got["images"]),
                         "seconds": got["seconds"], "fp32_seconds": ref[name]["seconds"],
                         "min_psnr_db": None if identical else round(worst, 2), "identical": identical,
                         "ok": worst >= MIN_PSNR_DB})
    return rows


def run_bench(cpu: bool, tiny: bool, timeout: float) -> dict:
    """bench/bench_pipeline.py in its own process (its rows are those of bench/RESULTS.md)."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check_bench_{os.getpid()}.json"
    cmd = [sys.executable, str(REPO / "bench" / "bench_pipeline.py"), "--json", str(out)]
    if cpu:
        cmd.append("--cpu")
    if tiny:
        cmd += ["--tiny", "--runs", "1", "--warmup", "0"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    result = {"command": " ".join(cmd[1:]), "seconds": round(time.time() - t0, 1), "rc": proc.returncode}
    if proc.returncode == 0 and out.exists():
        result.update(json.loads(out.read_text()))
        out.unlink()
    else:
        result["log_tail"] = (proc.stdout + proc.stderr)[-4000:]
    return result


def device_info(cpu: bool) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu}
    if not cpu and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2 ** 30, 1), cuda=torch.version.cuda)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="CPU only (no --lowvram/--novram runs: no-ops there)")
    ap.add_argument("--tiny", action="store_true", help="tiny random UNet instead of SD 2.1-base-shaped weights")
    ap.add_argument("--json", default=str(REPO / "out" / "gpu_check.json"))
    ap.add_argument("--workflows", default=",".join(workflow_names()), help="comma list (default: every example)")
    ap.add_argument("--image-px", type=int, default=None, help="LQ input size (default 128 GPU, 32 --tiny)")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--timeout", type=float, default=900, help="hang guard per workflow run")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still stops the servers (finally blocks)
    import torch

    if not a.cpu and not torch.cuda.is_available():
        ap.error("no CUDA device: use --cpu --tiny")
    import make_tiny_weights

    t0 = time.time()
    ckpt, pisa = make_tiny_weights.make(make_tiny_weights.cache_dir(), full=not a.tiny)
    report = {"device": device_info(a.cpu), "weights": {"checkpoint": os.path.basename(ckpt),
                                                        "lora": os.path.basename(pisa), "full": not a.tiny,
                                                        "seconds": round(time.time() - t0, 1)},
              "min_psnr_db": MIN_PSNR_DB}
    names = [n for n in a.workflows.split(",") if n]
    px = a.image_px or (32 if a.tiny else 128)
    settings = {"default": []} if a.cpu else GPU_SETTINGS
    ref = run_setting(REFERENCE, names, ckpt, pisa, a.cpu, px, a.timeout)
    runs = {s: run_setting(flags, names, ckpt, pisa, a.cpu, px, a.timeout) for s, flags in settings.items()}
    report["workflows"] = compare(runs, ref)
    report["bench"] = None if a.no_bench else run_bench(a.cpu, a.tiny, max(a.timeout, 600))
    bench = report["bench"]
    bench_ok = bench is None or (bench["rc"] == 0 and bool(bench.get("rows"))
                                 and all(r["psnr_db"] >= MIN_PSNR_DB for r in bench["rows"]))
    ok = all(r["ok"] for r in report["workflows"]) and bench_ok
    report["ok"] = ok
    report["seconds"] = round(time.time() - t0, 1)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(report, indent=1))
    for r in report["workflows"]:
        psnr = "identical" if r["identical"] else f"{r['min_psnr_db']} dB"
        print(f"{'ok ' if r['ok'] else 'BAD'} {r['workflow']:<22} {r['setting']:<8} {psnr:>10}  {r['seconds']}s")
    print(f"gpu_check: {'PASS' if ok else 'FAIL'} in {report['seconds']}s -> {a.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
