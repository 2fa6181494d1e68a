"""The operations below attention: finite differences, identities and backends."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from conftest import np_

from attention_ref import (
    group_norm_backward,
    group_norm_forward,
    layer_norm_backward,
    layer_norm_forward,
    linear_backward,
    linear_forward,
    logsumexp,
    merge_heads,
    merge_heads_backward,
    merge_heads_forward,
    softmax_backward,
    softmax_forward,
    split_heads,
    split_heads_backward,
    split_heads_forward,
)
from attention_ref.gradcheck import check_backward, rel_error

FD_TOL = 1e-7


# ---------------------------------------------------------------- softmax


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_softmax_rows_sum_to_one_along_its_axis(be, rng, axis):
    x = rng.standard_normal((3, 4, 5)) * 5
    p, cache = softmax_forward(be(x), axis=axis)
    assert be.is_native(p)
    np.testing.assert_allclose(np_(p).sum(axis=axis), 1.0, atol=1e-14)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    np.testing.assert_allclose(np_(p), e / e.sum(axis=axis, keepdims=True), rtol=1e-13)


@pytest.mark.parametrize("axis", [0, -1])
def test_softmax_backward_matches_finite_differences(rng, axis):
    x = rng.standard_normal((3, 4))
    mask = rng.random((3, 4)) > 0.3
    errs = check_backward(functools.partial(softmax_forward, axis=axis, mask=mask), softmax_backward, {"x": x})
    assert errs["x"] < FD_TOL


def test_softmax_fully_masked_row_is_zero_without_warning(be):
    x = np.arange(12.0).reshape(3, 4)
    mask = np.ones((3, 4), dtype=bool)
    mask[1] = False
    p, cache = softmax_forward(be(x), mask=be(mask))
    p = np_(p)
    assert np.all(p[1] == 0) and np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(-1), [1, 0, 1], atol=1e-15)
    dx = np_(softmax_backward(be(np.ones((3, 4))), cache)["x"])
    assert np.all(dx[1] == 0)


def test_softmax_huge_logits_stay_finite(be):
    x = np.array([[1e4, -1e4, 0.0], [3e4, 3e4 - 1, -5e4]])
    p = np_(softmax_forward(be(x))[0])
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p[0], [1, 0, 0])
    np.testing.assert_allclose(p[1], [1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1)), 0], rtol=1e-14)


def test_logsumexp(be, rng):
    x = rng.standard_normal((4, 6)) * 3
    mask = rng.random((4, 6)) > 0.4
    mask[2] = False
    got = np_(logsumexp(be(x), mask=be(mask)))
    with np.errstate(divide="ignore"):
        want = np.log(np.sum(np.where(mask, np.exp(x), 0), axis=-1))
    np.testing.assert_allclose(got, want, rtol=1e-14)
    assert got[2] == -np.inf
    big = np.array([1000.0, 1000.0])
    assert np_(logsumexp(be(big))) == pytest.approx(1000 + np.log(2))
    assert np_(logsumexp(be(x), axis=0, keepdims=True)).shape == (1, 6)


def test_softmax_rejects_bad_mask(rng):
    x = rng.standard_normal((3, 4))
    with pytest.raises(TypeError, match="boolean"):
        softmax_forward(x, mask=np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        softmax_forward(x, mask=np.ones((3, 5), dtype=bool))
    with pytest.raises(TypeError, match="floating"):
        softmax_forward(np.arange(4))


# ---------------------------------------------------------------- linear


@pytest.mark.parametrize("bias", [True, False])
def test_linear_backward_matches_finite_differences(rng, bias):
    inputs = {"x": rng.standard_normal((2, 3, 4)), "W": rng.standard_normal((4, 5))}
    if bias:
        inputs["b"] = rng.standard_normal(5)
    errs = check_backward(linear_forward, linear_backward, inputs)
    assert set(errs) == set(inputs)
    assert max(errs.values()) < FD_TOL


def test_linear_on_backends(be, rng):
    x, W, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    y, cache = linear_forward(be(x), be(W), be(b))
    assert be.is_native(y)
    np.testing.assert_allclose(np_(y), x @ W + b, rtol=1e-13)
    grads = linear_backward(be(np.ones((2, 3, 5))), cache)
    np.testing.assert_allclose(np_(grads["W"]), x.reshape(-1, 4).sum(0)[:, None] * np.ones(5), rtol=1e-13)


def test_linear_rejects_mismatch(rng):
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 5\)"):
        linear_forward(rng.standard_normal((2, 3)), rng.standard_normal((4, 5)))
    with pytest.raises(ValueError, match=r"b of shape \(4,\)"):
        linear_forward(rng.standard_normal((2, 4)), rng.standard_normal((4, 5)), rng.standard_normal(4))


# ---------------------------------------------------------------- norms


@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_backward_matches_finite_differences(rng, affine):
    inputs = {"x": rng.standard_normal((2, 3, 2, 6)) * 2 + 1}
    if affine:
        inputs["weight"] = rng.standard_normal(6)
        inputs["bias"] = rng.standard_normal(6)
    errs = check_backward(functools.partial(group_norm_forward, groups=3, eps=1e-6), group_norm_backward, inputs)
    assert set(errs) == set(inputs)
    assert max(errs.values()) < FD_TOL


def test_group_norm_statistics_per_group(be, rng):
    x = rng.standard_normal((2, 4, 5, 8)) * 3 + 2
    y = np_(group_norm_forward(be(x), groups=4, eps=0.0)[0])
    grouped = y.reshape(2, 20, 4, 2)
    np.testing.assert_allclose(grouped.mean(axis=(1, 3)), 0, atol=1e-13)
    np.testing.assert_allclose(grouped.var(axis=(1, 3)), 1, rtol=1e-12)


def test_group_norm_rejects_indivisible_channels(rng):
    with pytest.raises(ValueError, match=r"6 channels.*4 groups"):
        group_norm_forward(rng.standard_normal((1, 2, 2, 6)), groups=4)


def test_layer_norm_backward_matches_finite_differences(rng):
    inputs = {"x": rng.standard_normal((2, 3, 5)), "weight": rng.standard_normal(5), "bias": rng.standard_normal(5)}
    errs = check_backward(functools.partial(layer_norm_forward, eps=1e-5), layer_norm_backward, inputs)
    assert max(errs.values()) < FD_TOL


def test_layer_norm_on_backends(be, rng):
    x = rng.standard_normal((3, 7))
    y, _ = layer_norm_forward(be(x), eps=1e-5)
    assert be.is_native(y)
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np_(y), want, rtol=1e-12)


# ---------------------------------------------------------------- heads


def test_split_heads_is_head_major(be):
    C, heads = 6, 3
    x = np.arange(2 * 4 * C, dtype=np.float64).reshape(2, 4, C)  # channel c of token n holds n·C + c
    s = np_(split_heads(be(x), heads))
    assert s.shape == (2, heads, 4, C // heads)
    for head in range(heads):
        for j in range(C // heads):
            np.testing.assert_array_equal(s[:, head, :, j], x[:, :, head * (C // heads) + j])
    np.testing.assert_array_equal(np_(merge_heads(be(s))), x)


def test_head_backward_passes(rng):
    errs = check_backward(
        functools.partial(split_heads_forward, heads=2), split_heads_backward, {"x": rng.standard_normal((2, 3, 4))}
    )
    assert errs["x"] < FD_TOL
    errs = check_backward(merge_heads_forward, merge_heads_backward, {"x": rng.standard_normal((2, 3, 4, 5))})
    assert errs["x"] < FD_TOL


def test_split_heads_rejects_indivisible():
    with pytest.raises(ValueError, match=r"10 channels.*3 heads"):
        split_heads(np.zeros((4, 10)), 3)


def test_rel_error_is_normwise():
    assert rel_error(np.zeros(3), np.zeros(3)) == 0.0
    assert rel_error(np.array([1.0, 1e-20]), np.array([1.0, 2e-20])) < 1e-19
    with pytest.raises(ValueError, match="shapes"):
        rel_error(np.zeros(3), np.zeros(4))
