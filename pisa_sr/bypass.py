"""Low-rank updates applied in the activations (``out += s * B(A(x))``) instead of merged into the weights.

This lets one UNet call on ``[z, z]`` produce two different LoRA configurations (one per batch half) from one copy of
the weights. Hooks are plain ``torch`` forward hooks, removed when the context exits, whatever happens inside.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checkpoint import LoraPair

__all__ = ["BypassTarget", "LowRankBypass", "lowrank_forward"]


@dataclass
class BypassTarget:
    """Add ``sign * pair(x)`` to ``module``'s output on batch rows ``start:stop`` (None = to the end)."""

    module: torch.nn.Module
    pair: LoraPair
    sign: float = 1.0


def lowrank_forward(pair: LoraPair, x: torch.Tensor, module: torch.nn.Module | None = None,
                    down: torch.Tensor | None = None, up: torch.Tensor | None = None) -> torch.Tensor:
    """``scale * B(A(x))`` with the module's own stride/padding/dilation for convolutions."""
    down = pair.down if down is None else down
    up = pair.up if up is None else up
    if pair.is_conv:
        stride = getattr(module, "stride", 1)
        padding = getattr(module, "padding", 0)
        dilation = getattr(module, "dilation", 1)
        h = F.conv2d(x, down, stride=stride, padding=padding, dilation=dilation)
        y = F.conv2d(h, up)
    else:
        y = F.linear(F.linear(x, down), up)
    return y * pair.scale


class LowRankBypass(AbstractContextManager):
    """Context manager that hooks ``targets`` for the rows ``rows`` of every batch (``slice(None)`` = all)."""

    def __init__(self, targets: list[BypassTarget], rows: slice = slice(None)):
        self.targets = targets
        self.rows = rows
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._cast: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _weights(self, i: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (i, like.device, like.dtype)
        w = self._cast.get(key)
        if w is None:
            pair = self.targets[i].pair
            w = (pair.down.to(like.device, like.dtype), pair.up.to(like.device, like.dtype))
            self._cast[key] = w
        return w

    def _make_hook(self, i: int):
        target = self.targets[i]

        def hook(module, inputs, output):
            x = inputs[0]
            rows = self.rows
            down, up = self._weights(i, x)
            delta = lowrank_forward(target.pair, x[rows], module, down, up)
            if target.sign != 1.0:
                delta = delta * target.sign
            if rows == slice(None):
                return output + delta.to(output.dtype)
            output = output.clone()
            output[rows] += delta.to(output.dtype)
            return output

        return hook

    def __enter__(self) -> "LowRankBypass":
        try:
            for i, t in enumerate(self.targets):
                self._handles.append(t.module.register_forward_hook(self._make_hook(i)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._cast.clear()

    def __exit__(self, *exc) -> None:
        self.remove()
        return None
