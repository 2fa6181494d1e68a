"""Comparing the gradients of a whole block (every key at once, with the one exactly-zero gradient handled), and the
map blocks' test problem: a (B, H, W, C) map and parameters moved off their init, run forward and backward."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from conftest import BACKENDS

import attention_ref as ar
from attention_ref.backend import to_numpy
from attention_ref.gradcheck import check_backward, rel_error

#: every backend but NumPy, for tests that compare a backend's result with NumPy's (``parametrize("be", ...,
#: indirect=True)``): NumPy against NumPy would compare a function with itself.
OTHER_BACKENDS = [b for b in BACKENDS if b != "numpy"]


def jitter(params: Mapping[str, np.ndarray], rng: np.random.Generator, scale: float = 0.3) -> dict[str, np.ndarray]:
    """Move every parameter off its init (norm weights off 1, biases off 0) so no gradient is special."""
    return {k: v + scale * rng.standard_normal(v.shape) for k, v in params.items()}


def fd_errors(forward: Any, backward: Any, inputs: dict[str, np.ndarray]) -> dict[str, float]:
    """check_backward, except that k.bias — whose gradient is exactly 0 — is compared in absolute terms."""
    errs = check_backward(forward, backward, inputs)
    out, cache = forward(**inputs)
    grads = backward(np.random.default_rng(0).standard_normal(np.shape(out)), cache)
    for name in errs:
        if name.endswith("k.bias"):
            errs[name] = float(np.max(np.abs(grads[name])))
    return errs


def grad_errors(
    ours: Mapping[str, Any], theirs: Mapping[str, Any], is_zero: Callable[[str, np.ndarray, float], bool] | None = None
) -> dict[str, float]:
    """``rel_error`` per key, except for a gradient that is exactly 0 in exact arithmetic.

    Such a gradient holds only rounding noise on both sides, so its error is ``max|ours − theirs|`` relative to
    the largest entry of any gradient of the block (the test on that gradient being ~0 is separate).
    ``is_zero(name, theirs[name], largest)`` says which: by default the key biases — adding ``b_k`` to every
    key adds ``q·b_k`` to a whole row of logits, which the softmax ignores, so ``∂L/∂b_k`` is exactly 0.
    """
    assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))
    is_zero = is_zero or (lambda name, grad, largest: name.endswith("k.bias"))
    scale = max(float(np.max(np.abs(to_numpy(g)))) for g in theirs.values())
    errors = {}
    for name in ours:
        a, b = to_numpy(ours[name]), to_numpy(theirs[name])
        assert a.shape == b.shape, (name, a.shape, b.shape)
        errors[name] = float(np.max(np.abs(a - b))) / scale if is_zero(name, b, scale) else rel_error(a, b)
    return errors


# Tiled against exact attention inside a block (normwise relative errors, float64), measured over 20 seeds of
# these tests on an AMD EPYC (Zen 4, OpenBLAS): outputs and weights ≤ 9.2e-16, gradients ≤ 2.2e-14 (the norm
# and q weights' gradients are sums with cancellation). The bounds leave a margin of about 10× and 5× for
# other summation orders (another BLAS, another CPU).
CHUNKED_TOL = 1e-14
CHUNKED_GRAD_TOL = 1e-13
LOCAL_TOL = 1e-12

#: the variant tests' map (B, H, W, C), its heads and groups, and its N = H·W tokens
B, H, W, C, HEADS, GROUPS = 2, 4, 6, 4, 2, 2
N = H * W


def self_setup(rng, shape=(B, H, W, C), heads=HEADS, groups=GROUPS, seed=0):
    params = jitter(ar.init_self_attention(shape[-1], heads=heads, groups=groups, rng=seed), rng)
    return rng.standard_normal(shape), params


def cross_setup(rng, M=5, D=3):
    params = jitter(ar.init_cross_attention(C, D, heads=HEADS, groups=GROUPS, rng=1), rng)
    return rng.standard_normal((B, H, W, C)), rng.standard_normal((B, M, D)), params


def run_self(x, params, dy=None, **kw):
    y, cache = ar.self_attention_forward(x, params, heads=HEADS, groups=GROUPS, **kw)
    dy = np.ones_like(y) if dy is None else dy
    return y, cache, ar.self_attention_backward(dy, cache)


def run_cross(x, context, params, dy=None, **kw):
    y, cache = ar.cross_attention_forward(x, context, params, heads=HEADS, groups=GROUPS, **kw)
    dy = np.ones_like(y) if dy is None else dy
    return y, cache, ar.cross_attention_backward(dy, cache)


def assert_same_block(got, want, tol, grad_tol=None):
    """Outputs (to ``tol``) and every gradient (to ``grad_tol``, default ``tol``) of two (y, cache, grads) runs
    agree (k.bias: see grad_errors)."""
    (y, _, g), (y_ref, _, g_ref) = got, want
    assert rel_error(y, y_ref) <= tol
    errors = grad_errors(g, g_ref)
    assert max(errors.values()) <= (grad_tol or tol), errors
