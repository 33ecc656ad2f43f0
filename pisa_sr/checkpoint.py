"""Read and validate PiSA-SR LoRA checkpoints: the release's ``pisa_sr.pkl`` and our ``.safetensors`` conversion.

The file is read once and the bytes that are checked are the bytes that are loaded: a torch zip's pickle is scanned
(:mod:`.pickle_scan`, nothing runs) before ``torch.load(weights_only=True)``; a safetensors header is bounded first.
"""
from __future__ import annotations

import functools
import io
import json
import os
import re
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from .errors import CheckpointError
from .pickle_scan import Forbidden, Refused, is_dense, scan

PARTS = ("encoder", "decoder", "others")
KINDS = ("pix", "sem")
PEFT_DEFAULT_ALPHA = 8.0  # the release stores no alpha: peft's LoraConfig default applies
SAFETENSORS_FORMAT, SAFETENSORS_VERSION = "pisa_sr_lora", "1"
# The release is rank 4 over 258 modules per kind (32 MB fp32, a ~0.2 MB pickle of ~34k opcodes); every bound leaves
# wide headroom for a higher-rank retrain of SD2 and keeps what a hostile file can cost finite.
MAX_RANK = 256
MAX_FILE_BYTES = 2 * 1024**3  # a rank-256 pix+sem pair for SD2 is 2.08 GB in fp32
MAX_MODULES = 4096  # per kind, all parts together
MAX_TENSORS = 2 * len(KINDS) * MAX_MODULES
MAX_DIM, MAX_KERNEL, MAX_NAME_LEN = 20480, 7, 256  # SD2's widest target has 10240 outputs; its kernels are <= 3
MAX_PICKLE_BYTES = MAX_HEADER_BYTES = 8 * 1024**2  # a torch zip's data.pkl; a safetensors JSON header
ALLOWED_DTYPES = {torch.float16, torch.bfloat16, torch.float32}
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
    "pisa_sr.safetensors` (run from the pack folder) and use the .safetensors file, which cannot carry code.")
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

    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this update fits."""
        return (self.up.shape[0], *self.down.shape[1:])


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

    def sets(self) -> tuple[LoraSet, LoraSet]:
        return self.pix, self.sem


def _fail(path: str, msg: str, fix: str = FIX_DOWNLOAD) -> CheckpointError:
    where = f" '{os.path.basename(path)}'" if path else ""
    return CheckpointError(f"PiSA-SR checkpoint{where}: {msg} {fix}".rstrip())


def _describe(v: Any) -> str:
    """A short, bounded description of an untrusted value (never ``repr`` of a container: it can be exponential)."""
    if v is None or isinstance(v, (bool, float)) or (isinstance(v, int) and -10**12 < v < 10**12):
        return repr(v)
    if isinstance(v, str):
        return repr(v[:60]) + ("..." if len(v) > 60 else "")
    if isinstance(v, torch.Tensor):
        return f"a {str(v.dtype).replace('torch.', '')} tensor of shape {tuple(v.shape)}"
    return "a very large integer" if isinstance(v, int) else f"a {type(v).__name__}"


def _first_line(e: BaseException) -> str:
    """A library's message, shortened; torch's advice to turn off ``weights_only`` is never passed on."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return type(e).__name__ if "weights_only" in text.lower() else text


# ---------------------------------------------------------------------------------------------------- layout
def _rank(path: str, name: str, v: Any) -> int:
    if isinstance(v, torch.Tensor) and v.dtype in _INT_DTYPES and v.numel() == 1 and v.layout == torch.strided:
        v = int(v.reshape(()).item())
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_RANK:
        raise _fail(path, f"'{name}' must be an integer rank between 1 and {MAX_RANK}, got {_describe(v)}; the file "
                          "was edited or is not a PiSA-SR checkpoint.")
    return v


def _module_list(path: str, name: str, v: Any) -> list[str]:
    if not isinstance(v, (list, tuple)) or len(v) > MAX_MODULES:
        raise _fail(path, f"'{name}' must be a list of at most {MAX_MODULES} module names, got {_describe(v)}.")
    for m in v:
        if not isinstance(m, str) or len(m) > MAX_NAME_LEN or not _MODULE_RE.fullmatch(m) or ".lora_" in m:
            raise _fail(path, f"'{name}' contains an invalid module name {_describe(m)} (expected a diffusers UNet "
                              "module path such as 'down_blocks.0.resnets.0.conv1').")
    if len(set(v)) != len(v):
        raise _fail(path, f"'{name}' lists a module more than once.")
    return list(v)


