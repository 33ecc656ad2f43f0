"""scripts/gpu_check.sh cannot rot: its ``--cpu --tiny`` mode runs an example workflow through real servers (the
default setting and the --force-fp32 reference), compares them and writes its one JSON. One workflow and no bench
keep it cheap (the bench's own CPU mode is tests/test_bench_smoke.py); the GPU run does every workflow."""
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
    cmd = [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--cpu", "--tiny", "--workflows", "pisa_sr_basic",
           "--no-bench", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True,
                          text=True, timeout=1800)  # hang guard only
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["device"]["cpu"] and not report["weights"]["full"]
    (row,) = report["workflows"]
    assert row["workflow"] == "pisa_sr_basic" and row["setting"] == "default"
    assert row["ok"] and row["images"] >= 1 and row["identical"]  # CPU: the default setting already computes in fp32
    assert report["bench"] is None
