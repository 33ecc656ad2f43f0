"""Convert the release ``pisa_sr.pkl`` to a ``.safetensors`` file once, so ComfyUI never has to open a pickle.

Run from the pack folder: ``python -m pisa_sr.convert pisa_sr.pkl pisa_sr.safetensors`` (or ``--check FILE``). The
input goes through the node's checked loader; the output is re-read, compared bit for bit, then written under a
temporary name and moved into place (never half-written). Same input, same bytes.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import struct
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import torch

from .checkpoint import (KINDS, PARTS, SAFETENSORS_FORMAT, SAFETENSORS_VERSION, CheckpointError, PisaLoras, load_bytes,
                         load_checkpoint)

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_WRITE = 0, 1, 2, 3
_ST_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def to_release_dict(loras: PisaLoras) -> dict[str, Any]:
    """The release layout of ``loras`` (what ``pisa_sr.pkl`` holds)."""
    sd: dict[str, Any] = {"state_dict_unet": {}}
    for s in loras.sets():
        sd[f"lora_rank_unet_{s.kind}"] = s.rank
        for p in PARTS:
            sd[f"unet_lora_{p}_modules_{s.kind}"] = [m for m, part in s.parts.items() if part == p]
        for m, pair in s.pairs.items():
            for ab, t in (("A", pair.down), ("B", pair.up)):
                sd["state_dict_unet"][f"{m}.lora_{ab}.default_{s.parts[m]}_{s.kind}.weight"] = t
    return sd


def safetensors_bytes(loras: PisaLoras) -> bytes:
    """The conversion as bytes, the lists and ranks as metadata; written here, keys sorted, because the library orders
    metadata by a randomly seeded hash map (same input, same bytes)."""
    sd = to_release_dict(loras)
    meta = {"format": SAFETENSORS_FORMAT, "version": SAFETENSORS_VERSION}
    for k in KINDS:
        meta[f"lora_rank_unet_{k}"] = str(sd[f"lora_rank_unet_{k}"])
        for p in PARTS:
            meta[f"unet_lora_{p}_modules_{k}"] = json.dumps(sd[f"unet_lora_{p}_modules_{k}"])
    header: dict[str, Any] = {"__metadata__": meta}
    blobs, at = [], 0
    for key in sorted(sd["state_dict_unet"]):
        t = sd["state_dict_unet"][key].detach().contiguous()
        blobs.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        header[key] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + len(blobs[-1])]}
        at += len(blobs[-1])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


class VerifyError(Exception):
    """The re-read conversion differs from the input."""


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, so -0.0 vs 0.0 (and any NaN payload) count as differences."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def verify_identical(a: PisaLoras, b: PisaLoras) -> None:
    """Raise VerifyError unless ``b`` has the same ranks, module lists (order included), dtypes and bits as ``a``."""
    for sa, sb in zip(a.sets(), b.sets()):
        if sa.kind != sb.kind or sa.rank != sb.rank:
            raise VerifyError(f"{sa.kind}: rank {sa.rank} became {sb.rank}")
        if list(sa.parts.items()) != list(sb.parts.items()):
            raise VerifyError(f"{sa.kind}: module lists differ")
        for m, pa in sa.pairs.items():
            pb = sb.pairs[m]
            if pa.scale != pb.scale:
                raise VerifyError(f"{sa.kind} {m}: scale {pa.scale} became {pb.scale}")
            for name, x, y in (("lora_A", pa.down, pb.down), ("lora_B", pa.up, pb.up)):
                if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(_bits(x), _bits(y)):
                    raise VerifyError(f"{sa.kind} {m} {name} differs after conversion")
    if a.alpha != b.alpha:
        raise VerifyError(f"alpha {a.alpha} became {b.alpha}")


def summary(loras: PisaLoras) -> str:
    """Modules per part, rank, dtypes and bytes of each LoRA set."""
    lines, total = [], 0
    for s in loras.sets():
        tensors = [t for pr in s.pairs.values() for t in (pr.down, pr.up)]
        per_part = ", ".join(f"{p} {list(s.parts.values()).count(p)}" for p in PARTS)
        dtypes = ", ".join(sorted({str(t.dtype).replace("torch.", "") for t in tensors}))
        convs, nbytes = sum(pr.is_conv for pr in s.pairs.values()), sum(t.nbytes for t in tensors)
        total += nbytes
        lines.append(f"  {s.kind}: rank {s.rank}, {len(s)} modules ({per_part}; {convs} conv, {len(s) - convs} "
                     f"linear), {len(tensors)} tensors, {dtypes}, {nbytes:,} bytes")
    lines.append(f"  alpha {loras.alpha:g} (scale alpha/rank), {total:,} tensor bytes in all")
    return "\n".join(lines)


def _load(path: str, out: TextIO) -> PisaLoras | None:
    try:
        return load_checkpoint(path)
    except CheckpointError as e:
        print(f"refused: {e}", file=out)
        return None


def convert(src: str, dst: str, force: bool = False, out: TextIO = sys.stdout) -> int:
    """Convert ``src`` to ``dst`` and verify it; returns an exit code and prints what happened."""
    if not dst.lower().endswith(".safetensors"):
        print(f"error: the output must end in .safetensors, got '{dst}'.", file=out)
        return EXIT_USAGE
    if os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):
        print("error: the output would overwrite the input.", file=out)
        return EXIT_USAGE
    if os.path.exists(dst) and not force:
        print(f"error: '{dst}' exists; pass --force to replace it.", file=out)
        return EXIT_USAGE
    if (loras := _load(src, out)) is None:
        return EXIT_REFUSED
    data = safetensors_bytes(loras)
    try:
        again = load_bytes(data, dst)
        verify_identical(loras, again)
    except (CheckpointError, VerifyError) as e:
        print(f"error: the conversion did not verify, nothing was written: {e}", file=out)
        return EXIT_WRITE
    tmp = os.path.join(os.path.dirname(os.path.abspath(dst)), f".{os.path.basename(dst)}.{os.getpid()}.partial")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        with open(tmp, "rb") as f:
            if f.read() != data:
                raise OSError(errno.EIO, "the file read back differs from what was written")
        os.replace(tmp, dst)
    except OSError as e:
        print(f"error: cannot write '{dst}': {e.strerror or e}. Check that its folder exists, is writable and has "
              f"{-(-len(data) // 1024**2)} MB free.", file=out)
        return EXIT_WRITE
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"converted '{src}' -> '{dst}' ({len(data):,} bytes); re-read and verified bit-identical.", file=out)
    print(summary(again), file=out)
    return EXIT_OK


def check(path: str, out: TextIO = sys.stdout) -> int:
    if (loras := _load(path, out)) is None:
        return EXIT_REFUSED
    print(f"ok: '{path}' is a valid PiSA-SR checkpoint ({os.path.getsize(path):,} bytes).", file=out)
    print(summary(loras), file=out)
    return EXIT_OK


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pisa_sr.convert",
        description="Convert the PiSA-SR release checkpoint (pisa_sr.pkl) to .safetensors, or check a checkpoint. "
                    "No code from the input file is run.",
        epilog="exit codes: 0 ok, 1 input refused, 2 bad command line, 3 output not written or not verified")
    parser.add_argument("input", nargs="?", help="pisa_sr.pkl (or .pt/.pth/.safetensors)")
    parser.add_argument("output", nargs="?", help="where to write the .safetensors conversion")
    parser.add_argument("--check", metavar="FILE", help="only validate FILE and print its summary")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage
        return int(e.code or 0) and EXIT_USAGE
    if (args.input is not None) if args.check is not None else (args.output is None):
        parser.print_usage(out)
        print("error: give an input and an output file, or --check FILE alone.", file=out)
        return EXIT_USAGE
    return check(args.check, out) if args.check is not None else convert(args.input, args.output, args.force, out)


if __name__ == "__main__":
    sys.exit(main())
