"""GroupNorm-synchronised tiled encode/decode for the SD 1.x/2.x autoencoder (LDM layout), exact vs untiled.

Tiles run independently each get their own GroupNorm statistics (colour shifts, seams), and averaging per-tile
variances (the release's tiled VAE) drops the spread between tile means. Here all tiles advance together one
*step* at a time, a step being everything between two GroupNorms (norm -> SiLU -> at most one 3x3 conv, plus
shortcut or resampling). After each step the tile cores are parked in a full-size map (``park.Parking``: memory
within a budget, else a memory-mapped file) and
per-channel count/mean/M2 are merged across tiles (Chan's formula, fp64 on the CPU), so the next GroupNorm uses the whole
image's statistics. A tile reads its core plus a HALO from the parked map, enough for one 3x3 conv, and sees the
untiled network's zero padding at the border: tiled == untiled up to float error, with no blending. The mid
block runs on the whole (1/8-side) map when the caller says it fits, else tiled; its attention is exact either way:
tiled, blocks of queries attend to every key, the keys/values read from the parked map in chunks and the chunks'
results merged by their log-sum-exp (``_attend``), so the attention's working set is one tile's, whatever the image.

Device memory scales with the tile (plus the whole-map mid block when it runs whole), the parked maps with the image
(``parked_bytes``), held within the parking's budget.
Only GroupNorm is re-implemented; convs, resamplers and mid blocks run through their own ``forward`` so ComfyUI's
casting ops keep working. Nothing is patched, so an interruption leaves no state.
"""
from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from .errors import PisaError
from .park import Parking
from .runtime import host64, is_oom

log = logging.getLogger("PiSA-SR")

# Context (px, at each step's input resolution) read around a tile core: one 3x3 conv needs 1 px, and a stride-2
# downsample needs its window to start on an even pixel.
HALO = 2

_CHUNK = 32  # channels widened to fp32 at once for the norm/statistics of 16-bit tiles
_SD_VAE = "Connect the VAE of the SD 2.1-base checkpoint."

Progress = Callable[[int, int], None]
Interrupt = Callable[[], None]


