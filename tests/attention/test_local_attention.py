"""Window (Swin) and neighborhood (NATTEN) attention against exact attention under their masks, the masks
against their definitions written out with loops, finite differences, bad input."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pytest
from conftest import np_

from attention_ref import attention_backward, attention_forward
from attention_ref.attention import (
    neighborhood_attention_backward,
    neighborhood_attention_forward,
    neighborhood_mask,
    window_attention_backward,
    window_attention_forward,
    window_mask,
)
from attention_ref.gradcheck import check_backward, rel_error

TOL = 1e-12
FD_TOL = 1e-7


def make_maps(rng, lead, H, W, d, dv):
    return (
        rng.standard_normal((*lead, H, W, d)),
        rng.standard_normal((*lead, H, W, d)),
        rng.standard_normal((*lead, H, W, dv)),
    )


def as_pair(n):
    """A window, shift or kernel as ``(rows, columns)``: an int stands for both."""
    return (n, n) if isinstance(n, int) else tuple(n)


def flat(x):
    """``(..., H, W, c) → (..., H·W, c)``, token = row·W + col."""
    return x.reshape(*x.shape[:-3], x.shape[-3] * x.shape[-2], x.shape[-1])


def check_against_exact(be, rng, forward, backward, make_mask, case):
    """``forward``/``backward`` with ``case``'s options on its maps equal exact attention on the flattened tokens
    under ``make_mask(H, W, **options)``; returns both caches."""
    lead, H, W, d, dv = case.unpack()
    scale = case.scale
    mask = make_mask(H, W, **case.options)
    q, k, v = make_maps(rng, lead, H, W, d, dv)
    out_ref, cache_ref = attention_forward(flat(q), flat(k), flat(v), mask=mask, scale=scale)
    dout = rng.standard_normal((*lead, H, W, dv))
    g_ref = attention_backward(flat(dout), cache_ref)
    out, cache = forward(be(q), be(k), be(v), **case.options, scale=scale)
    grads = backward(be(dout), cache)
    assert be.is_native(out) and out.shape == (*lead, H, W, dv)
    assert rel_error(flat(np_(out)), out_ref) <= TOL
    assert set(grads) == {"q", "k", "v"}
    for name in grads:
        assert be.is_native(grads[name])
        assert rel_error(flat(np_(grads[name])), g_ref[name]) <= TOL, name
    return cache, cache_ref


def check_finite_differences(rng, forward, backward, case):
    """``backward`` matches central finite differences of ``forward`` with ``case``'s options (first lead only)."""
    lead, H, W, d, dv = case.unpack()
    q, k, v = make_maps(rng, lead[:1], H, W, d, dv)
    forward = partial(forward, **case.options, scale=case.scale)
    errs = check_backward(forward, backward, {"q": q, "k": k, "v": v})
    assert max(errs.values()) < FD_TOL, errs


# ---------------------------------------------------------------- the cases: window and neighborhood attention


@dataclass(frozen=True)
class MapCase:
    """q, k (*lead, H, W, d) and v (*lead, H, W, dv); the options of window attention (``window``, ``shift``) or of
    neighborhood attention (``kernel``), which its mask takes too; the scale."""

    lead: tuple[int, ...]
    grid: tuple[int, int]  # (H, W)
    dims: tuple[int, int]  # (d, dv)
    options: dict[str, Any]
    scale: float | None = None

    def unpack(self):
        return (self.lead, *self.grid, *self.dims)


WINDOW_CASES = {
    "no shift": MapCase((2,), (8, 12), (4, 3), {"window": 4}),
    "Swin shift w/2": MapCase((2, 2), (8, 8), (3, 5), {"window": 4, "shift": 2}),
    "shift 1": MapCase((1,), (6, 9), (2, 2), {"window": 3, "shift": 1}, scale=0.8),
    "rectangular window and shift": MapCase((2,), (8, 6), (3, 3), {"window": (4, 2), "shift": (3, 1)}),
    "one window = global": MapCase((1,), (4, 6), (3, 2), {"window": (4, 6)}),
    "1×1 windows": MapCase((2,), (3, 4), (2, 2), {"window": 1}),
}
WINDOW_FD_CASES = ["no shift", "Swin shift w/2", "shift 1", "rectangular window and shift"]

