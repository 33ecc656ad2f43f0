"""Read and validate PiSA-SR LoRA checkpoints (the release's ``pisa_sr.pkl`` and our ``.safetensors`` conversion).

Nothing here executes code from a file, and nothing is allocated from a size the file merely claims:

* torch zip pickles are inspected first (entries stored, in bounds, checksummed, the pickle small); their pickle is
  then *scanned* by a restricted pure-Python unpickler whose only callables are inert stand-ins, which records every
  storage and tensor view and checks them against the zip records. Only then is the file opened with
  ``torch.load(weights_only=True)``, memory-mapped, and its tensors are copied once they are validated.
* safetensors headers are parsed and bounded before any tensor is read.
* the loaded object is checked against the exact release layout (keys, types, ranks, module names, dtypes, shapes,
  finite values) by :func:`parse_release_dict`.

Every failure is a :class:`CheckpointError` whose message names the file and says how to fix it.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from .errors import CheckpointError

__all__ = [
    "PARTS", "KINDS", "PEFT_DEFAULT_ALPHA", "LoraPair", "LoraSet", "PisaLoras", "CheckpointError",
    "load_checkpoint", "parse_release_dict", "save_safetensors", "to_release_dict", "CONVERT_HINT",
]

PARTS = ("encoder", "decoder", "others")
KINDS = ("pix", "sem")
PEFT_DEFAULT_ALPHA = 8.0  # the release stores no alpha: peft's LoraConfig default applies
SAFETENSORS_FORMAT = "pisa_sr_lora"
SAFETENSORS_VERSION = "1"

# Bounds. The release is rank 4 over SD2's 258 targeted modules per kind (32.4 MB in fp32; its data.pkl is ~0.2 MB).
# Every bound leaves wide headroom for a higher-rank retrain of SD2 while keeping what a hostile file can make us
# allocate finite and checkable before anything is allocated.
MAX_RANK = 256
MAX_FILE_BYTES = 2 * 1024**3  # a rank-256 pix+sem pair for SD2 is 2.08 GB in fp32, just inside
MAX_TENSOR_BYTES = MAX_FILE_BYTES  # sum of all LoRA tensors' bytes, also for in-memory dicts
MAX_MODULES = 4096  # per LoRA kind, all parts together (the release targets 258)
MAX_TENSORS = 2 * len(KINDS) * MAX_MODULES
MAX_DIM = 20480  # in/out features: SD2's widest LoRA target (GEGLU ff.net.0.proj) has 10240 outputs
MAX_KERNEL = 7  # SD2's convolutions are 3x3 and 1x1
MAX_NAME_LEN = 256
MAX_PICKLE_BYTES = 8 * 1024**2  # the release's data.pkl is ~0.2 MB
MAX_PICKLE_OPS = 1_000_000  # the release's pickle runs ~34k opcodes; each can build at most one ~64-byte object
MAX_HEADER_BYTES = 8 * 1024**2  # safetensors JSON header
MAX_MISC_RECORD_BYTES = 1024**2  # zip entries other than the pickle and the storages (version, byteorder, ...)
ALLOWED_DTYPES = {torch.float16, torch.bfloat16, torch.float32}
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
_COMPONENT = r"(?:[A-Za-z][A-Za-z0-9_]{0,63}|[0-9]{1,4})"
_MODULE_RE = re.compile(rf"[A-Za-z][A-Za-z0-9_]{{0,63}}(?:\.{_COMPONENT}){{0,15}}")  # use fullmatch
_TOP_KEYS = {f"unet_lora_{p}_modules_{k}" for p in PARTS for k in KINDS} | {
    "lora_rank_unet_pix", "lora_rank_unet_sem", "state_dict_unet"}
_INT_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first object of a pre-1.6 torch.save file

FIX_DOWNLOAD = ("Download pisa_sr.pkl again from the official PiSA-SR release (about 32 MB) into "
                "ComfyUI/models/pisa_sr/.")
CONVERT_HINT = (
    "A genuine pisa_sr.pkl holds only tensors, integers and lists of module names: download it again from the "
    "official PiSA-SR release, then convert it once with `python -m pisa_sr.convert pisa_sr.pkl "
    "pisa_sr.safetensors` (run from the pack folder) and use the .safetensors file, which cannot carry code."
)
FIX_RECONVERT = ("Convert the release pisa_sr.pkl again with `python -m pisa_sr.convert pisa_sr.pkl "
                 "pisa_sr.safetensors` from this version of the pack.")
_UNEXPECTED = "unexpected error while validating"  # the backstop's wording; tests assert it never appears


@dataclass(frozen=True)
class LoraPair:
    """One module's low-rank update ``scale * up @ down`` (peft's ``lora_B @ lora_A``)."""

    down: torch.Tensor  # lora_A: [r, in] (Linear) or [r, in, kh, kw] (Conv2d)
    up: torch.Tensor  # lora_B: [out, r] or [out, r, 1, 1]
    scale: float

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Merged weight delta, computed in fp32 as peft's merge does, then cast."""
        down = self.down.to(torch.float32)
        up = self.up.to(torch.float32).flatten(1)
        if self.is_conv:
            d = torch.einsum("or,rikl->oikl", up, down)
        else:
            d = up @ down
        return (d * self.scale).to(dtype)

    def out_features(self) -> int:
        return self.up.shape[0]

    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this update fits."""
        if self.is_conv:
            return (self.up.shape[0], self.down.shape[1], self.down.shape[2], self.down.shape[3])
        return (self.up.shape[0], self.down.shape[1])


@dataclass
class LoraSet:
    """All modules of one LoRA kind (pix or sem), keyed by diffusers module name, with the part each belongs to."""

    kind: str
    rank: int
    pairs: dict[str, LoraPair] = field(default_factory=dict)
    parts: dict[str, str] = field(default_factory=dict)  # module -> encoder/decoder/others

    def __len__(self) -> int:
        return len(self.pairs)


@dataclass
class PisaLoras:
    """Both LoRA sets of a PiSA-SR checkpoint, validated."""

    pix: LoraSet
    sem: LoraSet
    alpha: float = PEFT_DEFAULT_ALPHA
    source: str = ""

    def sets(self) -> tuple[LoraSet, LoraSet]:
        return self.pix, self.sem


# ---------------------------------------------------------------------------------------------------- messages
def _fail(path: str, msg: str, fix: str = FIX_DOWNLOAD) -> CheckpointError:
    where = f" '{os.path.basename(path)}'" if path else ""
    return CheckpointError(f"PiSA-SR checkpoint{where}: {msg} {fix}".rstrip())


def _describe(v: Any) -> str:
    """A short, bounded description of an untrusted value (never ``repr`` of a container: it can be exponential)."""
    if v is None or isinstance(v, bool):
        return repr(v)
    if isinstance(v, int):
        return repr(v) if -10**12 < v < 10**12 else "a very large integer"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return repr(v[:60]) + ("..." if len(v) > 60 else "")
    if isinstance(v, torch.Tensor):
        return f"a {str(v.dtype).replace('torch.', '')} tensor of shape {tuple(v.shape)}"
    return f"a {type(v).__name__}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


# ---------------------------------------------------------------------------------------------------- layout
def _check_rank(path: str, name: str, value: Any) -> int:
    if (isinstance(value, torch.Tensor) and value.dtype in _INT_DTYPES and value.numel() == 1
            and value.layout == torch.strided and value.device.type == "cpu"):
        value = int(value.reshape(()).item())
    if isinstance(value, bool) or not isinstance(value, int) or not (1 <= value <= MAX_RANK):
        raise _fail(path, f"'{name}' must be an integer rank between 1 and {MAX_RANK}, got {_describe(value)}; the "
                          "file was edited or is not a PiSA-SR checkpoint.")
    return value


def _check_module_list(path: str, name: str, value: Any) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise _fail(path, f"'{name}' must be a list of module names, got {_describe(value)}.")
    if len(value) > MAX_MODULES:
        raise _fail(path, f"'{name}' lists {len(value)} modules; an SD2 UNet has far fewer. Not a PiSA-SR file.")
    out = []
    for m in value:
        if not isinstance(m, str) or len(m) > MAX_NAME_LEN or not _MODULE_RE.fullmatch(m) or ".lora_" in m:
            raise _fail(path, f"'{name}' contains an invalid module name {_describe(m)} (expected a diffusers UNet "
                              "module path such as 'down_blocks.0.resnets.0.conv1').")
        out.append(m)
    if len(set(out)) != len(out):
        raise _fail(path, f"'{name}' lists a module more than once.")
    return out


def _is_dense(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """True for a permutation of a contiguous layout (channels-last included): no element aliased, none skipped.

    An expanded (zero-stride) view can present gigabytes from one stored number; this rules it out.
    """
    expect = 1
    for st, s in sorted((st, s) for s, st in zip(shape, stride) if s != 1):
        if st != expect:
            return False
        expect *= s
    return True


def _check_tensor(path: str, key: str, t: Any) -> torch.Tensor:
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise _fail(path, f"'{key[:120]}' is {_describe(t)}, expected a tensor.")
    if t.layout != torch.strided or t.device.type != "cpu" or t.is_quantized or t.is_nested:
        raise _fail(path, f"'{key[:120]}' is a {t.layout} tensor on {t.device}; expected a dense CPU tensor.")
    if t.dtype not in ALLOWED_DTYPES:
        raise _fail(path, f"'{key[:120]}' has dtype {t.dtype}; LoRA weights must be float16, bfloat16 or float32.")
    if t.is_neg() or t.is_conj() or not _is_dense(tuple(t.shape), tuple(t.stride())):
        raise _fail(path, f"'{key[:120]}' is an expanded, overlapping or lazily transformed view; expected a plain "
                          "weight tensor.")
    if t.dim() not in (2, 4) or any(s <= 0 or s > MAX_DIM for s in t.shape) or (
            t.dim() == 4 and (t.shape[2] > MAX_KERNEL or t.shape[3] > MAX_KERNEL)):
        raise _fail(path, f"'{key[:120]}' has shape {tuple(t.shape)}; expected a 2-D (Linear) or 4-D (Conv, kernel "
                          f"<= {MAX_KERNEL}) LoRA matrix with sides <= {MAX_DIM}.")
    return t


def _parse(sd: Any, path: str) -> PisaLoras:
    if not isinstance(sd, dict):
        raise _fail(path, f"expected a dict of LoRA weights, found {_describe(sd)}. Is this a PiSA-SR checkpoint?")
    if len(sd) > 4 * len(_TOP_KEYS) or not all(isinstance(k, str) for k in sd):
        raise _fail(path, "has non-string or too many top-level keys: not a PiSA-SR checkpoint.")
    keys = set(sd)
    missing = sorted(_TOP_KEYS - keys)
    if missing:
        looks_like = "a full model or another LoRA format" if missing == sorted(_TOP_KEYS) else "an incomplete file"
        raise _fail(path, f"missing {', '.join(missing)}: this is {looks_like}, not the PiSA-SR release "
                          "checkpoint (pisa_sr.pkl) or its conversion.")
    extra = sorted(keys - _TOP_KEYS)
    if extra:
        raise _fail(path, f"unexpected entries {', '.join(_describe(k) for k in extra[:5])}; refusing a file that "
                          "carries more than the release layout.")
    ranks = {k: _check_rank(path, f"lora_rank_unet_{k}", sd[f"lora_rank_unet_{k}"]) for k in KINDS}
    state = sd["state_dict_unet"]
    if not isinstance(state, dict):
        raise _fail(path, f"'state_dict_unet' must be a dict of tensors, got {_describe(state)}.")
    if len(state) > MAX_TENSORS:
        raise _fail(path, f"'state_dict_unet' holds {len(state)} entries; a PiSA-SR checkpoint has at most "
                          f"{MAX_TENSORS}.")
    bad_key = next((k for k in state if not isinstance(k, str) or len(k) > 2 * MAX_NAME_LEN), None)
    if bad_key is not None:
        raise _fail(path, f"'state_dict_unet' has an invalid key {_describe(bad_key)}.")

    lists: dict[str, dict[str, list[str]]] = {}
    for kind in KINDS:
        lists[kind] = {part: _check_module_list(path, f"unet_lora_{part}_modules_{kind}",
                                                sd[f"unet_lora_{part}_modules_{kind}"]) for part in PARTS}
        total = sum(len(v) for v in lists[kind].values())
        if total == 0:
            raise _fail(path, f"the {kind} LoRA lists no modules.")
        if total > MAX_MODULES:
            raise _fail(path, f"the {kind} LoRA lists {total} modules; an SD2 UNet has far fewer.")

    sets: dict[str, LoraSet] = {}
    expected_keys: set[str] = set()
    total_bytes = 0
    for kind in KINDS:
        lset = LoraSet(kind=kind, rank=ranks[kind])
        scale = PEFT_DEFAULT_ALPHA / ranks[kind]
        for part in PARTS:
            for module in lists[kind][part]:
                if module in lset.parts:
                    raise _fail(path, f"module '{module}' is listed in both the {lset.parts[module]} and {part} "
                                      f"lists of the {kind} LoRA.")
                ka = f"{module}.lora_A.default_{part}_{kind}.weight"
                kb = f"{module}.lora_B.default_{part}_{kind}.weight"
                for k in (ka, kb):
                    if k not in state:
                        raise _fail(path, f"module '{module}' ({kind}, {part}) has no tensor '{k}'; the file is "
                                          "truncated or was edited.")
                a = _check_tensor(path, ka, state[ka])
                b = _check_tensor(path, kb, state[kb])
                expected_keys.update((ka, kb))
                r = ranks[kind]
                if a.dim() != b.dim():
                    raise _fail(path, f"'{module}': lora_A is {a.dim()}-D but lora_B is {b.dim()}-D.")
                if a.dtype != b.dtype:
                    raise _fail(path, f"'{module}': lora_A is {a.dtype} but lora_B is {b.dtype}.")
                if a.shape[0] != r or b.shape[1] != r:
                    raise _fail(path, f"'{module}': shapes {tuple(a.shape)} / {tuple(b.shape)} do not match the "
                                      f"declared {kind} rank {r}.")
                if b.dim() == 4 and tuple(b.shape[2:]) != (1, 1):
                    raise _fail(path, f"'{module}': lora_B must be a 1x1 convolution, got {tuple(b.shape)}.")
                total_bytes += a.numel() * a.element_size() + b.numel() * b.element_size()
                if total_bytes > MAX_TENSOR_BYTES:
                    raise _fail(path, f"its LoRA tensors exceed {MAX_TENSOR_BYTES // 1024**2} MB; far more than any "
                                      f"rank <= {MAX_RANK} LoRA of SD2 needs.")
                lset.pairs[module] = LoraPair(down=a, up=b, scale=scale)
                lset.parts[module] = part
        sets[kind] = lset
    if len(state) != len(expected_keys):
        unknown = next(k for k in state if k not in expected_keys)
        raise _fail(path, f"'state_dict_unet' has {len(state) - len(expected_keys)} tensors that belong to no "
                          f"listed module (e.g. {_describe(unknown)}); the file was edited or is not a PiSA-SR "
                          "checkpoint.")
    for kind, lset in sets.items():
        for module, pair in lset.pairs.items():
            for name, t in (("lora_A", pair.down), ("lora_B", pair.up)):
                if not bool(torch.isfinite(t).all()):
                    raise _fail(path, f"'{module}' {kind} {name} contains NaN or infinity; the file is corrupted.")
    # Own the memory: detach from the caller's dict and from a memory-mapped file (which Windows would keep locked).
    for lset in sets.values():
        for module, pair in list(lset.pairs.items()):
            lset.pairs[module] = LoraPair(down=pair.down.detach().clone(memory_format=torch.contiguous_format),
                                          up=pair.up.detach().clone(memory_format=torch.contiguous_format),
                                          scale=pair.scale)
    return PisaLoras(pix=sets["pix"], sem=sets["sem"], source=path)


def _backstop(path: str, e: Exception) -> CheckpointError:
    return _fail(path, f"{_UNEXPECTED} it ({type(e).__name__}: {_first_line(e)}); the file is damaged or not a "
                       "PiSA-SR checkpoint.")


def parse_release_dict(sd: Any, path: str = "") -> PisaLoras:
    """Validate a dict in the release's ``pisa_sr.pkl`` layout and build both LoRA sets (tensors are copied).

    Every rule is a reason the release would misbehave or a sign of a foreign or tampered file.
    """
    try:
        return _parse(sd, path)
    except CheckpointError:
        raise
    except Exception as e:  # a rule we missed must still end in a clean refusal
        raise _backstop(path, e) from None


# ---------------------------------------------------------------------------------------------------- zip pickles
class _Refused(Exception):
    """Raised by the scan's stand-ins: the pickle asks for something outside the tensor-file vocabulary."""


