"""Read and validate PiSA-SR LoRA checkpoints (the release's ``pisa_sr.pkl`` and our ``.safetensors`` conversion).

Nothing here executes code from a file: pickles go through ``torch.load(weights_only=True)``, safetensors headers are
parsed and bounded before any tensor is allocated, and the result is checked against the exact release layout.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .errors import CheckpointError

__all__ = [
    "PARTS", "KINDS", "PEFT_DEFAULT_ALPHA", "LoraPair", "LoraSet", "PisaLoras",
    "load_checkpoint", "parse_release_dict", "save_safetensors", "to_release_dict", "CONVERT_HINT",
]

PARTS = ("encoder", "decoder", "others")
KINDS = ("pix", "sem")
PEFT_DEFAULT_ALPHA = 8.0  # the release stores no alpha: peft's LoraConfig default applies
SAFETENSORS_FORMAT = "pisa_sr_lora"
SAFETENSORS_VERSION = "1"

MAX_RANK = 256
MAX_FILE_BYTES = 2 * 1024**3  # a rank-256 set for SD2 is ~1.8 GB in fp32; the release file is ~32 MB
MAX_MODULES = 4096  # SD2's UNet has ~700 targetable modules
MAX_DIM = 1 << 16
MAX_HEADER_BYTES = 64 * 1024**2
ALLOWED_DTYPES = {torch.float16, torch.bfloat16, torch.float32}
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+){0,15}$")
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.default_(?P<part>encoder|decoder|others)_(?P<kind>pix|sem)\.weight$")
_TOP_KEYS = {f"unet_lora_{p}_modules_{k}" for p in PARTS for k in KINDS} | {
    "lora_rank_unet_pix", "lora_rank_unet_sem", "state_dict_unet"}
CONVERT_HINT = (
    "If this is a genuine pisa_sr.pkl from an untrusted source, do not load it with pickle; convert a trusted copy "
    "once with `python -m pisa_sr.convert pisa_sr.pkl pisa_sr.safetensors` (run from the pack folder) and use the "
    ".safetensors file."
)


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


def _fail(path: str, msg: str) -> CheckpointError:
    where = f" '{os.path.basename(path)}'" if path else ""
    return CheckpointError(f"PiSA-SR checkpoint{where}: {msg}")


def _check_rank(path: str, name: str, value: Any) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int) or not (1 <= value <= MAX_RANK):
        raise _fail(path, f"'{name}' must be an integer rank between 1 and {MAX_RANK}, got {value!r}.")
    return value


def _check_module_list(path: str, name: str, value: Any) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise _fail(path, f"'{name}' must be a list of module names, got {type(value).__name__}.")
    if len(value) > MAX_MODULES:
        raise _fail(path, f"'{name}' lists {len(value)} modules; an SD2 UNet has far fewer. Not a PiSA-SR file.")
    out = []
    for m in value:
        if not isinstance(m, str) or not _MODULE_RE.match(m):
            raise _fail(path, f"'{name}' contains an invalid module name {str(m)[:80]!r}.")
        out.append(m)
    if len(set(out)) != len(out):
        raise _fail(path, f"'{name}' lists a module more than once.")
    return out


def _check_tensor(path: str, key: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise _fail(path, f"'{key}' is a {type(t).__name__}, expected a tensor.")
    if t.dtype not in ALLOWED_DTYPES:
        raise _fail(path, f"'{key}' has dtype {t.dtype}; LoRA weights must be float16, bfloat16 or float32.")
    if t.dim() not in (2, 4) or any(s <= 0 or s > MAX_DIM for s in t.shape):
        raise _fail(path, f"'{key}' has shape {tuple(t.shape)}; expected a 2-D (Linear) or 4-D (Conv) LoRA matrix.")
    return t


def parse_release_dict(sd: Any, path: str = "") -> PisaLoras:
    """Validate a dict in the release's ``pisa_sr.pkl`` layout and build both LoRA sets.

    Every rule here is a reason the release would misbehave or a sign of a foreign or tampered file.
    """
    if not isinstance(sd, Mapping):
        raise _fail(path, f"expected a dict of LoRA weights, found {type(sd).__name__}. Is this a PiSA-SR checkpoint?")
    keys = set(sd.keys())
    if not all(isinstance(k, str) for k in keys):
        raise _fail(path, "has non-string top-level keys. Not a PiSA-SR checkpoint.")
    missing = sorted(_TOP_KEYS - keys)
    if missing:
        looks_like = "a full model or another LoRA format" if missing == sorted(_TOP_KEYS) else "an incomplete file"
        raise _fail(path, f"missing {', '.join(missing)}: this is {looks_like}, not the PiSA-SR release "
                          "checkpoint (pisa_sr.pkl) or its conversion.")
    extra = sorted(keys - _TOP_KEYS)
    if extra:
        raise _fail(path, f"unexpected entries {', '.join(map(repr, extra[:5]))}; refusing a file that carries more "
                          "than the release layout.")
    ranks = {k: _check_rank(path, f"lora_rank_unet_{k}", sd[f"lora_rank_unet_{k}"]) for k in KINDS}
    state = sd["state_dict_unet"]
    if not isinstance(state, Mapping):
        raise _fail(path, "'state_dict_unet' must be a dict of tensors.")

    sets: dict[str, LoraSet] = {}
    expected_keys: set[str] = set()
    for kind in KINDS:
        lset = LoraSet(kind=kind, rank=ranks[kind])
        scale = PEFT_DEFAULT_ALPHA / ranks[kind]
        for part in PARTS:
            lname = f"unet_lora_{part}_modules_{kind}"
            for module in _check_module_list(path, lname, sd[lname]):
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
                if a.shape[0] != r or b.shape[1] != r:
                    raise _fail(path, f"'{module}': shapes {tuple(a.shape)} / {tuple(b.shape)} do not match the "
                                      f"declared {kind} rank {r}.")
                if b.dim() == 4 and tuple(b.shape[2:]) != (1, 1):
                    raise _fail(path, f"'{module}': lora_B must be a 1x1 convolution, got {tuple(b.shape)}.")
                lset.pairs[module] = LoraPair(down=a, up=b, scale=scale)
                lset.parts[module] = part
        if not lset.pairs:
            raise _fail(path, f"the {kind} LoRA lists no modules.")
        sets[kind] = lset
    unknown = [k for k in state.keys() if k not in expected_keys]
    if unknown:
        raise _fail(path, f"'state_dict_unet' has {len(unknown)} tensors that belong to no listed module "
                          f"(e.g. {str(unknown[0])[:100]!r}); the file was edited or is not a PiSA-SR checkpoint.")
    for kind, lset in sets.items():
        for module, pair in lset.pairs.items():
            for name, t in (("lora_A", pair.down), ("lora_B", pair.up)):
                if not torch.isfinite(t).all():
                    raise _fail(path, f"'{module}' {kind} {name} contains NaN or infinity; the file is corrupted.")
    return PisaLoras(pix=sets["pix"], sem=sets["sem"], source=path)


def _load_pickle(path: str) -> Any:
    # Zip-format torch files are memory-mapped, so tensors are only read once the layout has been validated.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "Unsupported operand" in str(e):
            raise _fail(path, "contains Python objects that would run code when loaded; refused (only tensors, "
                              f"ints and lists of names are allowed). {CONVERT_HINT} Detail: {first[:200]}") from None
        raise _fail(path, f"is not a readable torch checkpoint ({first[:200]}).") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, struct.error, KeyError,
            IndexError, TypeError, AttributeError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _fail(path, f"is truncated or corrupted and cannot be read ({first[:200]}). Download it again.") from None


def _read_safetensors_header(path: str, size: int) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise _fail(path, "is too short to be a safetensors file.")
        (n,) = struct.unpack("<Q", raw)
        if n <= 1 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise _fail(path, "has a corrupted safetensors header (bad length); the file is truncated or not "
                              "safetensors.")
        blob = f.read(n)
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _fail(path, "has a corrupted safetensors header (not valid JSON).") from None
    if not isinstance(header, dict):
        raise _fail(path, "has a corrupted safetensors header.")
    return header, 8 + n


def _load_safetensors(path: str, size: int) -> dict:
    header, data_start = _read_safetensors_header(path, size)
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != SAFETENSORS_FORMAT:
        raise _fail(path, "is a safetensors file without PiSA-SR metadata: it is not a conversion made by "
                          "`python -m pisa_sr.convert`. Use the release pisa_sr.pkl or convert it.")
    if meta.get("version") != SAFETENSORS_VERSION:
        raise _fail(path, f"has conversion format version {meta.get('version')!r}; this pack reads version "
                          f"{SAFETENSORS_VERSION}. Re-run the conversion with this version of the pack.")
    data_len = size - data_start
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _fail(path, f"has a malformed header entry for {str(key)[:80]!r}.")
        dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dt not in _SAFETENSORS_DTYPES:
            raise _fail(path, f"tensor {str(key)[:80]!r} has dtype {dt!r}; only F16, BF16 and F32 are allowed.")
        if (not isinstance(shape, list) or len(shape) not in (2, 4)
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_DIM for s in shape)):
            raise _fail(path, f"tensor {str(key)[:80]!r} has an invalid shape {str(shape)[:60]}.")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise _fail(path, f"tensor {str(key)[:80]!r} has invalid data offsets.")
        nbytes = math.prod(shape) * _SAFETENSORS_DTYPES[dt].itemsize
        if offs[0] < 0 or offs[1] - offs[0] != nbytes or offs[1] > data_len:
            raise _fail(path, f"tensor {str(key)[:80]!r} points outside the file or has the wrong size: the file "
                              "is truncated or was tampered with.")
        spans.append((offs[0], offs[1]))
    spans.sort()
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        if b0 < a1:
            raise _fail(path, "has overlapping tensors in its header: tampered file.")
    try:
        from safetensors.torch import load_file
        tensors = load_file(path, device="cpu")
    except Exception as e:  # the library's own parse errors, after our bounds checks
        raise _fail(path, f"cannot be read as safetensors ({str(e)[:200]}).") from None
    try:
        sd: dict[str, Any] = {"state_dict_unet": tensors}
        for k in KINDS:
            sd[f"lora_rank_unet_{k}"] = int(meta[f"lora_rank_unet_{k}"])
            for p in PARTS:
                sd[f"unet_lora_{p}_modules_{k}"] = json.loads(meta[f"unet_lora_{p}_modules_{k}"])
    except (KeyError, ValueError, TypeError, RecursionError):
        raise _fail(path, "has incomplete PiSA-SR metadata (ranks or module lists missing).") from None
    return sd


def load_checkpoint(path: str) -> PisaLoras:
    """Load ``.pkl``/``.pt``/``.pth`` (weights-only pickle) or ``.safetensors`` and validate it."""
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"PiSA-SR checkpoint not found: '{path}'. Put pisa_sr.pkl (from the official PiSA-SR "
                              "release) in ComfyUI/models/pisa_sr/ and pick it in the node.")
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise _fail(path, f"is {size / 1024**2:.0f} MB; a PiSA-SR LoRA checkpoint is about 32 MB. Refusing to load it.")
    if size == 0:
        raise _fail(path, "is empty (0 bytes). Download it again.")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        sd = _load_safetensors(path, size)
    elif ext in (".pkl", ".pt", ".pth", ".ckpt", ".bin"):
        sd = _load_pickle(path)
    else:
        raise _fail(path, f"has extension '{ext}'; expected .pkl, .pt, .pth or .safetensors.")
    return parse_release_dict(sd, path)


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
    tensors = {k: v.contiguous() for k, v in sd["state_dict_unet"].items()}
    save_file(tensors, path, metadata=meta)
