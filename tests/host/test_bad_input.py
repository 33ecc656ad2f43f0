"""One test per refusal the pipeline nodes give (the bad-input table, docs/errors.md).

Each case calls a registered node the way ComfyUI does and asserts: our own exception type (PisaError, or its
CheckpointError subclass for the LoRA file, both as ComfyUI loaded the pack), a message that names the node, and the
words of the fix. The last test checks that docs/errors.md has a row for every case here and that every test it names
exists.
"""
from __future__ import annotations

import copy
import io
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

import comfy.model_base
import comfy.model_management as mm
import comfy.supported_models
import host
import tiny_models
from helpers import run_node
from hostile_files import Op, make_zip, torch_save_bytes

# The classes of the pack as ComfyUI loaded it (its package name is the folder path), not of `import pisa_sr`.
from pisa_sr import park
from pisa_sr.checkpoint import CheckpointError
from pisa_sr.errors import PisaError
from pisa_sr.resize import ResizePlan

DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"
LOAD, ENCODE, SAMPLE, DECODE = ("Load PiSA LoRAs", "PiSA Encode LQ", "Dual-Guided One-Step Sample",
                                "PiSA Tiled VAE Decode")
CASES: dict[str, tuple[str, tuple[str, ...], type, object]] = {}


def case(case_id: str, node: str, fn, *fix_words: str, exc: type = PisaError):
    """Register a refusal: ``fn(ctx)`` must raise ``exc`` naming ``node`` and containing every fix word."""
    assert case_id not in CASES
    CASES[case_id] = (node, fix_words, exc, fn)


@pytest.fixture
def ctx(world, pisa_model, monkeypatch):
    folder = host.BASE_DIR / "models" / "pisa_sr"
    yield SimpleNamespace(world=world, pisa=pisa_model, mp=monkeypatch, compat=host.pack("nodes.compat"),
                          unet=host.pack("nodes.unet"), vae_ops=host.pack("nodes.vae_ops"), folder=folder)
    for f in folder.glob("bad_*"):  # the bad files must not linger in the model list of later tests
        f.unlink()


def poke(t: torch.Tensor, index, value) -> torch.Tensor:
    t[index] = value
    return t


def load(c, name: str = "tiny_pisa.pkl", model=None):
    return run_node("PiSA_LoadLoRAs", model=c.world.model if model is None else model, lora_name=name)


def load_file(c, name: str, data: bytes):
    (c.folder / name).write_bytes(data)
    return load(c, name)


def load_other(c, **kw):
    """Load onto a tiny ComfyUI model of another family (weights left uninitialised: it is refused before use)."""
    return load(c, model=tiny_models.comfy_model_from_diffusers(None, **kw))


def image(h: int = 16, w: int = 16, b: int = 1) -> torch.Tensor:
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(1))


def encode(c, img, resize_filter: str = "bicubic", **kw):
    return run_node("PiSA_EncodeLQ", image=img, vae=c.world.comfy_vae, upscale=4, resize_filter=resize_filter, **kw)


def latent(h: int = 8, w: int = 8, b: int = 1, ch: int = 4) -> dict:
    return {"samples": torch.randn(b, ch, h, w, generator=torch.Generator().manual_seed(2))}


def sample(c, model=None, positive=None, lat=None, lp=1.0, ls=1.0, tile=96, overlap=32, **extra):
    return run_node("PiSA_Sample", model=c.pisa if model is None else model,
                    positive=c.world.conditioning if positive is None else positive,
                    latent=latent() if lat is None else lat, lambda_pix=lp, lambda_sem=ls, tile_size=tile,
                    tile_overlap=overlap, **extra)


def sample_raising(c, exc_type: type, message: str):
    """Sample with a UNet that raises ``exc_type(message)`` and a device with nothing left to free."""
    def fail(*a, **k):
        raise exc_type(message)
    c.mp.setattr(c.unet, "unet_eps_t1", fail)
    c.mp.setattr(c.compat, "free_memory", lambda device=None: 1)
    sample(c, lp=0.5, ls=1.5)


def decode(c, lat, color_fix: str = "adain", **kw):
    return run_node("PiSA_Decode", latent=lat, vae=c.world.comfy_vae, color_fix=color_fix, **kw)


