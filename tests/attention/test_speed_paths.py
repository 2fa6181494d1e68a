"""The fast path of exact attention (in place, threaded) and the tiled path: they must change nothing but the speed."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import np_

from attention_ref import attention_backward, attention_forward, softmax_forward
from attention_ref.attention import exact, exact_fast
from attention_ref.backend import exp_inplace, namespace
from attention_ref.gradcheck import rel_error


def test_exp_inplace_overwrites_numpy_arrays(rng):
    x = rng.standard_normal((3, 4))
    want = np.exp(x)
    got = exp_inplace(namespace(x), x)
    assert got is x  # NumPy branch: written through out=
    np.testing.assert_array_equal(got, want)


def test_exp_inplace_falls_back_to_the_standard_call(be, rng):
    a = rng.standard_normal((3, 4))
    x = be(a.copy())
    got = exp_inplace(namespace(x), x)
    assert be.is_native(got)
    np.testing.assert_allclose(np_(got), np.exp(a), rtol=1e-15)
    if be.name in ("numpy", "cupy"):  # the out= branch: written over the input
        assert got is x
    else:  # the standard branch: a new array, the input untouched
        np.testing.assert_array_equal(np_(x), a)


@pytest.mark.parametrize("with_mask", [False, True])
def test_softmax_overwriting_equals_softmax_forward(be, rng, with_mask):
    a = rng.standard_normal((2, 5, 6)) * 4
    mask = None
    if with_mask:
        mask = rng.random((2, 1, 6)) > 0.4
        mask[0, 0, :] = False  # a fully masked row (broadcast over the 5 queries of batch 0)
    want, _ = softmax_forward(be(a), axis=-1, mask=be(mask))
    x = be(a.copy())
    got = exact_fast.softmax_overwriting(namespace(x), x, axis=-1, mask=be(mask))
    assert be.is_native(got)
    np.testing.assert_array_equal(np_(got), np_(want))


def test_softmax_forward_leaves_its_input_alone(be, rng):
    a = rng.standard_normal((3, 7))
    x = be(a.copy())
    softmax_forward(x, axis=0)
    softmax_forward(x, axis=-1, mask=be(rng.random((3, 7)) > 0.5))
    np.testing.assert_array_equal(np_(x), a)


@pytest.fixture(params=["readable", "fast"])
def exact_path(request, monkeypatch):
    """Run exact attention through the readable lines of exact.py or through exact_fast.py."""
    monkeypatch.setattr(exact, "FAST", request.param == "fast")
    return request.param


def test_attention_leaves_its_inputs_alone(be, rng, exact_path):
    arrays = {
        "q": rng.standard_normal((2, 4, 3)),
        "k": rng.standard_normal((2, 5, 3)),
        "v": rng.standard_normal((2, 5, 2)),
        "bias": rng.standard_normal((2, 4, 5)),
        "dout": rng.standard_normal((2, 4, 2)),
    }
    mask = rng.random((2, 4, 5)) > 0.3
    ins = {name: be(a.copy()) for name, a in arrays.items()}
    out, cache = attention_forward(ins["q"], ins["k"], ins["v"], bias=ins["bias"], mask=be(mask), scale=0.3)
    attention_backward(ins["dout"], cache)
    for name, a in arrays.items():
        np.testing.assert_array_equal(np_(ins[name]), a, err_msg=name)


def test_one_hot_rows_give_exactly_zero_dq(be, rng, exact_path):
    """A query with a single allowed key has P_i one-hot, so dS_i = P_i (dP_i − Σ_k P_ik dP_ik) is exactly 0."""
    q, k, v = rng.standard_normal((6, 3)), rng.standard_normal((6, 3)), rng.standard_normal((6, 5))
    out, cache = attention_forward(be(q), be(k), be(v), mask=be(np.eye(6, dtype=bool)))
    grads = attention_backward(be(rng.standard_normal((6, 5))), cache)
    assert np.all(np_(grads["q"]) == 0) and np.all(np_(grads["k"]) == 0)


def test_both_paths_match_the_textbook_formulas_at_a_larger_size(rng, exact_path):
    """Each path against a direct NumPy transcription of the formulas, at N = 300."""
    q, k, v, dout = (rng.standard_normal((2, 300, 16)) for _ in range(4))
    scale = 0.3
    out, cache = attention_forward(q, k, v, scale=scale)
    grads = attention_backward(dout, cache)
    S = scale * q @ k.transpose(0, 2, 1)
    P = np.exp(S - S.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    dP = dout @ v.transpose(0, 2, 1)
    dS = P * (dP - (P * dP).sum(-1, keepdims=True))
    assert rel_error(cache.weights, P) <= 1e-13
    assert rel_error(out, P @ v) <= 1e-13
    assert rel_error(grads["v"], P.transpose(0, 2, 1) @ dout) <= 1e-13
    assert rel_error(grads["q"], scale * dS @ k) <= 1e-12
    assert rel_error(grads["k"], scale * dS.transpose(0, 2, 1) @ q) <= 1e-12


# ---------------------------------------------------------------- the fast path against the readable path

from attention_ref.attention.per_matrix import broadcast_index, matrix_indices, slab_indices, take  # noqa: E402


def test_matrix_indices_and_broadcast_index():
    assert matrix_indices(()) == [(...,)]
    idx = matrix_indices((2, 3))
    assert len(idx) == 6 and idx[4] == (slice(1, 2), slice(1, 2), ...)
    a = np.arange(2 * 1 * 4 * 5).reshape(2, 1, 4, 5)  # broadcast over the 3 heads
    where = broadcast_index(a.shape, idx[4], rank=4)
    assert where == (slice(1, 2), slice(None), slice(None), slice(None))
    np.testing.assert_array_equal(take(a, idx[4], rank=4), a[1:2])
    # fewer dims than the stack: aligned from the right, the missing leading dims broadcast
    b = np.arange(3 * 4 * 5).reshape(3, 4, 5)  # (heads, N, M) for a (batch, heads, N, M) stack
    np.testing.assert_array_equal(take(b, idx[4], rank=4), b[1:2])
    assert take(np.ones((4, 5)), idx[4], rank=4).shape == (4, 5)
    assert take(None, idx[4], rank=4) is None


def test_slab_indices_cut_one_leading_dim_into_nearly_equal_runs():
    assert slab_indices((32, 4), 2) == [(slice(0, 16), slice(None), ...), (slice(16, 32), slice(None), ...)]
    assert slab_indices((1, 4), 2) == [(slice(None), slice(0, 2), ...), (slice(None), slice(2, 4), ...)]
    assert slab_indices((3,), 2) == [(slice(0, 1), ...), (slice(1, 3), ...)]
    assert slab_indices((2, 3), 4) == [(slice(None), slice(i, i + 1), ...) for i in range(3)]  # the longest dim
    assert slab_indices((1, 1), 2) == slab_indices((), 2) == [(...,)]
    # every problem in exactly one slab
    for parts, count in ((1, 1), (2, 2), (3, 3), (5, 5), (7, 6)):
        seen = np.zeros((5, 6, 1, 1), dtype=int)
        slabs = slab_indices((5, 6), parts)
        for index in slabs:
            seen[index] += 1
        assert len(slabs) == count and np.all(seen == 1), parts
    # a slab's part of a broadcast bias: the cut dim where the bias has it, whole where it broadcasts
    slab = slab_indices((4, 3), 2)[1]
    assert broadcast_index((4, 1, 6, 7), slab, rank=4) == (slice(2, 4), slice(None), slice(None), slice(None))
    assert broadcast_index((1, 3, 6, 7), slab, rank=4) == (slice(None),) * 4


# (mask shape, bias shape) against a (2, 3, N, M) stack
BROADCASTS = [
    pytest.param((2, 3, 6, 7), (2, 3, 6, 7), id="full mask and bias"),
    pytest.param((2, 1, 1, 7), (3, 6, 7), id="key padding mask, bias per head"),
    pytest.param((1, 3, 6, 1), (2, 1, 1, 7), id="mask per head and query, bias per batch and key"),
    pytest.param((6, 7), (7,), id="lower-rank mask and bias"),
    pytest.param(None, (1, 1, 6, 1), id="bias per query only"),
    pytest.param(None, None, id="neither"),
]


@pytest.mark.parametrize("threads", [False, True], ids=["one call", "one slab per thread"])
@pytest.mark.parametrize(("mask_shape", "bias_shape"), BROADCASTS)
def test_fast_path_equals_the_readable_path(be, rng, monkeypatch, mask_shape, bias_shape, threads):
    """exact_fast (in place; one call, or one slab of the stack at a time) gives the readable path's results.

    The threads are forced on or off, so the per-matrix code also runs on backends without threads (there
    ``parallel_map`` runs the problems one after another): it must use only Array API calls.
    """
    q, k, v, dout = (rng.standard_normal((2, 3, n, w)) for n, w in ((6, 4), (7, 4), (7, 5), (6, 5)))
    mask = None if mask_shape is None else rng.random(mask_shape) > 0.3
    if mask is not None:
        mask.reshape(-1, mask.shape[-1])[0, :] = False  # a fully masked row (or key column, if broadcast)
    bias = None if bias_shape is None else rng.standard_normal(bias_shape)

    def run():
        out, cache = attention_forward(be(q), be(k), be(v), mask=be(mask), bias=be(bias), scale=0.4)
        return out, cache.weights, attention_backward(be(dout), cache)

    monkeypatch.setattr(exact, "FAST", False)
    want_out, want_p, want_g = run()
    monkeypatch.setattr(exact, "FAST", True)
    monkeypatch.setattr(exact_fast, "_in_threads", lambda q, k: threads)
    got_out, got_p, got_g = run()
    assert be.is_native(got_out) and be.is_native(got_p)
    # The same operations in the same order, in place or not: measured identical in one call; cut in slabs,
    # the products' sums may run in another order (measured ≤ 7.7e-16 over 10 seeds, AMD EPYC, OpenBLAS)
    assert rel_error(np_(got_out), np_(want_out)) <= 1e-14
    assert rel_error(np_(got_p), np_(want_p)) <= 1e-14
    assert set(got_g) == set(want_g) == ({"q", "k", "v"} | ({"bias"} if bias is not None else set()))
    for name in want_g:
        assert be.is_native(got_g[name])
        assert tuple(got_g[name].shape) == tuple(want_g[name].shape), name
        assert rel_error(np_(got_g[name]), np_(want_g[name])) <= 1e-14, name
    assert not np.isnan(np_(got_out)).any() and not np.isnan(np_(got_g["q"])).any()


def test_fast_path_takes_threads_for_big_numpy_stacks(monkeypatch, rng):
    """On NumPy with threadpoolctl and 2+ workers a stack above PARALLEL_MIN_LOGITS goes in slabs."""
    monkeypatch.setenv("ATTENTION_REF_NUM_THREADS", "2")
    calls = []
    real = exact_fast._attend_per_slab
    monkeypatch.setattr(exact_fast, "_attend_per_slab", lambda *a: calls.append(1) or real(*a))
    q = rng.standard_normal((2, 64, 8))
    monkeypatch.setattr(exact_fast, "PARALLEL_MIN_LOGITS", 2 * 64 * 64)
    attention_forward(q, q, q)
    monkeypatch.setattr(exact_fast, "PARALLEL_MIN_LOGITS", 2 * 64 * 64 + 1)
    attention_forward(q, q, q)
    assert len(calls) == (1 if importlib.util.find_spec("threadpoolctl") is not None else 0)
    assert not exact_fast._in_threads(q[:1], q[:1])  # one matrix: nothing to spread


def test_fast_path_equals_the_readable_path_in_float16(rng, monkeypatch):
    """float16: the fast path's softmax and its backward run in float32 like softmax_forward/backward."""
    q, k, v, dout = (rng.standard_normal((2, 3, 6, 4)).astype(np.float16) for _ in range(4))
    mask = rng.random((2, 1, 6, 6)) > 0.3
    results = []
    for fast in (False, True):
        monkeypatch.setattr(exact, "FAST", fast)
        out, cache = attention_forward(q, k, v, mask=mask)
        results.append((out, cache.weights, attention_backward(dout, cache)))
    (out0, p0, g0), (out1, p1, g1) = results
    np.testing.assert_array_equal(out1, out0)
    np.testing.assert_array_equal(p1, p0)
    for name in g0:
        assert g1[name].dtype == np.float16
        np.testing.assert_array_equal(g1[name], g0[name])


