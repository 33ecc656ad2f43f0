"""An independent re-implementation of the official PiSA-SR release's inference (csslc/PiSA-SR, commit 9c76e12:
test_pisasr.py + PiSASR_eval) on diffusers + peft. Test-only: the pack never imports diffusers or peft.

Differences from the release, each one numerically neutral or documented:
- the VAE posterior *mode* replaces the release's unseeded sample (the release's --seed is never applied);
- fp32 throughout (the release runs fp16), so comparisons are exact up to fp32 rounding;
- the release's tiled VAE only engages above 1088/1968 px, so at test sizes it is the plain VAE, as here.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SCALING = 0.18215
PARTS = ("encoder", "decoder", "others")


def merged_unet(unet, ckpt: dict, kinds: tuple[str, ...]):
    """The release's UNet with the given LoRA kinds added through peft and merged (fp32)."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    u = copy.deepcopy(unet)
    names = []
    for kind in kinds:
        for part in PARTS:
            modules = ckpt[f"unet_lora_{part}_modules_{kind}"]
            if not modules:
                continue
            cfg = LoraConfig(r=ckpt[f"lora_rank_unet_{kind}"], init_lora_weights="gaussian", target_modules=modules)
            u.add_adapter(cfg, adapter_name=f"default_{part}_{kind}")
            names.append(f"default_{part}_{kind}")
    loaded = 0
    with torch.no_grad():
        for name, p in u.named_parameters():
            if "lora_" in name:
                p.copy_(ckpt["state_dict_unet"][name])
                loaded += 1
    expected = sum(1 for k in ckpt["state_dict_unet"] if any(k.endswith(f"_{kind}.weight") for kind in kinds))
    assert loaded == expected, (loaded, expected)
    for m in u.modules():
        if isinstance(m, LoraLayer):
            m.merge(adapter_names=[n for n in names if n in m.lora_A])
    return u.eval()


