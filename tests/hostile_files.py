"""Checkpoint files for the loader tests, valid and hostile, built in memory (no ComfyUI needed).

Hand-made pickles are assembled from opcodes and only ever handed to our loader, never to ``pickle`` (the tests that
could hang an unpatched loader run it in a child process).
"""
from __future__ import annotations

import io
import struct
import zipfile

import torch

from pisa_sr.checkpoint import parse_release_dict
from pisa_sr.convert import safetensors_bytes

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


def torch_save_bytes(obj, **kw) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


def conversion_bytes(sd: dict) -> bytes:
    """Our .safetensors conversion of a release dict."""
    return safetensors_bytes(parse_release_dict(sd))


def zip_entries(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {i.filename: z.read(i.filename) for i in z.infolist()}


def make_zip(entries: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compress) as z:
        for name, payload in entries.items():
            z.writestr(name, payload)
    return buf.getvalue()


def pickle_zip(pkl: bytes) -> bytes:
    """A torch zip holding only ``pkl`` as its data.pkl."""
    return make_zip({"archive/data.pkl": pkl, "archive/version": b"3\n"})


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


# ------------------------------------------------------------------------------------------------ issue 11, finding 1
def dag_key_pickle(levels: int = 80) -> bytes:
    """``{k: 1}`` whose key is ``levels`` nested pairs of one shared tuple: a few hundred bytes that torch's
    weights-only unpickler accepts and then hashes for 2**levels steps in C, with the GIL held."""
    dag = Op.EMPTY_TUPLE + b"q\x00" + b"h\x00\x86q\x00" * levels  # t = (t, t), memoized again each level
    return Op.PROTO + Op.DICT + dag + Op.int(1) + b"s" + Op.STOP


CODE_PICKLE = Op.PROTO + Op.glob("os", "system") + Op.tuple([Op.str("true")]) + Op.REDUCE + Op.STOP
PAYLOADS = {"dag-key": dag_key_pickle(), "code": CODE_PICKLE}


def release_entries() -> dict[str, bytes]:
    return zip_entries(torch_save_bytes(small_release_dict()))


def case_variant_archive(payload: bytes) -> bytes:
    """A valid torch zip plus an earlier entry ``archive/DATA.pkl``: torch's reader, matching names without case,
    takes that one; a reader that matches exactly takes the genuine ``archive/data.pkl``."""
    return make_zip({"archive/DATA.pkl": payload, **release_entries()})


def prepended_archive(payload: bytes) -> bytes:
    """Two archives of identical layout, the hostile one first: torch's reader follows the central directory's
    offsets as they stand (into the first archive), Python's ``zipfile`` shifts them onto the second, genuine one."""
    good = release_entries()
    name = next(n for n in good if n.endswith("/data.pkl"))
    assert len(payload) <= len(good[name])
    hostile = dict(good, **{name: payload + b"\0" * (len(good[name]) - len(payload))})
    return make_zip(hostile) + make_zip(good)


DIFFERENTIAL = {"case-variant": case_variant_archive, "prepended": prepended_archive}
