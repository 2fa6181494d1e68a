"""Threads: parallel_map, our thread count and BLAS's, and results that do not depend on either."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from attention_ref import attention_backward, attention_forward, chunked_attention_backward, chunked_attention_forward
from attention_ref.backend import cpu_workers, parallel_map
from attention_ref.gradcheck import rel_error


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

    from attention_ref import backend

    monkeypatch.setattr(backend, "_HAS_THREADPOOLCTL", False)
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


# ---------------------------------------------------------------- thread counts: ours and BLAS's


def _blas_threads():
    from threadpoolctl import threadpool_info

    return next(lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas")


needs_threadpoolctl = pytest.mark.skipif(
    importlib.util.find_spec("threadpoolctl") is None, reason="threadpoolctl (the fast extra) is not installed"
)


@needs_threadpoolctl
def test_limited_threads_sets_ours_and_blas_and_restores_both(monkeypatch):
    from attention_ref.backend import limited_threads, thread_count

    monkeypatch.setenv("ATTENTION_REF_NUM_THREADS", "3")
    blas_before = _blas_threads()
    with limited_threads(1) as count:
        assert count == 1 and thread_count() == 1 and cpu_workers(np.zeros(2)) == 1 and _blas_threads() == 1
        with limited_threads() as inner:  # None: the variable's count (the outer limit is not the variable)
            assert inner == 1
    assert thread_count() == 3 and _blas_threads() == blas_before
    with limited_threads() as count:
        assert count == 3 == thread_count()
    with pytest.raises(ValueError, match="positive"):
        with limited_threads(0):
            pass


@needs_threadpoolctl
def test_small_products_run_on_one_blas_thread(monkeypatch):
    from attention_ref import backend

    seen = []
    real = np.matmul

    def spy(a, b, *args, **kwargs):
        seen.append(_blas_threads())
        return real(a, b, *args, **kwargs)

    with backend.limited_threads(2):
        with backend.blas_threads_for(np.zeros(2), backend.SMALL_PRODUCT - 1):
            spy(np.ones((2, 2)), np.ones((2, 2)))
        with backend.blas_threads_for(np.zeros(2), backend.SMALL_PRODUCT):
            spy(np.ones((2, 2)), np.ones((2, 2)))
    assert seen == [1, 2]
    # a block at the toys' size: its linear layers' and attention's products run on one BLAS thread
    import contextlib

    from attention_ref import init_self_attention, self_attention_backward, self_attention_forward

    inside = []

    def recording(like, multiply_adds):
        @contextlib.contextmanager
        def context():
            with backend.blas_threads_for(like, multiply_adds):
                inside.append(_blas_threads())
                yield

        return context()

    monkeypatch.setattr("attention_ref.ops.linear.blas_threads_for", recording)
    monkeypatch.setattr("attention_ref.attention.exact_fast.blas_threads_for", recording)
    x = np.random.default_rng(0).standard_normal((4, 8, 8, 16))
    with backend.limited_threads(2):
        y, cache = self_attention_forward(x, init_self_attention(16, heads=2, groups=4, rng=0), heads=2, groups=4)
        self_attention_backward(np.ones_like(y), cache)
        assert _blas_threads() == 2  # only around the products
    assert inside == [1] * 10  # 4 projections and attention, forward and backward


@needs_threadpoolctl
@pytest.mark.parametrize("toy", ["long_range", "grounding"])
def test_the_toys_train_on_one_thread_unless_told(toy, monkeypatch):
    """A toy's training runs on toy_threads(): ATTENTION_REF_NUM_THREADS when set, else 1 (ours and BLAS's)."""
    import attention_ref.toys.grounding as grounding
    import attention_ref.toys.long_range as long_range
    from attention_ref.backend import thread_count

    module, train = {
        "long_range": (long_range, long_range.train_long_range),
        "grounding": (grounding, grounding.train_token_grounding),
    }[toy]
    seen = []
    real = module.model_forward

    def spy(*args):
        seen.append((thread_count(), _blas_threads()))
        return real(*args)

    monkeypatch.setattr(module, "model_forward", spy)
    small = {"eval_maps": 4} if toy == "long_range" else {"train_scenes": 8, "eval_scenes": 4}
    monkeypatch.delenv("ATTENTION_REF_NUM_THREADS", raising=False)
    blas_before = _blas_threads()
    train(0, steps=2, batch=2, progress_bar=False, **small)
    assert set(seen) == {(1, 1)}
    seen.clear()
    monkeypatch.setenv("ATTENTION_REF_NUM_THREADS", "2")
    train(0, steps=2, batch=2, progress_bar=False, **small)
    assert set(seen) == {(2, 2)}
    seen.clear()
    train(0, steps=2, batch=2, progress_bar=False, threads=3, **small)
    assert set(seen) == {(3, 3)}
    assert _blas_threads() == blas_before