def low_ram(c):
    c.mp.setattr(c.vae_ops, "free_ram", lambda: 1 << 20)  # 1 MiB free: the parked full-size maps go to temp files
    return c


def no_disk(c):
    c.mp.setattr(park.shutil, "disk_usage", lambda path: SimpleNamespace(free=0))
    return low_ram(c)


def unwritable_temp(c):
    blocker = host.BASE_DIR / "temp_is_a_file"
    blocker.write_text("")  # a directory under a regular file cannot exist, whoever runs the test
    c.mp.setattr(c.vae_ops, "temp_directory", lambda: str(blocker / "temp"))
    return low_ram(c)


def with_lq(lat: dict, b: int, h: int, w: int) -> dict:
    """``lat`` carrying Encode LQ's record of a b x h x w LQ image (small, so no 512 px VAE work is needed)."""
    lq_info = host.pack("nodes.lq_info")
    plan = ResizePlan((w, h), None, (w, h), (w, h), (w, h))
    return {**lat, lq_info.LATENT_KEY: lq_info.LQInfo(lq_u8=torch.zeros(b, h, w, 3, dtype=torch.uint8), plan=plan)}


# ------------------------------------------------------------------------------------------------ Load PiSA LoRAs
SD_LORA = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_"
case("load-missing-file", LOAD, lambda c: load(c, "no_such_pisa_file.pkl"), "download", "models/pisa_sr")
case("load-sd-lora-pkl", LOAD, lambda c: load_file(c, "bad_sd_lora.pkl", torch_save_bytes(
    {SD_LORA + "up.weight": torch.zeros(8, 4), SD_LORA + "down.weight": torch.zeros(4, 8)})),
     "not the PiSA-SR release checkpoint", "download", exc=CheckpointError)
case("load-sd-lora-safetensors", LOAD, lambda c: load_file(c, "bad_sd_lora.safetensors", safetensors_bytes(
    {"lora_unet_x.lora_up.weight": torch.zeros(8, 4)})), "without PiSA-SR metadata", "pisa_sr.convert",
     exc=CheckpointError)


