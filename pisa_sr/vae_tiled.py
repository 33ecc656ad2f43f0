"""GroupNorm-synchronised tiled encode/decode for LDM-layout VAEs (the SD 1.x/2.x autoencoder).

Why not the usual tiled VAE: decoding tiles independently gives each tile its own GroupNorm statistics (colour and
contrast shift per tile, visible seams), and the release's tiled VAE averages per-tile variances, which drops the
spread between tile means. Here the tiles advance through the network together, one *step* at a time, where a
step is everything between two GroupNorms (norm -> SiLU -> at most one 3x3 conv, plus residual/shortcut or
resampling). After each step the tile cores are parked in a full-size map on ``offload_device`` (CPU by default)
and per-channel count/mean/M2 are merged across tiles (Chan's parallel formula, fp64), so the next GroupNorm uses
the statistics of the whole image. Before a step every tile reads its core plus a 2-px halo from the parked map;
since a step holds at most one 3x3 conv, that halo covers the receptive field, and at the image border the tile
sees the same zero padding as the untiled network. Result: tiled == untiled up to floating-point error, for any
tile size and with no blending. The only attention in SD's VAE is in the mid block (1/8 of the image side); it
runs on the whole map when that fits, else as exact attention over all positions, one query tile at a time,
streaming keys and values in chunks with an online softmax.

Device memory then scales with the tile, not the image (plus the whole-map mid block at 1/64 of the image area);
the parked maps (host memory) scale with the image: at most three C-channel full-resolution maps for decode, since
a block whose shortcut is pointwise writes its output over its input (see ``parked_bytes``).

Works on ComfyUI's modules but imports nothing from ComfyUI: submodules (convs, resamplers, whole mid blocks) are
called through their own ``forward`` so ComfyUI's casting ops keep working; only GroupNorm is re-implemented, with
its weight and bias cast to the activation's device here. Nothing is patched, so an interruption leaves no state.
"""
from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .errors import PisaError

log = logging.getLogger(__name__)

HALO = 2
"""Context (px, at each step's input resolution) read around a tile core: a step holds at most one 3x3 conv (needs
1 px), and a stride-2 downsample needs its window to start on an even pixel."""

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
_CHUNK = 32  # channels widened to fp32 at once for the norm/statistics of 16-bit tiles
_ATTN_SCORE_BUDGET = 1 << 24  # fp32 scores per query tile and key chunk (64 MiB) in the streamed attention

Progress = Callable[[int, int], None]
Interrupt = Callable[[], None]


