"""The U-Net's residual block (attention_ref.blocks.res_block): gradients, diffusers' ResnetBlock2D, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from block_helpers import OTHER_BACKENDS, jitter
from conftest import HAS_TORCH

from attention_ref.backend import to_numpy
from attention_ref.blocks import init_res_block, res_block_backward, res_block_forward
from attention_ref.gradcheck import check_backward, rel_error


def _inputs(rng, c_in=4, c_out=6, time_dim=5):
    x = rng.standard_normal((2, 3, 4, c_in))
    temb = rng.standard_normal((2, time_dim))
    params = jitter(init_res_block(c_in, c_out, time_dim, rng=0), rng)  # conv2 starts at 0: randomised
    return x, temb, params


def _forward(x, temb, **params):
    return res_block_forward(x, temb, params, groups=2)


@pytest.mark.parametrize(("c_in", "c_out"), [(4, 6), (4, 4)], ids=["skip conv", "identity skip"])
def test_every_gradient_matches_finite_differences(c_in, c_out, rng):
    x, temb, params = _inputs(rng, c_in, c_out)
    errors = check_backward(_forward, res_block_backward, {"x": x, "temb": temb, **params})
    assert ("skip.weight" in errors) == (c_in != c_out)
    assert max(errors.values()) < 1e-6, errors


def test_a_fresh_block_is_its_skip(rng):
    x, temb, _ = _inputs(rng, 4, 4)
    y, _ = res_block_forward(x, temb, init_res_block(4, 4, 5, rng=0), groups=2)
    np.testing.assert_array_equal(y, x)  # conv2 starts at zero: the residual branch adds nothing


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_forward_and_backward_equal_diffusers_resnet_block_2d(rng):
    import torch
    from diffusers.models.resnet import ResnetBlock2D

    x, temb, params = _inputs(rng)
    block = ResnetBlock2D(in_channels=4, out_channels=6, temb_channels=5, groups=2, eps=1e-6).double()
    with torch.no_grad():
        for ours, theirs in (("norm1", block.norm1), ("norm2", block.norm2)):
            theirs.weight.copy_(torch.tensor(params[f"{ours}.weight"]))
            theirs.bias.copy_(torch.tensor(params[f"{ours}.bias"]))
        for ours, theirs in (("conv1", block.conv1), ("conv2", block.conv2), ("skip", block.conv_shortcut)):
            weight = params[f"{ours}.weight"]  # (kh, kw, C_in, C_out), or (C_in, C_out) for the 1×1 skip
            weight = weight.transpose(3, 2, 0, 1) if weight.ndim == 4 else weight.T[:, :, None, None]
            theirs.weight.copy_(torch.tensor(weight))
            theirs.bias.copy_(torch.tensor(params[f"{ours}.bias"]))
        block.time_emb_proj.weight.copy_(torch.tensor(params["time.weight"].T))
        block.time_emb_proj.bias.copy_(torch.tensor(params["time.bias"]))
    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    tt = torch.tensor(temb, requires_grad=True)
    want = block(tx, tt)
    y, cache = res_block_forward(x, temb, params, groups=2)
    assert rel_error(y, want.detach().numpy().transpose(0, 2, 3, 1)) < 1e-12
    dy = rng.standard_normal(y.shape)
    want.backward(torch.tensor(dy.transpose(0, 3, 1, 2)))
    grads = res_block_backward(dy, cache)
    assert rel_error(grads["x"], tx.grad.numpy().transpose(0, 2, 3, 1)) < 1e-12
    assert rel_error(grads["temb"], tt.grad.numpy()) < 1e-12
    assert rel_error(grads["time.weight"], block.time_emb_proj.weight.grad.numpy().T) < 1e-12
    assert rel_error(grads["conv1.weight"], block.conv1.weight.grad.numpy().transpose(2, 3, 1, 0)) < 1e-12


@pytest.mark.parametrize("be", OTHER_BACKENDS, indirect=True)
def test_runs_on_every_backend_and_equals_numpy(be, rng):
    x, temb, params = _inputs(rng)
    y, cache = res_block_forward(x, temb, params, groups=2)
    dy = rng.standard_normal(y.shape)
    want = res_block_backward(dy, cache)
    y_be, cache_be = res_block_forward(be(x), be(temb), {k: be(v) for k, v in params.items()}, groups=2)
    np.testing.assert_allclose(to_numpy(y_be), y, rtol=1e-12, atol=1e-12)
    got = res_block_backward(be(dy), cache_be)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(to_numpy(got[name]), want[name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_bad_input_is_named(rng):
    x, temb, params = _inputs(rng)
    with pytest.raises(ValueError, match=r"res block: temb must be \(B, D_t\) = \(2, D_t\) for x of shape"):
        res_block_forward(x, temb[:1], params, groups=2)
    with pytest.raises(ValueError, match=r"res block: x must be a channels-last map \(B, H, W, C\), got shape"):
        res_block_forward(x[0], temb, params, groups=2)
    with pytest.raises(ValueError, match=r"res block: norm1.weight of shape \(4,\) does not fit x's 5 channels"):
        res_block_forward(np.ones((2, 3, 4, 5)), temb, params, groups=2)
    with pytest.raises(ValueError, match=r"conv2.weight returns 6 channels but x has 4: without skip.weight"):
        res_block_forward(x, temb, {k: v for k, v in params.items() if not k.startswith("skip.")}, groups=2)
    with pytest.raises(TypeError, match=r"res block: the inputs must share one dtype, got x float64, temb float32"):
        res_block_forward(x, temb.astype(np.float32), params, groups=2)
    with pytest.raises(ValueError, match=r"res block: 4 channels are not divisible into 3 groups"):
        res_block_forward(x, temb, params, groups=3)
    with pytest.raises(ValueError, match=r"res block: x has an infinite entry"):
        res_block_forward(np.where(x > 1, np.inf, x), temb, params, groups=2)
    y, cache = res_block_forward(x, temb, params, groups=2)
    with pytest.raises(TypeError, match=r"res_block_backward needs the ResBlockCache its forward returned"):
        res_block_backward(y, None)
    with pytest.raises(ValueError, match=r"dy of shape \(2, 3, 4, 5\) does not match the output shape \(2, 3, 4, 6\)"):
        res_block_backward(y[..., :5], cache)
