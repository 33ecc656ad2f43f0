"""GPU acceptance in stages ordered by value (issue 22). Each stage runs in its own process group under its own time
limit and writes its JSON part under --out as soon as each step finishes, so a kill keeps what was done:

  a  every non-distributed example workflow through real ComfyUI servers: default, --lowvram with a forced partial
     load (--reserve-vram leaves about 2.5 GiB, less than the fp16 UNet) and --novram, each against an fp32
     reference server (--force-fp32, NVIDIA_TF32_OVERRIDE=0: no TF32 in cuBLAS or cuDNN); the LQ input (256 px)
     tiles the latent (sampler tile 96 < 128) and vae_tile_size 512 tiles the 1024 px VAE work.
  b  bench/bench_pipeline.py at 128->512 and 512->2048, device memory capped to a 24 GB card (--cap-gib).
  c  (separately: --stages c) 1024->4096, bench/bench_vae.py at 4096 and 8192 px under the same cap, and the
     ComfyUI 0.30.0 host with dynamic VRAM (a placeholder until that host exists: issue 20).
  d  (separately: --stages d, ~1 minute) bench/bench_live.py: ms per live preview update (fit 512 px, loupe 256 px)
     of a 512 px output with the full-size SD VAE against re-queueing the graph (issue 21 goal: <= 50 ms).

    bash scripts/gpu_check.sh --device "$OUT"               # on the GPU machine (bench/RESULTS.md: the exact call)
    bash scripts/gpu_check.sh --device "$OUT" --stages b    # rerun one stage
    bash scripts/gpu_check.sh --device "$OUT" --stages d    # live preview ms per update (issue 21)
    bash scripts/gpu_check.sh --out out/gpu --cpu --tiny    # what CI rehearses (tests/host/test_gpu_check.py)

Bounds (8-bit PSNR against the fp32 reference; why: bench/RESULTS.md "GPU acceptance"): 40 dB where the VAE runs in
fp16 or fp32, 35 dB where it runs in bf16 (ComfyUI's default VAE dtype on an H100); bench rows: bench_pipeline.py's
(40 dB; where the release uses its approximate tiled VAE, 40 dB against its algorithm with the plain VAE and a
15 dB gross-error guard against the release as run). Exit status 0 only if every stage that ran passed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from comfy_server import REPO, ComfyServer  # noqa: E402

BOUND_DB = {"fp16": 40.0, "fp32": 40.0, "bf16": 35.0}  # keyed by the VAE dtype of the compared setting
LIMITS_S = {"a": 300, "b": 210, "c": 540, "d": 150}  # per stage, on an H100 (step-by-step estimate: bench/RESULTS.md)
LEFT_GIB = 2.5  # --lowvram: device memory left by --reserve-vram (the fp16 SD 2.1 UNet is 1.6 GiB + inference)
CAP_GIB = 24.0
IGNORED = {"pisa_sr_lambda_sweep": {"10": "grid: its printed scores may differ in the last digit by precision",
                                    "12": "best: the argmax over nine close scores may flip by precision"}}
CURRENT: ComfyServer | None = None  # the server running now: its log tail goes into the report if the stage dies
SWEEP_IMAGES = "gc_sweep_images"  # added SaveImage of every sweep setting's decoded image (compared instead)


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def psnr_8bit(a, b) -> float:
    import numpy as np

    if a.shape != b.shape:
        return float("-inf")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ stage a
def workflow_names() -> list[str]:
    """Every example except the distributed ones (they need ComfyUI-Distributed workers and a video)."""
    out = []
    for p in sorted((REPO / "example_workflows" / "api").glob("*.json")):
        if not any("Distributed" in n["class_type"] for n in json.loads(p.read_text()).values()):
            out.append(p.stem)
    return out


def prepared(name: str, ckpt: str, pisa: str, image: str, vae_tile: int) -> dict:
    prompt = json.loads((REPO / "example_workflows" / "api" / f"{name}.json").read_text())
    files = {"CheckpointLoaderSimple": ("ckpt_name", ckpt), "PiSA_LoadLoRAs": ("lora_name", pisa),
             "LoadImage": ("image", image)}
    for nid, node in list(prompt.items()):
        ct, inputs = node["class_type"], node["inputs"]
        if ct in files:
            inputs[files[ct][0]] = os.path.basename(files[ct][1])
        if "vae_tile_size" in inputs:
            inputs["vae_tile_size"] = vae_tile
        if ct == "PiSA_LambdaSweep":
            prompt[SWEEP_IMAGES] = {"class_type": "SaveImage",
                                    "inputs": {"images": [nid, 6], "filename_prefix": SWEEP_IMAGES}}
    return prompt


def saved_images(srv: ComfyServer, entry: dict, name: str) -> dict:
    """{node id: [uint8 arrays]} of the SaveImage outputs that are compared."""
    import numpy as np
    from PIL import Image

    out = {}
    for nid, node_out in sorted(entry.get("outputs", {}).items()):
        if nid in IGNORED.get(name, {}):
            continue
        imgs = [srv.base / "output" / i.get("subfolder", "") / i["filename"] for i in node_out.get("images", [])
                if i.get("type") == "output"]
        if imgs:
            out[nid] = [np.asarray(Image.open(p).convert("RGB")) for p in imgs]
    return out


class env_set:
    """Environment variables for servers started inside (Popen copies os.environ at start)."""

    def __init__(self, **kv):
        self.kv, self.old = kv, {}

    def __enter__(self):
        for k, v in self.kv.items():
            self.old[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_setting(setting: str, flags: list[str], env: dict, names: list[str], ckpt: str, pisa: str, a) -> dict:
    from run_example import example_image

    srv = ComfyServer(models={"checkpoints": [ckpt], "pisa_sr": [pisa]}, extra_args=flags, cpu=a.cpu)
    image = example_image(str(srv.base / "input" / "gpu_check.png"), a.image_px, a.image_px)
    fe = srv.base / "frontend"  # no front-end package on the GPU machine: an empty web root
    fe.mkdir()
    (fe / "index.html").write_text("gpu_check\n")
    srv.extra_args = [*flags, "--front-end-root", str(fe)]
    out: dict = {"flags": flags, "env": env, "workflows": {}}
    log(f"a: starting the {setting} server {' '.join(flags)} {' '.join(f'{k}={v}' for k, v in env.items())}")
    t0 = time.time()
    global CURRENT
    CURRENT = srv
    with env_set(**env), srv.running():
        out["start_s"] = round(time.time() - t0, 1)
        log(f"a: {setting} server up in {out['start_s']}s")
        for name in names:
            t1 = time.time()
            entry = srv.run(prepared(name, ckpt, pisa, image, a.vae_tile), timeout=a.run_guard)
            images = saved_images(srv, entry, name)
            if not images:
                raise RuntimeError(f"{name} under {setting} wrote no image")
            out["workflows"][name] = {"seconds": round(time.time() - t1, 2), "images": images}
            log(f"a: {setting:<8} {name:<22} {out['workflows'][name]['seconds']:7.2f}s")
        out.update(server_log_facts(srv.log_path.read_text(errors="replace")))
    CURRENT = None
    return out


def server_log_facts(text: str) -> dict:
    """From ComfyUI 0.3.75's log: the VAE dtype ("VAE load device: ..., dtype: torch.bfloat16") and which models
    were loaded partially ("Requested to load BaseModel" ... "loaded partially; ...")."""
    vae, last, partial = None, None, []
    for ln in text.splitlines():
        if "VAE load device:" in ln and "dtype:" in ln:
            vae = ln.rsplit("dtype:", 1)[1].strip()
        elif "Requested to load " in ln:
            last = ln.split("Requested to load ", 1)[1].strip()
        elif "loaded partially" in ln:
            partial.append(last)
    return {"vae_dtype": vae, "partial_loads": partial}


def compare(setting: str, got: dict, ref: dict, cpu: bool) -> list[dict]:
    vae = (got.get("vae_dtype") or "torch.float32").replace("torch.", "")
    bound = BOUND_DB["bf16" if "bfloat16" in vae else "fp16" if "float16" in vae else "fp32"]
    rows = []
    for name, g in got["workflows"].items():
        want = ref["workflows"][name]["images"]
        values = []
        for nid, imgs in g["images"].items():
            w = want.get(nid, [])
            values += [psnr_8bit(x, y) for x, y in zip(imgs, w)] if len(imgs) == len(w) else [float("-inf")]
        worst = min(values) if values and g["images"].keys() == want.keys() else float("-inf")
        row = {"workflow": name, "setting": setting, "vae_dtype": vae, "bound_db": bound, "images": len(values),
               "seconds": g["seconds"], "fp32_seconds": ref["workflows"][name]["seconds"],
               "min_psnr_db": None if worst == float("inf") else round(worst, 2), "ok": worst >= bound}
        if setting == "lowvram" and not cpu:  # the UNet's partial-load path (and the double-LoRA fix) must run
            row["partial_loads"] = sorted(set(m for m in got["partial_loads"] if m))
            row["ok"] = row["ok"] and "BaseModel" in row["partial_loads"]
        rows.append(row)
    return rows


def device_total_gib() -> float:
    """In a throwaway process, so this one holds no CUDA context while the servers run."""
    code = "import torch; print(torch.cuda.get_device_properties(0).total_memory / 2**30)"
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def stage_a(a, part: dict, save) -> bool:
    import make_tiny_weights

    t0 = time.time()
    ckpt, pisa = make_tiny_weights.make(make_tiny_weights.cache_dir(), full=not a.tiny)
    part["weights"] = {"checkpoint": os.path.basename(ckpt), "full": not a.tiny, "seconds": round(time.time() - t0, 1)}
    log(f"a: weights ready in {part['weights']['seconds']}s")
    names = [n for n in a.workflows.split(",") if n] if a.workflows else workflow_names()
    settings = {"default": ([], {})}
    if not a.cpu:  # --lowvram / --novram change nothing on the CPU (no device memory to manage)
        reserve = a.reserve_gib if a.reserve_gib is not None else max(0.0, device_total_gib() - LEFT_GIB)
        part["reserve_vram_gib"] = round(reserve, 2)
        settings.update(lowvram=(["--lowvram", "--reserve-vram", f"{reserve:.2f}"], {}), novram=(["--novram"], {}))
    part.update(workflows=names, image_px=a.image_px, vae_tile_size=a.vae_tile, rows=[])
    ref = run_setting("fp32", ["--force-fp32"], {"NVIDIA_TF32_OVERRIDE": "0"}, names, ckpt, pisa, a)
    part["fp32_start_s"] = ref["start_s"]
    save()
    for setting, (flags, env) in settings.items():
        got = run_setting(setting, flags, env, names, ckpt, pisa, a)
        part["rows"] += compare(setting, got, ref, a.cpu)
        save()
    return all(r["ok"] for r in part["rows"]) and len(part["rows"]) == len(names) * len(settings)


# ------------------------------------------------------------------------------------------------ stages b, c
def streamed(cmd: list[str], prefix: str) -> tuple[int, list[str]]:
    """Run ``cmd``, echoing each output line live with ``prefix``; (exit status, the lines)."""
    log(f"{prefix} $ {' '.join(cmd[1:])}")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        print(f"  {prefix}| {lines[-1]}", flush=True)
    return proc.wait(), lines


def bench_rows(a, part: dict, save, workload: str, runs: int, warmup: int, modes: str = "default,adjustable",
               need_plain: bool = True) -> bool:
    """bench_pipeline.py rows. Where the release used its approximate tiled VAE a row passes on the gross-error
    guard against it plus 40 dB against the release's algorithm with the plain VAE (which stage c may not fit)."""
    out = Path(a.out) / f".bench_{workload.replace(':', '_')}.json"
    cmd = [sys.executable, str(REPO / "bench" / "bench_pipeline.py"), "--workloads", workload, "--runs", str(runs),
           "--warmup", str(warmup), "--modes", modes, "--json", str(out)]
    cmd += ["--cpu", "--tiny"] if a.cpu else ["--cap-gib", str(CAP_GIB)]
    rc, lines = streamed(cmd, f"bench {workload}")
    step = {"command": " ".join(cmd[1:]), "rc": rc}
    if rc == 0 and out.exists():
        result = json.loads(out.read_text())
        out.unlink()
        step["info"] = result["info"]
        for r in result["rows"]:
            plain, approx = r["psnr_plain_vae_db"], r["bound_db"] < r["plain_vae_bound_db"]
            ok = r["psnr_db"] >= r["bound_db"]
            if approx:
                ok = ok and (plain >= r["plain_vae_bound_db"] if plain is not None else not need_plain)
            part["rows"].append({"workload": r["workload"], "mode": r["mode"], "psnr_db": round(r["psnr_db"], 2),
                                 "bound_db": r["bound_db"], "ok": ok,
                                 "psnr_plain_vae_db": None if plain is None else round(plain, 2),
                                 "release_ms": round(1e3 * statistics.median(r["release"]["times"]), 1),
                                 "ours_ms": round(1e3 * statistics.median(r["ours"]["times"]), 1),
                                 "release_peak_mib": round(r["release"]["peak_bytes"] / 2 ** 20),
                                 "ours_peak_mib": round(r["ours"]["peak_bytes"] / 2 ** 20)})
        step["table"] = [ln for ln in lines if ln.startswith("|")]
    else:
        step["log_tail"] = lines[-40:]
    part.setdefault("steps", []).append(step)
    save()
    return rc == 0


