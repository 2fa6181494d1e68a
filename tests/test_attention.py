"""Exact scaled dot-product attention: finite differences, torch autograd, properties, bad input."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import HAS_TORCH, Backend, np_
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_ref import (
    attention_backward,
    attention_forward,
    chunked_attention_backward,
    chunked_attention_forward,
)
from attention_ref.attention import exact
from attention_ref.gradcheck import check_backward, rel_error

FD_TOL = 1e-7
TORCH_TOL = 1e-10


@dataclass(frozen=True)
class Case:
    """One attention problem: q (*lead, N, d), k (*lead, M, d), v (*lead, M, dv), optional mask and bias."""

    lead: tuple[int, ...]
    N: int
    M: int
    d: int
    dv: int
    mask: tuple[int, ...] | None = None  # the mask's shape; random, with entry (0, 0) of each matrix allowed
    bias: tuple[int, ...] | None = None  # the bias's shape
    scale: float | None = None
    fully_masked_row: bool = False  # query 1 of every matrix may attend nowhere


CASES = {
    "plain": Case((2,), 5, 5, 4, 4),
    "N!=M d!=dv": Case((2, 3), 4, 7, 3, 5),
    "full mask": Case((2,), 5, 6, 4, 3, mask=(2, 5, 6)),
    "broadcast key-padding mask": Case((2, 3), 4, 6, 3, 2, mask=(2, 1, 1, 6)),
    "broadcast 2-D mask": Case((2, 2), 5, 4, 3, 3, mask=(5, 4)),
    "fully masked rows": Case((2,), 5, 4, 3, 2, mask=(2, 5, 4), fully_masked_row=True),
    "bias": Case((2,), 4, 5, 3, 3, bias=(2, 4, 5)),
    "broadcast bias": Case((2, 3), 4, 5, 3, 3, bias=(3, 1, 5)),
    "mask+bias+scale": Case((2, 2), 5, 6, 4, 3, mask=(1, 2, 5, 6), bias=(2, 1, 5, 6), scale=0.7, fully_masked_row=True),
    "custom scale": Case((1,), 3, 4, 2, 2, scale=2.5),
    "no leading dims": Case((), 4, 3, 2, 5, mask=(4, 3), bias=(4, 3)),
    "N=1 M=1": Case((2,), 1, 1, 1, 1),
}


def make_case(case: Case, rng):
    q = rng.standard_normal((*case.lead, case.N, case.d))
    k = rng.standard_normal((*case.lead, case.M, case.d))
    v = rng.standard_normal((*case.lead, case.M, case.dv))
    mask = None
    if case.mask is not None:
        mask = rng.random(case.mask) > 0.35
        mask[..., 0, 0] = True  # keep at least some rows alive
        if case.fully_masked_row:
            mask[..., 1, :] = False
    bias = None if case.bias is None else rng.standard_normal(case.bias)
    return q, k, v, mask, bias, case.scale


@pytest.fixture(params=["readable", "fast"])
def exact_path(request, monkeypatch):
    """Run exact attention through the readable lines of exact.py or through exact_fast.py."""
    monkeypatch.setattr(exact, "FAST", request.param == "fast")
    return request.param


@pytest.mark.parametrize("name", CASES)
def test_backward_matches_finite_differences(name, rng, exact_path):
    q, k, v, mask, bias, scale = make_case(CASES[name], rng)
    inputs = {"q": q, "k": k, "v": v}
    if bias is not None:
        inputs["bias"] = bias

    def forward(q, k, v, bias=None):
        return attention_forward(q, k, v, mask=mask, bias=bias, scale=scale)

    errs = check_backward(forward, attention_backward, inputs)
    assert set(errs) == set(inputs)
    assert max(errs.values()) < FD_TOL, errs


def test_rows_sum_to_one_and_fully_masked_rows_are_zero(be, rng, exact_path):
    q, k, v, mask, bias, scale = make_case(CASES["fully masked rows"], rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, cache = attention_forward(be(q), be(k), be(v), mask=be(mask))
        grads = attention_backward(be(rng.standard_normal(out.shape)), cache)
    W = np_(cache.weights)
    assert W.shape == (2, 5, 4)
    rows = W.sum(-1)
    dead = ~mask.any(-1)
    assert dead.any()
    np.testing.assert_allclose(rows[~dead], 1.0, atol=1e-14)
    assert np.all(W[dead] == 0) and np.all(np_(out)[dead] == 0) and np.all(np_(grads["q"])[dead] == 0)
    for g in grads.values():
        assert np.all(np.isfinite(np_(g)))


@pytest.mark.parametrize("name", CASES)
def test_backends_agree_with_numpy(name, other_be, rng):
    q, k, v, mask, bias, scale = make_case(CASES[name], rng)
    out_np, cache_np = attention_forward(q, k, v, mask=mask, bias=bias, scale=scale)
    dout = rng.standard_normal(out_np.shape)
    g_np = attention_backward(dout, cache_np)
    out, cache = attention_forward(
        other_be(q), other_be(k), other_be(v), mask=other_be(mask), bias=other_be(bias), scale=scale
    )
    g = attention_backward(other_be(dout), cache)
    assert other_be.is_native(out) and other_be.is_native(cache.weights)
    assert set(g) == set(g_np)
    assert rel_error(out, out_np) <= 1e-12
    for name in g:
        assert other_be.is_native(g[name])
        assert rel_error(g[name], g_np[name]) <= 1e-12, name


def test_bias_gradient_has_the_bias_shape(rng):
    q, k, v = rng.standard_normal((2, 3, 4, 2)), rng.standard_normal((2, 3, 5, 2)), rng.standard_normal((2, 3, 5, 2))
    for shape in [(5,), (1, 5), (3, 1, 5), (2, 3, 4, 5), (4, 1)]:
        out, cache = attention_forward(q, k, v, bias=rng.standard_normal(shape))
        assert attention_backward(np.ones_like(out), cache)["bias"].shape == shape


# ---------------------------------------------------------------- against torch


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("name", CASES)
def test_matches_torch_autograd_and_sdpa(name, rng, exact_path):
    import torch
    import torch.nn.functional as F

    q, k, v, mask, bias, scale = make_case(CASES[name], rng)
    out, cache = attention_forward(q, k, v, mask=mask, bias=bias, scale=scale)
    dout = rng.standard_normal(out.shape)
    grads = attention_backward(dout, cache)

    def leaf(a):
        return torch.tensor(a, dtype=torch.float64, requires_grad=True)

    tq, tk, tv = leaf(q), leaf(k), leaf(v)
    tb = None if bias is None else leaf(bias)
    tm = None if mask is None else torch.tensor(mask)

    # 1. attention restated in torch, differentiated by autograd
    logits = (scale if scale is not None else q.shape[-1] ** -0.5) * tq @ tk.transpose(-1, -2)
    if tb is not None:
        logits = logits + tb
    if tm is not None:
        alive = tm.expand(logits.shape).any(-1, keepdim=True)
        logits = logits.masked_fill(~tm, float("-inf")).masked_fill(~alive, 0.0)
        weights = torch.softmax(logits, -1) * alive
    else:
        weights = torch.softmax(logits, -1)
    manual = weights @ tv
    manual.backward(torch.tensor(dout))
    assert rel_error(out, manual.detach().numpy()) <= TORCH_TOL
    assert rel_error(cache.weights, weights.detach().numpy()) <= TORCH_TOL
    for name, t in [("q", tq), ("k", tk), ("v", tv), ("bias", tb)]:
        if t is not None:
            assert rel_error(grads[name], t.grad.numpy()) <= TORCH_TOL, name

    # 2. torch's own scaled_dot_product_attention (bias and mask folded into one float mask)
    tq2, tk2, tv2 = leaf(q), leaf(k), leaf(v)
    attn_mask = None
    if bias is not None or mask is not None:
        attn_mask = torch.zeros(cache.weights.shape, dtype=torch.float64)
        if bias is not None:
            attn_mask = attn_mask + torch.tensor(bias)
        if mask is not None:
            attn_mask = attn_mask.masked_fill(~tm, float("-inf"))
    sdpa = F.scaled_dot_product_attention(tq2, tk2, tv2, attn_mask=attn_mask, scale=scale)
    sdpa.backward(torch.tensor(dout))
    assert rel_error(out, sdpa.detach().numpy()) <= TORCH_TOL
    for name, t in [("q", tq2), ("k", tk2), ("v", tv2)]:
        assert rel_error(grads[name], t.grad.numpy()) <= TORCH_TOL, name


# ---------------------------------------------------------------- properties

shapes = st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 4), st.integers(1, 4))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), p_keep=st.floats(0.0, 1.0))
def test_property_rows_sum_to_one_or_zero(shape, seed, p_keep):
    N, M, d, dv = shape
    rng = np.random.default_rng(seed)
    mask = rng.random((N, M)) < p_keep
    out, cache = attention_forward(
        rng.standard_normal((N, d)), rng.standard_normal((M, d)), rng.standard_normal((M, dv)), mask=mask
    )
    np.testing.assert_allclose(cache.weights.sum(-1), mask.any(-1).astype(float), atol=1e-13)
    assert np.all(cache.weights[~mask] == 0)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_property_permuting_queries_permutes_outputs(shape, seed):
    N, M, d, dv = shape
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((N, d)), rng.standard_normal((M, d)), rng.standard_normal((M, dv))
    bias, mask = rng.standard_normal((N, M)), rng.random((N, M)) > 0.3
    perm = rng.permutation(N)
    out, _ = attention_forward(q, k, v, mask=mask, bias=bias)
    out_p, _ = attention_forward(q[perm], k, v, mask=mask[perm], bias=bias[perm])
    np.testing.assert_allclose(out_p, out[perm], rtol=1e-12, atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_property_permuting_key_value_pairs_changes_nothing(shape, seed):
    N, M, d, dv = shape
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((N, d)), rng.standard_normal((M, d)), rng.standard_normal((M, dv))
    bias, mask = rng.standard_normal((N, M)), rng.random((N, M)) > 0.3
    perm = rng.permutation(M)
    out, cache = attention_forward(q, k, v, mask=mask, bias=bias)
    out_p, cache_p = attention_forward(q, k[perm], v[perm], mask=mask[:, perm], bias=bias[:, perm])
    np.testing.assert_allclose(out_p, out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(cache_p.weights, cache.weights[:, perm], rtol=1e-12, atol=1e-15)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_property_a_masked_keys_value_has_no_effect(shape, seed):
    N, M, d, dv = shape
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((N, d)), rng.standard_normal((M, d)), rng.standard_normal((M, dv))
    j = int(rng.integers(M))
    mask = rng.random((1, M)) > 0.3
    mask[0, j] = False
    out, cache = attention_forward(q, k, v, mask=mask)
    k2, v2 = k.copy(), v.copy()
    k2[j] = rng.standard_normal(d) * 1e3
    v2[j] = rng.standard_normal(dv) * 1e6
    out2, _ = attention_forward(q, k2, v2, mask=mask)
    np.testing.assert_array_equal(out2, out)
    grads = attention_backward(rng.standard_normal(out.shape), cache)
    assert np.all(grads["k"][j] == 0) and np.all(grads["v"][j] == 0)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), magnitude=st.floats(1e2, 1e5))
def test_property_huge_logits_stay_finite(shape, seed, magnitude):
    N, M, d, dv = shape
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((N, d)), rng.standard_normal((M, d)), rng.standard_normal((M, dv))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, cache = attention_forward(q, k, v, scale=magnitude)
        grads = attention_backward(rng.standard_normal(out.shape), cache)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(cache.weights))
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    np.testing.assert_allclose(cache.weights.sum(-1), 1.0, atol=1e-13)


# ---------------------------------------------------------------- NaN and ±inf, on every exact path

TOKEN_PATHS = ["exact, readable", "exact, fast", "tiled"]


def run_path(path, monkeypatch, q, k, v, **kwargs):
    """``(out, cache, backward)`` of exact attention through ``path`` (tiles of 3 queries × 3 keys for "tiled")."""
    if path == "tiled":
        out, cache = chunked_attention_forward(q, k, v, block_size=3, **kwargs)
        return out, cache, chunked_attention_backward
    monkeypatch.setattr(exact, "FAST", path == "exact, fast")
    out, cache = attention_forward(q, k, v, **kwargs)
    return out, cache, attention_backward


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

# (N, M, d, dv): no queries, no keys, no features, no value features
EMPTY = [
    pytest.param(0, 5, 3, 2, id="N=0"),
    pytest.param(4, 0, 3, 2, id="M=0"),
    pytest.param(4, 5, 0, 2, id="d=0"),
    pytest.param(4, 5, 3, 0, id="dv=0"),
]


@pytest.mark.parametrize("path", TOKEN_PATHS)
@pytest.mark.parametrize(("N", "M", "d", "dv"), EMPTY)
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


# ---------------------------------------------------------------- half precision

# the backends with float16 (the Array API standard, and so array_api_strict, has none)
HALF_BACKENDS = [
    "numpy",
    pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")),
]
HALF_UNIT = 2.0**-11  # float16's unit roundoff


@pytest.mark.parametrize("backend", HALF_BACKENDS)
@pytest.mark.parametrize("path", TOKEN_PATHS)
def test_float16_attention_is_a_few_roundings_from_float64(path, backend, rng, monkeypatch):
    """float16 in, float16 out; the softmax (and the tiled path's running sums) in float32. Against float64
    attention on the same (float16) inputs, the output and gradients are within 8 units of float16's
    roundoff (measured: at most 2.8 over 10 seeds, AMD EPYC)."""
    be = Backend(backend)
    q, k, v, dout = (
        rng.standard_normal(s).astype(np.float16) for s in [(2, 40, 16), (2, 70, 16), (2, 70, 8), (2, 40, 8)]
    )
    mask = rng.random((2, 40, 70)) > 0.2
    out, cache, backward = run_path(path, monkeypatch, be(q), be(k), be(v), mask=be(mask))
    grads = backward(be(dout), cache)
    want, cache64 = attention_forward(*(a.astype(np.float64) for a in (q, k, v)), mask=mask)
    g64 = attention_backward(dout.astype(np.float64), cache64)
    assert np_(out).dtype == np.float16 and rel_error(out, want) <= 8 * HALF_UNIT
    for name in ("q", "k", "v"):
        assert np_(grads[name]).dtype == np.float16 and rel_error(grads[name], g64[name]) <= 8 * HALF_UNIT, name
