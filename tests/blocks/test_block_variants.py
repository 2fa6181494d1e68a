"""Blocks with attention="chunked" | "linear" | "window" | "neighborhood": each equal to the exact block under
the matching mask (or to the block restated by hand, for linear), finite differences of the whole block, the
spatial transformer with them (what cache.weights says, backends, bad options: test_block_variants_api.py)."""

from __future__ import annotations

import numpy as np
import pytest
from block_helpers import (
    CHUNKED_GRAD_TOL,
    CHUNKED_TOL,
    GROUPS,
    HEADS,
    LOCAL_TOL,
    B,
    H,
    N,
    W,
    assert_same_block,
    cross_setup,
    fd_errors,
    grad_errors,
    jitter,
    run_cross,
    run_self,
    self_setup,
)

import attention_ref as ar
from attention_ref.gradcheck import check_backward, rel_error

FD_TOL = 1e-7

# ---------------------------------------------------------------- equal to the exact block


def random_mask(rng):
    """``(B, 1, N, N)``: a different pattern per sample, the same for both heads, with one fully masked row."""
    mask = rng.random((B, 1, N, N)) < 0.6
    mask[0, 0, 3] = False
    return mask


@pytest.mark.parametrize("block_size", [None, 5, (4, 7)])
@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "mask"])
def test_chunked_self_attention_equals_exact(block_size, masked, rng):
    x, params = self_setup(rng)
    mask = random_mask(rng) if masked else None
    dy = rng.standard_normal(x.shape)
    exact = run_self(x, params, dy, mask=mask)
    chunked = run_self(x, params, dy, mask=mask, attention="chunked", attention_options={"block_size": block_size})
    assert_same_block(chunked, exact, CHUNKED_TOL, CHUNKED_GRAD_TOL)
    cache = chunked[1]
    assert cache.weights is None and "never stores" in cache.weights_note
    assert rel_error(cache.weight_rows(0, N), exact[1].weights) <= CHUNKED_TOL
    if masked:
        assert np.all(cache.weight_rows(3, 4)[0, :, 0] == 0)  # the fully masked row


@pytest.mark.parametrize("block_size", [2, (3, 2)])
def test_chunked_cross_attention_with_context_mask_equals_exact(block_size, rng):
    x, context, params = cross_setup(rng)
    keep = np.array([[True, False, True, True, False], [False, False, False, False, False]])  # sample 1: all padded
    dy = rng.standard_normal(x.shape)
    exact = run_cross(x, context, params, dy, context_mask=keep)
    chunked = run_cross(
        x, context, params, dy, context_mask=keep, attention="chunked", attention_options={"block_size": block_size}
    )
    assert_same_block(chunked, exact, CHUNKED_TOL, CHUNKED_GRAD_TOL)
    assert np.all(chunked[2]["context"][~keep] == 0)
    assert rel_error(chunked[1].weight_rows(0, N), exact[1].weights) <= CHUNKED_TOL


@pytest.mark.parametrize(
    ("window", "shift"), [(2, 0), (2, 1), ((2, 3), (1, 2)), ((4, 6), 0)], ids=["2", "2 shift 1", "2x3 shift", "whole"]
)
def test_window_self_attention_equals_exact_under_window_mask(window, shift, rng):
    x, params = self_setup(rng)
    dy = rng.standard_normal(x.shape)
    exact = run_self(x, params, dy, mask=ar.attention.window_mask(H, W, window, shift))
    win = run_self(x, params, dy, attention="window", attention_options={"window": window, "shift": shift})
    assert_same_block(win, exact, LOCAL_TOL)
    cache = win[1]
    assert cache.weights is None and "inside each window" in cache.weights_note
    assert rel_error(cache.weight_rows(0, N), exact[1].weights) <= LOCAL_TOL
    assert rel_error(cache.weight_rows(7, 11), exact[1].weights[:, :, 7:11]) <= LOCAL_TOL


