"""Checkpoint loading: layout, the pre-load checks of torch zips, safetensors conversion and the convert CLI.

Also the builders (a small release-layout dict, hand-assembled pickles and torch zips) that the fuzz and bad-input
tests reuse. Hand-made pickles are built from opcodes and only ever handed to our loader, never to ``pickle``.
"""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import host
from pisa_sr import checkpoint as ckpt
from pisa_sr import convert as conv
from pisa_sr.checkpoint import (CheckpointError, PisaLoras, load_checkpoint, parse_release_dict, save_safetensors,
                                to_release_dict)

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ builders
SMALL_MODULES = {  # part -> [(module, weight shape)]: one conv, one linear, one 1x1 conv
    "encoder": [("down_blocks.0.resnets.0.conv1", (8, 4, 3, 3))],
    "decoder": [("up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", (16, 8))],
    "others": [("mid_block.resnets.0.conv_shortcut", (8, 6, 1, 1))],
}


def small_release_dict(rank: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """A valid dict in the exact pisa_sr.pkl layout, tiny (a few KB), for fast property tests."""
    g = torch.Generator().manual_seed(seed)
    sd: dict = {"lora_rank_unet_pix": rank, "lora_rank_unet_sem": rank, "state_dict_unet": {}}
    for kind in ("pix", "sem"):
        for part, mods in SMALL_MODULES.items():
            sd[f"unet_lora_{part}_modules_{kind}"] = [m for m, _ in mods]
            for m, shape in mods:
                if len(shape) == 4:
                    a = torch.randn(rank, *shape[1:], generator=g)
                    b = torch.randn(shape[0], rank, 1, 1, generator=g)
                else:
                    a = torch.randn(rank, shape[1], generator=g)
                    b = torch.randn(shape[0], rank, generator=g)
                sd["state_dict_unet"][f"{m}.lora_A.default_{part}_{kind}.weight"] = a.to(dtype)
                sd["state_dict_unet"][f"{m}.lora_B.default_{part}_{kind}.weight"] = b.to(dtype)
    return sd


def torch_save_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def safetensors_bytes(sd: dict) -> bytes:
    """The conversion of a release dict, as bytes (written through save_safetensors)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "x.safetensors")
        save_safetensors(parse_release_dict(sd), p)
        return Path(p).read_bytes()


def zip_entries(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {i.filename: z.read(i.filename) for i in z.infolist()}


def make_zip(entries: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compress) as z:
        for name, payload in entries.items():
            z.writestr(name, payload)
    return buf.getvalue()


class Op:
    """Pickle opcodes, assembled by hand (protocol 2)."""

    PROTO = b"\x80\x02"
    MARK, STOP, TUPLE, DICT, LIST, SETITEMS, APPENDS = b"(", b".", b"t", b"}", b"]", b"u", b"e"
    REDUCE, BINPERSID, FALSE, EMPTY_TUPLE = b"R", b"Q", b"\x89", b")"

    @staticmethod
    def str(s: str) -> bytes:
        b = s.encode("utf-8")
        return b"X" + struct.pack("<I", len(b)) + b

    @staticmethod
    def int(n: int) -> bytes:
        if -2**31 <= n < 2**31:
            return b"J" + struct.pack("<i", n)
        enc = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
        return b"\x8a" + bytes([len(enc)]) + enc  # LONG1

    @staticmethod
    def glob(module: str, name: str) -> bytes:
        return b"c" + f"{module}\n{name}\n".encode()

    @classmethod
    def tuple(cls, items) -> bytes:
        return cls.MARK + b"".join(items) + cls.TUPLE


def pickled_tensor(key: str, numel: int, size, stride, offset: int = 0, storage: str = "FloatStorage") -> bytes:
    """``torch._utils._rebuild_tensor_v2`` of storage record ``data/<key>``, exactly as torch.save writes it."""
    pid = Op.tuple([Op.str("storage"), Op.glob("torch", storage), Op.str(key), Op.str("cpu"), Op.int(numel)])
    args = Op.tuple([pid + Op.BINPERSID, Op.int(offset), Op.tuple(map(Op.int, size)), Op.tuple(map(Op.int, stride)),
                     Op.FALSE, Op.glob("collections", "OrderedDict") + Op.EMPTY_TUPLE + Op.REDUCE])
    return Op.glob("torch._utils", "_rebuild_tensor_v2") + args + Op.REDUCE


def pickled_value(v) -> bytes:
    if isinstance(v, bool):
        return b"\x88" if v else b"\x89"
    if isinstance(v, int):
        return Op.int(v)
    if isinstance(v, str):
        return Op.str(v)
    if isinstance(v, (list, tuple)):
        return Op.LIST + Op.MARK + b"".join(pickled_value(x) for x in v) + Op.APPENDS
    if isinstance(v, bytes):  # a pre-assembled fragment
        return v
    if isinstance(v, dict):
        return Op.DICT + Op.MARK + b"".join(pickled_value(k) + pickled_value(x) for k, x in v.items()) + Op.SETITEMS
    raise TypeError(type(v))


def hand_torch_zip(sd: dict, tamper=None) -> bytes:
    """A torch zip for release dict ``sd`` built without torch.save: one storage record per tensor.

    ``tamper(key, numel, size, stride, offset, record) -> (numel, size, stride, offset, record)`` may lie about any of
    them for one tensor, to build the files a hostile party could.
    """
    records: dict[str, bytes] = {}
    state = {}
    for i, (name, t) in enumerate(sd["state_dict_unet"].items()):
        key = str(i)
        t = t.contiguous()
        record = t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes()
        storage = {torch.float32: "FloatStorage", torch.float16: "HalfStorage", torch.bfloat16: "BFloat16Storage"}[
            t.dtype]
        numel, size, stride, offset = t.numel(), tuple(t.shape), tuple(t.stride()), 0
        if tamper is not None:
            numel, size, stride, offset, record = tamper(name, numel, size, stride, offset, record)
        state[name] = pickled_tensor(key, numel, size, stride, offset, storage)
        records[key] = record
    top = {k: v for k, v in sd.items() if k != "state_dict_unet"}
    top["state_dict_unet"] = state
    data = Op.PROTO + pickled_value(top) + Op.STOP
    entries = {"archive/data.pkl": data, "archive/version": b"3\n", "archive/byteorder": b"little"}
    entries.update({f"archive/data/{k}": r for k, r in records.items()})
    return make_zip(entries)


def write(tmp_path: Path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def refused(path: str, *needles: str, who: str = "") -> str:
    """Load ``path``; assert a clean CheckpointError naming the file and containing every needle. Returns the text."""
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path, who) if who else load_checkpoint(path)
    msg = str(ei.value)
    assert os.path.basename(path) in msg, msg
    assert ckpt._UNEXPECTED not in msg, msg
    for n in needles:
        assert n.lower() in msg.lower(), (n, msg)
    return msg


@pytest.fixture
def no_torch_load(monkeypatch):
    """Fail the test if the file reaches torch.load (the refusal must happen in the pre-load checks)."""
    def boom(*a, **k):
        raise AssertionError("torch.load was reached")
    monkeypatch.setattr(ckpt.torch, "load", boom)


# ------------------------------------------------------------------------------------------------ layout
def test_world_checkpoint_parses_with_release_scale(world):
    loras = parse_release_dict(world.ckpt)
    for lset in loras.sets():
        listed = sum(len(world.ckpt[f"unet_lora_{p}_modules_{lset.kind}"]) for p in ckpt.PARTS)
        assert len(lset) == listed > 0
        assert lset.rank == 4
        assert all(p.scale == 2.0 for p in lset.pairs.values())  # peft's alpha 8 / rank 4


def test_release_dict_round_trips_and_is_copied():
    sd = small_release_dict()
    loras = parse_release_dict(sd)
    back = to_release_dict(loras)
    assert set(back) == set(sd)
    for k, v in sd.items():
        if k == "state_dict_unet":
            assert list(back[k]) == list(v)
            assert all(torch.equal(back[k][n], t) for n, t in v.items())
        else:
            assert back[k] == v
    before = loras.pix.pairs["down_blocks.0.resnets.0.conv1"].down.clone()
    for t in sd["state_dict_unet"].values():
        t.fill_(7.0)  # the caller reusing its dict must not change validated LoRAs
    assert torch.equal(loras.pix.pairs["down_blocks.0.resnets.0.conv1"].down, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_save_and_hand_built_zip_both_load(tmp_path, dtype):
    sd = small_release_dict(dtype=dtype)
    a = load_checkpoint(write(tmp_path, "saved.pkl", torch_save_bytes(sd)))
    b = load_checkpoint(write(tmp_path, "hand.pkl", hand_torch_zip(sd)))
    conv.verify_identical(a, b)  # the hand builder is faithful, so its tampered variants test what they claim
    assert a.pix.pairs["down_blocks.0.resnets.0.conv1"].down.dtype == dtype


def test_module_state_dict_with_metadata_and_parameters_loads(tmp_path):
    """What torch.save writes for ``unet.state_dict()`` (an OrderedDict with ``_metadata``) or for Parameters."""
    import collections

    sd = small_release_dict()
    od = collections.OrderedDict(sd["state_dict_unet"])
    od._metadata = collections.OrderedDict({"": {"version": 1}, "down_blocks.0": {"version": 1}})
    sd["state_dict_unet"] = od
    a = load_checkpoint(write(tmp_path, "od.pkl", torch_save_bytes(sd)))
    sd2 = small_release_dict()
    sd2["state_dict_unet"] = {k: torch.nn.Parameter(v) for k, v in sd2["state_dict_unet"].items()}
    b = load_checkpoint(write(tmp_path, "param.pkl", torch_save_bytes(sd2)))
    conv.verify_identical(a, b)
    assert type(b.pix.pairs["down_blocks.0.resnets.0.conv1"].down) is torch.Tensor


def test_pkl_and_safetensors_fixture_files_are_identical(pisa_files):
    folder = host.BASE_DIR / "models" / "pisa_sr"
    conv.verify_identical(load_checkpoint(str(folder / pisa_files["pkl"])),
                          load_checkpoint(str(folder / pisa_files["safetensors"])))


def test_checkpoint_is_not_held_open_or_mapped(tmp_path):
    p = write(tmp_path, "a.pkl", torch_save_bytes(small_release_dict()))
    loras = load_checkpoint(p)
    os.remove(p)  # on Windows a live memory map would forbid this; here the tensors must not depend on the file
    total = sum(float(t.abs().sum()) for s in loras.sets() for pr in s.pairs.values() for t in (pr.down, pr.up))
    assert total > 0


# ------------------------------------------------------------------------------------------------ pre-load checks
def test_storage_declared_larger_than_its_record_is_refused_before_torch_load(tmp_path, no_torch_load):
    # torch.load(mmap=True) slices the memory map by the *declared* size: this must never reach it.
    def lie(name, numel, size, stride, offset, record):
        if name.endswith("conv1.lora_A.default_encoder_pix.weight"):
            numel *= 1000
        return numel, size, stride, offset, record
    refused(write(tmp_path, "lie.pkl", hand_torch_zip(small_release_dict(), lie)), "declares")


def test_view_outside_its_storage_is_refused(tmp_path, no_torch_load):
    def lie(name, numel, size, stride, offset, record):
        return (numel, size, stride, numel - 1, record) if "to_q.lora_B" in name else (numel, size, stride, offset,
                                                                                         record)
    refused(write(tmp_path, "view.pkl", hand_torch_zip(small_release_dict(), lie)), "outside its storage")


def test_zero_stride_expansion_beyond_the_file_is_refused(tmp_path, no_torch_load):
    # One stored float viewed as a 20480x20480 matrix: 1.6 GB of work from a 4-byte record.
    def lie(name, numel, size, stride, offset, record):
        if "to_q.lora_A.default_decoder_pix" in name:
            return 1, (2, 20480), (0, 0), 0, record[:4]
        return numel, size, stride, offset, record
    refused(write(tmp_path, "expand.pkl", hand_torch_zip(small_release_dict(), lie)), "view")


def test_code_in_a_torch_zip_is_refused_without_loading(tmp_path, no_torch_load):
    evil = Op.PROTO + Op.glob("os", "system") + Op.tuple([Op.str("true")]) + Op.REDUCE + Op.STOP
    p = write(tmp_path, "evil.pkl", make_zip({"archive/data.pkl": evil, "archive/version": b"3\n"}))
    refused(p, "os.system", "pisa_sr.convert")


def test_plain_pickle_of_tensors_is_refused_as_code(tmp_path):
    import pickle

    p = write(tmp_path, "plain.pkl", pickle.dumps(small_release_dict()))  # tensors pickle via torch.load internally
    refused(p, "torch.storage._load_from_bytes", "pisa_sr.convert")


def test_legacy_torch_format_is_refused(tmp_path):
    buf = io.BytesIO()
    torch.save(small_release_dict(), buf, _use_new_zipfile_serialization=False)
    refused(write(tmp_path, "legacy.pkl", buf.getvalue()), "legacy", "download")


@pytest.mark.parametrize("case,needle", [
    ("compressed", "compressed"), ("crc", "checksum"), ("torchscript", "torchscript"), ("no_pickle", "data.pkl"),
    ("two_roots", "not laid out"), ("big_misc", "unexpected entry")])
def test_malformed_torch_zips_are_refused(tmp_path, no_torch_load, case, needle):
    entries = zip_entries(torch_save_bytes(small_release_dict()))
    root = next(iter(entries)).split("/")[0]
    if case == "compressed":
        data = make_zip(entries, zipfile.ZIP_DEFLATED)
    elif case == "crc":
        data = bytearray(make_zip(entries))
        rec = entries[f"{root}/data/0"]
        at = bytes(data).index(rec)
        data[at] ^= 0x40  # one flipped bit in tensor bytes
        data = bytes(data)
    elif case == "torchscript":
        data = make_zip({**entries, f"{root}/code/__torch__.py": b"def f(): pass\n"})
    elif case == "no_pickle":
        data = make_zip({k: v for k, v in entries.items() if not k.endswith("data.pkl")})
    elif case == "two_roots":
        data = make_zip({**entries, "other/x": b"1"})
    else:
        data = make_zip({**entries, f"{root}/extra.bin": b"\0" * (2 * 1024**2)})
    refused(write(tmp_path, f"{case}.pkl", data), needle, "download")


def test_oversized_file_is_refused_without_reading(tmp_path):
    p = tmp_path / "huge.pkl"
    with open(p, "wb") as f:
        f.truncate(ckpt.MAX_FILE_BYTES + 1)  # sparse: no disk, no memory
    refused(str(p), "refusing")


@pytest.mark.parametrize("name,data,needle", [
    ("empty.pkl", b"", "empty"), ("weird.txt", b"hello", "extension"),
    ("random.pkl", bytes(range(256)) * 4, "neither a torch checkpoint")])
def test_trivially_bad_files(tmp_path, name, data, needle):
    refused(write(tmp_path, name, data), needle)


def test_missing_file_and_directory(tmp_path):
    for p in (str(tmp_path / "nope.pkl"), str(tmp_path)):
        with pytest.raises(CheckpointError, match="not found.*models/pisa_sr"):
            load_checkpoint(p)


def test_who_prefixes_the_message(tmp_path):
    msg = refused(write(tmp_path, "empty.pkl", b""), who="Load PiSA LoRAs")
    assert msg.startswith("Load PiSA LoRAs: PiSA-SR checkpoint 'empty.pkl'")


# ------------------------------------------------------------------------------------------------ safetensors
def test_foreign_safetensors_lora_is_refused_with_convert_hint(tmp_path):
    from safetensors.torch import save_file

    p = str(tmp_path / "sd_lora.safetensors")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}, p)
    refused(p, "without PiSA-SR metadata", "pisa_sr.convert")


def test_safetensors_from_a_future_version_is_refused(tmp_path):
    data = safetensors_bytes(small_release_dict())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["version"] = "9"
    blob = json.dumps(header, separators=(",", ":")).encode()
    assert len(blob) <= n
    blob += b" " * (n - len(blob))  # same length, so offsets stay valid
    refused(write(tmp_path, "future.safetensors", data[:8] + blob + data[8 + n:]), "version", "convert")


def test_pickle_named_safetensors_is_refused_and_safetensors_named_pkl_is_read(tmp_path):
    sd = small_release_dict()
    refused(write(tmp_path, "renamed.safetensors", torch_save_bytes(sd)), "named .safetensors", "rename it to .pkl")
    a = load_checkpoint(write(tmp_path, "renamed.pkl", safetensors_bytes(sd)))  # safe either way: read by content
    conv.verify_identical(a, parse_release_dict(sd))


# ------------------------------------------------------------------------------------------------ convert CLI
def test_convert_in_process(tmp_path):
    src = write(tmp_path, "pisa_sr.pkl", torch_save_bytes(small_release_dict(rank=3)))
    dst = str(tmp_path / "pisa_sr.safetensors")
    out = io.StringIO()
    assert conv.main([src, dst], out) == conv.EXIT_OK
    text = out.getvalue()
    assert "verified bit-identical" in text and "pix: rank 3, 3 modules" in text and "sem: rank 3" in text
    assert "encoder 1, decoder 1, others 1" in text and "2 conv, 1 linear" in text
    conv.verify_identical(load_checkpoint(src), load_checkpoint(dst))
    assert not [f for f in os.listdir(tmp_path) if "partial" in f]

    out = io.StringIO()
    assert conv.main(["--check", dst], out) == conv.EXIT_OK and "valid PiSA-SR checkpoint" in out.getvalue()
    assert conv.main([src, dst], io.StringIO()) == conv.EXIT_USAGE  # exists, no --force
    assert conv.main([src, dst, "--force"], io.StringIO()) == conv.EXIT_OK
    assert conv.main([src, str(tmp_path / "x.pkl")], io.StringIO()) == conv.EXIT_USAGE
    assert conv.main([src], io.StringIO()) == conv.EXIT_USAGE
    assert conv.main(["--check", dst, src], io.StringIO()) == conv.EXIT_USAGE


def test_convert_refuses_bad_input_and_writes_nothing(tmp_path):
    evil = Op.PROTO + Op.glob("os", "system") + Op.tuple([Op.str("true")]) + Op.REDUCE + Op.STOP
    src = write(tmp_path, "evil.pkl", evil)
    dst = tmp_path / "out.safetensors"
    out = io.StringIO()
    assert conv.main([src, str(dst)], out) == conv.EXIT_REFUSED
    assert "refused:" in out.getvalue() and "os.system" in out.getvalue()
    assert not dst.exists() and os.listdir(tmp_path) == ["evil.pkl"]
    out = io.StringIO()
    assert conv.main(["--check", src], out) == conv.EXIT_REFUSED


def test_convert_reports_a_failed_verification(tmp_path, monkeypatch):
    src = write(tmp_path, "pisa_sr.pkl", torch_save_bytes(small_release_dict()))
    real_save = ckpt.save_safetensors

    def corrupting_save(loras, path):  # flips one weight's sign on the way to disk
        pair = loras.pix.pairs["down_blocks.0.resnets.0.conv1"]
        bad = ckpt.LoraPair(down=-pair.down, up=pair.up, scale=pair.scale)
        pix = ckpt.LoraSet("pix", loras.pix.rank, {**loras.pix.pairs, "down_blocks.0.resnets.0.conv1": bad},
                           dict(loras.pix.parts))
        real_save(PisaLoras(pix, loras.sem), path)

    monkeypatch.setattr(conv, "save_safetensors", corrupting_save)
    out = io.StringIO()
    assert conv.main([src, str(tmp_path / "o.safetensors")], out) == conv.EXIT_WRITE
    assert "did not verify" in out.getvalue()
    assert sorted(os.listdir(tmp_path)) == ["pisa_sr.pkl"]  # neither the output nor the temporary remains


def test_convert_cli_subprocess_without_comfy(tmp_path):
    py = os.environ.get("PISA_HOST_PYTHON", sys.executable)
    src = write(tmp_path, "pisa_sr.pkl", torch_save_bytes(small_release_dict()))
    dst = str(tmp_path / "pisa_sr.safetensors")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([py, "-m", "pisa_sr.convert", src, dst], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "verified bit-identical" in run.stdout
    # --check on a missing file: exit 1, a clear message, and the CLI never imported ComfyUI.
    check = subprocess.run(
        [py, "-c", "import sys, runpy; sys.argv=['convert', '--check', sys.argv[1]]\n"
                   "try:\n runpy.run_module('pisa_sr.convert', run_name='__main__')\n"
                   "except SystemExit as e:\n"
                   " assert not [m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths', 'nodes')]\n"
                   " raise", str(tmp_path / "nope.pkl")],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert check.returncode == conv.EXIT_REFUSED and "not found" in check.stdout, check.stdout + check.stderr


def test_converted_file_gives_bit_identical_node_output(world, pisa_files, pisa_model, tmp_path):
    """The README's advice (convert once) is free: same bits through Load -> Encode -> Sample -> Decode."""
    from helpers import run_node

    folder = host.BASE_DIR / "models" / "pisa_sr"
    cli_out = folder / "tiny_pisa_cli.safetensors"
    if cli_out.exists():
        cli_out.unlink()
    assert conv.main([str(folder / pisa_files["pkl"]), str(cli_out)], io.StringIO()) == conv.EXIT_OK
    # Same content as the fixture's conversion (bytes may differ: safetensors orders metadata by a hash map).
    conv.verify_identical(load_checkpoint(str(cli_out)), load_checkpoint(str(folder / pisa_files["safetensors"])))
    (st_model,) = run_node("PiSA_LoadLoRAs", model=world.model, lora_name=cli_out.name)
    # A small latent keeps this fast on 2 shared cores; the LoRA file only reaches the sampler's model.
    lat = {"samples": torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(5))}
    outs = {}
    for lp, ls in [(1.0, 1.0), (1.0, 0.0), (0.5, 1.5)]:  # merged, pix-only and two-pass paths
        for name, model in (("pkl", pisa_model), ("st", st_model)):
            (outs[name],) = run_node("PiSA_Sample", model=model, positive=world.conditioning, latent=lat,
                                     lambda_pix=lp, lambda_sem=ls, tile_size=96, tile_overlap=32)
        assert torch.equal(outs["pkl"]["samples"], outs["st"]["samples"]), (lp, ls)
        assert not torch.equal(outs["pkl"]["samples"], lat["samples"])  # the LoRAs did something
    images = [run_node("PiSA_Decode", latent=outs[n], vae=world.comfy_vae, color_fix="none")[0] for n in outs]
    assert torch.equal(images[0], images[1]) and float(images[0].std()) > 0.01
    cli_out.unlink()


@pytest.mark.parametrize("name", ["conv_in\n", "", "a..b", "__class__", "_private", "a.__dict__", "../x", "a" * 300,
                                  "down_blocks.0.résnets.0.conv1", "x.lora_A.default_encoder_pix", "con v", "a." * 20])
def test_invalid_module_names_are_refused_even_when_consistent(name):
    """Names are checked for syntax on their own, not only through a missing tensor key."""
    sd = small_release_dict()
    old = sd["unet_lora_encoder_modules_pix"][0]
    sd["unet_lora_encoder_modules_pix"] = [name]
    state = sd["state_dict_unet"]
    for ab in "AB":
        state[f"{name}.lora_{ab}.default_encoder_pix.weight"] = state.pop(f"{old}.lora_{ab}.default_encoder_pix.weight")
    with pytest.raises(CheckpointError, match="invalid module name"):
        parse_release_dict(sd, "names.pkl")
