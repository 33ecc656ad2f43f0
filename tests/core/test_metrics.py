"""Quality scores: PSNR/SSIM on Y against scikit-image, the no-reference heuristics on constructed images, and the
optional pyiqa path (only its refusals and its offline plumbing: no pyiqa or weights exist on the test host)."""
from __future__ import annotations

import math
import os
import socket
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pisa_sr import learned_metrics
from pisa_sr.metrics import METRICS, noise_sigma, psnr_y, rgb_to_y, score, sharpness, ssim_y


TOL = 1e-4


def _structured(h: int, w: int, seed: int) -> torch.Tensor:
    """Gradients, a checkerboard, a disc and sinusoids: edges and flat areas, not just noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    check = (((yy // 6) + (xx // 6)) % 2) * 0.4
    disc = ((yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 4) ** 2).double() * 0.3
    r = 0.1 + 0.5 * xx / w + check
    gch = 0.2 + 0.3 * torch.sin(xx / 5 + torch.rand(1, generator=g).item() * 6) * torch.cos(yy / 7) + disc
    b = 0.6 * yy / h + 0.2 * check
    return torch.stack([r, gch, b], dim=-1).clamp(0, 1)


def _pair(kind: str, b: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        ref = torch.rand(b, h, w, 3, generator=g, dtype=torch.float64)
        img = (ref + 0.15 * torch.randn(b, h, w, 3, generator=g, dtype=torch.float64)).clamp(0, 1)
    else:
        ref = torch.stack([_structured(h, w, seed + i) for i in range(b)])
        blurred = F.avg_pool2d(ref.permute(0, 3, 1, 2), 3, stride=1, padding=1, count_include_pad=False)
        noise = 0.03 * torch.randn(b, h, w, 3, generator=g, dtype=torch.float64)
        img = (blurred.permute(0, 2, 3, 1) + noise).clamp(0, 1)
    return img.float(), ref.float()


def _sk_y(x: torch.Tensor, crop: int) -> np.ndarray:
    y = rgb2ycbcr(x.double().numpy())[..., 0]
    return y[crop:-crop, crop:-crop] if crop else y


@pytest.mark.parametrize("kind,b,h,w,crop", [
    ("random", 2, 32, 32, 4), ("random", 1, 47, 61, 0), ("random", 3, 64, 40, 8),
    ("structured", 2, 96, 80, 4), ("structured", 1, 33, 120, 2), ("structured", 1, 128, 128, 4)])
def test_psnr_ssim_match_scikit_image(kind, b, h, w, crop):
    img, ref = _pair(kind, b, h, w, seed=h * 31 + w)
    ours_p, ours_s = psnr_y(img, ref, crop), ssim_y(img, ref, crop)
    assert ours_p.shape == (b,) and ours_s.shape == (b,)
    for i in range(b):
        y, y_ref = _sk_y(img[i], crop), _sk_y(ref[i], crop)
        sk_p = peak_signal_noise_ratio(y_ref, y, data_range=255)
        sk_s = structural_similarity(y, y_ref, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=255)
        assert abs(ours_p[i].item() - sk_p) < TOL, (ours_p[i].item(), sk_p)
        assert abs(ours_s[i].item() - sk_s) < TOL, (ours_s[i].item(), sk_s)


def test_rgb_to_y_is_bt601_studio_range():
    img = torch.rand(2, 9, 7, 3)
    y = rgb_to_y(img)
    expected = rgb2ycbcr(img.double().numpy())[..., 0]
    assert y.shape == (2, 9, 7) and y.dtype == torch.float64
    assert np.abs(y.numpy() - expected).max() < 1e-9
    corners = rgb_to_y(torch.tensor([[[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]]]))
    assert torch.allclose(corners, torch.tensor([[[16.0, 235.0]]], dtype=torch.float64))


def test_identical_images_psnr_inf_ssim_one():
    img = torch.stack([_structured(40, 40, 1), _structured(40, 40, 2)]).float()
    p = psnr_y(img, img.clone())
    assert torch.isinf(p).all() and (p > 0).all()
    assert torch.allclose(ssim_y(img, img.clone()), torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert score(img, "psnr", ref=img).isinf().all()


def test_single_reference_broadcasts_over_batch():
    img, ref = _pair("random", 3, 30, 30, seed=5)
    one = ref[:1]
    assert torch.equal(psnr_y(img, one), torch.stack([psnr_y(img[i:i + 1], one)[0] for i in range(3)]))
    assert torch.allclose(ssim_y(img, one), torch.stack([ssim_y(img[i:i + 1], one)[0] for i in range(3)]), atol=1e-12)


def test_psnr_and_ssim_order_by_degradation():
    ref = _structured(64, 64, 3).unsqueeze(0).float()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(ref.shape, generator=g)
    noisy = [(ref + s * noise).clamp(0, 1) for s in (0.01, 0.03, 0.1)]
    p = [psnr_y(x, ref).item() for x in noisy]
    s = [ssim_y(x, ref).item() for x in noisy]
    assert p[0] > p[1] > p[2] and s[0] > s[1] > s[2]


@pytest.mark.parametrize("img_shape,ref_shape", [((1, 32, 32, 3), (1, 32, 33, 3)), ((2, 32, 32, 3), (3, 32, 32, 3)),
                                                  ((1, 32, 32, 4), (1, 32, 32, 4)), ((32, 32, 3), (32, 32, 3))])
@pytest.mark.parametrize("fn", [psnr_y, ssim_y])
def test_shape_mismatch_is_a_clear_error(img_shape, ref_shape, fn):
    with pytest.raises(ValueError):
        fn(torch.rand(img_shape), torch.rand(ref_shape))


def test_metric_errors_are_the_packs_user_facing_type():
    from pisa_sr.errors import PisaError

    with pytest.raises(PisaError):
        psnr_y(torch.rand(1, 8, 8, 3), torch.rand(1, 9, 8, 3), crop_border=0)
    with pytest.raises(PisaError):
        score(torch.rand(1, 8, 8, 3), "nope")


def test_crop_leaving_too_little_is_an_error():
    img = torch.rand(1, 20, 20, 3)
    with pytest.raises(ValueError, match="too small"):
        ssim_y(img, img, crop_border=5)  # 10x10 left, window is 11x11
    with pytest.raises(ValueError, match="too small"):
        psnr_y(img, img, crop_border=10)
    with pytest.raises(ValueError):
        psnr_y(img, img, crop_border=-1)


def _gauss_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(4 * sigma + 0.5))
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-x * x / (2 * sigma * sigma))
    k = (k / k.sum()).to(img.dtype)
    c = img.shape[-1]
    t = img.permute(0, 3, 1, 2)
    t = F.pad(t, (r, r, r, r), mode="reflect")
    t = F.conv2d(t, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    t = F.conv2d(t, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return t.permute(0, 2, 3, 1)


@pytest.mark.parametrize("kind", ["random", "structured"])
def test_sharpness_falls_monotonically_with_blur(kind):
    _, ref = _pair(kind, 1, 96, 96, seed=11)
    values = [sharpness(ref).item()] + [sharpness(_gauss_blur(ref, s)).item() for s in (0.5, 1.0, 2.0, 3.0, 5.0)]
    assert all(a > b for a, b in zip(values, values[1:])), values


def test_sharpness_units_ramp_of_one_level_per_pixel_reads_one():
    ramp = (torch.arange(64, dtype=torch.float64) / 255).view(1, 1, 64, 1).expand(2, 40, 64, 3)
    assert torch.allclose(sharpness(ramp), torch.ones(2, dtype=torch.float64), atol=1e-9)
    flat = torch.full((1, 16, 16, 3), 0.4)
    assert sharpness(flat).item() == pytest.approx(0.0, abs=1e-6)


def _smooth_base() -> torch.Tensor:
    r = torch.arange(256, dtype=torch.float64)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    base = 0.5 + 0.15 * torch.sin(xx / 23.0) * torch.cos(yy / 17.0) + 0.05 * (xx / 256)
    return torch.stack([base, 0.9 * base + 0.05, 1.1 * base - 0.05], dim=-1).unsqueeze(0)


@pytest.mark.parametrize("sigma,channels,seed", [(2.0, 1, 20), (5.0, 1, 50), (10.0, 1, 100), (20.0, 1, 200),
                                                  (10.0, 3, 3)])
def test_noise_sigma_recovers_known_noise(sigma, channels, seed):
    """Gray noise reads as itself; independent per-channel noise as its luma mix."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(1, 256, 256, channels, generator=g, dtype=torch.float64) * (sigma / 255)
    expected = sigma if channels == 1 else sigma * math.sqrt(0.299**2 + 0.587**2 + 0.114**2)
    est = noise_sigma((_smooth_base() + n).float()).item()
    print(f"{channels}-channel noise sigma {sigma}: expects {expected:.3f}, estimated {est:.3f}")
    assert abs(est - expected) / expected < 0.15