def _truncated(c):
    raw = (c.folder / "tiny_pisa.pkl").read_bytes()
    load_file(c, "bad_truncated.pkl", raw[: len(raw) * 2 // 3])


case("load-truncated-file", LOAD, _truncated, "truncated", "download", exc=CheckpointError)
case("load-empty-file", LOAD, lambda c: load_file(c, "bad_empty.pkl", b""), "empty", "download", exc=CheckpointError)
EVIL = Op.PROTO + Op.glob("os", "system") + Op.tuple([Op.str("true")]) + Op.REDUCE + Op.STOP
case("load-needs-code", LOAD, lambda c: load_file(c, "bad_code.pkl", make_zip(
    {"archive/data.pkl": EVIL, "archive/version": b"3\n"})), "run code", "pisa_sr.convert", exc=CheckpointError)


def _legacy(c):
    buf = io.BytesIO()
    torch.save(c.world.ckpt, buf, _use_new_zipfile_serialization=False)
    load_file(c, "bad_legacy.pkl", buf.getvalue())


case("load-legacy-format", LOAD, _legacy, "legacy", "download", exc=CheckpointError)
case("load-edited-layout", LOAD, lambda c: load_file(c, "bad_rank.pkl", torch_save_bytes(
    {**c.world.ckpt, "lora_rank_unet_sem": 10**9})), "rank", "download", exc=CheckpointError)  # a rank no tensor has


def _nan_weights(c):
    state = dict(c.world.ckpt["state_dict_unet"])
    k = next(iter(state))
    state[k] = state[k].clone()
    state[k].view(-1)[0] = math.nan
    load_file(c, "bad_nan.pkl", torch_save_bytes({**c.world.ckpt, "state_dict_unet": state}))


case("load-nan-weights", LOAD, _nan_weights, "NaN", "download", exc=CheckpointError)


def _other_unet_shapes(c):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(  # the tiny UNet's layout with wider channels: same module names, other shapes
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 96),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=tiny_models.CONTEXT_DIM, attention_head_dim=tiny_models.HEADS, use_linear_projection=True,
        norm_num_groups=32)
    load_file(c, "bad_channels.pkl", torch_save_bytes(tiny_models.synthetic_checkpoint(other)))


case("load-shapes-other-unet", LOAD, _other_unet_shapes, "2.1-base", exc=CheckpointError)


def _module_missing(c):
    sd = {k: (list(v) if isinstance(v, list) else v) for k, v in c.world.ckpt.items()}
    old = sd["unet_lora_encoder_modules_pix"][0]
    new = "down_blocks.7.resnets.0.conv1"  # valid name, but SD2 (and the tiny UNet) has no 8th down block
    sd["unet_lora_encoder_modules_pix"][0] = new
    sd["state_dict_unet"] = state = dict(sd["state_dict_unet"])
    for ab in "AB":
        state[f"{new}.lora_{ab}.default_encoder_pix.weight"] = state.pop(f"{old}.lora_{ab}.default_encoder_pix.weight")
    load_file(c, "bad_module.pkl", torch_save_bytes(sd))


case("load-module-missing-in-unet", LOAD, _module_missing, "2.1-base", exc=CheckpointError)
case("load-not-a-model", LOAD, lambda c: load(c, model=object()), "2.1-base", "Load Checkpoint")
case("load-sd15", LOAD, lambda c: load_other(c, model_class=comfy.supported_models.SD15,
                                             unet_overrides={"context_dim": 768}), "SD 1.x", "2.1-base")
case("load-sdxl", LOAD, lambda c: load_other(c, model_class=comfy.supported_models.SDXL, unet_overrides={
    "context_dim": 2048, "adm_in_channels": 2816, "num_classes": "sequential"}), "SDXL", "2.1-base")
case("load-v-prediction", LOAD, lambda c: load_other(c, model_type=comfy.model_base.ModelType.V_PREDICTION),
     "v-prediction", "2.1-base")
case("load-inpainting", LOAD, lambda c: load_other(c, unet_overrides={"in_channels": 9}), "inpainting", "2.1-base")
case("load-unclip", LOAD, lambda c: load_other(c, unet_overrides={"adm_in_channels": 1024}), "unCLIP", "2.1-base")
case("load-not-sd2-unet", LOAD, lambda c: load_other(c, unet_overrides={"context_dim": 768}), "not an SD 2.x UNet",
     "2.1-base")
case("load-modelsampling-override", LOAD, lambda c: load(c, model=host.node("ModelSamplingDiscrete")().patch(
    c.world.model, "v_prediction", False)[0]), "ModelSampling", "straight from Load Checkpoint")
case("load-chained", LOAD, lambda c: load(c, model=c.pisa),  # a second Load PiSA LoRAs would stack the LoRAs
     "already carries PiSA-SR", "Load Checkpoint's MODEL straight")

# ------------------------------------------------------------------------------------------------ Encode LQ
case("encode-not-an-image", ENCODE, lambda c: encode(c, torch.rand(16, 16, 3)), "IMAGE")
case("encode-empty-batch", ENCODE, lambda c: encode(c, torch.zeros(0, 16, 16, 3)), "empty", "Load Image")
case("encode-not-rgb", ENCODE, lambda c: encode(c, torch.rand(1, 16, 16, 1)), "RGB")
case("encode-too-small", ENCODE, lambda c: encode(c, image(4, 12)), "at least 8x8")
case("encode-nan", ENCODE, lambda c: encode(c, poke(image(), (0, 3, 3, 1), math.nan)), "NaN", "node that produced it")
case("encode-inf", ENCODE, lambda c: encode(c, poke(image(), (0, 0, 0, 0), math.inf)), "infinite",
     "node that produced it")
case("encode-16-bit-values", ENCODE, lambda c: encode(c, image() * 65535.0), "0..1", "scaled")  # a 16-bit loader
case("encode-negative-values", ENCODE, lambda c: encode(c, image() * 2.0 - 1.0), "0..1", "scaled")  # -1..1 tensor
case("encode-bad-resize-filter", ENCODE, lambda c: encode(c, image(), "lanczos3"), "resize filter", "bicubic")
case("encode-no-disk-for-vae-maps", ENCODE, lambda c: encode(no_disk(c), image(64, 64), vae_tile_size=128),
     "of free disk in", "temp", "raise the VAE's RAM budget")
case("encode-vae-temp-unwritable", ENCODE, lambda c: encode(unwritable_temp(c), image(64, 64), vae_tile_size=128),
     "temp_is_a_file", "writable")


def overflowing_fp16_vae(c, part: str):
    """The tiny VAE in fp16 with its ``part``'s conv_in weights x 1e5: activations pass fp16's 65504 (inf, then NaN
    through GroupNorm), as a 16-bit VAE's can at large sizes. Real fp16 arithmetic on the CPU."""
    vae = copy.deepcopy(c.world.vae)
    getattr(vae, part).conv_in.weight.data.mul_(1e5)
    return tiny_models.comfy_vae_from_diffusers(vae, dtype=torch.float16)


case("encode-fp16-vae-overflow", ENCODE, lambda c: run_node(
    "PiSA_EncodeLQ", image=image(), vae=overflowing_fp16_vae(c, "encoder"), upscale=4, resize_filter="bicubic"),
     "16-bit (fp16) VAE overflowed", "bf16 or fp32")

# ------------------------------------------------------------------------------------------------ Sample
case("sample-no-pisa-loras", SAMPLE, lambda c: sample(c, model=c.world.model), "Load PiSA LoRAs")
case("sample-lambda-range", SAMPLE, lambda c: sample(c, lp=4.5), "Use 1.0")
case("sample-lambda-nan", SAMPLE, lambda c: sample(c, ls=math.nan), "not a number", "Use 1.0")
case("sample-not-a-latent", SAMPLE, lambda c: sample(c, lat=torch.zeros(1, 4, 8, 8)), "PiSA Encode LQ")
case("sample-wrong-latent-channels", SAMPLE, lambda c: sample(c, lat=latent(ch=16)), "[B,4,h,w]")  # SD3/Flux VAE's
case("sample-empty-latent", SAMPLE, lambda c: sample(c, lat=latent(b=0)), "[B,4,h,w]")
case("sample-nan-latent", SAMPLE, lambda c: sample(c, lat={"samples": poke(latent()["samples"], (0, 0, 0, 0),
                                                                              math.nan)}), "NaN")
case("sample-negative-tile", SAMPLE, lambda c: sample(c, tile=-8), ">= 0")
case("sample-overlap-not-below-tile", SAMPLE, lambda c: sample(c, tile=32, overlap=32),  # 1 px steps: 1000s of calls
     "tile_overlap", "smaller than tile_size")
case("sample-noise-mask", SAMPLE, lambda c: sample(c, lat={**latent(), "noise_mask": torch.ones(1, 1, 64, 64)}),
     "noise mask", "remove the mask node")
case("sample-bad-conditioning", SAMPLE, lambda c: sample(c, positive="a prompt typed into the wrong socket"),
     "CLIPTextEncode")
case("sample-nan-conditioning", SAMPLE, lambda c: sample(c, positive=[[poke(c.world.context.clone(), (0, 0, 0),
                                                                              math.nan), {}]]), "NaN")
case("sample-conditioning-width", SAMPLE, lambda c: sample(c, positive=[[torch.zeros(1, 77, 4), {}]]),
     "conditioning width", "CLIP of the SD 2.1-base checkpoint")
case("sample-precision", SAMPLE, lambda c: sample(c, precision="fp8"), "auto")
case("sample-bf16-not-native", SAMPLE, lambda c: (c.mp.setattr(c.unet, "bf16_native", lambda d: False),
                                                  sample(c, precision="bf16")), "no native bf16", "fp16 or fp32")
case("sample-out-of-memory", SAMPLE, lambda c: sample_raising(c, mm.OOM_EXCEPTION, "simulated"), "Lower tile_size")
case("sample-host-out-of-memory", SAMPLE, lambda c: sample_raising(  # what PyTorch raises when the host runs out
    c, RuntimeError, "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
    "tried to allocate 12884901888 bytes. Error code 12 (Cannot allocate memory)"), "Lower tile_size")

# ------------------------------------------------------------------------------------------------ Decode
case("decode-not-a-latent", DECODE, lambda c: decode(c, torch.zeros(1, 4, 8, 8)), "Dual-Guided One-Step Sample")
case("decode-wrong-latent-shape", DECODE, lambda c: decode(c, latent(ch=16), "none"), "Dual-Guided One-Step Sample")
case("decode-nan-latent", DECODE, lambda c: decode(c, {"samples": poke(latent()["samples"], (0, 1, 2, 3), math.inf)},
                                                   "none"), "NaN", "Dual-Guided One-Step Sample")
case("decode-bad-color-fix", DECODE, lambda c: decode(c, latent(), "sepia"), "adain")
case("decode-no-disk-for-vae-maps", DECODE, lambda c: decode(no_disk(c), latent(24, 24), "none", vae_tile_size=128),
     "of free disk in", "temp", "raise the VAE's RAM budget")
case("decode-vae-temp-unwritable", DECODE, lambda c: decode(unwritable_temp(c), latent(24, 24), "none",
                                                            vae_tile_size=128), "temp_is_a_file", "writable")
case("decode-colour-fix-without-lq", DECODE, lambda c: decode(c, latent(), "adain"), "set color_fix to none")
case("decode-batch-mismatch", DECODE, lambda c: decode(c, with_lq(latent(b=3), b=2, h=64, w=64), "none"),
     "PiSA Encode LQ")  # 3 latents, 2 LQ images
case("decode-latent-resized", DECODE, lambda c: decode(c, with_lq(latent(8, 8), b=1, h=64, w=80), "none"),
     "resized between nodes")  # decodes to 64x64, LQ was 80x64
case("decode-fp16-vae-overflow", DECODE, lambda c: run_node(
    "PiSA_Decode", latent=latent(), vae=overflowing_fp16_vae(c, "decoder"), color_fix="none"),
     "16-bit (fp16) VAE overflowed", "bf16 or fp32")


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


@pytest.mark.parametrize("value", [4.5, -2.5, math.nan, math.inf])
def test_lambda_outside_range_or_not_a_number(ctx, value):
    for lp, ls in ((value, 1.0), (1.0, value)):
        expect(ctx, "sample-lambda-range", lambda c, lp=lp, ls=ls: sample(c, lp=lp, ls=ls))


@pytest.mark.parametrize("width", [768, 1280, 2048])
def test_conditioning_of_other_text_encoders(ctx, width):
    """SD 1.x CLIP-L (768), SDXL's CLIP-G (1280) and SDXL's concatenation (2048) used to end in a raw matmul error."""
    expect(ctx, "sample-conditioning-width",
           lambda c: sample(c, positive=[[torch.zeros(1, 77, width), {"pooled_output": torch.zeros(1, 1280)}]]))


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
    """Number ranges are refused by ComfyUI when the prompt is queued (execution.validate_inputs, as /prompt runs it),
    from the nodes' schemas, so the nodes do not check them again. Upstream nodes are real ones; their own errors
    (no checkpoint file here) are not counted. (ComfyUI 0.3.75 does not check V3 combo values at queue time: the
    nodes refuse those.)"""
    import asyncio

    import execution

    links = {"image": ["img", 0], "vae": ["ckpt", 2], "model": ["ckpt", 0], "positive": ["cond", 0],
             "latent": ["lat", 0]}
    schema = host.node(class_type).INPUT_TYPES()
    inputs = {n: links[n] for n in [*schema.get("required", {}), *schema.get("optional", {})] if n in links}
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "missing.safetensors"}},
        "img": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "cond": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "node": {"class_type": class_type, "inputs": {**inputs, **widgets}},
    }
    _, found, _ = asyncio.run(execution.validate_inputs("test", prompt, "node", {}))
    errors = {e["extra_info"]["input_name"]: f"{e['message']}: {e['details']}" for e in found
              if "input_name" in e.get("extra_info", {})}
    assert set(errors) == set(expected), errors
    for name, words in expected.items():
        assert words in errors[name], (name, errors[name])


@pytest.mark.one_host("reads docs/errors.md and the test sources only")
def test_every_refusal_has_a_documented_row_and_every_row_a_test():
    text = DOC.read_text()
    rows = [line for line in text.splitlines() if line.startswith("|") and "`" in line]
    documented = set(re.findall(r"test_refusal\[([a-z0-9-]+)\]", text))
    assert documented == set(CASES), (sorted(set(CASES) - documented), sorted(documented - set(CASES)))
    for file, name in re.findall(r"`(test_\w+\.py)::(test_\w+)", text):
        path = next(DOC.parents[1].glob(f"tests/*/{file}"))  # tests/core or tests/host
        assert re.search(rf"^def {name}\(", path.read_text(), re.MULTILINE), (file, name)
    assert len(rows) >= len(CASES)
