"""The shared input checks (pisa_sr.checks): one validator per kind of input, used by every node that takes it."""
from __future__ import annotations

import math

import pytest
import torch

from pisa_sr.checks import check_image, check_latent
from pisa_sr.errors import PisaError



def test_image_range():
    img = torch.rand(1, 8, 8, 4)
    assert check_image(img).shape == (1, 8, 8, 3)
    check_image(img * (1 + 1 / 512) - 1 / 1024)  # float overshoot from upstream arithmetic: accepted (clamped later)
    for bad in (img * 65535.0, img * 2 - 1, img * 1.1):
        with pytest.raises(PisaError, match="an IMAGE holds 0..1"):
            check_image(bad)
    with pytest.raises(PisaError, match="at least 8x8"):
        check_image(torch.rand(1, 4, 12, 3), min_side=8)
    with pytest.raises(PisaError, match="NaN or infinite"):
        check_image(torch.full((1, 2, 2, 3), math.nan))


def test_latent_names_the_node_to_connect():
    z = torch.zeros(1, 4, 8, 8)
    assert check_latent({"samples": z}, "X") is z
    for bad, words in ((z, "must be a LATENT: connect X"), ({"samples": torch.zeros(1, 16, 8, 8)}, "[B,4,h,w]"),
                       ({"samples": torch.full((1, 4, 2, 2), math.inf)}, "NaN or infinite")):
        with pytest.raises(PisaError) as e:
            check_latent(bad, "X")
        assert words in str(e.value) and "X" in str(e.value)
