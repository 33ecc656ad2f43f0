"""One test per refusal the pipeline nodes give (the bad-input table, docs/errors.md).

Each case calls a registered node the way ComfyUI does and asserts: our own exception type (PisaError, or its
CheckpointError subclass for the LoRA file, both as ComfyUI loaded the pack), a message that names the node, and the
words of the fix. The last test checks that docs/errors.md has a row for every case here and that every test it names
exists.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import comfy.model_base
import comfy.model_management as mm
import comfy.supported_models
import host
import tiny_models
from conftest import run_node
from hostile_files import Op, make_zip, torch_save_bytes

# The classes of the pack as ComfyUI loaded it (its package name is the folder path), not of `import pisa_sr`.
PisaError = host.pack("pisa_sr.errors").PisaError
CheckpointError = host.pack("pisa_sr.checkpoint").CheckpointError

DOC = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
LOAD, ENCODE, SAMPLE, DECODE = ("Load PiSA LoRAs", "PiSA Encode LQ", "Dual-Guided One-Step Sample",
                                "PiSA Tiled VAE Decode")
CASES: dict[str, tuple[str, tuple[str, ...], type, object]] = {}


def case(case_id: str, node: str, *fix_words: str, exc: type = PisaError):
    """Register a refusal: ``fn(ctx)`` must raise ``exc`` naming ``node`` and containing every fix word."""
    def deco(fn):
        assert case_id not in CASES
        CASES[case_id] = (node, fix_words, exc, fn)
        return fn
    return deco


@pytest.fixture
def ctx(world, pisa_model, monkeypatch):
    folder = host.BASE_DIR / "models" / "pisa_sr"
    yield SimpleNamespace(world=world, pisa=pisa_model, mp=monkeypatch, compat=host.pack("nodes.compat"),
                          unet=host.pack("nodes.unet"), folder=folder)
    for f in folder.glob("bad_*"):  # the bad files must not linger in the model list of later tests
        f.unlink()


def put(c, name: str, data: bytes) -> str:
    (c.folder / name).write_bytes(data)
    return name


def load(c, name: str, model=None):
    return run_node("PiSA_LoadLoRAs", model=c.world.model if model is None else model, lora_name=name)


def image(h: int = 16, w: int = 16, b: int = 1) -> torch.Tensor:
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(1))


def encode(c, img, upscale: int = 4):
    return run_node("PiSA_EncodeLQ", image=img, vae=c.world.comfy_vae, upscale=upscale, resize_filter="bicubic")


def latent(h: int = 8, w: int = 8, b: int = 1, ch: int = 4) -> dict:
    return {"samples": torch.randn(b, ch, h, w, generator=torch.Generator().manual_seed(2))}


def sample(c, model=None, positive=None, lat=None, lp=1.0, ls=1.0, tile=96, overlap=32, **extra):
    return run_node("PiSA_Sample", model=c.pisa if model is None else model,
                    positive=c.world.conditioning if positive is None else positive,
                    latent=latent() if lat is None else lat, lambda_pix=lp, lambda_sem=ls, tile_size=tile,
                    tile_overlap=overlap, **extra)


def decode(c, lat, color_fix: str = "adain"):
    return run_node("PiSA_Decode", latent=lat, vae=c.world.comfy_vae, color_fix=color_fix)


def base_model(**kw):
    """A tiny ComfyUI model of another family (weights left uninitialised: it is refused before use)."""
    return tiny_models.comfy_model_from_diffusers(None, **kw)


# ------------------------------------------------------------------------------------------------ Load PiSA LoRAs
@case("load-missing-file", LOAD, "download", "models/pisa_sr")
def _(c):
    load(c, "no_such_pisa_file.pkl")


@case("load-sd-lora-pkl", LOAD, "not the PiSA-SR release checkpoint", "download", exc=CheckpointError)
def _(c):
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}
    load(c, put(c, "bad_sd_lora.pkl", torch_save_bytes(sd)))


@case("load-sd-lora-safetensors", LOAD, "without PiSA-SR metadata", "pisa_sr.convert", exc=CheckpointError)
def _(c):
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_up.weight": torch.zeros(8, 4)}, str(c.folder / "bad_sd_lora.safetensors"))
    load(c, "bad_sd_lora.safetensors")


@case("load-truncated-file", LOAD, "truncated", "download", exc=CheckpointError)
def _(c):
    raw = (c.folder / "tiny_pisa.pkl").read_bytes()
    load(c, put(c, "bad_truncated.pkl", raw[: len(raw) * 2 // 3]))


@case("load-empty-file", LOAD, "empty", "download", exc=CheckpointError)
def _(c):
    load(c, put(c, "bad_empty.pkl", b""))


@case("load-needs-code", LOAD, "run code", "pisa_sr.convert", exc=CheckpointError)
def _(c):
    evil = Op.PROTO + Op.glob("os", "system") + Op.tuple([Op.str("true")]) + Op.REDUCE + Op.STOP
    load(c, put(c, "bad_code.pkl", make_zip({"archive/data.pkl": evil, "archive/version": b"3\n"})))


@case("load-legacy-format", LOAD, "legacy", "download", exc=CheckpointError)
def _(c):
    import io

    buf = io.BytesIO()
    torch.save(c.world.ckpt, buf, _use_new_zipfile_serialization=False)
    load(c, put(c, "bad_legacy.pkl", buf.getvalue()))


@case("load-edited-layout", LOAD, "rank", "download", exc=CheckpointError)
def _(c):
    sd = dict(c.world.ckpt)
    sd["lora_rank_unet_sem"] = 10**9  # a declared rank no tensor has
    load(c, put(c, "bad_rank.pkl", torch_save_bytes(sd)))


@case("load-nan-weights", LOAD, "NaN", "download", exc=CheckpointError)
def _(c):
    sd = dict(c.world.ckpt)
    state = dict(sd["state_dict_unet"])
    k = next(iter(state))
    state[k] = state[k].clone()
    state[k].view(-1)[0] = math.nan
    sd["state_dict_unet"] = state
    load(c, put(c, "bad_nan.pkl", torch_save_bytes(sd)))


@case("load-shapes-other-unet", LOAD, "2.1-base", exc=CheckpointError)
def _(c):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(  # the tiny UNet's layout with wider channels: same module names, other shapes
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 96),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=tiny_models.CONTEXT_DIM, attention_head_dim=tiny_models.HEADS, use_linear_projection=True,
        norm_num_groups=32)
    load(c, put(c, "bad_channels.pkl", torch_save_bytes(tiny_models.synthetic_checkpoint(other))))


@case("load-module-missing-in-unet", LOAD, "2.1-base", exc=CheckpointError)
def _(c):
    sd = {k: (list(v) if isinstance(v, list) else v) for k, v in c.world.ckpt.items()}
    old = sd["unet_lora_encoder_modules_pix"][0]
    new = "down_blocks.7.resnets.0.conv1"  # valid name, but SD2 (and the tiny UNet) has no 8th down block
    sd["unet_lora_encoder_modules_pix"][0] = new
    state = dict(sd["state_dict_unet"])
    for ab in "AB":
        state[f"{new}.lora_{ab}.default_encoder_pix.weight"] = state.pop(f"{old}.lora_{ab}.default_encoder_pix.weight")
    sd["state_dict_unet"] = state
    load(c, put(c, "bad_module.pkl", torch_save_bytes(sd)))


@case("load-not-a-model", LOAD, "2.1-base", "Load Checkpoint")
def _(c):
    load(c, "tiny_pisa.pkl", model=object())


@case("load-sd15", LOAD, "SD 1.x", "2.1-base")
def _(c):
    load(c, "tiny_pisa.pkl", base_model(model_class=comfy.supported_models.SD15, unet_overrides={"context_dim": 768}))


@case("load-sdxl", LOAD, "SDXL", "2.1-base")
def _(c):
    load(c, "tiny_pisa.pkl", base_model(model_class=comfy.supported_models.SDXL, unet_overrides={
        "context_dim": 2048, "adm_in_channels": 2816, "num_classes": "sequential"}))


@case("load-v-prediction", LOAD, "v-prediction", "2.1-base")
def _(c):
    load(c, "tiny_pisa.pkl", base_model(model_type=comfy.model_base.ModelType.V_PREDICTION))


@case("load-inpainting", LOAD, "inpainting", "2.1-base")
def _(c):
    load(c, "tiny_pisa.pkl", base_model(unet_overrides={"in_channels": 9}))


@case("load-unclip", LOAD, "unCLIP", "2.1-base")
def _(c):
    load(c, "tiny_pisa.pkl", base_model(unet_overrides={"adm_in_channels": 1024}))


@case("load-not-sd2-unet", LOAD, "not an SD 2.x UNet", "2.1-base")
def _(c):
    load(c, "tiny_pisa.pkl", base_model(unet_overrides={"context_dim": 768}))


@case("load-modelsampling-override", LOAD, "ModelSampling", "straight from Load Checkpoint")
def _(c):
    (patched,) = host.node("ModelSamplingDiscrete")().patch(c.world.model, "v_prediction", False)
    load(c, "tiny_pisa.pkl", patched)


@case("load-chained", LOAD, "already carries PiSA-SR", "Load Checkpoint's MODEL straight")
def _(c):
    load(c, "tiny_pisa.pkl", c.pisa)  # a second Load PiSA LoRAs would stack the LoRAs


# ------------------------------------------------------------------------------------------------ Encode LQ
@case("encode-not-an-image", ENCODE, "IMAGE")
def _(c):
    encode(c, torch.rand(16, 16, 3))


@case("encode-empty-batch", ENCODE, "empty", "Load Image")
def _(c):
    encode(c, torch.zeros(0, 16, 16, 3))


@case("encode-not-rgb", ENCODE, "RGB")
def _(c):
    encode(c, torch.rand(1, 16, 16, 1))


@case("encode-too-small", ENCODE, "at least 8x8")
def _(c):
    encode(c, image(4, 12))


@case("encode-nan", ENCODE, "NaN", "node that produced it")
def _(c):
    img = image()
    img[0, 3, 3, 1] = math.nan
    encode(c, img)


@case("encode-inf", ENCODE, "infinite", "node that produced it")
def _(c):
    img = image()
    img[0, 0, 0, 0] = math.inf
    encode(c, img)


@case("encode-16-bit-values", ENCODE, "0..1", "scaled")
def _(c):
    encode(c, image() * 65535.0)  # a 16-bit loader's raw values


@case("encode-negative-values", ENCODE, "0..1", "scaled")
def _(c):
    encode(c, image() * 2.0 - 1.0)  # a -1..1 normalised tensor


@case("encode-bad-resize-filter", ENCODE, "resize filter", "bicubic")
def _(c):
    run_node("PiSA_EncodeLQ", image=image(), vae=c.world.comfy_vae, upscale=4, resize_filter="lanczos3")


# ------------------------------------------------------------------------------------------------ Sample
@case("sample-no-pisa-loras", SAMPLE, "Load PiSA LoRAs")
def _(c):
    sample(c, model=c.world.model)


@pytest.mark.parametrize("value", [4.5, -2.5, math.nan, math.inf])
def test_lambda_outside_range_or_not_a_number(ctx, value):
    for lp, ls in ((value, 1.0), (1.0, value)):
        expect(ctx, "sample-lambda-range", lambda c, lp=lp, ls=ls: sample(c, lp=lp, ls=ls))


@case("sample-lambda-range", SAMPLE, "Use 1.0")
def _(c):
    sample(c, lp=4.5)


@case("sample-lambda-nan", SAMPLE, "not a number", "Use 1.0")
def _(c):
    sample(c, ls=math.nan)


@case("sample-not-a-latent", SAMPLE, "PiSA Encode LQ")
def _(c):
    sample(c, lat=torch.zeros(1, 4, 8, 8))


@case("sample-wrong-latent-channels", SAMPLE, "[B,4,h,w]")
def _(c):
    sample(c, lat=latent(ch=16))  # e.g. an SD3/Flux VAE's latent


@case("sample-empty-latent", SAMPLE, "[B,4,h,w]")
def _(c):
    sample(c, lat=latent(b=0))


@case("sample-nan-latent", SAMPLE, "NaN")
def _(c):
    lat = latent()
    lat["samples"][0, 0, 0, 0] = math.nan
    sample(c, lat=lat)


@case("sample-negative-tile", SAMPLE, ">= 0")
def _(c):
    sample(c, tile=-8)


@case("sample-overlap-not-below-tile", SAMPLE, "tile_overlap", "smaller than tile_size")
def _(c):
    sample(c, tile=32, overlap=32)  # would advance the tiles by 1 px: thousands of UNet calls


@case("sample-noise-mask", SAMPLE, "noise mask", "remove the mask node")
def _(c):
    sample(c, lat={**latent(), "noise_mask": torch.ones(1, 1, 64, 64)})


@case("sample-bad-conditioning", SAMPLE, "CLIPTextEncode")
def _(c):
    sample(c, positive="a prompt typed into the wrong socket")


@case("sample-nan-conditioning", SAMPLE, "NaN")
def _(c):
    ctx_ = c.world.context.clone()
    ctx_[0, 0, 0] = math.nan
    sample(c, positive=[[ctx_, {}]])


@case("sample-conditioning-width", SAMPLE, "conditioning width", "CLIP of the SD 2.1-base checkpoint")
def _(c):
    sample(c, positive=[[torch.zeros(1, 77, 4), {}]])


@pytest.mark.parametrize("width", [768, 1280, 2048])
def test_conditioning_of_other_text_encoders(ctx, width):
    """SD 1.x CLIP-L (768), SDXL's CLIP-G (1280) and SDXL's concatenation (2048) used to end in a raw matmul error."""
    expect(ctx, "sample-conditioning-width",
           lambda c: sample(c, positive=[[torch.zeros(1, 77, width), {"pooled_output": torch.zeros(1, 1280)}]]))


@case("sample-precision", SAMPLE, "auto")
def _(c):
    sample(c, precision="fp8")


@case("sample-out-of-memory", SAMPLE, "Lower tile_size")
def _(c):
    def oom(*a, **k):
        raise mm.OOM_EXCEPTION("simulated")
    c.mp.setattr(c.unet, "unet_eps_t1", oom)
    c.mp.setattr(c.compat, "free_memory", lambda device=None: 1)
    sample(c, lp=0.5, ls=1.5)


@case("sample-host-out-of-memory", SAMPLE, "Lower tile_size")
def _(c):
    def oom(*a, **k):  # what PyTorch raises when the host runs out (CPU device, or a host-side buffer)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 12884901888 bytes. Error code 12 (Cannot allocate memory)")
    c.mp.setattr(c.unet, "unet_eps_t1", oom)
    c.mp.setattr(c.compat, "free_memory", lambda device=None: 1)
    sample(c, lp=0.5, ls=1.5)


# ------------------------------------------------------------------------------------------------ Decode
@case("decode-not-a-latent", DECODE, "Dual-Guided One-Step Sample")
def _(c):
    decode(c, torch.zeros(1, 4, 8, 8))


@case("decode-wrong-latent-shape", DECODE, "Dual-Guided One-Step Sample")
def _(c):
    decode(c, latent(ch=16), "none")


@case("decode-nan-latent", DECODE, "NaN", "Dual-Guided One-Step Sample")
def _(c):
    lat = latent()
    lat["samples"][0, 1, 2, 3] = math.inf
    decode(c, lat, "none")


@case("decode-bad-color-fix", DECODE, "adain")
def _(c):
    decode(c, latent(), "sepia")


@case("decode-not-enough-ram", DECODE, "GiB of RAM", "Lower upscale")
def _(c):
    c.mp.setattr(c.compat, "free_ram", lambda: 1 << 20)  # 1 MiB free: the parked full-size maps cannot fit
    run_node("PiSA_Decode", latent=latent(24, 24), vae=c.world.comfy_vae, color_fix="none", vae_tile_size=128)


@case("encode-not-enough-ram", ENCODE, "GiB of RAM", "Lower upscale")
def _(c):
    c.mp.setattr(c.compat, "free_ram", lambda: 1 << 20)
    run_node("PiSA_EncodeLQ", image=image(64, 64), vae=c.world.comfy_vae, upscale=4, resize_filter="bicubic",
             vae_tile_size=128)


@case("decode-colour-fix-without-lq", DECODE, "set color_fix to none")
def _(c):
    decode(c, latent(), "adain")


def with_lq(lat: dict, b: int, h: int, w: int) -> dict:
    """``lat`` carrying Encode LQ's record of a b x h x w LQ image (small, so no 512 px VAE work is needed)."""
    lq_info = host.pack("nodes.lq_info")
    plan = host.pack("pisa_sr.resize").ResizePlan((w, h), None, (w, h), (w, h), (w, h))
    return {**lat, lq_info.LATENT_KEY: lq_info.LQInfo(lq_u8=torch.zeros(b, h, w, 3, dtype=torch.uint8), plan=plan)}