def adain(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The release's adain colour fix: ``t`` takes the per-channel mean and std of ``s``."""
    def ms(f):
        b, c = f.shape[:2]
        v = f.reshape(b, c, -1).var(dim=2) + 1e-5
        return f.reshape(b, c, -1).mean(dim=2).reshape(b, c, 1, 1), v.sqrt().reshape(b, c, 1, 1)
    sm, ss = ms(s)
    tm, ts = ms(t)
    return (t - tm) / ts * ss + sm


@torch.no_grad()
def release_tiles(z: torch.Tensor, eps, tile_size: int = 96, tile_overlap: int = 32) -> torch.Tensor:
    """_process_latents of the release: ``eps(z)`` whole below the area trigger, else batch-1 tiles, Gaussian blend
    (fp64 weights, as the release builds them with numpy), edge-aligned last tile."""
    _, _, h, w = z.shape
    if h * w <= tile_size * tile_size:
        return eps(z)
    tw = th = tile_size
    mx, my = (tw - 1) / 2, (th - 1) / 2
    xp = [np.exp(-(x - mx) ** 2 / (2 * tw * tw * 0.01)) / np.sqrt(2 * np.pi * 0.01) for x in range(tw)]
    yp = [np.exp(-(y - my) ** 2 / (2 * th * th * 0.01)) / np.sqrt(2 * np.pi * 0.01) for y in range(th)]
    weights = torch.tensor(np.outer(yp, xp), device=z.device).repeat(1, 4, 1, 1)
    tile_size = min(tile_size, min(h, w))
    rows = 0
    cur = 0
    while cur < w:
        cur = max(rows * tile_size - tile_overlap * rows, 0) + tile_size
        rows += 1
    cols = 0
    cur = 0
    while cur < h:
        cur = max(cols * tile_size - tile_overlap * cols, 0) + tile_size
        cols += 1
    noise = torch.zeros(z.shape, device=z.device)
    contrib = torch.zeros(z.shape, device=z.device)
    for r in range(rows):
        for c in range(cols):
            ox = max(r * tile_size - tile_overlap * r, 0)
            oy = max(c * tile_size - tile_overlap * c, 0)
            if r == rows - 1:
                ox = w - tile_size
            if c == cols - 1:
                oy = h - tile_size
            # The release passes this slice as a strided view. PyTorch's CPU convolution reads such a view as
            # channels_last and keeps that layout through the whole UNet, whose GroupNorm then sums in another
            # order (measured here: 1.5e-4 max abs on eps between the two layouts of one tile, in this very
            # reference). Layout is not part of the math; the tile is fed contiguous, like every untiled call.
            out = eps(z[:, :, oy:oy + tile_size, ox:ox + tile_size].contiguous())
            noise[:, :, oy:oy + tile_size, ox:ox + tile_size] += out * weights
            contrib[:, :, oy:oy + tile_size, ox:ox + tile_size] += weights
    return noise / contrib


class ReleaseReference:
    def __init__(self, unet, vae, ckpt: dict, context: torch.Tensor):
        self.unet_pix = merged_unet(unet, ckpt, ("pix",))
        self.unet_sem = merged_unet(unet, ckpt, ("pix", "sem"))
        self.vae = vae
        self.context = context
        self.t1 = torch.tensor([1]).long()

    # --- UNet ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _unet(self, unet, z):
        return unet(z, self.t1, encoder_hidden_states=self.context.expand(z.shape[0], -1, -1)).sample

    @torch.no_grad()
    def eps(self, z, default: bool, lambda_pix: float = 1.0, lambda_sem: float = 1.0):
        if default:
            return self._unet(self.unet_sem, z)
        sem = self._unet(self.unet_sem, z)
        pix = self._unet(self.unet_pix, z)
        return lambda_pix * pix + lambda_sem * (sem - pix)

    def eps_tiled(self, z, default, lambda_pix=1.0, lambda_sem=1.0, tile_size=96, tile_overlap=32):
        return release_tiles(z, lambda t: self.eps(t, default, lambda_pix, lambda_sem), tile_size, tile_overlap)

    # --- whole pipeline -------------------------------------------------------------------------------------------
    @staticmethod
    def prepare(img: Image.Image, upscale: int, process_size: int = 512):
        ow, oh = img.size
        flag = False
        if ow < process_size // upscale or oh < process_size // upscale:
            scale = (process_size // upscale) / min(ow, oh)
            img = img.resize((int(scale * ow), int(scale * oh)))
            flag = True
        img = img.resize((img.size[0] * upscale, img.size[1] * upscale))
        nw, nh = img.width - img.width % 8, img.height - img.height % 8
        img = img.resize((nw, nh), Image.LANCZOS)
        return img, flag, (ow, oh)

    @torch.no_grad()
    def encode(self, lq: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(lq).copy()).permute(2, 0, 1)[None].float() / 255 * 2 - 1
        return self.vae.encode(x).latent_dist.mode() * SCALING

    @staticmethod
    def _to_pil(t: torch.Tensor) -> Image.Image:  # torchvision ToPILImage on floats: mul(255).byte() truncates
        return Image.fromarray(t.mul(255).byte().permute(1, 2, 0).numpy())

    @staticmethod
    def _to_tensor(img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255

    @staticmethod
    def _wavelet(t, s):
        def blur(x, r):
            k = torch.tensor([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]])
            k = k[None, None].repeat(3, 1, 1, 1)
            return F.conv2d(F.pad(x, (r, r, r, r), mode="replicate"), k, groups=3, dilation=r)

        def dec(x):
            high = torch.zeros_like(x)
            for i in range(5):
                low = blur(x, 2 ** i)
                high += x - low
                x = low
            return high, low
        th, _ = dec(t)
        _, sl = dec(s)
        return th + sl

    @torch.no_grad()
    def run(self, img: Image.Image, upscale: int = 4, default: bool = True, lambda_pix=1.0, lambda_sem=1.0,
            align: str = "adain", tile_size=96, tile_overlap=32) -> tuple[np.ndarray, dict]:
        lq, flag, (ow, oh) = self.prepare(img, upscale)
        z = self.encode(lq)
        eps = self.eps_tiled(z, default, lambda_pix, lambda_sem, tile_size, tile_overlap)
        out = self.vae.decode((z - eps) / SCALING).sample.clamp(-1, 1)
        out = torch.clip(out * 0.5 + 0.5, 0, 1)
        pil = self._to_pil(out[0])
        if align in ("adain", "wavelet"):
            fix = adain if align == "adain" else self._wavelet
            res = fix(self._to_tensor(pil), self._to_tensor(lq))
            pil = self._to_pil(res[0].clamp_(0.0, 1.0))
        if flag:
            pil = pil.resize((int(upscale * ow), int(upscale * oh)))
        return np.asarray(pil), {"z": z, "eps": eps, "lq": lq}
