"""The ComfyUI test host (0.3.75 or 0.30.0, whichever PISA_COMFY_DIR names), booted in-process on the CPU by scripts/comfy_boot.py when a test first needs it.

Only tests and fixtures that use ComfyUI import this module (conftest does so before collecting any test module that
is not in the core tier). The host folder comes from ``PISA_COMFY_DIR``, set by scripts/run_tests.sh.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if os.environ.get("PISA_TEST_TIER") == "core":
    raise RuntimeError("the core test tier must not boot ComfyUI: a module marked `pytestmark = pytest.mark.core` "
                       "imported tests/host.py (directly or through tiny_models/conftest fixtures); unmark it")
sys.path.insert(0, str(REPO / "scripts"))

import comfy_boot  # noqa: E402
from comfy_boot import comfy_nodes, node, pack  # noqa: E402,F401  (the test-facing API)

BASE_DIR = comfy_boot.boot(base_dir=os.environ.get("PISA_TEST_BASE"), cpu=True, pytorch_attention=True)
COMFY_DIR = Path(os.environ["PISA_COMFY_DIR"])  # the ComfyUI folder booted above
import comfyui_version  # noqa: E402  (in COMFY_DIR, on sys.path since boot)

VERSION = comfyui_version.__version__  # "0.3.75" or "0.30.0": for messages and screenshots, never for branching
