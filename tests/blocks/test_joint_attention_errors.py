"""Joint attention (SD3, SD3.5, Flux): the inputs it refuses, each named in the error."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from dit_helpers import two_streams

from attention_ref.blocks import init_joint_attention, joint_attention_backward, joint_attention_forward
from attention_ref.ops import rope_angles


def test_joint_attention_refuses_bad_input(rng):
    x, context, params = two_streams(rng)
    run = functools.partial(joint_attention_forward, heads=2, qk_norm="rms_norm")
    with pytest.raises(ValueError, match="order must be one of"):
        run(x, context, params, order="image_last")
    with pytest.raises(ValueError, match="qk_norm must be one of"):
        joint_attention_forward(x, context, params, heads=2, qk_norm="l2")
    with pytest.raises(ValueError, match="qk_norm is None"):
        joint_attention_forward(x, context, params, heads=2)
    with pytest.raises(ValueError, match="belong to a text stream, but context is None"):
        run(x, None, params)
    with pytest.raises(ValueError, match=r"missing \['add_q.weight'\]"):
        run(x, context, {k: v for k, v in params.items() if k != "add_q.weight"})
    with pytest.raises(ValueError, match=r"add_q.weight of shape \(4, 8\) should be \(in, inner\) = \(5, 8\)"):
        run(x, rng.standard_normal((2, 3, 5)), params)
    with pytest.raises(ValueError, match="not divisible into 3 heads"):
        joint_attention_forward(x, context, params, heads=3, qk_norm="rms_norm")
    with pytest.raises(TypeError, match="context has dtype"):
        run(x, context.astype(np.float32), params)
    with pytest.raises(
        ValueError,
        match=r"^joint attention: context must be \(B, M, D\) = \(2, M, D\) text tokens for x of shape \(2, 5, 6\), "
        r"got shape \(1, 3, 4\)$",
    ):
        run(x, context[:1], params)
    cos, sin = rope_angles(np.arange(8), (4,))
    with pytest.raises(ValueError, match=r"should be \(L, head_dim\) = \(8, 4\).*5 tokens of x \+ 3 of context"):
        run(x, context, params, rope=(cos[:7], sin[:7]))
    with pytest.raises(TypeError, match="rope must be a"):
        run(x, context, params, rope=cos)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 1, 8, 5\) does not broadcast"):
        run(x, context, params, mask=np.ones((2, 1, 8, 5), dtype=bool))
    (y, y_context), cache = run(x, context, params)
    with pytest.raises(
        ValueError, match=r"dy_context of shape \(2, 3, 4\) does not match the output shape \(2, 3, 6\)"
    ):
        joint_attention_backward((np.ones(y.shape), np.ones((2, 3, 4))), cache)
    with pytest.raises(TypeError, match="dy has dtype float32"):
        joint_attention_backward((np.ones(y.shape, dtype=np.float32), None), cache)
    with pytest.raises(TypeError, match=r"\(dy, dy_context\)"):
        joint_attention_backward(np.ones(y.shape), cache)
    with pytest.raises(TypeError, match="JointAttentionCache"):
        joint_attention_backward((np.ones(y.shape), None), cache.attention)


@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        (None, TypeError, r"joint attention: params must be a mapping of names to arrays, got NoneType"),
        ([], TypeError, r"joint attention: params must be a mapping of names to arrays, got list"),
        ({"q.weight": None}, TypeError, r"joint attention: params\['q.weight'\] must be an array"),
    ],
)
def test_params_that_are_not_a_mapping_of_arrays_are_named(rng, params, error, message):
    x, context, _ = two_streams(rng)
    with pytest.raises(error, match=message):
        joint_attention_forward(x, context, params, heads=2)


def test_an_infinite_parameter_is_refused_as_in_every_block(rng):
    x, context, params = two_streams(rng)
    params["add_k.bias"][1] = np.inf
    with pytest.raises(ValueError, match=r"joint attention: params\['add_k.bias'\] has an infinite entry"):
        joint_attention_forward(x, context, params, heads=2, qk_norm="rms_norm")


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"heads": 2.0}, TypeError, r"joint attention: heads must be an int, got float 2.0"),
        ({"heads": True}, TypeError, r"joint attention: heads must be an int, got bool True"),
        ({"heads": 0}, ValueError, r"joint attention: heads must be at least 1, got 0"),
        ({"eps": -1.0}, ValueError, r"joint attention: eps must be at least 0.0, got -1.0"),
        ({"eps": float("nan")}, ValueError, r"joint attention: eps must be finite, got nan"),
        ({"eps": float("inf")}, ValueError, r"joint attention: eps must be finite, got inf"),
        ({"eps": "1e-6"}, TypeError, r"joint attention: eps must be a real number, got str"),
        ({"eps": True}, TypeError, r"joint attention: eps must be a real number, got bool True"),
        ({"order": None}, ValueError, r"order must be one of \('image_first', 'text_first'\), got None"),
    ],
)
def test_options_are_checked_and_named(rng, options, error, message):
    x, context, params = two_streams(rng)
    with pytest.raises(error, match=message):
        joint_attention_forward(x, context, params, **{"heads": 2, "qk_norm": "rms_norm", **options})


def test_eps_is_checked_without_a_qk_norm_too(rng):
    x, context, params = two_streams(rng, qk_norm=None)
    with pytest.raises(ValueError, match=r"joint attention: eps must be finite, got inf"):
        joint_attention_forward(x, context, params, heads=2, eps=float("inf"))
    # a NumPy integer is a number of heads, a NumPy float an eps: the same result as Python's
    want, _ = joint_attention_forward(x, context, params, heads=2, eps=1e-6)
    got, _ = joint_attention_forward(x, context, params, heads=np.int64(2), eps=np.float32(1e-6))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_infinite_token_is_refused_as_in_every_block(rng):
    x, context, params = two_streams(rng)
    x[1, 2, 0] = np.inf
    with pytest.raises(ValueError, match=r"joint attention: x has an infinite entry; it must be finite \(NaN is"):
        joint_attention_forward(x, context, params, heads=2, qk_norm="rms_norm")
    x[1, 2, 0] = 0.0
    context[0, 0, 3] = -np.inf
    with pytest.raises(ValueError, match=r"joint attention: context has an infinite entry"):
        joint_attention_forward(x, context, params, heads=2, qk_norm="rms_norm")
    with pytest.raises(ValueError, match=r"joint attention: x has an infinite entry"):
        joint_attention_forward(np.full((2, 5, 6), np.inf), None, init_joint_attention(6, heads=2, rng=0), heads=2)
    # NaN propagates, as in q, k and v
    context[0, 0, 3] = np.nan
    (y, y_context), _ = joint_attention_forward(x, context, params, heads=2, qk_norm="rms_norm")
    assert np.isnan(y[0]).all() and np.isfinite(y[1]).all() and np.isnan(y_context[0]).all()


def test_rope_tables_are_checked_and_named(rng):
    x, context, params = two_streams(rng)
    run = functools.partial(joint_attention_forward, heads=2, qk_norm="rms_norm", order="text_first")
    cos, sin = rope_angles(np.arange(8), (4,))
    with pytest.raises(TypeError, match=r"joint attention: rope's cos must be an array .*got NoneType"):
        run(x, context, params, rope=(None, sin))
    with pytest.raises(TypeError, match=r"rope's sin must have a real floating dtype .*got int64"):
        run(x, context, params, rope=(cos, sin.astype(np.int64)))
    bad = cos.copy()
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match=r"joint attention: rope's cos has an infinite entry"):
        run(x, context, params, rope=(bad, sin))
    with pytest.raises(ValueError, match=r"joint attention: rope_dtype must be one of .*got 'bfloat16'"):
        run(x, context, params, rope=(cos, sin), rope_dtype="bfloat16")
    # per-sample tables (B, L, d) with B = heads would broadcast as per-head ones: refused, as a 3-D mask is
    with pytest.raises(ValueError, match=r"rope's cos of shape \(2, 8, 4\) should be .*per-sample \(B, L, head_dim\) "
                       r"tables being cos\[:, None\]"):
        run(x, context, params, rope=(np.stack([cos, cos]), np.stack([sin, sin])))
    (y, _), _ = run(x, context, params, rope=(np.stack([cos, cos])[:, None], np.stack([sin, sin])[:, None]))
    np.testing.assert_allclose(y, run(x, context, params, rope=(cos, sin))[0][0], rtol=1e-14, atol=1e-15)
    # tables from axes_dims that do not sum to head_dim = 4 do not fit
    cos6, sin6 = rope_angles(np.zeros((8, 2)), (4, 2))
    with pytest.raises(ValueError, match=r"rope's cos of shape \(8, 6\) should be \(L, head_dim\) = \(8, 4\)"):
        run(x, context, params, rope=(cos6, sin6))


def test_a_mask_that_broadcasting_would_misread_is_refused(rng):
    # B = heads = 2: a per-sample (B, L, L) mask broadcasts to (B, heads, L, L) as a per-head one
    x, context, params = two_streams(rng)
    run = functools.partial(joint_attention_forward, x, context, params, heads=2, qk_norm="rms_norm")
    per_sample = rng.random((2, 8, 8)) < 0.6
    per_sample[..., 0] = True
    with pytest.raises(ValueError, match=r"mask of shape \(2, 8, 8\) must be \(L, L\) or \(B or 1, heads or 1, L, L\)"
                       r" = \(2, 2, 8, 8\) in the joined order .*a per-sample \(B, L, L\) mask is mask\[:, None\]"):
        run(mask=per_sample)
    with pytest.raises(ValueError, match=r"mask of shape \(8,\) must be \(L, L\) or"):
        run(mask=per_sample[0, 0])
    # what the message suggests is the per-sample mask: each sample as if run alone
    (y, y_context), _ = run(mask=per_sample[:, None])
    for b in range(2):
        (y_b, y_context_b), _ = joint_attention_forward(
            x[b : b + 1], context[b : b + 1], params, heads=2, qk_norm="rms_norm", mask=per_sample[b]
        )
        np.testing.assert_allclose(y[b : b + 1], y_b, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(y_context[b : b + 1], y_context_b, rtol=1e-13, atol=1e-14)


def test_the_arrays_are_named_when_they_do_not_fit(rng):
    x, context, params = two_streams(rng)
    run = functools.partial(joint_attention_forward, heads=2, qk_norm="rms_norm")
    with pytest.raises(TypeError, match=r"^joint attention: x must be an array .*got NoneType"):
        run(None, context, params)
    with pytest.raises(TypeError, match=r"^context must be an array .*got list"):
        run(x, context.tolist(), params)
    with pytest.raises(ValueError, match=r"q.weight of shape \(6, 8\) should be \(in, inner\) = \(7, 8\) for x "
                       r"\(the image tokens\) of width 7"):
        run(rng.standard_normal((2, 5, 7)), context, params)
    with pytest.raises(ValueError, match=r"mask of shape \(8, 8\) does not broadcast to \(B, heads, L, L\) = "
                       r"\(2, 2, 9, 9\): L = N \+ M for x of shape \(2, 6, 6\) and context of shape \(2, 3, 4\)"):
        run(rng.standard_normal((2, 6, 6)), context, params, mask=np.ones((8, 8), bool))
    single = init_joint_attention(6, heads=2, rng=0)
    with pytest.raises(TypeError, match=r"joint attention: q.weight has dtype float64 but x has dtype float32"):
        joint_attention_forward(x.astype(np.float32), None, single, heads=2)
    (y, y_context), cache = run(x, context, params)
    with pytest.raises(TypeError, match=r"joint_attention_backward: dy must be an array .*got list"):
        joint_attention_backward((y.tolist(), None), cache)
    with pytest.raises(TypeError, match=r"joint_attention_backward: dy_context has dtype int64, but the forward ran"):
        joint_attention_backward((None, np.ones(y_context.shape, dtype=np.int64)), cache)


@pytest.mark.parametrize(
    ("size", "value", "error", "message"),
    [
        ("dim", 2.0, TypeError, r"init_joint_attention: dim must be an int, got float 2.0"),
        ("dim", 0, ValueError, r"init_joint_attention: dim must be at least 1, got 0"),
        ("context_dim", -1, ValueError, r"init_joint_attention: context_dim must be at least 1, got -1"),
        ("heads", True, TypeError, r"init_joint_attention: heads must be an int, got bool True"),
        ("head_dim", 0, ValueError, r"init_joint_attention: head_dim must be at least 1, got 0"),
        ("out_dim", 0, ValueError, r"init_joint_attention: out_dim must be at least 1, got 0"),
        ("context_out_dim", 0, ValueError, r"init_joint_attention: context_out_dim must be at least 1, got 0"),
        ("context_out_dim", 3.0, TypeError, r"init_joint_attention: context_out_dim must be an int, got float"),
    ],
)
def test_init_sizes_are_positive_ints(size, value, error, message):
    with pytest.raises(error, match=message):
        init_joint_attention(**{"dim": 8, "context_dim": 6, "heads": 2, size: value})
    # out_dim=0 used to give out_dim = dim without a word; a given width is the width
    params = init_joint_attention(8, 6, heads=2, out_dim=3, context_out_dim=5, rng=0)
    assert params["out.weight"].shape == (8, 3) and params["add_out.weight"].shape == (8, 5)