def _tensor(path: str, key: str, t: Any) -> torch.Tensor:
    k = key[:120]
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise _fail(path, f"'{k}' is {_describe(t)}, expected a tensor.")
    if t.layout != torch.strided or t.device.type != "cpu" or t.is_quantized or t.is_nested:
        raise _fail(path, f"'{k}' is a {t.layout} tensor on {t.device}; expected a dense CPU tensor.")
    if t.dtype not in ALLOWED_DTYPES:
        raise _fail(path, f"'{k}' has dtype {t.dtype}; LoRA weights must be float16, bfloat16 or float32.")
    if t.is_neg() or t.is_conj() or not is_dense(tuple(t.shape), tuple(t.stride())):
        raise _fail(path, f"'{k}' is an expanded, overlapping or lazily transformed view; expected a plain weight.")
    if t.dim() not in (2, 4) or any(s <= 0 or s > MAX_DIM for s in t.shape) or max(t.shape[2:], default=0) > MAX_KERNEL:
        raise _fail(path, f"'{k}' has shape {tuple(t.shape)}; expected a 2-D (Linear) or 4-D (Conv, kernel <= "
                          f"{MAX_KERNEL}) LoRA matrix with sides <= {MAX_DIM}.")
    return t


def _guarded(fn):
    """A rule we missed must still end in a clean refusal, never a traceback."""
    @functools.wraps(fn)
    def guarded(x: Any, path: str = "") -> PisaLoras:
        try:
            return fn(x, path)
        except CheckpointError:
            raise
        except Exception as e:
            raise _fail(path, f"{_UNEXPECTED} it ({type(e).__name__}: {_first_line(e)}); the file is damaged or not "
                              "a PiSA-SR checkpoint.") from None
    return guarded


@_guarded
def parse_release_dict(sd: Any, path: str = "") -> PisaLoras:
    """Validate a dict in the release's ``pisa_sr.pkl`` layout and build both LoRA sets (tensors are copied)."""
    if not isinstance(sd, dict) or len(sd) > 4 * len(_TOP_KEYS) or not all(isinstance(k, str) for k in sd):
        raise _fail(path, f"expected a dict of LoRA weights with string keys, found {_describe(sd)}. Is this a "
                          "PiSA-SR checkpoint?")
    missing = sorted(_TOP_KEYS - set(sd))
    if missing:
        looks_like = "a full model or another LoRA format" if len(missing) == len(_TOP_KEYS) else "an incomplete file"
        raise _fail(path, f"missing {', '.join(missing)}: this is {looks_like}, not the PiSA-SR release checkpoint "
                          "(pisa_sr.pkl) or its conversion.")
    extra = sorted(set(sd) - _TOP_KEYS)
    if extra:
        raise _fail(path, f"unexpected entries {', '.join(map(_describe, extra[:5]))}; refusing a file that carries "
                          "more than the release layout.")
    state = sd["state_dict_unet"]
    if not isinstance(state, dict) or len(state) > MAX_TENSORS or not all(
            isinstance(k, str) and len(k) <= 2 * MAX_NAME_LEN for k in state):
        raise _fail(path, f"'state_dict_unet' must be a dict of at most {MAX_TENSORS} named tensors, got "
                          f"{_describe(state)}.")
    sets, used, total = {}, set(), 0
    for kind in KINDS:
        rank = _rank(path, f"lora_rank_unet_{kind}", sd[f"lora_rank_unet_{kind}"])
        lset = sets[kind] = LoraSet(kind=kind, rank=rank)
        for part in PARTS:
            name = f"unet_lora_{part}_modules_{kind}"
            for module in _module_list(path, name, sd[name]):
                if module in lset.parts:
                    raise _fail(path, f"module '{module}' is listed in both the {lset.parts[module]} and {part} "
                                      f"lists of the {kind} LoRA.")
                ka, kb = (f"{module}.lora_{ab}.default_{part}_{kind}.weight" for ab in "AB")
                if ka not in state or kb not in state:
                    raise _fail(path, f"module '{module}' ({kind}, {part}) has no tensor "
                                      f"'{ka if ka not in state else kb}'; the file is truncated or was edited.")
                a, b = _tensor(path, ka, state[ka]), _tensor(path, kb, state[kb])
                if a.dim() != b.dim() or a.dtype != b.dtype or a.shape[0] != rank or b.shape[1] != rank or (
                        b.dim() == 4 and tuple(b.shape[2:]) != (1, 1)):
                    raise _fail(path, f"'{module}': shapes {tuple(a.shape)} / {tuple(b.shape)} ({a.dtype}, {b.dtype}) "
                                      f"do not match the declared {kind} rank {rank} of a LoRA pair.")
                for ab, t in (("A", a), ("B", b)):
                    if not bool(torch.isfinite(t).all()):
                        raise _fail(path, f"'{module}' {kind} lora_{ab} contains NaN or infinity; the file is corrupted.")
                total += a.nbytes + b.nbytes
                if total > MAX_FILE_BYTES:
                    raise _fail(path, f"its LoRA tensors exceed {MAX_FILE_BYTES // 1024**2} MB.")
                used.update((ka, kb))
                # Own copies: the caller's dict may change, and a file's storages must not stay referenced.
                a, b = (t.detach().clone(memory_format=torch.contiguous_format) for t in (a, b))
                lset.pairs[module] = LoraPair(a, b, PEFT_DEFAULT_ALPHA / rank)
                lset.parts[module] = part
        if not lset.pairs:
            raise _fail(path, f"the {kind} LoRA lists no modules.")
    if len(state) != len(used):
        unknown = next(k for k in state if k not in used)
        raise _fail(path, f"'state_dict_unet' has {len(state) - len(used)} tensors that belong to no listed module "
                          f"(e.g. {_describe(unknown)}); the file was edited or is not a PiSA-SR checkpoint.")
    return PisaLoras(pix=sets["pix"], sem=sets["sem"])


