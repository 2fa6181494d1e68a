"""RMS norm: finite differences, torch autograd (torch.nn.RMSNorm and diffusers' RMSNorm), the axis it
normalises, float16, backends, and the inputs it refuses."""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import pytest
from conftest import HAS_TORCH, np_

from attention_ref.gradcheck import check_backward, rel_error
from attention_ref.ops import layer_norm_forward, rms_norm_backward, rms_norm_forward

FD_TOL = 1e-7
HAS_DIFFUSERS = HAS_TORCH and importlib.util.find_spec("diffusers") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="torch and diffusers are not installed")


def reference(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    """The formula, written out once more in NumPy."""
    y = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4, 6)], ids=["row", "matrix", "(B, heads, N, d)"])
def test_rms_norm_backward_matches_finite_differences(rng, affine, shape):
    inputs = {"x": rng.standard_normal(shape) * 1.5 + 0.3}
    if affine:
        inputs["weight"] = rng.standard_normal(shape[-1])
    errs = check_backward(functools.partial(rms_norm_forward, eps=1e-3), rms_norm_backward, inputs)
    assert set(errs) == set(inputs)
    assert max(errs.values()) < FD_TOL, errs


def test_rms_norm_normalises_the_last_axis_only(be, rng):
    x = rng.standard_normal((3, 4, 8)) * np.array([1.0, 10.0, 0.1, 3.0])[:, None]  # rows of very different sizes
    y = np_(rms_norm_forward(be(x), eps=0.0)[0])
    # every row of the last axis has root-mean-square 1; a reduction over another axis would not give this
    np.testing.assert_allclose(np.sqrt(np.mean(y**2, axis=-1)), 1.0, rtol=1e-14)
    # and only rescales: y is x times one positive number per row
    ratio = y / x
    np.testing.assert_allclose(ratio, ratio[..., :1] * np.ones(8), rtol=1e-13)
    assert np.all(ratio > 0)


def test_rms_norm_equals_the_formula_on_every_backend(be, rng):
    x, w = rng.standard_normal((2, 3, 5, 8)), rng.standard_normal(8)
    y, cache = rms_norm_forward(be(x), be(w), eps=1e-6)
    assert be.is_native(y)
    np.testing.assert_allclose(np_(y), reference(x, w, 1e-6), rtol=1e-13, atol=1e-15)
    dy = rng.standard_normal(x.shape)
    grads = rms_norm_backward(be(dy), cache)
    assert set(grads) == {"x", "weight"} and all(be.is_native(g) for g in grads.values())
    numpy_grads = rms_norm_backward(dy, rms_norm_forward(x, w, eps=1e-6)[1])
    for name in grads:
        np.testing.assert_allclose(np_(grads[name]), numpy_grads[name], rtol=1e-13, atol=1e-15)


def test_rms_norm_is_layer_norm_of_a_centred_row(rng):
    """On a row of mean 0 RMS norm and layer norm (without a shift) are the same map."""
    x = rng.standard_normal((4, 9))
    x = x - x.mean(axis=-1, keepdims=True)
    w = rng.standard_normal(9)
    np.testing.assert_allclose(
        rms_norm_forward(x, w, eps=1e-5)[0], layer_norm_forward(x, w, None, eps=1e-5)[0], rtol=1e-13
    )


def test_rms_norm_float16_is_computed_in_float32(rng):
    x = (rng.standard_normal((4, 16)) * 300).astype(np.float16)  # squares overflow float16 (max 65504)
    w = rng.standard_normal(16).astype(np.float16)
    y, cache = rms_norm_forward(x, w)
    assert y.dtype == np.float16 and np.all(np.isfinite(y))
    want = reference(x.astype(np.float32), w.astype(np.float32), 1e-6).astype(np.float16)
    np.testing.assert_array_equal(y, want)
    grads = rms_norm_backward(np.ones_like(x), cache)
    assert grads["x"].dtype == np.float16 and grads["weight"].dtype == np.float16
    assert np.all(np.isfinite(grads["x"]))


@needs_torch
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_equals_torch_rms_norm_with_autograd(rng, affine):
    import torch

    x, w, dy = rng.standard_normal((2, 3, 5, 16)), rng.standard_normal(16), rng.standard_normal((2, 3, 5, 16))
    norm = torch.nn.RMSNorm(16, eps=1e-6, elementwise_affine=affine).double()
    if affine:
        norm.weight.data = torch.from_numpy(w.copy())
    x_t = torch.tensor(x, requires_grad=True)
    y_t = norm(x_t)
    y_t.backward(torch.from_numpy(dy))
    y, cache = rms_norm_forward(x, w if affine else None, eps=1e-6)
    grads = rms_norm_backward(dy, cache)
    assert rel_error(y, y_t.detach().numpy()) < 1e-14
    assert rel_error(grads["x"], x_t.grad.numpy()) < 1e-14
    if affine:
        assert rel_error(grads["weight"], norm.weight.grad.numpy()) < 1e-14


