"""Nothing lost across participants: the slice rule that splits a batch into shares, and the check that what came
back is every frame, in order. Plain functions over IMAGE tensors [B,H,W,C] in 0..1."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import PisaError
from .runtime import host64

THUMB = 32  # matching works on thumbnails: cheap for long videos, blind only to differences no one would see
ORDER_RATIO = 1.5  # frame i is out of place if another source frame fits it this much better...
ORDER_FLOOR = (2.0 / 255.0) ** 2  # ...and by more than this mean squared error (near-identical frames may swap)


def share_bounds(total: int, participants: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) shares of ``total`` frames, one per participant, the first ones one frame longer:
    every frame is in exactly one share and no share is empty."""
    if participants < 1:
        raise PisaError(f"participants is {participants}; it counts the master plus every worker (at least 1).")
    if total < participants:
        raise PisaError(f"{total} frame(s) cannot be shared among {participants} participants (a share would be "
                        "empty and its participant would never report back). Use fewer participants.")
    base, extra = divmod(total, participants)
    return [(i * base + min(i, extra), (i + 1) * base + min(i + 1, extra)) for i in range(participants)]


def share(images: torch.Tensor, participant: int, participants: int) -> torch.Tensor:
    """The frames participant ``participant`` (0 = master, k = the k-th worker) works on."""
    if not 0 <= participant < participants:
        raise PisaError(f"participant {participant} is outside 0..{participants - 1}. Set participants to 1 + the "
                        "number of workers, and give DistributedValue one value per worker (1, 2, ...).")
    start, end = share_bounds(images.shape[0], participants)[participant]
    return images[start:end]


def check_frames(results: torch.Tensor, source: torch.Tensor) -> str:
    """A one-line report when ``results`` holds one frame per ``source`` frame, in the same order; PisaError naming
    the missing or misplaced frames (1-based) otherwise."""
    n, m = results.shape[0], source.shape[0]
    h, w = source.shape[1:3]
    scale = min(1.0, THUMB / max(h, w))
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    r, s = (host64(F.interpolate(x[..., :3].movedim(-1, 1).to(torch.float32), size=size, mode="area").flatten(1))
            for x in (results, source))
    d = torch.cdist(r, s).pow(2) / r.shape[1]  # [n, m] mean squared error between thumbnails
    if n != m:
        found = set(d.argmin(dim=1).tolist()) if n else set()
        missing = [j + 1 for j in range(m) if j not in found]
        named = f"; frames not found among them: {_list(missing)}" if missing and n < m else ""
        raise PisaError(f"{n} of {m} frames came back{named}. A participant's share is missing or doubled: a "
                        "worker was offline and skipped, failed (see its log), or the prompt was queued with plain "
                        "Queue instead of the Distributed queue. Nothing was saved; fix that and queue again.")
    best = d.min(dim=1).values
    misplaced = [i + 1 for i in range(n) if d[i, i] > ORDER_RATIO * best[i] + ORDER_FLOOR]
    if misplaced:
        raise PisaError(f"all {m} frames came back but frames {_list(misplaced)} are out of order (they match other "
                        "source frames better). Check that participant values are 0 for the master and 1, 2, ... for "
                        "the workers in their listed order.")
    return f"all {m} frames came back in order"


def _list(idx: list[int], limit: int = 12) -> str:
    head = ", ".join(str(i) for i in idx[:limit])
    return head + (f" and {len(idx) - limit} more" if len(idx) > limit else "")
