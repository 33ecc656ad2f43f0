"""Live lambda preview core (issue 21): what one sampler run keeps so that any (lambda_pix, lambda_sem) is one
multiply-add away, the request checks, the loupe's crop geometry and the preview prompt's graph. No ComfyUI here.

eps is linear in both lambdas, so after a run that kept z_lq, eps_pix and eps_sem every setting's latent is
``z_lq - (lp * eps_pix + ls * (eps_sem - eps_pix))`` (guidance.combine_eps); only the decode costs.

Memory bound: at most ``MAX_ENTRIES`` entries (one per sampler node id, least recently used dropped first), each
3 latents fp32 (z_lq, eps_pix, eps_sem: 48 bytes per latent pixel and frame, 3 MiB for a 1024 px frame) plus the
conditioning (77 x 1024 fp32, 308 KiB), a few colour-fix statistics and the recorded API prompt (a dict of the
run's widget values). The VAE, the model and the LQ colour reference are not kept: the preview prompt links them
from ComfyUI's own cache.
"""
from __future__ import annotations

import math
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import PisaError
from .guidance import check_lambda, combine_eps

MAX_ENTRIES = 4  # samplers with a live preview at once; a fifth run drops the least recently used
MAX_DECODERS = 4  # decoders remembered per entry (one sampler feeding several decoders)
MAX_STATS = 8  # AdaIN statistics kept per entry (decoder, frame, setting): 6 floats each
VIEWS = ("fit", "loupe")
MIN_SIZE, MAX_SIZE = 16, 4096  # fit: max side of the returned picture; loupe: side of the crop (output px)
LATENT_SCALE = 8  # output px per latent px
# Latent px decoded around a loupe crop: the VAE decoder's convolutions (and the wavelet fix's 31 px blur reach)
# see this far; 4 latent px = 32 output px keeps a 256 px loupe's decode near 1/10 of a 1024 px frame.
LOUPE_HALO = 4
PREVIEW_NODE_ID = "pisa_live"
PREVIEW_CLASS = "PiSA_LivePreview"
WHAT = "PiSA live preview"


@dataclass
class Decoder:
    """What a PiSA Tiled VAE Decode fed by the run recorded: its settings and the prompt nodes its vae needs."""
    node_id: str
    color_fix: str
    vae_tile_size: int
    vae_ram_budget: float
    vae_link: list  # [source node id, output index] in ``nodes``
    nodes: dict  # the decoder prompt's nodes the vae input needs (API format)
    out_size: tuple[int, int] = (0, 0)  # (width, height) of its output IMAGE


@dataclass
class LiveEntry:
    token: str
    node_id: str  # the sampler's
    prompt: dict  # the API prompt the sampler ran in
    z_lq: torch.Tensor  # [B,4,h,w] fp32 CPU, scaled into the UNet's space (as the sampler computed it)
    eps_pix: torch.Tensor | None  # [B,4,h,w] fp32 CPU; None until computed (default mode: lazily)
    eps_sem: torch.Tensor | None
    context: torch.Tensor  # [1,77,C] the conditioning, for a lazy pass
    to_raw: Callable[[torch.Tensor], torch.Tensor]  # the model's latent format: UNet space -> VAE latent
    lambda_pix: float
    lambda_sem: float
    sampling: dict  # tile_size, tile_overlap, precision of the run (a lazy pass uses the same)
    decoders: "OrderedDict[str, Decoder]" = field(default_factory=OrderedDict)
    stats: "OrderedDict[tuple, tuple]" = field(default_factory=OrderedDict)  # (decoder, frame, lp, ls) -> AdaIN
    # content statistics of that setting's whole decoded frame (a loupe then colour-fixes its crop exactly)

    @property
    def default_mode(self) -> bool:
        return self.eps_pix is None

    @property
    def frames(self) -> int:
        return self.z_lq.shape[0]

    def nbytes(self) -> int:
        ts = [self.z_lq, self.eps_pix, self.eps_sem, self.context, *(t for v in self.stats.values() for t in v)]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def put_stats(self, key: tuple, stats: tuple) -> None:
        self.stats.pop(key, None)
        self.stats[key] = stats
        while len(self.stats) > MAX_STATS:
            self.stats.popitem(last=False)

    def add_decoder(self, d: Decoder) -> None:
        self.decoders.pop(d.node_id, None)
        self.decoders[d.node_id] = d
        while len(self.decoders) > MAX_DECODERS:
            self.decoders.popitem(last=False)

    def decoder(self, node_id: str | None) -> Decoder:
        if not self.decoders:
            raise PisaError("this run has no PiSA Tiled VAE Decode fed by its sampler. Connect one and "
                            "queue once.")
        if node_id in (None, ""):
            return next(reversed(self.decoders.values()))
        if node_id not in self.decoders:
            raise PisaError(f"decoder {node_id!r} did not decode this run. Queue the workflow again.")
        return self.decoders[node_id]

    def latent(self, frame: int, lambda_pix: float, lambda_sem: float) -> torch.Tensor:
        """The raw (VAE) latent [1,4,h,w] of ``frame`` at this setting: what the sampler would output."""
        return self.to_raw(combined(self.z_lq[frame:frame + 1], self.eps_pix[frame:frame + 1],
                                    self.eps_sem[frame:frame + 1], lambda_pix, lambda_sem)).to(torch.float32)


