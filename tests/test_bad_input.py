"""Bad input to the ops, attention and the blocks: a clear error naming the argument, or the right answer."""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys
import warnings

import numpy as np
import pytest
from bad_input_table import SPECS, base_case, call, each, run_case

import attention_ref as ar
from attention_ref._checks import broadcast_shape

HAS_TORCH = importlib.util.find_spec("torch") is not None
BACKWARD_SPECS = [s for s in SPECS if s.backward is not None]


# ---------------------------------------------------------------- backward: dout checked as the forwards check x


def test_an_integer_dout_in_softmax_backward_is_refused_not_turned_into_integer_zeros():
    _, cache = ar.softmax_forward(np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    with pytest.raises(TypeError, match=r"softmax: dout has dtype int64, but the forward ran in float64: cast dout"):
        ar.softmax_backward(np.array([[1, 2, 3], [4, 5, 6]]), cache)
    dout = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    p = cache.weights
    dx = ar.softmax_backward(dout, cache)["x"]
    np.testing.assert_allclose(dx, p * (dout - np.sum(p * dout, axis=-1, keepdims=True)), rtol=1e-14)
    assert dx.dtype == np.float64 and np.all(dx != 0)


@pytest.mark.parametrize("spec", BACKWARD_SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", ["int64", "bool", "float32", "complex128"])
def test_every_backward_refuses_a_dout_of_another_dtype(spec, dtype):
    out, cache = call(base_case(spec))
    dout = each(lambda o: np.ones(np.shape(o), dtype=dtype), out)  # one dout per output (joint attention: two)
    with pytest.raises(TypeError, match=rf"(dout|dy|dh_out) has dtype {dtype}, but the forward ran in float64"):
        spec.backward(dout, cache)


@pytest.mark.parametrize("spec", BACKWARD_SPECS, ids=lambda s: s.name)
def test_every_backward_names_a_missing_dout_or_a_wrong_cache(spec):
    out, cache = call(base_case(spec))
    # no dout at all; for a forward of two outputs, a list where the first output's gradient belongs
    missing = each(lambda o: o.tolist(), out) if isinstance(out, tuple) else None
    with pytest.raises(TypeError, match=r"(dout|dy|dh_out) must be an array"):
        spec.backward(missing, cache)
    with pytest.raises(TypeError, match=r"_backward needs the .*(Cache|cache)"):
        spec.backward(each(np.asarray, out), None)


def _public_backwards():
    """Every public ``*_backward`` of the package and its subpackages, with the cache class it annotates."""
    found = {}
    for module in (ar, ar.ops, ar.attention, ar.blocks):
        for name in module.__all__:
            fn = getattr(module, name)
            if name.endswith("_backward") and callable(fn):
                annotation = fn.__annotations__["cache"]  # a string: the modules use postponed annotations
                found[name] = getattr(sys.modules[fn.__module__], annotation)
    return found


def test_every_cache_class_names_the_backwards_that_take_it():
    """A wrong cache is named from the cache's own class (its backward_names), not by reading the package from below."""
    backwards = _public_backwards()
    assert {"rms_norm_backward", "rope_backward", "patchify_backward", "joint_attention_backward"} <= set(backwards)
    for name, cache_class in backwards.items():
        names = inspect.getattr_static(cache_class, "backward_names")
        if isinstance(names, property):  # one class, two forwards: the instance knows (test_blocks checks both)
            continue
        assert name in names, (name, cache_class.__name__, names)
        assert all(n in backwards for n in names), names
    _, heads_cache = ar.ops.split_heads_forward(np.ones((2, 4)), 2)
    with pytest.raises(TypeError, match=r"a HeadsCache; it belongs to merge_heads_backward or split_heads_backward$"):
        ar.softmax_backward(np.ones((2, 4)), heads_cache)


# ---------------------------------------------------------------- float16 attention


def _large_half() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = np.full((1, 3, 4), 300, dtype=np.float16)  # q·k = 360,000 > 65,504
    v = np.random.default_rng(0).standard_normal((1, 3, 4)).astype(np.float16)
    return q, q.copy(), v


@pytest.mark.parametrize("fast", [True, False])
def test_float16_attention_with_logits_beyond_65504_is_finite_and_agrees_with_the_tiled_path(fast, monkeypatch):
    monkeypatch.setattr(ar.attention.exact, "FAST", fast)
    q, k, v = _large_half()
    out, cache = ar.attention_forward(q, k, v)
    tiled, tiled_cache = ar.chunked_attention_forward(q, k, v)
    # every logit is equal: the weights are uniform and each output row is the mean of v
    assert out.dtype == np.float16 and np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, tiled)
    np.testing.assert_allclose(out[0], np.broadcast_to(v[0].astype(np.float64).mean(axis=0), (3, 4)), atol=2e-3)
    dout = np.ones_like(out)
    grads, tiled_grads = ar.attention_backward(dout, cache), ar.chunked_attention_backward(dout, tiled_cache)
    for name in ("q", "k", "v"):
        assert grads[name].dtype == np.float16 and np.all(np.isfinite(grads[name])), name
        np.testing.assert_allclose(grads[name], tiled_grads[name], atol=0.05 * 300)


def test_float16_window_neighborhood_and_linear_attention_do_not_overflow_either():
    q = np.full((1, 4, 4, 4), 300, dtype=np.float16)
    v = np.random.default_rng(0).standard_normal((1, 4, 4, 2)).astype(np.float16)
    tokens, values = q.reshape(1, 16, 4), v.reshape(1, 16, 2)
    at = ar.attention
    for forward, backward in (
        (lambda: at.window_attention_forward(q, q, v, window=2), at.window_attention_backward),
        (lambda: at.neighborhood_attention_forward(q, q, v, kernel=3), at.neighborhood_attention_backward),
        (lambda: at.linear_attention_forward(tokens, tokens, values), at.linear_attention_backward),
        (lambda: at.linear_attention_forward(tokens, tokens, values, kind="efficient"), at.linear_attention_backward),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no overflow on the way
            out, cache = forward()
            grads = backward(np.ones_like(out), cache)
        assert out.dtype == np.float16 and np.all(np.isfinite(out))
        assert all(g.dtype == np.float16 and np.all(np.isfinite(g)) for g in grads.values())


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_float16_attention_equals_torchs_cpu_attention():
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(1)
    q, k = ((rng.standard_normal((2, 5, 4)) * 300).astype(np.float16) for _ in range(2))
    v = rng.standard_normal((2, 5, 3)).astype(np.float16)
    want = F.scaled_dot_product_attention(*(torch.tensor(a) for a in (q, k, v))).numpy()
    np.testing.assert_array_equal(ar.attention_forward(q, k, v)[0], want)


# ---------------------------------------------------------------- block parameters


def _self_attention(**options):
    x = np.random.default_rng(0).standard_normal((1, 2, 2, 8))
    params = ar.init_self_attention(8, heads=2, groups=4, rng=0)
    return ar.self_attention_forward(x, params, **{"heads": 2, "groups": 4, **options})


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"eps": -1.0}, ValueError, r"self-attention: eps must be at least 0.0, got -1.0"),
        ({"eps": math.nan}, ValueError, r"self-attention: eps must be finite, got nan"),
        ({"rescale": 0}, ValueError, r"self-attention: rescale must not be 0"),
        ({"rescale": math.inf}, ValueError, r"self-attention: rescale must be finite"),
        ({"heads": 2.0}, TypeError, r"self-attention: heads must be an int, got float 2.0"),
        ({"heads": True}, TypeError, r"self-attention: heads must be an int, got bool True"),
        ({"groups": 4.0}, TypeError, r"self-attention: groups must be an int, got float 4.0"),
        ({"scale": True}, TypeError, r"scale must be a real number, got bool"),
    ],
)
def test_block_options_are_checked_and_named(options, error, message):
    with pytest.raises(error, match=message):
        _self_attention(**options)


