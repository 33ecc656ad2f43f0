"""One exception type for every refusal the pack gives, so nodes can show a clean message instead of a trace."""
from __future__ import annotations


class PisaError(ValueError):
    """A user-facing refusal: the message says what is wrong and how to fix it."""


class CheckpointError(PisaError):
    """The PiSA-SR LoRA file is missing, unsafe, malformed or does not fit the model."""
