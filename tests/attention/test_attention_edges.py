"""Exact attention at its edges, on every path (readable, fast, tiled): NaN and ±inf, empty inputs, bad input
and its errors."""

from __future__ import annotations

import numpy as np
import pytest
from attention_cases import EMPTY, EMPTY_IDS, TOKEN_PATHS, run_path
from conftest import HAS_TORCH, np_

from attention_ref import attention_backward, attention_forward, chunked_attention_backward, chunked_attention_forward
from attention_ref.gradcheck import rel_error

# ---------------------------------------------------------------- NaN and ±inf, on every exact path

def finite_parts_agree(got, want, nan_where):
    """``got`` is NaN exactly where ``nan_where`` is True and equals ``want`` (to 1e-12) elsewhere."""
    got = np_(got)
    assert np.array_equal(np.isnan(got), np.broadcast_to(nan_where, got.shape))
    assert rel_error(got[~np.isnan(got)], want[~np.isnan(got)]) <= 1e-12


@pytest.mark.parametrize("path", TOKEN_PATHS)
def test_a_plus_inf_logit_makes_its_row_nan_and_nothing_else(path, be, rng, monkeypatch):
    """softmax(S_i) has no value when S_ij = +inf (∞/∞): row i is NaN, forward and backward, without a
    warning (the tests turn warnings into errors); every other row is what it would be without the entry."""
    q, k, v = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 7, 3)), rng.standard_normal((2, 7, 4))
    bias = rng.standard_normal((2, 5, 7))
    finite_bias = bias.copy()
    bias[0, 1, 3] = np.inf
    out_ref, cache_ref = attention_forward(q, k, v, bias=finite_bias)
    dout = rng.standard_normal(out_ref.shape)
    g_ref = attention_backward(dout, cache_ref)
    out, cache, backward = run_path(path, monkeypatch, be(q), be(k), be(v), bias=be(bias))
    grads = backward(be(dout), cache)
    row = np.zeros((2, 5, 1), dtype=bool)
    row[0, 1] = True  # query 1 of batch 0
    finite_parts_agree(out, out_ref, row)
    finite_parts_agree(grads["q"], g_ref["q"], row)
    finite_parts_agree(grads["bias"], g_ref["bias"], row)
    # every key of batch 0 meets row 1's NaN weights in dK = scale · dSᵀ Q and dV = Pᵀ dO
    batch0 = np.zeros((2, 1, 1), dtype=bool)
    batch0[0] = True
    finite_parts_agree(grads["k"], g_ref["k"], batch0)
    finite_parts_agree(grads["v"], g_ref["v"], batch0)
    if path == "tiled":
        lse = np_(cache.logsumexp)
        assert lse[0, 1] == np.inf and np.all(np.isfinite(np.delete(lse.ravel(), 1)))


@pytest.mark.parametrize("path", TOKEN_PATHS)
def test_nan_propagates_and_is_never_taken_for_masked(path, be, rng, monkeypatch):
    q, k, v = rng.standard_normal((2, 6, 3)), rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5, 2))
    mask = np.ones((2, 6, 5), dtype=bool)
    mask[0, 4] = False  # query 4 of batch 0 may attend nowhere
    mask[1, 3, 2] = False
    bias = rng.standard_normal((2, 6, 5))
    bias[1, 3, 2] = np.nan  # a NaN where the mask removes the logit anyway: no effect
    q[0, 2, 0] = np.nan  # a NaN query: its row is NaN
    out, cache, backward = run_path(path, monkeypatch, be(q), be(k), be(v), mask=be(mask), bias=be(bias))
    grads = backward(be(rng.standard_normal((2, 6, 2))), cache)
    out, dq = np_(out), np_(grads["q"])
    assert np.all(np.isnan(out[0, 2])) and np.all(np.isnan(dq[0, 2]))
    assert np.all(out[0, 4] == 0) and np.all(dq[0, 4] == 0)  # fully masked: zeros, not NaN
    assert np.all(np.isfinite(out[1])) and np.all(np.isfinite(dq[1]))
    assert np.all(np.isfinite(np_(grads["bias"])[1]))
    if path == "tiled":  # NaN is not "fully masked" (-inf)
        lse = np_(cache.logsumexp)
        assert np.isnan(lse[0, 2]) and lse[0, 4] == -np.inf and np.all(np.isfinite(lse[1]))
    else:
        assert np.all(np.isnan(np_(cache.weights)[0, 2])) and np.all(np_(cache.weights)[0, 4] == 0)