@pytest.mark.parametrize("params", [None, [], {"q.weight": None}], ids=["None", "list", "None entry"])
def test_params_that_are_not_a_mapping_of_arrays_are_named(params):
    x = np.ones((1, 2, 2, 8))
    with pytest.raises(TypeError, match=r"self-attention: params"):
        ar.self_attention_forward(x, params, heads=2, groups=4)
    with pytest.raises(TypeError, match=r"spatial transformer: params"):
        ar.spatial_transformer_forward(x, np.ones((1, 3, 6)), params, heads=2, groups=4)
    with pytest.raises(TypeError, match=r"transformer block: params"):
        ar.transformer_block_forward(np.ones((1, 4, 8)), np.ones((1, 3, 6)), params, heads=2)
    with pytest.raises(TypeError, match=r"feed-forward: params"):
        ar.blocks.geglu_ff_forward(np.ones((1, 4, 8)), params)


@pytest.mark.parametrize("name", ["heads", "groups", "head_dim", "depth", "ff_mult"])
def test_init_sizes_are_ints(name):
    with pytest.raises(TypeError, match=rf"init_spatial_transformer: {name} must be an int, got float 2.0"):
        ar.init_spatial_transformer(8, 6, **{"heads": 2, "groups": 4, name: 2.0})


def test_the_ops_check_their_options():
    x = np.ones((2, 3, 4))
    with pytest.raises(ValueError, match=r"layer norm: eps must be at least 0.0, got -1.0"):
        ar.ops.layer_norm_forward(x, eps=-1.0)
    with pytest.raises(TypeError, match=r"group norm: groups must be an int, got float 2.0"):
        ar.ops.group_norm_forward(x, groups=2.0)
    with pytest.raises(TypeError, match=r"split_heads: heads must be an int, got bool True"):
        ar.split_heads(x, True)
    with pytest.raises(ValueError, match=r"timestep embedding: max_period must be finite, got nan"):
        ar.ops.timestep_embedding_forward(np.ones(3), 8, max_period=math.nan)
    with pytest.raises(TypeError, match=r"conv2d: padding must be an int, a pair of ints or 'same', got float"):
        ar.ops.conv2d_forward(np.ones((1, 4, 4, 2)), np.ones((3, 3, 2, 2)), padding=1.0)
    with pytest.raises(TypeError, match=r"group norm: the inputs must share one dtype, got x float64, weight float32"):
        ar.ops.group_norm_forward(x, np.ones(4, np.float32), groups=2)


