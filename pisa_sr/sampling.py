"""The one-step sampler around an injected ``unet(x) -> eps`` (t = 1, context bound), UNet merged with pix + sem.

eps_sem is a plain call; eps_pix subtracts the sem LoRA in the activations (``sem_removal`` hooks). Adjustable mode
needs both: one call on ``[x, x]`` hooked on the first half (``one_pass``), or two calls (the low-memory fallback).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from .bypass import BypassTarget, LowRankBypass
from .errors import PisaError
from .guidance import Pass, check_lambda, combine_eps, plan_passes
from .latent_tiles import EpsFn, run_tiled
from .runtime import Hooks, retry_oom

log = logging.getLogger("PiSA-SR")

Unet = Callable[[torch.Tensor], torch.Tensor]
HOOKS_DID_NOT_RUN = ("the UNet ran without the sem-LoRA removal hooks that pixel-only and adjustable modes need "
                     "(compiled outside ComfyUI's TorchCompileModel, or its modules replaced). Remove that node "
                     "(TorchCompileModel is fine), or use lambda_pix = lambda_sem.")


def plan(lambda_pix: float, lambda_sem: float, both: bool = False) -> Pass:
    """The passes a setting needs (``both``: eps_pix and eps_sem for a sweep); refuses lambdas out of range."""
    check_lambda("lambda_pix", lambda_pix)
    check_lambda("lambda_sem", lambda_sem)
    return Pass.DUAL if both else plan_passes(lambda_pix, lambda_sem)


def check_tiles(tile: int, overlap: int) -> None:
    if tile < 0 or overlap < 0:
        raise PisaError("tile_size and tile_overlap must be >= 0 (tile_size 0 = no tiling).")
    if tile > 0 and overlap >= tile:
        raise PisaError(f"tile_overlap ({overlap}) must be smaller than tile_size ({tile}); the release uses "
                        "tile_size 96 with tile_overlap 32.")


def make_eps_fn(unet: Unet, sem_removal: Sequence[BypassTarget], lambda_pix: float, lambda_sem: float, *,
                one_pass: bool, both: bool = False, bypass_unet: Unet | None = None) -> EpsFn:
    """eps for a batch of latent tiles under the given lambdas (``both``: [eps_pix, eps_sem] along channels).

    ``bypass_unet`` (default ``unet``) runs the calls with the sem removal hooks in place. It must run the hooked
    modules as Python modules: a compiled graph ignores hooks added or removed after it was traced."""
    p = plan(lambda_pix, lambda_sem, both)
    bypass = LowRankBypass(list(sem_removal))  # hooks nothing until entered
    bypass_unet = unet if bypass_unet is None else bypass_unet

    def hooked(x: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        bypass.rows = rows
        with bypass:
            e = bypass_unet(x)
            if not all(bypass.ran):  # e is the merged model's eps_sem, not eps_pix: never return it
                raise PisaError(HOOKS_DID_NOT_RUN)
            return e

    def pix_and_sem(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not one_pass:
            return hooked(x), unet(x)
        n = x.shape[0]
        e = hooked(torch.cat([x, x], 0), slice(0, n))
        return e[:n], e[n:]

    def eps_fn(x: torch.Tensor) -> torch.Tensor:
        if both:
            ep, es = pix_and_sem(x)
            return torch.cat([ep.float(), es.float()], 1)
        if p is Pass.NONE:
            return torch.zeros_like(x, dtype=torch.float32)
        if p is Pass.SEM:
            e = unet(x).float()
            return e if lambda_pix == 1.0 else e * lambda_pix
        if p is Pass.PIX:
            return hooked(x).float() * lambda_pix
        return combine_eps(*pix_and_sem(x), lambda_pix, lambda_sem)

    return eps_fn


@torch.no_grad()
def sample_eps(z: torch.Tensor, unet: Unet, sem_removal: Sequence[BypassTarget], lambda_pix: float,
               lambda_sem: float, tile: int, overlap: int, *, tiles_per_call: int = 1, one_pass: bool = True,
               both: bool = False, hooks: Hooks = Hooks(), bypass_unet: Unet | None = None) -> torch.Tensor:
    """eps ``[B,C,h,w]`` fp32 for ``z`` (C = 4, or 8 = eps_pix then eps_sem with ``both``); ``z_hq = z - eps``;
    ``tile`` and ``overlap`` as ``check_tiles`` accepts them (the node checks them once, before loading the UNet).

    ``bypass_unet``: see make_eps_fn. Out of memory: retried with half the tiles per call down to one, then
    (adjustable mode) two passes per tile.
    Memory: latent-size fp32 buffers only (run_tiled's output and weight sum) besides one UNet call; a failed try's
    are dropped before the retry.
    """
    p = plan(lambda_pix, lambda_sem, both)
    if p is Pass.NONE:
        return torch.zeros_like(z, dtype=torch.float32)
    tpc = max(1, int(tiles_per_call))

    def attempt() -> torch.Tensor:
        eps_fn = make_eps_fn(unet, sem_removal, lambda_pix, lambda_sem, one_pass=one_pass, both=both,
                             bypass_unet=bypass_unet)
        return run_tiled(z, eps_fn, tile, overlap, tpc, progress=hooks.progress, check_interrupt=hooks.check_interrupt)

    def shrink() -> None:
        nonlocal tpc, one_pass
        if tpc > 1:
            tpc //= 2
            log.warning("PiSA-SR: out of memory; retrying with %d tile(s) per UNet call.", tpc)
        elif one_pass and p is Pass.DUAL:
            one_pass = False
            log.warning("PiSA-SR: out of memory; retrying adjustable mode as two UNet passes per tile.")
        else:
            raise PisaError("out of memory even with one tile per call. Lower tile_size (e.g. 64) or free "
                            "memory (close other models).")

    return retry_oom(attempt, shrink, hooks.empty_cache)
