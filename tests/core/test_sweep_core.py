"""Lambda sweep core: settings parser, labels, the linear combination, the choose-best rule, and the labelled grid."""
from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pisa_sr.grid import default_font_size, grid_layout, labelled_grid
from pisa_sr.guidance import LAMBDA_MAX, LAMBDA_MIN, check_lambda
from pisa_sr.sweep import MAX_SETTINGS, choose_best, combine, format_label, parse_lambda_pairs


LO, HI = LAMBDA_MIN, LAMBDA_MAX
lam = st.floats(min_value=LO, max_value=HI, allow_nan=False, allow_infinity=False)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- check_lambda ---------------------------------------------------------------------------------------------------
def test_check_lambda_accepts_range_and_refuses_the_rest():
    assert (LAMBDA_MIN, LAMBDA_MAX) == (-2.0, 4.0)
    assert check_lambda("lambda_pix", 1) == 1.0 and isinstance(check_lambda("lambda_pix", 1), float)
    assert check_lambda("x", LO) == LO and check_lambda("x", HI) == HI
    for bad in (float("nan"), float("inf"), -float("inf"), HI + 1e-9, LO - 1e-9, 10.0):
        with pytest.raises(ValueError, match="lambda_sem"):
            check_lambda("lambda_sem", bad)
    with pytest.raises(ValueError, match="number"):
        check_lambda("lambda_pix", "abc")


# --- parse_lambda_pairs -----------------------------------------------------------------------------------------------
def test_parse_explicit_list_forms():
    expected = [(0.5, 1.0), (1.0, 1.0), (1.0, 1.5)]
    assert parse_lambda_pairs("0.5,1; 1,1; 1,1.5") == expected
    assert parse_lambda_pairs("0.5, 1\n1 ,1\n\n 1,   1.5 ;") == expected
    assert parse_lambda_pairs("(0.5, 1); [1, 1]; 1 1.5") == expected
    assert parse_lambda_pairs("-1,2.5") == [(-1.0, 2.5)]


def test_parse_grid_spec_is_cartesian_pix_outer_sem_inner():
    pairs = parse_lambda_pairs("pix=0.5:1.5:0.5 sem=0.5:1.5:0.5")
    vals = [0.5, 1.0, 1.5]
    assert pairs == [(p, s) for p in vals for s in vals]
    assert parse_lambda_pairs("pix = 1  sem = 0:1:0.5") == [(1.0, 0.0), (1.0, 0.5), (1.0, 1.0)]
    assert parse_lambda_pairs("sem=1.5, pix=0.8") == [(0.8, 1.5)]
    # Steps print as typed, descending ranges work, a missing lambda stays at the default 1.0.
    assert parse_lambda_pairs("sem=0:0.3:0.1") == [(1.0, 0.0), (1.0, 0.1), (1.0, 0.2), (1.0, 0.3)]
    assert parse_lambda_pairs("pix=2:1:-0.5") == [(2.0, 1.0), (1.5, 1.0), (1.0, 1.0)]
    # The stop is included only when a whole number of steps reaches it.
    assert parse_lambda_pairs("pix=0:1:0.4") == [(0.0, 1.0), (0.4, 1.0), (0.8, 1.0)]
    assert parse_lambda_pairs("lambda_pix=1 lambda_sem=2") == [(1.0, 2.0)]


@pytest.mark.parametrize("text,fragment", [
    ("0.5,1; 1,x; 1,1.5", "1,x"), ("0.5,1; 1; 1,1.5", "1"), ("0.5,1,2", "0.5,1,2"), ("1,9", "lambda_sem"),
    ("nan,1", "lambda_pix"), ("1,inf", "lambda_sem"), ("pix=0:1", "pix=0:1"), ("pix=0:1:0", "pix=0:1:0"),
    ("pix=0:1:-0.5", "pix=0:1:-0.5"), ("pix=0:1:0.5 foo=1", "foo=1"), ("pix=1 pix=2", "pix=2"),
    ("pix=1 0.5,1", "0.5"), ("pix=", "pix="), ("pix=0:5:1", "lambda_pix"), ("pix=a:1:0.5", "pix=a:1:0.5"),
    ("pix=0:4:1e-320", "pix=0:4:1e-320"),
    ("", "no lambda settings"), ("   ", "no lambda settings"), ("\n;\n ; ", "no lambda settings"),
])
def test_parse_errors_quote_the_bad_fragment(text, fragment):
    with pytest.raises(ValueError) as err:
        parse_lambda_pairs(text)
    assert fragment in str(err.value)


