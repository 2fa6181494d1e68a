"""The ops the diffusion U-Net adds: SiLU, nearest up-sampling, average pooling, the timestep embedding.

Each: the formula, finite differences, PyTorch autograd (skipped without torch), every backend, bad input.
"""

from __future__ import annotations

import importlib.util
import math
import warnings

import numpy as np
import pytest
from conftest import HAS_TORCH, np_

from attention_ref.gradcheck import check_backward, rel_error
from attention_ref.ops.resample import (
    avg_pool_backward,
    avg_pool_forward,
    upsample_nearest_backward,
    upsample_nearest_forward,
)
from attention_ref.ops.silu import silu_backward, silu_forward
from attention_ref.ops.timestep_embedding import timestep_embedding_backward, timestep_embedding_forward

HAS_DIFFUSERS = HAS_TORCH and importlib.util.find_spec("diffusers") is not None

# ---------------------------------------------------------------- SiLU


def test_silu_is_x_times_sigmoid_without_overflow():
    x = np.concatenate([np.linspace(-30, 30, 601), [-1000.0, 1000.0, -745.0, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow in exp for |x| = 1000
        y, _ = silu_forward(x)
    ref = np.array([v / (1.0 + math.exp(-v)) if v > -700 else 0.0 for v in x])
    assert rel_error(y, ref) < 1e-15
    assert y[-4] == 0.0 and y[-3] == 1000.0
    assert silu_forward(np.ones(3, dtype=np.float32))[0].dtype == np.float32


def test_silu_backward_matches_finite_differences_and_the_closed_form(rng):
    x = 4 * rng.standard_normal((3, 4, 5))
    assert check_backward(silu_forward, silu_backward, {"x": x})["x"] < 1e-8
    s = 1.0 / (1.0 + np.exp(-x))
    dx = silu_backward(np.ones_like(x), silu_forward(x)[1])["x"]
    # silu' = σ + x σ (1 − σ)
    assert rel_error(dx, s + x * s * (1 - s)) < 1e-14


def test_silu_runs_on_every_backend(be, rng):
    x = rng.standard_normal((2, 3, 3, 4))
    y, cache = silu_forward(be(x))
    dx = silu_backward(be(np.ones_like(x)), cache)["x"]
    assert be.is_native(y) and be.is_native(dx)
    np.testing.assert_allclose(np_(y), silu_forward(x)[0], rtol=1e-14)
    with pytest.raises(TypeError, match="real floating"):
        silu_forward(np.arange(4))
    with pytest.raises(ValueError, match=r"dout of shape \(3,\)"):
        silu_backward(np.ones(3), silu_forward(np.ones(4))[1])


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_silu_matches_torch(rng):
    import torch

    x = 5 * rng.standard_normal((4, 6))
    t = torch.tensor(x, requires_grad=True)
    y = torch.nn.functional.silu(t)
    dy = rng.standard_normal(x.shape)
    y.backward(torch.tensor(dy))
    ours, cache = silu_forward(x)
    assert rel_error(ours, y.detach().numpy()) < 1e-15
    assert rel_error(silu_backward(dy, cache)["x"], t.grad.numpy()) < 1e-15


# ---------------------------------------------------------------- resampling


def test_upsample_repeats_each_pixel_and_avg_pool_averages_each_block(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    up, _ = upsample_nearest_forward(x, 2)
    assert up.shape == (2, 6, 8, 5)
    for i in range(6):
        for j in range(8):
            np.testing.assert_array_equal(up[:, i, j], x[:, i // 2, j // 2])
    z = rng.standard_normal((2, 6, 9, 3))
    pooled, _ = avg_pool_forward(z, 3)
    assert pooled.shape == (2, 2, 3, 3)
    np.testing.assert_allclose(pooled[1, 1, 2], z[1, 3:6, 6:9].mean(axis=(0, 1)), rtol=1e-14)
    # pooling what was up-sampled gives it back
    np.testing.assert_allclose(avg_pool_forward(up, 2)[0], x, rtol=1e-14)


def test_resampling_backward_matches_finite_differences_and_the_adjoint(rng):
    x = rng.standard_normal((2, 2, 3, 2))
    assert check_backward(lambda x: upsample_nearest_forward(x, 2), upsample_nearest_backward, {"x": x})["x"] < 1e-8
    z = rng.standard_normal((2, 4, 6, 2))
    assert check_backward(lambda x: avg_pool_forward(x, 2), avg_pool_backward, {"x": z})["x"] < 1e-8
    # ⟨up(x), y⟩ = ⟨x, upᵀ y⟩: the backward is the adjoint, exactly a sum over each block
    y = rng.standard_normal((2, 4, 6, 2))
    up, cache = upsample_nearest_forward(x, 2)
    assert abs(np.sum(up * y) - np.sum(x * upsample_nearest_backward(y, cache)["x"])) < 1e-12
    # avg-pool's backward is a quarter of up-sampling's forward
    _, pcache = avg_pool_forward(z, 2)
    np.testing.assert_allclose(avg_pool_backward(x, pcache)["x"], upsample_nearest_forward(x, 2)[0] / 4, rtol=1e-15)


#: (resampling, the map's shape, factor, the error, its message)
RESAMPLING_REFUSALS = [
    (avg_pool_forward, (1, 5, 6, 2), 2, ValueError, r"5×6 map does not split into 2×2"),
    (upsample_nearest_forward, (4, 4, 2), 2, ValueError, r"\(B, H, W, C\)"),
    (upsample_nearest_forward, (1, 4, 4, 2), 0, ValueError, "factor must be at least 1, got 0"),
    (avg_pool_forward, (1, 4, 4, 2), 2.0, TypeError, "factor must be an int, got float"),
]


def test_resampling_rejects_bad_input():
    for resample, shape, factor, error, message in RESAMPLING_REFUSALS:
        with pytest.raises(error, match=message):
            resample(np.zeros(shape), factor)
    # a NumPy integer is an integer
    np.testing.assert_array_equal(avg_pool_forward(np.ones((1, 4, 4, 2)), np.int64(2))[0], np.ones((1, 2, 2, 2)))
    with pytest.raises(ValueError, match=r"does not match the output shape \(1, 8, 8, 2\)"):
        upsample_nearest_backward(np.zeros((1, 4, 4, 2)), upsample_nearest_forward(np.zeros((1, 4, 4, 2)))[1])


def test_resampling_runs_on_every_backend(be, rng):
    x = rng.standard_normal((2, 4, 4, 3))
    up, ucache = upsample_nearest_forward(be(x), 2)
    down, dcache = avg_pool_forward(be(x), 2)
    assert be.is_native(up) and be.is_native(down)
    np.testing.assert_array_equal(np_(up), upsample_nearest_forward(x, 2)[0])
    np.testing.assert_allclose(np_(down), avg_pool_forward(x, 2)[0], rtol=1e-14)
    assert be.is_native(upsample_nearest_backward(up, ucache)["x"])
    assert be.is_native(avg_pool_backward(down, dcache)["x"])


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_resampling_matches_torch(rng):
    import torch
    import torch.nn.functional as F

    x = rng.standard_normal((2, 4, 6, 3))
    dy_up = rng.standard_normal((2, 8, 12, 3))
    dy_down = rng.standard_normal((2, 2, 3, 3))
    t = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)  # NCHW
    up = F.interpolate(t, scale_factor=2, mode="nearest")
    down = F.avg_pool2d(t, 2)
    (up * torch.tensor(dy_up.transpose(0, 3, 1, 2))).sum().add(
        (down * torch.tensor(dy_down.transpose(0, 3, 1, 2))).sum()
    ).backward()
    ours_up, uc = upsample_nearest_forward(x, 2)
    ours_down, dc = avg_pool_forward(x, 2)
    assert rel_error(ours_up, up.detach().numpy().transpose(0, 2, 3, 1)) == 0.0
    assert rel_error(ours_down, down.detach().numpy().transpose(0, 2, 3, 1)) < 1e-15
    dx = upsample_nearest_backward(dy_up, uc)["x"] + avg_pool_backward(dy_down, dc)["x"]
    assert rel_error(dx, t.grad.numpy().transpose(0, 2, 3, 1)) < 1e-14


# ---------------------------------------------------------------- timestep embedding


def test_timestep_embedding_is_cosines_then_sines_at_geometric_frequencies():
    t = np.array([0.0, 1.0, 17.0, 999.0])
    emb, _ = timestep_embedding_forward(t, 8)
    assert emb.shape == (4, 8)
    for b, tb in enumerate(t):
        for k in range(4):
            w = 10000.0 ** (-k / 4)
            assert abs(emb[b, k] - math.cos(tb * w)) < 1e-12
            assert abs(emb[b, 4 + k] - math.sin(tb * w)) < 1e-12
    np.testing.assert_array_equal(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])  # t = 0


def test_timestep_embedding_backward_matches_finite_differences(rng):
    t = rng.uniform(0, 50, size=5)
    errs = check_backward(lambda t: timestep_embedding_forward(t, 12), timestep_embedding_backward, {"t": t})
    assert errs["t"] < 1e-8


def test_timestep_embedding_on_every_backend_and_bad_input(be):
    t = np.array([3.0, 250.0])
    emb, cache = timestep_embedding_forward(be(t), 6)
    assert be.is_native(emb) and be.is_native(timestep_embedding_backward(emb, cache)["t"])
    np.testing.assert_allclose(np_(emb), timestep_embedding_forward(t, 6)[0], rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="even int"):
        timestep_embedding_forward(t, 5)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        timestep_embedding_forward(t[:, None], 4)
    with pytest.raises(TypeError, match="real floating"):
        timestep_embedding_forward(np.array([1, 2]), 4)


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed")
def test_timestep_embedding_matches_diffusers_stable_diffusion_setting():
    import torch
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0.0, 5.0, 261.0, 999.0])
    theirs = get_timestep_embedding(torch.tensor(t), 32, flip_sin_to_cos=True, downscale_freq_shift=0)
    ours, _ = timestep_embedding_forward(t, 32)
    # diffusers builds the frequencies in float32: agreement to float32 rounding of t·ω
    assert np.max(np.abs(ours - theirs.numpy())) < 1e-4
