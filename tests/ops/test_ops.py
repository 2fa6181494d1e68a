"""The operations below attention: finite differences, identities and backends."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
from conftest import HAS_TORCH, Backend, np_

from attention_ref import merge_heads, softmax_backward, softmax_forward, split_heads
from attention_ref.gradcheck import check_backward, rel_error
from attention_ref.ops import (
    group_norm_backward,
    group_norm_forward,
    layer_norm_backward,
    layer_norm_forward,
    linear_backward,
    linear_forward,
    logsumexp,
    merge_heads_backward,
    merge_heads_forward,
    split_heads_backward,
    split_heads_forward,
)

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


# ---------------------------------------------------------------- half precision: computed in float32, as torch does


def half_ulps(a, want):
    """``|a − want|`` in units of float16's spacing at ``want``, with a floor of float32's resolution at the
    array's scale (results near 0 come out of a cancellation in float32)."""
    a, want = np.asarray(a, dtype=np.float64), np.asarray(want, dtype=np.float64)
    spacing = np.spacing(np.abs(want).astype(np.float16)).astype(np.float64)
    floor = 2.0**-23 * np.max(np.abs(want))
    return np.max(np.abs(a - want) / np.maximum(spacing, floor))


def half_cases(rng):
    """name → (forward, backward, x, dy, params): inputs whose float16 statistics overflow or lose every digit."""
    x_map = (300 * rng.standard_normal((2, 4, 4, 8))).astype(np.float16)  # Σ x² overflows float16 (max 65,504)
    x_rows = (300 * rng.standard_normal((2, 3, 16))).astype(np.float16)
    x_wide = (0.1 * rng.standard_normal((2, 70000))).astype(np.float16)  # Σ exp overflows: each p ≈ 1.4e-5
    params = {n: rng.standard_normal(c).astype(np.float16) for n, c in (("w8", 8), ("b8", 8), ("w16", 16), ("b16", 16))}
    return {
        "group_norm": (
            lambda x, w, b: group_norm_forward(x, w, b, groups=2, eps=1e-5),
            group_norm_backward,
            x_map,
            (params["w8"], params["b8"]),
        ),
        "layer_norm": (
            lambda x, w, b: layer_norm_forward(x, w, b, eps=1e-5),
            layer_norm_backward,
            x_rows,
            (params["w16"], params["b16"]),
        ),
        "softmax": (lambda x: softmax_forward(x, axis=-1), softmax_backward, x_wide, ()),
    }


def torch_half(name, x, params):
    """torch's CPU result in float16 (channels-first for GroupNorm)."""
    import torch
    import torch.nn.functional as F

    t = torch.tensor(x)
    if name == "group_norm":
        w, b = (torch.tensor(p) for p in params)
        return F.group_norm(t.permute(0, 3, 1, 2), 2, w, b, eps=1e-5).permute(0, 2, 3, 1).numpy()
    if name == "layer_norm":
        w, b = (torch.tensor(p) for p in params)
        return F.layer_norm(t, (x.shape[-1],), w, b, eps=1e-5).numpy()
    return torch.softmax(t, -1).numpy()


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("name", ["group_norm", "layer_norm", "softmax"])
def test_half_precision_forward_equals_torch_on_the_cpu(name, rng):
    """float16 in, float16 out, the statistics in float32: torch's CPU result to one unit in the last place
    (computing them in float16 gave zeros: Σ x² or Σ exp overflowed)."""
    forward, _, x, params = half_cases(rng)[name]
    y, _ = forward(x, *params)
    assert y.dtype == np.float16
    assert half_ulps(y, torch_half(name, x, params)) <= 1


@pytest.mark.parametrize("name", ["group_norm", "layer_norm", "softmax"])
def test_half_precision_backward_is_computed_in_float32(name, rng):
    """The backward in float32 too: every gradient within one float16 unit of the float64 backward run on the
    same cache (the forward's float16 weights for softmax, its float32 x̂ and 1/σ for the norms)."""
    forward, backward, x, params = half_cases(rng)[name]
    y, cache = forward(x, *params)
    dy = rng.standard_normal(y.shape).astype(np.float16)
    grads = backward(dy, cache)
    as64 = {f.name: getattr(cache, f.name) for f in dataclasses.fields(cache)}
    as64 = {n: a.astype(np.float64) if isinstance(a, np.ndarray) else a for n, a in as64.items()}
    if "dtype" in as64:  # the norms' caches record the input's dtype, which dout must have
        as64["dtype"] = np.dtype(np.float64)
    want = backward(dy.astype(np.float64), dataclasses.replace(cache, **as64))
    assert set(grads) == set(want)
    for key in grads:
        assert grads[key].dtype == np.float16, key
        assert half_ulps(grads[key], want[key]) <= 1, key


# the backends with float16 (the Array API standard, and so array_api_strict, has none)
HALF_BACKENDS = [
    "numpy",
    pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")),
]


@pytest.mark.parametrize("backend", HALF_BACKENDS)
def test_half_precision_logsumexp_does_not_overflow(backend):
    be = Backend(backend)
    x = np.zeros((2, 70000), dtype=np.float16)
    got = np_(logsumexp(be(x), axis=-1))
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, np.float16(np.log(70000.0)))


