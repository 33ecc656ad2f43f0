"""Live preview core (pisa_sr/live.py): the bounded store, the setting's latent, the request checks, the loupe
geometry and the preview prompt's graph."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pisa_sr import live
from pisa_sr.errors import PisaError
from pisa_sr.guidance import combine_eps



def entry(node_id: str = "6", b: int = 1, h: int = 8, w: int = 10, pix: bool = True, prompt: dict | None = None):
    g = torch.Generator().manual_seed(int(node_id) if node_id.isdigit() else 0)
    z, ep, es = (torch.randn(b, 4, h, w, generator=g) for _ in range(3))
    return live.LiveEntry(token=live.new_token(), node_id=node_id, prompt=prompt or PROMPT, z_lq=z,
                          eps_pix=ep if pix else None, eps_sem=es, context=torch.zeros(1, 77, 16),
                          to_raw=lambda t: t / 0.18215, lambda_pix=0.8, lambda_sem=1.5,
                          sampling={"tile_size": 96, "tile_overlap": 32, "precision": "auto"})


# The adjustable example's API graph, plus a second decoder branch and an unrelated node.
PROMPT = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd.safetensors"}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
    "3": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
    "4": {"class_type": "PiSA_LoadLoRAs", "inputs": {"lora_name": "pisa_sr.pkl", "model": ["1", 0]}},
    "5": {"class_type": "PiSA_EncodeLQ", "inputs": {"upscale": 4, "image": ["3", 0], "vae": ["1", 2]}},
    "6": {"class_type": "PiSA_Sample", "inputs": {"lambda_pix": 0.8, "lambda_sem": 1.5, "model": ["4", 0],
                                                 "positive": ["2", 0], "latent": ["5", 0]}},
    "7": {"class_type": "PiSA_Decode", "inputs": {"color_fix": "adain", "latent": ["6", 0], "vae": ["1", 2]}},
    "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0]}},
    "9": {"class_type": "EmptyImage", "inputs": {"width": 8}},
}


def decoder(out=(80, 64)) -> live.Decoder:
    return live.Decoder("7", "adain", 0, 0.0, ["1", 2], live.vae_nodes(PROMPT, ["1", 2]), out)


def test_store_keeps_one_entry_per_node_and_drops_the_least_recently_used():
    store = live.LiveStore(max_entries=3)
    first = entry("1")
    store.put(first)
    again = entry("1")
    store.put(again)  # the same sampler ran again: its old token is gone
    assert store.get(first.token) is None and store.get(again.token) is again and len(store) == 1
    others = [entry(str(i)) for i in (2, 3)]
    for e in others:
        store.put(e)
    assert store.get(again.token) is again  # used: now the most recent
    store.put(entry("4"))
    assert store.get(others[0].token) is None and store.get(again.token) is again and len(store) == 3
    assert store.get(None) is None and store.get(123) is None


def test_store_bytes_stay_bounded_over_many_runs():
    store = live.LiveStore()
    for run in range(50):
        store.put(entry(str(run % 7), b=2))
        one = entry("0", b=2)
        bound = live.MAX_ENTRIES * (one.nbytes() + 8 * 4 * 2 * 3 * 4)  # + MAX_STATS pairs of [2,3,1,1] stats
        assert len(store) <= live.MAX_ENTRIES and store.nbytes() <= bound
    e = store.get(next(iter(store._by_token)))
    for i in range(20):
        e.put_stats(("7", 0, float(i), 1.0), (torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)))
    assert len(e.stats) == live.MAX_STATS


@settings(max_examples=60, deadline=None)
@given(st.floats(-2, 4), st.floats(-2, 4))
def test_latent_of_a_setting_is_the_samplers_formula(lp, ls):
    e = entry()
    want = (e.z_lq - combine_eps(e.eps_pix, e.eps_sem, lp, ls)) / 0.18215
    assert torch.equal(e.latent(0, lp, ls), want)


def test_requests_are_checked_field_by_field():
    ok = {"token": "t", "lambda_pix": 1.0, "lambda_sem": 0.5}
    r = live.parse_request({**ok, "view": "loupe", "x": 3, "y": 4.0, "size": 256, "frame": 0, "seq": 7})
    assert (r.view, r.x, r.y, r.size, r.seq, r.decoder) == ("loupe", 3, 4, 256, 7, None)
    bad = [(None, "JSON object"), ({**ok, "token": ""}, "no token"), ({"token": "t", "lambda_pix": 1}, "missing"),
           ({**ok, "lambda_pix": 4.5}, "outside [-2, 4]"), ({**ok, "lambda_sem": "x"}, "not a number"),
           ({**ok, "view": "zoom"}, "unknown view"), ({**ok, "size": 5000}, "outside 16..4096"),
           ({**ok, "x": 1.5}, "whole number"), ({**ok, "seq": True}, "whole number"),
           ({**ok, "decoder": 7}, "node id string")]
    for body, words in bad:
        with pytest.raises(PisaError, match=words.replace("[", r"\[")):
            live.parse_request(body)


def test_bounds_need_the_run():
    req = live.parse_request({"token": "t", "lambda_pix": 1, "lambda_sem": 1, "view": "loupe", "x": 79, "y": 63,
                              "frame": 1})
    live.check_bounds(req, 2, 80, 64)
    with pytest.raises(PisaError, match="frame 1 is outside 0..0"):
        live.check_bounds(req, 1, 80, 64)
    with pytest.raises(PisaError, match=r"loupe point \(79, 63\) is outside the 79x64"):
        live.check_bounds(req, 2, 79, 64)


@settings(max_examples=200, deadline=None)
@given(st.integers(8, 600), st.integers(8, 600), st.integers(0, 599), st.integers(0, 599), st.integers(16, 700))
def test_crop_box_stays_inside_and_its_latent_window_covers_it_with_the_halo(w, h, x, y, size):
    x, y = x % w, y % h
    x0, y0, cw, ch = live.crop_box(w, h, x, y, size)
    assert 0 <= x0 and 0 <= y0 and x0 + cw <= w and y0 + ch <= h and (cw, ch) == (min(size, w), min(size, h))
    if size <= min(w, h):
        assert x0 <= x < x0 + cw and y0 <= y < y0 + ch  # the held point is in the crop
    lat_h, lat_w = -(-h // 8), -(-w // 8)
    (rows, cols), (ox, oy) = live.latent_window((x0, y0, cw, ch), lat_h, lat_w)
    assert rows.start * 8 <= y0 and cols.start * 8 <= x0 and rows.stop * 8 >= y0 + ch and cols.stop * 8 >= x0 + cw
    assert (ox, oy) == (x0 - cols.start * 8, y0 - rows.start * 8)
    assert rows.start == 0 or y0 - rows.start * 8 >= live.LOUPE_HALO * 8  # a full halo unless at the border
    assert rows.stop == lat_h or rows.stop * 8 - (y0 + ch) >= live.LOUPE_HALO * 8


def test_fit_size_never_enlarges():
    assert live.fit_size(320, 384, 4096) == (320, 384)
    assert live.fit_size(1024, 2048, 512) == (256, 512)


def test_preview_prompt_holds_what_the_run_needs_and_links_the_model_only_while_an_eps_is_missing():
    req = live.parse_request({"token": "t", "lambda_pix": 0.5, "lambda_sem": 1.0, "seq": 3})
    full = entry(pix=True)
    p = live.preview_prompt(full, decoder(), req)
    # the sampler (kept in ComfyUI's cache, never run: nothing links to it) and its ancestors; no output node
    assert set(p) == {"1", "2", "3", "4", "5", "6", live.PREVIEW_NODE_ID}
    assert all(p[n]["inputs"] == PROMPT[n]["inputs"] for n in p if n != live.PREVIEW_NODE_ID)
    node = p[live.PREVIEW_NODE_ID]
    assert node["class_type"] == live.PREVIEW_CLASS and "model" not in node["inputs"]
    assert node["inputs"]["vae"] == ["1", 2] and node["inputs"]["latent"] == ["5", 0]
    assert (node["inputs"]["token"], node["inputs"]["seq"], node["inputs"]["decoder"]) == (full.token, 3, "7")
    assert live.preview_token(p) == full.token and live.preview_token(PROMPT) is None
    lazy = entry(pix=False)
    assert live.preview_prompt(lazy, decoder(), req)[live.PREVIEW_NODE_ID]["inputs"]["model"] == ["4", 0]
    p["1"]["inputs"]["ckpt_name"] = "changed"
    assert PROMPT["1"]["inputs"]["ckpt_name"] == "sd.safetensors"  # a copy, not the recorded prompt


def test_decoders_per_entry_are_bounded_and_named():
    e = entry()
    with pytest.raises(PisaError, match="no PiSA Tiled VAE Decode"):
        e.decoder(None)
    for i in range(live.MAX_DECODERS + 2):
        e.add_decoder(live.Decoder(str(100 + i), "none", 0, 0.0, ["1", 2], {}, (8, 8)))
    assert len(e.decoders) == live.MAX_DECODERS and e.decoder(None).node_id == str(101 + live.MAX_DECODERS)
    with pytest.raises(PisaError, match="decoder '100' did not decode this run"):
        e.decoder("100")