# ---------------------------------------------------------------------------------------------------- formats
def _load_torch_zip(data: bytes, path: str) -> Any:
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        names = reader.get_all_records()
        if len(names) > MAX_TENSORS + 64:
            raise Refused(f"the archive has {len(names)} entries")
        if "constants.pkl" in names or any(n.startswith("code/") for n in names):
            raise Refused("it is a TorchScript archive, which holds code")
        if "data.pkl" not in names:
            raise Refused("it has no data.pkl: not a torch.save file")
        sizes = _record_sizes(reader, names, data)
        if sum(sizes.values()) > len(data):
            raise Refused("its entries unpack to more bytes than the file holds (a zip bomb)")
        if sizes["data.pkl"] > MAX_PICKLE_BYTES:
            raise Refused(f"its pickle is {sizes['data.pkl']} bytes; the release's is about 0.2 MB")
        top = scan(reader.get_record("data.pkl"), {n[5:]: s for n, s in sizes.items() if n.startswith("data/")})
        if getattr(top, "kind", "") != "dict":
            raise Refused("its pickle does not hold a dict")
    except Forbidden as e:
        raise _code_refusal(path, str(e)) from None
    except Refused as e:
        raise _fail(path, f"is not a valid torch checkpoint: {e}.") from None
    except (RuntimeError, ValueError, KeyError, IndexError, EOFError) as e:  # the reader's or genops' complaints
        raise _fail(path, f"is truncated or corrupted and cannot be read ({_first_line(e)}).") from None
    try:  # the same bytes, through the same reader: the pickle torch unpickles is the one scanned above
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise _fail(path, f"cannot be read by torch ({_first_line(e)}).") from None


def _record_sizes(reader, names: list[str], data: bytes) -> dict[str, int]:
    """Each record's unpacked size, read without unpacking it. torch 2.11 (the GPU machine's) has no
    PyTorchFileReader.get_record_size: there the zip's central directory gives the same numbers (found by the
    offline GPU rehearsal, tests/host/test_gpu_check.py)."""
    if hasattr(reader, "get_record_size"):
        return {n: reader.get_record_size(n) for n in names}
    try:
        infos = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(str(e)) from None
    sizes = {i.filename.split("/", 1)[-1]: i.file_size for i in infos}
    missing = [n for n in names if n not in sizes]
    if missing:
        raise ValueError(f"record {missing[0]} is not in the zip directory")
    return {n: sizes[n] for n in names}


def _code_refusal(path: str, name: str) -> CheckpointError:
    return _fail(path, f"needs the Python object '{name}' to load. Pickles can run code, and a PiSA-SR checkpoint "
                       "needs nothing but tensors, so it was refused without loading it.", CONVERT_HINT)


def _refuse_other(data: bytes, path: str) -> CheckpointError:
    """Explain a file that is neither a torch zip nor safetensors: a pickle with code, a legacy torch file, junk."""
    try:
        first = scan(data[:MAX_PICKLE_BYTES], {})
    except Forbidden as e:
        return _code_refusal(path, str(e))
    except Exception:
        first = None
    if type(first) is int and first == _TORCH_LEGACY_MAGIC:
        return _fail(path, "was saved in torch's legacy (pre-1.6) format, which cannot be checked before loading and "
                           "is not how the PiSA-SR release is distributed.")
    return _fail(path, "is neither a torch checkpoint (zip) nor a PiSA-SR .safetensors conversion; it is damaged or a "
                       "different kind of file.")