def new_token() -> str:
    return secrets.token_urlsafe(16)


class LiveStore:
    """The bounded store: at most ``max_entries`` entries, one per sampler node id (a new run of a node replaces
    its entry and token), least recently used dropped first. Thread-safe (route thread and executor thread)."""

    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries = max_entries
        self._by_token: OrderedDict[str, LiveEntry] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, entry: LiveEntry) -> None:
        with self._lock:
            for t, e in list(self._by_token.items()):
                if e.node_id == entry.node_id:
                    del self._by_token[t]
            self._by_token[entry.token] = entry
            while len(self._by_token) > self.max_entries:
                self._by_token.popitem(last=False)

    def get(self, token: object) -> LiveEntry | None:
        with self._lock:
            e = self._by_token.get(token) if isinstance(token, str) else None
            if e is not None:
                self._by_token.move_to_end(token)
            return e

    def __len__(self) -> int:
        return len(self._by_token)

    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes() for e in self._by_token.values())

    def clear(self) -> None:
        with self._lock:
            self._by_token.clear()


def combined(z_lq: torch.Tensor, eps_pix: torch.Tensor, eps_sem: torch.Tensor, lambda_pix: float,
             lambda_sem: float) -> torch.Tensor:
    """``z_lq - eps`` in the UNet's space, fp32, for one setting (the sampler's z_hq)."""
    return z_lq.to(torch.float32) - combine_eps(eps_pix, eps_sem, lambda_pix, lambda_sem)


# ------------------------------------------------------------------------------------------------ requests
@dataclass(frozen=True)
class Request:
    token: str
    lambda_pix: float
    lambda_sem: float
    view: str
    x: int
    y: int
    size: int
    frame: int
    seq: int
    decoder: str | None


def _int(body: dict, key: str, default: int | None = None) -> int:
    v = body.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v):
        raise PisaError(f"'{key}' must be a whole number, got {v!r}. Send it as an integer.")
    return int(v)


def parse_request(body: object) -> Request:
    """The route's JSON body checked field by field (the token's existence and the frame/crop bounds, which need
    the entry, are checked by ``check_bounds``); a PisaError names the field and the fix."""
    if not isinstance(body, dict):
        raise PisaError("the request must be a JSON object with token, lambda_pix, lambda_sem and view.")
    token = body.get("token")
    if not isinstance(token, str) or not token:
        raise PisaError("no token. Queue the workflow once: the sampler gives its widget the token.")
    lp = _lambda(body, "lambda_pix")
    ls = _lambda(body, "lambda_sem")
    view = body.get("view", "fit")
    if view not in VIEWS:
        raise PisaError(f"unknown view {view!r}; use 'fit' or 'loupe'.")
    size = _int(body, "size", 512)
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise PisaError(f"size {size} is outside {MIN_SIZE}..{MAX_SIZE} px. Use e.g. 512 for fit, 256 for "
                        "loupe.")
    decoder = body.get("decoder")
    if decoder is not None and not isinstance(decoder, str):
        raise PisaError(f"'decoder' must be a node id string, got {decoder!r}.")
    return Request(token, lp, ls, view, _int(body, "x", 0), _int(body, "y", 0), size, _int(body, "frame", 0),
                   _int(body, "seq", 0), decoder)


def _lambda(body: dict, key: str) -> float:
    if key not in body:
        raise PisaError(f"'{key}' is missing. Send both lambdas.")
    try:
        return check_lambda(key, body[key])
    except PisaError as e:
        raise PisaError(f"{e}") from None


def check_bounds(req: Request, frames: int, out_w: int, out_h: int) -> None:
    """Refuse a frame outside the run's batch or a loupe point outside the output picture."""
    if not 0 <= req.frame < frames:
        raise PisaError(f"frame {req.frame} is outside 0..{frames - 1} (this run has {frames} frame(s)).")
    if req.view == "loupe" and not (0 <= req.x < out_w and 0 <= req.y < out_h):
        raise PisaError(f"loupe point ({req.x}, {req.y}) is outside the {out_w}x{out_h} px output. Send "
                        "x, y in output pixels.")


