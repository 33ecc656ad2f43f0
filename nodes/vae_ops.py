"""VAE encode/decode for the nodes: pisa_sr.vae_tiled with the tile, the mid block and the parked maps planned
together from free device memory and a host-memory budget (or the user's overrides), and a logged out-of-memory
retry: first parking on the host instead of the device, then smaller tiles.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass

import torch

import comfy.model_management as mm
import folder_paths

from ..pisa_sr.checks import check_vae_output
from ..pisa_sr.errors import PisaError
from ..pisa_sr.park import Parking
from ..pisa_sr.runtime import retry_oom
from ..pisa_sr.vae_tiled import (_tiled_peak, auto_tile_size, parked_bytes, tiled_decode, tiled_encode,
                                 whole_mid_bytes)
from . import compat
from .compat import io

log = logging.getLogger("PiSA-SR")
GIB = 1 << 30
# Default host budget: this share of the RAM free when the node starts (the rest stays for ComfyUI and other nodes).
RAM_SHARE = 0.5
# The tile (latent px for decode, image px for encode) whose working set ComfyUI is asked to free room for.
CLAIM_TILE = {True: 64, False: 512}
# Parked maps share the device with the tile only when they take at most this share of its free memory.
DEVICE_PARK_SHARE = 0.5


@dataclass
class Plan:
    tile: int
    whole_mid: bool | None  # None: whole, falling back to tiles on a device OOM
    parking: Parking


def free_ram() -> int:
    """Available host memory (what ComfyUI reports for the CPU device)."""
    return int(mm.get_free_memory(torch.device("cpu")))


def temp_directory() -> str:
    """ComfyUI's temp directory (emptied at its start), where the tiled VAE spills maps beyond its RAM budget."""
    return folder_paths.get_temp_directory()


def ram_budget(ram_gib: float) -> int:
    """Host bytes the VAE may add beyond the IMAGE/LATENT: the user's GiB, else a share of the free RAM."""
    return int(ram_gib * GIB) if ram_gib > 0 else int(RAM_SHARE * free_ram())