NEIGHBORHOOD_CASES = {
    "kernel 3": MapCase((2,), (7, 9), (4, 3), {"kernel": 3}),
    "kernel 5": MapCase((2, 2), (8, 6), (3, 5), {"kernel": 5}, scale=0.6),
    "kernel 7 on 7×10": MapCase((1,), (7, 10), (2, 2), {"kernel": 7}),
    "rectangular kernel": MapCase((2,), (9, 5), (3, 3), {"kernel": (5, 3)}),
    "kernel = map = global": MapCase((1,), (5, 3), (2, 2), {"kernel": (5, 3)}),
    "kernel 1 = itself": MapCase((2,), (3, 4), (2, 2), {"kernel": 1}),
}
NEIGHBORHOOD_FD_CASES = ["kernel 3", "kernel 5", "kernel 7 on 7×10", "rectangular kernel"]


# ---------------------------------------------------------------- window attention


@pytest.mark.parametrize("name", WINDOW_CASES)
def test_window_attention_equals_exact_attention_under_window_mask(name, be, rng):
    case = WINDOW_CASES[name]
    cache, _ = check_against_exact(be, rng, window_attention_forward, window_attention_backward, window_mask, case)
    lead, H, W, _, _ = case.unpack()
    window = case.options["window"]
    wh, ww = as_pair(window)
    assert tuple(cache.weights.shape) == (*lead, H // wh, W // ww, wh * ww, wh * ww)
    np.testing.assert_allclose(np_(cache.weights).sum(-1), 1.0, atol=1e-14)  # a pixel always sees itself


@pytest.mark.parametrize("name", WINDOW_FD_CASES)
def test_window_attention_backward_matches_finite_differences(name, rng):
    check_finite_differences(rng, window_attention_forward, window_attention_backward, WINDOW_CASES[name])


def window_mask_by_definition(H, W, wh, ww, sh, sw):
    """Two pixels attend iff they are in the same window of a grid offset by the shift, no wrap-around:
    window boundaries sit at sh, sh + wh, sh + 2·wh, … (rows) and the pixels above sh form their own band."""
    row_edges = [0, *range(sh, H, wh), H] if sh else [*range(0, H, wh), H]
    col_edges = [0, *range(sw, W, ww), W] if sw else [*range(0, W, ww), W]
    band_r = np.searchsorted(row_edges, np.arange(H), side="right")
    band_c = np.searchsorted(col_edges, np.arange(W), side="right")
    mask = np.zeros((H * W, H * W), dtype=bool)
    for i in range(H):
        for j in range(W):
            for y in range(H):
                for x in range(W):
                    mask[i * W + j, y * W + x] = band_r[i] == band_r[y] and band_c[j] == band_c[x]
    return mask


@pytest.mark.parametrize("H, W, window, shift", [(8, 8, 4, 0), (8, 8, 4, 2), (6, 9, 3, 1), (8, 6, (4, 2), (3, 1))])
def test_window_mask_matches_its_definition(H, W, window, shift):
    wh, ww = as_pair(window)
    sh, sw = as_pair(shift)
    mask = window_mask(H, W, window, shift)
    np.testing.assert_array_equal(mask, window_mask_by_definition(H, W, wh, ww, sh, sw))
    np.testing.assert_array_equal(mask, mask.T)
    if shift == 0:
        assert np.all(mask.sum(1) == wh * ww)
    else:  # no wrap-around: the first and the last pixel of a row or column are never together
        assert not mask[0, W - 1] and not mask[0, (H - 1) * W]


def test_window_mask_follows_the_backend_of_like(be):
    m = window_mask(4, 4, 2, 1, like=be(np.zeros(1)))
    assert be.is_native(m)
    np.testing.assert_array_equal(np_(m), window_mask(4, 4, 2, 1))


def test_window_attention_bad_input(rng):
    q, k, v = make_maps(rng, (1,), 6, 8, 2, 2)
    with pytest.raises(ValueError, match=r"6×8 map cannot be cut into 4×4 windows"):
        window_attention_forward(q, k, v, window=4)
    with pytest.raises(ValueError, match="6×8 map cannot be cut"):
        window_mask(6, 8, 4)
    with pytest.raises(ValueError, match="shift"):
        window_attention_forward(q, k, v, window=2, shift=2)
    with pytest.raises(ValueError, match="positive"):
        window_attention_forward(q, k, v, window=0)
    with pytest.raises(TypeError, match="window must be an int or a pair"):
        window_attention_forward(q, k, v, window=2.0)
    with pytest.raises(ValueError, match="maps"):
        window_attention_forward(q, k[:, :, :4], v[:, :, :4], window=2)
    with pytest.raises(ValueError, match=r"q \(6, 8, 2\), k \(6, 8, 3\)"):
        window_attention_forward(q[0], k[0][..., [0, 1, 1]], v[0], window=2)
    out, cache = window_attention_forward(q, k, v, window=2, shift=1)
    with pytest.raises(ValueError, match="dout"):
        window_attention_backward(np.zeros((1, 6, 8, 3)), cache)


# ---------------------------------------------------------------- neighborhood attention


@pytest.mark.parametrize("name", NEIGHBORHOOD_CASES)
def test_neighborhood_attention_equals_exact_attention_under_neighborhood_mask(name, be, rng):
    case = NEIGHBORHOOD_CASES[name]
    forward, backward = neighborhood_attention_forward, neighborhood_attention_backward
    cache, cache_ref = check_against_exact(be, rng, forward, backward, neighborhood_mask, case)
    lead, H, W, _, _ = case.unpack()
    kernel = case.options["kernel"]
    kh, kw = as_pair(kernel)
    weights = np_(cache.weights)
    assert weights.shape == (*lead, H, W, kh * kw)
    # cache.weights[..., i, j, a·kw + b] is the exact weight of key (start(i) + a, start(j) + b)
    start_r = [min(max(i - kh // 2, 0), H - kh) for i in range(H)]
    start_c = [min(max(j - kw // 2, 0), W - kw) for j in range(W)]
    exact = cache_ref.weights.reshape(*lead, H, W, H, W)
    for i in range(H):
        for j in range(W):
            block = exact[..., i, j, start_r[i] : start_r[i] + kh, start_c[j] : start_c[j] + kw]
            np.testing.assert_allclose(weights[..., i, j, :], block.reshape(*lead, kh * kw), rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", NEIGHBORHOOD_FD_CASES)
def test_neighborhood_attention_backward_matches_finite_differences(name, rng):
    case = NEIGHBORHOOD_CASES[name]
    check_finite_differences(rng, neighborhood_attention_forward, neighborhood_attention_backward, case)


def natten_window_start(index, length, kernel):
    """NATTEN's window start for dilation 1, as its kernels write it: max(i − r, 0), moved back by
    (i + r) − (L − 1) when the window would run past the end."""
    r = kernel // 2
    return max(index - r, 0) + (index + r >= length) * (length - index - r - 1)


@pytest.mark.parametrize("H, W, kernel", [(7, 9, 3), (8, 6, 5), (7, 10, 7), (9, 5, (5, 3)), (5, 3, (5, 3))])
def test_neighborhood_mask_matches_natten_and_sees_exactly_kernel_squared_keys(H, W, kernel):
    kh, kw = as_pair(kernel)
    mask = neighborhood_mask(H, W, kernel)
    want = np.zeros((H * W, H * W), dtype=bool)
    for i in range(H):
        for j in range(W):
            si, sj = natten_window_start(i, H, kh), natten_window_start(j, W, kw)
            for a in range(kh):
                for b in range(kw):
                    want[i * W + j, (si + a) * W + (sj + b)] = True
    np.testing.assert_array_equal(mask, want)
    assert np.all(mask.sum(1) == kh * kw)
    assert np.all(np.diag(mask))  # every pixel sees itself


def test_neighborhood_mask_follows_the_backend_of_like(be):
    m = neighborhood_mask(5, 4, 3, like=be(np.zeros(1)))
    assert be.is_native(m)
    np.testing.assert_array_equal(np_(m), neighborhood_mask(5, 4, 3))


def test_neighborhood_attention_bad_input(rng):
    q, k, v = make_maps(rng, (1,), 5, 6, 2, 2)
    with pytest.raises(ValueError, match="odd"):
        neighborhood_attention_forward(q, k, v, kernel=4)
    with pytest.raises(ValueError, match="odd"):
        neighborhood_mask(5, 6, (3, 2))
    with pytest.raises(ValueError, match=r"7×7 neighborhood does not fit a 5×6 map"):
        neighborhood_attention_forward(q, k, v, kernel=7)
    with pytest.raises(TypeError, match="kernel"):
        neighborhood_attention_forward(q, k, v, kernel=None)
    with pytest.raises(TypeError, match="scale"):
        neighborhood_attention_forward(q, k, v, kernel=3, scale="0.5")
    with pytest.raises(ValueError, match="maps"):
        neighborhood_attention_forward(q[0, 0], k[0, 0], v[0, 0], kernel=1)
    out, cache = neighborhood_attention_forward(q, k, v, kernel=3)
    with pytest.raises(ValueError, match="dout"):
        neighborhood_attention_backward(np.zeros((1, 5, 6, 3)), cache)


def test_float32_stays_float32(rng):
    q, k, v = (a.astype(np.float32) for a in make_maps(rng, (1,), 4, 4, 2, 2))
    for fwd, bwd in [
        (partial(window_attention_forward, window=2, shift=1), window_attention_backward),
        (partial(neighborhood_attention_forward, kernel=3), neighborhood_attention_backward),
    ]:
        out, cache = fwd(q, k, v)
        grads = bwd(np.ones_like(out), cache)
        assert out.dtype == np.float32 and all(g.dtype == np.float32 for g in grads.values())


def test_numpy_integers_are_accepted_and_bools_are_not(rng):
    q, k, v = make_maps(rng, (1,), 4, 6, 2, 2)
    out, _ = window_attention_forward(q, k, v, window=(np.int64(2), 3), shift=np.int32(1))
    want, _ = window_attention_forward(q, k, v, window=(2, 3), shift=1)
    np.testing.assert_array_equal(out, want)
    out, _ = neighborhood_attention_forward(q, k, v, kernel=np.int64(3))
    np.testing.assert_array_equal(out, neighborhood_attention_forward(q, k, v, kernel=3)[0])
    with pytest.raises(TypeError, match="kernel"):
        neighborhood_attention_forward(q, k, v, kernel=True)
    with pytest.raises(TypeError, match="window"):
        window_mask(4, 6, (2, 3, 1))


# ---------------------------------------------------------------- against Swin's own algorithm


def swin_window_attention(q, k, v, window, shift, scale):
    """Shifted-window attention the way the Swin Transformer computes it, on (H, W, c) maps, square windows:
    roll the map by −shift, cut it into windows, label the regions of the rolled map and add −100 to the
    logits of pairs from different regions, softmax, merge the windows, roll back by +shift."""
    H, W = q.shape[:2]

    def partition(x):  # (H, W, c) → (windows, window², c), windows in row-major order
        x = x.reshape(H // window, window, W // window, window, -1).transpose(0, 2, 1, 3, 4)
        return x.reshape(-1, window * window, x.shape[-1])

    def merge(x):  # the inverse of partition
        x = x.reshape(H // window, W // window, window, window, -1).transpose(0, 2, 1, 3, 4)
        return x.reshape(H, W, -1)

    rolled = [np.roll(t, (-shift, -shift), axis=(0, 1)) for t in (q, k, v)]
    qw, kw, vw = (partition(t) for t in rolled)
    logits = scale * qw @ kw.transpose(0, 2, 1)  # (windows, window², window²)
    if shift > 0:
        regions = np.zeros((H, W, 1))
        label = 0
        for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                regions[rows, cols] = label
                label += 1
        tokens = partition(regions)[..., 0]  # (windows, window²)
        logits = logits + np.where(tokens[:, None, :] != tokens[:, :, None], -100.0, 0.0)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.roll(merge(weights @ vw), (shift, shift), axis=(0, 1))


@pytest.mark.parametrize(("H", "W", "window"), [(8, 12, 4), (6, 9, 3), (10, 4, 2)], ids=["8×12", "6×9", "10×4"])
def test_window_attention_equals_swins_roll_and_region_mask(H, W, window, rng):
    """Every shift 0 … window − 1. Swin's −100 leaves exp(−100) ≈ 4e−44 of weight on the other regions,
    far below float64's resolution: the outputs agree to rounding."""
    q, k, v = make_maps(rng, (), H, W, 4, 3)
    for shift in range(window):
        out, _ = window_attention_forward(q[None], k[None], v[None], window=window, shift=shift, scale=0.7)
        want = swin_window_attention(q, k, v, window, shift, 0.7)[None]
        assert rel_error(out, want) <= 1e-14, shift


# ---------------------------------------------------------------- odd inputs: empty, NaN, other dtypes, other caches

LOCAL = {
    "window": (partial(window_attention_forward, window=2, shift=1), window_attention_backward),
    "neighborhood": (partial(neighborhood_attention_forward, kernel=3), neighborhood_attention_backward),
}


@pytest.mark.parametrize("variant", LOCAL)
@pytest.mark.parametrize(("d", "dv"), [(0, 2), (3, 0)], ids=["d=0", "dv=0"])
def test_no_features_give_what_exact_attention_under_the_mask_gives(variant, d, dv, be, rng):
    """d = 0: every q·k is 0 whatever the scale, so each pixel's weights are uniform over what it sees."""
    forward, backward = LOCAL[variant]
    q, k, v = make_maps(rng, (2,), 4, 6, d, dv)
    mask = window_mask(4, 6, 2, 1) if variant == "window" else neighborhood_mask(4, 6, 3)
    want, cache_ref = attention_forward(flat(q), flat(k), flat(v), mask=mask)
    out, cache = forward(be(q), be(k), be(v))
    dout = rng.standard_normal((2, 4, 6, dv))
    grads = backward(be(dout), cache)
    g_ref = attention_backward(flat(dout), cache_ref)
    assert np_(out).shape == (2, 4, 6, dv) and rel_error(flat(np_(out)), want) <= 1e-13
    for name in ("q", "k", "v"):
        assert rel_error(flat(np_(grads[name])), g_ref[name]) <= 1e-13, name


def test_empty_maps():
    """A window attention on an empty map is empty; a neighborhood does not fit an empty map (NATTEN's rule)."""
    q = np.zeros((2, 0, 4, 3))
    out, cache = window_attention_forward(q, q, q, window=2, shift=1)
    assert out.shape == (2, 0, 4, 3) and window_attention_backward(out, cache)["q"].shape == (2, 0, 4, 3)
    with pytest.raises(ValueError, match=r"a 3×3 neighborhood does not fit a 0×4 map"):
        neighborhood_attention_forward(q, q, q, kernel=3)


@pytest.mark.parametrize("variant", LOCAL)
def test_a_nan_key_reaches_the_queries_that_see_it_and_no_other(variant, be, rng):
    forward, backward = LOCAL[variant]
    q, k, v = make_maps(rng, (1,), 4, 6, 3, 2)
    k[0, 1, 2, 0] = np.nan
    mask = window_mask(4, 6, 2, 1) if variant == "window" else neighborhood_mask(4, 6, 3)
    out, cache = forward(be(q), be(k), be(v))
    backward(be(np.ones((1, 4, 6, 2))), cache)
    sees_it = mask[:, 1 * 6 + 2]  # the queries whose window or neighborhood holds pixel (1, 2)
    np.testing.assert_array_equal(np.isnan(flat(np_(out))[0]).any(-1), sees_it)
    k[0, 1, 2, 0] = np.inf
    with pytest.raises(ValueError, match="k has an infinite entry"):
        forward(be(q), be(k), be(v))


@pytest.mark.parametrize("variant", LOCAL)
def test_a_bare_3d_array_is_not_read_as_a_map(variant, rng):
    """(H, W, d) and a batch of token sequences (B, N, d) look alike: one map needs its leading axis."""
    forward, _ = LOCAL[variant]
    q, k, v = make_maps(rng, (), 4, 6, 3, 2)
    with pytest.raises(ValueError, match=r"q of shape \(4, 6, 3\) is 3-D.*pass q\[None\]"):
        forward(q, k, v)
    out, _ = forward(q[None], k[None], v[None])
    assert out.shape == (1, 4, 6, 2)


@pytest.mark.parametrize("variant", LOCAL)
def test_the_backward_checks_dout_and_cache_and_any_real_scale_is_taken(variant, rng):
    forward, backward = LOCAL[variant]
    q, k, v = (a.astype(np.float32) for a in make_maps(rng, (1,), 4, 6, 3, 2))
    out, cache = forward(q, k, v)
    with pytest.raises(TypeError, match="dout has dtype float64, but the forward ran in float32"):
        backward(np.ones(out.shape), cache)
    other = "neighborhood" if variant == "window" else "window"
    _, other_cache = LOCAL[other][0](q, k, v)
    with pytest.raises(TypeError, match=f"; it belongs to {other}_attention_backward"):
        backward(np.ones(out.shape, dtype=np.float32), other_cache)
    np.testing.assert_array_equal(forward(q, k, v, scale=np.float32(0.5))[0], forward(q, k, v, scale=0.5)[0])
    import ml_dtypes

    with pytest.raises(TypeError, match=r"real floating dtype \(float16, float32 or float64\), got bfloat16"):
        forward(*(a.astype(ml_dtypes.bfloat16) for a in (q, k, v)))
