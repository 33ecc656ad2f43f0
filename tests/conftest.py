"""Pytest bootstrap, in two tiers.

core: modules marked ``pytestmark = pytest.mark.core`` test the pure-torch core and never boot ComfyUI;
      ``bash scripts/run_tests.sh --core`` runs only them (seconds).
full: every other module runs against the real ComfyUI 0.3.75 host, in-process on the CPU; the host boots
      (tests/host.py) just before the first such module is imported.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
sys.path.insert(1, str(TESTS.parent))  # the core package `pisa_sr`; ComfyUI's folder goes before it on boot

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

_CORE_MARK = re.compile(r"^pytestmark\s*=.*\bpytest\.mark\.core\b", re.MULTILINE)


def _is_core(path: Path) -> bool:
    return bool(_CORE_MARK.search(path.read_text(encoding="utf-8")))


def pytest_addoption(parser):
    parser.addoption("--core", action="store_true", help="run only the core tier (no ComfyUI host)")


def pytest_configure(config):
    config.addinivalue_line("markers", "core: pure-torch core test; never boots ComfyUI (run alone with --core)")
    if config.getoption("core"):
        os.environ["PISA_TEST_TIER"] = "core"  # tests/host.py refuses to boot in this tier
    config.pluginmanager.register(_RepoRootIsAFolder(), "pisa-repo-root")


class _RepoRootIsAFolder:
    """pytest would import the repo root (the pack's package, whose __init__ imports ComfyUI) as a package when the
    clone's folder name is an identifier; the tests load the pack as ComfyUI does (tests/host.py). Registered
    globally: conftest hooks do not reach the folder above tests/."""

    @staticmethod
    def pytest_collect_directory(path, parent):
        return pytest.Dir.from_parent(parent, path=path) if path == TESTS.parent else None


def pytest_ignore_collect(collection_path, config):
    if config.getoption("core") and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return not _is_core(collection_path) or None


def pytest_collect_file(file_path, parent):
    """Boot the host before importing a module that needs it (modules import comfy at their top)."""
    if (file_path.suffix == ".py" and file_path.name.startswith("test_") and "host" not in sys.modules
            and not parent.config.getoption("core") and not _is_core(file_path)):
        import host  # noqa: F401


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def world():
    """Tiny diffusers + ComfyUI twins with the same random weights, and a release-layout PiSA checkpoint."""
    import tiny_models

    return tiny_models.tiny_world(seed=0)


@pytest.fixture(scope="session")
def pisa_files(world):
    """The synthetic checkpoint as models/pisa_sr/tiny_pisa.pkl and its .safetensors conversion."""
    import host
    from pisa_sr.checkpoint import parse_release_dict
    from pisa_sr.convert import safetensors_bytes

    folder = host.BASE_DIR / "models" / "pisa_sr"
    pkl = folder / "tiny_pisa.pkl"
    torch.save(world.ckpt, pkl)
    st = folder / "tiny_pisa.safetensors"
    st.write_bytes(safetensors_bytes(parse_release_dict(world.ckpt)))
    return {"pkl": pkl.name, "safetensors": st.name}


@pytest.fixture(scope="session")
def ref(world):
    from reference import ReleaseReference

    return ReleaseReference(world.unet, world.vae, world.ckpt, world.context)


@pytest.fixture(scope="session")
def pisa_model(world, pisa_files):
    """The node-side MODEL: world.model with the PiSA LoRAs applied by Load PiSA LoRAs."""
    return run_node("PiSA_LoadLoRAs", model=world.model, lora_name=pisa_files["pkl"])[0]


@pytest.fixture(scope="session")
def tiny_weights():
    """(checkpoint, PiSA LoRA file): the tiny SD 2.x weights real-server tests load (scripts/make_tiny_weights.py)."""
    import make_tiny_weights  # in scripts/, on the path once tests/host.py ran

    return make_tiny_weights.make(make_tiny_weights.cache_dir())


def run_node(node_id: str, **inputs):
    """Call a registered node's execute() the way unit tests of V3 nodes do; returns its outputs tuple."""
    import host

    return host.node(node_id).execute(**inputs).result

