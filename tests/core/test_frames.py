"""The slice rule and the frame check of distributed runs (pisa_sr/frames.py), on plain tensors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pisa_sr.errors import PisaError
from pisa_sr.frames import check_frames, share, share_bounds



@pytest.mark.parametrize("total,parts", [(3, 3), (6, 3), (7, 3), (48, 5), (1, 1)])
def test_shares_cover_every_frame_once_and_none_is_empty(total, parts):
    frames = torch.arange(total).float().view(total, 1, 1, 1).expand(total, 2, 2, 3)
    got = torch.cat([share(frames, p, parts) for p in range(parts)])
    assert torch.equal(got, frames)
    assert all(end > start for start, end in share_bounds(total, parts))


def test_share_refuses_what_would_lose_a_share():
    with pytest.raises(PisaError, match="fewer participants"):
        share_bounds(2, 3)
    with pytest.raises(PisaError, match="1 \\+ the number of workers"):
        share(torch.rand(3, 4, 4, 3), 3, 3)


def _clip(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n distinct LQ frames and their 4x 'upscales' (bicubic plus a little noise, like a restoration)."""
    g = torch.Generator().manual_seed(0)
    src = torch.rand(n, 8, 10, 3, generator=g)
    up = F.interpolate(src.movedim(-1, 1), scale_factor=4, mode="bicubic").movedim(1, -1)
    return (up + 0.02 * torch.randn(up.shape, generator=g)).clamp(0, 1), src


def test_check_passes_every_frame_in_order():
    up, src = _clip(5)
    assert check_frames(up, src) == "all 5 frames came back in order"


@pytest.mark.parametrize("n,order,match", [
    (6, [0, 1, 2, 3], r"^4 of 6 frames came back; frames not found among them: 5, 6\."),
    (4, [0, 2, 1, 3], "frames 2, 3 are out of order")], ids=["missing", "out-of-order"])
def test_check_names_missing_and_reordered_frames(n, order, match):
    up, src = _clip(n)
    with pytest.raises(PisaError, match=match):
        check_frames(up[order], src)


def test_check_tolerates_near_identical_frames_in_any_order():
    up, src = _clip(1)
    src = src.expand(3, -1, -1, -1) + torch.tensor([0.0, 0.001, -0.001]).view(3, 1, 1, 1)
    assert check_frames(up.expand(3, -1, -1, -1)[[2, 0, 1]], src.clamp(0, 1)).startswith("all 3")
