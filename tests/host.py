"""Bring up the ComfyUI 0.3.75 test host in-process (CPU), in the boot order main.py uses.

Importing this module is idempotent. The host folder comes from ``PISA_COMFY_DIR`` (set by scripts/run_tests.sh,
which builds it with scripts/setup_host.sh).
"""
from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACK_NAME = "ComfyUI-PiSA-SR"

COMFY_DIR = os.environ.get("PISA_COMFY_DIR")
if not COMFY_DIR or not Path(COMFY_DIR, "comfy").is_dir():
    raise RuntimeError(
        "PISA_COMFY_DIR is not set to a ComfyUI folder. Run the tests with `bash scripts/run_tests.sh`, "
        "which builds the ComfyUI 0.3.75 test host and sets it."
    )

if COMFY_DIR not in sys.path:
    sys.path.insert(0, COMFY_DIR)
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))  # the core package `pisa_sr` is importable on its own

import comfy.options  # noqa: E402  (argument parsing stays off)
from comfy.cli_args import args  # noqa: E402

BASE_DIR = Path(os.environ.get("PISA_TEST_BASE") or tempfile.mkdtemp(prefix="pisa-host-"))
args.cpu = True
args.disable_all_custom_nodes = False
args.base_directory = str(BASE_DIR)  # models/, output/, input/ and custom_nodes/ of this throwaway host
# ComfyUI's CPU default (sub-quadratic attention) sizes its chunks from *free memory*, so its rounding changes with
# machine load; PyTorch SDPA (ComfyUI's CUDA default) does not, which keeps the equivalence bounds reproducible.
args.use_pytorch_cross_attention = True
# nodes.py prepends ComfyUI/comfy to sys.path; import the top-level `utils` package first, as main.py does.
import utils.extra_config  # noqa: E402,F401
import utils.install_util  # noqa: E402,F401

for sub in ("custom_nodes", "models/checkpoints", "models/pisa_sr", "models/loras", "output", "input", "temp"):
    (BASE_DIR / sub).mkdir(parents=True, exist_ok=True)
_link = BASE_DIR / "custom_nodes" / PACK_NAME
if not _link.exists():
    _link.symlink_to(REPO, target_is_directory=True)

import folder_paths  # noqa: E402

assert Path(folder_paths.models_dir) == BASE_DIR / "models", folder_paths.models_dir
folder_paths.set_temp_directory(str(BASE_DIR / "temp"))

import nodes as comfy_nodes  # noqa: E402  (ComfyUI's own nodes.py)

_loaded = False


def load_pack() -> None:
    """Load our pack the way ComfyUI loads any custom node folder."""
    global _loaded
    if _loaded:
        return
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(BASE_DIR / "custom_nodes")], set())
    asyncio.run(comfy_nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    if "PiSA_Sample" not in comfy_nodes.NODE_CLASS_MAPPINGS:
        raise RuntimeError("the PiSA-SR pack did not register its nodes; see the log above")
    _loaded = True


def node(node_id: str):
    """The registered class for ``node_id`` (a V3 io.ComfyNode subclass for our nodes)."""
    load_pack()
    return comfy_nodes.NODE_CLASS_MAPPINGS[node_id]


def pack(submodule: str = ""):
    """A module of the loaded pack (ComfyUI registers it under its folder path), e.g. ``pack("nodes.sample")``."""
    import importlib

    load_pack()
    root = next(k for k in sys.modules if k.endswith(PACK_NAME) and "." not in k[len(str(BASE_DIR)):])
    return importlib.import_module(f"{root}.{submodule}") if submodule else sys.modules[root]
