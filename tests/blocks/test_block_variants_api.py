"""Blocks with attention="chunked" | "linear" | "window" | "neighborhood": what cache.weights says for each,
the variants on every backend, and the option combinations they refuse."""

from __future__ import annotations

import numpy as np
import pytest
from block_helpers import (
    GROUPS,
    HEADS,
    OTHER_BACKENDS,
    C,
    H,
    N,
    W,
    cross_setup,
    grad_errors,
    run_cross,
    run_self,
    self_setup,
)
from conftest import np_

import attention_ref as ar
from attention_ref.gradcheck import rel_error

# ---------------------------------------------------------------- weights


WEIGHT_CASES = [
    pytest.param("exact", None, id="exact"),
    pytest.param("chunked", None, id="chunked"),
    pytest.param("linear", None, id="linear"),
    pytest.param("window", {"window": 2}, id="window"),
    pytest.param("neighborhood", {"kernel": 3}, id="neighborhood"),
]


@pytest.mark.parametrize(("attention", "options"), WEIGHT_CASES)
def test_weights_api_for_every_variant(attention, options, rng):
    x, params = self_setup(rng)
    _, cache, _ = run_self(x[:1], params, attention=attention, attention_options=options)
    assert isinstance(cache.weights_note, str) and attention in cache.weights_note
    if attention == "exact":
        assert cache.weights.shape == (1, HEADS, N, N)
        np.testing.assert_array_equal(cache.weight_rows(2, 5), cache.weights[:, :, 2:5])
        with pytest.raises(ValueError, match="exact attention is a softmax attention with real weights"):
            cache.implied_weights()
    else:
        assert cache.weights is None
    if attention == "linear":
        assert cache.implied_weights().shape == (1, HEADS, N, N)
    else:
        rows = cache.weight_rows(2, 5)
        assert rows.shape == (1, HEADS, 3, N)
        np.testing.assert_allclose(rows.sum(-1), 1.0, rtol=1e-14)
        assert cache.weight_rows(4, 4).shape == (1, HEADS, 0, N)
        with pytest.raises(ValueError, match=r"rows 3:25 are not within the 24 query rows"):
            cache.weight_rows(3, 25)
        with pytest.raises(TypeError, match="start must be an int"):
            cache.weight_rows(1.0, 2)
        with pytest.raises(TypeError, match="stop must be an int"):
            cache.weight_rows(1, True)
        np.testing.assert_array_equal(cache.weight_rows(np.int64(2), np.int32(5)), rows)  # NumPy integers too


# ---------------------------------------------------------------- backends

BACKEND_CASES = [
    pytest.param("chunked", {"block_size": 5}, id="chunked"),
    pytest.param("linear", {"kind": "elu"}, id="linear"),
    pytest.param("window", {"window": 2, "shift": 1}, id="window"),
    pytest.param("neighborhood", {"kernel": 3}, id="neighborhood"),
]


@pytest.mark.parametrize("be", OTHER_BACKENDS, indirect=True)
@pytest.mark.parametrize(("attention", "options"), BACKEND_CASES)
def test_variant_blocks_agree_across_backends(attention, options, be, rng):
    x, params = self_setup(rng)
    dy = rng.standard_normal(x.shape)
    y_np, cache_np, g_np = run_self(x, params, dy, attention=attention, attention_options=options)
    y, cache = ar.self_attention_forward(
        be(x),
        {k: be(v) for k, v in params.items()},
        heads=HEADS,
        groups=GROUPS,
        attention=attention,
        attention_options=options,
    )
    g = ar.self_attention_backward(be(dy), cache)
    assert be.is_native(y) and rel_error(np_(y), y_np) <= 1e-12
    assert all(be.is_native(v) for v in g.values())
    errors = grad_errors(g, g_np)
    assert max(errors.values()) <= 1e-12, errors
    if attention == "linear":
        weights, weights_np = cache.implied_weights(), cache_np.implied_weights()
    else:
        weights, weights_np = cache.weight_rows(5, 9), cache_np.weight_rows(5, 9)
    assert be.is_native(weights) and rel_error(np_(weights), weights_np) <= 1e-12


@pytest.mark.parametrize("be", OTHER_BACKENDS, indirect=True)
def test_cross_attention_variants_with_context_mask_agree_across_backends(be, rng):
    x, context, params = cross_setup(rng)
    keep = np.array([[True, False, True, True, False], [True, True, False, True, True]])
    for attention in ("chunked", "linear"):
        y_np, _, g_np = run_cross(x, context, params, context_mask=keep, attention=attention)
        y, cache = ar.cross_attention_forward(
            be(x),
            be(context),
            {k: be(v) for k, v in params.items()},
            heads=HEADS,
            groups=GROUPS,
            context_mask=be(keep),
            attention=attention,
        )
        g = ar.cross_attention_backward(be(np.ones(x.shape)), cache)
        assert be.is_native(y) and rel_error(np_(y), y_np) <= 1e-12
        assert max(grad_errors(g, g_np).values()) <= 1e-12