def stage_b(a, part: dict, save) -> bool:
    part["rows"] = []
    if a.cpu:  # the rehearsal: the bench's imports and plumbing (diffusers from the carried wheels), one run
        return bench_rows(a, part, save, "128:512", 1, 0, "adjustable") and all(r["ok"] for r in part["rows"])
    ok = bench_rows(a, part, save, "128:512", 5, 1)
    ok = bench_rows(a, part, save, "512:2048", 2, 1) and ok
    return ok and all(r["ok"] for r in part["rows"]) and len(part["rows"]) == 4


def stage_c(a, part: dict, save) -> bool:
    part["rows"] = []
    part["comfyui_0_30_host"] = "not run: the ComfyUI 0.30.0 host (dynamic VRAM) does not exist yet (issue 20)"
    ok = a.cpu or bench_rows(a, part, save, "1024:4096", 1, 0, need_plain=False)
    cmd = [sys.executable, str(REPO / "bench" / "bench_vae.py"), "--runs", "1"]
    cmd += ["--cpu", "--tiny"] if a.cpu else ["--sizes", "4096", "8192", "--cap-gib", str(CAP_GIB)]
    rc, lines = streamed(cmd, "bench_vae")
    part["vae"] = {"command": " ".join(cmd[1:]), "rc": rc, "table": lines[-24:]}
    save()
    return ok and rc == 0 and all(r["ok"] for r in part["rows"])