@needs_diffusers
def test_diffusers_rms_norm_rounds_its_statistic_to_float32_even_in_float64(rng):
    """What the module docstring says of diffusers' RMSNorm (SD3's q/k norm): the same map, but its mean
    square is computed in float32, so in float64 it agrees with the reference only to float32's precision."""
    import torch
    from diffusers.models.normalization import RMSNorm

    x, w = rng.standard_normal((64, 16)), rng.standard_normal(16)
    norm = RMSNorm(16, eps=1e-6).double()
    norm.weight.data = torch.from_numpy(w.copy())
    theirs = norm(torch.from_numpy(x)).detach().numpy()
    err = rel_error(rms_norm_forward(x, w, eps=1e-6)[0], theirs)
    assert 1e-12 < err < 1e-6, err


def test_rms_norm_refuses_bad_input(rng):
    x = rng.standard_normal((3, 4))
    with pytest.raises(ValueError, match=r"weight of shape \(5,\)"):
        rms_norm_forward(x, rng.standard_normal(5))
    with pytest.raises(TypeError, match="share one dtype"):
        rms_norm_forward(x, rng.standard_normal(4).astype(np.float32))
    with pytest.raises(TypeError, match="floating"):
        rms_norm_forward(np.arange(4))
    with pytest.raises(ValueError, match="C ≥ 1"):
        rms_norm_forward(np.zeros((3, 0)))
    with pytest.raises(ValueError, match="eps"):
        rms_norm_forward(x, eps=-1.0)
    with pytest.raises(TypeError, match="eps"):
        rms_norm_forward(x, eps="1e-6")
    _, cache = rms_norm_forward(x)
    with pytest.raises(ValueError, match=r"dout of shape \(3, 1\)"):
        rms_norm_backward(np.ones((3, 1)), cache)
    with pytest.raises(TypeError, match=r"float32.*float64"):
        rms_norm_backward(np.ones((3, 4), dtype=np.float32), cache)
    with pytest.raises(TypeError, match="RMSNormCache"):
        rms_norm_backward(np.ones((3, 4)), layer_norm_forward(x)[1])


@pytest.mark.parametrize(
    ("eps", "error", "message"),
    [
        (-1.0, ValueError, r"rms norm: eps must be at least 0.0, got -1.0"),
        (float("nan"), ValueError, r"rms norm: eps must be finite, got nan"),
        (float("inf"), ValueError, r"rms norm: eps must be finite, got inf"),
        (True, TypeError, r"rms norm: eps must be a real number, got bool True"),
        (None, TypeError, r"rms norm: eps must be a real number, got NoneType None"),
    ],
)
def test_rms_norm_checks_eps_as_the_other_norms_do(rng, eps, error, message):
    with pytest.raises(error, match=message):
        rms_norm_forward(rng.standard_normal((3, 4)), eps=eps)
    # any real scalar is an eps, with the result of the same Python float
    x = rng.standard_normal((3, 4))
    np.testing.assert_array_equal(rms_norm_forward(x, eps=np.float32(0.5))[0], rms_norm_forward(x, eps=0.5)[0])


def test_rms_norm_names_an_argument_that_is_not_an_array(rng):
    with pytest.raises(TypeError, match=r"^x must be an array \(NumPy, CuPy, torch or array_api_strict\), got None"):
        rms_norm_forward(None)
    with pytest.raises(TypeError, match=r"^weight must be an array .*got list"):
        rms_norm_forward(rng.standard_normal((3, 4)), [1.0] * 4)
    _, cache = rms_norm_forward(rng.standard_normal((3, 4)))
    with pytest.raises(TypeError, match=r"rms_norm_backward: dout must be an array .*got list"):
        rms_norm_backward([[1.0] * 4] * 3, cache)


def test_rms_norm_backward_given_another_cache_says_whose_it_is(rng):
    _, cache = layer_norm_forward(rng.standard_normal((3, 4)))
    with pytest.raises(
        TypeError, match=r"rms_norm_backward needs the RMSNormCache its forward returned, got a LayerNormCache; "
        r"it belongs to layer_norm_backward"
    ):
        rms_norm_backward(np.ones((3, 4)), cache)
