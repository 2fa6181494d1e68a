"""What the attention layer and the blocks refuse: shapes, parameters, masks, empty axes, caches and dy, each
error naming the numbers (no torch needed)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import attention_ref as ar


def test_a_token_batch_given_to_a_map_block_is_refused_naming_both_ways_out(rng):
    """(B, N, C) tokens are never read as one (H, W, C) map: self-attention used to return (heads, 2N, 2N) weights."""
    x = rng.standard_normal((2, 24, 8))
    params = ar.init_self_attention(8, heads=2, groups=4, rng=0)
    both_ways = (
        r"x of shape \(2, 24, 8\) is not a \(B, H, W, C\) map; for one \(H, W, C\) map pass x\[None\], "
        r"for \(B, N, C\) token sequences call attention_layer_forward\(x, params, heads=\.\.\."
    )
    with pytest.raises(ValueError, match="self-attention: " + both_ways + r"\)"):
        ar.self_attention_forward(x, params, heads=2, groups=4)
    cparams = ar.init_cross_attention(8, 5, heads=2, groups=4, rng=0)
    with pytest.raises(ValueError, match="cross-attention: " + both_ways + r", context=context\)"):
        ar.cross_attention_forward(x, rng.standard_normal((2, 3, 5)), cparams, heads=2, groups=4)
    sparams = ar.init_spatial_transformer(8, 5, heads=2, groups=4, rng=0)
    with pytest.raises(ValueError, match="spatial transformer: " + both_ways):
        ar.spatial_transformer_forward(x, rng.standard_normal((2, 3, 5)), sparams, heads=2, groups=4)
    # the way out for tokens: the layer, with the same parameters
    y, cache = ar.attention_layer_forward(x, params, heads=2, groups=4, eps=1e-6, residual=True)
    assert y.shape == x.shape and cache.weights.shape == (2, 2, 24, 24)
    # the way out for one map
    y_map, _ = ar.self_attention_forward(x.reshape(2, 4, 6, 8)[:1], params, heads=2, groups=4)
    np.testing.assert_array_equal(y_map.reshape(1, 24, 8), y[:1])


def test_the_layer_refuses_maps_and_contexts_of_the_wrong_shape(rng):
    params = ar.init_attention_layer(8, 5, heads=2, rng=0)
    h = rng.standard_normal((2, 6, 8))
    with pytest.raises(
        ValueError,
        match=r"h must be \(B, N, C\) token sequences, got shape \(2, 3, 2, 8\); a \(B, H, W, C\) "
        r"map goes to self_attention_forward / cross_attention_forward",
    ):
        ar.attention_layer_forward(h.reshape(2, 3, 2, 8), params, heads=2, context=rng.standard_normal((2, 4, 5)))
    with pytest.raises(
        ValueError,
        match=r"context must be \(B, M, D\) = \(2, M, D\) token sequences for an input of "
        r"shape \(2, 6, 8\), got shape \(4, 5\)",
    ):
        ar.attention_layer_forward(h, params, heads=2, context=rng.standard_normal((4, 5)))
    with pytest.raises(
        ValueError, match=r"k.weight of shape \(5, 8\) expects 5 input channels; the context width is 4"
    ):
        ar.attention_layer_forward(h, params, heads=2, context=rng.standard_normal((2, 4, 4)))
    # diffusers' (B, N, M) mask with B = heads would broadcast silently as (heads, N, M): a 3-D mask is refused
    with pytest.raises(
        ValueError,
        match=r"mask of shape \(2, 6, 4\) must be \(N, M\) or \(B or 1, heads or 1, N, M\); a per-sample "
        r"\(B, N, M\) mask is mask\[:, None\], a per-head \(heads, N, M\) one mask\[None\]",
    ):
        ar.attention_layer_forward(
            h, params, heads=2, context=rng.standard_normal((2, 4, 5)), mask=np.ones((2, 6, 4), bool)
        )
    with pytest.raises(ValueError, match=r"mask of shape \(1, 3, 6, 4\) does not broadcast to \(B, heads, N, M\) = "):
        ar.attention_layer_forward(
            h, params, heads=2, context=rng.standard_normal((2, 4, 5)), mask=np.ones((1, 3, 6, 4), bool)
        )
    with pytest.raises(ValueError, match="cross_norm='layer_norm' normalises the context, but self-attention has none"):
        ar.attention_layer_forward(h, ar.init_attention_layer(8, rng=0), heads=2, cross_norm="layer_norm")
    with pytest.raises(ValueError, match=r"norm_cross\.weight is given but cross_norm is None"):
        ar.attention_layer_forward(
            h,
            ar.init_attention_layer(8, 5, cross_norm="layer_norm", rng=0),
            heads=2,
            context=rng.standard_normal((2, 4, 5)),
        )
    with pytest.raises(ValueError, match=r"unknown \['add_k_proj.weight'\]"):
        ar.attention_layer_forward(
            h, {**params, "add_k_proj.weight": params["k.weight"]}, heads=2, context=rng.standard_normal((2, 4, 5))
        )
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        ar.attention_layer_forward(h, ar.init_attention_layer(8, rng=0), heads=2, mask=np.zeros((2, 1, 1, 6)))


EMPTY_CASES = [
    pytest.param((0, 6, 8), (0, 4, 5), r"input of shape \(0, 6, 8\) and context of shape \(0, 4, 5\)", id="B = 0"),
    pytest.param((2, 0, 8), (2, 4, 5), r"input of shape \(2, 0, 8\) and context of shape \(2, 4, 5\)", id="N = 0"),
    pytest.param((2, 6, 8), (2, 0, 5), r"input of shape \(2, 6, 8\) and context of shape \(2, 0, 5\)", id="M = 0"),
]


@pytest.mark.parametrize(("h_shape", "context_shape", "shapes"), EMPTY_CASES)
def test_an_empty_axis_is_one_clear_value_error_in_the_layer_and_every_block(h_shape, context_shape, shapes, rng):
    h, context = rng.standard_normal(h_shape), rng.standard_normal(context_shape)
    needs = r"needs at least one sample, one query token and one key token \(B, N, M ≥ 1\)"
    params = ar.init_attention_layer(8, 5, heads=2, groups=4, rng=0)
    with pytest.raises(ValueError, match=rf"attention layer: {shapes}: {needs}"):
        ar.attention_layer_forward(h, params, heads=2, groups=4, context=context)
    B, N = h_shape[:2]
    x = h.reshape(B, 1, N, 8)  # a 1×N map
    with pytest.raises(ValueError, match=needs):
        ar.cross_attention_forward(
            x, context, ar.init_cross_attention(8, 5, heads=2, groups=4, rng=0), heads=2, groups=4
        )
    sparams = ar.init_spatial_transformer(8, 5, heads=2, groups=4, rng=0)
    with pytest.raises(ValueError, match=rf"spatial transformer: x of shape .*: {needs}"):
        ar.spatial_transformer_forward(x, context, sparams, heads=2, groups=4)
    if context_shape[1] > 0:
        with pytest.raises(ValueError, match=needs):
            ar.self_attention_forward(x, ar.init_self_attention(8, heads=2, groups=4, rng=0), heads=2, groups=4)


def test_bad_shapes_raise_value_errors_naming_the_numbers(rng):
    x = rng.standard_normal((2, 3, 5, 6))
    params = ar.init_self_attention(6, heads=2, groups=3, rng=0)
    with pytest.raises(ValueError, match="6 channels are not divisible into 4 groups"):
        ar.self_attention_forward(x, params, heads=2, groups=4)
    with pytest.raises(ValueError, match="6 attention channels are not divisible into 4 heads"):
        ar.self_attention_forward(x, params, heads=4, groups=3)
    with pytest.raises(ValueError, match="6 channels are not divisible into 4 groups"):
        ar.init_self_attention(6, groups=4)
    with pytest.raises(ValueError, match="6 channels are not divisible into 4 heads"):
        ar.init_cross_attention(6, 3, heads=4, groups=3)
    with pytest.raises(ValueError, match=r"q.weight of shape \(6, 6\) expects 6 input channels but the input has 5"):
        ar.self_attention_forward(x[..., :5], params, heads=2, groups=5)
    with pytest.raises(ValueError, match=r"x of shape \(30, 6\) is not a \(B, H, W, C\) map"):
        ar.self_attention_forward(x.reshape(30, 6), params, heads=2, groups=3)
    with pytest.raises(ValueError, match=r"unknown \['to_q.weight'\]"):
        ar.self_attention_forward(x, {**params, "to_q.weight": params["q.weight"]}, heads=2, groups=3)
    with pytest.raises(ValueError, match=r"missing \['out.weight'\]"):
        ar.self_attention_forward(x, {k: v for k, v in params.items() if k != "out.weight"}, heads=2, groups=3)
    # a group norm inside a transformer block's attention layers would normalise their input a second time
    st = ar.init_spatial_transformer(6, 4, heads=2, groups=3, rng=0)
    extra = {**st, "blocks.0.attn1.norm.weight": np.ones(6), "blocks.0.attn1.norm.bias": np.zeros(6)}
    with pytest.raises(ValueError, match=r"\['attn1.norm.bias', 'attn1.norm.weight'\] would add a group norm"):
        ar.spatial_transformer_forward(x, rng.standard_normal((2, 3, 4)), extra, heads=2, groups=3)
    with pytest.raises(TypeError, match=r"q\.weight has dtype float32 but the input has dtype float64"):
        ar.self_attention_forward(x, {**params, "q.weight": params["q.weight"].astype(np.float32)}, heads=2, groups=3)

    cparams = ar.init_cross_attention(6, 4, heads=2, groups=3, rng=0)
    with pytest.raises(
        ValueError, match=r"k.weight of shape \(4, 6\) expects 4 input channels; the context width is 7"
    ):
        ar.cross_attention_forward(x, rng.standard_normal((2, 3, 7)), cparams, heads=2, groups=3)
    with pytest.raises(
        ValueError,
        match=r"context must be \(B, M, D\) = \(2, M, D\) for x of shape \(2, 3, 5, 6\), got shape \(3, 4\); "
        r"for one \(M, D\) sequence pass context\[None\]",
    ):
        ar.cross_attention_forward(x, rng.standard_normal((3, 4)), cparams, heads=2, groups=3)
    with pytest.raises(ValueError, match=r"context must be \(B, M, D\) = \(2, M, D\) .*got shape \(1, 3, 4\)$"):
        ar.cross_attention_forward(x, rng.standard_normal((1, 3, 4)), cparams, heads=2, groups=3)
    with pytest.raises(ValueError, match=r"context_mask of shape \(2, 5\) should be one of \[\(3,\), \(2, 3\)\]"):
        ar.cross_attention_forward(
            x, rng.standard_normal((2, 3, 4)), cparams, heads=2, groups=3, context_mask=np.ones((2, 5), bool)
        )
    with pytest.raises(TypeError, match="context_mask must be a boolean array"):
        ar.cross_attention_forward(
            x, rng.standard_normal((2, 3, 4)), cparams, heads=2, groups=3, context_mask=np.ones((2, 3))
        )
    with pytest.raises(ValueError, match=r"the residual needs out\.weight to return 6 channels, it returns 5"):
        ar.self_attention_forward(
            x,
            {**params, "out.weight": params["out.weight"][:, :5], "out.bias": params["out.bias"][:5]},
            heads=2,
            groups=3,
        )

    sparams = ar.init_spatial_transformer(6, 4, heads=2, groups=3, rng=0)
    with pytest.raises(
        ValueError, match=r"blocks.0 attn2: k.weight of shape \(4, 6\) expects 4 input channels; the context width is 5"
    ):
        ar.spatial_transformer_forward(x, rng.standard_normal((2, 3, 5)), sparams, heads=2, groups=3)
    with pytest.raises(ValueError, match="6 attention channels are not divisible into 4 heads"):
        ar.spatial_transformer_forward(x, rng.standard_normal((2, 3, 4)), sparams, heads=4, groups=3)
    with pytest.raises(ValueError, match="6 channels are not divisible into 4 groups"):
        ar.spatial_transformer_forward(x, rng.standard_normal((2, 3, 4)), sparams, heads=2, groups=4)
    with pytest.raises(ValueError, match=r"blocks must be numbered 0, 1, …; found \[1\]"):
        ar.spatial_transformer_forward(
            x,
            rng.standard_normal((2, 3, 4)),
            {k.replace("blocks.0", "blocks.1"): v for k, v in sparams.items()},
            heads=2,
            groups=3,
        )


def test_every_block_backward_names_the_backward_that_matches_a_foreign_cache(rng):
    """A cache from another forward is a TypeError naming its own backward (it was an AttributeError deep inside)."""
    x, context = rng.standard_normal((1, 2, 2, 4)), rng.standard_normal((1, 3, 3))
    sparams = ar.init_spatial_transformer(4, 3, heads=2, groups=2, rng=0)
    _, st_cache = ar.spatial_transformer_forward(x, context, sparams, heads=2, groups=2)
    y_layer, layer_cache = ar.attention_layer_forward(x.reshape(1, 4, 4), ar.init_attention_layer(4, rng=0), heads=1)
    _, attn_cache = ar.attention_forward(*(rng.standard_normal((1, 4, 2)),) * 3)
    _, linear_cache = ar.ops.linear_forward(x, np.ones((4, 4)))
    cases = [
        (ar.self_attention_backward, x, st_cache, "spatial_transformer_backward"),
        (ar.cross_attention_backward, x, layer_cache, "attention_layer_backward"),
        (ar.attention_layer_backward, y_layer, st_cache.blocks[0], "transformer_block_backward"),
        (ar.attention_layer_backward, y_layer, attn_cache, "attention_backward"),
        (ar.spatial_transformer_backward, x, linear_cache, "linear_backward"),
        (ar.transformer_block_backward, y_layer, layer_cache, "attention_layer_backward"),
        (ar.blocks.geglu_ff_backward, y_layer, st_cache.blocks[0].attn2, "attention_layer_backward"),
    ]
    for backward, dy, cache, right in cases:
        with pytest.raises(
            TypeError,
            match=rf"{backward.__name__} needs the \w+ its forward returned, got a \w+; it belongs to {right}$",
        ):
            backward(dy, cache)
    with pytest.raises(TypeError, match=r"got a dict$"):
        ar.self_attention_backward(x, {"x": x})


def _layer_and_map_block(rng):
    """``(y, cache)`` of the attention layer on (2, 6, 8) tokens, and of self-attention on those tokens as a 2×3 map."""
    h = rng.standard_normal((2, 6, 8))
    layer = ar.attention_layer_forward(h, ar.init_attention_layer(8, rng=0), heads=2)
    params = ar.init_self_attention(8, heads=2, groups=4, rng=0)
    block = ar.self_attention_forward(h.reshape(2, 2, 3, 8), params, heads=2, groups=4)
    return {"layer": layer, "block": block}


@pytest.mark.parametrize(
    ("backward", "own_backward", "own", "cache_class"),
    [
        (ar.attention_layer_backward, ar.attention_layer_backward, "layer", "AttentionLayerCache"),
        (ar.cross_attention_backward, ar.self_attention_backward, "block", "AttentionBlockCache"),
    ],
    ids=["layer", "map block"],
)
def test_a_backward_refuses_another_cache_and_a_dy_of_another_shape_or_dtype(
    backward, own_backward, own, cache_class, rng
):
    """A self-attention cache given to another backward names self_attention_backward; dy is checked as an input."""
    outputs = _layer_and_map_block(rng)
    y, cache = outputs[own]
    with pytest.raises(
        TypeError,
        match=rf"^{backward.__name__} needs the {cache_class} its forward returned, got a AttentionBlockCache; "
        r"it belongs to self_attention_backward$",
    ):
        backward(y, outputs["block"][1])
    cut, shape = re.escape(str((*y.shape[:-1], 4))), re.escape(str(y.shape))
    with pytest.raises(ValueError, match=rf"dy of shape {cut} does not match the output shape {shape}"):
        own_backward(y[..., :4], cache)
    with pytest.raises(TypeError, match="dy has dtype float32, but the forward ran in float64"):
        own_backward(y.astype(np.float32), cache)