# ---------------------------------------------------------------- infinite maps


def test_an_infinite_pixel_is_refused_as_an_infinite_query_is():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 2, 8))
    x[0, 1, 0, 3] = np.inf
    context = rng.standard_normal((1, 3, 6))
    params = ar.init_self_attention(8, heads=2, groups=4, rng=0)
    message = r"self-attention: x has an infinite entry; it must be finite \(NaN is allowed"
    with pytest.raises(ValueError, match=message):
        ar.self_attention_forward(x, params, heads=2, groups=4)
    cross = ar.init_cross_attention(8, 6, heads=2, groups=4, rng=0)
    with pytest.raises(ValueError, match=r"cross-attention: x has an infinite entry"):
        ar.cross_attention_forward(x, context, cross, heads=2, groups=4)
    with pytest.raises(ValueError, match=r"cross-attention: context has an infinite entry"):
        ar.cross_attention_forward(np.zeros_like(x), np.full((1, 3, 6), -np.inf), cross, heads=2, groups=4)
    spatial = ar.init_spatial_transformer(8, 6, heads=2, groups=4, rng=0)
    with pytest.raises(ValueError, match=r"spatial transformer: x has an infinite entry"):
        ar.spatial_transformer_forward(x, context, spatial, heads=2, groups=4)
    with pytest.raises(ValueError, match=r"attention layer: h has an infinite entry"):
        ar.attention_layer_forward(x.reshape(1, 4, 8), ar.init_attention_layer(8, heads=2, rng=0), heads=2)
    # NaN still propagates, as in q, k and v
    x[0, 1, 0, 3] = np.nan
    y, _ = ar.self_attention_forward(x, params, heads=2, groups=4)
    assert np.isnan(y).any()


# ---------------------------------------------------------------- axes and broadcasting


@pytest.mark.parametrize("function", [ar.softmax_forward, ar.ops.logsumexp], ids=["softmax", "logsumexp"])
@pytest.mark.parametrize(
    ("x", "axis", "error", "message"),
    [
        (np.ones((2, 3)), 2, ValueError, r"axis 2 is out of range for x of shape \(2, 3\) \(2 dimensions\)"),
        (np.ones((2, 3)), -3, ValueError, r"axis -3 is out of range"),
        (np.array(1.0), -1, ValueError, r"axis -1 is out of range for x of shape \(\) \(0 dimensions\)"),
        (np.ones((2, 3)), None, TypeError, r"axis must be an int \(one axis\), got NoneType"),
        (np.ones((2, 3)), 1.0, TypeError, r"axis must be an int \(one axis\), got float"),
        (np.ones((2, 3)), (0, 1), TypeError, r"axis must be an int \(one axis\), got tuple"),
        (np.ones((2, 3)), True, TypeError, r"axis must be an int \(one axis\), got bool"),
    ],
)
def test_a_bad_axis_is_named(function, x, axis, error, message):
    with pytest.raises(error, match=message):
        function(x, axis=axis)


