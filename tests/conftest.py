"""Pytest bootstrap for both tiers, one folder each.

tests/core: the pure-torch core; never boots ComfyUI. ``bash scripts/run_tests.sh --core`` runs only this folder
            (seconds), and tests/host.py refuses to boot there.
tests/host: everything against a real ComfyUI host (PISA_COMFY_DIR), in-process on the CPU; tests/host/conftest.py
            boots it once, before the folder's modules are imported. The shared modules (helpers, references, tiny
            weights) live here in tests/.

scripts/run_tests.sh runs pytest once per host (0.3.75, then 0.30.0). The later hosts' runs set PISA_SECOND_HOST=1:
the core tier and the tests marked ``one_host`` ran on the first host already and are left out (never skipped).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
sys.path.insert(1, str(TESTS.parent))  # the core package `pisa_sr`; ComfyUI's folder goes before it on boot

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_addoption(parser):
    parser.addoption("--core", action="store_true", help="run only the core tier (no ComfyUI host)")


SECOND_HOST = os.environ.get("PISA_SECOND_HOST") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "one_host(reason): does not depend on the ComfyUI host (say why); on a second "
                            "host's run (PISA_SECOND_HOST=1) it is deselected, as it ran on the first")
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
    if config.getoption("core") and collection_path == TESTS / "host":
        return True
    if SECOND_HOST and collection_path == TESTS / "core":
        return True
    return None


def pytest_collection_modifyitems(config, items):
    """On a second host's run, deselect what ran on the first host and cannot differ (``one_host``, with a reason)."""
    if not SECOND_HOST:
        return
    once = []
    for item in items:
        mark = item.get_closest_marker("one_host")
        if mark is not None:
            if not (mark.args and str(mark.args[0]).strip()):
                raise pytest.UsageError(f"{item.nodeid}: one_host needs a reason (why the host cannot matter)")
            once.append(item)
    if once:
        config.hook.pytest_deselected(items=once)
        drop = set(map(id, once))
        items[:] = [i for i in items if id(i) not in drop]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


