"""The in-place machinery behind the fast plain path: it must change nothing but the speed."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import np_

from attention_ref import (
    attention_backward,
    attention_forward,
    chunked_attention_backward,
    chunked_attention_forward,
    softmax_forward,
)
from attention_ref.backend import cpu_workers, exp_inplace, namespace, parallel_map
from attention_ref.gradcheck import rel_error
from attention_ref.ops.softmax import softmax_overwriting


def test_exp_inplace_overwrites_numpy_arrays(rng):
    x = rng.standard_normal((3, 4))
    want = np.exp(x)
    got = exp_inplace(namespace(x), x)
    assert got is x  # NumPy branch: written through out=
    np.testing.assert_array_equal(got, want)


def test_exp_inplace_falls_back_to_the_standard_call(be, rng):
    a = rng.standard_normal((3, 4))
    x = be(a.copy())
    got = exp_inplace(namespace(x), x)
    assert be.is_native(got)
    np.testing.assert_allclose(np_(got), np.exp(a), rtol=1e-15)
    if be.name in ("numpy", "cupy"):  # the out= branch: written over the input
        assert got is x
    else:  # the standard branch: a new array, the input untouched
        np.testing.assert_array_equal(np_(x), a)


@pytest.mark.parametrize("with_mask", [False, True])
def test_softmax_overwriting_equals_softmax_forward(be, rng, with_mask):
    a = rng.standard_normal((2, 5, 6)) * 4
    mask = None
    if with_mask:
        mask = rng.random((2, 1, 6)) > 0.4
        mask[0, 0, :] = False  # a fully masked row (broadcast over the 5 queries of batch 0)
    want, _ = softmax_forward(be(a), axis=-1, mask=be(mask))
    x = be(a.copy())
    got = softmax_overwriting(x, axis=-1, mask=be(mask))
    assert be.is_native(got)
    np.testing.assert_array_equal(np_(got), np_(want))


def test_softmax_forward_leaves_its_input_alone(be, rng):
    a = rng.standard_normal((3, 7))
    x = be(a.copy())
    softmax_forward(x, axis=0)
    softmax_forward(x, axis=-1, mask=be(rng.random((3, 7)) > 0.5))
    np.testing.assert_array_equal(np_(x), a)


def test_attention_leaves_its_inputs_alone(be, rng):
    arrays = {
        "q": rng.standard_normal((2, 4, 3)),
        "k": rng.standard_normal((2, 5, 3)),
        "v": rng.standard_normal((2, 5, 2)),
        "bias": rng.standard_normal((2, 4, 5)),
        "dout": rng.standard_normal((2, 4, 2)),
    }
    mask = rng.random((2, 4, 5)) > 0.3
    ins = {name: be(a.copy()) for name, a in arrays.items()}
    out, cache = attention_forward(ins["q"], ins["k"], ins["v"], bias=ins["bias"], mask=be(mask), scale=0.3)
    attention_backward(ins["dout"], cache)
    for name, a in arrays.items():
        np.testing.assert_array_equal(np_(ins[name]), a, err_msg=name)


def test_one_hot_rows_give_exactly_zero_dq(be, rng):
    """A query with a single allowed key has P_i one-hot, so dS_i = P_i (dP_i − Σ_k P_ik dP_ik) is exactly 0."""
    q, k, v = rng.standard_normal((6, 3)), rng.standard_normal((6, 3)), rng.standard_normal((6, 5))
    out, cache = attention_forward(be(q), be(k), be(v), mask=be(np.eye(6, dtype=bool)))
    grads = attention_backward(be(rng.standard_normal((6, 5))), cache)
    assert np.all(np_(grads["q"]) == 0) and np.all(np_(grads["k"]) == 0)


def test_plain_path_matches_the_textbook_formulas_at_a_larger_size(rng):
    """The in-place path against a direct NumPy transcription of the formulas, at N = 300."""
    q, k, v, dout = (rng.standard_normal((2, 300, 16)) for _ in range(4))
    scale = 0.3
    out, cache = attention_forward(q, k, v, scale=scale)
    grads = attention_backward(dout, cache)
    S = scale * q @ k.transpose(0, 2, 1)
    P = np.exp(S - S.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    dP = dout @ v.transpose(0, 2, 1)
    dS = P * (dP - (P * dP).sum(-1, keepdims=True))
    assert rel_error(cache.weights, P) <= 1e-13
    assert rel_error(out, P @ v) <= 1e-13
    assert rel_error(grads["v"], P.transpose(0, 2, 1) @ dout) <= 1e-13
    assert rel_error(grads["q"], scale * dS @ k) <= 1e-12
    assert rel_error(grads["k"], scale * dS.transpose(0, 2, 1) @ q) <= 1e-12


# ---------------------------------------------------------------- threads


def test_parallel_map_keeps_order_and_uses_threads_only_for_numpy(be, rng, monkeypatch):
    import threading

    monkeypatch.setenv("ATTENTION_REF_NUM_THREADS", "3")
    x = be(rng.standard_normal(4))
    seen = []

    def work(i):
        seen.append(threading.get_ident())
        return i * i

    assert parallel_map(work, list(range(20)), like=x) == [i * i for i in range(20)]
    if be.name == "numpy" and importlib.util.find_spec("threadpoolctl") is not None:
        assert cpu_workers(x) == 3
        assert threading.get_ident() not in seen  # ran in the pool's threads
    else:
        assert cpu_workers(x) == 1
        assert set(seen) == {threading.get_ident()}  # ran here, in order


def test_parallel_map_without_threadpoolctl_runs_in_this_thread(monkeypatch):
    import threading

    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "threadpoolctl" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert cpu_workers(np.zeros(2)) == 1
    assert parallel_map(lambda i: threading.get_ident(), [0, 1, 2], like=np.zeros(2)) == [threading.get_ident()] * 3


def test_parallel_map_passes_exceptions_on(monkeypatch):
    monkeypatch.setenv("ATTENTION_REF_NUM_THREADS", "2")

    def fail(i):
        raise ValueError(f"item {i}")

    with pytest.raises(ValueError, match="item"):
        parallel_map(fail, [0, 1], like=np.zeros(2))


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_tiled_path_gives_the_same_result_on_any_number_of_threads(rng, monkeypatch, threads):
    monkeypatch.setenv("ATTENTION_REF_NUM_THREADS", threads)
    q, k, v = rng.standard_normal((2, 3, 70, 8)), rng.standard_normal((2, 3, 90, 8)), rng.standard_normal((2, 3, 90, 5))
    mask = rng.random((2, 1, 70, 90)) > 0.2
    mask[..., 3, :] = False
    bias = rng.standard_normal((3, 1, 90))
    dout = rng.standard_normal((2, 3, 70, 5))
    out, cache = attention_forward(q, k, v, mask=mask, bias=bias)
    want = attention_backward(dout, cache)
    t_out, t_cache = chunked_attention_forward(q, k, v, mask=mask, bias=bias, block_size=(16, 16))
    got = chunked_attention_backward(dout, t_cache)
    assert rel_error(t_out, out) <= 1e-13
    assert set(got) == set(want)
    for name in got:
        assert rel_error(got[name], want[name]) <= 1e-12, name
