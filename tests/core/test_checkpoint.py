"""The checkpoint loader (core tier, no ComfyUI): layout, the pickle scan, archive differentials, safetensors, and
the convert CLI. Builders of valid and hostile files live in ``hostile_files``."""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import stat
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from hostile_files import (CODE_PICKLE, DIFFERENTIAL, PAYLOADS, Op, conversion_bytes, dag_key_pickle, hand_torch_zip,
                           make_zip, pickle_zip, release_entries, small_release_dict, torch_save_bytes)
from pisa_sr import checkpoint as ckpt
from pisa_sr import convert as conv
from pisa_sr.checkpoint import CheckpointError, PisaLoras, load_checkpoint, parse_release_dict
from pisa_sr.convert import to_release_dict
from pisa_sr.pickle_scan import MAX_OPS


REPO = Path(__file__).resolve().parents[2]
PY = os.environ.get("PISA_HOST_PYTHON", sys.executable)
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def write(tmp_path: Path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def refused(path: str, *needles: str) -> None:
    """Load ``path``; assert a clean CheckpointError naming the file and containing every needle."""
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path)
    msg = str(ei.value)
    assert os.path.basename(path) in msg, msg
    assert ckpt._UNEXPECTED not in msg and "weights_only" not in msg, msg
    for n in needles:
        assert n.lower() in msg.lower(), (n, msg)


# ------------------------------------------------------------------------------------------------ layout
def test_release_dict_parses_with_release_scale():
    sd = small_release_dict(rank=4)
    loras = parse_release_dict(sd)
    for lset in loras.sets():
        listed = sum(len(sd[f"unet_lora_{p}_modules_{lset.kind}"]) for p in ckpt.PARTS)
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


def test_checkpoint_is_not_held_open_or_mapped(tmp_path):
    p = write(tmp_path, "a.pkl", torch_save_bytes(small_release_dict()))
    loras = load_checkpoint(p)
    os.remove(p)  # on Windows an open file would forbid this; the tensors must not depend on the file
    total = sum(float(t.abs().sum()) for s in loras.sets() for pr in s.pairs.values() for t in (pr.down, pr.up))
    assert total > 0


# ------------------------------------------------------------------------------------------------ pre-load checks
def lie(target: str, change):
    """A ``hand_torch_zip`` tamper: ``change(numel, size, stride, offset, record)`` for the tensor named ``target``."""
    return lambda name, *decl: change(*decl) if target in name else decl