# ------------------------------------------------------------------------------------------------ geometry
def fit_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) scaled so the longer side is ``size``, only when it is longer (the fit view never enlarges)."""
    s = min(1.0, size / max(h, w))
    return max(1, round(h * s)), max(1, round(w * s))


def crop_box(out_w: int, out_h: int, x: int, y: int, size: int) -> tuple[int, int, int, int]:
    """(x0, y0, w, h): a ``size`` square centred on (x, y), shifted inside the picture (clipped if larger)."""
    w, h = min(size, out_w), min(size, out_h)
    x0 = min(max(0, x - w // 2), out_w - w)
    y0 = min(max(0, y - h // 2), out_h - h)
    return x0, y0, w, h


def latent_window(box: tuple[int, int, int, int], lat_h: int, lat_w: int, halo: int = LOUPE_HALO
                  ) -> tuple[tuple[slice, slice], tuple[int, int]]:
    """The latent slices (rows, cols) to decode for an output-px ``box`` with ``halo`` latent px around it (kept
    inside the latent), and the box's top-left offset in the decoded picture's px."""
    x0, y0, w, h = box
    r0 = max(0, y0 // LATENT_SCALE - halo)
    r1 = min(lat_h, -(-(y0 + h) // LATENT_SCALE) + halo)
    c0 = max(0, x0 // LATENT_SCALE - halo)
    c1 = min(lat_w, -(-(x0 + w) // LATENT_SCALE) + halo)
    return (slice(r0, r1), slice(c0, c1)), (x0 - c0 * LATENT_SCALE, y0 - r0 * LATENT_SCALE)


# ------------------------------------------------------------------------------------------------ the prompt
def _ancestors(prompt: dict, node_ids: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = [n for n in node_ids if n in prompt]
    while todo:
        nid = todo.pop()
        if nid in seen:
            continue
        seen.add(nid)
        for v in prompt[nid].get("inputs", {}).values():
            if _is_link(v) and v[0] in prompt:
                todo.append(v[0])
    return seen


def _is_link(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


def preview_prompt(entry: LiveEntry, decoder: Decoder, req: Request) -> dict:
    """The API prompt the front end queues (at the front): the sampler and the nodes it and the decoder's vae need,
    with the inputs they ran with (ComfyUI's cache answers them: nothing recomputes unless it was evicted, and
    keeping the sampler in the prompt keeps its cached output), plus the preview node. The sampler is not linked to
    the preview node, so it never runs here; the model is linked only while an eps is missing (the lazy pass)."""
    rec = entry.prompt
    sampler = rec.get(entry.node_id, {})
    sinputs = sampler.get("inputs", {})
    latent_link, model_link = sinputs.get("latent"), sinputs.get("model")
    if not (_is_link(latent_link) and _is_link(model_link)):
        raise PisaError("the recorded run lacks the sampler's links. Queue the workflow again.")
    out = {nid: _copy_node(rec[nid]) for nid in _ancestors(rec, [entry.node_id])}
    for nid in _ancestors(decoder.nodes, [decoder.vae_link[0]]):
        out.setdefault(nid, _copy_node(decoder.nodes[nid]))
    inputs: dict[str, Any] = {"vae": list(decoder.vae_link), "latent": list(latent_link), "token": entry.token,
                              "decoder": decoder.node_id, "lambda_pix": req.lambda_pix,
                              "lambda_sem": req.lambda_sem, "view": req.view, "x": req.x, "y": req.y,
                              "size": req.size, "frame": req.frame, "seq": req.seq}
    if entry.eps_pix is None or entry.eps_sem is None:
        inputs["model"] = list(model_link)
    out[PREVIEW_NODE_ID] = {"class_type": PREVIEW_CLASS, "inputs": inputs,
                            "_meta": {"title": "PiSA live preview"}}
    return out


def _copy_node(node: dict) -> dict:
    return {"class_type": node["class_type"], "inputs": dict(node.get("inputs", {})),
            **({"_meta": node["_meta"]} if "_meta" in node else {})}


def vae_nodes(prompt: dict, vae_link: list) -> dict:
    """The nodes of ``prompt`` the decoder's vae input needs (what Decoder.nodes keeps)."""
    return {nid: _copy_node(prompt[nid]) for nid in _ancestors(prompt, [vae_link[0]])}


def preview_token(prompt: object) -> str | None:
    """The token of a queued preview prompt (None for any other prompt)."""
    node = prompt.get(PREVIEW_NODE_ID) if isinstance(prompt, dict) else None
    if isinstance(node, dict) and node.get("class_type") == PREVIEW_CLASS:
        t = node.get("inputs", {}).get("token")
        return t if isinstance(t, str) else None
    return None