@case("decode-batch-mismatch", DECODE, "PiSA Encode LQ")
def _(c):
    decode(c, with_lq(latent(b=3), b=2, h=64, w=64), "none")  # 3 latents, 2 LQ images


@case("decode-latent-resized", DECODE, "resized between nodes")
def _(c):
    decode(c, with_lq(latent(8, 8), b=1, h=64, w=80), "none")  # decodes to 64x64, LQ was 80x64


# ------------------------------------------------------------------------------------------------ the tests
def expect(c, case_id: str, fn=None) -> str:
    node, words, exc, registered = CASES[case_id]
    with pytest.raises(PisaError) as ei:
        (fn or registered)(c)
    err = ei.value
    assert isinstance(err, exc), f"{type(err).__name__}: {err}"
    msg = str(err)
    assert msg.startswith(f"{node}: "), msg
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    assert "unexpected error" not in msg, msg
    return msg


@pytest.mark.parametrize("case_id", list(CASES))
def test_refusal(ctx, case_id):
    expect(ctx, case_id)


def queue_time_errors(class_type: str, **widgets) -> dict[str, str]:
    """ComfyUI's own validation of a prompt holding ``class_type`` (as /prompt runs it before queueing):
    {input name: message and details} for the node's widget values. Upstream nodes are real ones; their own
    errors (no checkpoint file here) are not reported for our node."""
    import asyncio

    import execution

    links = {"image": ["img", 0], "vae": ["ckpt", 2], "model": ["ckpt", 0], "positive": ["cond", 0],
             "latent": ["lat", 0]}
    schema = host.node(class_type).INPUT_TYPES()
    names = list(schema.get("required", {})) + list(schema.get("optional", {}))
    inputs = {n: links[n] for n in names if n in links}
    inputs.update(widgets)
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "missing.safetensors"}},
        "img": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "cond": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "node": {"class_type": class_type, "inputs": inputs},
    }
    _, errors, _ = asyncio.run(execution.validate_inputs("test", prompt, "node", {}))
    return {e["extra_info"]["input_name"]: f"{e['message']}: {e['details']}" for e in errors
            if "input_name" in e.get("extra_info", {})}


