"""The release's PiSA-SR pipeline as it runs on a GPU, for timing: the LoRA merge, latent tiling and colour fix come
from tests/reference.py (the tests' independent diffusers + peft reference); this file adds what the release does
for speed and memory (csslc/PiSA-SR pisasr.py, PiSASR_eval):

- weights: pix merged with peft, a full copy of W+dpix kept on the device ("ori"), sem merged on top; in adjustable
  mode the sem deltas are precomputed as full-size weight tensors on the device (about three UNet-sized sets);
- adjustable mode per tile: eps_sem with W+dpix+dsem, swap every parameter to the W+dpix copy, eps_pix, then rebuild
  W+dpix+dsem as ``delta + ori`` for every targeted parameter (two swaps per tile, as the release does);
- latent tiling only when h*w > 96^2: 96/32 tiles one per UNet call, edge-aligned last tile, Gaussian blend (fp64
  weights, as the release builds them with numpy);
- its tiled VAE (encoder tiles 1024 px + 32 pad, decoder tiles 224 latent px + 11 pad, engaged only when the input's
  long side exceeds tile + 2*pad, i.e. 1088 px to encode / 246 latent px = 1968 px to decode): tiles advance one
  GroupNorm at a time with the pixel-weighted mean of per-tile means and variances, activations and residuals parked
  on the host between steps, per-tile mid-block attention with materialised scores, hard-cropped tiles;
- VAE posterior mode instead of the release's unseeded sample (deterministic; the posterior std is tiny).
The decode input is cast to the VAE dtype (the mixed fp32/fp16 sum ``z_lq - eps`` would not feed an fp16 decoder).
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from _weights import SCALING, Weights
from reference import adain, merged_unet, release_tiles  # tests/reference.py: the release's merge, tiling, colour fix

ENC_TILE, ENC_PAD = 1024, 32
DEC_TILE, DEC_PAD = 224, 11
LATENT_TILE, LATENT_OVERLAP = 96, 32


# ------------------------------------------------------------------------------------------------ tiled VAE
# A network is flattened into a task list (as the release's VAEHook does); every tile runs it up to the next
# GroupNorm, the statistics of all tiles are merged, and the next sweep applies the norm and runs on.
Task = tuple  # ("fn", callable) | ("silu",) | ("norm", GroupNorm) | ("store_res", callable) | ("add_res",)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _resnet_tasks(block) -> list[Task]:
    short = block.conv_shortcut if block.conv_shortcut is not None else _identity
    return [("store_res", short), ("norm", block.norm1), ("silu",), ("fn", block.conv1),
            ("norm", block.norm2), ("silu",), ("fn", block.conv2), ("add_res",)]


def _attention_core(attn) -> Callable[[torch.Tensor], torch.Tensor]:
    """diffusers' classic Attention path on one tile: materialised scores (baddbmm), fp32 softmax."""

    def run(h: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = h.shape
        heads = attn.heads
        t = h.view(b, c, hh * ww).transpose(1, 2)
        q, k, v = (u.reshape(b, -1, heads, c // heads).permute(0, 2, 1, 3).reshape(b * heads, -1, c // heads)
                   for u in (attn.to_q(t), attn.to_k(t), attn.to_v(t)))
        scores = torch.baddbmm(torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype, device=q.device),
                               q, k.transpose(-1, -2), beta=0, alpha=attn.scale)
        probs = scores.float().softmax(dim=-1).to(q.dtype)
        del scores
        o = torch.bmm(probs, v)
        del probs
        o = o.reshape(b, heads, -1, c // heads).permute(0, 2, 1, 3).reshape(b, -1, c)
        o = attn.to_out[1](attn.to_out[0](o))
        return o.transpose(-1, -2).reshape(b, c, hh, ww)

    return run


def _mid_tasks(mid) -> list[Task]:
    a = mid.attentions[0]
    return (_resnet_tasks(mid.resnets[0]) + [("store_res", _identity), ("norm", a.group_norm),
                                             ("fn", _attention_core(a)), ("add_res",)]
            + _resnet_tasks(mid.resnets[1]))


def build_tasks(net, is_decoder: bool) -> list[Task]:
    tasks: list[Task] = [("fn", net.conv_in)]
    if is_decoder:
        tasks += _mid_tasks(net.mid_block)
        for block in net.up_blocks:
            for r in block.resnets:
                tasks += _resnet_tasks(r)
            if block.upsamplers:
                tasks.append(("fn", block.upsamplers[0]))
    else:
        for block in net.down_blocks:
            for r in block.resnets:
                tasks += _resnet_tasks(r)
            if block.downsamplers:
                tasks.append(("fn", block.downsamplers[0]))
        tasks += _mid_tasks(net.mid_block)
    return tasks + [("norm", net.conv_norm_out), ("silu",), ("fn", net.conv_out)]


def _best_tile(lower: int, upper: int) -> int:
    """The release's rounding of a tile side up to a multiple of 32/16/8/4/2 that stays <= the nominal size."""
    div = 32
    while div >= 2:
        rem = lower % div
        if rem == 0:
            return lower
        cand = lower - rem + div
        if cand <= upper:
            return cand
        div //= 2
    return lower


def split_tiles(h: int, w: int, tile: int, pad: int, is_decoder: bool):
    """Input boxes (with pad) and output boxes [x0, x1, y0, y1] of the release's VAE tiler."""
    nh = max(math.ceil((h - 2 * pad) / tile), 1)
    nw = max(math.ceil((w - 2 * pad) / tile), 1)
    th = _best_tile(math.ceil((h - 2 * pad) / nh), tile)
    tw = _best_tile(math.ceil((w - 2 * pad) / nw), tile)
    f = (lambda v: v * 8) if is_decoder else (lambda v: v // 8)
    ins, outs = [], []
    for i in range(nh):
        for j in range(nw):
            box = [pad + j * tw, min(pad + (j + 1) * tw, w), pad + i * th, min(pad + (i + 1) * th, h)]
            out = [box[0] if box[0] > pad else 0, box[1] if box[1] < w - pad else w,
                   box[2] if box[2] > pad else 0, box[3] if box[3] < h - pad else h]
            outs.append([f(v) for v in out])
            ins.append([max(0, box[0] - pad), min(w, box[1] + pad), max(0, box[2] - pad), min(h, box[3] + pad)])
    return ins, outs


def _var_mean(x: torch.Tensor, groups: int):
    b, c = x.shape[:2]
    var, mean = torch.var_mean(x.contiguous().view(1, b * groups, c // groups, *x.shape[2:]), dim=[0, 2, 3, 4],
                               unbiased=False)
    if var.dtype == torch.float16 and var.isinf().any():
        var, mean = torch.var_mean(x.float().contiguous().view(1, b * groups, c // groups, *x.shape[2:]),
                                   dim=[0, 2, 3, 4], unbiased=False)
    return var, mean


def _apply_norm(x: torch.Tensor, module: torch.nn.GroupNorm, var: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    b, c = x.shape[:2]
    g = module.num_groups
    out = F.batch_norm(x.contiguous().view(1, b * g, c // g, *x.shape[2:]), mean, var,
                       training=False, momentum=0, eps=1e-6).view(b, c, *x.shape[2:])
    if module.weight is not None:
        out = out * module.weight.view(1, -1, 1, 1) + module.bias.view(1, -1, 1, 1)
    return out


@torch.no_grad()
def tiled_vae_forward(net, x: torch.Tensor, tile: int, pad: int, is_decoder: bool) -> torch.Tensor:
    """The release's VAEHook.vae_tile_forward (non-fast mode) for a diffusers Encoder/Decoder."""
    device = x.device
    n, _, h, w = x.shape
    ins, outs = split_tiles(h, w, tile, pad, is_decoder)
    tasks = build_tasks(net, is_decoder)
    states: list[dict | None] = [{"x": x[:, :, b[2]:b[3], b[0]:b[1]].cpu(), "pc": 0, "res": None, "wait": False}
                                 for b in ins]
    del x
    result = None
    done = 0
    stats: tuple[torch.Tensor, torch.Tensor] | None = None
    forward = True
    while done < len(states):
        order = list(range(len(states)) if forward else reversed(range(len(states))))
        var_l, mean_l, pix_l = [], [], []
        for pos, i in enumerate(order):
            st = states[i]
            if st is None:
                continue
            t = st["x"].to(device)
            st["x"] = None
            if st["wait"]:
                t = _apply_norm(t, tasks[st["pc"]][1], *stats)
                st["pc"] += 1
                st["wait"] = False
            while st["pc"] < len(tasks):
                op = tasks[st["pc"]]
                if op[0] == "norm":
                    break
                if op[0] == "fn":
                    t = op[1](t)
                elif op[0] == "silu":
                    t = F.silu(t)
                elif op[0] == "store_res":
                    st["res"] = op[1](t).cpu()
                else:  # add_res
                    t = t + st["res"].to(device)
                    st["res"] = None
                st["pc"] += 1
            if st["pc"] == len(tasks):
                if result is None:
                    scale = 8 if is_decoder else 1 / 8
                    result = torch.zeros((n, t.shape[1], int(h * scale), int(w * scale)), device=device)
                pad_box = [v * 8 if is_decoder else v // 8 for v in ins[i]]
                m = [outs[i][k] - pad_box[k] for k in range(4)]
                crop = t[:, :, m[2]:t.shape[2] + m[3], m[0]:t.shape[3] + m[1]]
                result[:, :, outs[i][2]:outs[i][3], outs[i][0]:outs[i][1]] = crop
                states[i] = None
                done += 1
                continue
            v, mu = _var_mean(t, tasks[st["pc"]][1].num_groups)
            var_l.append(v)
            mean_l.append(mu)
            pix_l.append(t.shape[2] * t.shape[3])
            st["wait"] = True
            st["x"] = t if pos == len(order) - 1 else t.cpu()  # the sweep's last tile stays on the device
            del t
        if var_l:
            px = torch.tensor(pix_l, dtype=torch.float32, device=device) / max(pix_l)
            px = (px / px.sum()).unsqueeze(1)
            stats = ((torch.vstack(var_l) * px).sum(0), (torch.vstack(mean_l) * px).sum(0))
        forward = not forward
    return result


# ------------------------------------------------------------------------------------------------ pipeline
class ReleasePipeline:
    """Built once per (mode, lambdas): the release builds PiSASR_eval for one setting."""

    def __init__(self, weights: Weights, device: torch.device, dtype: torch.dtype, default: bool,
                 lambda_pix: float = 1.0, lambda_sem: float = 1.0):
        self.device, self.dtype, self.default = device, dtype, default
        ckpt = weights.ckpt
        pix = merged_unet(weights.unet, ckpt, ("pix",))
        pix.unload_lora()  # merge_and_unload: plain modules holding W + dpix
        self.ori = {n: p.detach().to(device, dtype) for n, p in pix.named_parameters()}  # W + dpix, kept
        del pix
        self.unet = merged_unet(weights.unet, ckpt, ("pix", "sem"))
        self.unet.unload_lora()
        self.unet = self.unet.to(device, dtype).requires_grad_(False)
        self.deltas: dict[str, torch.Tensor] = {}
        if not default:
            for key in ckpt["state_dict_unet"]:
                if not key.endswith("_sem.weight") or ".lora_A." not in key:
                    continue
                mod = key.split(".lora_A.")[0]
                a = ckpt["state_dict_unet"][key].float()
                b = ckpt["state_dict_unet"][key.replace(".lora_A.", ".lora_B.")].float()
                scale = 8.0 / ckpt["lora_rank_unet_sem"]  # peft's default lora_alpha over the rank
                if a.dim() == 2:
                    d = b @ a
                elif a.shape[2:] == (1, 1):
                    d = (b.flatten(1) @ a.flatten(1)).unsqueeze(2).unsqueeze(3)
                else:
                    d = F.conv2d(a.permute(1, 0, 2, 3), b).permute(1, 0, 2, 3)
                self.deltas[mod + ".weight"] = (d * scale).to(device, dtype)
        self.vae = copy.deepcopy(weights.vae).to(device, dtype)  # .to() is in place: keep the shared copy intact
        self.context = weights.context.to(device, dtype)
        self.t1 = torch.tensor([1], device=device).long()
        self.lambda_pix = torch.tensor([lambda_pix], device=device)
        self.lambda_sem = torch.tensor([lambda_sem], device=device)
        self.params = dict(self.unet.named_parameters())

    # -- the release's weight swaps
    def _apply_ori(self) -> None:
        for name, p in self.params.items():
            p.data = self.ori[name]

    def _apply_delta(self) -> None:
        for name, p in self.params.items():
            p.data = self.deltas[name] + self.ori[name] if name in self.deltas else self.ori[name]

    def _unet(self, z: torch.Tensor) -> torch.Tensor:
        return self.unet(z, self.t1, encoder_hidden_states=self.context).sample

    def _eps(self, z: torch.Tensor) -> torch.Tensor:
        if self.default:
            return self._unet(z)
        sem = self._unet(z)
        self._apply_ori()
        pix = self._unet(z)
        self._apply_delta()
        sem = sem - pix
        return self.lambda_pix * pix + self.lambda_sem * sem

    @torch.no_grad()
    def unet_step(self, z: torch.Tensor) -> torch.Tensor:
        """_process_latents: whole latent below the area trigger, else 96/32 tiles one at a time."""
        return release_tiles(z, self._eps, LATENT_TILE, LATENT_OVERLAP)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.vae.encoder
        if max(x.shape[-2:]) <= ENC_TILE + 2 * ENC_PAD:
            h = enc(x)
        else:
            h = tiled_vae_forward(enc, x, ENC_TILE, ENC_PAD, is_decoder=False).to(x.dtype)
        moments = self.vae.quant_conv(h) if self.vae.quant_conv is not None else h
        return moments[:, :4] * SCALING  # posterior mode

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = self.vae.post_quant_conv(z.to(self.dtype) / SCALING)
        if max(z.shape[-2:]) <= DEC_TILE + 2 * DEC_PAD:
            return self.vae.decoder(z)
        return tiled_vae_forward(self.vae.decoder, z, DEC_TILE, DEC_PAD, is_decoder=True)

    @torch.no_grad()
    def run(self, lq_u8: np.ndarray) -> torch.Tensor:
        """Resized LQ (uint8 HxWx3) -> final image [H,W,3] float in [0,1] on the host, 8-bit truncated like the
        release's PIL round trips, with adain colour fix against the LQ (done on the device here: faster than the
        release's PIL version, so the comparison favours the release)."""
        lq = torch.from_numpy(lq_u8).to(self.device).permute(2, 0, 1)[None].float() / 255
        z = self.encode((lq * 2 - 1).to(self.dtype))
        eps = self.unet_step(z)
        img = self.decode(z - eps).clamp(-1, 1).float()
        img = torch.floor(torch.clip(img * 0.5 + 0.5, 0, 1) * 255) / 255  # ToPILImage truncation
        img = adain(img, lq).clamp(0, 1)
        img = torch.floor(img * 255) / 255  # the saved 8-bit PNG
        out = img[0].permute(1, 2, 0).cpu()
        return out


@torch.no_grad()
def self_check(vae, tol: float = 1e-4) -> float:
    """The tiler on one tile must equal the plain encoder/decoder (fp32, CPU): proof that its task lists are the
    network. Several tiles must run and keep the shape (their result is the release's approximation)."""
    g = torch.Generator().manual_seed(0)
    vae = copy.deepcopy(vae).float().cpu()
    x = torch.rand(1, 3, 96, 80, generator=g) * 2 - 1
    z = torch.randn(1, 4, 12, 10, generator=g)
    worst = 0.0
    for net, inp, dec in ((vae.encoder, x, False), (vae.decoder, z, True)):
        plain = net(inp)
        one = tiled_vae_forward(net, inp, 1024 if not dec else 224, 32 if not dec else 11, dec)
        worst = max(worst, (one - plain).abs().max().item())
        many = tiled_vae_forward(net, inp, 16 if not dec else 4, 8 if not dec else 2, dec)
        if many.shape != plain.shape or not torch.isfinite(many).all():
            raise RuntimeError("release-equivalent tiled VAE: multi-tile run failed")
    if worst > tol:
        raise RuntimeError(f"release-equivalent tiled VAE differs from the plain VAE on one tile by {worst:.2e}")
    return worst
