"""The backend module, the gradient checker and the demo command."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import HAS_TORCH

from attention_ref import backend
from attention_ref.gradcheck import numerical_gradient


def test_available_backends_lists_numpy_first():
    names = backend.available_backends()
    assert names[0] == "numpy"
    assert "array_api_strict" in names
    assert ("torch" in names) == HAS_TORCH


def test_to_numpy_from_every_backend(be):
    a = np.arange(6.0).reshape(2, 3)
    x = be(a)
    out = backend.to_numpy(x)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, a)
    assert backend.namespace_name(backend.namespace(x)) == be.name
    y = backend.from_numpy(a * 2, like=x)
    assert be.is_native(y)


def test_namespace_rejects_mixed_libraries_and_non_arrays():
    import array_api_strict as xs

    with pytest.raises(TypeError, match="different libraries"):
        backend.namespace(np.zeros(2), xs.asarray([1.0]))
    with pytest.raises(TypeError, match="expected an array"):
        backend.namespace([1.0, 2.0])


def test_numerical_gradient_of_a_known_function():
    x = np.array([0.3, -1.2, 2.0])
    dout = np.array([1.0, 2.0, -1.0])
    g = numerical_gradient(lambda t: np.sin(t), x, dout)
    np.testing.assert_allclose(g, np.cos(x) * dout, rtol=1e-8)
    with pytest.raises(TypeError, match="float64"):
        numerical_gradient(np.sin, x.astype(np.float32), dout)


def test_demo_runs_and_its_gradient_check_agrees():
    result = subprocess.run([sys.executable, "-m", "attention_ref", "demo"], capture_output=True, text=True, check=True)
    assert "P = softmax" in result.stdout
    assert "(1, 2, 16, 16)" in result.stdout
    line = next(s for s in result.stdout.splitlines() if s.startswith("Gradient check"))
    err = float(line.split("=")[1].split()[0])
    assert err < 1e-7


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_a_thread_count_that_is_not_a_positive_integer_names_the_variable(value, monkeypatch):
    monkeypatch.setenv("ATTENTION_REF_NUM_THREADS", value)
    with pytest.raises(ValueError, match=f"ATTENTION_REF_NUM_THREADS must be a positive integer .*got '{value}'"):
        backend.thread_count()


def test_the_thread_count_comes_from_the_variable_or_the_cpus(monkeypatch):
    monkeypatch.setenv("ATTENTION_REF_NUM_THREADS", " 3 ")
    assert backend.thread_count() == 3
    monkeypatch.setenv("ATTENTION_REF_NUM_THREADS", "")
    assert backend.thread_count() >= 1
    monkeypatch.delenv("ATTENTION_REF_NUM_THREADS")
    assert backend.thread_count() >= 1


def test_a_channels_first_map_gets_a_hint_that_maps_are_channels_last():
    import attention_ref as ar

    params = ar.init_self_attention(8, heads=2, groups=4, rng=0)
    x = np.zeros((1, 8, 4, 4))  # (B, C, H, W), PyTorch's layout
    with pytest.raises(ValueError, match=r"expects 8 input channels but the input has 4; maps are \(B, H, W, C\)"):
        ar.self_attention_forward(x, params, heads=2, groups=4)
    with pytest.raises(ValueError, match=r"x.transpose\(0, 2, 3, 1\)"):
        ar.self_attention_forward(np.zeros((1, 8, 5, 6)), params, heads=2, groups=4)
    # a map whose channels are simply wrong gets no hint about the layout
    with pytest.raises(ValueError, match=r"the input has 6$"):
        ar.self_attention_forward(np.zeros((1, 5, 4, 6)), params, heads=2, groups=3)
