"""VAE benchmark (issue: seam-free tiled VAE): our synchronised tiled decode/encode vs an untiled pass and ComfyUI's
built-in tiled VAE, in one run on the same random SD-VAE weights.

Reports per size: time (median of --runs after a warm-up), peak device memory (torch.cuda.max_memory_allocated on
GPU; on CPU the peak of live tensor bytes via a dispatch-mode counter is not used, RSS delta is shown instead), and
PSNR against the untiled result (computed in fp32 where the untiled pass fits).

    python bench/bench_vae.py                      # GPU: full-size SD VAE, 2048 and 4096 px outputs, bf16
    python bench/bench_vae.py --cpu --tiny         # CPU smoke mode: tiny VAE, 256 and 512 px (under a minute)
Run with the host python (bash scripts/setup_host.sh prints it) and PISA_COMFY_DIR set.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
sys.path.insert(0, REPO)


def psnr(a, b) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)  # signals in [-1, 1]: peak-to-peak 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="*")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--tile", type=int, default=0, help="our decode tile in latent px (0 = auto from free memory)")
    ap.add_argument("--cap-gib", type=float, default=None, help="GPU: see and use only this much device memory")
    a = ap.parse_args()
    if a.cap_gib and not a.cpu:  # before ComfyUI reads the device's total
        from bench_pipeline import cap_device_memory

        cap_device_memory(a.cap_gib)

    from comfy_boot import boot

    boot(cpu=a.cpu, pytorch_attention=False)  # ComfyUI's own attention choice for the VAE
    import torch
    import comfy.model_management as mm
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from pisa_sr.vae_tiled import auto_tile_size, tiled_decode, tiled_encode

    dev = mm.get_torch_device()
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        a.dtype or ("fp32" if dev.type == "cpu" else "bf16")]
    ch, mult, nres = (32, [1, 2, 2, 4], 1) if a.tiny else (128, [1, 2, 4, 4], 2)
    sizes = a.sizes or ([256, 512] if a.tiny else [2048, 4096])
    dd = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": ch,
          "ch_mult": mult, "num_res_blocks": nres, "attn_resolutions": [], "dropout": 0.0}
    ae = AutoencoderKL(ddconfig=dd, embed_dim=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in ae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5 if p.dim() > 1 else
                    (1 + 0.1 * torch.randn(p.shape, generator=g) if n.endswith("weight") else
                     0.1 * torch.randn(p.shape, generator=g)))
    vae = comfy.sd.VAE(sd=ae.state_dict(), config={"params": {"embed_dim": 4, "ddconfig": dd}}, dtype=dt)
    net = vae.first_stage_model
    mm.load_models_gpu([vae.patcher])

    def timed(fn):
        fn()  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times, out = [], None
        for _ in range(a.runs):
            t = time.perf_counter()
            out = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
        return statistics.median(times), peak, out

    print(f"device={dev} dtype={dt} torch={torch.__version__} vae_ch={ch} date={time.strftime('%Y-%m-%d')}")
    print(f"{'op':8} {'px':>5} {'method':22} {'time s':>8} {'peak GiB':>9} {'PSNR dB':>8}")
    for px in sizes:
        lat = px // 8
        z = torch.randn(1, 4, lat, lat, generator=g).to(dev, dt)
        free = mm.get_free_memory(dev)
        tile = a.tile or auto_tile_size(free, lat, lat, is_decoder=True, dtype_bytes=torch.empty((), dtype=dt).element_size(),
                                        base_channels=ch)
        rows = {}
        with torch.inference_mode():
            try:
                rows["untiled"] = timed(lambda: net.decode(z).float())
            except mm.OOM_EXCEPTION:
                mm.soft_empty_cache()
                rows["untiled"] = None
            rows[f"ours (tile {tile})"] = timed(lambda: tiled_decode(net, z, tile, offload_device=dev).float())
            if tile >= lat:  # auto chose one tile: also show a forced 4x4 grid, parked in host RAM
                ft = max(16, lat // 4)
                rows[f"ours (tile {ft}, 4x4)"] = timed(lambda: tiled_decode(net, z, ft).float())
            rows["comfy VAEDecodeTiled"] = timed(
                lambda: vae.decode_tiled(z.float(), tile_x=64, tile_y=64, overlap=16).to(dev).movedim(-1, 1) * 2 - 1)
        ref = rows["untiled"][2] if rows["untiled"] else None
        for name, r in rows.items():
            if r is None:
                print(f"{'decode':8} {px:5d} {name:22} {'OOM':>8}")
                continue
            q = psnr(r[2].to(ref.device), ref) if ref is not None and r[2].shape == ref.shape else float("nan")
            print(f"{'decode':8} {px:5d} {name:22} {r[0]:8.3f} {r[1]:9.2f} {q:8.1f}")
        x = torch.rand(1, 3, px, px, generator=g).to(dev, dt) * 2 - 1
        etile = auto_tile_size(free, px, px, is_decoder=False, dtype_bytes=torch.empty((), dtype=dt).element_size(),
                               base_channels=ch)
        rows = {}
        with torch.inference_mode():
            try:
                rows["untiled"] = timed(lambda: net.encode(x).float())
            except mm.OOM_EXCEPTION:
                mm.soft_empty_cache()
                rows["untiled"] = None
            rows[f"ours (tile {etile})"] = timed(lambda: tiled_encode(net, x, etile, offload_device=dev).float())
            if etile >= px:
                fe = max(128, px // 4 // 64 * 64)
                rows[f"ours (tile {fe}, 4x4)"] = timed(lambda: tiled_encode(net, x, fe).float())
        ref = rows["untiled"][2] if rows["untiled"] else None
        for name, r in rows.items():
            if r is None:
                print(f"{'encode':8} {px:5d} {name:22} {'OOM':>8}")
                continue
            q = psnr(r[2], ref) if ref is not None else float("nan")
            print(f"{'encode':8} {px:5d} {name:22} {r[0]:8.3f} {r[1]:9.2f} {q:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
