"""Freed host memory goes back to the OS after our heavy nodes (the soak's RSS plateau, issue 4)."""
from __future__ import annotations

import inspect
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


@pytest.mark.parametrize("node_id", ["PiSA_EncodeLQ", "PiSA_Sample", "PiSA_Decode", "PiSA_LambdaSweep",
                                     "PiSA_LivePreview"])
def test_heavy_nodes_trim_even_when_they_refuse(node_id, monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "trim_heap", lambda: calls.append(1) or True)
    with pytest.raises(Exception):
        host.node(node_id).execute(**{"latent": None, "image": None, "vae": None, "model": None, "positive": None})
    assert calls == [1]


def test_live_preview_store_stays_bounded_over_many_runs(world, pisa_model):
    """Samplers run in prompts (hidden unique_id and prompt as the executor passes them): one entry per node id,
    at most MAX_ENTRIES, each 3 latents fp32 + the conditioning, however many runs."""
    live = host.pack("nodes.live")
    core = host.pack("pisa_sr.live")
    live.STORE.clear()
    (lat,) = host.node("PiSA_EncodeLQ").execute(image=torch.rand(1, 24, 32, 3), vae=world.comfy_vae, upscale=4,
                                                resize_filter="bicubic").result
    cls = host.node("PiSA_Sample")
    # how the executor hands a V3 node its hidden inputs (comfy_api/latest/_io.py): 0.3.75's
    # PREPARE_CLASS_CLONE(hidden_inputs) takes the dict, 0.30.0's PREPARE_CLASS_CLONE(v3_data) reads
    # v3_data["hidden_inputs"]
    v3_data = "v3_data" in inspect.signature(cls.PREPARE_CLASS_CLONE).parameters
    for run in range(12):
        node_id = str(run % 6)
        hidden = {"UNIQUE_ID": node_id, "PROMPT": {node_id: {"class_type": "PiSA_Sample", "inputs": {}}}}
        clone = cls.PREPARE_CLASS_CLONE({"hidden_inputs": hidden} if v3_data else hidden)
        out = clone.execute(model=pisa_model, positive=world.conditioning, latent=lat, lambda_pix=0.5,
                            lambda_sem=1.5, tile_size=96, tile_overlap=32).result[0]
        assert live.STORE.get(out["pisa_live"]) is not None
        assert len(live.STORE) <= core.MAX_ENTRIES
    latent_bytes = lat["samples"].numel() * 4
    ctx_bytes = world.conditioning[0][0].numel() * 4
    assert len(live.STORE) == core.MAX_ENTRIES
    assert live.STORE.nbytes() <= core.MAX_ENTRIES * (3 * latent_bytes + ctx_bytes)
    live.STORE.clear()