def test_noise_sigma_is_small_on_clean_smooth_image_and_batchwise():
    clean = _smooth_base()
    g = torch.Generator().manual_seed(4)
    noisy = clean + torch.randn(clean.shape, generator=g, dtype=torch.float64) * (8 / 255)
    out = noise_sigma(torch.cat([clean, noisy]))
    assert out.shape == (2,)
    assert out[0] < 0.25 and out[1] > 4 * out[0]
    assert METRICS["noise"].direction == -1 and METRICS["sharpness"].direction == +1


def test_score_dispatch_and_metadata():
    img, ref = _pair("structured", 2, 48, 48, seed=9)
    assert torch.equal(score(img, "psnr", ref=ref), psnr_y(img, ref))
    assert torch.equal(score(img, "SSIM", ref=ref, crop_border=2), ssim_y(img, ref, 2))
    assert torch.equal(score(img, "sharpness", ref=ref), sharpness(img))
    assert torch.equal(score(img, "noise"), noise_sigma(img))
    with pytest.raises(ValueError, match="reference"):
        score(img, "psnr")
    with pytest.raises(ValueError, match="unknown metric"):
        score(img, "lpips")
    assert set(METRICS) == {"psnr", "ssim", "sharpness", "noise", "musiq", "clipiqa", "maniqa"}
    for name, spec in METRICS.items():
        assert spec.direction in (1, -1)
        assert spec.needs_reference == (name in ("psnr", "ssim"))
        assert spec.learned == (name in ("musiq", "clipiqa", "maniqa"))