def test_parse_caps_the_number_of_settings():
    ok = "; ".join(["1,1"] * MAX_SETTINGS)
    assert len(parse_lambda_pairs(ok)) == MAX_SETTINGS
    assert len(parse_lambda_pairs("pix=0:0.7:0.1 sem=0:0.7:0.1")) == 64
    for text in (ok + "; 1,1", "pix=0:0.8:0.1 sem=0:0.7:0.1", "sem=-2:4:0.01"):  # 65, 9 x 8, 601 settings
        with pytest.raises(ValueError, match=str(MAX_SETTINGS)):
            parse_lambda_pairs(text)


@FAST
@given(
    pairs=st.lists(st.tuples(lam, lam), min_size=1, max_size=MAX_SETTINGS),
    pair_sep=st.sampled_from([";", "; ", " ;\n", "\n", "\n\n"]),
    num_sep=st.sampled_from([",", ", ", " , ", " ", "\t"]),
)
def test_formatted_lists_round_trip_exactly(pairs, pair_sep, num_sep):
    text = pair_sep.join(f"{lp!r}{num_sep}{ls!r}" for lp, ls in pairs)
    assert parse_lambda_pairs(text) == pairs
    assert parse_lambda_pairs("; ".join(f"{lp!r},{ls!r}" for lp, ls in pairs)) == pairs  # the shortest list form


@FAST
@given(start=st.integers(-8, 16), n=st.integers(1, 8), step=st.sampled_from([0.25, 0.5]), sem=st.integers(-8, 16))
def test_grid_ranges_round_trip(start, n, step, sem):
    a = start * 0.25
    b = a + (n - 1) * step
    if b > HI:
        return
    pairs = parse_lambda_pairs(f"pix={a}:{b}:{step} sem={sem * 0.25}")
    assert pairs == [(a + i * step, sem * 0.25) for i in range(n)]


@FAST
@given(text=st.text(max_size=60))
def test_arbitrary_text_parses_to_valid_settings_or_raises_value_error(text):
    try:
        pairs = parse_lambda_pairs(text)
    except ValueError as err:
        assert str(err)
        return
    assert 1 <= len(pairs) <= MAX_SETTINGS
    assert all(LO <= v <= HI and math.isfinite(v) for p in pairs for v in p)


@FAST
@given(
    pairs=st.lists(st.tuples(lam, lam), min_size=1, max_size=6),
    junk=st.text(alphabet="abcxyz#$%!?", min_size=1, max_size=4),
    where=st.integers(0, 5),
)
def test_garbage_in_a_valid_list_is_rejected_with_its_fragment(pairs, junk, where):
    frags = [f"{lp!r},{ls!r}" for lp, ls in pairs]
    i = where % len(frags)
    frags[i] = frags[i] + junk
    with pytest.raises(ValueError) as err:
        parse_lambda_pairs("; ".join(frags))
    assert frags[i] in str(err.value)


# --- labels ---------------------------------------------------------------------------------------------------------
def test_format_label_is_ascii_and_distinguishes_settings():
    assert format_label(1, 1.5) == "pix 1.00 / sem 1.50"
    assert format_label(-0.5, 0) == "pix -0.50 / sem 0.00"
    assert format_label(0.125, 1) != format_label(0.13, 1)
    assert format_label(0.125, 1).isascii()


def test_format_label_renders_with_the_grid_font():
    """Every character of a label has a real glyph in the grid font (no 'missing glyph' boxes)."""
    from PIL import Image, ImageDraw

    from pisa_sr.grid import _font

    font, _ = _font(24)

    def ink(ch: str) -> bytes:
        im = Image.new("L", (48, 48))
        ImageDraw.Draw(im).text((4, 4), ch, font=font, fill=255)
        return im.tobytes()

    missing = ink("\uffff")
    for ch in set(format_label(-1.25, 3.5)) - {" "}:
        assert ink(ch) != missing, ch


# --- combine ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_combine_matches_direct_formula(dtype):
    g = torch.Generator().manual_seed(1)
    eps_pix = torch.randn(2, 4, 16, 24, generator=g).to(dtype)
    eps_sem = torch.randn(2, 4, 16, 24, generator=g).to(dtype)
    pairs = parse_lambda_pairs("pix=0:2:0.5 sem=-1:2:1.5") + [(1.0, 1.0), (1.0, 0.0)]
    out = combine(eps_pix, eps_sem, pairs)
    assert out.shape == (len(pairs), 2, 4, 16, 24) and out.dtype == dtype
    p32, s32 = eps_pix.float(), eps_sem.float()
    for i, (lp, ls) in enumerate(pairs):
        direct = lp * p32 + ls * (s32 - p32)
        if dtype == torch.float32:
            assert (out[i] - direct).abs().max().item() <= 1e-6
        else:  # one rounding of the fp32 result into the low-precision output
            assert torch.equal(out[i], direct.to(dtype)) or torch.allclose(out[i].float(), direct, rtol=1e-2, atol=1e-2)
    # The release's special cases: (1,1) is eps_sem, (1,0) is eps_pix.
    assert torch.allclose(out[-2].float(), s32, atol=1e-6)
    assert torch.allclose(out[-1].float(), p32, atol=0)