@pytest.mark.parametrize("class_type,widgets,expected", [
    ("PiSA_EncodeLQ", {"upscale": 9, "resize_filter": "bicubic", "vae_tile_size": 0}, {"upscale": "bigger than max"}),
    ("PiSA_EncodeLQ", {"upscale": 0, "resize_filter": "bicubic", "vae_tile_size": -1},
     {"upscale": "smaller than min", "vae_tile_size": "smaller than min"}),
    ("PiSA_Sample", {"lambda_pix": 4.5, "lambda_sem": -3.0, "tile_size": 2048, "tile_overlap": 600},
     {"lambda_pix": "bigger than max", "lambda_sem": "smaller than min", "tile_size": "bigger than max",
      "tile_overlap": "bigger than max"}),
    ("PiSA_Decode", {"color_fix": "adain", "vae_tile_size": 9000}, {"vae_tile_size": "bigger than max"}),
])
def test_schema_refuses_at_queue_time(class_type, widgets, expected):
    """Number ranges are refused by ComfyUI when the prompt is queued, from the nodes' schemas, so the nodes do not
    check them again. (ComfyUI 0.3.75 does not check V3 combo values at queue time: the nodes refuse those.)"""
    errors = queue_time_errors(class_type, **widgets)
    assert set(errors) == set(expected), errors
    for name, words in expected.items():
        assert words in errors[name], (name, errors[name])


def test_every_refusal_has_a_documented_row_and_every_row_a_test():
    text = DOC.read_text()
    rows = [line for line in text.splitlines() if line.startswith("|") and "`" in line]
    documented = set(re.findall(r"test_refusal\[([a-z0-9-]+)\]", text))
    assert documented == set(CASES), (sorted(set(CASES) - documented), sorted(documented - set(CASES)))
    tests_dir = Path(__file__).resolve().parent
    for file, name in re.findall(r"`(test_\w+\.py)::(test_\w+)", text):
        assert re.search(rf"^def {name}\(", (tests_dir / file).read_text(), re.MULTILINE), (file, name)
    assert len(rows) >= len(CASES)
