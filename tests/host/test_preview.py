"""The decode node's before/after previews (nodes/preview.py): what web/pisa_sr.js draws its slider from."""
from __future__ import annotations

from pathlib import Path

import folder_paths
import torch
from PIL import Image

import host
from helpers import encode_lq

preview = host.pack("nodes.preview")


def lq_info(h: int, w: int):
    lq = torch.arange(h * w * 3).remainder(256).to(torch.uint8).reshape(1, h, w, 3)
    return host.pack("nodes.lq_info").LQInfo(lq_u8=lq, plan=object())  # comparison_images reads only the LQ image


def test_previews_share_the_result_size_and_stay_small():
    res, lq = preview.comparison_images(torch.rand(1, 96, 80, 3), lq_info(128, 104))
    assert res.shape == lq.shape == (1, 96, 80, 3)  # the LQ is resized to the result's size
    big, big_lq = preview.comparison_images(torch.rand(2, 600, 2400, 3), lq_info(150, 600))
    assert big.shape == big_lq.shape == (2, 256, 1024, 3)  # long side capped, aspect kept, batch-1 LQ expanded
    assert 0 <= float(big_lq.min()) and float(big_lq.max()) <= 1
    only, none = preview.comparison_images(torch.rand(1, 64, 64, 3), None)
    assert only.shape == (1, 64, 64, 3) and none is None


def test_ui_output_is_written_as_temp_images():
    result = torch.rand(1, 48, 40, 3)
    ui = preview.comparison_ui(result, lq_info(24, 20))
    assert set(ui) == {"images", preview.LQ_KEY}
    for item in ui["images"] + ui[preview.LQ_KEY]:
        assert item["type"] == "temp"
        path = Path(folder_paths.get_temp_directory()) / item["subfolder"] / item["filename"]
        assert Image.open(path).size == (40, 48)
    assert set(preview.comparison_ui(result, None)) == {"images"}


def test_preview_failure_never_fails_the_node(monkeypatch, caplog):
    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(preview, "preview_images", broken)
    assert preview.comparison_ui(torch.rand(1, 8, 8, 3), None) is None
    assert "disk full" in caplog.text


def test_decode_node_returns_the_previews_and_an_unchanged_image(world):
    """Through the registered node: the IMAGE output is decode_hq's, the UI output names the two previews."""
    lat = encode_lq(world.comfy_vae, torch.rand(1, 32, 32, 3), upscale=2)
    out = host.node("PiSA_Decode").execute(latent=lat, vae=world.comfy_vae, color_fix="adain")
    assert torch.equal(out.result[0], host.pack("nodes.decode").decode_hq(lat, world.comfy_vae, "adain"))
    assert len(out.ui["images"]) == 1 and len(out.ui["pisa_lq"]) == 1