# ---------------------------------------------------------------- the norms' statistics


def test_means_one_axis_at_a_time_equal_numpys_mean(be, rng):
    from attention_ref.ops.normalize import mean_over

    x = rng.standard_normal((3, 10, 4, 2))
    for axes in [(1, 3), (-1,), (0, 1, 2, 3), (3, 1)]:
        got = mean_over(namespace(be(x)), be(x), axes)
        assert be.is_native(got)
        np.testing.assert_allclose(np_(got), np.mean(x, axis=axes, keepdims=True), rtol=1e-14, atol=1e-15)


def test_statistics_repeated_along_short_rows_change_no_number(be, rng):
    """A group norm's (B, 1, G, 1) statistic is repeated along the 2 channels of its groups, so that the loops
    over x run along whole rows; a layer norm's (..., 1) (nothing else reduced) is left as it is."""
    from attention_ref.ops.normalize import along_rows, normalize, normalize_backward

    xp = namespace(be(np.zeros(1)))
    stat = be(rng.standard_normal((3, 1, 4, 1)))
    spread = along_rows(xp, stat, (3, 10, 4, 2))
    assert tuple(spread.shape) == (3, 1, 4, 2)
    np.testing.assert_array_equal(np_(spread), np.broadcast_to(np_(stat), (3, 1, 4, 2)))
    assert along_rows(xp, be(np.ones((3, 10, 1))), (3, 10, 2)).shape == (3, 10, 1)  # layer norm: nothing to gain
    assert along_rows(xp, be(np.ones((3, 1, 4, 1))), (3, 10, 4, 32)).shape == (3, 1, 4, 1)  # long rows already
    # the group norm's normalisation and its backward: the plain broadcasting formulas, to rounding
    x, g = rng.standard_normal((3, 10, 4, 2)), rng.standard_normal((3, 10, 4, 2))
    xhat, rstd = normalize(xp, be(x), (1, 3), 1e-5)
    mu = x.mean(axis=(1, 3), keepdims=True)
    r = 1 / np.sqrt(((x - mu) ** 2).mean(axis=(1, 3), keepdims=True) + 1e-5)
    assert tuple(rstd.shape) == (3, 1, 4, 1)
    np.testing.assert_allclose(np_(xhat), (x - mu) * r, rtol=1e-13, atol=1e-14)
    dx = normalize_backward(xp, be(g), xhat, rstd, (1, 3))
    want = r * (g - g.mean(axis=(1, 3), keepdims=True) - np_(xhat) * (g * np_(xhat)).mean(axis=(1, 3), keepdims=True))
    np.testing.assert_allclose(np_(dx), want, rtol=1e-12, atol=1e-13)