# --- learned metrics: unavailable here, and never reaching for the network ----------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test, even one that the code under test catches."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"network attempted: {args!r}")

    for owner, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "create_connection"),
                        (socket, "getaddrinfo")):
        monkeypatch.setattr(owner, name, refuse)
    yield
    assert attempts == []


@pytest.mark.parametrize("name", ["musiq", "clipiqa", "maniqa"])
def test_learned_metric_without_pyiqa_is_a_clear_error(name, no_network, monkeypatch):
    if "pyiqa" in sys.modules:  # a real install would make this test meaningless; the host has none
        pytest.fail("pyiqa unexpectedly importable on the test host")
    assert learned_metrics.learned_metric_status(name)[0] is False
    img = torch.rand(1, 32, 32, 3)
    with pytest.raises(ValueError, match="pyiqa") as err:
        score(img, name)
    assert "pip install pyiqa" in str(err.value) and "never downloads" in str(err.value)
    assert "pyiqa" not in sys.modules


MUSIQ = "pyiqa/musiq_koniq_ckpt-e95806b9.pth"
# A stand-in `pyiqa` package that records what it is asked to build, and the offline state at that moment.
FAKE_PYIQA = {"pyiqa/utils/__init__.py": "", "pyiqa/archs/__init__.py": "",
              "pyiqa/utils/download_util.py": "def download_url_to_file(*a, **k):\n"
                                              "    raise AssertionError('real downloader reached')\n",
              "pyiqa/__init__.py": textwrap.dedent("""\
    import os
    import sys
    import torch
    calls = []

    class _Metric(torch.nn.Module):
        def forward(self, x):
            assert x.ndim == 4 and x.shape[1] == 3
            return x.mean(dim=(1, 2, 3)).unsqueeze(1) * 10

    def create_metric(name, device=None, **kw):
        from pyiqa.utils import download_util
        hub = sys.modules["huggingface_hub.constants"]
        calls.append((name, str(device), (hub.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")),
                      download_util.download_url_to_file))
        return _Metric()
    """)}


