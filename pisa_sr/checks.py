"""Checks of the tensors the nodes receive (IMAGE batches, LATENT dicts), shared by every node that takes them."""
from __future__ import annotations

import functools

import torch

from .errors import PisaError

# An IMAGE holds floats in [0, 1]; a little float overshoot from upstream arithmetic (1/255, or one rounding step of
# the IMAGE's dtype at 1.0 if coarser: 1/128 in bf16) is let through, more is refused.
IMAGE_SLACK = 1 / 255


def check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise PisaError(f"the {what} contains NaN or infinite values; the node that produced it is broken.")


def check_choice(what: str, value: object, options) -> None:
    """Refuse a value that is not one of ``options`` (ComfyUI 0.3.75 does not check V3 combo values at queue time)."""
    if value not in options:
        raise PisaError(f"unknown {what} {value!r}; choose one of {', '.join(options)}.")


def check_vae_output(t: torch.Tensor, what: str) -> None:
    """A VAE's output must be finite before anything (clamp, colour fix, the sampler) hides or spreads a NaN; a sum is
    one pass with no extra memory, and NaN/inf anywhere (or values big enough to overflow it) make it non-finite."""
    if not torch.isfinite(t.sum()):
        raise PisaError(f"the VAE {what} NaN or infinite values: a 16-bit (fp16) VAE overflowed. Run the VAE in bf16 "
                        "or fp32 (ComfyUI: --bf16-vae or --fp32-vae, or a loader that sets the VAE dtype) and queue "
                        "again.")


def check_image(image: object, what: str = "image", *, min_side: int = 1, channels: tuple[int, ...] = (3, 4)
                ) -> torch.Tensor:
    """An IMAGE batch ``[B,H,W,C]`` (C in ``channels``), non-empty, finite, values in [0, 1] -> its RGB channels;
    ``what`` names it in the messages."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        raise PisaError(f"expected an IMAGE batch [B,H,W,C], got {getattr(image, 'shape', type(image))}. "
                        "Connect an IMAGE output (e.g. Load Image).")
    b, h, w, c = image.shape
    if b == 0:
        raise PisaError(f"the {what} batch is empty. Connect a Load Image node that produced an image.")
    if c not in channels:
        raise PisaError(f"expected RGB images (3 channels), got {c} channels.")
    if h < min_side or w < min_side:
        raise PisaError(f"the {what} is {w}x{h} px; PiSA-SR needs at least {min_side}x{min_side} px.")
    check_finite(image, what)
    lo, hi = image.min().item(), image.max().item()
    slack = max(IMAGE_SLACK, torch.finfo(image.dtype).eps if image.is_floating_point() else 0.0)
    if lo < -slack or hi > 1 + slack:
        raise PisaError(f"the {what} has values from {lo:.4g} to {hi:.4g}, but an IMAGE holds 0..1. A 16-bit, HDR "
                        "or normalised (-1..1) image must be scaled to 0..1 before this node.")
    return image[..., :3]


check_rgb = functools.partial(check_image, channels=(3,))  # exactly R, G, B (the quality scores)


def check_latent(latent: object, connect: str) -> torch.Tensor:
    """The ``samples`` of an SD LATENT ``[B,4,h,w]``, non-empty and finite; ``connect`` names the node to use."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise PisaError(f"'latent' must be a LATENT: connect {connect}.")
    if samples.dim() != 4 or samples.shape[1] != 4 or samples.shape[0] == 0:
        raise PisaError(f"expected an SD latent [B,4,h,w], got {tuple(samples.shape)}. Connect the LATENT of "
                        f"{connect}.")
    if not torch.isfinite(samples).all():
        raise PisaError(f"the latent contains NaN or infinite values; the node that produced it is broken. "
                        f"Connect the LATENT of {connect}.")
    return samples
