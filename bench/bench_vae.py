"""VAE benchmark (issues: seam-free tiled VAE; big pictures within a host-memory budget): the synchronised tiled
decode/encode of the nodes under three host budgets, in one run on the same random full-size SD-VAE weights.

Per size and op, rows for the budgets the nodes would plan (``nodes.vae_ops.plan``: tile, whole or tiled mid block,
parking): ``unlimited`` (maps in RAM, whatever they need), ``default`` (RAM_SHARE of the RAM free at start), and
each ``--budget-gib`` (a small forced budget: maps beyond it go to a memory-mapped temp file). Optional rows: the
untiled VAE (``--untiled``) and ComfyUI's own tiled VAE (``--comfy-tiled``). Reported: time (median of --runs),
peak host growth (VmHWM minus RSS before, the peak reset through /proc/self/clear_refs; includes resident pages of
the spill files), peak device memory on a GPU, spill files, and the largest |difference| to the unlimited row (0 =
bit-identical) or PSNR to the untiled one.

    python bench/bench_vae.py --cpu --sizes 2048 --runs 1 --ops decode    # CPU, full-size SD VAE, fp32
    python bench/bench_vae.py --cpu --tiny                                 # CPU smoke mode: tiny VAE, 256 and 512 px
    python bench/bench_vae.py --cpu --attention --sizes 1024 4096          # the tiled mid block's attention only

``--attention``: the mid block's attention as the tiled path runs it under each budget's plan (query block and
key/value chunk from ``vae_tiled.attention_blocks`` within the planned tile's working set): one query block against
all keys, timed three ways: PyTorch's scaled_dot_product_attention with all keys/values held (the previous method,
needs them whole), the chunks merged by log-sum-exp with the CPU kernel that returns it, and with the matmul
fallback; the keys/values are copied chunk by chunk from RAM as the tiled path copies them from the parked map.
Reported per block and scaled to the whole map's blocks, with the largest difference to the SDPA row.
Run with the host python (bash scripts/setup_host.sh prints it) and PISA_COMFY_DIR set.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
sys.path.insert(0, REPO)
sys.path.insert(1, os.path.join(REPO, "tests"))  # synthetic_weights, reference (for bench/_release.py)
sys.path.insert(1, os.path.join(REPO, "bench"))
GIB = 1 << 30


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
    ap.add_argument("--tile", type=int, default=0, help="tile override as the nodes take it, latent px (decode) or "
                    "image px (encode); 0 = planned from free memory and the budget")
    ap.add_argument("--budget-gib", type=float, nargs="*", default=[1.0], help="forced small host budgets")
    ap.add_argument("--no-default", action="store_true", help="skip the default-budget row")
    ap.add_argument("--no-unlimited", action="store_true", help="skip the unlimited row (4096 px and up: its maps "
                    "alone outgrow a 24 GB machine); differences are then to the first budget row")
    ap.add_argument("--ops", nargs="*", default=["decode", "encode"])
    ap.add_argument("--untiled", action="store_true", help="also the untiled VAE (fp32 reference for PSNR)")
    ap.add_argument("--release", action="store_true", help="also the release's tiled VAE (decode only; bench/_release.py)")
    ap.add_argument("--comfy-tiled", action="store_true", help="also ComfyUI's VAEDecodeTiled (decode only)")
    ap.add_argument("--cap-gib", type=float, default=None, help="GPU: see and use only this much device memory")
    ap.add_argument("--attention", action="store_true", help="only the tiled mid block's attention rows (see above)")
    a = ap.parse_args()
    if a.cap_gib and not a.cpu:  # before ComfyUI reads the device's total
        from bench_pipeline import cap_device_memory

        cap_device_memory(a.cap_gib)

    import comfy_boot

    comfy_boot.boot(cpu=a.cpu, pytorch_attention=False)  # ComfyUI's own attention choice for the VAE
    comfy_boot.load_pack()
    import comfy.model_management as mm
    import comfy.sd
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    from pisa_sr.park import Parking
    from pisa_sr.vae_tiled import parked_bytes, tiled_decode, tiled_encode

    vae_ops = comfy_boot.pack("nodes.vae_ops")
    dev = mm.get_torch_device()
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        a.dtype or ("fp32" if dev.type == "cpu" else "bf16")]
    ch, mult, nres = (32, [1, 2, 2, 4], 1) if a.tiny else (128, [1, 2, 4, 4], 2)
    sizes = a.sizes or ([256, 512] if a.tiny else [2048, 4096])
    dd = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": ch,
          "ch_mult": mult, "num_res_blocks": nres, "attn_resolutions": [], "dropout": 0.0}
    g = torch.Generator().manual_seed(0)
    if a.release:  # the same weights in diffusers form, for the release's tiler; ComfyUI converts the names
        from diffusers import AutoencoderKL as DiffusersVAE
        from synthetic_weights import init_weights

        dvae = DiffusersVAE(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=[ch * m for m in mult],
                            layers_per_block=nres, latent_channels=4, norm_num_groups=32).eval().requires_grad_(False)
        init_weights(dvae, 1, affine_noise=0.1)
        sd = dvae.state_dict()
        dvae.to(dt)
    else:
        ae = AutoencoderKL(ddconfig=dd, embed_dim=4)
        with torch.no_grad():
            for n, p in ae.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5 if p.dim() > 1 else
                        (1 + 0.1 * torch.randn(p.shape, generator=g) if n.endswith("weight") else
                         0.1 * torch.randn(p.shape, generator=g)))
        sd = ae.state_dict()
    vae = comfy.sd.VAE(sd=sd, config={"params": {"embed_dim": 4, "ddconfig": dd}}, dtype=dt)
    net = vae.first_stage_model
    mm.load_models_gpu([vae.patcher])
    spill_dir = tempfile.TemporaryDirectory(prefix="pisa_bench_vae_")  # removed at exit
    spill = spill_dir.name

    def rss(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    def timed(fn, *args, **kwargs):
        """(median time, peak host growth GiB, peak device GiB, output as fp32) of ``fn(*args, **kwargs)``."""
        times, out, grow, peak = [], None, 0, float("nan")
        for _ in range(a.runs):
            out = None
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            before = rss("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            if dev.type == "cuda":
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() / GIB
            times.append(time.perf_counter() - t)
            grow = max(grow, rss("VmHWM") - before)
        return statistics.median(times), grow / GIB, peak, out.float()

    free_ram = mm.get_free_memory(torch.device("cpu"))
    budgets = {} if a.no_unlimited else {"unlimited": None}
    if not a.no_default:
        budgets[f"default ({vae_ops.RAM_SHARE:.0%} of free)"] = int(vae_ops.RAM_SHARE * free_ram)
    budgets.update({f"forced {b:g} GiB": int(b * GIB) for b in a.budget_gib})
    print(f"device={dev} dtype={dt} torch={torch.__version__} vae_ch={ch} threads={torch.get_num_threads()} "
          f"free RAM {free_ram / GIB:.1f} GiB load {os.getloadavg()[0]:.1f} date={time.strftime('%Y-%m-%d %H:%M')}")
    isz = torch.empty((), dtype=dt).element_size()
    if a.attention:
        return attention_rows(a, dev, dt, isz, ch, sizes, budgets, free_ram, spill, vae_ops.plan)
    print(f"{'op':7} {'px':>5} {'budget':24} {'plan':24} {'time s':>8} {'x ref':>6} {'host GiB':>9} "
          f"{'dev GiB':>8} {'files':>5} {'max |diff| to ref':>13}")
    for px in sizes:
        for op in a.ops:
            is_dec = op == "decode"
            side = px // 8 if is_dec else px
            x = (torch.randn(1, 4, side, side, generator=g) if is_dec else
                 torch.rand(1, 3, side, side, generator=g) * 2 - 1).to(dt)
            rows = {}
            if a.untiled:
                try:
                    rows["untiled"] = ("-", *timed(net.decode if is_dec else net.encode, x.to(dev)))
                except Exception as e:  # noqa: BLE001 (an OOM of either kind: reported as a row)
                    rows["untiled"] = ("-", None, type(e).__name__)
                    mm.soft_empty_cache()
            if a.comfy_tiled and is_dec:
                r = timed(vae.decode_tiled, x.float(), tile_x=64, tile_y=64, overlap=16)
                rows["comfy VAEDecodeTiled"] = ("64/16 latent", *r[:3], r[3].movedim(-1, 1) * 2 - 1)
            if a.release and is_dec:  # csslc/PiSA-SR src/my_utils/vaehook.py as bench/_release.py re-implements it
                from _release import DEC_PAD, DEC_TILE, tiled_vae_forward

                dvae.to(dev)
                with torch.no_grad():
                    zq = dvae.post_quant_conv(x.to(dev))  # a 1x1 conv on the latent, outside the timing
                rows[f"release tiler {DEC_TILE}/{DEC_PAD}"] = (f"tile {DEC_TILE}+{DEC_PAD}, per-tile mid", *timed(
                    tiled_vae_forward, dvae.decoder, zq, DEC_TILE, DEC_PAD, is_decoder=True))
                del zq
                dvae.to("cpu")
            for name, budget in budgets.items():
                pl = vae_ops.plan(dev, mm.get_free_memory(dev) if dev.type != "cpu" else free_ram,
                                  budget if budget is not None else 1 << 62, spill, (side, side),
                                  a.tile, is_decoder=is_dec, dtype_bytes=isz, base_channels=ch)
                parking = pl.parking if budget is not None else Parking(pl.parking.device)
                kw = {} if is_dec else {"device": dev}
                res = timed(tiled_decode if is_dec else tiled_encode, net, x.to(dev) if is_dec else x, pl.tile,
                            whole_mid=pl.whole_mid, parking=parking, **kw)
                mid = {None: "whole?", True: "whole", False: "tiled"}[pl.whole_mid]
                rows[name] = (f"tile {pl.tile}, mid {mid}, {parking.device.type}", *res, parking.files)
            ref = rows["unlimited" if "unlimited" in rows else next(iter(budgets))]  # the reference row ("ref")
            base, unl_t = ref[4], ref[1]
            for name, r in rows.items():
                if r[1] is None:
                    print(f"{op:7} {px:5d} {name:24} {r[2]}")
                    continue
                cmp = f"{(r[4].cpu() - base.cpu()).abs().max().item():.1e}" if r[4].shape == base.shape else "-"
                if name.startswith("release"):  # approximate by design (per-tile attention): how far, in dB
                    cmp += f" ({psnr(r[4].cpu(), base.cpu()):.0f} dB to ref)"
                if "untiled" in rows and rows["untiled"][1] is not None and name != "untiled":
                    cmp += f" ({psnr(r[4].cpu(), rows['untiled'][4].cpu()):.0f} dB to untiled)"
                files = r[5] if len(r) > 5 else "-"
                print(f"{op:7} {px:5d} {name:24} {r[0]:24} {r[1]:8.1f} {r[1] / unl_t:6.2f} {r[2]:9.2f} "
                      f"{r[3]:8.2f} {files!s:>5} {cmp:>13}")
            need = parked_bytes(side, side, is_decoder=is_dec, dtype_bytes=isz, base_channels=ch)
            print(f"        parked maps by the formula (parked_bytes): {need / GIB:.2f} GiB; x4 area "
                  f"({px * 2} px): {4 * need / GIB:.2f} GiB, x16 ({px * 4} px): {16 * need / GIB:.2f} GiB")
            del rows, x
    return 0


def attention_rows(a, dev, dt, isz: int, ch: int, sizes, budgets: dict, free_ram: int, spill: str, plan) -> int:
    import torch
    import torch.nn.functional as F

    from pisa_sr import vae_tiled

    def chunked(q, k, v, kv_len: int):
        pairs = ((k[:, :, i:i + kv_len].clone(), v[:, :, i:i + kv_len].clone()) for i in range(0, k.shape[2], kv_len))
        return vae_tiled._attend(q, pairs)

    def best(fn, *args):
        times, out = [], None
        for _ in range(a.runs):
            t = time.perf_counter()
            out = fn(*args)
            times.append(time.perf_counter() - t)
        return min(times), out

    print(f"{'px':>5} {'budget':24} {'tile':>4} {'q block':>7} {'kv chunk':>8} {'method':32} {'s/block':>8} "
          f"{'x sdpa':>6} {'whole map s':>11} {'max |diff|':>10}")
    g = torch.Generator().manual_seed(0)
    c = 4 * ch
    lse_kernel = vae_tiled._lse_kernel
    for px in sizes:
        n = (px // 8) ** 2
        k, v = (torch.randn(1, 1, n, c, generator=g).to(dev, dt) for _ in range(2))
        for name, budget in budgets.items():
            pl = plan(dev, free_ram, budget if budget is not None else 1 << 62, spill, (px // 8, px // 8), a.tile,
                      is_decoder=True, dtype_bytes=isz, base_channels=ch)
            work = vae_tiled._tile_bytes(pl.tile, is_decoder=True, dtype_bytes=isz, base_channels=ch)
            q_len, kv_len = vae_tiled.attention_blocks(n, c, isz, work, streamed_lse=lse_kernel(dev) is not None)
            q = torch.randn(1, 1, q_len, c, generator=g).to(dev, dt)
            t_ref, ref = best(F.scaled_dot_product_attention, q, k, v)
            rows = [("sdpa, all keys/values held", t_ref, ref)]
            if kv_len < n:
                rows.append(("chunks + lse, CPU kernel", *best(chunked, q, k, v, kv_len)))
                vae_tiled._lse_kernel = lambda device: None
                try:
                    rows.append(("chunks + lse, matmul", *best(chunked, q, k, v, kv_len)))
                finally:
                    vae_tiled._lse_kernel = lse_kernel
            blocks = -(-n // q_len)
            for method, t, out in rows:
                diff = (out.float() - ref.float()).abs().max().item()
                print(f"{px:5d} {name:24} {pl.tile:4d} {q_len:7d} {kv_len:8d} {method:32} {t:8.2f} "
                      f"{t / t_ref:6.2f} {t * blocks:11.0f} {diff:10.1e}", flush=True)
        del k, v
    return 0


if __name__ == "__main__":
    sys.exit(main())
