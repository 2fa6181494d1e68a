"""Linear attention, both kinds: the formula restated in torch and differentiated by autograd, finite
differences, backends, identities, bad input."""

from __future__ import annotations

import tracemalloc
from functools import partial

import numpy as np
import pytest
from attention_cases import EMPTY, EMPTY_IDS, Case, draw_qkv
from conftest import HAS_TORCH, np_

from attention_ref.attention import linear_attention_backward, linear_attention_forward
from attention_ref.gradcheck import check_backward, rel_error

KINDS = ["elu", "efficient"]
TORCH_TOL = 1e-12
FD_TOL = 1e-7


SHAPES = {
    "square": Case((2,), 6, 6, 4, 4),
    "N!=M d!=dv": Case((2, 3), 5, 9, 3, 6),
    "no leading dims": Case((), 7, 4, 2, 3),
    "N=1 M=1": Case((1,), 1, 1, 1, 1),
}


def make(name, rng, spread=1.5):
    return draw_qkv(SHAPES[name], rng, spread)


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_formula_under_torch_autograd(kind, shape, rng):
    import torch
    import torch.nn.functional as F

    q, k, v = make(shape, rng)
    eps = 1e-6
    out, cache = linear_attention_forward(q, k, v, eps=eps, kind=kind)
    dout = rng.standard_normal(out.shape)
    grads = linear_attention_backward(dout, cache)

    tq, tk, tv = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v))
    if kind == "elu":
        # Katharopoulos et al.: out_i = φ(q_i)ᵀ S / (φ(q_i)ᵀ z + eps), S = Σ_j φ(k_j) v_jᵀ, z = Σ_j φ(k_j)
        fq, fk = F.elu(tq) + 1, F.elu(tk) + 1
        S = fk.transpose(-1, -2) @ tv
        z = fk.sum(-2)
        want = (fq @ S) / ((fq * z.unsqueeze(-2)).sum(-1, keepdim=True) + eps)
    else:
        # Shen et al.: softmax of q over features, of k over positions; out = ρ_q(Q) (ρ_k(K)ᵀ V)
        want = torch.softmax(tq, -1) @ (torch.softmax(tk, -2).transpose(-1, -2) @ tv)
    want.backward(torch.tensor(dout))
    assert rel_error(out, want.detach().numpy()) <= TORCH_TOL
    for name, t in [("q", tq), ("k", tk), ("v", tv)]:
        assert rel_error(grads[name], t.grad.numpy()) <= TORCH_TOL, name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_finite_differences(kind, shape, rng):
    q, k, v = make(shape, rng)
    # a large eps, so that its path carries weight (with eps = 1e-6 and N = M = 1, dq is ~1e-6: FD noise)
    forward = partial(linear_attention_forward, kind=kind, eps=0.3)
    errs = check_backward(forward, linear_attention_backward, {"q": q, "k": k, "v": v})
    assert max(errs.values()) < FD_TOL, errs


@pytest.mark.parametrize("kind", KINDS)
def test_backends_agree_with_numpy(kind, other_be, rng):
    q, k, v = make("N!=M d!=dv", rng)
    out_np, cache_np = linear_attention_forward(q, k, v, kind=kind)
    dout = rng.standard_normal(out_np.shape)
    g_np = linear_attention_backward(dout, cache_np)
    out, cache = linear_attention_forward(other_be(q), other_be(k), other_be(v), kind=kind)
    g = linear_attention_backward(other_be(dout), cache)
    assert other_be.is_native(out) and rel_error(out, out_np) <= 1e-13
    for name in ("q", "k", "v"):
        assert other_be.is_native(g[name]) and rel_error(g[name], g_np[name]) <= 1e-13, name


@pytest.mark.parametrize("kind", KINDS)
def test_implied_weights_reproduce_the_output(kind, be, rng):
    q, k, v = make("N!=M d!=dv", rng)
    out, cache = linear_attention_forward(be(q), be(k), be(v), kind=kind)
    assert cache.weights is None  # no N × M matrix is ever formed
    A = np_(cache.implied_weights())
    assert A.shape == (2, 3, 5, 9) and np.all(A > 0)
    assert rel_error(out, A @ v) <= 1e-13
    rows = A.sum(-1)
    if kind == "efficient":
        np.testing.assert_allclose(rows, 1.0, atol=1e-14)
    else:  # Σ_j A_ij = φ(q_i)·z / (φ(q_i)·z + eps): just under 1
        assert np.all(rows < 1.0) and np.all(rows > 1.0 - 1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_permuting_queries_permutes_outputs_and_key_value_pairs_change_nothing(kind, rng):
    q, k, v = make("N!=M d!=dv", rng)
    out, _ = linear_attention_forward(q, k, v, kind=kind)
    pq, pk = rng.permutation(q.shape[-2]), rng.permutation(k.shape[-2])
    out_q, _ = linear_attention_forward(q[..., pq, :], k, v, kind=kind)
    out_k, _ = linear_attention_forward(q, k[..., pk, :], v[..., pk, :], kind=kind)
    np.testing.assert_allclose(out_q, out[..., pq, :], rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(out_k, out, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_huge_inputs_stay_finite_without_warnings(kind, rng):
    q, k, v = make("square", rng, spread=1e3)  # exp(1e3) would overflow if computed
    out, cache = linear_attention_forward(q, k, v, kind=kind)
    grads = linear_attention_backward(rng.standard_normal(out.shape), cache)
    assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g)) for g in grads.values())