@pytest.mark.parametrize("backend", HALF_BACKENDS)
def test_half_precision_softmax_sums_in_float32(backend):
    """Σ exp over 70,000 float16 zeros is 70,000 > 65,504: summed in float16 it would be inf and every
    weight 0; in float32 each weight is 1/70,000 (a float16 subnormal) and the backward stays finite."""
    be = Backend(backend)
    x = np.zeros((2, 70000), dtype=np.float16)
    p, cache = softmax_forward(be(x))
    assert np_(p).dtype == np.float16
    np.testing.assert_array_equal(np_(p), np.float16(1.0 / 70000.0))
    dout = np.zeros((2, 70000), dtype=np.float16)
    dout[:, 0] = 1.0
    dx = np_(softmax_backward(be(dout), cache)["x"])
    # dx_0 = p_0 (1 − p_0), every other dx_j = −p_j p_0: rounded from float32, not from a float16 sum
    assert np.all(np.isfinite(dx)) and dx[0, 0] == np.float16(1.0 / 70000.0 * (1 - 1.0 / 70000.0))


def test_op_backwards_refuse_a_dout_that_would_broadcast(rng):
    x = rng.standard_normal((3, 4))
    for where, (forward, backward) in {
        "softmax": (softmax_forward, softmax_backward),
        "layer_norm": (layer_norm_forward, layer_norm_backward),
        "linear": (lambda a: linear_forward(a, rng.standard_normal((4, 4))), linear_backward),
    }.items():
        _, cache = forward(x)
        with pytest.raises(
            ValueError, match=rf"{where}: dout of shape \(1, 4\) does not match the output shape \(3, 4\)"
        ):
            backward(np.ones((1, 4)), cache)
    _, cache = group_norm_forward(rng.standard_normal((2, 3, 4)), groups=2)
    with pytest.raises(ValueError, match=r"group_norm: dout of shape \(1, 3, 4\)"):
        group_norm_backward(np.ones((1, 3, 4)), cache)


def test_group_norm_refuses_empty_groups_and_takes_an_empty_batch():
    with pytest.raises(ValueError, match=r"x of shape \(2, 0, 3, 4\) leaves every group empty"):
        group_norm_forward(np.zeros((2, 0, 3, 4)), groups=2)
    y, cache = group_norm_forward(np.zeros((0, 3, 3, 4)), np.ones(4), np.zeros(4), groups=2)
    grads = group_norm_backward(y, cache)
    assert y.shape == grads["x"].shape == (0, 3, 3, 4) and np.all(grads["weight"] == 0)


def test_linear_refuses_mixed_dtypes(rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    with pytest.raises(TypeError, match="linear: the inputs must share one dtype, got x float32, W float64"):
        linear_forward(x, rng.standard_normal((4, 2)))


# ---------------------------------------------------------------- NaN, ±inf, empty rows


ROWS = [
    pytest.param([np.nan, 1.0], np.nan, [np.nan, np.nan], id="NaN"),
    pytest.param([np.inf, 1.0], np.inf, [np.nan, np.nan], id="+inf"),
    pytest.param([np.inf, np.nan], np.nan, [np.nan, np.nan], id="+inf and NaN"),
    pytest.param([-np.inf, 1.0], 1.0, [0.0, 1.0], id="-inf"),
    pytest.param([-np.inf, -np.inf], -np.inf, [0.0, 0.0], id="all -inf"),
    pytest.param([1e4, 1e4], 1e4 + np.log(2.0), [0.5, 0.5], id="huge"),
]


@pytest.mark.parametrize(("row", "lse", "p"), ROWS)
def test_logsumexp_and_softmax_of_nan_and_infinite_rows(row, lse, p, be):
    """NaN propagates (and is never taken for an empty row, -inf); a +inf logit gives logsumexp +inf and a NaN
    softmax row (∞/∞); -inf entries get weight 0. No warning on the way."""
    x = be(np.array([row, [0.0, 0.0]]))
    got = np_(logsumexp(x, axis=-1))
    np.testing.assert_array_equal(got, [lse, np.log(2.0)])
    weights, cache = softmax_forward(x, axis=-1)
    np.testing.assert_array_equal(np_(weights), [p, [0.5, 0.5]])
    dx = np_(softmax_backward(be(np.ones((2, 2))), cache)["x"])
    assert np.array_equal(np.isnan(dx[0]), np.isnan(p)) and np.all(dx[1] == 0)


def test_masked_nan_is_ignored_and_empty_axes_are_empty_rows(be):
    x = np.array([[np.nan, 1.0, 2.0], [np.nan, np.nan, np.nan]])
    mask = np.array([[False, True, True], [False, False, False]])
    p, _ = softmax_forward(be(x), mask=be(mask))
    e = np.exp([1.0, 2.0])
    np.testing.assert_allclose(np_(p), [[0.0, *(e / e.sum())], [0.0, 0.0, 0.0]], rtol=1e-15)
    np.testing.assert_allclose(np_(logsumexp(be(x), mask=be(mask))), [np.log(e.sum()), -np.inf], rtol=1e-15)
    empty = be(np.zeros((3, 0)))
    assert np_(softmax_forward(empty)[0]).shape == (3, 0)
    np.testing.assert_array_equal(np_(logsumexp(empty)), [-np.inf] * 3)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda x: softmax_forward(x), id="softmax"),
        pytest.param(lambda x: logsumexp(x), id="logsumexp"),
        pytest.param(lambda x: group_norm_forward(x, groups=1), id="group_norm"),
        pytest.param(lambda x: layer_norm_forward(x), id="layer_norm"),
        pytest.param(lambda x: linear_forward(x, x), id="linear"),
    ],
)
def test_bfloat16_is_refused_naming_the_supported_dtypes(call):
    import ml_dtypes

    with pytest.raises(TypeError, match=r"real floating dtype \(float16, float32 or float64\), got bfloat16"):
        call(np.ones((2, 2), dtype=ml_dtypes.bfloat16))
