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


@dataclass
class BypassTarget:
    """Add ``sign * pair(x)`` to ``module``'s output (on the rows the bypass selects)."""

    module: torch.nn.Module
    pair: LoraPair
    sign: float = 1.0


def _lowrank(pair: LoraPair, x: torch.Tensor, module: torch.nn.Module, down: torch.Tensor,
             up: torch.Tensor) -> torch.Tensor:
    """``B(A(x))`` with the cast factors (``up`` carries scale and sign); a conv uses the module's geometry."""
    if pair.is_conv:
        h = F.conv2d(x, down, stride=module.stride, padding=module.padding, dilation=module.dilation)
        return F.conv2d(h, up)
    return F.linear(F.linear(x, down), up)


class LowRankBypass(AbstractContextManager):
    """Context manager that hooks ``targets`` for the rows ``rows`` of every batch (``slice(None)`` = all).

    The LoRA factors are cast once per (device, dtype) and ``sign * scale`` is folded into ``up``, so a hook costs
    two small matmuls and one in-place add into the module's fresh output. The object can be entered again (with
    another ``rows``): the cast factors are kept for the object's life, so a tiled run copies them to the device once.
    """

    def __init__(self, targets: list[BypassTarget], rows: slice = slice(None)):
        self.targets = targets
        self.rows = rows
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._cast: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _weights(self, i: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (i, like.device, like.dtype)
        w = self._cast.get(key)
        if w is None:
            t = self.targets[i]
            up = t.pair.up.to(like.device, torch.float32) * (t.pair.scale * t.sign)
            w = (t.pair.down.to(like.device, like.dtype), up.to(like.dtype))
            self._cast[key] = w
        return w

    def _make_hook(self, i: int):
        target = self.targets[i]

        def hook(module, inputs, output):
            x = inputs[0]
            rows = self.rows
            down, up = self._weights(i, x)
            xs = x if rows == slice(None) else x[rows]
            if xs.shape[0] == 0:
                return output
            if not target.pair.is_conv and xs.is_contiguous() and output.is_contiguous():
                # out_rows += (x_rows @ A^T) @ (s*B)^T, fused into one addmm on a view of the output.
                h = F.linear(xs, down).reshape(-1, down.shape[0])
                delta = None
            else:
                delta = _lowrank(target.pair, xs, module, down, up).to(output.dtype)
            if output.requires_grad and torch.is_grad_enabled():
                output = output.clone()  # never modify a graph tensor in place
            view = output if rows == slice(None) else output[rows]
            if delta is None:
                view.view(-1, up.shape[0]).addmm_(h.to(output.dtype), up.t().to(output.dtype))
            else:
                view.add_(delta)
            return output

        return hook

    def __enter__(self) -> "LowRankBypass":
        try:
            for i, t in enumerate(self.targets):
                self._handles.append(t.module.register_forward_hook(self._make_hook(i)))
        except BaseException:
            self._unhook()
            raise
        return self

    def _unhook(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, *exc) -> None:
        self._unhook()
        return None
