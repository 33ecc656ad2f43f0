"""Long batches (issue 14, items 4 and 5): peak working memory of Encode LQ, Sample and Decode for a short and a long
batch of frames, and the frame-to-frame colour flicker of the colour fix on a synthetic clip.

    $PISA_HOST_PYTHON bench/bench_batch.py                  # tiny models, CPU (a few minutes)
    $PISA_HOST_PYTHON bench/bench_batch.py --frames 2 8 --encode-frames 1 2   # quicker

Memory: the node's peak of live tensor bytes (every aten allocation counted until its storage is freed, through a
torch dispatch mode), minus the bytes of what the node returns (the LATENT / IMAGE belong to ComfyUI). On the CPU
that is what a GPU would have to hold; weights and the inputs existed before and are not counted.

Flicker: one LQ image plus a different small Gaussian noise per frame (sigma ``--noise``), run through the three
nodes as one batch; per frame the mean of each colour channel of the output, then the standard deviation of those
means across frames (in 1/255), for each colour fix and for AdaIN with the statistics of the whole clip.
Run with the host python (``eval "$(bash scripts/setup_host.sh)"``) so PISA_COMFY_DIR is set.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(1, str(REPO / "tests"))


def measured(node, **inputs):
    """(result, peak working bytes beyond the result)."""
    from helpers import LiveBytes, tensor_bytes

    with LiveBytes() as mem:
        out = node.execute(**inputs).result[0]
    return out, max(0, mem.peak - tensor_bytes(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, nargs="*", default=[4, 48], help="Sample and Decode batch sizes")
    ap.add_argument("--encode-frames", type=int, nargs="*", default=[2, 8],
                    help="Encode LQ batch sizes (its frames are 512 px: the release's pre-resize)")
    ap.add_argument("--px", type=int, default=128, help="frame side in px for Sample, Decode and the clip")
    ap.add_argument("--flicker-frames", type=int, default=12)
    ap.add_argument("--noise", type=float, default=0.02)
    ap.add_argument("--skip-memory", action="store_true")
    a = ap.parse_args()

    import comfy_boot

    comfy_boot.boot(cpu=True, pytorch_attention=True)
    comfy_boot.load_pack()
    import torch

    torch.manual_seed(0)
    import tiny_models
    from helpers import make_image, pil_to_image, tensor_bytes

    world = tiny_models.tiny_world(seed=0)
    folder = comfy_boot._base / "models" / "pisa_sr"
    torch.save(world.ckpt, folder / "bench_batch.pkl")
    node = comfy_boot.node
    (model,) = node("PiSA_LoadLoRAs").execute(model=world.model, lora_name="bench_batch.pkl").result
    vae, cond = world.comfy_vae, world.conditioning
    base = pil_to_image(make_image(a.px, a.px, 3))
    mib = 1 / 2 ** 20

    def clip(n: int, image: torch.Tensor, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return (image + a.noise * torch.randn(n, *image.shape[1:], generator=g)).clamp(0, 1)

    if not a.skip_memory:
        print("peak working memory (MiB, live tensor bytes beyond the node's output), tiny models, CPU")
        small = pil_to_image(make_image(128, 128, 3))
        for n in a.encode_frames:
            with torch.no_grad():
                lat, enc = measured(node("PiSA_EncodeLQ"), image=clip(n, small, n), vae=vae, upscale=4,
                                    resize_filter="bicubic")
            print(f"  Encode LQ, {n:>2} frames 128 -> 512 px: {enc * mib:7.1f}   (LATENT out "
                  f"{tensor_bytes(lat) * mib:.1f})", flush=True)
            del lat
        for n in a.frames:
            with torch.no_grad():
                lat = small_latent(a.px, clip(n, base, n), vae)
                hq, smp = measured(node("PiSA_Sample"), model=model, positive=cond, latent=lat)
                img, dec = measured(node("PiSA_Decode"), latent=hq, vae=vae, color_fix="adain")
            print(f"  {n:>2} frames of {a.px} px: Sample {smp * mib:7.2f}   Decode {dec * mib:7.2f}   (IMAGE out "
                  f"{tensor_bytes(img) * mib:.1f})", flush=True)
            del lat, hq, img

    flicker(a, node, model, vae, cond, clip(a.flicker_frames, base, 123))
    return 0


def small_latent(px: int, frames, vae) -> dict:
    """Encode LQ's LATENT for frames already at the model size (``px``, a multiple of 8; no release resize)."""
    import comfy_boot
    import torch

    vae_ops = comfy_boot.pack("nodes.vae_ops")
    lq_info = comfy_boot.pack("nodes.lq_info")
    resize = comfy_boot.pack("pisa_sr.resize")
    lq_u8 = (frames * 255).round().to(torch.uint8)
    lq = lq_u8.float() / 255
    z = torch.cat([vae_ops.encode(vae, lq[i:i + 1], 0) for i in range(len(lq))])
    plan = resize.ResizePlan((px, px), None, (px, px), (px, px), (px, px))
    return {"samples": z, "pisa_sr": lq_info.LQInfo(lq_u8=lq_u8, plan=plan)}


def flicker(a, node, model, vae, cond, clip) -> None:
    import comfy_boot
    import torch

    adain_fix = comfy_boot.pack("pisa_sr.color").adain_fix

    with torch.no_grad():
        lat = small_latent(a.px, clip, vae)
        (hq,) = node("PiSA_Sample").execute(model=model, positive=cond, latent=lat).result
    print(f"\ncolour flicker: {len(clip)} frames of {a.px} px = one image + N(0, {a.noise}) noise each; spread (std "
          "across frames) of each channel's mean, in 1/255, max over channels")
    lq = lat["pisa_sr"].lq_u8.float().div(255).mean((1, 2))
    print(f"  the LQ frames themselves: {float(lq.std(0).max()) * 255:.3f}")
    for fix in ("none", "adain", "wavelet"):
        (img,) = node("PiSA_Decode").execute(latent=hq, vae=vae, color_fix=fix).result
        print(f"  {fix:<16} {float(img.mean((1, 2)).std(0).max()) * 255:.3f}", flush=True)
    # AdaIN with clip-level statistics (all frames as one image): the option this measures before it is offered
    lq_u8 = lat["pisa_sr"].lq_u8
    src = torch.cat(list(lq_u8), 1).float().div(255).movedim(-1, 0)[None]
    (raw,) = node("PiSA_Decode").execute(latent=hq, vae=vae, color_fix="none").result
    out = torch.cat(list(torch.floor(raw * 255) / 255), 1).movedim(-1, 0)[None]
    fixed = adain_fix(out, src).clamp(0, 1)[0].movedim(0, -1).reshape(lq_u8.shape[1], len(clip), -1, 3)
    print(f"  {'adain, clip':<16} {float(fixed.mean((0, 2)).std(0).max()) * 255:.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