def test_a_numpy_integer_is_an_axis():
    x = np.random.default_rng(0).standard_normal((2, 3))
    np.testing.assert_array_equal(ar.softmax_forward(x, axis=np.int64(0))[0], ar.softmax_forward(x, axis=0)[0])


def test_a_size_one_axis_broadcasts_to_an_empty_one_as_in_numpy():
    assert broadcast_shape((1, 4), (0, 4)) == (0, 4) == np.broadcast_shapes((1, 4), (0, 4))
    assert broadcast_shape((0,), (1,)) == (0,)
    with pytest.raises(ValueError, match=r"cannot be broadcast"):
        broadcast_shape((2, 4), (0, 4))
    rng = np.random.default_rng(0)
    q, k, v = np.zeros((0, 4)), rng.standard_normal((4, 4)), rng.standard_normal((4, 3))
    bias, mask = rng.standard_normal((1, 4)), np.ones((1, 4), bool)
    for forward, backward in (
        (ar.attention_forward, ar.attention_backward),
        (ar.chunked_attention_forward, ar.chunked_attention_backward),
    ):
        out, cache = forward(q, k, v, bias=bias, mask=mask)
        assert out.shape == (0, 3)
        grads = backward(np.zeros((0, 3)), cache)
        np.testing.assert_array_equal(grads["bias"], np.zeros((1, 4)))
        assert grads["q"].shape == (0, 4) and not grads["k"].any() and not grads["v"].any()
    p, _ = ar.softmax_forward(np.zeros((0, 4)), mask=np.ones((1, 4), bool))
    assert p.shape == (0, 4)


# ---------------------------------------------------------------- the whole table


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_each_functions_valid_call_is_correct(spec):
    """The table's valid calls are right (so that its bad ones test what they claim)."""
    assert run_case(base_case(spec)).kind == "correct"


# ---------------------------------------------------------------- the diffusion transformers' RoPE tables


def _flux_ids() -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.meshgrid(np.arange(2), np.arange(3), indexing="ij")
    return np.zeros((2, 3)), np.stack([np.zeros(6), rows.ravel(), cols.ravel()], axis=-1)


@pytest.mark.parametrize(
    ("axes", "error", "message"),
    [
        (None, TypeError, r"flux_rope_tables: axes_dims_rope must be a sequence of ints"),
        (8, TypeError, r"flux_rope_tables: axes_dims_rope must be a sequence of ints .*got 8"),
        ((2.0, 2, 4), TypeError, r"flux_rope_tables: axes_dims_rope\[0\] must be an int, got float 2.0"),
        ((2, -2, 4), ValueError, r"flux_rope_tables: axes_dims_rope\[1\] must be at least 1, got -2"),
        ((2, 2, 3), ValueError, r"flux_rope_tables: axes_dims_rope\[2\] = 3 is odd"),
        ((2, 4), ValueError, r"flux_rope_tables: axes_dims_rope \(2, 4\) has 2 axes but the ids have 3 columns"),
    ],
)
def test_flux_rope_tables_name_bad_axes_dims_rope(axes, error, message):
    with pytest.raises(error, match=message):
        ar.interop.flux_rope_tables(*_flux_ids(), axes)


def test_flux_rope_tables_take_arrays_of_integer_or_real_ids():
    txt, img = _flux_ids()
    want = ar.interop.flux_rope_tables(txt, img, (2, 2, 4))
    for dtype in (np.int64, np.float32):
        got = ar.interop.flux_rope_tables(txt.astype(dtype), img.astype(dtype), (2, 2, 4))
        np.testing.assert_array_equal(got[0], want[0])
    with pytest.raises(TypeError, match=r"flux_rope_tables: img_ids must be a NumPy array or a torch tensor, got list"):
        ar.interop.flux_rope_tables(txt, img.tolist(), (2, 2, 4))
    with pytest.raises(TypeError, match=r"flux_rope_tables: txt_ids must hold integer or real position ids, got bool"):
        ar.interop.flux_rope_tables(txt > 0, img, (2, 2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not NumPy's ComplexWarning from the cast: our error
        with pytest.raises(TypeError, match=r"img_ids must hold integer or real position ids, got complex128"):
            ar.interop.flux_rope_tables(txt, img.astype(complex), (2, 2, 4))