def stage_d(a, part: dict, save) -> bool:
    """Speed only (no bound): the live preview's update times, reported; passes when the bench ran."""
    cmd = [sys.executable, str(REPO / "bench" / "bench_live.py"), "--sizes", "512", "--runs", "3"]
    cmd += ["--cpu", "--vaes", "tiny"] if a.cpu else ["--vaes", "sd"]
    rc, lines = streamed(cmd, "bench_live")
    part["live"] = {"command": " ".join(cmd[1:]), "rc": rc, "table": lines[-6:]}
    save()
    return rc == 0


STAGES = {"a": stage_a, "b": stage_b, "c": stage_c, "d": stage_d}


# ------------------------------------------------------------------------------------------------ orchestration
def on_sigterm(*_) -> None:
    """The stage's time is up: keep the running server's log tail (its folder is removed on the way out)."""
    global LAST_LOG
    LAST_LOG = CURRENT.log_tail(40).splitlines() if CURRENT is not None else []
    sys.exit(143)


LAST_LOG: list[str] = []


def run_stage_child(a) -> int:
    """One stage in this process (the parent bounds its time): its JSON is rewritten after every step."""
    path = Path(a.out) / f"stage_{a.stage}.json"
    part = {"stage": a.stage, "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    t0 = time.time()

    def save():
        part["seconds"] = round(time.time() - t0, 1)
        write_json(path, part)

    save()
    try:
        ok = STAGES[a.stage](a, part, save)
        part["status"] = "pass" if ok else "fail"
    except BaseException as e:  # recorded, never lost: the report says which step broke and how
        part["status"] = "timeout" if isinstance(e, SystemExit) else "error"
        part["error"] = f"{type(e).__name__}: {e}"[-4000:]
        part["server_log_tail"] = LAST_LOG or (CURRENT.log_tail(40).splitlines() if CURRENT is not None else [])
        log(f"{a.stage}: {part['error'][:1500]}")
    save()
    return 0 if part["status"] == "pass" else 1


def run_stage(a, stage: str, argv: list[str]) -> dict:
    """The stage in its own process group, killed (servers and benches with it) at its time limit."""
    limit = getattr(a, f"limit_{stage}")
    path = Path(a.out) / f"stage_{stage}.json"
    log(f"stage {stage}: start (limit {limit}s)")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, __file__, *argv, "--stage", stage], start_new_session=True)
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=grace)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
    part = json.loads(path.read_text()) if path.exists() else {"stage": stage}
    if proc.returncode is None or part.get("status") in (None, "running"):
        part["status"] = "timeout" if time.time() - t0 >= limit else "crashed"
    part["wall_s"] = round(time.time() - t0, 1)
    part["limit_s"] = limit
    write_json(path, part)
    return part