@pytest.mark.parametrize("path", TOKEN_PATHS)
def test_a_row_of_minus_inf_bias_is_a_fully_masked_row(path, be, rng, monkeypatch):
    q, k, v = rng.standard_normal((4, 3)), rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    bias = rng.standard_normal((4, 5))
    bias[2] = -np.inf
    bias[0, 1] = -np.inf  # one key removed from row 0
    out, cache, backward = run_path(path, monkeypatch, be(q), be(k), be(v), bias=be(bias))
    grads = backward(be(rng.standard_normal((4, 2))), cache)
    want, _ = attention_forward(q[[0]], np.delete(k, 1, 0), np.delete(v, 1, 0), bias=np.delete(bias[[0]], 1, 1))
    assert np.all(np_(out)[2] == 0) and np.all(np_(grads["q"])[2] == 0) and np.all(np_(grads["bias"])[2] == 0)
    assert rel_error(np_(out)[[0]], want) <= 1e-13
    assert all(np.all(np.isfinite(np_(g))) for g in grads.values())


@pytest.mark.parametrize("path", TOKEN_PATHS)
@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("value", [np.inf, -np.inf], ids=["+inf", "-inf"])
def test_an_infinite_query_key_or_value_is_a_value_error(path, name, value, be, rng, monkeypatch):
    """q·k would be ±inf or 0·inf; the error says so and points to the mask and -inf bias instead."""
    arrays = {"q": rng.standard_normal((3, 2)), "k": rng.standard_normal((4, 2)), "v": rng.standard_normal((4, 2))}
    arrays[name][1, 1] = value
    with pytest.raises(ValueError, match=f"{name} has an infinite entry"):
        run_path(path, monkeypatch, *(be(arrays[n]) for n in "qkv"))


# ---------------------------------------------------------------- empty inputs

@pytest.mark.parametrize("path", TOKEN_PATHS)
@pytest.mark.parametrize(("N", "M", "d", "dv"), EMPTY, ids=EMPTY_IDS)
def test_empty_inputs_give_what_the_formulas_give(path, N, M, d, dv, be, rng, monkeypatch):
    """N = 0: an empty output. M = 0: every query has no key, so, like a fully masked row, O = 0 (what
    torch's SDPA gives too). d = 0: every q·k is the empty sum 0, whatever the scale, so the logits are the
    bias alone. Every path gives the same; gradients have their inputs' shapes."""
    q, k, v = rng.standard_normal((2, N, d)), rng.standard_normal((2, M, d)), rng.standard_normal((2, M, dv))
    bias = rng.standard_normal((2, N, M))
    out, cache, backward = run_path(path, monkeypatch, be(q), be(k), be(v), bias=be(bias))
    dout = rng.standard_normal((2, N, dv))
    grads = backward(be(dout), cache)
    logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(max(d, 1)) + bias
    P = np.exp(logits - logits.max(-1, keepdims=True, initial=-np.inf)) if M else np.zeros((2, N, 0))
    P = P / np.where(P.sum(-1, keepdims=True) == 0, 1, P.sum(-1, keepdims=True))
    assert np_(out).shape == (2, N, dv)
    np.testing.assert_allclose(np_(out), P @ v, rtol=1e-13, atol=1e-15)
    if d == 0 and N:
        np.testing.assert_allclose(np_(out), np.broadcast_to(softmax_mean(bias, v), (2, N, dv)), rtol=1e-13)
    for name, like in (("q", q), ("k", k), ("v", v), ("bias", bias)):
        assert np_(grads[name]).shape == like.shape and np.all(np.isfinite(np_(grads[name]))), name
    if M == 0 or N == 0:
        assert all(np.all(np_(g) == 0) for g in grads.values())