def _cuts(length: int, tile: int) -> list[int]:
    """A balanced partition of ``range(length)`` into ``ceil(length / tile)`` pieces: cores must not overlap (each
    pixel counted once in the statistics), and balanced pieces avoid a sliver tile at the end."""
    n = max(1, math.ceil(length / max(1, tile)))
    return [i * length // n for i in range(n + 1)]


def _region(c0: int, length: int, size: int, halo: int) -> tuple[int, int]:
    """Window of ``length`` px (clipped to ``size``) around the core at ``c0`` with ``halo`` px of context, shifted
    inwards at an edge (not shortened) so the convs see the untiled network's zero padding there."""
    start = min(max(c0 - halo, 0), max(size - length, 0))
    return start, min(size, start + length)


class _Map:
    """A full-size activation (parked) at ``scale`` x the base grid, with per-channel running statistics."""

    def __init__(self, data: torch.Tensor, scale: int, owned: bool = True):
        self.data = data
        self.scale = scale
        self.owned = owned  # allocated here (may be overwritten once consumed), not the caller's input
        self.count = 0
        self.mean: torch.Tensor | None = None  # [B, C] fp64, CPU
        self.m2: torch.Tensor | None = None  # [B, C] fp64, CPU, sum of squared deviations
        self.affine: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per norm: fp32 scale, shift (stats final)

    def add_stats(self, core: torch.Tensor) -> None:
        """Merge the statistics of one tile core (each pixel of the map is added exactly once), in fp64 on the CPU."""
        n = core.shape[-2] * core.shape[-1]
        # fp32 statistics; 16-bit tiles are widened a few channels at a time to keep the working set small
        step = _CHUNK if core.dtype != torch.float32 else core.shape[1]
        parts = [torch.var_mean(core[:, c:c + step].float(), dim=(-2, -1), unbiased=False)
                 for c in range(0, core.shape[1], step)]
        var, mean = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
        mean, m2 = host64(mean), host64(var) * n
        if self.count == 0:
            self.mean, self.m2 = mean, m2
        else:
            total = self.count + n
            delta = mean - self.mean
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + m2 + delta * delta * (self.count * n / total)
        self.count += n


class _Runner:
    """Drives all tiles through the network step by step; owns progress, interruption and parking. ``work``: the
    bytes one tile's working set may take (``_tile_bytes``), the allowance of the tiled attention too."""

    def __init__(self, base_h: int, base_w: int, tile: int, device: torch.device, dtype: torch.dtype,
                 parking: Parking, progress: Progress | None, check_interrupt: Interrupt | None, work: float):
        ys, xs = _cuts(base_h, tile), _cuts(base_w, tile)
        self.cores = [(ys[i], ys[i + 1], xs[j], xs[j + 1]) for i in range(len(ys) - 1) for j in range(len(xs) - 1)]
        self.max_core = (max(b - a for a, b in itertools.pairwise(ys)), max(b - a for a, b in itertools.pairwise(xs)))
        self.h, self.w = base_h, base_w
        self.device, self.dtype, self.parking, self.park = device, dtype, parking, parking.device
        self.progress, self.check_interrupt = progress, check_interrupt
        self.done, self.total = 0, 0
        self.work = work

    def attention_blocks(self, channels: int, scale: int) -> tuple[int, int]:
        """(query block, key/value chunk) in tokens for a tiled attention over the map at ``scale``."""
        return attention_blocks(self.h * scale * self.w * scale, channels, self.dtype.itemsize, self.work,
                                streamed_lse=_lse_kernel(self.device) is not None)

    def units(self, levels: list[torch.nn.Module], scale: int, up: bool) -> int:
        """Progress units of ``levels`` entered at ``scale``: a tile step per resnet half and per resampler; per
        attention a tile step (q/k/v) and its query blocks."""
        n, total = len(self.cores), 0
        for lvl in levels:
            total += 2 * n * len(lvl.block)
            for a in lvl.attn:
                total += n + self.attention_units(a, scale)
            if lvl is not levels[-1]:
                total += n
                scale = scale * 2 if up else scale // 2
        return total

    def attention_units(self, attn: torch.nn.Module, scale: int) -> int:
        n = self.h * scale * self.w * scale
        return -(-n // self.attention_blocks(attn.norm.num_channels, scale)[0])

    def check(self) -> None:
        if self.check_interrupt is not None:
            self.check_interrupt()

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def new_map(self, batch: int, channels: int, scale: int) -> _Map:
        return _Map(self.parking.empty((batch, channels, self.h * scale, self.w * scale), self.dtype), scale)

    def norm(self, norm: torch.nn.GroupNorm, source: _Map, t: torch.Tensor) -> torch.Tensor:
        """GroupNorm of a tile ``t`` of ``source`` with the whole map's statistics (fp32 math, like torch's)."""
        if id(norm) not in source.affine:  # once per step, not per tile
            source.affine[id(norm)] = self._affine(norm, source)
        scale, shift = source.affine[id(norm)]
        if t.dtype == torch.float32:
            return torch.addcmul(shift, t, scale)
        out = torch.empty_like(t)  # fp32 math (type promotion), rounded once, a few channels at a time
        for c in range(0, t.shape[1], _CHUNK):
            out[:, c:c + _CHUNK] = torch.addcmul(shift[:, c:c + _CHUNK], t[:, c:c + _CHUNK], scale[:, c:c + _CHUNK])
        return out

    def _affine(self, norm: torch.nn.GroupNorm, source: _Map) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel fp32 scale and shift [B, C, 1, 1] that GroupNorm with ``source``'s statistics applies."""
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
            w = host64(norm.weight)
            scale, shift = scale * w, shift * w
        if norm.bias is not None:
            shift = shift + host64(norm.bias)
        return (scale.float().to(self.device)[:, :, None, None], shift.float().to(self.device)[:, :, None, None])

    def step(self, inputs: list[_Map], fn: Callable[..., torch.Tensor], out_channels: int, out_scale: int, *,
             halo: int = HALO, stats: bool = True, into: _Map | None = None, last: bool = False) -> _Map:
        """Run ``fn`` on every tile (core + halo of each input, all at one scale) and park the output cores.

        ``into``: park them over (the first ``out_channels`` channels of) this map, only for an input ``fn`` reads
        pointwise: each tile overwrites just its own core after reading it, and its halo values are unused.
        ``last``: the network's output, written to an ordinary CPU tensor (the caller's result, not parked).
        """
        s_in = inputs[0].scale
        hi, wi = self.h * s_in, self.w * s_in
        # one region shape for every tile (fewer kernel set-ups, batchable): the largest core plus both halos
        ly, lx = self.max_core[0] * s_in + 2 * halo, self.max_core[1] * s_in + 2 * halo
        if into is not None:
            out = _Map(into.data[:, :out_channels], out_scale)
        elif last:
            out = _Map(torch.empty(inputs[0].data.shape[0], out_channels, self.h * out_scale, self.w * out_scale,
                                   dtype=self.dtype), out_scale)
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
                out.add_stats(core)
            out.data[:, :, y0 * out_scale:y1 * out_scale, x0 * out_scale:x1 * out_scale].copy_(core)
            del y, core
            self.parking.trim()
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

        # an identity or 1x1 shortcut reads x pointwise: park the output over x (one full-size map less; narrower
        # outputs in x's first channels)
        pointwise = blk.in_channels == blk.out_channels or not blk.use_conv_shortcut
        reuse = x if x.owned and pointwise and blk.out_channels <= blk.in_channels else None
        return self.step([h, x], second, blk.conv2.out_channels, x.scale, into=reuse)

    def attention(self, attn: torch.nn.Module, x: _Map) -> _Map:
        """AttnBlock, exact: global norm and q/k/v in tiles (parked), then blocks of queries attend to every key,
        the keys/values read from the parked map a chunk at a time (``attention_blocks``: within ``work``)."""
        c = x.data.shape[1]

        def qkv_fn(t: torch.Tensor) -> torch.Tensor:
            n = self.norm(attn.norm, x, t)
            return torch.cat([attn.q(n), attn.k(n), attn.v(n)], dim=1)

        qkv = self.step([x], qkv_fn, 3 * c, x.scale, halo=0, stats=False)
        # [B, C, N] token views of the maps (both layouts a map has, NCHW and channels-last, have one)
        b, n = x.data.shape[0], x.data.shape[-2] * x.data.shape[-1]
        flat, x_flat = qkv.data.view(b, 3 * c, n), x.data.view(b, c, n)
        q_len, kv_len = self.attention_blocks(c, x.scale)

        def tokens(part: int, t0: int, t1: int) -> torch.Tensor:  # [B, 1, t1 - t0, C] contiguous, on the device
            return flat[:, part * c:(part + 1) * c, t0:t1].transpose(1, 2).unsqueeze(1).to(self.device).contiguous()

        def chunks():  # the keys/values, a chunk at a time, their pages dropped after each
            for k0 in range(0, n, kv_len):
                yield tokens(1, k0, min(n, k0 + kv_len)), tokens(2, k0, min(n, k0 + kv_len))
                self.parking.trim()

        whole = (tokens(1, 0, n), tokens(2, 0, n)) if kv_len >= n else None  # read once for every block
        self.parking.trim()
        # the residual reads x pointwise, so the output can overwrite it (see ``step``)
        out = _Map(x.data, x.scale) if x.owned else self.new_map(b, c, x.scale)
        out_flat = out.data.view(b, c, n)
        for q0 in range(0, n, q_len):
            self.check()
            q1 = min(n, q0 + q_len)
            q = tokens(0, q0, q1)
            o = F.scaled_dot_product_attention(q, *whole) if whole else _attend(q, chunks())
            del q
            self.parking.trim()
            # [B, 1, T, C] -> [B, C, T, 1]: the 1x1 convolution over a column of tokens
            o = o.squeeze(1).transpose(1, 2)[..., None].contiguous()
            res = x_flat[:, :, q0:q1, None].to(self.device) + attn.proj_out(o)
            del o
            out.add_stats(res)
            out_flat[:, :, q0:q1].copy_(res[..., 0])
            del res
            self.parking.trim()
            self.tick()
        return out

    def levels(self, levels: list[torch.nn.Module], x: _Map, up: bool) -> _Map:
        """Each level's resnet blocks (each followed by its attention, if any), then its resampler but the last's."""
        for lvl in levels:
            for j, blk in enumerate(lvl.block):
                x = self.resnet(blk, x)
                if len(lvl.attn) > 0:
                    x = self.attention(lvl.attn[j], x)
            if lvl is not levels[-1]:
                resample, scale = (lvl.upsample, x.scale * 2) if up else (lvl.downsample, x.scale // 2)
                x = self.step([x], resample, x.data.shape[1], scale)
        return x

    def mid(self, mid: torch.nn.Module, whole_input: Callable[[], torch.Tensor], tiled_input: Callable[[], _Map],
            whole: bool | None, tiled_units: int, what: str) -> _Map:
        """The mid block on the whole latent-size map if it fits (``whole`` None: try, else tiles; exact either way)."""
        if whole is not False:
            self.check()
            try:
                h = mid.block_2(_whole_attention(mid.attn_1, mid.block_1(whole_input(), None)), None)
                out = self.new_map(h.shape[0], h.shape[1], 1)
                out.data.copy_(h)
                out.add_stats(h)
                del h
                self.tick()
                return out
            except Exception as e:
                if whole or not is_oom(e):
                    raise
                del e  # its traceback holds the failed try's activations
                log.warning("tiled %s: the mid block does not fit on %s as a whole; running it tiled (exact)",
                            what, self.device)
                self.total += tiled_units - 1
        x = self.resnet(mid.block_1, tiled_input())
        x = self.attention(mid.attn_1, x)
        return self.resnet(mid.block_2, x)


def _lse_kernel(device: torch.device) -> Callable | None:
    """PyTorch's CPU flash-attention kernel, the one scaled_dot_product_attention runs on the CPU, which also returns
    the log-sum-exp a chunked attention merges by; None elsewhere (or in a torch without it): ``_chunk`` then uses
    matmuls. On the CPU it was the faster of the two for the chunk shapes used (bench/bench_vae.py --attention)."""
    if device.type != "cpu":
        return None
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of tokens ``q`` [B,1,T,C] over one chunk of keys/values: (output fp32, log-sum-exp [B,1,T,1])."""
    kernel = _lse_kernel(q.device)
    if kernel is not None:
        o, lse = kernel(q, k, v)[:2]
        return o.float(), lse.unsqueeze(-1)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    lse = torch.logsumexp(s, -1, keepdim=True)
    return torch.matmul(s.sub_(lse).exp_(), v.float()), lse


def _attend(q: torch.Tensor, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """softmax(q k^T / sqrt(C)) v for tokens ``q`` [B,1,T,C] over keys/values given in ``chunks`` (pairs [B,1,K,C]
    that together hold every key, one pair alive at a time): the chunks' results merged by their log-sum-exp in fp32,
    equal to scaled_dot_product_attention over all keys up to float rounding."""
    acc = lse = None
    for k, v in chunks:
        o, part = _chunk(q, k, v)
        del k, v
        if acc is None:
            acc, lse = o, part
            continue
        new = torch.logaddexp(lse, part)
        acc.mul_(torch.exp(lse - new)).add_(o.mul_(torch.exp(part - new)))
        lse = new
        del o, part
    return acc.to(q.dtype)


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 1, H*W, C] contiguous, the layout scaled_dot_product_attention is fastest with."""
    return t.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()


def _untokens(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t.squeeze(1).transpose(1, 2).reshape(shape)


def _whole_attention(attn: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """AttnBlock on a whole map with scaled-dot-product attention (what ComfyUI's ``pytorch_attention`` computes),
    whatever attention ComfyUI picked for the VAE: its sliced one sizes itself from free memory, not the budget."""
    n = attn.norm(h)
    q, k, v = (_tokens(f(n)) for f in (attn.q, attn.k, attn.v))
    del n
    o = _untokens(F.scaled_dot_product_attention(q, k, v), h.shape)
    del q, k, v
    return h + attn.proj_out(o)


def _check(net: torch.nn.Module, x: torch.Tensor, tile: int, what: str) -> None:
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    if x.ndim != 4:
        raise ValueError(f"tiled {what} expects a 4-D [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    for name in ("conv_in", "mid", "norm_out", "conv_out"):
        if not hasattr(net, name):
            raise PisaError(f"this VAE is not an SD-style autoencoder ({type(net).__name__} has no .{name}). {_SD_VAE}")
    if getattr(net, "conv3d", False) or type(net.conv_in).__name__ == "VideoConv3d":
        raise PisaError(f"video (3-D) VAEs are not supported. {_SD_VAE}")


def _one_piece(fn: Callable[[], torch.Tensor], progress: Progress | None, check_interrupt: Interrupt | None
               ) -> torch.Tensor:
    """The plain (untiled) path, with the same progress/interrupt contract as the tiled one."""
    if check_interrupt is not None:
        check_interrupt()
    out = fn()
    if progress is not None:
        progress(1, 1)
    return out


@torch.no_grad()
def tiled_decode(ae: torch.nn.Module, z: torch.Tensor, tile: int, *, progress: Progress | None = None,
                 check_interrupt: Interrupt | None = None, whole_mid: bool | None = None,
                 parking: Parking | None = None) -> torch.Tensor:
    """``ae.decode(z)`` (ComfyUI's ``AutoencoderKL``, unclamped [B,3,8h,8w]) in tiles of ``tile`` latent px, up to
    float error; ``z`` on the model's device and dtype; the result on the CPU when tiled (the caller's next stop).
    ``whole_mid``: None runs the mid block on the whole map and falls back to tiles on a device OOM, True/False
    force either. ``parking`` holds the parked maps (default: RAM, unlimited); a budget it cannot meet is refused
    before any work. ``progress(done, total)`` is called after every tile step, ``check_interrupt()`` before each
    (it raises to stop).
    """
    dec = ae.decoder
    _check(dec, z, tile, "decode")
    h, w = z.shape[-2:]
    if h <= tile and w <= tile:
        return _one_piece(lambda: ae.decode(z), progress, check_interrupt)
    if getattr(ae, "bn", None) is not None:
        raise PisaError(f"VAEs with a latent batch-norm are not supported. {_SD_VAE}")
    if getattr(dec, "give_pre_end", False):
        raise PisaError(f"decoders with give_pre_end are not supported. {_SD_VAE}")

    parking = parking or Parking()
    base = dec.conv_out.in_channels
    parking.prepare(parked_bytes(w, h, is_decoder=True, dtype_bytes=z.dtype.itemsize, base_channels=base))
    run = _Runner(h, w, tile, z.device, z.dtype, parking, progress, check_interrupt,
                  _tile_bytes(tile, is_decoder=True, dtype_bytes=z.dtype.itemsize, base_channels=base))
    levels = [dec.up[i] for i in reversed(range(dec.num_resolutions))]
    # conv_in + two resnet blocks + attention, tiled
    mid_units = len(run.cores) * 6 + run.attention_units(dec.mid.attn_1, 1)
    run.total = len(run.cores) + run.units(levels, 1, up=True) + (mid_units if whole_mid is False else 1)

    def conv_in(t: torch.Tensor) -> torch.Tensor:
        return dec.conv_in(ae.post_quant_conv(t))

    x = run.mid(dec.mid, lambda: conv_in(z),
                lambda: run.step([_Map(z, 1, owned=False)], conv_in, dec.conv_in.out_channels, 1),
                whole_mid, mid_units, "decode")
    x = run.levels(levels, x, up=True)

    def final(t: torch.Tensor) -> torch.Tensor:
        y = dec.conv_out(F.silu(run.norm(dec.norm_out, x, t), inplace=True))
        return torch.tanh(y) if getattr(dec, "tanh_out", False) else y

    return run.step([x], final, dec.conv_out.out_channels, x.scale, stats=False, last=True).data


@torch.no_grad()
def tiled_encode(ae: torch.nn.Module, x: torch.Tensor, tile: int, *, progress: Progress | None = None,
                 check_interrupt: Interrupt | None = None, whole_mid: bool | None = None,
                 parking: Parking | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """The raw latent [B,4,H/8,W/8] (posterior mode, ComfyUI's ``VAE.encode`` before scaling) of ``x`` [B,3,H,W]
    in [-1,1] in the model's dtype, H and W multiples of 8, in tiles of about ``tile`` image px (multiples of 8), up
    to float error, on ``device`` (the model's; default ``x``'s). ``x`` may stay on the CPU: only tiles of it go to
    the device. The result is on the CPU when tiled; the rest as in :func:`tiled_decode`.
    """
    enc = ae.encoder
    _check(enc, x, tile, "encode")
    hh, ww = x.shape[-2:]
    if hh % 8 or ww % 8:
        raise ValueError(f"tiled encode needs H and W divisible by 8, got {hh}x{ww}")
    device, dtype = torch.device(device or x.device), x.dtype
    factor = 2 ** (enc.num_resolutions - 1)
    if factor != 8:
        raise PisaError(f"this VAE downsamples {factor}x, not 8x like SD's. {_SD_VAE}")
    h, w, ltile = hh // 8, ww // 8, max(1, tile // 8)
    if h <= ltile and w <= ltile:
        return _one_piece(lambda: ae.encode(x.to(device)), progress, check_interrupt)
    if getattr(ae, "bn", None) is not None:
        raise PisaError(f"VAEs with a latent batch-norm are not supported. {_SD_VAE}")

    parking = parking or Parking()
    base = enc.conv_in.out_channels
    parking.prepare(parked_bytes(ww, hh, is_decoder=False, dtype_bytes=dtype.itemsize, base_channels=base))
    run = _Runner(h, w, ltile, device, dtype, parking, progress, check_interrupt,
                  _tile_bytes(ltile * 8, is_decoder=False, dtype_bytes=dtype.itemsize, base_channels=base))
    levels = [enc.down[i] for i in range(enc.num_resolutions)]
    mid_units = len(run.cores) * 5 + run.attention_units(enc.mid.attn_1, 1)  # two resnet blocks + attention, tiled
    run.total = len(run.cores) * 2 + run.units(levels, 8, up=False) + (mid_units if whole_mid is False else 1)

    pre = run.levels(levels, run.step([_Map(x, 8, owned=False)], enc.conv_in, enc.conv_in.out_channels, 8), up=False)
    mid = run.mid(enc.mid, lambda: pre.data.to(device), lambda: pre, whole_mid, mid_units, "encode")

    def final(t: torch.Tensor) -> torch.Tensor:
        return ae.quant_conv(enc.conv_out(F.silu(run.norm(enc.norm_out, mid, t), inplace=True)))

    moments = run.step([mid], final, ae.quant_conv.out_channels, 1, stats=False, last=True).data
    if type(getattr(ae, "regularization", None)).__name__ == "DiagonalGaussianRegularizer":
        moments = moments[:, : moments.shape[1] // 2]  # the posterior mode is its mean
    return moments.contiguous()


# --- automatic tile size --------------------------------------------------------------------------------------

# Untiled peaks, ComfyUI's own figures for the SD VAE (base 128 channels): decode 2178 * 64 bytes per latent px,
# encode 1767 per image px, times the dtype size.
_PLAIN = {True: 2178 * 64, False: 1767}
# Tiled working set, in copies of a tile's C-channel region at full resolution: measured with live-tensor
# accounting (tests/host/test_vae_tiled.py's _LiveBytes) on the full-size SD VAE at 6.0 for decode (the step that
# upsamples 2C channels into the top level) and 4.0 for encode, fp32 and bf16 alike; one copy of margin each.
_TILE_COPIES = {True: 7, False: 5}
# Whole-map mid block at latent resolution, 4x the base channels: input, norm output, q/k/v and their token-layout
# copies, attention output, residual.
_MID_COPIES = 10
# Device allocator rounding/fragmentation and convolution workspaces, which CPU accounting does not see.
_SAFETY = 1.5


def _tile_bytes(tile: int, *, is_decoder: bool, dtype_bytes: int, base_channels: int) -> float:
    region = (tile * 8 if is_decoder else tile) + 2 * HALO
    return _TILE_COPIES[is_decoder] * base_channels * region * region * dtype_bytes


def _mid_bytes(width: int, height: int, copies: int, *, is_decoder: bool, dtype_bytes: int,
               base_channels: int) -> int:
    lat_w, lat_h = (width, height) if is_decoder else (max(1, width // 8), max(1, height // 8))
    return copies * 4 * base_channels * lat_w * lat_h * dtype_bytes


def whole_mid_bytes(width: int, height: int, *, is_decoder: bool, dtype_bytes: int, base_channels: int = 128
                    ) -> float:
    """Estimated peak of the whole-map mid block (``width``/``height`` as for the tile), with the safety factor:
    callers run it whole only when this fits their budget (it grows with the image, the tiled one does not)."""
    return _SAFETY * _mid_bytes(width, height, _MID_COPIES, is_decoder=is_decoder, dtype_bytes=dtype_bytes,
                                base_channels=base_channels)


def _tiled_peak(tile: int, width: int, height: int, *, is_decoder: bool, dtype_bytes: int, base_channels: int,
                whole_mid: bool = True) -> float:
    """A tile's working set (a tiled attention's is sized within it: ``attention_blocks``), plus the whole-map mid
    block when it runs whole."""
    mid = _mid_bytes(width, height, _MID_COPIES, is_decoder=is_decoder, dtype_bytes=dtype_bytes,
                     base_channels=base_channels) if whole_mid else 0
    return _SAFETY * (_tile_bytes(tile, is_decoder=is_decoder, dtype_bytes=dtype_bytes,
                                  base_channels=base_channels) + mid)


def auto_tile_size(free_bytes: int, width: int, height: int, *, is_decoder: bool, dtype_bytes: int,
                   base_channels: int = 128, whole_mid: bool = True) -> int:
    """Largest tile (latent px for decode, image px for encode, as ``width``/``height``) whose estimated device
    peak fits ``free_bytes``: the whole image (plain path) if the untiled peak fits, else multiples of 8 latent /
    64 image px, never below 16 / 128 even if that does not fit (the caller retries smaller on an OOM).
    ``whole_mid``: the mid block runs on the whole map (counted), else tiled (within the tile's working set).
    """
    if width <= 0 or height <= 0 or dtype_bytes <= 0:
        raise ValueError("width, height and dtype_bytes must be positive")
    whole = max(width, height)
    if _PLAIN[is_decoder] * width * height * dtype_bytes * (base_channels / 128) <= free_bytes:
        return whole
    step, smallest = (8, 16) if is_decoder else (64, 128)
    tile = (whole // step) * step
    while tile > smallest:
        if _tiled_peak(tile, width, height, is_decoder=is_decoder, dtype_bytes=dtype_bytes,
                       base_channels=base_channels, whole_mid=whole_mid) <= free_bytes:
            return tile
        tile -= step
    return min(whole, smallest)


def parked_bytes(width: int, height: int, *, is_decoder: bool, dtype_bytes: int, base_channels: int = 128) -> int:
    """Peak host size of the parked maps (``width``/``height`` as for the tile): at most three C-channel
    full-resolution maps for decode (block outputs overwrite their input), two for encode, plus input and output."""
    px = width * height * (64 if is_decoder else 1)
    return int(((3 if is_decoder else 2) * base_channels + 3) * px * dtype_bytes)


# Smallest query block / key chunk (tokens) of a tiled attention, however small the allowance: fewer would make the
# loops the cost (at 512 channels in fp32 such a pair holds 0.5 MiB).
_MIN_TOKENS = 64


def attention_blocks(tokens: int, channels: int, dtype_bytes: int, work: float, *, streamed_lse: bool = True
                     ) -> tuple[int, int]:
    """(query block, key/value chunk) in tokens for an attention over ``tokens`` positions of ``channels`` within
    ``work`` bytes: keys/values take at most a quarter (all of them, read once, when they fit it); the rest holds
    per query its tokens, fp32 accumulator, chunk output and the residual (``channels * (2 * dtype_bytes + 12)``
    bytes), plus, without the CPU kernel's log-sum-exp (``streamed_lse``), two fp32 rows of scores per key."""
    kv = max(_MIN_TOKENS, int(work // (4 * 2 * channels * dtype_bytes)))
    kv = min(tokens, kv)
    per_query = channels * (2 * dtype_bytes + 12) + (0 if streamed_lse else 8 * kv)
    q = int((work - 2 * kv * channels * dtype_bytes) // per_query)
    return min(tokens, max(_MIN_TOKENS, q)), kv
