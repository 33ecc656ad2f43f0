"""The one routine that boots ComfyUI in-process, in main.py's order, with this pack installed as a custom node.

Used by the tests (tests/host.py), the benchmarks and the scripts. The first ``boot`` wins; later calls return the
same base folder, so a script called from inside the test process reuses the tests' host.
"""
from __future__ import annotations

import asyncio
import atexit
import importlib
import importlib.abc
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACK_NAME = "ComfyUI-PiSA-SR"
_SUBFOLDERS = ("custom_nodes", "models/checkpoints", "models/pisa_sr", "models/loras", "output", "input", "temp")
_base: Path | None = None
_comfy_dir: Path | None = None
_loaded = False


def boot(comfy_dir: str | None = None, base_dir: str | None = None, *, cpu: bool = True,
         pytorch_attention: bool = True) -> Path:
    """Import ComfyUI (``comfy_dir``, default ``$PISA_COMFY_DIR``) with a throwaway base folder holding models/,
    input/, output/ and custom_nodes/<this pack>; returns the base folder.

    ``pytorch_attention`` is --use-pytorch-cross-attention: ComfyUI's CUDA default. Its CPU default (sub-quadratic
    attention) sizes chunks from *free memory*, so its rounding changes with machine load; SDPA keeps the
    equivalence bounds reproducible and is what the release side of the benchmark uses.
    """
    global _base, _comfy_dir
    if _base is not None:
        return _base
    comfy_dir = comfy_dir or os.environ.get("PISA_COMFY_DIR")
    if not comfy_dir or not Path(comfy_dir, "comfy").is_dir():
        raise RuntimeError("PISA_COMFY_DIR is not set to a ComfyUI folder. Run through `bash scripts/run_tests.sh`, "
                           "or `eval \"$(bash scripts/setup_host.sh)\"; export PISA_COMFY_DIR` first.")
    _comfy_dir = Path(comfy_dir).resolve()
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    if str(REPO) not in sys.path:
        sys.path.insert(1, str(REPO))  # the core package `pisa_sr` is importable on its own
    import comfy.options  # noqa: F401  (argument parsing stays off)
    from comfy.cli_args import args

    base = Path(base_dir or tempfile.mkdtemp(prefix="pisa-host-"))
    if not base_dir:  # a throwaway base goes with the process (rmtree unlinks the pack's symlink, never follows it)
        atexit.register(shutil.rmtree, base, ignore_errors=True)
    args.cpu = cpu
    args.use_pytorch_cross_attention = pytorch_attention
    args.disable_all_custom_nodes = False
    args.base_directory = str(base)
    # nodes.py prepends ComfyUI/comfy to sys.path; import the top-level `utils` package first, as main.py does.
    import utils.extra_config  # noqa: F401
    import utils.install_util  # noqa: F401

    for sub in _SUBFOLDERS:
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    import folder_paths

    if Path(folder_paths.models_dir) != base / "models":
        raise RuntimeError(f"ComfyUI was imported before boot(): models dir is {folder_paths.models_dir}")
    folder_paths.set_temp_directory(str(base / "temp"))
    _base = base
    return base


class _OneCore(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """The pack's ``pisa_sr`` subpackage is the top-level ``pisa_sr`` (the repo root is on sys.path): one copy of the
    core in the process, so a test's or benchmark's ``from pisa_sr.x import C`` is the class the nodes use."""

    def __init__(self) -> None:
        self._specs: dict[str, object] = {}

    def find_spec(self, name, path=None, target=None):
        head, sep, tail = name.partition(".pisa_sr")
        if sep and head.endswith(PACK_NAME) and (not tail or tail.startswith(".")):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module("pisa_sr" + spec.name.partition(".pisa_sr")[2])
        self._specs[spec.name] = module.__spec__  # the import system overwrites it; put back in exec_module
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self._specs.pop(module.__spec__.name)


def load_pack() -> None:
    """Load the pack the way ComfyUI loads any custom node folder (idempotent)."""
    global _loaded
    if _loaded:
        return
    if _base is None:
        boot()
    sys.meta_path.insert(0, _OneCore())
    import folder_paths

    nodes = comfy_nodes()
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(_base / "custom_nodes")], set())
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    if "PiSA_Sample" not in nodes.NODE_CLASS_MAPPINGS:
        raise RuntimeError("the PiSA-SR pack did not register its nodes; see the log above")
    _loaded = True


def comfy_nodes():
    """ComfyUI's own top-level ``nodes.py``. The repo root is on sys.path too (for ``pisa_sr``) and holds this pack's
    ``nodes/`` package, so where the name resolved is checked rather than left to sys.path order."""
    if _base is None:
        boot()
    mod = importlib.import_module("nodes")
    if Path(mod.__file__).resolve().parent != _comfy_dir:
        raise RuntimeError(f"'nodes' resolved to {mod.__file__}, not ComfyUI's nodes.py in {_comfy_dir}")
    return mod


def node(node_id: str):
    """The registered class for ``node_id`` (a V3 io.ComfyNode subclass for our nodes)."""
    load_pack()
    return comfy_nodes().NODE_CLASS_MAPPINGS[node_id]


def pack(submodule: str = ""):
    """A module of the loaded pack (ComfyUI registers it under its folder path), e.g. ``pack("nodes.sample")``."""
    load_pack()
    root = next(k for k in sys.modules if k.endswith(PACK_NAME) and "." not in k[len(str(_base)):])
    return importlib.import_module(f"{root}.{submodule}") if submodule else sys.modules[root]
