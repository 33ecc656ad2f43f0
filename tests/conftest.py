"""Pytest bootstrap for both tiers, one folder each.

tests/core: the pure-torch core; never boots ComfyUI. ``bash scripts/run_tests.sh --core`` runs only this folder
            (seconds), and tests/host.py refuses to boot there.
tests/host: everything against the real ComfyUI 0.3.75 host, in-process on the CPU; tests/host/conftest.py boots it
            once, before the folder's modules are imported. The shared modules (helpers, references, tiny weights)
            live here in tests/.
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


def pytest_configure(config):
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
    return None


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