def test_a_stack_larger_than_a_slab_is_done_slab_by_slab_in_place(monkeypatch, rng):
    """On one thread too, a stack whose logits exceed SLAB_BYTES runs one cache-sized slab at a time, each
    slab's weights formed in their place in P (no copy), with the readable path's results."""
    monkeypatch.setenv("ATTENTION_REF_NUM_THREADS", "1")
    monkeypatch.setattr(exact_fast, "SLAB_BYTES", 3 * 5 * 5 * 8)  # three (5, 5) float64 problems per slab
    q, k, v, dout = (rng.standard_normal((4, 3, 5, 2)) for _ in range(4))
    bias = rng.standard_normal((3, 5, 5))
    seen = []
    real = exact_fast._attend_in_place

    def spy(xp, q, k, v, mask, bias, scale, logits_out=None):
        out, weights = real(xp, q, k, v, mask, bias, scale, logits_out)
        seen.append((q.shape, weights is logits_out))
        return out, weights

    monkeypatch.setattr(exact_fast, "_attend_in_place", spy)
    out, cache = attention_forward(q, k, v, bias=bias)
    grads = attention_backward(dout, cache)
    assert seen == [((1, 3, 5, 2), True)] * 4  # the batch cut into 4 slabs of 3 problems, no thread
    monkeypatch.setattr(exact, "FAST", False)
    want_out, want_cache = attention_forward(q, k, v, bias=bias)
    want = attention_backward(dout, want_cache)
    assert rel_error(out, want_out) <= 1e-14 and rel_error(cache.weights, want_cache.weights) <= 1e-14
    for name in want:
        assert rel_error(grads[name], want[name]) <= 1e-14, name
