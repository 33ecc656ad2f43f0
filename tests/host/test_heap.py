"""Freed host memory goes back to the OS after our heavy nodes (the soak's RSS plateau, issue 4)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import host

from pisa_sr import heap


def _rss_mib() -> float:
    return int(re.search(r"^VmRSS:\s+(\d+)", Path("/proc/self/status").read_text(), re.MULTILINE)[1]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_trim_returns_retained_arena_pages(monkeypatch):
    monkeypatch.delenv(heap.DISABLE_ENV, raising=False)
    heap.trim_heap()
    # Freeing one 24 MiB block raises glibc's mmap threshold, so the 2 MiB blocks after it come from the heap;
    # freeing every other one leaves holes that no top-of-heap trim can return, only malloc_trim.
    big = torch.ones(6 << 20)
    del big
    blocks = [torch.ones(1 << 19) for _ in range(200)]  # 200 x 2 MiB
    before = _rss_mib()
    del blocks[::2]
    held = _rss_mib()
    assert heap.trim_heap() is True
    after = _rss_mib()
    print(f"RSS with blocks {before:.0f} MiB, 200 MiB freed {held:.0f}, trimmed {after:.0f}")
    assert held - after > 100, "malloc_trim returned less than half of the 200 MiB freed in holes"
    del blocks


def test_disable_switch(monkeypatch):
    monkeypatch.setenv(heap.DISABLE_ENV, "1")
    assert heap.trim_heap() is False


@pytest.mark.parametrize("node_id", ["PiSA_EncodeLQ", "PiSA_Sample", "PiSA_Decode", "PiSA_LambdaSweep"])
def test_heavy_nodes_trim_even_when_they_refuse(node_id, monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "trim_heap", lambda: calls.append(1) or True)
    with pytest.raises(Exception):
        host.node(node_id).execute(**{"latent": None, "image": None, "vae": None, "model": None, "positive": None})
    assert calls == [1]
