"""Linear attention with a key mask: equal to deleting the masked keys, torch autograd of the masked formula,
finite differences, fully masked rows, backends, bad masks."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
from conftest import HAS_TORCH, np_

from attention_ref.attention import linear_attention_backward, linear_attention_forward
from attention_ref.gradcheck import check_backward, rel_error

KINDS = ["elu", "efficient"]


def make(rng, lead=(2, 3), N=5, M=7, d=3, dv=4):
    return (
        1.5 * rng.standard_normal((*lead, N, d)),
        1.5 * rng.standard_normal((*lead, M, d)),
        rng.standard_normal((*lead, M, dv)),
    )


KEEP = np.array([[True, False, True, True, False, True, False], [False, True, True, True, True, True, True]])


@pytest.mark.parametrize("kind", KINDS)
def test_masked_keys_are_the_same_as_deleted_keys(kind, rng):
    q, k, v = make(rng)
    mask = KEEP[:, None, :]  # (2, 1, 7): per sample, the same for the 3 heads
    out, cache = linear_attention_forward(q, k, v, kind=kind, key_mask=mask)
    dout = rng.standard_normal(out.shape)
    grads = linear_attention_backward(dout, cache)
    for b in range(2):
        keep = KEEP[b]
        out_b, cache_b = linear_attention_forward(q[b], k[b][:, keep], v[b][:, keep], kind=kind)
        grads_b = linear_attention_backward(dout[b], cache_b)
        assert rel_error(out[b], out_b) <= 1e-14
        assert rel_error(grads["q"][b], grads_b["q"]) <= 1e-14
        assert rel_error(grads["k"][b][:, keep], grads_b["k"]) <= 1e-14
        assert rel_error(grads["v"][b][:, keep], grads_b["v"]) <= 1e-14
        # a masked key's gradients are exactly 0, and its implied weights are 0
        assert np.all(grads["k"][b][:, ~keep] == 0) and np.all(grads["v"][b][:, ~keep] == 0)
        assert np.all(cache.implied_weights()[b][..., ~keep] == 0)
        np.testing.assert_allclose(cache.implied_weights()[b][..., keep], cache_b.implied_weights(), rtol=1e-13)


@pytest.mark.parametrize("kind", KINDS)
def test_backward_with_key_mask_matches_finite_differences(kind, rng):
    q, k, v = make(rng, lead=(2,), N=3, M=5, d=2, dv=2)
    mask = np.array([[True, False, True, True, False], [True, True, True, False, True]])
    forward = partial(linear_attention_forward, kind=kind, eps=0.3, key_mask=mask)
    errs = check_backward(forward, linear_attention_backward, {"q": q, "k": k, "v": v})
    assert max(errs.values()) < 1e-7, errs


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("kind", KINDS)
def test_masked_formula_under_torch_autograd(kind, rng):
    import torch
    import torch.nn.functional as F

    q, k, v = make(rng)
    mask = KEEP[:, None, :]
    out, cache = linear_attention_forward(q, k, v, kind=kind, key_mask=mask)
    dout = rng.standard_normal(out.shape)
    grads = linear_attention_backward(dout, cache)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    m = torch.tensor(mask).unsqueeze(-1)  # (2, 1, 7, 1)
    if kind == "elu":
        # S = Σ_j m_j φ(k_j) v_jᵀ, z = Σ_j m_j φ(k_j)
        fq, fk = F.elu(tq) + 1, (F.elu(tk) + 1) * m
        want = (fq @ (fk.transpose(-1, -2) @ tv)) / (fq @ fk.sum(-2).unsqueeze(-1) + 1e-6)
    else:
        # softmax of each key feature over the allowed positions only
        rho_k = torch.softmax(tk.masked_fill(~m, -torch.inf), -2)
        want = torch.softmax(tq, -1) @ (rho_k.transpose(-1, -2) @ tv)
    want.backward(torch.tensor(dout))
    assert rel_error(out, want.detach().numpy()) <= 1e-13
    for name, t in [("q", tq), ("k", tk), ("v", tv)]:
        assert rel_error(grads[name], t.grad.numpy()) <= 1e-13, name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_fully_masked_rows_give_zero_output_and_gradients(kind, eps, rng):
    q, k, v = make(rng, lead=(2,))
    mask = np.ones((2, 7), bool)
    mask[0] = False
    out, cache = linear_attention_forward(q, k, v, kind=kind, eps=eps, key_mask=mask)
    grads = linear_attention_backward(rng.standard_normal(out.shape), cache)
    assert np.all(out[0] == 0) and np.all(np.isfinite(out))
    for g in grads.values():
        assert np.all(g[0] == 0) and np.all(np.isfinite(g))
    out1, _ = linear_attention_forward(q[1], k[1], v[1], kind=kind, eps=eps)
    assert rel_error(out[1], out1) <= 1e-15


def test_all_true_mask_changes_nothing(rng):
    q, k, v = make(rng)
    out, cache = linear_attention_forward(q, k, v)
    out_m, cache_m = linear_attention_forward(q, k, v, key_mask=np.ones(7, bool))
    np.testing.assert_array_equal(out, out_m)
    dout = rng.standard_normal(out.shape)
    g, g_m = linear_attention_backward(dout, cache), linear_attention_backward(dout, cache_m)
    assert all(np.array_equal(g[n], g_m[n]) for n in g)


@pytest.mark.parametrize("kind", KINDS)
def test_key_mask_on_every_other_backend(kind, other_be, rng):
    q, k, v = make(rng)
    mask = KEEP[:, None, :]
    out_np, cache_np = linear_attention_forward(q, k, v, kind=kind, key_mask=mask)
    dout = rng.standard_normal(out_np.shape)
    g_np = linear_attention_backward(dout, cache_np)
    out, cache = linear_attention_forward(other_be(q), other_be(k), other_be(v), kind=kind, key_mask=other_be(mask))
    g = linear_attention_backward(other_be(dout), cache)
    assert other_be.is_native(out) and rel_error(np_(out), out_np) <= 1e-13
    for name in g:
        assert other_be.is_native(g[name]) and rel_error(np_(g[name]), g_np[name]) <= 1e-13, name


def test_bad_key_masks_raise(rng):
    q, k, v = make(rng)
    with pytest.raises(ValueError, match=r"key_mask of shape \(2, 3, 6\) does not broadcast to \(2, 3, 7\)"):
        linear_attention_forward(q, k, v, key_mask=np.ones((2, 3, 6), bool))
    with pytest.raises(ValueError, match=r"key_mask of shape \(2, 3, 5, 7\) does not broadcast"):
        linear_attention_forward(q, k, v, key_mask=np.ones((2, 3, 5, 7), bool))
    with pytest.raises(TypeError, match="key_mask must be a boolean array"):
        linear_attention_forward(q, k, v, key_mask=np.ones(7))