def summary_lines(part: dict) -> list[str]:
    s = part["stage"]
    lines = [f"stage {s}: {part['status'].upper()} in {part.get('wall_s', '?')}s (limit {part.get('limit_s')}s)"]
    for r in part.get("rows", []):
        flag = "ok " if r["ok"] else "BAD"
        if "workflow" in r:
            db = "identical" if r["min_psnr_db"] is None else f"{r['min_psnr_db']} dB"
            extra = f" partial loads {r['partial_loads']}" if "partial_loads" in r else ""
            lines.append(f"  {flag} {r['workflow']:<22} {r['setting']:<8} vae {r['vae_dtype']:<8} {db:>10} "
                         f">= {r['bound_db']}  {r['seconds']}s (fp32 {r['fp32_seconds']}s){extra}")
        else:
            plain = "" if r["psnr_plain_vae_db"] is None else f" (plain VAE {r['psnr_plain_vae_db']} dB >= 40)"
            lines.append(f"  {flag} {r['workload']:<10} {r['mode']:<10} {r['psnr_db']} dB >= {r['bound_db']}{plain}  "
                         f"release {r['release_ms']} ms / ours {r['ours_ms']} ms, peak {r['release_peak_mib']} / "
                         f"{r['ours_peak_mib']} MiB")
    if "live" in part:
        lines += [f"  bench_live rc {part['live']['rc']}:"] + [f"    {ln}" for ln in part["live"]["table"]]
    if "vae" in part:
        lines += [f"  bench_vae rc {part['vae']['rc']}:"] + [f"    {ln}" for ln in part["vae"]["table"][-12:]]
    if "error" in part:
        lines.append(f"  error: {part['error'][:600]}")
        lines += [f"  server| {ln}" for ln in part.get("server_log_tail", [])[-12:]]
    return lines


