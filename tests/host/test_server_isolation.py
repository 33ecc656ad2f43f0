"""Isolation through a real server: after PiSA graphs ran (one completed, one interrupted with /interrupt), a plain
KSampler graph on the same loaded base MODEL (the checkpoint loader's cached output, shared with the PiSA graphs)
gives bit-identical pixels to its run before any PiSA graph."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from PIL import Image

import host
from comfy_server import HANG_GUARD_S, ComfyServer, PromptFailed, use_files
from run_example import example_image

pytestmark = pytest.mark.slow


def ksampler_graph(ckpt: str, repeat_latent: bool = False) -> dict:
    """``repeat_latent``: the same latent through RepeatLatentBatch(amount=1), so the executor runs the sampler
    again (another input link) on the same cached MODEL, CLIP and VAE."""
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                  "latent_image": ["4", 0], "seed": 7, "steps": 2, "cfg": 3.0,
                                                  "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "plain"}},
    }
    if repeat_latent:
        graph["8"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["4", 0], "amount": 1}}
        graph["5"]["inputs"]["latent_image"] = ["8", 0]
    return graph


def pisa_graph(ckpt: str, lora: str, image: str, **sample) -> dict:
    prompt = json.loads((host.REPO / "example_workflows" / "api" / "pisa_sr_basic.json").read_text())
    for node in use_files(prompt, ckpt, lora, image).values():
        if node["class_type"] == "PiSA_Sample":
            node["inputs"].update(sample)
    return prompt


def pixels(srv: ComfyServer, entry: dict) -> np.ndarray:
    (path,) = srv.output_images(entry)
    return np.asarray(Image.open(path).convert("RGB"))


def test_plain_graph_unchanged_after_pisa_and_interrupt(tiny_weights):
    ckpt, lora = tiny_weights
    cn, ln = os.path.basename(ckpt), os.path.basename(lora)
    srv = ComfyServer(models={"checkpoints": [ckpt], "pisa_sr": [lora]})
    with srv:
        # 0. the plain graph before any PiSA graph ran
        want = pixels(srv, srv.run(ksampler_graph(cn, repeat_latent=True)))
        img = os.path.basename(example_image(str(srv.base / "input" / "lq.png"), 64, 64))
        # 1. a completed adjustable-mode run (bypass hooks on the shared UNet modules during the call)
        srv.run(pisa_graph(cn, ln, img, lambda_pix=0.7, lambda_sem=1.4))
        # 2. an interrupted run: many small latent tiles so it is mid-loop when /interrupt arrives
        pid = srv.queue(pisa_graph(cn, ln, img, lambda_pix=1.2, lambda_sem=0.6, tile_size=16, tile_overlap=8))
        deadline = time.time() + HANG_GUARD_S
        while time.time() < deadline and not srv.get("/queue")["queue_running"]:
            time.sleep(0.2)
        time.sleep(2.0)
        t0 = time.time()
        srv.interrupt()
        with pytest.raises(PromptFailed) as exc:
            srv.wait(pid)
        stopped_after = time.time() - t0
        msgs = json.dumps(exc.value.entry["status"]["messages"])
        assert "execution_interrupted" in msgs, msgs
        print(f"interrupted run stopped {stopped_after:.1f}s after /interrupt")
        # 3. the plain graph again, on the same loaded MODEL (its loader is cached, its sampler runs again)
        entry = srv.run(ksampler_graph(cn))
        cached = sum((m[1]["nodes"] for m in entry["status"]["messages"] if m[0] == "execution_cached"), [])
        assert "1" in cached and "5" not in cached, cached
        got = pixels(srv, entry)
        # 4. and PiSA still works after the interruption
        again = srv.run(pisa_graph(cn, ln, img))
        assert srv.output_images(again)
    srv.cleanup()
    assert got.shape == want.shape
    assert np.array_equal(got, want), f"max pixel difference {np.abs(got.astype(int) - want.astype(int)).max()}"