SD = small_release_dict()
ENTRIES = release_entries()
REFUSED = {  # file -> (bytes, fragments its refusal must contain)
    "empty.pkl": (b"", ["empty"]),
    "weird.txt": (b"hello", ["extension"]),
    "random.pkl": (bytes(range(256)) * 4, ["neither a torch checkpoint"]),
    "legacy.pkl": (torch_save_bytes(SD, _use_new_zipfile_serialization=False), ["legacy", "download"]),
    "code.pkl": (pickle_zip(CODE_PICKLE), ["os.system", "pisa_sr.convert"]),
    # tensors pickle via torch.load internally
    "plain.pkl": (pickle.dumps(SD), ["torch.storage._load_from_bytes", "pisa_sr.convert"]),
    # 64 MB of zeros in a 64 KB entry: refused from the sizes alone
    "bomb.pkl": (make_zip({**ENTRIES, "archive/data/9": bytes(64 * 1024**2)}, zipfile.ZIP_DEFLATED),
                 ["zip bomb", "download"]),
    "torchscript.pkl": (make_zip({**ENTRIES, "archive/code/__torch__.py": b"def f(): pass\n"}),
                        ["torchscript", "download"]),
    "no_pickle.pkl": (make_zip({k: v for k, v in ENTRIES.items() if not k.endswith("data.pkl")}),
                      ["data.pkl", "download"]),
    "not_a_dict.pkl": (make_zip({**ENTRIES, "archive/data.pkl": Op.PROTO + Op.LIST + Op.STOP}),
                       ["does not hold a dict", "download"]),
    # tensor records that lie: a storage larger than its record, a view outside its storage, and one stored float
    # expanded by zero strides (a 4-byte record, a view beyond the file)
    "declares.pkl": (hand_torch_zip(SD, lie("conv1.lora_A.default_encoder_pix.", lambda n, *d: (n * 1000, *d))),
                     ["declares"]),
    "outside.pkl": (hand_torch_zip(SD, lie("to_q.lora_B", lambda n, sz, st, _, rec: (n, sz, st, n - 1, rec))),
                    ["outside its storage"]),
    "expand.pkl": (hand_torch_zip(SD, lie("to_q.lora_A.default_decoder_pix",
                                          lambda n, sz, st, _, rec: (1, (2, 20480), (0, 0), 0, rec[:4]))), ["view"]),
    # pickle structure beyond a tensor file
    "dag_key.pkl": (pickle_zip(dag_key_pickle()), ["shares structure"]),  # a key any unpickler hashes in 2**80 steps
    "shared_list.pkl": (pickle_zip(Op.PROTO + Op.LIST + b"q\x00" + b"h\x00h\x00\x86q\x00" * 60 + Op.STOP),
                        ["shares structure"]),  # [x, x] nested 60 deep: exponential to print or copy
    "deep.pkl": (pickle_zip(Op.PROTO + (Op.LIST + Op.MARK) * 20 + Op.APPENDS * 20 + Op.STOP), ["nests"]),
    "int_key.pkl": (pickle_zip(Op.PROTO + Op.DICT + Op.int(1) + Op.int(2) + b"s" + Op.STOP),
                    ["keys that are not strings"]),
    "set.pkl": (pickle_zip(Op.PROTO + Op.MARK + Op.int(1) + b"\x91" + Op.STOP), ["FROZENSET"]),
    "op_flood.pkl": (pickle_zip(Op.PROTO + Op.DICT + b"N" * (MAX_OPS + 1) + Op.STOP), ["steps"]),
    # a persistent id that is not a tuple once reached the backstop
    "str_persid.pkl": (pickle_zip(Op.PROTO + Op.str("x") + b"Q" + Op.STOP), ["persistent object"]),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_bad_files_are_refused_before_torch_load(tmp_path, monkeypatch, name):
    monkeypatch.setattr(ckpt.torch, "load", lambda *a, **k: pytest.fail("torch.load was reached"))
    data, needles = REFUSED[name]
    refused(write(tmp_path, name, data), *needles)


def load_in_child(path: str) -> str:
    """``load_checkpoint`` in a child process: a hang there (torch hashes in C with the GIL held, so no signal can
    stop it) fails the test instead of freezing the run."""
    code = ("import sys\nfrom pisa_sr.checkpoint import CheckpointError, load_checkpoint\ntry:\n"
            "    load_checkpoint(sys.argv[1])\n    print('LOADED')\n"
            "except CheckpointError as e:\n    print('REFUSED', e)")
    try:
        run = subprocess.run([PY, "-c", code, path], cwd=REPO, capture_output=True, text=True, timeout=120,
                             env=CHILD_ENV)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading {os.path.basename(path)} did not finish in 120 s: the loader hangs on it")
    return run.stdout.strip() or run.stderr[-2000:]


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("family", sorted(DIFFERENTIAL))
def test_archive_differentials_are_refused(tmp_path, family, payload):
    """Issue 11, finding 1: whichever entry torch's zip reader picks is the pickle that is scanned."""
    out = load_in_child(write(tmp_path, f"{family}-{payload}.pkl", DIFFERENTIAL[family](PAYLOADS[payload])))
    assert out.startswith("REFUSED") and f"{family}-{payload}.pkl" in out, out
    assert {"dag-key": "shares structure", "code": "'os.system'"}[payload] in out, out
    assert "weights_only" not in out, out


def test_oversized_file_is_refused_without_reading(tmp_path):
    p = tmp_path / "huge.pkl"
    with open(p, "wb") as f:
        f.truncate(ckpt.MAX_FILE_BYTES + 1)  # sparse: no disk, no memory
    refused(str(p), "refusing")


def test_missing_file_and_directory(tmp_path):
    for p in (str(tmp_path / "nope.pkl"), str(tmp_path)):
        with pytest.raises(CheckpointError, match="not found.*models/pisa_sr"):
            load_checkpoint(p)


# ------------------------------------------------------------------------------------------------ safetensors
def test_foreign_safetensors_lora_is_refused_with_convert_hint(tmp_path):
    from safetensors.torch import save_file

    p = str(tmp_path / "sd_lora.safetensors")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}, p)
    refused(p, "without PiSA-SR metadata", "pisa_sr.convert")


def test_safetensors_from_a_future_version_is_refused(tmp_path):
    data = conversion_bytes(small_release_dict())
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
    a = load_checkpoint(write(tmp_path, "renamed.pkl", conversion_bytes(sd)))  # safe either way: read by content
    conv.verify_identical(a, parse_release_dict(sd))