def device_info(cpu: bool) -> dict:
    code = ("import json, platform, torch; d = {'python': platform.python_version(), 'torch': torch.__version__};"
            "p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None;"
            "d.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda) if p else 0;"
            "print(json.dumps(d))")
    info = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                     text=True).stdout)
    info.update(cpu=cpu, host=platform.node())
    return info


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the report: stage_<x>.json and summary.json")
    ap.add_argument("--stages", default="a,b", help="comma list of a, b, c, d (c and d are separate calls: "
                    "c needs ~9 minutes)")
    ap.add_argument("--cpu", action="store_true", help="CPU only (default setting only: the others are no-ops)")
    ap.add_argument("--tiny", action="store_true", help="tiny random UNet instead of SD 2.1-base-shaped weights")
    ap.add_argument("--workflows", default="", help="comma list (default: every non-distributed example)")
    ap.add_argument("--image-px", type=int, default=None, help="LQ input size (default 256; --tiny 32)")
    ap.add_argument("--vae-tile", type=int, default=None, help="vae_tile_size in the prompts (default 512; --tiny 0)")
    ap.add_argument("--reserve-gib", type=float, default=None, help="--lowvram's --reserve-vram (default: the "
                    f"device's memory less {LEFT_GIB} GiB, so the UNet cannot fit)")
    ap.add_argument("--run-guard", type=float, default=600, help="hang guard per workflow run (s)")
    for s, lim in LIMITS_S.items():
        ap.add_argument(f"--limit-{s}", type=float, default=lim, help=f"stage {s} time limit (s)")
    ap.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)  # internal: run one stage here
    a = ap.parse_args(argv)
    a.image_px = a.image_px or (32 if a.tiny else 256)
    a.vae_tile = a.vae_tile if a.vae_tile is not None else (0 if a.tiny else 512)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.stage:
        signal.signal(signal.SIGTERM, on_sigterm)  # finally blocks stop the servers
        return run_stage_child(a)
    stages = [s for s in a.stages.split(",") if s]
    for s in stages:
        if s not in STAGES:
            ap.error(f"unknown stage {s!r}; use a, b, c, d")
    t0 = time.time()
    info = device_info(a.cpu)
    if not a.cpu and "gpu" not in info:
        ap.error("no CUDA device: use --cpu --tiny")
    log(f"device {info}; stages {stages}; out {a.out}")
    parts = [run_stage(a, s, argv) for s in stages]
    ok = all(p["status"] == "pass" for p in parts)
    summary = {"ok": ok, "device": info, "seconds": round(time.time() - t0, 1), "command": argv,
               "bounds_db": {"vae_" + k: v for k, v in BOUND_DB.items()},
               "stages": {p["stage"]: p["status"] for p in parts}}
    write_json(Path(a.out) / "summary.json", summary)
    print("\n==== gpu_check summary ====", flush=True)
    for p in parts:
        print("\n".join(summary_lines(p)))
    print(f"gpu_check: {'PASS' if ok else 'FAIL'} in {summary['seconds']}s -> {a.out}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
