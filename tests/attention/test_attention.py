"""Exact scaled dot-product attention: finite differences, torch autograd, properties, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from attention_cases import TOKEN_PATHS, Case, draw_qkv, run_path
from conftest import HAS_TORCH, Backend, np_
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_ref import attention_backward, attention_forward
from attention_ref.attention import exact
from attention_ref.gradcheck import check_backward, rel_error

FD_TOL = 1e-7
TORCH_TOL = 1e-10


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
    q, k, v = draw_qkv(case, rng)
    mask = None
    if case.mask is not None:
        mask = rng.random(case.mask) > 0.35
        mask[..., 0, 0] = True  # keep at least some rows alive
        if case.fully_masked_row:
            mask[..., 1, :] = False
    bias = None if case.bias is None else rng.standard_normal(case.bias)
    return q, k, v, mask, bias, case.scale


def forward_backward(case: Case, rng):
    """``case`` drawn by :func:`make_case`, then exact attention forward and backward on it in NumPy with a random
    ``dout``: ``((q, k, v, mask, bias, scale), out, cache, dout, grads)``."""
    q, k, v, mask, bias, scale = drawn = make_case(case, rng)
    out, cache = attention_forward(q, k, v, mask=mask, bias=bias, scale=scale)
    dout = rng.standard_normal(out.shape)
    return drawn, out, cache, dout, attention_backward(dout, cache)


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
    (q, k, v, mask, bias, scale), out_np, _, dout, g_np = forward_backward(CASES[name], rng)
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

    (q, k, v, mask, bias, scale), out, cache, dout, grads = forward_backward(CASES[name], rng)

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
seeds = st.integers(0, 2**31 - 1)


def random_qkv(shape, seed):
    """``(rng, q (N, d), k (M, d), v (M, dv))`` for a drawn ``(N, M, d, dv)`` and seed."""
    N, M, d, dv = shape
    rng = np.random.default_rng(seed)
    return rng, rng.standard_normal((N, d)), rng.standard_normal((M, d)), rng.standard_normal((M, dv))


def random_bias_and_mask(rng, shape):
    """A standard normal bias ``(N, M)`` and a mask ``(N, M)`` that keeps about 70% of the pairs."""
    N, M, _, _ = shape
    return rng.standard_normal((N, M)), rng.random((N, M)) > 0.3


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=seeds, p_keep=st.floats(0.0, 1.0))
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
@given(shape=shapes, seed=seeds)
def test_property_permuting_queries_permutes_outputs(shape, seed):
    rng, q, k, v = random_qkv(shape, seed)
    bias, mask = random_bias_and_mask(rng, shape)
    perm = rng.permutation(len(q))
    out, _ = attention_forward(q, k, v, mask=mask, bias=bias)
    out_p, _ = attention_forward(q[perm], k, v, mask=mask[perm], bias=bias[perm])
    np.testing.assert_allclose(out_p, out[perm], rtol=1e-12, atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=seeds)
def test_property_permuting_key_value_pairs_changes_nothing(shape, seed):
    rng, q, k, v = random_qkv(shape, seed)
    bias, mask = random_bias_and_mask(rng, shape)
    out, cache = attention_forward(q, k, v, mask=mask, bias=bias)
    perm = rng.permutation(len(k))
    out_p, cache_p = attention_forward(q, k[perm], v[perm], mask=mask[:, perm], bias=bias[:, perm])
    np.testing.assert_allclose(out_p, out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(cache_p.weights, cache.weights[:, perm], rtol=1e-12, atol=1e-15)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=seeds)
def test_property_a_masked_keys_value_has_no_effect(shape, seed):
    N, M, d, dv = shape
    rng, q, k, v = random_qkv(shape, seed)
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
@given(shape=shapes, seed=seeds, magnitude=st.floats(1e2, 1e5))
def test_property_huge_logits_stay_finite(shape, seed, magnitude):
    N, M, d, dv = shape
    rng, q, k, v = random_qkv(shape, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, cache = attention_forward(q, k, v, scale=magnitude)
        grads = attention_backward(rng.standard_normal(out.shape), cache)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(cache.weights))
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    np.testing.assert_allclose(cache.weights.sum(-1), 1.0, atol=1e-13)


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
