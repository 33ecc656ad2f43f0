"""Host memory of the node-side steps that grow with the picture (issue 23), at a real size: Encode LQ's resize,
Decode's 8-bit truncation + colour fix + assembly, and the before/after preview. The VAE is stubbed (a fresh
tensor of its output's shape) so each row is the node's own cost; the VAE's is bench/bench_vae.py's.

    $PISA_HOST_PYTHON bench/bench_bounds.py                   # 1920x1080 x4 -> 7680x4320 (about a minute)
    $PISA_HOST_PYTHON bench/bench_bounds.py --size 2048x1536  # output size W x H (input = size / 4)

Each row runs in a fresh process: ``live`` is the peak of live tensor bytes (tests/helpers.LiveBytes) beyond the
node's output, ``RSS`` the growth of the peak resident set (VmHWM, reset after the inputs were made) with the output
included (what Pillow, numpy and kernels' scratch hold is seen only there). In MiB and in fp32 [H,W,3] images of
the output size.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(1, str(REPO / "tests"))

ROWS = ("encode-resize", "decode-none", "decode-adain", "decode-wavelet", "preview")


def _status(key: str) -> int:
    """A /proc/self/status memory figure (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _reset_peak() -> bool:
    """Reset the kernel's resident high-water mark (VmHWM), so the peak is the measured call's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def one_row(row: str, w: int, h: int) -> dict:
    import comfy_boot

    comfy_boot.boot(cpu=True, pytorch_attention=True)
    comfy_boot.load_pack()
    import torch

    torch.set_num_threads(2)
    from helpers import LiveBytes, tensor_bytes

    pack = comfy_boot.pack
    lq_info, plan_resize = pack("nodes.lq_info"), pack("pisa_sr.resize").plan_resize
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if row == "encode-resize":
            enc = pack("nodes.encode_lq")
            enc.vae_ops.encode = lambda vae, lq, tile, ram_gib=0.0: torch.zeros(1, 4, lq.shape[1] // 8, lq.shape[2] // 8)
            image = torch.rand(1, h // 4, w // 4, 3, generator=g)
            run = lambda: enc.encode_lq(image, None, 4, "bicubic")  # noqa: E731
        else:
            plan = plan_resize(w // 4, h // 4, 4)
            lq = torch.randint(0, 256, (1, h, w, 3), generator=g, dtype=torch.uint8)
            latent = {"samples": torch.zeros(1, 4, h // 8, w // 8), "pisa_sr": lq_info.LQInfo(lq_u8=lq, plan=plan)}
            if row == "preview":
                preview = pack("nodes.preview")
                image = torch.rand(1, h, w, 3, generator=g)
                run = lambda: preview.comparison_ui(image, latent["pisa_sr"]) and None  # noqa: E731
            else:
                dec = pack("nodes.decode")
                dec.vae_ops.decode = lambda vae, z, tile, ram_gib=0.0: torch.rand(1, 3, h, w)
                run = lambda: dec.decode_hq(latent, None, row.split("-")[1])  # noqa: E731
        exact = _reset_peak()
        base, maxrss = _status("VmRSS"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        with LiveBytes() as mem:
            out = run()
        peak = _status("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"row": row, "live": mem.peak - tensor_bytes(out), "rss": peak - (base if exact else maxrss),
            "out": tensor_bytes(out)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="7680x4320", help="output W x H (multiples of 32)")
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.lower().split("x"))
    if a.one:
        print(json.dumps(one_row(a.one, w, h)))
        return 0
    image, mib = w * h * 3 * 4, 1 / 2 ** 20
    print(f"{w}x{h} output: one fp32 image = {image * mib:.0f} MiB; VAE stubbed; load: see RESULTS.md")
    print("| step | output MiB | live MiB | live images | RSS MiB | RSS images |\n|---|---|---|---|---|---|")
    for row in a.rows:
        proc = subprocess.run([sys.executable, __file__, "--size", a.size, "--one", row], capture_output=True,
                              text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {row} | {r['out'] * mib:.0f} | {r['live'] * mib:.0f} | {r['live'] / image:.2f} | "
              f"{r['rss'] * mib:.0f} | {r['rss'] / image:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