def test_combine_reproduces_the_samplers_combination_bit_for_bit():
    """Issue 6's contract at the core level: a sweep setting equals the sampler's single-setting combination."""
    from pisa_sr import guidance

    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.float16):
        eps_pix = torch.randn(1, 4, 24, 20, generator=g).to(dtype)
        eps_sem = torch.randn(1, 4, 24, 20, generator=g).to(dtype)
        pairs = parse_lambda_pairs("pix=-0.5:2:0.5 sem=0:1.5:0.75")
        out = combine(eps_pix, eps_sem, pairs, dtype=torch.float32)
        for i, (lp, ls) in enumerate(pairs):
            assert torch.equal(out[i], guidance.combine_eps(eps_pix, eps_sem, lp, ls))


def test_errors_are_the_packs_user_facing_type():
    from pisa_sr.errors import PisaError

    with pytest.raises(PisaError):
        parse_lambda_pairs("1,x")
    with pytest.raises(PisaError):
        choose_best([1.0], [], floor=0)
    with pytest.raises(PisaError):
        labelled_grid(torch.rand(2, 8, 8, 3), ["a"])


def test_combine_output_dtype_and_errors():
    a, b = torch.randn(1, 4, 8, 8, dtype=torch.float16), torch.randn(1, 4, 8, 8, dtype=torch.float16)
    assert combine(a, b, [(1, 1)], dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        combine(a, b[..., :4], [(1, 1)])
    with pytest.raises(ValueError, match="lambda_sem"):
        combine(a, b, [(1, 7)])
    with pytest.raises(ValueError):
        combine(a, b, [])


# --- choose_best ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quality,fidelity,floor,want,words", [
    # the best quality (index 1) is under the floor
    ([10.0, 50.0, 40.0, 30.0], [30.0, 20.0, 25.0, 28.0], 24.0, 2, ["setting 3", "24"]),
    ([10.0, 50.0, 40.0, 30.0], [30.0, 20.0, 25.0, 28.0], 0.0, 1, []),
    ([10.0, 50.0, 40.0, 30.0], [30.0, 20.0, 25.0, 28.0], 29.0, 0, []),
    ([5.0, 7.0, 7.0, 7.0], [1, 1, 1, 1], 1, 1, []),  # ties go to the first
    ([2.0, 2.0], [0, 0], 5, 0, []),  # fidelity tie in the fallback, too
    ([math.nan, 3.0, math.nan, 2.0], [30, 30, 30, 30], 20, 1, []),  # NaN quality is ignored
    ([9.0, 3.0], [math.nan, 30], 20, 1, []),  # NaN fidelity never passes the floor
    ([1.0, 2.0], [float("inf"), 30], 40, 0, []),  # identical-image PSNR passes
    ([9.0, 8.0, 7.0], [20.0, 22.0, 21.0], 30.0, 1, ["no setting reached the fidelity floor", "highest-fidelity"]),
    ([math.nan, math.nan], [35.0, 31.0], 30.0, 0, ["none has a valid quality score"]),
    ([1.0, 2.0], [math.nan, math.nan], 30.0, 0, ["no setting has a valid fidelity"]),
])
def test_choose_best(quality, fidelity, floor, want, words):
    idx, why = choose_best(quality, fidelity, floor=floor)
    assert idx == want and all(w in why for w in words), (idx, why)


def test_choose_best_lower_is_better():
    idx, why = choose_best([3.0, 1.0, 2.0], [30, 10, 30], floor=20, higher_is_better=False)
    assert idx == 2 and "lowest" in why


def test_choose_best_errors():
    for q, f, floor in (([1.0], [1.0, 2.0], 0), ([], [], 0), ([1.0], [1.0], math.nan)):
        with pytest.raises(ValueError):
            choose_best(q, f, floor=floor)


@FAST
@given(data=st.lists(st.tuples(st.floats(-1e3, 1e3) | st.just(math.nan), st.floats(0, 50) | st.just(math.nan)),
                     min_size=1, max_size=12), floor=st.floats(0, 50))
def test_choose_best_agrees_with_a_brute_force_rule(data, floor):
    q, f = [d[0] for d in data], [d[1] for d in data]
    idx, _ = choose_best(q, f, floor)
    ok = [i for i in range(len(q)) if not math.isnan(f[i]) and f[i] >= floor and not math.isnan(q[i])]
    if ok:
        assert idx == min(ok, key=lambda i: (-q[i], i))
    else:
        valid = [i for i in range(len(f)) if not math.isnan(f[i])]
        assert idx == (min(valid, key=lambda i: (-f[i], i)) if valid else 0)


