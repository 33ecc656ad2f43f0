"""scripts/gpu_check.sh cannot rot: its ``--cpu --tiny`` mode runs every example workflow through real servers (the
default setting and the --force-fp32 reference), compares them, runs the benchmark rows, and writes its one JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_gpu_check_cpu_tiny(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--cpu", "--tiny", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True,
                          text=True, timeout=1800)  # hang guard only
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["device"]["cpu"] and not report["weights"]["full"]
    examples = {p.stem for p in (REPO / "example_workflows" / "api").glob("*.json")}
    rows = report["workflows"]
    assert {r["workflow"] for r in rows} == examples and {r["setting"] for r in rows} == {"default"}
    assert all(r["ok"] and r["images"] >= 1 for r in rows)
    assert report["bench"]["rc"] == 0 and report["bench"]["rows"]
    assert all(r["psnr_db"] >= report["min_psnr_db"] for r in report["bench"]["rows"])