# ---------------------------------------------------------------- bad option combinations


def test_bad_attention_choices_raise_clear_errors(rng):
    x, params = self_setup(rng)
    xc, context, cparams = cross_setup(rng)

    def self_attn(**kw):
        return ar.self_attention_forward(x, params, heads=HEADS, groups=GROUPS, **kw)

    def cross_attn(**kw):
        return ar.cross_attention_forward(xc, context, cparams, heads=HEADS, groups=GROUPS, **kw)

    with pytest.raises(ValueError, match=r"self-attention: unknown attention 'flash'; available: \['chunked', "):
        self_attn(attention="flash")
    with pytest.raises(ValueError, match=r"window attention takes window \(required\), shift; got missing \['window'"):
        self_attn(attention="window")
    with pytest.raises(ValueError, match=r"got unknown \['kernel'\]"):
        self_attn(attention="window", attention_options={"window": 2, "kernel": 3})
    with pytest.raises(ValueError, match=r"exact attention takes no options; got unknown \['block_size'\]"):
        self_attn(attention_options={"block_size": 4})
    with pytest.raises(TypeError, match="attention_options must be a mapping"):
        self_attn(attention="window", attention_options=[("window", 2)])
    with pytest.raises(ValueError, match=r"a 4×6 map cannot be cut into 4×4 windows"):
        self_attn(attention="window", attention_options={"window": 4})
    with pytest.raises(ValueError, match="shift must satisfy 0 ≤ shift < window"):
        self_attn(attention="window", attention_options={"window": 2, "shift": 2})
    with pytest.raises(ValueError, match="kernel must be odd"):
        self_attn(attention="neighborhood", attention_options={"kernel": 2})
    with pytest.raises(ValueError, match="block_size must be positive"):
        self_attn(attention="chunked", attention_options={"block_size": 0})
    with pytest.raises(ValueError, match="kind must be one of"):
        self_attn(attention="linear", attention_options={"kind": "performer"})
    # masks the variant cannot take
    with pytest.raises(ValueError, match="window attention takes no mask: its windows are its mask"):
        self_attn(attention="window", attention_options={"window": 2}, mask=ar.attention.window_mask(H, W, 2))
    with pytest.raises(ValueError, match="neighborhood attention takes no mask"):
        self_attn(attention="neighborhood", attention_options={"kernel": 3}, mask=np.ones((N, N), bool))
    with pytest.raises(ValueError, match=r"no linear-time form of a per-query mask; got a mask of shape \(24, 24\)"):
        self_attn(attention="linear", mask=np.ones((N, N), bool))
    with pytest.raises(ValueError, match=r"linear attention has no scale .*got scale=0\.5"):
        self_attn(attention="linear", scale=0.5)
    with pytest.raises(
        ValueError,
        match=r"self-attention: mask of shape \(1, 3, 24, 24\) does not broadcast to \(B, heads, N, M\) = "
        r"\(2, 2, 24, 24",
    ):
        self_attn(mask=np.ones((1, 3, N, N), bool))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 24, 24\) must be \(N, M\) or \(B or 1, heads or 1,"):
        self_attn(mask=np.ones((2, N, N), bool))
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        self_attn(mask=np.ones((N, N)))
    # cross-attention: keys are tokens, not pixels
    for attention, options in (("window", {"window": 2}), ("neighborhood", {"kernel": 3})):
        with pytest.raises(
            ValueError,
            match=rf"cross-attention: {attention} attention needs keys on the pixel grid, but these keys are 5 context",
        ):
            cross_attn(attention=attention, attention_options=options)
    with pytest.raises(TypeError, match="unexpected keyword argument 'mask'"):
        ar.cross_attention_forward(xc, context, cparams, heads=HEADS, groups=GROUPS, mask=np.ones((N, 5), bool))
    # the spatial transformer names the block
    sparams = ar.init_spatial_transformer(C, 3, heads=HEADS, groups=GROUPS, rng=0)
    with pytest.raises(ValueError, match=r"spatial transformer blocks\.0 attn1: window attention takes window"):
        ar.spatial_transformer_forward(x, context, sparams, heads=HEADS, groups=GROUPS, self_attention="window")