def plan(device: torch.device, free: int, budget: int, spill_dir: str, size_wh: tuple[int, int],
         tile_override: int, *, is_decoder: bool, dtype_bytes: int, base_channels: int) -> Plan:
    """Tile, mid-block mode and parking so that the device work fits ``free`` and the host work ``budget``.

    On the CPU the device is the host: half the budget for the working set (tile, mid block), half for the parked
    maps in RAM, the rest of the maps in files in ``spill_dir``. On a GPU the maps stay on the device only when tile
    and maps fit its free memory together; else they go to the host (RAM within the budget, then files), never to a
    path that needs the whole map in RAM. The whole-map mid block runs only when its estimate fits, else tiled.
    """
    w, h = size_wh
    kw = {"is_decoder": is_decoder, "dtype_bytes": dtype_bytes, "base_channels": base_channels}
    cpu = device.type == "cpu"
    work = min(free, budget // 2) if cpu else free
    whole = whole_mid_bytes(w, h, **kw) <= work / 2
    mid = (True if cpu else None) if whole else False
    smallest = 16 if is_decoder else 128

    def tile_for(room: int) -> int:
        return max(smallest, tile_override) if tile_override > 0 else auto_tile_size(room, w, h, whole_mid=whole, **kw)

    tile = tile_for(work)
    if cpu:
        return Plan(tile, mid, Parking("cpu", budget=budget - budget // 2, spill_dir=spill_dir))
    parked = parked_bytes(w, h, **kw)
    if tile < max(w, h) and parked <= DEVICE_PARK_SHARE * free:
        dev_tile = tile_for(free - parked)
        if _tiled_peak(dev_tile, w, h, whole_mid=whole, **kw) + parked <= free:
            return Plan(dev_tile, mid, Parking(device))
    return Plan(tile, mid, Parking("cpu", budget=budget, spill_dir=spill_dir))


def _spill_dir() -> str:
    d = temp_directory()
    with contextlib.suppress(OSError):  # an unusable directory is refused with the amount by Parking.prepare
        os.makedirs(d, exist_ok=True)
    return d


def _sizes(vae, is_decoder: bool) -> dict:
    try:
        base_channels = int(vae.first_stage_model.decoder.conv_out.weight.shape[1])
    except AttributeError:
        base_channels = 128
    return {"is_decoder": is_decoder, "dtype_bytes": vae.vae_dtype.itemsize, "base_channels": base_channels}


def _run(vae, one, out: torch.Tensor, size_wh: tuple[int, int], tile_override: int, ram_gib: float,
         is_decoder: bool) -> torch.Tensor:
    """Loads the VAE, plans, then ``one(i, plan, hooks)`` writes sample i into ``out``; an OOM retries from that
    sample. ComfyUI is asked to make room for a modest tile's working set (``CLAIM_TILE``), not its own untiled
    estimate (~18 GB for a 2048 px decode), so other models (the UNet) stay loaded unless not even that fits; the plan
    then sizes the tile to what is free."""
    w, h = size_wh
    unit, smallest = (8, 16) if is_decoder else (64, 128)
    kw = _sizes(vae, is_decoder)
    compat.vae_load(vae, int(_tiled_peak(min(max(w, h), CLAIM_TILE[is_decoder]), w, h, whole_mid=False, **kw)))
    p = plan(torch.device(vae.device), compat.vae_free_memory(vae), ram_budget(ram_gib), _spill_dir(), size_wh,
             tile_override, **kw)
    hooks = compat.hooks()

    def attempt(i: int) -> None:
        with compat.device_context(vae.device):
            one(i, p, hooks)

    def shrink() -> None:
        if p.parking.device.type != "cpu":
            p.parking = Parking("cpu", budget=ram_budget(ram_gib), spill_dir=_spill_dir())
            log.warning("PiSA-SR VAE: out of memory; retrying with the tiles' full-size maps parked on the host.")
            return
        new = max(smallest, (min(p.tile, max(w, h)) // 2) // unit * unit)
        if new >= p.tile or p.tile <= smallest:
            raise PisaError(f"out of memory even with {p.tile * (8 if is_decoder else 1)} px VAE tiles. Free "
                            "memory (close other models) or lower the image size.")
        log.warning("PiSA-SR VAE: out of memory at tile %d; retrying with tile %d (the result is identical, "
                    "only slower).", p.tile, new)
        p.tile = new

    for i in range(out.shape[0]):  # an OOM retries from the sample it hit
        retry_oom(functools.partial(attempt, i), shrink, hooks.empty_cache)
    return out


def encode(vae, lq_bhwc: torch.Tensor, tile_px: int, ram_gib: float = 0.0) -> torch.Tensor:
    """Raw latent (posterior mode) [B,4,H/8,W/8] fp32 on the CPU from images [B,H,W,3] in [0,1]."""
    b, h, w, _ = lq_bhwc.shape
    dev, dt = torch.device(vae.device), vae.vae_dtype
    out = torch.empty(b, 4, h // 8, w // 8)

    def one(i, p, hooks):
        # contiguous NCHW like the release's ToTensor: a channels_last view would make every conv and GroupNorm
        # run in that layout, which rounds differently (see sample_eps). It stays on the CPU: tiles go to the device.
        x = lq_bhwc[i:i + 1].movedim(-1, 1).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        x = x.mul_(2.0).sub_(1.0).to(dt)
        z = tiled_encode(vae.first_stage_model, x, p.tile, progress=hooks.progress,
                         check_interrupt=hooks.check_interrupt, whole_mid=p.whole_mid, parking=p.parking, device=dev)
        out[i:i + 1].copy_(z)
        check_vae_output(out[i:i + 1], "encoded the image to")

    return _run(vae, one, out, (w, h), tile_px, ram_gib, is_decoder=False)


def decode(vae, z_raw: torch.Tensor, tile_px: int, ram_gib: float = 0.0) -> torch.Tensor:
    """Images [B,3,8h,8w] in [0,1] (fp32, CPU) from a raw latent, clamped as the release does; ``tile_px`` 0 =
    automatic, else image px (at least the smallest tile, 128 px); ``ram_gib`` 0 = automatic host budget."""
    b, _, h, w = z_raw.shape
    dev, dt = torch.device(vae.device), vae.vae_dtype
    out = torch.empty(b, 3, h * 8, w * 8)

    def one(i, p, hooks):
        x = tiled_decode(vae.first_stage_model, z_raw[i:i + 1].to(dev, dt), p.tile, progress=hooks.progress,
                         check_interrupt=hooks.check_interrupt, whole_mid=p.whole_mid, parking=p.parking)
        o = out[i:i + 1]
        o.copy_(x)
        del x
        check_vae_output(o, "decoded")
        o.clamp_(-1, 1).add_(1.0).div_(2.0)

    return _run(vae, one, out, (w, h), -(-tile_px // 8) if tile_px > 0 else 0, ram_gib, is_decoder=True)


def inputs(unit: str, tiling_note: str = "") -> list:
    """The VAE inputs Encode LQ and Decode share: ``vae_tile_size`` (in ``unit``) and ``vae_ram_budget``."""
    return [io.Int.Input("vae_tile_size", default=0, min=0, max=8192, step=64,
                         tooltip=f"VAE tile size in {unit}; 0 = automatic, 1..128 = the smallest (128). Tiling never "
                         f"changes the result{tiling_note}, only memory and time.", **compat.advanced()),
            io.Float.Input("vae_ram_budget", default=0.0, min=0.0, max=4096.0, step=0.5, optional=True,
                           tooltip="Host RAM (GiB) the tiled VAE may add for its full-size maps and working set; 0 = "
                           "automatic (half the RAM free when the node starts). Maps beyond it go to a temporary file "
                           "in ComfyUI's temp folder. Never changes the result.", **compat.advanced())]