def _load_safetensors(data: bytes, path: str) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    if n < 2 or n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise _fail(path, "has a corrupted safetensors header (bad length); the file is truncated or not safetensors.")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
        meta = header.pop("__metadata__", None)
    except (UnicodeDecodeError, ValueError, RecursionError, AttributeError, TypeError):
        raise _fail(path, "has a corrupted safetensors header (not a JSON object).") from None
    if not isinstance(meta, dict) or meta.get("format") != SAFETENSORS_FORMAT:
        raise _fail(path, "is a safetensors file without PiSA-SR metadata: it is not a conversion made by "
                          "`python -m pisa_sr.convert` (an ordinary SD LoRA cannot be used here).",
                    "Use the release pisa_sr.pkl, or convert it with `python -m pisa_sr.convert pisa_sr.pkl "
                    "pisa_sr.safetensors`.")
    if meta.get("version") != SAFETENSORS_VERSION:
        raise _fail(path, f"has conversion format version {_describe(meta.get('version'))}; this pack reads version "
                          f"{SAFETENSORS_VERSION}.", FIX_RECONVERT)
    if len(header) > MAX_TENSORS:
        raise _fail(path, f"lists {len(header)} tensors; a PiSA-SR checkpoint has at most {MAX_TENSORS}.",
                    FIX_RECONVERT)
    try:
        sd: dict[str, Any] = {"state_dict_unet": load_safetensors(data)}
        for k in KINDS:
            rank = meta[f"lora_rank_unet_{k}"]
            sd[f"lora_rank_unet_{k}"] = int(rank) if re.fullmatch(r"[0-9]{1,6}", rank) else rank
            for p in PARTS:
                sd[f"unet_lora_{p}_modules_{k}"] = json.loads(meta[f"unet_lora_{p}_modules_{k}"])
    except Exception as e:  # the library's own checks (offsets, sizes, overlaps), and malformed metadata
        raise _fail(path, f"has malformed tensors or PiSA-SR metadata ({_first_line(e)}).", FIX_RECONVERT) from None
    return sd


# ---------------------------------------------------------------------------------------------------- entry points
def read_file(path: str) -> bytes:
    """The file's bytes, read once; refuses a missing, empty, oversized or oddly named file before reading it."""
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"PiSA-SR checkpoint not found: '{path}'. Put pisa_sr.pkl (from the official PiSA-SR "
                              "release) in ComfyUI/models/pisa_sr/ and pick it in the node.")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".safetensors", ".pkl", ".pt", ".pth", ".ckpt", ".bin"):
        raise _fail(path, f"has extension '{ext[:20]}'; expected .pkl, .pt, .pth or .safetensors.")
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_FILE_BYTES:
                raise _fail(path, f"is larger than {MAX_FILE_BYTES // 1024**2} MB; a PiSA-SR LoRA checkpoint is about "
                                  "32 MB. Refusing to load it.")
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise _fail(path, f"cannot be read ({e.strerror or type(e).__name__}).",
                    "Check that ComfyUI may read it (permissions, disk), or download it again.") from None
    if not data:
        raise _fail(path, "is empty (0 bytes).")
    if len(data) > MAX_FILE_BYTES:
        raise _fail(path, "grew while being read. Refusing to load it.")
    return data


@_guarded
def load_bytes(data: bytes, path: str) -> PisaLoras:
    """Validate and load a checkpoint's bytes (``path`` names the file in messages and tells its extension)."""
    if data[:4] == b"PK\x03\x04":
        if path.lower().endswith(".safetensors"):
            raise _fail(path, "is a torch pickle (zip) named .safetensors, not a conversion.",
                        "Rename it to .pkl, then convert it with `python -m pisa_sr.convert pisa_sr.pkl "
                        "pisa_sr.safetensors` (run from the pack folder).")
        return parse_release_dict(_load_torch_zip(data, path), path)
    if len(data) > 8 and data[8:9] == b"{":  # dispatch on content: a renamed file is read for what it is
        return parse_release_dict(_load_safetensors(data, path), path)
    raise _refuse_other(data, path)


def load_checkpoint(path: str) -> PisaLoras:
    """Read ``.pkl``/``.pt``/``.pth`` (scanned, then weights-only torch zip) or ``.safetensors`` and validate it."""
    return load_bytes(read_file(path), path)
