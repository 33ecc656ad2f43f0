"""The side-by-side benchmark keeps working: its ``--cpu --tiny`` mode at minimal size (one run of the adjustable
mode, the 128->512 workload) completes and reports our output at >= 40 dB PSNR against the release-equivalent pipeline
in fp32. No timing is asserted. ``--self-check`` also proves the release-equivalent tiled VAE equals the plain VAE
on one tile (its task lists are the network) and runs on several."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_cpu_tiny_runs(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "bench" / "bench_pipeline.py"), "--cpu", "--tiny", "--runs", "1",
           "--warmup", "0", "--modes", "adjustable", "--self-check", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True,
                          timeout=3600)  # hang guard only
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| workload | mode | release ms (min-max) | ours ms (min-max) |" in proc.stdout
    assert "| 128->512 | adjustable |" in proc.stdout
    assert "tiled VAE self-check: ok" in proc.stdout
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    print(f"bench smoke: PSNR ours vs release {row['psnr_db']:.1f} dB")
    assert row["psnr_db"] >= 40.0
    assert result["info"]["precision"] == "fp32"
    assert row["ours"]["times"] and row["release"]["times"]
