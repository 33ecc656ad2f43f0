"""The GPU acceptance command cannot rot, and its first real run cannot fail on packaging: the CI rehearsal runs the
documented device command, `bash scripts/gpu_check.sh --device OUT`, in `--cpu --tiny` mode in a venv built like the
GPU machine's image (scripts/device-image.txt: torch 2.11.0, transformers 5.17, peft ...; Python 3.12 where this
machine has it), installing only the wheels that scripts/prepare_device.sh puts into .whl/ with --no-index, inside
a network namespace with nothing but loopback, so a missing wheel, a version difference or a network call fails
here. One workflow and the 128->512 bench row keep it cheap; the GPU run does every workflow and setting. Stage d
runs that workflow on the second host, ComfyUI 0.30.0 unpacked from .whl/ComfyUI-0.30.0.tar.xz, on the same Python
(--force-fp32 and --disable-dynamic-vram: dynamic VRAM itself needs an NVIDIA GPU)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
pytestmark = pytest.mark.slow


def _device_env() -> dict:
    """PISA_DEVICE_PYTHON / PISA_DEVICE_WHEELS from prepare_device.sh --venv (builds and caches what is missing)."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "prepare_device.sh"), "--venv"], cwd=REPO,
                          capture_output=True, text=True, timeout=3600)  # hang guard only
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(limit 64 MiB)" in proc.stderr  # the size of what travels is printed and was checked
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if line.startswith("PISA_DEVICE_"))


def _offline(cmd: str) -> list[str]:
    """``cmd`` with loopback only (root: a new network namespace); plain where namespaces are not allowed."""
    if shutil.which("unshare") and shutil.which("ip") and subprocess.run(
            ["unshare", "--net", "true"], capture_output=True).returncode == 0:
        return ["unshare", "--net", "bash", "-c", f"ip link set lo up && {cmd}"]
    return ["bash", "-c", cmd]


@pytest.mark.one_host("runs gpu_check.sh --device in its own venv with its own ComfyUI 0.3.75 from the wheel "
                      "list; the host env is stripped")
def test_device_command_offline_cpu_tiny(tmp_path):
    dev = _device_env()
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PISA_HOST_PYTHON", "PISA_COMFY_DIR", "PISA_HOST_PYTHON_0300",
                        "PISA_COMFY_DIR_0300", "VIRTUAL_ENV", "PISA_SERVER_PRELOAD")}
    env.update(dev, PISA_DEVICE_SITE=str(tmp_path / "site"), PYTHONUNBUFFERED="1")
    cmd = _offline(f"bash scripts/gpu_check.sh --device {out} --cpu --tiny --workflows pisa_sr_basic --stages a,b,d "
                   "--limit-a 3000 --limit-b 3000 --limit-d 3000")  # the stage limits are for an H100: hang guards here
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)  # hang guard
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "==== gpu_check summary ====" in proc.stdout and "gpu_check: PASS" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["stages"] == {"a": "pass", "b": "pass", "d": "pass"}
    assert summary["device"]["torch"].startswith("2.11.0") and summary["device"]["cpu"]
    a = json.loads((out / "stage_a.json").read_text())
    (row,) = a["rows"]
    assert row["workflow"] == "pisa_sr_basic" and row["setting"] == "default" and row["ok"] and row["images"] >= 1
    assert row["min_psnr_db"] is None  # CPU: the default setting already computes in fp32, so identical
    assert not a["weights"]["full"]
    b = json.loads((out / "stage_b.json").read_text())
    (brow,) = b["rows"]
    assert brow["workload"] == "128->512" and brow["ok"] and brow["psnr_db"] >= brow["bound_db"] == 40.0
    d = json.loads((out / "stage_d.json").read_text())
    assert d["comfyui"].endswith("ComfyUI-0.30.0") and not d["weights"]["full"]
    (drow,) = d["rows"]
    assert drow["workflow"] == "pisa_sr_basic" and drow["setting"] == "no_dynamic" and drow["ok"]
    assert drow["min_psnr_db"] is None and drow["dynamic_vram"] is False  # fp32 on a CPU; dynamic VRAM needs a GPU
    names = ["stage_a.json", "stage_b.json", "stage_d.json", "summary.json"]
    assert sorted(p.name for p in out.iterdir()) == names  # <= 8 files


def test_stage_time_limit_keeps_the_report(tmp_path):
    """A stage that outlives its limit is killed with its servers; its JSON part and the summary still appear."""
    cmd = [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out", str(tmp_path), "--cpu", "--tiny",
           "--workflows", "pisa_sr_basic", "--stages", "a", "--limit-a", "3"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)  # hang guard only
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    part = json.loads((tmp_path / "stage_a.json").read_text())
    assert part["status"] == "timeout" and part["limit_s"] == 3
    assert json.loads((tmp_path / "summary.json").read_text())["stages"] == {"a": "timeout"}
    assert "stage a: TIMEOUT" in proc.stdout and "gpu_check: FAIL" in proc.stdout


def test_prepared_prompts():
    """Distributed examples are left out; every compared sweep image is free of printed scores; VAE tiles are set."""
    import gpu_check

    names = gpu_check.workflow_names()
    assert names and not any("distributed" in n for n in names) and "pisa_sr_lambda_sweep" in names
    p = gpu_check.prepared("pisa_sr_lambda_sweep", "c.safetensors", "l.pkl", "i.png", 512)
    saves = {nid for nid, n in p.items() if n["class_type"] == "SaveImage"}
    ignored = set(gpu_check.IGNORED["pisa_sr_lambda_sweep"])
    assert ignored < saves and p[gpu_check.SWEEP_IMAGES]["inputs"]["images"][0] in p
    sweep = p[p[gpu_check.SWEEP_IMAGES]["inputs"]["images"][0]]
    assert sweep["class_type"] == "PiSA_LambdaSweep"
    grid = [nid for nid in ignored if p[p[nid]["inputs"]["images"][0]]["class_type"] == "PiSA_LabelledGrid"]
    assert grid  # the grid with printed scores is the one left out of the comparison
    assert all(n["inputs"]["vae_tile_size"] == 512 for n in p.values() if "vae_tile_size" in n["inputs"])
