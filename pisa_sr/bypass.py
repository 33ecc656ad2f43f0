"""Low-rank updates applied in the activations (``out += s * B(A(x))``) instead of merged into the weights.

So one UNet call on ``[z, z]`` gives two LoRA configurations (one per batch half) from one copy of the weights.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checkpoint import LoraPair


@dataclass
class BypassTarget:
    """Add ``sign * pair(x)`` to ``module``'s output (on the rows the bypass selects)."""

    module: torch.nn.Module
    pair: LoraPair
    sign: float = 1.0


class LowRankBypass(AbstractContextManager):
    """Forward hooks on ``targets`` for the rows ``rows`` of every batch, removed on exit whatever happens.

    The factors are cast once per (device, dtype) with ``sign * scale`` folded into ``up`` and kept for the object's
    life, so it can be entered again (with other ``rows``) and a tiled run copies them to the device once.
    ``ran[i]``: target i's hook ran since entered (False after a forward: the module ran without it, e.g. a
    compiled graph traced without the hooks).
    """

    def __init__(self, targets: list[BypassTarget], rows: slice = slice(None)):
        self.targets = targets
        self.rows = rows
        self.ran = [False] * len(targets)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._cast: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _weights(self, i: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (i, like.device, like.dtype)
        if key not in self._cast:
            t = self.targets[i]
            up = t.pair.up.to(like.device, torch.float32) * (t.pair.scale * t.sign)
            self._cast[key] = (t.pair.down.to(like.device, like.dtype), up.to(like.dtype))
        return self._cast[key]

    def _make_hook(self, i: int):
        pair = self.targets[i].pair

        def hook(module, inputs, output):
            self.ran[i] = True
            rows = self.rows
            down, up = self._weights(i, inputs[0])
            xs = inputs[0][rows]
            if xs.shape[0] == 0:
                return output
            fused = not pair.is_conv and xs.is_contiguous() and output.is_contiguous()
            if fused:  # out_rows += (x_rows @ A^T) @ (s*B)^T as one addmm on a view of the output
                h = F.linear(xs, down).reshape(-1, down.shape[0])
            elif pair.is_conv:
                h = F.conv2d(xs, down, stride=module.stride, padding=module.padding, dilation=module.dilation)
                delta = F.conv2d(h, up).to(output.dtype)
            else:
                delta = F.linear(F.linear(xs, down), up).to(output.dtype)
            if output.requires_grad and torch.is_grad_enabled():
                output = output.clone()  # never modify a graph tensor in place
            if fused:
                output[rows].view(-1, up.shape[0]).addmm_(h.to(output.dtype), up.t().to(output.dtype))
            else:
                output[rows].add_(delta)
            return output

        return hook

    def __enter__(self) -> "LowRankBypass":
        self.ran = [False] * len(self.targets)
        try:
            for i, t in enumerate(self.targets):
                self._handles.append(t.module.register_forward_hook(self._make_hook(i)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