class _ForbiddenGlobal(_Refused):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _StorageType:
    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Storage:
    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorStub:
    __slots__ = ("storage", "nbytes")

    def __init__(self, storage: _Storage, nbytes: int):
        self.storage, self.nbytes = storage, nbytes


class _EmptyHooks(dict):
    """What ``collections.OrderedDict()`` rebuilds to in the scan (tensor backward hooks; must stay empty)."""


class _StandIn:
    """An inert callable handed to the scan instead of a real global (slots: BUILD cannot set attributes on it)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _PickleScan:
    """Checks a torch ``data.pkl`` without running it: records storages and views and bounds them by the zip records.

    Only the globals a plain tensor dict needs exist here, as stand-ins; the unpickler is CPython's pure-Python one
    (its memo is a dict, so a huge memo index cannot make it allocate).
    """

    def __init__(self, records: dict[str, int]):
        self.records = records  # storage key -> record bytes
        self.storages: dict[str, _Storage] = {}
        self.view_bytes = 0
        self.tensors = 0
        self.callables = {
            "torch._utils._rebuild_tensor_v2": _StandIn(self._rebuild_tensor),
            "torch._utils._rebuild_parameter": _StandIn(self._rebuild_parameter),
            "collections.OrderedDict": _StandIn(self._ordered_dict),
        }

    def run(self, data: bytes, records_bytes: int) -> Any:
        result = _ScanUnpickler(io.BytesIO(data), self).load()
        if self.view_bytes > records_bytes:
            raise _Refused(f"its tensors view {self.view_bytes} bytes but the file stores {records_bytes}")
        return result

    def _storage(self, pid: Any) -> _Storage:
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
            raise _Refused("it has a persistent object that is not a tensor storage")
        _, stype, key, location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not isinstance(location, str) \
                or not _is_int(numel) or numel < 0 or len(key) > 64 or len(location) > 64:
            raise _Refused("it has a malformed tensor storage reference")
        nbytes = numel * stype.dtype.itemsize
        if self.records.get(key) != nbytes:
            raise _Refused(f"a storage declares {nbytes} bytes but the file's record 'data/{key[:20]}' holds "
                           f"{self.records.get(key, 'none')}")
        known = self.storages.get(key)
        if known is None:
            known = self.storages[key] = _Storage(key, stype.dtype, numel)
        elif known.dtype != stype.dtype or known.numel != numel:
            raise _Refused("one storage is declared with two different types or sizes")
        return known

    def _rebuild_tensor(self, *args: Any) -> _TensorStub:
        if len(args) not in (6, 7):
            raise _Refused("a tensor record has the wrong number of fields")
        storage, offset, size, stride, requires_grad, hooks = args[:6]
        metadata = args[6] if len(args) == 7 else None
        if not isinstance(storage, _Storage) or not _is_int(offset) or offset < 0:
            raise _Refused("a tensor record does not reference a storage")
        if type(size) is not tuple or type(stride) is not tuple or len(size) != len(stride) or len(size) > 8 \
                or not all(_is_int(s) and 0 <= s <= MAX_DIM for s in size) \
                or not all(_is_int(s) and 0 <= s <= storage.numel for s in stride):
            raise _Refused("a tensor record has an invalid shape or stride")
        if not isinstance(requires_grad, bool) or not isinstance(hooks, _EmptyHooks) or hooks \
                or not (metadata is None or (isinstance(metadata, dict) and not metadata)):
            raise _Refused("a tensor record carries hooks or metadata")
        numel = math.prod(size)
        if numel and not _is_dense(size, stride):
            raise _Refused("a tensor is an expanded or overlapping view of its storage")
        if numel:
            last = offset + sum((s - 1) * st for s, st in zip(size, stride))
            if last >= storage.numel:
                raise _Refused("a tensor views bytes outside its storage")
        self.tensors += 1
        self.view_bytes += numel * storage.dtype.itemsize
        if self.tensors > MAX_TENSORS:
            raise _Refused(f"it holds more than {MAX_TENSORS} tensors")
        return _TensorStub(storage, numel * storage.dtype.itemsize)

    def _rebuild_parameter(self, data: Any, requires_grad: Any, hooks: Any) -> _TensorStub:
        if not isinstance(data, _TensorStub) or not isinstance(requires_grad, bool) \
                or not isinstance(hooks, _EmptyHooks) or hooks:
            raise _Refused("a parameter record is malformed")
        return data

    def _ordered_dict(self, *args: Any) -> dict:
        if args:
            raise _Refused("it rebuilds a dict from arguments")
        return _EmptyHooks()


def _put_items(target: Any, items: list) -> None:
    if not isinstance(target, dict):
        raise _Refused("it sets items on something that is not a dict")
    if len(items) % 2:
        raise _Refused("it sets a dict item without a value")
    for i in range(0, len(items), 2):
        if type(items[i]) not in (str, int):
            raise _Refused("it has a dict key that is not a string")
        target[items[i]] = items[i + 1]


class _ScanUnpickler(pickle._Unpickler):  # type: ignore[name-defined]  # CPython's pure-Python implementation
    """The scan's unpickler: stand-ins for globals, recorded storages, and no hashing of untrusted keys.

    Hashing is the one thing pickle itself does to the data it builds, and a key made of nested shared tuples (a
    DAG) hashes in exponential time. A tensor file needs only string (or int) keys, and never a set.
    """

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: Any, scan: _PickleScan):
        super().__init__(file)
        self._scan = scan
        self._ops = 0

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        fn = self._scan.callables.get(f"{module}.{name}")
        if fn is None:
            raise _ForbiddenGlobal(f"{module}.{name}"[:120])
        return fn

    def persistent_load(self, pid: Any) -> Any:
        return self._scan._storage(pid)

    def _setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        _put_items(self.stack[-1], [key, value])

    def _setitems(self) -> None:
        items = self.pop_mark()
        _put_items(self.stack[-1], items)

    def _dict(self) -> None:
        items = self.pop_mark()
        d: dict = {}
        _put_items(d, items)
        self.append(d)

    def _no_sets(self) -> None:
        raise _Refused("it builds a set, which a tensor file never holds")

    dispatch[pickle.SETITEM[0]] = _setitem
    dispatch[pickle.SETITEMS[0]] = _setitems
    dispatch[pickle.DICT[0]] = _dict
    for _op in (pickle.EMPTY_SET, pickle.ADDITEMS, pickle.FROZENSET):
        dispatch[_op[0]] = _no_sets
    del _op


def _counted(fn: Callable[[Any], None]) -> Callable[[Any], None]:
    """An opcode handler that first checks the opcode budget, which bounds the objects a pickle can build."""
    def op(self: _ScanUnpickler) -> None:
        self._ops += 1
        if self._ops > MAX_PICKLE_OPS:
            raise _Refused(f"its pickle runs more than {MAX_PICKLE_OPS:,} steps (the release's runs ~34,000)")
        fn(self)
    return op


_ScanUnpickler.dispatch = {k: _counted(f) for k, f in _ScanUnpickler.dispatch.items()}


def _read_local_data_offset(f: Any, info: zipfile.ZipInfo, size: int) -> int:
    """Where an entry's bytes start (its local header can differ in length from the central directory's copy)."""
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise _Refused(f"the zip entry '{info.filename[:60]}' has no local header")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    if f.read(name_len) != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
        raise _Refused(f"the zip entry '{info.filename[:60]}' has a mismatched local header")
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > size:
        raise _Refused(f"the zip entry '{info.filename[:60]}' extends past the end of the file")
    return start


def _crc32(f: Any, start: int, length: int) -> int:
    f.seek(start)
    crc, left = 0, length
    while left:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            raise _Refused("the file ends inside a tensor record")
        crc = zlib.crc32(chunk, crc)
        left -= len(chunk)
    return crc


def _inspect_zip(path: str, size: int) -> tuple[bytes, dict[str, int]]:
    """The pickle bytes and storage record sizes of a torch zip, after checking the archive is sane and intact."""
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_TENSORS + 64:
            raise _Refused(f"the archive has {len(infos)} entries")
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise _Refused("the archive lists an entry twice")
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or not all("/" in n for n in names):
            raise _Refused("the archive is not laid out like a torch.save file")
        root = roots.pop()
        if any(n in (f"{root}/constants.pkl", f"{root}/code/") or n.startswith(f"{root}/code/") for n in names):
            raise _Refused("it is a TorchScript archive, which holds code")
        total = 0
        records: dict[str, int] = {}
        pkl_info = None
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1 or info.compress_size != info.file_size:
                raise _Refused("it has compressed or encrypted entries, which torch.save never writes")
            total += info.file_size
            if total > MAX_FILE_BYTES:
                raise _Refused("its entries add up to more than the size limit")
            rel = info.filename[len(root) + 1:]
            if rel == "data.pkl":
                pkl_info = info
            elif rel.startswith("data/"):
                key = rel[len("data/"):]
                if not re.fullmatch(r"[A-Za-z0-9_]{1,64}", key):
                    raise _Refused(f"it has an oddly named storage record '{info.filename[:60]}'")
                records[key] = info.file_size
            elif info.file_size > MAX_MISC_RECORD_BYTES:
                raise _Refused(f"it has a large unexpected entry '{info.filename[:60]}'")
            start = _read_local_data_offset(f, info, size)
            if info.CRC != 0 or info.file_size == 0:  # torch can be told not to write checksums (CRC 0)
                if _crc32(f, start, info.file_size) != info.CRC:
                    raise _Refused(f"the checksum of '{info.filename[:60]}' does not match: the file is corrupted")
        if pkl_info is None:
            raise _Refused("it has no data.pkl: not a torch.save file")
        if pkl_info.file_size > MAX_PICKLE_BYTES:
            raise _Refused(f"its pickle is {pkl_info.file_size} bytes; the release's is about 0.2 MB")
        f.seek(_read_local_data_offset(f, pkl_info, size))
        data = f.read(pkl_info.file_size)
    return data, records


def _code_refusal(path: str, name: str) -> CheckpointError:
    return _fail(path, f"needs the Python object '{name}' to load. Pickles can run code, and a PiSA-SR checkpoint "
                       "needs nothing but tensors, so it was refused without loading it.", CONVERT_HINT)


def _load_zip_pickle(path: str, size: int) -> Any:
    try:
        data, records = _inspect_zip(path, size)
        _PickleScan(records).run(data, sum(records.values()))
    except _ForbiddenGlobal as e:
        raise _code_refusal(path, e.name) from None
    except _Refused as e:
        raise _fail(path, f"is not a valid torch checkpoint: {e}.") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError,
            KeyError, IndexError, AttributeError, struct.error, UnicodeError, OverflowError, NotImplementedError,
            RecursionError, MemoryError, OSError) as e:  # OSError here: seeks to offsets a corrupt zip names
        raise _fail(path, f"is truncated or corrupted and cannot be read ({type(e).__name__}: {_first_line(e)}).") \
            from None
    try:
        # Record sizes were matched against every storage above, so the memory map is never sliced out of range.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch's own parser: anything it rejects is a damaged file
        if "Unsupported global" in str(e) or "weights_only" in str(e):
            raise _fail(path, f"contains Python objects outside plain tensors ({_first_line(e)}).", CONVERT_HINT) \
                from None
        raise _fail(path, f"cannot be read by torch ({type(e).__name__}: {_first_line(e)}).") from None


def _refuse_other_pickle(path: str, size: int) -> NoReturn:
    """Explain a non-zip file: a pickle with code, a pre-1.6 torch file, or not a checkpoint at all. Never loads it."""
    with open(path, "rb") as f:
        data = f.read(min(size, MAX_PICKLE_BYTES))
    scan = _PickleScan({})
    try:
        first = scan.run(data, 0)
    except _ForbiddenGlobal as e:
        raise _code_refusal(path, e.name) from None
    except Exception:
        first = None
    if _is_int(first) and first == _TORCH_LEGACY_MAGIC:
        raise _fail(path, "was saved in torch's legacy (pre-1.6) format, which cannot be checked before loading and "
                          "is not how the PiSA-SR release is distributed.")
    raise _fail(path, "is neither a torch checkpoint (zip) nor a PiSA-SR .safetensors conversion; it is damaged or a "
                      "different kind of file.")


# ---------------------------------------------------------------------------------------------------- safetensors
def _read_safetensors_header(path: str, size: int) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise _fail(path, "is too short to be a safetensors file.")
        (n,) = struct.unpack("<Q", raw)
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise _fail(path, "has a corrupted safetensors header (bad length); the file is truncated or not "
                              "safetensors.")
        blob = f.read(n)
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _fail(path, "has a corrupted safetensors header (not valid JSON).") from None
    if not isinstance(header, dict):
        raise _fail(path, "has a corrupted safetensors header (not a JSON object).")
    return header, 8 + n


def _load_safetensors(path: str, size: int) -> dict:
    header, data_start = _read_safetensors_header(path, size)
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != SAFETENSORS_FORMAT:
        raise _fail(path, "is a safetensors file without PiSA-SR metadata: it is not a conversion made by "
                          "`python -m pisa_sr.convert` (an ordinary SD LoRA cannot be used here).",
                    "Use the release pisa_sr.pkl, or convert it with `python -m pisa_sr.convert pisa_sr.pkl "
                    "pisa_sr.safetensors`.")
    if meta.get("version") != SAFETENSORS_VERSION:
        raise _fail(path, f"has conversion format version {_describe(meta.get('version'))}; this pack reads version "
                          f"{SAFETENSORS_VERSION}.", FIX_RECONVERT)
    if len(header) > MAX_TENSORS:
        raise _fail(path, f"lists {len(header)} tensors; a PiSA-SR checkpoint has at most {MAX_TENSORS}.")
    data_len = size - data_start
    spans = []
    total = 0
    for key, info in header.items():
        k = _describe(key)
        if len(key) > 2 * MAX_NAME_LEN or not isinstance(info, dict) or set(info) != {"dtype", "shape",
                                                                                        "data_offsets"}:
            raise _fail(path, f"has a malformed header entry for {k}.", FIX_RECONVERT)
        dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dt, str) or dt not in _SAFETENSORS_DTYPES:
            raise _fail(path, f"tensor {k} has dtype {_describe(dt)}; only F16, BF16 and F32 are allowed.",
                        FIX_RECONVERT)
        if (not isinstance(shape, list) or len(shape) not in (2, 4)
                or not all(_is_int(s) and 0 < s <= MAX_DIM for s in shape)):
            raise _fail(path, f"tensor {k} has an invalid shape.", FIX_RECONVERT)
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs):
            raise _fail(path, f"tensor {k} has invalid data offsets.", FIX_RECONVERT)
        nbytes = math.prod(shape) * _SAFETENSORS_DTYPES[dt].itemsize
        if offs[0] < 0 or offs[1] - offs[0] != nbytes or offs[1] > data_len:
            raise _fail(path, f"tensor {k} points outside the file or has the wrong size: the file is truncated or "
                              "was tampered with.", FIX_RECONVERT)
        total += nbytes
        spans.append((offs[0], offs[1]))
    if total > MAX_TENSOR_BYTES:
        raise _fail(path, f"its tensors exceed {MAX_TENSOR_BYTES // 1024**2} MB.", FIX_RECONVERT)
    spans.sort()
    for (_, a1), (b0, _) in zip(spans, spans[1:]):
        if b0 < a1:
            raise _fail(path, "has overlapping tensors in its header: tampered file.", FIX_RECONVERT)
    try:
        from safetensors.torch import load_file
        tensors = load_file(path, device="cpu")
    except Exception as e:  # the library's own checks, after ours
        raise _fail(path, f"cannot be read as safetensors ({_first_line(e)}).", FIX_RECONVERT) from None
    try:
        sd: dict[str, Any] = {"state_dict_unet": tensors}
        for k in KINDS:
            rank = meta[f"lora_rank_unet_{k}"]
            if not isinstance(rank, str) or not re.fullmatch(r"[0-9]{1,6}", rank):
                raise ValueError(rank)
            sd[f"lora_rank_unet_{k}"] = int(rank)
            for p in PARTS:
                text = meta[f"unet_lora_{p}_modules_{k}"]
                if not isinstance(text, str):
                    raise ValueError(p)
                sd[f"unet_lora_{p}_modules_{k}"] = json.loads(text)
    except (KeyError, ValueError, TypeError, RecursionError):
        raise _fail(path, "has incomplete or malformed PiSA-SR metadata (ranks or module lists).",
                    FIX_RECONVERT) from None
    return sd


# ---------------------------------------------------------------------------------------------------- entry points
def _read(path: str) -> PisaLoras:
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"PiSA-SR checkpoint not found: '{path}'. Put pisa_sr.pkl (from the official PiSA-SR "
                              "release) in ComfyUI/models/pisa_sr/ and pick it in the node.")
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise _fail(path, f"is {size / 1024**2:.0f} MB; a PiSA-SR LoRA checkpoint is about 32 MB (the limit is "
                          f"{MAX_FILE_BYTES // 1024**2} MB). Refusing to load it.")
    if size == 0:
        raise _fail(path, "is empty (0 bytes).")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".safetensors", ".pkl", ".pt", ".pth", ".ckpt", ".bin"):
        raise _fail(path, f"has extension '{ext[:20]}'; expected .pkl, .pt, .pth or .safetensors.")
    with open(path, "rb") as f:
        head = f.read(9)
    # Dispatch on content, not on the name: a renamed file is read for what it is.
    if head[:4] == b"PK\x03\x04":
        if ext == ".safetensors":
            raise _fail(path, "is a torch pickle (zip) named .safetensors, not a conversion.",
                        "Rename it to .pkl, then convert it with `python -m pisa_sr.convert pisa_sr.pkl "
                        "pisa_sr.safetensors` (run from the pack folder).")
        sd = _load_zip_pickle(path, size)
    elif len(head) == 9 and head[8:9] == b"{":
        sd = _load_safetensors(path, size)
    else:
        _refuse_other_pickle(path, size)
    return _parse(sd, path)


def load_checkpoint(path: str, who: str = "") -> PisaLoras:
    """Load ``.pkl``/``.pt``/``.pth`` (checked, then weights-only torch zip) or ``.safetensors`` and validate it.

    ``who`` (a node's display name) prefixes every message so the user knows which node refused.
    """
    try:
        return _read(path)
    except CheckpointError as e:
        raise (CheckpointError(f"{who}: {e}") if who else e) from None
    except OSError as e:
        err = _fail(path, f"cannot be read ({e.strerror or type(e).__name__}).",
                    "Check that ComfyUI may read it (permissions, disk), or download it again.")
    except Exception as e:  # a rule we missed must still end in a clean refusal
        err = _backstop(path, e)
    raise (CheckpointError(f"{who}: {err}") if who else err) from None


def to_release_dict(loras: PisaLoras) -> dict[str, Any]:
    """The release layout of ``loras`` (what ``pisa_sr.pkl`` holds)."""
    sd: dict[str, Any] = {"state_dict_unet": {}}
    for lset in loras.sets():
        sd[f"lora_rank_unet_{lset.kind}"] = lset.rank
        for p in PARTS:
            sd[f"unet_lora_{p}_modules_{lset.kind}"] = [m for m, part in lset.parts.items() if part == p]
        for m, pair in lset.pairs.items():
            part = lset.parts[m]
            sd["state_dict_unet"][f"{m}.lora_A.default_{part}_{lset.kind}.weight"] = pair.down
            sd["state_dict_unet"][f"{m}.lora_B.default_{part}_{lset.kind}.weight"] = pair.up
    return sd


def save_safetensors(loras: PisaLoras, path: str) -> None:
    """Write the conversion: the release's tensors under the release's key names, lists and ranks as metadata."""
    from safetensors.torch import save_file

    sd = to_release_dict(loras)
    meta = {"format": SAFETENSORS_FORMAT, "version": SAFETENSORS_VERSION}
    for k in KINDS:
        meta[f"lora_rank_unet_{k}"] = str(sd[f"lora_rank_unet_{k}"])
        for p in PARTS:
            meta[f"unet_lora_{p}_modules_{k}"] = json.dumps(sd[f"unet_lora_{p}_modules_{k}"])
    # Own, contiguous copies: safetensors refuses tensors that share memory.
    tensors = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in sd["state_dict_unet"].items()}
    save_file(tensors, path, metadata=meta)