@pytest.mark.parametrize("kernel", [3, (3, 5), 1])
def test_neighborhood_self_attention_equals_exact_under_neighborhood_mask(kernel, rng):
    x, params = self_setup(rng)
    dy = rng.standard_normal(x.shape)
    exact = run_self(x, params, dy, mask=ar.attention.neighborhood_mask(H, W, kernel))
    nat = run_self(x, params, dy, attention="neighborhood", attention_options={"kernel": kernel})
    assert_same_block(nat, exact, LOCAL_TOL)
    assert nat[1].weights is None
    assert rel_error(nat[1].weight_rows(0, N), exact[1].weights) <= LOCAL_TOL


def test_exact_block_with_all_true_mask_equals_no_mask_and_a_per_head_mask_broadcasts(rng):
    x, params = self_setup(rng)
    y, cache, g = run_self(x, params)
    y_m, cache_m, g_m = run_self(x, params, mask=np.ones((1, HEADS, N, N), bool))
    np.testing.assert_array_equal(y, y_m)
    assert all(np.array_equal(g[n], g_m[n]) for n in g)
    # a per-head mask (1, heads, N, N) is the same for every sample: each sample equals its own run
    mask = rng.random((HEADS, N, N)) < 0.5
    y_b, cache_b, _ = run_self(x, params, mask=mask[None])
    y_0, cache_0, _ = run_self(x[:1], params, mask=mask[None])
    assert rel_error(y_0, y_b[:1]) <= 1e-15
    assert cache_b.weights.shape == (B, HEADS, N, N) and np.all(cache_b.weights[:, ~mask] == 0)


# ---------------------------------------------------------------- linear attention: the block restated by hand


def _phi(a):
    return np.where(a > 0, a + 1, np.exp(np.minimum(a, 0)))


