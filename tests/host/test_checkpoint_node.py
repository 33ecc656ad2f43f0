"""The checkpoint as Load PiSA LoRAs uses it (ComfyUI host tier): the file cache and the converted file's output."""
from __future__ import annotations

import os

import pytest
import torch

import host
from helpers import run_node
from hostile_files import small_release_dict, torch_save_bytes
from pisa_sr import convert as conv
from pisa_sr.checkpoint import load_checkpoint


def test_pkl_and_safetensors_fixture_files_are_identical(pisa_files):
    folder = host.BASE_DIR / "models" / "pisa_sr"
    conv.verify_identical(load_checkpoint(str(folder / pisa_files["pkl"])),
                          load_checkpoint(str(folder / pisa_files["safetensors"])))


def test_replaced_file_is_reloaded_even_with_the_same_size_and_mtime(tmp_path):
    """Issue 11, finding 7: the cache keys on the bytes read, not on size and mtime."""
    read_loras = host.pack("nodes.load_loras").read_loras
    p = tmp_path / "pisa_swap.pkl"
    first, second = (torch_save_bytes(small_release_dict(seed=s)) for s in (0, 1))
    assert len(first) == len(second) and first != second
    p.write_bytes(first)
    st = os.stat(p)
    a = read_loras(str(p))
    p.write_bytes(second)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(p).st_mtime_ns == st.st_mtime_ns and os.stat(p).st_size == st.st_size
    b = read_loras(str(p))
    module = "down_blocks.0.resnets.0.conv1"
    want = small_release_dict(seed=1)["state_dict_unet"][f"{module}.lora_A.default_encoder_pix.weight"]
    assert torch.equal(b.pix.pairs[module].down, want)
    assert not torch.equal(a.pix.pairs[module].down, b.pix.pairs[module].down)
    assert read_loras(str(p)) is b  # unchanged bytes: served from the cache


def test_refusal_names_the_node_once():
    p = host.BASE_DIR / "models" / "pisa_sr" / "empty.pkl"
    p.write_bytes(b"")
    from pisa_sr.checkpoint import CheckpointError as err
    try:
        with pytest.raises(err, match=r"^Load PiSA LoRAs: PiSA-SR checkpoint 'empty.pkl': is empty") as ei:
            run_node("PiSA_LoadLoRAs", model=None, lora_name="empty.pkl")
        assert str(ei.value).count("Load PiSA LoRAs") == 1
    finally:
        p.unlink()
