"""Live lambda preview, server side (issue 21; the contract is in the issue's notes): the store of runs, the sampler
and decoder hooks, and the route ``POST /pisa_sr/live/prompt`` that answers with a small preview prompt.

The route never runs a model: it only builds a prompt that the front end queues at the front, so the preview's
decode (and a lazy eps pass) run in ComfyUI's executor thread under its model management (PiSA_LivePreview).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..pisa_sr.color import channel_stats
from ..pisa_sr.errors import PisaError
from ..pisa_sr.live import (MAX_ENTRIES, WHAT, Decoder, LiveEntry, LiveStore, check_bounds, new_token, parse_request,
                            preview_prompt, preview_token, vae_nodes)
from . import compat

STORE = LiveStore()
LATENT_KEY = "pisa_live"  # the sampler's LATENT carries its run's token under this key
ROUTE = "/pisa_sr/live/prompt"
EVENT = "pisa_sr.live"
UNKNOWN_TOKEN = ("unknown or expired token (a sampler keeps its preview until it runs again or "
                 f"{MAX_ENTRIES} other samplers ran). Queue the workflow again.")


def register_run(node_id: str, prompt: dict, model, z_lq: torch.Tensor, eps_pix, eps_sem, context: torch.Tensor,
                 lambda_pix: float, lambda_sem: float, sampling: dict) -> str:
    """Keep a sampler run (replacing that node's previous one); its token."""
    token = new_token()
    STORE.put(LiveEntry(token=token, node_id=node_id, prompt=prompt, z_lq=z_lq, eps_pix=eps_pix, eps_sem=eps_sem,
                        context=context.detach().to("cpu", torch.float32), to_raw=compat.latent_to_raw(model),
                        lambda_pix=float(lambda_pix), lambda_sem=float(lambda_sem), sampling=dict(sampling)))
    return token


def sampler_ui(token: str, lambda_pix: float, lambda_sem: float, default_mode: bool) -> dict:
    return {LATENT_KEY: [{"token": token, "lambda_pix": lambda_pix, "lambda_sem": lambda_sem,
                          "default_mode": default_mode}]}


@dataclass
class DecoderRun:
    entry: LiveEntry
    decoder: Decoder
    keep_stats: Callable[[int, torch.Tensor], None]


def decoder_record(latent: Any, hidden: Any, color_fix: str, vae_tile_size: int, vae_ram_budget: float
                   ) -> DecoderRun | None:
    """A decoder fed by a live run (its LATENT's token names an entry), or None."""
    token = latent.get(LATENT_KEY) if isinstance(latent, dict) else None
    entry = STORE.get(token)
    if entry is None or hidden is None or hidden.unique_id is None or not isinstance(hidden.prompt, dict):
        return None
    node = hidden.prompt.get(str(hidden.unique_id), {})
    vae_link = node.get("inputs", {}).get("vae")
    if not (isinstance(vae_link, list) and len(vae_link) == 2):
        return None
    dec = Decoder(str(hidden.unique_id), color_fix, int(vae_tile_size), float(vae_ram_budget or 0.0),
                  list(vae_link), vae_nodes(hidden.prompt, vae_link))

    def keep(i: int, out: torch.Tensor) -> None:
        entry.put_stats((dec.node_id, i, entry.lambda_pix, entry.lambda_sem), channel_stats(out))

    return DecoderRun(entry, dec, keep)


def decoder_ui(run: DecoderRun, img: torch.Tensor, ui: dict | None) -> dict:
    run.decoder.out_size = (int(img.shape[2]), int(img.shape[1]))
    run.entry.add_decoder(run.decoder)
    return {**(ui or {}), LATENT_KEY: [run.entry.token]}


# ------------------------------------------------------------------------------------------------ the route
def answer(body: object) -> tuple[int, dict]:
    """(HTTP status, JSON) for a preview request: 200 with the prompt, 400/404 with a one-line error."""
    try:
        req = parse_request(body)
    except PisaError as e:
        return 400, {"error": f"{WHAT}: {e}"}
    entry = STORE.get(req.token)
    if entry is None:
        return 404, {"error": f"{WHAT}: {UNKNOWN_TOKEN}"}
    try:
        dec = entry.decoder(req.decoder)
        check_bounds(req, entry.frames, *dec.out_size)
        return 200, {"prompt": preview_prompt(entry, dec, req)}
    except PisaError as e:
        return 400, {"error": f"{WHAT}: {e}"}


async def post_live_prompt(request):
    from aiohttp import web

    try:
        body = await request.json()
    except Exception:  # not JSON: refused like any malformed request
        body = None
    status, payload = answer(body)
    return web.json_response(payload, status=status)


def on_prompt(json_data: dict) -> dict:
    """POST /prompt of a preview: the token's still-pending previews leave the queue (a flood of requests keeps at
    most one queued per token, beside the one running) and its finished previews leave the history."""
    token = preview_token(json_data.get("prompt")) if isinstance(json_data, dict) else None
    if token is not None:
        mine = lambda p: preview_token(p) == token  # noqa: E731
        compat.drop_queued(mine)
        compat.drop_history(mine)
    return json_data


def register_server() -> bool:
    """The route and the queue hygiene on ComfyUI's server (none in-process, where nobody could call them)."""
    if not compat.add_post_route(ROUTE, post_live_prompt):
        return False
    compat.add_on_prompt_handler(on_prompt)
    return True