def _cuts(length: int, tile: int) -> list[int]:
    """Boundaries of a balanced partition of ``range(length)`` into ``ceil(length / tile)`` pieces.

    Cores must partition the image (each pixel counted once in the statistics), so the overlapping, edge-aligned
    grid of ``tiling.axis_starts`` does not fit here; balanced pieces also avoid a sliver tile at the end.
    """
    n = max(1, math.ceil(length / max(1, tile)))
    return [i * length // n for i in range(n + 1)]


def _region(c0: int, length: int, size: int, halo: int) -> tuple[int, int]:
    """Window of ``length`` px (clipped to ``size``) holding the core starting at ``c0`` plus ``halo`` px of context.

    Near an image edge the window is shifted inwards rather than shortened, so it ends exactly at the edge and the
    convolutions see the same zero padding there as the untiled network; ``length`` is the largest core plus two
    halos, so every core keeps at least ``halo`` px of real context on its inner sides.
    """
    start = min(max(c0 - halo, 0), max(size - length, 0))
    return start, min(size, start + length)


class _Map:
    """A full-size activation (parked) at ``scale`` x the base grid, with per-channel running statistics."""

    def __init__(self, data: torch.Tensor, scale: int, owned: bool = True):
        self.data = data
        self.scale = scale
        self.owned = owned  # allocated here (may be overwritten once consumed), not the caller's input
        self.count = 0
        self.mean: torch.Tensor | None = None  # [B, C] fp64
        self.m2: torch.Tensor | None = None  # [B, C] fp64, sum of squared deviations

    def add_stats(self, core: torch.Tensor, acc_device: torch.device) -> None:
        """Merge the statistics of one tile core (each pixel of the map is added exactly once)."""
        n = core.shape[-2] * core.shape[-1]
        # fp32 statistics; 16-bit tiles are widened a few channels at a time to keep the working set small
        step = _CHUNK if core.dtype != torch.float32 else core.shape[1]
        parts = [torch.var_mean(core[:, c:c + step].float(), dim=(-2, -1), unbiased=False)
                 for c in range(0, core.shape[1], step)]
        var, mean = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
        mean = mean.to(acc_device, torch.float64)
        m2 = var.to(acc_device, torch.float64) * n
        if self.count == 0:
            self.mean, self.m2 = mean, m2
        else:
            total = self.count + n
            delta = mean - self.mean
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + m2 + delta * delta * (self.count * n / total)
        self.count += n


class _Runner:
    """Drives all tiles through the network step by step; owns progress, interruption and parking."""

    def __init__(self, base_h: int, base_w: int, tile: int, device: torch.device, dtype: torch.dtype,
                 park: torch.device, progress: Progress | None, check_interrupt: Interrupt | None):
        ys, xs = _cuts(base_h, tile), _cuts(base_w, tile)
        self.cores = [(ys[i], ys[i + 1], xs[j], xs[j + 1]) for i in range(len(ys) - 1) for j in range(len(xs) - 1)]
        self.max_core = (max(b - a for a, b in itertools.pairwise(ys)), max(b - a for a, b in itertools.pairwise(xs)))
        self.h, self.w = base_h, base_w
        self.device, self.dtype, self.park = device, dtype, park
        self.acc_device = device if device.type != "mps" else torch.device("cpu")  # mps has no fp64
        self.progress, self.check_interrupt = progress, check_interrupt
        self.done, self.total = 0, 0

    @property
    def n_tiles(self) -> int:
        return len(self.cores)

    def check(self) -> None:
        if self.check_interrupt is not None:
            self.check_interrupt()

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def new_map(self, batch: int, channels: int, scale: int) -> _Map:
        data = torch.empty(batch, channels, self.h * scale, self.w * scale, dtype=self.dtype, device=self.park)
        return _Map(data, scale)

    def norm(self, norm: torch.nn.GroupNorm, source: _Map, t: torch.Tensor) -> torch.Tensor:
        """GroupNorm of a tile ``t`` of ``source`` with the whole map's statistics (fp32 math, like torch's)."""
        b, c = source.mean.shape
        g = norm.num_groups
        mean = source.mean.view(b, g, c // g)
        gmean = mean.mean(-1, keepdim=True)
        # group M2 = sum of the channel M2s + the spread of the channel means around the group mean
        spread = (mean - gmean).square().sum(-1, keepdim=True)
        gm2 = source.m2.view(b, g, c // g).sum(-1, keepdim=True) + source.count * spread
        inv = torch.rsqrt(gm2 / (source.count * (c // g)) + norm.eps)
        scale = inv.expand(b, g, c // g).reshape(b, c)
        shift = -gmean.expand(b, g, c // g).reshape(b, c) * scale
        if norm.weight is not None:
            w = norm.weight.detach().to(self.acc_device, torch.float64)
            scale, shift = scale * w, shift * w
        if norm.bias is not None:
            shift = shift + norm.bias.detach().to(self.acc_device, torch.float64)
        scale = scale.to(t.device, torch.float32)[:, :, None, None]
        shift = shift.to(t.device, torch.float32)[:, :, None, None]
        if t.dtype == torch.float32:
            return torch.addcmul(shift, t, scale)
        out = torch.empty_like(t)  # fp32 math (type promotion), rounded once, a few channels at a time
        for c in range(0, t.shape[1], _CHUNK):
            out[:, c:c + _CHUNK] = torch.addcmul(shift[:, c:c + _CHUNK], t[:, c:c + _CHUNK], scale[:, c:c + _CHUNK])
        return out

    def step(self, inputs: list[_Map], fn: Callable[..., torch.Tensor], out_channels: int, out_scale: int, *,
             halo: int = HALO, stats: bool = True, into: _Map | None = None) -> _Map:
        """Run ``fn`` on every tile (core + halo of each input, all at one scale) and park the output cores.

        ``into``: write the output cores over (the first ``out_channels`` channels of) this map's buffer instead
        of a new one. Only for an input that ``fn`` reads pointwise: each tile overwrites just its own core, after
        reading it, so the cores still to come are intact, and the neighbours' halo values it reads are unused.
        """
        s_in = inputs[0].scale
        hi, wi = self.h * s_in, self.w * s_in
        # one region shape for every tile (fewer kernel set-ups, batchable): the largest core plus both halos
        ly, lx = self.max_core[0] * s_in + 2 * halo, self.max_core[1] * s_in + 2 * halo
        if into is not None:
            out = _Map(into.data[:, :out_channels], out_scale)
        else:
            out = self.new_map(inputs[0].data.shape[0], out_channels, out_scale)
        for y0, y1, x0, x1 in self.cores:
            self.check()
            cy0, cx0 = y0 * s_in, x0 * s_in
            ry0, ry1 = _region(cy0, ly, hi, halo)
            rx0, rx1 = _region(cx0, lx, wi, halo)
            # contiguous device copies (the convs would make them anyway; also keeps CPU accounting honest)
            tiles = [m.data[:, :, ry0:ry1, rx0:rx1].to(self.device, self.dtype).contiguous() for m in inputs]
            y = fn(*tiles)
            del tiles
            if y.shape[-2:] != ((ry1 - ry0) * out_scale // s_in, (rx1 - rx0) * out_scale // s_in):
                raise RuntimeError(f"tiled VAE step returned {tuple(y.shape)} for a {ry1 - ry0}x{rx1 - rx0} tile")
            oy, ox = (cy0 - ry0) * out_scale // s_in, (cx0 - rx0) * out_scale // s_in
            ny, nx = (y1 - y0) * out_scale, (x1 - x0) * out_scale
            core = y[:, :, oy:oy + ny, ox:ox + nx]
            if stats:
                out.add_stats(core, self.acc_device)
            out.data[:, :, y0 * out_scale:y1 * out_scale, x0 * out_scale:x1 * out_scale].copy_(core)
            del y, core
            self.tick()
        return out

    # --- blocks -------------------------------------------------------------------------------------------------

    def resnet(self, blk: torch.nn.Module, x: _Map) -> _Map:
        """ResnetBlock (temb-free) as two steps: norm1-conv1, then norm2-conv2 + shortcut."""
        def first(t: torch.Tensor) -> torch.Tensor:
            return blk.conv1(F.silu(self.norm(blk.norm1, x, t), inplace=True))

        h = self.step([x], first, blk.conv1.out_channels, x.scale)

        def second(ht: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
            out = blk.conv2(blk.dropout(F.silu(self.norm(blk.norm2, h, ht), inplace=True)))
            if blk.in_channels != blk.out_channels:
                xt = blk.conv_shortcut(xt) if blk.use_conv_shortcut else blk.nin_shortcut(xt)
            return xt + out

        # an identity or 1x1 shortcut reads x pointwise: park the block output over x (one full-size map less;
        # when the block narrows the channels, in x's first channels)
        pointwise = blk.in_channels == blk.out_channels or not blk.use_conv_shortcut
        reuse = x if x.owned and pointwise and blk.out_channels <= blk.in_channels else None
        return self.step([h, x], second, blk.conv2.out_channels, x.scale, into=reuse)

    def attention(self, attn: torch.nn.Module, x: _Map) -> _Map:
        """AttnBlock, exact: global norm, then each query tile attends to every position (online softmax)."""
        c = x.data.shape[1]

        def qkv_fn(t: torch.Tensor) -> torch.Tensor:
            n = self.norm(attn.norm, x, t)
            return torch.cat([attn.q(n), attn.k(n), attn.v(n)], dim=1)

        qkv = self.step([x], qkv_fn, 3 * c, x.scale, halo=0, stats=False)
        keys = qkv.data[:, c:2 * c].flatten(2)  # [B, C, N] views of the parked map
        values = qkv.data[:, 2 * c:].flatten(2)
        if self.park != self.device:
            try:  # keys and values on the device once (2 maps at this resolution); else stream them per tile
                keys, values = keys.to(self.device), values.to(self.device)
            except _OOM:
                log.warning("tiled VAE: keys/values of the attention do not fit on %s; streaming them", self.device)
        scale = c ** -0.5
        # the residual reads x pointwise, so the output can overwrite it (see ``step``)
        out = _Map(x.data, x.scale) if x.owned else self.new_map(x.data.shape[0], c, x.scale)
        s = x.scale
        for y0, y1, x0, x1 in self.cores:
            self.check()
            region = (slice(None), slice(None), slice(y0 * s, y1 * s), slice(x0 * s, x1 * s))
            q = qkv.data[:, :c][region].to(self.device)
            th, tw = q.shape[-2:]
            q = q.flatten(2).transpose(1, 2).float() * scale  # [B, nq, C]
            nq = q.shape[1]
            chunk = max(64, min(4 * nq, _ATTN_SCORE_BUDGET // nq))  # bounded by the tile, not the image
            m = torch.full((q.shape[0], nq, 1), -math.inf, device=self.device)
            denom = torch.zeros((q.shape[0], nq, 1), device=self.device)
            acc = torch.zeros_like(q)
            for k0 in range(0, keys.shape[-1], chunk):
                kc = keys[..., k0:k0 + chunk].to(self.device).float()  # [B, C, nk]
                vc = values[..., k0:k0 + chunk].to(self.device).float()
                sc = torch.bmm(q, kc)  # [B, nq, nk]
                m_new = torch.maximum(m, sc.amax(-1, keepdim=True))
                sc = torch.exp(sc - m_new)
                corr = torch.exp(m - m_new)
                denom = denom * corr + sc.sum(-1, keepdim=True)
                acc = acc * corr + torch.bmm(sc, vc.transpose(1, 2))
                m = m_new
                del kc, vc, sc
            o = (acc / denom).transpose(1, 2).reshape(q.shape[0], c, th, tw).to(self.dtype)
            del q, acc, denom, m
            res = x.data[region].to(self.device) + attn.proj_out(o)
            out.add_stats(res, self.acc_device)
            out.data[region].copy_(res)
            del o, res
            self.tick()
        return out

    def mid(self, mid: torch.nn.Module, whole_input: Callable[[], torch.Tensor], tiled_input: Callable[[], _Map],
            whole: bool | None, tiled_units: int, what: str) -> _Map:
        """The mid block on the whole latent-size map if it fits (``whole`` None: try it, else tiles; exact either way)."""
        if whole is not False:
            self.check()
            try:
                h = whole_input()
                h = mid.block_2(mid.attn_1(mid.block_1(h, None)), None)
                out = _Map(h.to(self.park), 1)
                out.add_stats(h, self.acc_device)
                self.tick()
                return out
            except _OOM:
                if whole:
                    raise
                log.warning("tiled %s: the mid block does not fit on %s as a whole; running it tiled (exact)",
                            what, self.device)
                self.total += tiled_units - 1
        x = self.resnet(mid.block_1, tiled_input())
        x = self.attention(mid.attn_1, x)
        return self.resnet(mid.block_2, x)


def _one_piece(fn: Callable[[], torch.Tensor], progress: Progress | None, check_interrupt: Interrupt | None
               ) -> torch.Tensor:
    """The plain (untiled) path, with the same progress/interrupt contract as the tiled one."""
    if check_interrupt is not None:
        check_interrupt()
    out = fn()
    if progress is not None:
        progress(1, 1)
    return out


def _resnet_steps(n_blocks: int, n_attn: int) -> int:
    return 2 * n_blocks + 2 * n_attn


_SD_VAE = "Connect the VAE of the SD 2.1-base checkpoint."


def _check_layout(net: torch.nn.Module, x: torch.Tensor, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"tiled {what} expects a 4-D [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    for name in ("conv_in", "mid", "norm_out", "conv_out"):
        if not hasattr(net, name):
            raise PisaError(f"this VAE is not an SD-style autoencoder ({type(net).__name__} has no .{name}). {_SD_VAE}")
    if getattr(net, "conv3d", False) or type(net.conv_in).__name__ == "VideoConv3d":
        raise PisaError(f"video (3-D) VAEs are not supported. {_SD_VAE}")


@torch.no_grad()
def tiled_decode(ae: torch.nn.Module, z: torch.Tensor, tile: int, *, progress: Progress | None = None,
                 check_interrupt: Interrupt | None = None, whole_mid: bool | None = None,
                 offload_device: torch.device | str = "cpu") -> torch.Tensor:
    """Decode raw latent ``z`` [B,4,h,w] with ComfyUI's ``AutoencoderKL`` ``ae`` in tiles of ``tile`` latent px.

    Returns the unclamped decoder output [B,3,8h,8w] on ``z``'s device and dtype, equal to ``ae.decode(z)`` up to
    float error. ``z`` must already be on the model's compute device and dtype. ``whole_mid``: None runs the mid
    block (attention) on the whole latent-size map and falls back to the exact tiled attention on a device
    out-of-memory error; True/False force either. ``offload_device`` holds the parked full-size maps between steps.
    ``progress(done, total)`` is called after every tile step, ``check_interrupt()`` before each (it raises to stop).
    """
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    dec = ae.decoder
    _check_layout(dec, z, "decode")
    h, w = z.shape[-2:]
    if h <= tile and w <= tile:
        return _one_piece(lambda: ae.decode(z), progress, check_interrupt)
    if getattr(ae, "bn", None) is not None:
        raise PisaError(f"VAEs with a latent batch-norm are not supported. {_SD_VAE}")
    if getattr(dec, "give_pre_end", False):
        raise PisaError(f"decoders with give_pre_end are not supported. {_SD_VAE}")

    run = _Runner(h, w, tile, z.device, z.dtype, torch.device(offload_device), progress, check_interrupt)
    levels = list(reversed(range(dec.num_resolutions)))
    per_tile = 1  # norm_out + conv_out
    for i in levels:
        up = dec.up[i]
        per_tile += _resnet_steps(len(up.block), len(up.attn)) + (1 if i != 0 else 0)
    mid_tiled_units = run.n_tiles * (1 + _resnet_steps(2, 1))
    run.total = run.n_tiles * per_tile + (mid_tiled_units if whole_mid is False else 1)

    def conv_in(t: torch.Tensor) -> torch.Tensor:
        return dec.conv_in(ae.post_quant_conv(t))

    x = run.mid(dec.mid, lambda: conv_in(z),
                lambda: run.step([_Map(z, 1, owned=False)], conv_in, dec.conv_in.out_channels, 1),
                whole_mid, mid_tiled_units, "decode")

    scale = 1
    for i in levels:
        up = dec.up[i]
        for j, blk in enumerate(up.block):
            x = run.resnet(blk, x)
            if len(up.attn) > 0:
                x = run.attention(up.attn[j], x)
        if i != 0:
            ch = x.data.shape[1]
            x = run.step([x], up.upsample, ch, scale * 2)
            scale *= 2

    def final(t: torch.Tensor) -> torch.Tensor:
        y = dec.conv_out(F.silu(run.norm(dec.norm_out, x, t), inplace=True))
        return torch.tanh(y) if getattr(dec, "tanh_out", False) else y

    out = run.step([x], final, dec.conv_out.out_channels, scale, stats=False)
    return out.data.to(z.device)


@torch.no_grad()
def tiled_encode(ae: torch.nn.Module, x: torch.Tensor, tile: int, *, progress: Progress | None = None,
                 check_interrupt: Interrupt | None = None, whole_mid: bool | None = None,
                 offload_device: torch.device | str = "cpu", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """Encode ``x`` [B,3,H,W] in [-1,1] (H, W multiples of 8) in tiles of about ``tile`` image px.

    Returns the raw latent [B,4,H/8,W/8] (the posterior mode: the mean half of ``quant_conv(encoder(x))``) on the
    compute device, equal to ComfyUI's ``VAE.encode`` before latent scaling, up to float error. The compute device
    and dtype default to ``x``'s (``x`` may also stay on the CPU with ``device``/``dtype`` naming the model's).
    Tile cores are multiples of 8 px so every downsampling stays aligned. ``whole_mid``,
    ``offload_device``, ``progress`` and ``check_interrupt`` are as in :func:`tiled_decode`.
    """
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    enc = ae.encoder
    _check_layout(enc, x, "encode")
    hh, ww = x.shape[-2:]
    if hh % 8 or ww % 8:
        raise ValueError(f"tiled encode needs H and W divisible by 8, got {hh}x{ww}")
    device = torch.device(device) if device is not None else x.device
    dtype = dtype or x.dtype
    factor = 2 ** (enc.num_resolutions - 1)
    if factor != 8:
        raise PisaError(f"this VAE downsamples {factor}x, not 8x like SD's. {_SD_VAE}")
    h, w = hh // 8, ww // 8
    ltile = max(1, tile // 8)
    if h <= ltile and w <= ltile:
        return _one_piece(lambda: ae.encode(x.to(device, dtype)), progress, check_interrupt)
    if getattr(ae, "bn", None) is not None:
        raise PisaError(f"VAEs with a latent batch-norm are not supported. {_SD_VAE}")

    run = _Runner(h, w, ltile, device, dtype, torch.device(offload_device), progress, check_interrupt)
    per_tile = 2  # conv_in; norm_out + conv_out + quant_conv
    for i in range(enc.num_resolutions):
        down = enc.down[i]
        per_tile += _resnet_steps(len(down.block), len(down.attn)) + (1 if i != enc.num_resolutions - 1 else 0)
    mid_tiled_units = run.n_tiles * _resnet_steps(2, 1)
    run.total = run.n_tiles * per_tile + (mid_tiled_units if whole_mid is False else 1)

    scale = 8
    h_map = run.step([_Map(x, scale, owned=False)], enc.conv_in, enc.conv_in.out_channels, scale)
    for i in range(enc.num_resolutions):
        down = enc.down[i]
        for j, blk in enumerate(down.block):
            h_map = run.resnet(blk, h_map)
            if len(down.attn) > 0:
                h_map = run.attention(down.attn[j], h_map)
        if i != enc.num_resolutions - 1:
            h_map = run.step([h_map], down.downsample, h_map.data.shape[1], scale // 2)
            scale //= 2

    pre_mid = h_map
    h_map = run.mid(enc.mid, lambda: pre_mid.data.to(device), lambda: pre_mid, whole_mid, mid_tiled_units, "encode")

    def final(t: torch.Tensor) -> torch.Tensor:
        return ae.quant_conv(enc.conv_out(F.silu(run.norm(enc.norm_out, h_map, t), inplace=True)))

    moments = run.step([h_map], final, ae.quant_conv.out_channels, 1, stats=False).data
    if type(getattr(ae, "regularization", None)).__name__ == "DiagonalGaussianRegularizer":
        moments = moments[:, : moments.shape[1] // 2]  # the posterior mode is its mean
    return moments.to(device).contiguous()


# --- automatic tile size --------------------------------------------------------------------------------------

# Untiled peaks, ComfyUI's own figures for the SD VAE (base 128 channels): decode 2178 * 64 bytes per latent px,
# encode 1767 per image px, times the dtype size.
_PLAIN_DECODE = 2178 * 64
_PLAIN_ENCODE = 1767
# Tiled working set, in copies of a tile's C-channel region at full resolution: measured on the CPU with live-tensor
# accounting for the full-size SD VAE (tests/test_vae_tiled.py's _LiveBytes), 6.0 for decode (the step that
# upsamples 2C channels into the top level) and 4.0 for encode, in fp32 and bf16 alike (16-bit tiles are widened
# to fp32 only a few channels at a time); one copy of margin each.
_TILE_COPIES = {True: 7, False: 5}
# Whole-map mid block at latent resolution, 4x the base channels: input, norm output, q/k/v and their transposed
# copies in ComfyUI's attention, attention output, residual.
_MID_COPIES = 10
# Device allocator rounding/fragmentation and convolution workspaces, which CPU accounting does not see.
_SAFETY = 1.5


def _tile_bytes(tile: int, *, is_decoder: bool, dtype_bytes: int, base_channels: int) -> float:
    region = (tile * 8 if is_decoder else tile) + 2 * HALO
    return _TILE_COPIES[is_decoder] * base_channels * region * region * dtype_bytes


def _mid_bytes(width: int, height: int, *, is_decoder: bool, dtype_bytes: int, base_channels: int) -> float:
    lat_w, lat_h = (width, height) if is_decoder else (max(1, width // 8), max(1, height // 8))
    return _MID_COPIES * 4 * base_channels * lat_w * lat_h * dtype_bytes


def _tiled_peak(tile: int, width: int, height: int, *, is_decoder: bool, dtype_bytes: int, base_channels: int) -> float:
    kw = {"is_decoder": is_decoder, "dtype_bytes": dtype_bytes, "base_channels": base_channels}
    return _SAFETY * (_tile_bytes(tile, **kw) + _mid_bytes(width, height, **kw))


def auto_tile_size(free_bytes: int, width: int, height: int, *, is_decoder: bool, dtype_bytes: int,
                   base_channels: int = 128) -> int:
    """Largest tile (latent px for decode, image px for encode) whose estimated device peak fits ``free_bytes``.

    ``width``/``height`` are in the same unit as the tile. Returns ``max(width, height)`` (one tile: the plain
    path) when the untiled peak fits, using ComfyUI's own per-pixel figures for the SD VAE scaled by
    ``base_channels / 128``. Otherwise the tiled estimate is
    ``1.5 * (k * C * R^2 + 10 * 4C * latent_area) * dtype_bytes``: k = 7 (decode) or 5 (encode) copies of a tile's
    C-channel region ``R = 8T + 4`` px (decode; ``T + 4`` for encode), measured at 6 and 4, plus the whole-map
    mid block (ten 4C-channel latent-size maps); 1.5 covers the device allocator and conv workspaces. Decode tiles are
    multiples of 8 latent px, encode tiles of 64 image px; the minimum (16 / 128) is returned even if it does not
    fit, and the caller retries smaller on an out-of-memory error (the mid block then falls back to tiles by
    itself). Device memory only: the parked maps live in host memory, about three C-channel full-resolution maps
    (``3 * C * 64 * latent_area * dtype_bytes``, 13 GB for a 4096 px square in 16-bit).
    """
    if width <= 0 or height <= 0 or dtype_bytes <= 0:
        raise ValueError("width, height and dtype_bytes must be positive")
    scale = base_channels / 128
    if is_decoder:
        plain = _PLAIN_DECODE * width * height * dtype_bytes * scale
    else:
        plain = _PLAIN_ENCODE * width * height * dtype_bytes * scale
    whole = max(width, height)
    if plain <= free_bytes:
        return whole
    step, smallest = (8, 16) if is_decoder else (64, 128)
    tile = (whole // step) * step
    while tile > smallest:
        if _tiled_peak(tile, width, height, is_decoder=is_decoder, dtype_bytes=dtype_bytes,
                       base_channels=base_channels) <= free_bytes:
            return tile
        tile -= step
    return min(whole, smallest)


def parked_bytes(width: int, height: int, *, is_decoder: bool, dtype_bytes: int, base_channels: int = 128) -> int:
    """Peak size of the maps parked on ``offload_device`` between steps (``width``/``height`` as for the tile).

    At most three C-channel full-resolution maps are alive at once for decode (the wider upsampled map plus a
    block's hidden map; block outputs overwrite their input), two for encode, plus the input and output. If this
    fits on the compute device next to the tiled peak, parking there (``offload_device=device``) avoids all
    host transfers and still needs far less than an untiled decode.
    """
    px = width * height * (64 if is_decoder else 1)
    maps = 3 if is_decoder else 2
    return int((maps * base_channels + 3) * px * dtype_bytes)
