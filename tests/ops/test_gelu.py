"""erf/erfc in Array API calls, exact GELU and GEGLU: accuracy, finite differences, torch, backends."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import HAS_TORCH, np_

from attention_ref.gradcheck import check_backward, rel_error
from attention_ref.ops import erf, erfc, geglu_backward, geglu_forward, gelu_backward, gelu_forward

GRID = np.concatenate(
    [np.linspace(-6.0, 6.0, 4801), np.linspace(-27.0, 27.0, 541), [0.0, -0.0, 2.5, np.nextafter(2.5, 0)]]
)


def test_erf_matches_math_erf_to_1e_15_relative():
    ours = erf(GRID)
    ref = np.array([math.erf(v) for v in GRID])
    nonzero = ref != 0
    assert np.all(ours[~nonzero] == 0)
    assert np.max(np.abs(ours - ref)[nonzero] / np.abs(ref[nonzero])) < 2e-15


def test_erfc_matches_math_erfc():
    ours = erfc(GRID)
    ref = np.array([math.erfc(v) for v in GRID])
    # everywhere: to 1e-15 absolute (erfc is in [0, 2])
    assert np.max(np.abs(ours - ref)) < 2e-15
    # in the right tail, by the continued fraction: to ~1e-15 relative, down to 1e-300
    tail = (GRID >= 2.5) & (ref > 1e-300)
    assert np.max(np.abs(ours - ref)[tail] / ref[tail]) < 3e-15
    # below the switch erfc = 1 − erf loses relative accuracy where erfc is small: documented ≤ 2e-12
    positive = ref > 1e-300
    assert np.max(np.abs(ours - ref)[positive] / ref[positive]) < 3e-12


def test_erf_special_values():
    x = np.array([np.inf, -np.inf, np.nan, 0.0, 40.0, -40.0])
    np.testing.assert_array_equal(erf(x), [1.0, -1.0, np.nan, 0.0, 1.0, -1.0])
    np.testing.assert_array_equal(erfc(x), [0.0, 2.0, np.nan, 1.0, 0.0, 2.0])
    assert erf(np.float32(0.5) * np.ones(3, dtype=np.float32)).dtype == np.float32
    with pytest.raises(TypeError, match="real floating"):
        erf(np.arange(3))


def test_gelu_is_x_times_normal_cdf():
    x = np.linspace(-10, 10, 2001)
    ref = np.array([v * 0.5 * math.erfc(-v / math.sqrt(2)) for v in x])
    out, _ = gelu_forward(x)
    assert rel_error(out, ref) < 2e-16 * 10


def test_gelu_and_geglu_match_finite_differences(rng):
    x = 3 * rng.standard_normal((3, 5))
    assert check_backward(gelu_forward, gelu_backward, {"x": x})["x"] < 1e-8
    assert check_backward(geglu_forward, geglu_backward, {"x": 3 * rng.standard_normal((2, 3, 8))})["x"] < 1e-8


def test_geglu_value_first_gate_second(rng):
    x = rng.standard_normal((4, 6))
    out, _ = geglu_forward(x)
    np.testing.assert_allclose(out, x[:, :3] * gelu_forward(x[:, 3:])[0], rtol=1e-15)
    with pytest.raises(ValueError, match=r"even number of channels.*\(4, 5\)"):
        geglu_forward(x[:, :5])


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_gelu_and_geglu_match_torch(rng):
    import torch
    import torch.nn.functional as F

    x = 4 * rng.standard_normal((5, 8))
    t = torch.tensor(x, requires_grad=True)
    a, gate = t.chunk(2, dim=-1)
    y = a * F.gelu(gate)  # diffusers' GEGLU: exact (erf) gelu of the second half
    dy = rng.standard_normal(y.shape)
    y.backward(torch.tensor(dy))
    out, cache = geglu_forward(x)
    assert rel_error(out, y.detach().numpy()) < 1e-14
    assert rel_error(geglu_backward(dy, cache)["x"], t.grad.numpy()) < 1e-14
    z = torch.tensor(x, requires_grad=True)
    F.gelu(z).backward(torch.tensor(np.ones_like(x)))
    g, gcache = gelu_forward(x)
    assert rel_error(g, F.gelu(torch.tensor(x)).numpy()) < 1e-14
    assert rel_error(gelu_backward(np.ones_like(x), gcache)["x"], z.grad.numpy()) < 1e-14


def test_erf_and_geglu_agree_across_backends(be, rng):
    x = 4 * rng.standard_normal((3, 8))
    for fn in (erf, erfc):
        out = fn(be(x))
        assert be.is_native(out)
        assert rel_error(out, fn(x)) < 1e-15
    out, cache = geglu_forward(be(x))
    dx = geglu_backward(be(np.ones((3, 4))), cache)["x"]
    assert be.is_native(out) and be.is_native(dx)
    out_np, cache_np = geglu_forward(x)
    assert rel_error(out, out_np) < 1e-15
    assert rel_error(np_(dx), geglu_backward(np.ones((3, 4)), cache_np)["x"]) < 1e-15
