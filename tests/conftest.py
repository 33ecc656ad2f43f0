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


def run_node(node_id: str, **inputs):
    """Call a registered node's execute() the way unit tests of V3 nodes do; returns its outputs tuple."""
    out = host.node(node_id).execute(**inputs)
    return out.result