def _drop_pyiqa_modules() -> None:
    for mod in [m for m in sys.modules if m == "pyiqa" or m.startswith("pyiqa.")]:
        del sys.modules[mod]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub folder (with its pyiqa/ subfolder), with FAKE_PYIQA importable as `pyiqa`."""
    for rel, text in FAKE_PYIQA.items():
        (tmp_path / "site" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "site" / rel).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    hub = tmp_path / "hub"
    (hub / "pyiqa").mkdir(parents=True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(learned_metrics, "_metric_cache", {})
    _drop_pyiqa_modules()
    yield hub
    _drop_pyiqa_modules()


def test_learned_metric_with_pyiqa_but_missing_weights_builds_nothing(hub, no_network):
    img = torch.rand(1, 24, 24, 3)
    for name, expect in [("musiq", "musiq_koniq_ckpt"), ("clipiqa", "RN50.pt"), ("maniqa", "ckpt_koniq10k.pt")]:
        ok, reason = learned_metrics.learned_metric_status(name)
        assert not ok and expect in reason and "never downloads" in reason
        with pytest.raises(ValueError, match="weights are not on this machine"):
            learned_metrics.learned_score(img, name)
    # A CLIP file that is present but not the real one (checksum) is refused too, not "repaired" by downloading.
    (hub / "clip").mkdir()
    (hub / "clip" / "RN50.pt").write_bytes(b"truncated")
    ok, reason = learned_metrics.learned_metric_status("clipiqa")
    assert not ok and "SHA-256 mismatch" in reason
    assert "pyiqa" not in sys.modules or sys.modules["pyiqa"].calls == []


def test_learned_metric_with_local_weights_builds_offline_and_scores(hub, monkeypatch, no_network):
    torch.save({"params": {"w": torch.ones(2)}}, hub / MUSIQ)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as hub_constants

    online = hub_constants.HF_HUB_OFFLINE
    assert learned_metrics.learned_metric_status("musiq")[0]
    img = torch.rand(3, 16, 20, 3)
    out = score(img, "MUSIQ")
    assert out.shape == (3,) and out.dtype == torch.float64
    assert torch.allclose(out, img.double().mean(dim=(1, 2, 3)) * 10, atol=1e-6)
    import pyiqa  # the fake one

    assert len(pyiqa.calls) == 1
    name, device, offline, downloader = pyiqa.calls[0]
    assert name == "musiq" and device == "cpu"
    assert offline == (True, None)  # hub client offline while building, the process environment untouched
    assert downloader is learned_metrics._refuse_download  # pyiqa's downloader disabled while building
    # Restored afterwards, and the built metric is reused.
    assert os.environ.get("HF_HUB_OFFLINE") is None and hub_constants.HF_HUB_OFFLINE == online
    from pyiqa.utils import download_util

    assert download_util.download_url_to_file is not learned_metrics._refuse_download
    score(img, "musiq")
    assert len(pyiqa.calls) == 1


def test_learned_metric_weights_that_need_code_are_refused(hub, no_network):
    """pyiqa unpickles with weights_only=False: a checkpoint holding more than tensors never reaches it."""
    import argparse

    path = hub / MUSIQ
    torch.save({"params": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1.0)}, path)
    ok, reason = learned_metrics.learned_metric_status("musiq")
    assert not ok and str(path) in reason and "refused" in reason and "\n" not in reason
    with pytest.raises(ValueError, match="holds more than tensors"):
        learned_metrics.learned_score(torch.rand(1, 16, 16, 3), "musiq")
    path.write_bytes(b"not a checkpoint")  # damaged: refused the same way
    assert not learned_metrics.learned_metric_status("musiq")[0]
    assert "pyiqa" not in sys.modules or sys.modules["pyiqa"].calls == []
