"""Pytest bootstrap: every test session runs against the real ComfyUI 0.3.75 host, in-process on the CPU."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import host  # noqa: E402,F401  (boots ComfyUI before any test module imports comfy)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (server, soak, browser); run in CI")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