def test_eps_enters_the_denominator(rng):
    q, k, v = make("square", rng)
    out0, c0 = linear_attention_forward(q, k, v, eps=0.0)
    out1, c1 = linear_attention_forward(q, k, v, eps=1.0)
    np.testing.assert_allclose(c1.denominator - c0.denominator, 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out1 * c1.denominator, out0 * c0.denominator, rtol=1e-12)


def test_bad_input():
    q, k, v = np.zeros((3, 4)), np.zeros((5, 4)), np.zeros((5, 2))
    with pytest.raises(ValueError, match="kind must be one of"):
        linear_attention_forward(q, k, v, kind="softmax")
    with pytest.raises(ValueError, match="eps"):
        linear_attention_forward(q, k, v, eps=-1.0)
    with pytest.raises(TypeError, match="eps"):
        linear_attention_forward(q, k, v, eps=np.float64(1e-6)[None])
    with pytest.raises(ValueError, match=r"q \(3, 4\), k \(5, 3\)"):
        linear_attention_forward(q, np.zeros((5, 3)), v)
    with pytest.raises(TypeError, match="real floating"):
        linear_attention_forward(q.astype(int), k, v)
    out, cache = linear_attention_forward(q, k, v)
    with pytest.raises(ValueError, match="dout"):
        linear_attention_backward(np.zeros((3, 4)), cache)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize(("N", "M", "d", "dv"), EMPTY, ids=EMPTY_IDS)
def test_empty_inputs_give_empty_or_zero_outputs(kind, eps, N, M, d, dv, be, rng):
    """No keys (M = 0) or no features (d = 0): the sums over keys S and z are 0, so is every output (even
    with eps = 0, where δ = 0 is replaced by 1); gradients have their inputs' shapes and are finite."""
    q, k, v = rng.standard_normal((2, N, d)), rng.standard_normal((2, M, d)), rng.standard_normal((2, M, dv))
    out, cache = linear_attention_forward(be(q), be(k), be(v), kind=kind, eps=eps)
    grads = linear_attention_backward(be(rng.standard_normal((2, N, dv))), cache)
    assert np_(out).shape == (2, N, dv) and np.all(np.isfinite(np_(out)))
    if M == 0 or d == 0 or dv == 0:
        assert np.all(np_(out) == 0)
    for name, like in (("q", q), ("k", k), ("v", v)):
        assert np_(grads[name]).shape == like.shape and np.all(np.isfinite(np_(grads[name]))), name


@pytest.mark.parametrize("kind", KINDS)
def test_nan_propagates_and_infinities_are_refused(kind, be, rng):
    q, k, v = make("N!=M d!=dv", rng)
    q[0, 0, 1, 0] = np.nan  # one query: its output row only
    out, cache = linear_attention_forward(be(q), be(k), be(v), kind=kind)
    grads = linear_attention_backward(be(np.ones(out.shape)), cache)
    nan_rows = np.isnan(np_(out)).any(-1)
    assert nan_rows[0, 0, 1] and nan_rows.sum() == 1
    assert np.all(np.isnan(np_(grads["q"])[0, 0, 1])) and np.all(np.isfinite(np_(grads["q"])[1]))
    k[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="k has an infinite entry"):
        linear_attention_forward(be(q), be(k), be(v), kind=kind)


@pytest.mark.parametrize("kind", KINDS)
def test_the_backward_checks_dout_and_cache(kind, rng):
    from attention_ref.attention import window_attention_forward

    q, k, v = (a.astype(np.float32) for a in make("N!=M d!=dv", rng))
    out, cache = linear_attention_forward(q, k, v, kind=kind)
    with pytest.raises(TypeError, match="dout has dtype float64, but the forward ran in float32"):
        linear_attention_backward(np.ones(out.shape), cache)
    _, window_cache = window_attention_forward(q, k[..., :5, :], v[..., :5, :], window=1)
    with pytest.raises(TypeError, match="got a WindowAttentionCache; it belongs to window_attention_backward"):
        linear_attention_backward(np.ones(out.shape, dtype=np.float32), window_cache)
    with pytest.raises(TypeError, match="eps must be a real number"):
        linear_attention_forward(q, k, v, eps="0.1")
    out2, _ = linear_attention_forward(q, k, v, kind=kind, eps=np.float32(1e-6))
    np.testing.assert_array_equal(out2, linear_attention_forward(q, k, v, kind=kind, eps=1e-6)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_memory_is_linear_in_the_number_of_tokens(kind):
    # N = M = 65,536 tokens, d = dv = 16: one N × M matrix would be 32 GiB; the whole pass is O(N·d)
    rng = np.random.default_rng(0)
    N, d = 65536, 16
    q, k, v, dout = (rng.standard_normal((N, d)) for _ in range(4))
    tracemalloc.start()
    try:
        out, cache = linear_attention_forward(q, k, v, kind=kind)
        linear_attention_backward(dout, cache)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 16 * N * d * 8, f"peak {peak / 2**20:.1f} MiB"