def _softmax(a, axis, keep=None):
    if keep is not None:
        a = np.where(keep, a, -np.inf)
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def linear_block_by_hand(x, params, context=None, keep=None, kind="elu", eps=1e-6):
    """GroupNorm → Q, K, V → per head linear attention over the kept keys → out projection → + x, in NumPy."""
    b, h, w, c = x.shape
    g = x.reshape(b, h * w, GROUPS, c // GROUPS)
    mean, var = g.mean(axis=(1, 3), keepdims=True), g.var(axis=(1, 3), keepdims=True)
    normed = ((g - mean) / np.sqrt(var + 1e-6)).reshape(b, h * w, c) * params["norm.weight"] + params["norm.bias"]
    source = normed if context is None else context
    Q = normed @ params["q.weight"] + params["q.bias"]
    K = source @ params["k.weight"] + params["k.bias"]
    V = source @ params["v.weight"] + params["v.bias"]
    keep = np.ones(K.shape[:2], bool) if keep is None else np.broadcast_to(keep, K.shape[:2])
    d = c // HEADS
    heads, implied = [], []
    for j in range(HEADS):
        q, k, v = (t[..., j * d : (j + 1) * d] for t in (Q, K, V))
        if kind == "elu":
            # A_ij = φ(q_i)·φ(k_j) / (φ(q_i)·Σ_kept φ(k) + eps), over the kept keys only
            fk = _phi(k) * keep[..., None]
            a = (_phi(q) @ fk.transpose(0, 2, 1)) / (_phi(q) @ fk.sum(1)[..., None] + eps)
        else:
            rho_k = _softmax(k, axis=1, keep=keep[..., None])
            a = _softmax(q, axis=-1) @ rho_k.transpose(0, 2, 1)
        heads.append(a @ v)
        implied.append(a)
    out = np.concatenate(heads, axis=-1) @ params["out.weight"] + params["out.bias"]
    return x + out.reshape(x.shape), np.stack(implied, axis=1)


@pytest.mark.parametrize("kind", ["elu", "efficient"])
def test_linear_self_attention_matches_the_block_restated_by_hand(kind, rng):
    x, params = self_setup(rng)
    y, cache = ar.self_attention_forward(
        x, params, heads=HEADS, groups=GROUPS, attention="linear", attention_options={"kind": kind}
    )
    y_ref, implied = linear_block_by_hand(x, params, kind=kind)
    assert rel_error(y, y_ref) <= 1e-13
    assert cache.weights is None and "no softmax weight matrix" in cache.weights_note
    assert rel_error(cache.implied_weights(), implied) <= 1e-13
    with pytest.raises(ValueError, match="no weight rows: linear attention has no softmax weight matrix"):
        cache.weight_rows(0, 1)


@pytest.mark.parametrize("kind", ["elu", "efficient"])
def test_linear_cross_attention_leaves_padded_tokens_out(kind, rng):
    x, context, params = cross_setup(rng)
    keep = np.array([[True, False, True, True, False], [True, True, True, True, True]])
    opts = {"attention": "linear", "attention_options": {"kind": kind, "eps": 1e-3}}
    y, cache, g = run_cross(x, context, params, rng.standard_normal(x.shape), context_mask=keep, **opts)
    y_ref, implied = linear_block_by_hand(x, params, context=context, keep=keep, kind=kind, eps=1e-3)
    assert rel_error(y, y_ref) <= 1e-13
    assert rel_error(cache.implied_weights(), implied) <= 1e-13
    # changing padded tokens changes nothing; their gradient is 0; the same as deleting them from sample 0
    other = np.where(keep[..., None], context, 100 * rng.standard_normal(context.shape))
    y2, _, _ = run_cross(x, other, params, context_mask=keep, **opts)
    np.testing.assert_array_equal(y, y2)
    assert np.all(g["context"][~keep] == 0) and np.any(g["context"][keep] != 0)
    y0, _, _ = run_cross(x[:1], context[:1, keep[0]], params, **opts)
    assert rel_error(y0, y[:1]) <= 1e-13


# ---------------------------------------------------------------- finite differences of whole blocks


def _fd(options):
    """fd_errors, except for φ = elu + 1 linear attention: it is not shift-invariant over the keys, so its
    k.bias gradient is a real one (softmax attention and "efficient" attention, a softmax over the key
    positions, ignore a shift common to every key: their k.bias gradient is exactly 0)."""
    return check_backward if (options or {}).get("kind") == "elu" else fd_errors


SELF_FD = [
    pytest.param("exact", None, True, id="exact + mask"),
    pytest.param("chunked", {"block_size": 3}, False, id="chunked"),
    pytest.param("linear", {"kind": "elu"}, False, id="linear elu"),
    pytest.param("linear", {"kind": "efficient"}, False, id="linear efficient"),
    pytest.param("window", {"window": 2, "shift": 1}, False, id="window shift"),
    pytest.param("neighborhood", {"kernel": 3}, False, id="neighborhood"),
]


@pytest.mark.parametrize(("attention", "options", "masked"), SELF_FD)
def test_self_attention_variants_match_finite_differences(attention, options, masked, rng):
    x, params = self_setup(rng, shape=(2, 4, 4, 4))
    mask = ar.attention.neighborhood_mask(4, 4, 3) if masked else None

    def forward(x, **p):
        return ar.self_attention_forward(
            x, p, heads=2, groups=2, mask=mask, attention=attention, attention_options=options, rescale=1.3
        )

    inputs = {"x": x, **params}
    errs = _fd(options)(forward, ar.self_attention_backward, inputs)
    assert set(errs) == set(inputs)
    assert max(errs.values()) < FD_TOL, errs


CROSS_FD = [
    pytest.param("chunked", {"block_size": 2}, id="chunked"),
    pytest.param("linear", {"kind": "elu", "eps": 0.1}, id="linear elu"),
    pytest.param("linear", {"kind": "efficient"}, id="linear efficient"),
]


@pytest.mark.parametrize(("attention", "options"), CROSS_FD)
def test_cross_attention_variants_match_finite_differences(attention, options, rng):
    params = jitter(ar.init_cross_attention(4, 3, heads=2, groups=2, rng=2), rng)
    keep = np.array([[True, False, True, True], [False, True, True, True]])

    def forward(x, context, **p):
        # no residual: x's own term would dominate the loss and drown the small norm gradients in rounding
        return ar.cross_attention_forward(
            x,
            context,
            p,
            heads=2,
            groups=2,
            context_mask=keep,
            residual=False,
            attention=attention,
            attention_options=options,
        )

    inputs = {"x": rng.standard_normal((2, 3, 2, 4)), "context": rng.standard_normal((2, 4, 3)), **params}
    errs = _fd(options)(forward, ar.cross_attention_backward, inputs)
    assert max(errs.values()) < FD_TOL, errs


def test_spatial_transformer_with_chunked_self_attention_equals_exact(rng):
    params = jitter(ar.init_spatial_transformer(4, 3, heads=2, groups=2, ff_mult=1, rng=3), rng)
    x, context = rng.standard_normal((2, 3, 5, 4)), rng.standard_normal((2, 3, 3))
    keep = np.array([[True, False, True], [True, True, True]])
    y, cache = ar.spatial_transformer_forward(x, context, params, heads=2, groups=2, context_mask=keep)
    y_c, cache_c = ar.spatial_transformer_forward(
        x,
        context,
        params,
        heads=2,
        groups=2,
        context_mask=keep,
        self_attention="chunked",
        self_attention_options={"block_size": 4},
    )
    dy = rng.standard_normal(y.shape)
    g, g_c = ar.spatial_transformer_backward(dy, cache), ar.spatial_transformer_backward(dy, cache_c)
    assert rel_error(y_c, y) <= CHUNKED_TOL
    assert max(grad_errors(g_c, g).values()) <= CHUNKED_GRAD_TOL
    attn1, attn2 = cache_c.blocks[0].attn1, cache_c.blocks[0].attn2
    assert attn1.weights is None and attn2.weights.shape == (2, 2, 15, 3)  # only the self-attention changed
    assert rel_error(attn1.weight_rows(0, 15), cache.blocks[0].attn1.weights) <= CHUNKED_TOL


def test_spatial_transformer_with_linear_self_attention_takes_a_scale_for_its_cross_attention(rng):
    """The loaded-from-diffusers options always carry a scale; linear attn1 has none, attn2 still uses it."""
    params = jitter(ar.init_spatial_transformer(4, 3, heads=2, groups=2, ff_mult=1, rng=3), rng)
    x, context = rng.standard_normal((2, 3, 5, 4)), rng.standard_normal((2, 3, 3))
    options = {"heads": 2, "groups": 2, "self_attention": "linear"}
    y_default, _ = ar.spatial_transformer_forward(x, context, params, **options)
    y_same, _ = ar.spatial_transformer_forward(x, context, params, scale=2**-0.5, **options)  # d = 2: the default
    y_other, cache = ar.spatial_transformer_forward(x, context, params, scale=0.1, **options)
    assert rel_error(y_same, y_default) <= 1e-15
    assert rel_error(y_other, y_default) > 1e-3  # the scale reached the cross-attention
    assert cache.blocks[0].attn1.weights is None and cache.blocks[0].attn2.weights is not None


def test_spatial_transformer_init_checks_heads(rng):
    with pytest.raises(ValueError, match="heads must be at least 1"):
        ar.init_spatial_transformer(8, 4, heads=0, groups=4)
    with pytest.raises(ValueError, match="12 channels are not divisible into 5 heads; give head_dim"):
        ar.init_spatial_transformer(12, 4, heads=5, groups=4)
    assert ar.init_spatial_transformer(12, 4, heads=5, head_dim=2, groups=4)["proj_in.weight"].shape == (12, 10)


def test_feed_forward_refuses_mixed_dtypes(rng):
    params = {n: p.astype(np.float32) for n, p in ar.init_spatial_transformer(4, 3, heads=2, groups=2, rng=0).items()}
    ff = {n[len("blocks.0.ff.") :]: p for n, p in params.items() if n.startswith("blocks.0.ff.")}
    with pytest.raises(TypeError, match=r"feed-forward: .* has dtype float32 but the input has dtype float64"):
        ar.blocks.geglu_ff_forward(rng.standard_normal((2, 3, 4)), ff)


def test_spatial_transformer_with_window_self_attention_matches_finite_differences(rng):
    params = jitter(ar.init_spatial_transformer(2, 2, heads=1, groups=1, ff_mult=1, rng=4), rng)

    def forward(x, context, **p):
        return ar.spatial_transformer_forward(
            x, context, p, heads=1, groups=1, self_attention="window", self_attention_options={"window": 2, "shift": 1}
        )

    inputs = {"x": rng.standard_normal((1, 2, 4, 2)), "context": rng.standard_normal((1, 2, 2)), **params}
    errs = fd_errors(forward, ar.spatial_transformer_backward, inputs)
    assert max(errs.values()) < FD_TOL, errs
