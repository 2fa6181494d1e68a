"""Tiled (FlashAttention-style) exact attention: equal to exact attention, O(N) memory, same validation."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from attention_cases import Case, draw_qkv
from conftest import np_

from attention_ref import (
    attention_backward,
    attention_forward,
    chunked_attention_backward,
    chunked_attention_forward,
)
from attention_ref.attention import DEFAULT_BLOCK_SIZE
from attention_ref.attention import chunked as chunked_module
from attention_ref.gradcheck import check_backward, rel_error
from attention_ref.ops import logsumexp

# Tiled against exact attention, float64: the largest error measured over these cases (20 seeds; NumPy,
# array_api_strict and torch; AMD EPYC, OpenBLAS) is 8.4e-16 for the output and 2.8e-15 for the gradients
# (relative, on an absolute floor of 1). The bound leaves a 3.5× margin for other BLAS kernels' summation orders.
TOL = 1e-14
FD_TOL = 1e-7


CASES = {
    "one tile": Case((2,), 5, 6, 4, 3),
    "ragged tiles": Case((2, 3), 37, 53, 5, 4, block_size=8),
    "block_q != block_k": Case((2,), 50, 41, 3, 3, mask=(2, 50, 41), block_size=(7, 11)),
    "key-padding mask": Case((2, 3), 29, 31, 4, 2, mask=(2, 1, 1, 31), block_size=6),
    "1-D mask and bias": Case((), 20, 30, 4, 4, mask=(30,), bias=(30,), block_size=7),
    "2-D mask, full bias": Case((2, 2), 19, 17, 3, 5, mask=(19, 17), bias=(2, 2, 19, 17), scale=0.7, block_size=4),
    "bias broadcast over queries": Case((2, 3), 21, 18, 3, 3, bias=(3, 1, 18), block_size=5),
    "bias broadcast over keys": Case((2,), 11, 8, 3, 3, mask=(2, 11, 8), bias=(11, 1), block_size=3),
    "mask+bias, block 1": Case((2,), 6, 5, 2, 2, mask=(2, 6, 5), bias=(1, 6, 5), scale=1.3, block_size=1),
    "N=1 M=1": Case((2,), 1, 1, 1, 1, block_size=3),
    "blocks larger than N, M": Case((1,), 9, 12, 4, 4, mask=(1, 9, 12), bias=(9, 12), block_size=1000),
}


def make_case(case: Case, rng, fully_masked_row=True):
    q, k, v = draw_qkv(case, rng)
    mask = None
    if case.mask is not None:
        mask = rng.random(case.mask) > 0.3
        mask[..., 0] = True
        if fully_masked_row and len(case.mask) >= 2 and case.mask[-2] > 2:
            mask[..., 2, :] = False  # query 2 may attend nowhere
    bias = None if case.bias is None else rng.standard_normal(case.bias)
    return q, k, v, mask, bias, case.scale, case.block_size


def close(a, b, tol=TOL):
    """Relative error ≤ tol, but on an absolute floor of 1: a gradient that is 0 in exact arithmetic (a
    bias broadcast over the keys, as softmax ignores a per-row constant) is compared on rounding noise."""
    a, b = np_(a), np_(b)
    return np.max(np.abs(a - b), initial=0.0) <= tol * max(1.0, np.max(np.abs(b), initial=0.0))


@pytest.mark.parametrize("name", CASES)
def test_equals_exact_attention_forward_and_backward(name, be, rng):
    q, k, v, mask, bias, scale, block = make_case(CASES[name], rng)
    out_ref, cache_ref = attention_forward(q, k, v, mask=mask, bias=bias, scale=scale)
    dout = rng.standard_normal(out_ref.shape)
    g_ref = attention_backward(dout, cache_ref)

    out, cache = chunked_attention_forward(
        be(q), be(k), be(v), mask=be(mask), bias=be(bias), scale=scale, block_size=block
    )
    grads = chunked_attention_backward(be(dout), cache)
    assert be.is_native(out) and be.is_native(cache.logsumexp)
    assert rel_error(out, out_ref) <= TOL
    assert set(grads) == set(g_ref)
    for name in grads:
        assert be.is_native(grads[name])
        assert tuple(grads[name].shape) == g_ref[name].shape, name
        assert close(grads[name], g_ref[name]), (name, rel_error(grads[name], g_ref[name]))


@pytest.mark.parametrize("name", CASES)
def test_logsumexp_and_recomputed_weights(name, rng):
    q, k, v, mask, bias, scale, block = make_case(CASES[name], rng)
    _, cache_ref = attention_forward(q, k, v, mask=mask, bias=bias, scale=scale)
    _, cache = chunked_attention_forward(q, k, v, mask=mask, bias=bias, scale=scale, block_size=block)
    logits = (scale or q.shape[-1] ** -0.5) * q @ np.swapaxes(k, -1, -2) + (0.0 if bias is None else bias)
    want = logsumexp(logits, axis=-1, mask=mask)
    assert cache.logsumexp.shape == q.shape[:-1]
    assert np.array_equal(np.isneginf(cache.logsumexp), np.isneginf(want))
    alive = np.isfinite(want)
    np.testing.assert_allclose(cache.logsumexp[alive], want[alive], rtol=1e-13, atol=1e-13)
    assert cache.weights is None
    N = q.shape[-2]
    assert rel_error(cache.weight_rows(0, N), cache_ref.weights) <= TOL
    assert rel_error(cache.weight_rows(N // 2, N), cache_ref.weights[..., N // 2 :, :]) <= TOL


# a bias broadcast over the keys has gradient 0 (softmax ignores a per-row constant): no relative error to check
FD_CASES = [name for name, c in CASES.items() if c.N * c.M <= 400 and (c.bias is None or c.bias[-1] != 1)]


@pytest.mark.parametrize("name", FD_CASES)
def test_backward_matches_finite_differences(name, rng):
    q, k, v, mask, bias, scale, block = make_case(CASES[name], rng)
    inputs = {"q": q, "k": k, "v": v}
    if bias is not None:
        inputs["bias"] = bias

    def forward(q, k, v, bias=None):
        return chunked_attention_forward(q, k, v, mask=mask, bias=bias, scale=scale, block_size=block)

    errs = check_backward(forward, chunked_attention_backward, inputs)
    assert set(errs) == set(inputs)
    assert max(errs.values()) < FD_TOL, errs


def test_fully_masked_rows_give_zeros_without_nan(be, rng):
    q, k, v = rng.standard_normal((2, 9, 3)), rng.standard_normal((2, 11, 3)), rng.standard_normal((2, 11, 2))
    mask = rng.random((2, 9, 11)) > 0.5
    mask[:, [0, 4, 8], :] = False  # one dead row in each of three query tiles
    out, cache = chunked_attention_forward(be(q), be(k), be(v), mask=be(mask), block_size=(4, 3))
    grads = chunked_attention_backward(be(rng.standard_normal(out.shape)), cache)
    dead = ~mask.any(-1)
    assert np.all(np_(out)[dead] == 0) and np.all(np.isneginf(np_(cache.logsumexp)[dead]))
    assert np.all(np_(grads["q"])[dead] == 0)
    for g in grads.values():
        assert np.all(np.isfinite(np_(g)))
    everything_masked = np.zeros((9, 11), dtype=bool)
    out, cache = chunked_attention_forward(q, k, v, mask=everything_masked, block_size=4)
    grads = chunked_attention_backward(np.ones_like(out), cache)
    assert np.all(out == 0) and all(np.all(g == 0) for g in grads.values())


def test_huge_logits_stay_finite_across_tiles(rng):
    # the row maximum is found late (in the last key tile): every earlier tile is rescaled by α = exp(m - m')
    q, k, v = rng.standard_normal((7, 4)), rng.standard_normal((20, 4)), rng.standard_normal((20, 3))
    k[-1] = 50 * q.mean(0)
    out_ref, cache_ref = attention_forward(q, k, v, scale=300.0)
    out, cache = chunked_attention_forward(q, k, v, scale=300.0, block_size=3)
    dout = rng.standard_normal(out.shape)
    assert np.all(np.isfinite(out)) and rel_error(out, out_ref) <= TOL
    grads_ref = attention_backward(dout, cache_ref)
    # the weights are one-hot, so the true gradients are 0; both sides carry rounding amplified by
    # scale · |k| ≈ 1.5e4, so they are compared in absolute terms
    for name, g in chunked_attention_backward(dout, cache).items():
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, grads_ref[name], rtol=0, atol=1e-9, err_msg=name)


def test_float32_stays_float32(be, rng):
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(13, 4), (10, 4), (10, 2)])
    out, cache = chunked_attention_forward(be(q), be(k), be(v), block_size=4)
    grads = chunked_attention_backward(be(np.ones((13, 2), dtype=np.float32)), cache)
    assert np_(out).dtype == np.float32 and np_(grads["k"]).dtype == np.float32
    want, _ = attention_forward(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
    assert rel_error(out, want) < 1e-6


def test_the_default_tiles_are_512_queries_by_512_keys(rng, monkeypatch):
    """Without block_size, N = 513 queries and M = 1,025 keys are cut into 2 × 3 tiles of at most 512 × 512."""
    tiles = []
    real = chunked_module._logits_tile

    def logits_tile(xp, q_scaled, k_cols, mask, bias, rows, cols, out=None):
        tiles.append((q_scaled.shape[-2], k_cols.shape[-2]))
        return real(xp, q_scaled, k_cols, mask, bias, rows, cols, out)

    monkeypatch.setattr(chunked_module, "_logits_tile", logits_tile)
    q, k, v = rng.standard_normal((513, 2)), rng.standard_normal((1025, 2)), rng.standard_normal((1025, 2))
    out, cache = chunked_attention_forward(q, k, v)
    assert DEFAULT_BLOCK_SIZE == 512 and (cache.block_q, cache.block_k) == (512, 512)
    assert sorted(tiles) == sorted([(512, 512), (512, 512), (512, 1), (1, 512), (1, 512), (1, 1)])
    tiles.clear()
    chunked_attention_backward(np.ones_like(out), cache)
    assert len(tiles) == 6 and max(tiles) == (512, 512)
    assert rel_error(out, attention_forward(q, k, v)[0]) <= TOL


# ---------------------------------------------------------------- the same validation as exact attention


def zeros(*shapes, dtype=np.float64):
    return tuple(np.zeros(shape, dtype=dtype) for shape in shapes)


QKV = zeros((2, 3, 4), (2, 5, 4), (2, 5, 6))  # q, k, v that line up
SMALL = zeros((3, 4), (5, 4), (5, 2))

# (error, message, (q, k, v), keyword arguments)
BAD = [
    pytest.param(
        ValueError, r"q \(2, 3, 4\), k \(2, 5, 3\)", zeros((2, 3, 4), (2, 5, 3), (2, 5, 6)), {}, id="d differs"
    ),
    pytest.param(ValueError, "leading", zeros((1, 3, 4), (2, 5, 4), (2, 5, 6)), {}, id="leading dims differ"),
    pytest.param(
        ValueError,
        r"mask of shape \(3, 4\) does not broadcast to \(2, 3, 5\)",
        QKV,
        {"mask": np.ones((3, 4), dtype=bool)},
        id="mask does not broadcast",
    ),
    pytest.param(ValueError, r"bias of shape \(7, 2, 3, 5\)", QKV, {"bias": np.zeros((7, 2, 3, 5))}, id="bias too big"),
    pytest.param(TypeError, "real floating", (np.zeros((3, 4), dtype=int), *SMALL[1:]), {}, id="integer q"),
    pytest.param(TypeError, "boolean", SMALL, {"mask": np.ones((3, 5))}, id="float mask"),
    pytest.param(TypeError, "share one dtype", (SMALL[0].astype(np.float32), *SMALL[1:]), {}, id="mixed dtypes"),
    pytest.param(TypeError, "block_size", SMALL, {"block_size": 2.0}, id="float block_size"),
    pytest.param(TypeError, "block_size", SMALL, {"block_size": (1, 2, 3)}, id="three block sizes"),
    pytest.param(ValueError, "positive", SMALL, {"block_size": 0}, id="block_size 0"),
]


@pytest.mark.parametrize(("error", "match", "qkv", "kwargs"), BAD)
def test_bad_input_is_rejected_like_exact_attention(error, match, qkv, kwargs):
    with pytest.raises(error, match=match):
        chunked_attention_forward(*qkv, **kwargs)
    if "block_size" not in kwargs:
        with pytest.raises(error, match=match):
            attention_forward(*qkv, **kwargs)


def test_dout_of_the_wrong_shape_is_rejected(rng):
    out, cache = chunked_attention_forward(
        rng.standard_normal((3, 2)), rng.standard_normal((4, 2)), rng.standard_normal((4, 5))
    )
    with pytest.raises(ValueError, match="dout"):
        chunked_attention_backward(np.zeros((3, 2)), cache)


# ---------------------------------------------------------------- memory


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_memory_at_16384_tokens_is_at_most_256_mib(monkeypatch):
    """Forward + backward at N = 16,384, d = 64, one head, float64 peaks ≤ 256 MiB.

    The peak counts everything NumPy allocates after the inputs exist, outputs and gradients included
    (they alone are 4 · N · d · 8 B = 32 MiB); one N × N weight matrix would be 2 GiB. Every thread of
    the tiled path holds its own share of dQ and its own tiles (about 11 MiB here), so the peak depends
    on the number of threads: measured at 2, the development machines' count (81 MiB; 64 MiB at 1).
    """
    monkeypatch.setenv("ATTENTION_REF_NUM_THREADS", "2")
    rng = np.random.default_rng(0)
    N, d = 16384, 64
    q, k, v, dout = (rng.standard_normal((N, d)) for _ in range(4))
    result = {}

    def run():
        out, cache = chunked_attention_forward(q, k, v)
        result["grads"] = chunked_attention_backward(dout, cache)
        result["out"] = out

    peak = _peak_bytes(run)
    assert peak <= 256 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert result["out"].shape == (N, d) and result["grads"]["k"].shape == (N, d)


@pytest.mark.slow
def test_broadcast_mask_and_bias_are_sliced_not_expanded(monkeypatch):
    # N = M = 8192: an expanded boolean mask alone would be 64 MiB, an expanded float bias 512 MiB;
    # at 2 threads (each holds its own dQ share and tiles) the peak is about 23 MiB
    monkeypatch.setenv("ATTENTION_REF_NUM_THREADS", "2")
    rng = np.random.default_rng(1)
    N, d = 8192, 16
    q, k, v, dout = (rng.standard_normal((N, d)) for _ in range(4))
    mask = rng.random((1, N)) > 0.1
    bias = rng.standard_normal((N,))
    result = {}

    def run():
        out, cache = chunked_attention_forward(q, k, v, mask=mask, bias=bias)
        result["grads"] = chunked_attention_backward(dout, cache)

    peak = _peak_bytes(run)
    assert peak <= 40 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert result["grads"]["bias"].shape == (N,)


def test_the_block_size_does_not_change_the_result(rng):
    q, k, v = rng.standard_normal((2, 30, 3)), rng.standard_normal((2, 20, 3)), rng.standard_normal((2, 20, 3))
    outs = [chunked_attention_forward(q, k, v, block_size=b)[0] for b in (None, 1, 7, (3, 30))]
    for o in outs[1:]:
        assert rel_error(o, outs[0]) <= TOL


def test_numpy_integer_block_sizes_are_accepted(rng):
    q, k, v = rng.standard_normal((9, 3)), rng.standard_normal((7, 3)), rng.standard_normal((7, 2))
    out, cache = chunked_attention_forward(q, k, v, block_size=np.int64(4))
    assert (cache.block_q, cache.block_k) == (4, 4) and isinstance(cache.block_q, int)
    assert rel_error(out, attention_forward(q, k, v)[0]) <= TOL
    with pytest.raises(TypeError, match="block_size"):
        chunked_attention_forward(q, k, v, block_size=True)


# ---------------------------------------------------------------- the forward's shift


def _count_tiles(monkeypatch):
    """Record, per call of _logits_tile, whether the tile was shifted in its product (q with d + 1 columns)."""
    calls = []
    real = chunked_module._logits_tile

    def logits_tile(xp, q_scaled, k_cols, mask, bias, rows, cols, out=None):
        calls.append("shifted" if q_scaled.shape[-1] == k_cols.shape[-1] and k_cols.shape[-1] == 5 else "plain")
        return real(xp, q_scaled, k_cols, mask, bias, rows, cols, out)

    monkeypatch.setattr(chunked_module, "_logits_tile", logits_tile)
    return calls


def test_the_forward_keeps_its_shift_until_a_tile_outgrows_it(rng, monkeypatch):
    """Each query tile finds its maximum in its first key tile and keeps it as the shift: the later tiles get
    their shift in the product (no pass for the maximum), unless their weights outgrow SHIFT_AGAIN_ABOVE."""
    q, k, v = rng.standard_normal((64, 4)), rng.standard_normal((64, 4)), rng.standard_normal((64, 3))
    calls = _count_tiles(monkeypatch)
    out, cache = chunked_attention_forward(q, k, v, block_size=16)
    # 4 query tiles × 4 key tiles: the first key tile of each with its own maximum, the 3 others shifted
    assert sorted(calls) == ["plain"] * 4 + ["shifted"] * 12
    assert rel_error(out, attention_forward(q, k, v)[0]) <= TOL
    # key 40 (third key tile) draws the queries far above the first tile's maximum: that tile again, unshifted
    k[40] = 30 * q.mean(0) / np.linalg.norm(q.mean(0))
    calls.clear()
    out, cache = chunked_attention_forward(q, k, v, block_size=16, scale=2.0)
    want, want_cache = attention_forward(q, k, v, scale=2.0)
    redone = calls.count("plain") - 4
    assert 1 <= redone <= 4 and calls.count("shifted") == 12  # tried shifted, then done again
    assert rel_error(out, want) <= TOL
    np.testing.assert_allclose(cache.logsumexp, logsumexp(2.0 * q @ k.T, axis=-1), rtol=1e-14)


def test_a_shifted_tile_that_overflows_is_done_again_without_a_warning(rng, monkeypatch):
    """A logit 1,000 above the kept shift overflows exp (inf, then inf·0 = NaN in the product): no warning
    (the tests turn warnings into errors), the tile is done again with its own maximum, the result exact."""
    q, k, v = rng.standard_normal((8, 4)), rng.standard_normal((16, 4)), rng.standard_normal((16, 3))
    bias = np.zeros((8, 16))
    bias[3, 12] = 1000.0  # query 3, key 12 (second key tile)
    calls = _count_tiles(monkeypatch)
    out, cache = chunked_attention_forward(q, k, v, bias=bias, block_size=8)
    assert calls == ["plain", "shifted", "plain"]
    want, _ = attention_forward(q, k, v, bias=bias)
    assert rel_error(out, want) <= TOL and np.all(np.isfinite(out))
    np.testing.assert_allclose(out[3], v[12], rtol=1e-14)  # all of query 3's weight on key 12


def test_the_backward_gets_its_subtractions_from_the_products(rng, monkeypatch):
    """Backward, S − lse and dP − D come out of the products [scale·Q | −lse][K | 1]ᵀ and [dO | −D][V | 1]ᵀ:
    every tile's logits are shifted ones."""
    q, k, v = rng.standard_normal((2, 20, 4)), rng.standard_normal((2, 30, 4)), rng.standard_normal((2, 30, 3))
    out, cache = chunked_attention_forward(q, k, v, block_size=8)
    calls = _count_tiles(monkeypatch)
    grads = chunked_attention_backward(np.ones_like(out), cache)
    assert calls == ["shifted"] * (2 * 3 * 4)  # 2 problems (one at a time on NumPy) × 3 × 4 tiles
    want = attention_backward(np.ones_like(out), attention_forward(q, k, v)[1])
    for name in want:
        assert close(grads[name], want[name]), name
