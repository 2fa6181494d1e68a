"""The 2-D convolution op: a loop reference, finite differences, torch, backends, bad input."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from conftest import HAS_TORCH, np_

from attention_ref.gradcheck import check_backward, rel_error
from attention_ref.ops import conv2d_backward, conv2d_forward

FD_TOL = 1e-7


def loop_conv2d(x, w, b, ph, pw):
    """The defining sum, written as loops over output positions and kernel taps."""
    B, H, W, _ = x.shape
    kh, kw, _, c_out = w.shape
    xp_ = np.zeros((B, H + 2 * ph, W + 2 * pw, x.shape[-1]))
    xp_[:, ph : ph + H, pw : pw + W] = x
    Ho, Wo = H + 2 * ph - kh + 1, W + 2 * pw - kw + 1
    y = np.zeros((B, Ho, Wo, c_out))
    for i in range(Ho):
        for j in range(Wo):
            for a in range(kh):
                for c in range(kw):
                    y[:, i, j] += xp_[:, i + a, j + c] @ w[a, c]
    return y + (0 if b is None else b)


CASES = [
    # H, W, kh, kw, padding, the padding expected (ph, pw)
    pytest.param(5, 6, 3, 3, "same", (1, 1), id="3x3 same"),
    pytest.param(5, 4, 3, 3, 0, (0, 0), id="3x3 valid"),
    pytest.param(4, 5, 3, 3, 2, (2, 2), id="3x3 padding 2"),
    pytest.param(6, 5, 3, 2, (1, 0), (1, 0), id="3x2 padding (1, 0)"),
    pytest.param(3, 4, 1, 1, 0, (0, 0), id="1x1"),
    pytest.param(7, 5, 5, 3, "same", (2, 1), id="5x3 same"),
]


@pytest.mark.parametrize(("H", "W", "kh", "kw", "padding", "pads"), CASES)
def test_conv2d_forward_matches_the_loop_definition(be, rng, H, W, kh, kw, padding, pads):
    x = rng.standard_normal((2, H, W, 3))
    w = rng.standard_normal((kh, kw, 3, 4))
    b = rng.standard_normal(4)
    y, cache = conv2d_forward(be(x), be(w), be(b), padding=padding)
    assert be.is_native(y)
    assert cache.padding == pads
    np.testing.assert_allclose(np_(y), loop_conv2d(x, w, b, *pads), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("H", "W", "kh", "kw", "padding", "pads"), CASES)
def test_conv2d_backward_matches_finite_differences(rng, H, W, kh, kw, padding, pads):
    inputs = {
        "x": rng.standard_normal((2, H, W, 2)),
        "weight": rng.standard_normal((kh, kw, 2, 3)),
        "bias": rng.standard_normal(3),
    }
    errs = check_backward(functools.partial(conv2d_forward, padding=padding), conv2d_backward, inputs)
    assert max(errs.values()) < FD_TOL, errs


def test_conv2d_without_bias_returns_no_bias_gradient(be, rng):
    x, w = rng.standard_normal((1, 4, 4, 2)), rng.standard_normal((3, 3, 2, 2))
    y, cache = conv2d_forward(be(x), be(w), padding=1)
    grads = conv2d_backward(be(np.ones((1, 4, 4, 2))), cache)
    assert set(grads) == {"x", "weight"}
    assert all(be.is_native(g) for g in grads.values())
    errs = check_backward(functools.partial(conv2d_forward, padding=1), conv2d_backward, {"x": x, "weight": w})
    assert max(errs.values()) < FD_TOL


def test_conv2d_backward_on_every_backend_equals_numpy(be, rng):
    x, w, b = rng.standard_normal((2, 5, 4, 3)), rng.standard_normal((3, 3, 3, 2)), rng.standard_normal(2)
    dy = rng.standard_normal((2, 5, 4, 2))
    want = conv2d_backward(dy, conv2d_forward(x, w, b, padding="same")[1])
    got = conv2d_backward(be(dy), conv2d_forward(be(x), be(w), be(b), padding="same")[1])
    for name in ("x", "weight", "bias"):
        assert be.is_native(got[name])
        assert rel_error(got[name], want[name]) < 1e-13


def test_a_delta_kernel_is_the_identity_and_a_shifted_delta_shifts(rng):
    x = rng.standard_normal((1, 4, 5, 2))
    w = np.zeros((3, 3, 2, 2))
    w[1, 1] = np.eye(2)
    np.testing.assert_array_equal(conv2d_forward(x, w, padding=1)[0], x)
    w = np.zeros((3, 3, 2, 2))
    w[1, 2] = np.eye(2)  # tap (a, c) = (1, 2) reads x[i, j + 1]
    y = conv2d_forward(x, w, padding=1)[0]
    np.testing.assert_array_equal(y[:, :, :-1], x[:, :, 1:])
    np.testing.assert_array_equal(y[:, :, -1], 0.0)


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_conv2d_forward_and_backward_match_torch_autograd(rng):
    import torch

    x, w, b = rng.standard_normal((2, 6, 5, 3)), rng.standard_normal((3, 3, 3, 4)), rng.standard_normal(4)
    dy = rng.standard_normal((2, 6, 5, 4))
    y, cache = conv2d_forward(x, w, b, padding=1)
    grads = conv2d_backward(dy, cache)
    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)  # NCHW
    tw = torch.tensor(w.transpose(3, 2, 0, 1), requires_grad=True)  # OIHW
    tb = torch.tensor(b, requires_grad=True)
    ty = torch.nn.functional.conv2d(tx, tw, tb, padding=1)
    ty.backward(torch.tensor(dy.transpose(0, 3, 1, 2)))
    assert rel_error(y, ty.detach().numpy().transpose(0, 2, 3, 1)) < 1e-13
    assert rel_error(grads["x"], tx.grad.numpy().transpose(0, 2, 3, 1)) < 1e-13
    assert rel_error(grads["weight"], tw.grad.numpy().transpose(2, 3, 1, 0)) < 1e-13
    assert rel_error(grads["bias"], tb.grad.numpy()) < 1e-13


def test_conv2d_bad_input_names_the_shapes():
    x = np.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match=r"\(1, 4, 4, 3\).*\(3, 3, 2, 5\)"):
        conv2d_forward(x, np.zeros((3, 3, 2, 5)))
    with pytest.raises(ValueError, match="bias of shape"):
        conv2d_forward(x, np.zeros((3, 3, 3, 5)), np.zeros(4))
    with pytest.raises(ValueError, match="odd kernel"):
        conv2d_forward(x, np.zeros((2, 2, 3, 5)), padding="same")
    with pytest.raises(ValueError, match="between 0 and kernel"):
        conv2d_forward(x, np.zeros((3, 3, 3, 5)), padding=3)
    with pytest.raises(ValueError, match="does not fit"):
        conv2d_forward(np.zeros((1, 2, 2, 3)), np.zeros((3, 3, 3, 1)))
    with pytest.raises(TypeError, match="floating"):
        conv2d_forward(np.zeros((1, 4, 4, 3), dtype=np.int64), np.zeros((3, 3, 3, 1)))
    y, cache = conv2d_forward(x, np.zeros((3, 3, 3, 5)), padding=1)
    with pytest.raises(ValueError, match="dout of shape"):
        conv2d_backward(np.zeros((1, 4, 4, 4)), cache)
