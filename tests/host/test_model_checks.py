"""The base-model check also catches a changed noise schedule that keeps the EPS class (e.g. zsnr)."""
from __future__ import annotations

import pytest

import comfy.model_sampling as cms
import host
import tiny_models


class _EpsDiscrete(cms.ModelSamplingDiscrete, cms.EPS):  # what ComfyUI's ModelSamplingDiscrete node builds
    pass


def test_zsnr_schedule_refused_plain_eps_accepted():
    check_sd2_eps = host.pack("nodes.base_model").check_sd2_eps
    from pisa_sr import errors
    model = tiny_models.comfy_model_from_diffusers(None)
    plain = model.clone()
    plain.add_object_patch("model_sampling", _EpsDiscrete(model.model.model_config))
    check_sd2_eps(plain)  # identical schedule: accepted
    zsnr = model.clone()
    zsnr.add_object_patch("model_sampling", _EpsDiscrete(model.model.model_config, zsnr=True))
    with pytest.raises(errors.PisaError, match="noise schedule was changed"):
        check_sd2_eps(zsnr)
