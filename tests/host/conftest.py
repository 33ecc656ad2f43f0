"""The host tier: the ComfyUI host named by PISA_COMFY_DIR (0.3.75 or 0.30.0) boots once (tests/host.py) before this
folder's modules are imported, with the pack loaded as a custom node whose ``pisa_sr`` is the one top-level core
(scripts/comfy_boot.py), so tests import the core as ``pisa_sr`` like the core tier does."""
from __future__ import annotations

import pytest
import torch

import host
from helpers import run_node

host.comfy_boot.load_pack()


@pytest.fixture(scope="session")
def world():
    """Tiny diffusers + ComfyUI twins with the same random weights, and a release-layout PiSA checkpoint."""
    import tiny_models

    return tiny_models.tiny_world(seed=0)


@pytest.fixture(scope="session")
def pisa_files(world):
    """The synthetic checkpoint as models/pisa_sr/tiny_pisa.pkl and its .safetensors conversion."""
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