def softmax_mean(bias, v):
    """With d = 0 the logits are the bias alone: O_i = Σ_j softmax(bias_i)_j v_j."""
    w = np.exp(bias - bias.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ v


# ---------------------------------------------------------------- bad input


def test_mismatched_shapes_name_both():
    q, k, v = np.zeros((2, 3, 4)), np.zeros((2, 5, 4)), np.zeros((2, 5, 6))
    with pytest.raises(ValueError, match=r"q \(2, 3, 4\), k \(2, 5, 3\)"):
        attention_forward(q, np.zeros((2, 5, 3)), v)
    with pytest.raises(ValueError, match=r"k \(2, 5, 4\), v \(2, 6, 6\)"):
        attention_forward(q, k, np.zeros((2, 6, 6)))
    with pytest.raises(ValueError, match="leading"):
        attention_forward(np.zeros((1, 3, 4)), k, v)
    with pytest.raises(ValueError, match=r"mask of shape \(3, 4\) does not broadcast to \(2, 3, 5\)"):
        attention_forward(q, k, v, mask=np.ones((3, 4), dtype=bool))
    with pytest.raises(ValueError, match=r"bias of shape \(7, 2, 3, 5\)"):
        attention_forward(q, k, v, bias=np.zeros((7, 2, 3, 5)))
    _, cache = attention_forward(q, k, v)
    with pytest.raises(ValueError, match="dout"):
        attention_backward(np.zeros((2, 3, 4)), cache)


def test_bad_dtypes_raise_type_error():
    q, k, v = np.zeros((3, 4)), np.zeros((5, 4)), np.zeros((5, 2))
    with pytest.raises(TypeError, match="q must have a real floating dtype"):
        attention_forward(np.zeros((3, 4), dtype=int), k, v)
    with pytest.raises(TypeError, match="v must have a real floating dtype"):
        attention_forward(q, k, np.zeros((5, 2), dtype=bool))
    with pytest.raises(TypeError, match="boolean"):
        attention_forward(q, k, v, mask=np.ones((3, 5)))
    with pytest.raises(TypeError, match="share one dtype"):
        attention_forward(q.astype(np.float32), k, v)
    with pytest.raises(TypeError, match="array"):
        attention_forward([[1.0]], k, v)


def test_float32_stays_float32(be, rng):
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(3, 4), (5, 4), (5, 2)])
    out, cache = attention_forward(be(q), be(k), be(v), mask=be(np.ones((3, 5), dtype=bool)))
    assert np_(out).dtype == np.float32 and np_(cache.weights).dtype == np.float32
    want, _ = attention_forward(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
    assert rel_error(out, want) < 1e-6


# ---------------------------------------------------------------- clear errors, on every exact path


@pytest.mark.parametrize("path", TOKEN_PATHS)
def test_bfloat16_is_refused_naming_the_supported_dtypes(path, rng, monkeypatch):
    import ml_dtypes

    q = rng.standard_normal((3, 2)).astype(ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match=r"q must have a real floating dtype \(float16, float32 or float64\)"):
        run_path(path, monkeypatch, q, q, q)
    if HAS_TORCH:
        import torch

        t = torch.zeros((3, 2), dtype=torch.bfloat16)
        with pytest.raises(TypeError, match=r"\(float16, float32 or float64\), got bfloat16"):
            run_path(path, monkeypatch, t, t, t)


SCALARS = [
    pytest.param(np.float32(0.5), 0.5, id="numpy float32"),
    pytest.param(np.float64(0.5), 0.5, id="numpy float64"),
    pytest.param(2, 2.0, id="int"),
    pytest.param(np.int64(2), 2.0, id="numpy int64"),
]


@pytest.mark.parametrize("path", TOKEN_PATHS)
@pytest.mark.parametrize(("scale", "same_as"), SCALARS)
def test_any_real_scalar_is_a_scale(path, scale, same_as, rng, monkeypatch):
    q, k, v = rng.standard_normal((3, 2)), rng.standard_normal((4, 2)), rng.standard_normal((4, 2))
    out, cache, _ = run_path(path, monkeypatch, q, k, v, scale=scale)
    want, _, _ = run_path(path, monkeypatch, q, k, v, scale=same_as)
    assert type(cache.scale) is float and cache.scale == same_as
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("path", TOKEN_PATHS)
@pytest.mark.parametrize(
    ("scale", "error", "match"),
    [
        pytest.param(True, TypeError, "scale must be a real number, got bool", id="bool"),
        pytest.param("0.5", TypeError, "scale must be a real number, got str", id="str"),
        pytest.param(np.ones(1), TypeError, "scale must be a real number, got ndarray", id="array"),
        pytest.param(np.inf, ValueError, "scale must be finite", id="inf"),
        pytest.param(np.nan, ValueError, "scale must be finite", id="nan"),
    ],
)
def test_a_scale_that_is_not_a_finite_real_number_is_refused(path, scale, error, match, rng, monkeypatch):
    q = rng.standard_normal((3, 2))
    with pytest.raises(error, match=match):
        run_path(path, monkeypatch, q, q, q, scale=scale)


@pytest.mark.parametrize("path", TOKEN_PATHS)
def test_dout_of_another_dtype_is_a_type_error(path, be, rng, monkeypatch):
    """A float64 dout for a float32 forward used to give float64 gradients without a word."""
    q = rng.standard_normal((2, 3, 4)).astype(np.float32)
    out, cache, backward = run_path(path, monkeypatch, be(q), be(q), be(q))
    with pytest.raises(TypeError, match="dout has dtype float64, but the forward ran in float32"):
        backward(be(np.ones((2, 3, 4))), cache)
    grads = backward(be(np.ones((2, 3, 4), dtype=np.float32)), cache)
    assert all(np_(g).dtype == np.float32 for g in grads.values())


def test_a_backward_given_another_functions_cache_names_the_backward_that_takes_it(rng):
    from attention_ref import init_self_attention, self_attention_forward

    q, k, v = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 4, 3))
    _, exact_cache = attention_forward(q, k, v)
    _, tiled_cache = chunked_attention_forward(q, k, v)
    x = rng.standard_normal((1, 2, 2, 8))
    _, block_cache = self_attention_forward(x, init_self_attention(8, heads=2, groups=2, rng=rng), heads=2, groups=2)
    dout = np.ones((2, 4, 3))
    with pytest.raises(TypeError, match=r"attention_backward needs the AttentionCache .* chunked_attention_backward"):
        attention_backward(dout, tiled_cache)
    with pytest.raises(TypeError, match=r"chunked_attention_backward needs .* belongs to attention_backward"):
        chunked_attention_backward(dout, exact_cache)
    with pytest.raises(TypeError, match=r"got a AttentionBlockCache; it belongs to .*self_attention_backward"):
        attention_backward(dout, block_cache)
    with pytest.raises(TypeError, match=r"got a dict$"):
        attention_backward(dout, {"q": q})


def test_running_out_of_memory_suggests_the_tiled_path(be):
    """N = M = 2²³ needs 2⁴⁶ weights, 256 TiB in float32: more than any address space, so the allocation
    fails at once (nothing is touched). q, k, v themselves are 32 MiB each."""
    n = 2**23
    q = be(np.ones((n, 1), dtype=np.float32))
    with pytest.raises(MemoryError, match=r"1×8388608×8388608 numbers \(262,144.0 GiB in float32\)"):
        attention_forward(q, q, q)
    with pytest.raises(MemoryError, match="chunked_attention_forward gives the same result tile by tile"):
        attention_forward(q, q, q)