# ------------------------------------------------------------------------------------------------ convert CLI
@pytest.fixture
def src(tmp_path) -> str:
    return write(tmp_path, "pisa_sr.pkl", torch_save_bytes(small_release_dict(rank=3)))


def test_convert_in_process(tmp_path, src):
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
    src = write(tmp_path, "evil.pkl", CODE_PICKLE)
    dst = tmp_path / "out.safetensors"
    out = io.StringIO()
    assert conv.main([src, str(dst)], out) == conv.EXIT_REFUSED
    assert "refused:" in out.getvalue() and "os.system" in out.getvalue()
    assert not dst.exists() and os.listdir(tmp_path) == ["evil.pkl"]
    assert conv.main(["--check", src], io.StringIO()) == conv.EXIT_REFUSED


def test_convert_reports_a_failed_verification(tmp_path, monkeypatch, src):
    real = conv.safetensors_bytes

    def corrupting(loras):  # flips one weight's sign on the way out
        pair = loras.pix.pairs["down_blocks.0.resnets.0.conv1"]
        bad = ckpt.LoraPair(down=-pair.down, up=pair.up, scale=pair.scale)
        pix = ckpt.LoraSet("pix", loras.pix.rank, {**loras.pix.pairs, "down_blocks.0.resnets.0.conv1": bad},
                           dict(loras.pix.parts))
        return real(PisaLoras(pix, loras.sem))

    monkeypatch.setattr(conv, "safetensors_bytes", corrupting)
    out = io.StringIO()
    assert conv.main([src, str(tmp_path / "o.safetensors")], out) == conv.EXIT_WRITE
    assert "did not verify" in out.getvalue()
    assert sorted(os.listdir(tmp_path)) == ["pisa_sr.pkl"]  # neither the output nor the temporary remains


def test_convert_output_is_reproducible_with_a_normal_file_mode(tmp_path, src):
    """Issue 11, finding 6: same input, same bytes; the file mode follows the umask like any new file."""
    old = os.umask(0o022)
    try:
        for name in ("a.safetensors", "b.safetensors"):
            assert conv.main([src, str(tmp_path / name)], io.StringIO()) == conv.EXIT_OK
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert stat.S_IMODE(os.stat(tmp_path / "a.safetensors").st_mode) == 0o644


def _denied(path, *a, **k):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)


class _FullDisk(io.FileIO):
    def write(self, b):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("case,words", [
    ("missing", "no such file or directory"), ("unwritable", "permission denied"), ("full", "no space left")])
def test_convert_output_folder_problems_give_one_clear_line(tmp_path, monkeypatch, src, case, words):
    """Issue 11, finding 6: a missing, unwritable or full output folder gives one line and exit code 3. Root ignores
    permissions and no disk can be filled here, so the last two use stand-ins for the file system's answer."""
    dst = tmp_path / ("no_such_dir" if case == "missing" else "") / "out.safetensors"
    if case == "unwritable":
        monkeypatch.setattr(conv, "open", _denied, raising=False)
    elif case == "full":
        monkeypatch.setattr(conv, "open", lambda p, mode="r": _FullDisk(p, mode.replace("b", "")), raising=False)
    out = io.StringIO()
    assert conv.main([src, str(dst)], out) == conv.EXIT_WRITE == 3
    text = out.getvalue()
    assert text.count("\n") == 1 and text.startswith(f"error: cannot write '{dst}'") and words in text.lower(), text
    assert "Traceback" not in text and sorted(os.listdir(tmp_path)) == ["pisa_sr.pkl"]


def test_convert_cli_subprocess_without_comfy(tmp_path, src):
    dst = str(tmp_path / "pisa_sr.safetensors")
    run = subprocess.run([PY, "-m", "pisa_sr.convert", src, dst], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=CHILD_ENV)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "verified bit-identical" in run.stdout
    assert Path(dst).read_bytes() == conv.safetensors_bytes(load_checkpoint(src))  # same bytes in every process
    # --check on a missing file: exit 1, a clear message, and the CLI never imported ComfyUI.
    check = subprocess.run(
        [PY, "-c", "import sys, runpy; sys.argv=['convert', '--check', sys.argv[1]]\n"
                   "try:\n runpy.run_module('pisa_sr.convert', run_name='__main__')\n"
                   "except SystemExit as e:\n"
                   " assert not [m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths', 'nodes')]\n"
                   " raise", str(tmp_path / "nope.pkl")],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=CHILD_ENV)
    assert check.returncode == conv.EXIT_REFUSED and "not found" in check.stdout, check.stdout + check.stderr


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
