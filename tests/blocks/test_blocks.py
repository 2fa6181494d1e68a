"""Attention blocks on (B, H, W, C) maps: finite differences, identities, backends, bad input (no torch needed)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest
from block_helpers import OTHER_BACKENDS, fd_errors, grad_errors, jitter
from conftest import np_

import attention_ref as ar
from attention_ref.blocks import ATTENTION_VARIANTS, attention_layer
from attention_ref.gradcheck import check_backward, rel_error

FD_TOL = 1e-7


@dataclass(frozen=True)
class SelfCase:
    shape: tuple[int, int, int, int]  # x: (B, H, W, C)
    heads: int
    groups: int | None  # None: no group norm
    bias: bool = True
    residual: bool = True
    rescale: float = 1.0
    scale: float | None = None


SELF_CASES = [
    pytest.param(SelfCase((2, 3, 5, 4), 1, 2), id="1 head, norm, residual"),
    pytest.param(SelfCase((2, 5, 3, 4), 2, None, bias=False), id="2 heads, no norm, no bias"),
    pytest.param(SelfCase((1, 3, 3, 8), 4, 4, residual=False, rescale=1.7), id="4 heads, no residual, rescale"),
    pytest.param(SelfCase((1, 3, 1, 6), 3, 3, rescale=0.5, scale=0.9), id="3 heads, custom scale, one sample"),
]


@pytest.mark.parametrize("case", SELF_CASES)
def test_self_attention_matches_finite_differences(case, rng):
    shape, heads, groups = case.shape, case.heads, case.groups
    C = shape[-1]
    params = jitter(ar.init_self_attention(C, heads=heads, groups=groups, bias=case.bias, rng=1), rng)
    opts = dict(heads=heads, groups=groups or 1, residual=case.residual, rescale=case.rescale, scale=case.scale)

    def forward(x, **p):
        return ar.self_attention_forward(x, p, **opts)

    errs = fd_errors(forward, ar.self_attention_backward, {"x": rng.standard_normal(shape), **params})
    assert set(errs) == {"x", *params}
    assert max(errs.values()) < FD_TOL, errs


@dataclass(frozen=True)
class CrossCase:
    x_shape: tuple[int, int, int, int]  # (B, H, W, C)
    context_shape: tuple[int, int, int]  # (B, M, D)
    heads: int
    groups: int | None  # None: no group norm
    residual: bool = True
    rescale: float = 1.0
    mask: list | None = None  # context_mask, (B, M) or (M,)


CROSS_CASES = [
    pytest.param(CrossCase((2, 3, 5, 4), (2, 4, 3), 2, 2, mask=[[1, 1, 0, 1], [0, 1, 0, 0]]), id="2 heads, norm, mask"),
    pytest.param(
        CrossCase((2, 1, 3, 6), (2, 5, 2), 1, None, residual=False, rescale=2.0), id="1 head, no norm, no res"
    ),
    pytest.param(CrossCase((2, 3, 3, 3), (2, 4, 5), 3, None, mask=[1, 0, 1, 1]), id="3 heads, shared mask"),
]


@pytest.mark.parametrize("case", CROSS_CASES)
def test_cross_attention_matches_finite_differences(case, rng):
    xshape, cshape, heads = case.x_shape, case.context_shape, case.heads
    params = jitter(ar.init_cross_attention(xshape[-1], cshape[-1], heads=heads, groups=case.groups, rng=2), rng)
    mask = None if case.mask is None else np.array(case.mask, dtype=bool)
    opts = dict(heads=heads, groups=case.groups or 1, residual=case.residual, rescale=case.rescale, context_mask=mask)

    def forward(x, context, **p):
        return ar.cross_attention_forward(x, context, p, **opts)

    inputs = {"x": rng.standard_normal(xshape), "context": rng.standard_normal(cshape), **params}
    errs = fd_errors(forward, ar.cross_attention_backward, inputs)
    assert set(errs) == {"x", "context", *params}
    assert max(errs.values()) < FD_TOL, errs


def test_geglu_feed_forward_matches_finite_differences(rng):
    params = {
        "proj.weight": rng.standard_normal((3, 8)),
        "proj.bias": rng.standard_normal(8),
        "out.weight": rng.standard_normal((4, 5)),
        "out.bias": rng.standard_normal(5),
    }

    def forward(x, **p):
        return ar.blocks.geglu_ff_forward(x, p)

    errs = check_backward(forward, ar.blocks.geglu_ff_backward, {"x": 2 * rng.standard_normal((2, 3, 3)), **params})
    assert max(errs.values()) < FD_TOL, errs


def test_spatial_transformer_matches_finite_differences(rng):
    params = jitter(ar.init_spatial_transformer(4, 3, heads=2, groups=2, ff_mult=1, attention_bias=True, rng=3), rng)
    mask = np.array([[True, False, True], [True, True, True]])

    def forward(x, context, **p):
        return ar.spatial_transformer_forward(x, context, p, heads=2, groups=2, context_mask=mask)

    inputs = {"x": rng.standard_normal((2, 3, 1, 4)), "context": rng.standard_normal((2, 3, 3)), **params}
    errs = fd_errors(forward, ar.spatial_transformer_backward, inputs)
    assert set(errs) == set(inputs)
    assert max(errs.values()) < FD_TOL, errs


def test_spatial_transformer_depth_two_one_sample_matches_finite_differences(rng):
    params = jitter(ar.init_spatial_transformer(2, 2, heads=1, groups=1, depth=2, ff_mult=1, rng=4), rng)
    for name in [k for k in params if "norm2" in k]:
        del params[name]  # a layer norm without affine parameters

    def forward(x, context):
        return ar.spatial_transformer_forward(x, context, params, heads=1, groups=1, norm_eps=1e-3)

    inputs = {"x": rng.standard_normal((1, 1, 3, 2)), "context": rng.standard_normal((1, 2, 2))}
    errs = check_backward(forward, ar.spatial_transformer_backward, inputs)
    assert max(errs.values()) < FD_TOL, errs
    out, cache = forward(**inputs)
    grads = ar.spatial_transformer_backward(np.ones_like(out), cache)
    assert set(grads) == {"x", "context", *params}
    assert all(grads[k].shape == params[k].shape for k in params)


# ---------------------------------------------------------------- identities and layout


def test_self_attention_weights_layout_and_rows(rng):
    B, H, W, C, heads = 2, 3, 5, 6, 3
    params = jitter(ar.init_self_attention(C, heads=heads, groups=3, rng=5), rng)
    x = rng.standard_normal((B, H, W, C))
    y, cache = ar.self_attention_forward(x, params, heads=heads, groups=3)
    weights = cache.weights
    assert weights.shape == (B, heads, H * W, H * W)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-14)
    # the weights of query pixel (r, c), head j, recomputed by hand: token index r·W + c
    h, _ = ar.ops.group_norm_forward(x, params["norm.weight"], params["norm.bias"], groups=3, eps=1e-6)
    d = C // heads
    j, r, c = 1, 2, 3
    cols = slice(j * d, (j + 1) * d)
    q = h[0, r, c] @ params["q.weight"][:, cols] + params["q.bias"][cols]
    k = h[0].reshape(H * W, C) @ params["k.weight"][:, cols] + params["k.bias"][cols]
    logits = k @ q / np.sqrt(d)
    expected = np.exp(logits - logits.max())
    np.testing.assert_allclose(weights[0, j, r * W + c], expected / expected.sum(), rtol=1e-12)


def test_self_attention_commutes_with_permuting_pixels(rng):
    params = jitter(ar.init_self_attention(4, heads=2, groups=2, rng=6), rng)
    x = rng.standard_normal((2, 3, 5, 4))
    perm = rng.permutation(15)
    y, _ = ar.self_attention_forward(x, params, heads=2, groups=2)
    # shuffle the pixels: a 3×5 map's tokens rearranged into a 5×3 map
    xp = x.reshape(2, 15, 4)[:, perm].reshape(2, 5, 3, 4)
    yp, _ = ar.self_attention_forward(xp, params, heads=2, groups=2)
    np.testing.assert_allclose(yp.reshape(2, 15, 4), y.reshape(2, 15, 4)[:, perm], rtol=1e-12, atol=1e-13)


def test_key_bias_has_zero_gradient(rng):
    """softmax is unchanged by q·b_k, the same for every key of a row, so ∂L/∂b_k = 0 exactly."""
    params = jitter(ar.init_self_attention(4, heads=2, groups=2, rng=7), rng)
    y, cache = ar.self_attention_forward(rng.standard_normal((2, 3, 3, 4)), params, heads=2, groups=2)
    g = ar.self_attention_backward(rng.standard_normal(y.shape), cache)
    assert np.max(np.abs(g["k.bias"])) < 1e-13 * np.max(np.abs(g["q.bias"]))


def test_cross_attention_ignores_padded_tokens(rng):
    params = jitter(ar.init_cross_attention(4, 3, heads=2, groups=2, rng=8), rng)
    x, context = rng.standard_normal((2, 3, 5, 4)), rng.standard_normal((2, 6, 3))
    mask = np.array([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=bool)
    y, cache = ar.cross_attention_forward(x, context, params, heads=2, groups=2, context_mask=mask)
    assert cache.weights.shape == (2, 2, 15, 6)
    np.testing.assert_allclose(cache.weights.sum(-1), 1.0, atol=1e-14)
    assert np.all(cache.weights[np.broadcast_to(~mask[:, None, None, :], cache.weights.shape)] == 0)
    # changing padded tokens changes nothing
    other = np.where(mask[..., None], context, 100 * rng.standard_normal(context.shape))
    y2, _ = ar.cross_attention_forward(x, other, params, heads=2, groups=2, context_mask=mask)
    np.testing.assert_array_equal(y, y2)
    g = ar.cross_attention_backward(rng.standard_normal(y.shape), cache)
    assert np.all(g["context"][~mask] == 0) and np.any(g["context"][mask] != 0)
    # the same as dropping the padded tokens of sample 0
    y0, _ = ar.cross_attention_forward(x[:1], context[:1, mask[0]], params, heads=2, groups=2)
    np.testing.assert_allclose(y0, y[:1], rtol=1e-13, atol=1e-14)


def test_fully_padded_context_gives_zero_attention_without_nan(rng):
    params = jitter(ar.init_cross_attention(4, 3, heads=1, groups=2, rng=9), rng)
    x, context = rng.standard_normal((2, 3, 3, 4)), rng.standard_normal((2, 2, 3))
    mask = np.array([[False, False], [True, False]])
    y, cache = ar.cross_attention_forward(x, context, params, heads=1, groups=2, context_mask=mask, residual=False)
    g = ar.cross_attention_backward(rng.standard_normal(y.shape), cache)
    assert np.all(cache.weights[0] == 0)
    np.testing.assert_allclose(y[0], np.broadcast_to(params["out.bias"], y[0].shape), rtol=1e-15)
    assert all(np.all(np.isfinite(v)) for v in g.values())


def test_map_blocks_are_the_attention_layer_on_the_pixels_as_tokens(rng):
    """One code path: the map block is the layer on x.reshape(B, H·W, C), token row·W + col, bit for bit."""
    B, H, W, C, M, D = 2, 3, 5, 4, 6, 3
    x, context = rng.standard_normal((B, H, W, C)), rng.standard_normal((B, M, D))
    keep = np.array([[1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 1, 0]], dtype=bool)
    params = jitter(ar.init_cross_attention(C, D, heads=2, groups=2, rng=10), rng)
    y, cache = ar.cross_attention_forward(x, context, params, heads=2, groups=2, context_mask=keep)
    options = dict(heads=2, groups=2, eps=1e-6, residual=True, context=context, context_mask=keep)
    y_tokens, layer = ar.attention_layer_forward(x.reshape(B, H * W, C), params, **options)
    np.testing.assert_array_equal(y, y_tokens.reshape(B, H, W, C))
    np.testing.assert_array_equal(cache.weights, layer.weights)
    dy = rng.standard_normal(y.shape)
    g, g_tokens = ar.cross_attention_backward(dy, cache), ar.attention_layer_backward(dy.reshape(B, H * W, C), layer)
    np.testing.assert_array_equal(g["x"], g_tokens.pop("h").reshape(x.shape))
    assert all(np.array_equal(g[name], g_tokens[name]) for name in g_tokens)


def test_blocks_call_exact_attention_directly(rng, monkeypatch):
    """attention="exact" runs attention_forward / attention_backward from the layer; the registry holds the variants."""
    assert "exact" not in ATTENTION_VARIANTS
    assert sorted(ATTENTION_VARIANTS) == ["chunked", "linear", "neighborhood", "window"]
    calls = []
    exact_forward, exact_backward = attention_layer.attention_forward, attention_layer.attention_backward

    def spy_forward(q, k, v, **kw):
        calls.append(("forward", tuple(q.shape), tuple(k.shape)))
        return exact_forward(q, k, v, **kw)

    def spy_backward(dout, cache):
        calls.append(("backward", tuple(dout.shape), None))
        return exact_backward(dout, cache)

    monkeypatch.setattr(attention_layer, "attention_forward", spy_forward)
    monkeypatch.setattr(attention_layer, "attention_backward", spy_backward)
    params = ar.init_spatial_transformer(4, 3, heads=2, groups=2, rng=11)
    y, cache = ar.spatial_transformer_forward(
        rng.standard_normal((1, 3, 5, 4)), rng.standard_normal((1, 2, 3)), params, heads=2, groups=2
    )
    ar.spatial_transformer_backward(np.ones_like(y), cache)
    assert calls == [
        ("forward", (1, 2, 15, 2), (1, 2, 15, 2)),  # attn1: the 15 pixels attend to each other
        ("forward", (1, 2, 15, 2), (1, 2, 2, 2)),  # attn2: to the 2 context tokens
        ("backward", (1, 2, 15, 2), None),
        ("backward", (1, 2, 15, 2), None),
    ]


def test_init_functions_give_documented_keys_and_shapes():
    p = ar.init_self_attention(8, heads=2, groups=4, rng=0)
    assert set(p) == {
        "norm.weight",
        "norm.bias",
        *(f"{n}.{w}" for n in "qkv" for w in ("weight", "bias")),
        "out.weight",
        "out.bias",
    }
    assert p["q.weight"].shape == (8, 8) and p["out.bias"].shape == (8,) and p["q.weight"].dtype == np.float64
    p = ar.init_self_attention(8, groups=None, bias=False, out_bias=False, dtype="float32", rng=0)
    assert set(p) == {"q.weight", "k.weight", "v.weight", "out.weight"} and p["q.weight"].dtype == np.float32
    p = ar.init_cross_attention(8, 5, heads=4, groups=2, rng=0)
    assert p["k.weight"].shape == (5, 8) and p["v.weight"].shape == (5, 8) and p["q.weight"].shape == (8, 8)
    p = ar.init_spatial_transformer(8, 5, heads=2, head_dim=3, depth=2, groups=4, rng=0)
    assert p["proj_in.weight"].shape == (8, 6) and p["proj_out.weight"].shape == (6, 8)
    assert p["blocks.1.attn2.k.weight"].shape == (5, 6) and p["blocks.1.ff.proj.weight"].shape == (6, 48)
    assert p["blocks.0.ff.out.weight"].shape == (24, 6) and "blocks.0.attn1.q.bias" not in p
    np.testing.assert_array_equal(
        ar.init_self_attention(4, groups=2, rng=3)["q.weight"], ar.init_self_attention(4, groups=2, rng=3)["q.weight"]
    )


# ---------------------------------------------------------------- backends


def _to(be, params):
    return {k: be(v) for k, v in params.items()}


@pytest.mark.parametrize("be", OTHER_BACKENDS, indirect=True)
@pytest.mark.parametrize("block", ["self", "cross", "spatial"])
def test_blocks_agree_across_backends(block, be, rng):
    x = rng.standard_normal((2, 3, 5, 4))
    context = rng.standard_normal((2, 3, 3))
    mask = np.array([[True, False, True], [True, True, False]])
    if block == "self":
        params = jitter(ar.init_self_attention(4, heads=2, groups=2, rng=0), rng)
        run = functools.partial(ar.self_attention_forward, heads=2, groups=2, rescale=1.5)
        backward, args = ar.self_attention_backward, (x,)
        kwargs = {}
    elif block == "cross":
        params = jitter(ar.init_cross_attention(4, 3, heads=2, groups=2, rng=0), rng)
        run = functools.partial(ar.cross_attention_forward, heads=2, groups=2)
        backward, args = ar.cross_attention_backward, (x, context)
        kwargs = {"context_mask": mask}
    else:
        params = jitter(ar.init_spatial_transformer(4, 3, heads=2, groups=2, ff_mult=2, rng=0), rng)
        run = functools.partial(ar.spatial_transformer_forward, heads=2, groups=2)
        backward, args = ar.spatial_transformer_backward, (x, context)
        kwargs = {"context_mask": mask}
    y_np, cache_np = run(*args, params, **kwargs)
    dy = rng.standard_normal(y_np.shape)
    g_np = backward(dy, cache_np)
    y, cache = run(*(be(a) for a in args), _to(be, params), **{k: be(v) for k, v in kwargs.items()})
    g = backward(be(dy), cache)
    assert be.is_native(y)
    assert rel_error(y, y_np) <= 1e-12
    assert all(be.is_native(v) for v in g.values())
    errors = grad_errors(g, g_np)
    assert max(errors.values()) <= 1e-12, errors
    if block != "spatial":
        assert be.is_native(cache.weights)
        assert rel_error(cache.weights, cache_np.weights) <= 1e-12
    else:
        assert np_(cache.blocks[0].attn2.weights).shape == (2, 2, 15, 3)


def test_importing_the_package_does_not_import_torch():
    """torch is a peer for interop only: it is imported lazily, never by ``import attention_ref``."""
    import os
    import pathlib
    import subprocess
    import sys

    root = str(pathlib.Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    code = "import sys, attention_ref, attention_ref.interop; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