# --- labelled grid ----------------------------------------------------------------------------------------------------
def _tiles(n: int, h: int, w: int, c: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(n * 100 + h)
    return torch.rand(n, h, w, c, generator=g)


@pytest.mark.parametrize("n,columns,rows_cols", [(1, None, (1, 1)), (4, None, (2, 2)), (5, None, (2, 3)),
                                                 (9, None, (3, 3)), (5, 2, (3, 2)), (3, 10, (1, 3))])
def test_grid_shape_and_tile_placement(n, columns, rows_cols):
    h, w, pad = 96, 80, 4
    imgs = _tiles(n, h, w)
    labels = [format_label(0.5 * i, 1.0) for i in range(n)]
    out = labelled_grid(imgs, labels, columns=columns, pad=pad)
    rows, cols = rows_cols
    assert grid_layout(n, columns) == rows_cols
    assert out.shape == (1, rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, 3)
    assert out.dtype == imgs.dtype
    for i in range(n):
        r, c = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
        tile = out[0, y0 : y0 + h, x0 : x0 + w]
        # Away from the top-left banner every pixel is the input, exactly.
        assert torch.equal(tile[h // 2 :], imgs[i, h // 2 :])
        assert torch.equal(tile[:, w - 8 :][h // 3 :], imgs[i, h // 3 :, w - 8 :])
        # The banner changed pixels, and it is dark box with light text.
        banner = tile[:8, :8]
        assert not torch.equal(banner, imgs[i, :8, :8])
        assert (tile[1:3, 1:3] - 0.08).abs().max() < 1e-6
    # Padding and unused cells keep the background.
    assert (out[0, :pad] == 1.0).all() and (out[0, :, :pad] == 1.0).all()
    if rows * cols > n:
        assert (out[0, -pad - h :, -pad - w :] == 1.0).all()


def test_grid_banner_has_light_text_and_scales_with_tile_size():
    small = labelled_grid(torch.zeros(1, 64, 64, 3) + 0.5, ["pix 1.00 / sem 1.50"], pad=0)
    large = labelled_grid(torch.zeros(1, 512, 512, 3) + 0.5, ["pix 1.00 / sem 1.50"], pad=0)

    def banner_extent(img: torch.Tensor) -> tuple[int, int]:
        changed = (img[0] != 0.5).any(dim=-1)
        ys, xs = changed.nonzero(as_tuple=True)
        return int(ys.max()) + 1, int(xs.max()) + 1

    (hs, ws), (hl, wl) = banner_extent(small), banner_extent(large)
    assert hl > 2 * hs and wl > 2 * ws
    assert ws <= 64 and hs < 32  # fitted into the small tile
    assert large.max() > 0.9  # light text drawn
    assert default_font_size(512, 512) > default_font_size(64, 64)


def test_grid_long_label_stays_inside_its_tile_and_empty_label_draws_nothing():
    imgs = _tiles(2, 40, 40)
    out = labelled_grid(imgs, ["a very long label that cannot possibly fit " * 3, ""], columns=2, pad=3)
    assert torch.equal(out[0, 3:43, 46:86], imgs[1])  # empty label: tile untouched
    assert (out[0, :, 43:46] == 1.0).all()  # the gap between tiles is not painted over
    assert (out[0, :3] == 1.0).all()


def test_grid_keeps_rgba_and_dtype_and_custom_font():
    imgs = torch.rand(2, 48, 48, 4, dtype=torch.float64)
    out = labelled_grid(imgs, ["pix 1.00 / sem 1.00", "x"], pad=2, font_size=9, background=0.0)
    assert out.shape == (1, 48 + 4, 2 * 48 + 6, 4) and out.dtype == torch.float64
    assert out[0, 3, 3, 3] == 1.0  # banner alpha opaque


def test_grid_errors():
    imgs = _tiles(3, 16, 16)
    with pytest.raises(ValueError, match="3 images"):
        labelled_grid(imgs, ["a", "b"])
    for args, kw in (((imgs[:0], []), {}), ((imgs, list("abc")), {"pad": -1}), ((imgs[0], ["a"]), {}),
                     ((imgs, list("abc")), {"font_size": 0})):
        with pytest.raises(ValueError):
            labelled_grid(*args, **kw)


def test_module_has_no_comfy_import():
    import pisa_sr.grid
    import pisa_sr.metrics
    import pisa_sr.sweep

    for mod in (pisa_sr.grid, pisa_sr.metrics, pisa_sr.sweep):
        src = open(mod.__file__, encoding="utf-8").read()
        assert not re.search(r"^\s*(import|from)\s+(comfy|skimage|scipy)\b", src, re.M), mod.__name__
