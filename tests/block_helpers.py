"""Comparing the gradients of a whole block: every key at once, with the one exactly-zero gradient handled."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from conftest import BACKENDS

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


def grad_errors(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> dict[str, float]:
    """``rel_error`` per key, except for key biases.

    Adding ``b_k`` to every key adds ``q·b_k`` to a whole row of logits, which the softmax
    ignores, so ``∂L/∂b_k`` is exactly 0 and both sides hold only rounding noise. For keys
    ending in ``k.bias`` the error is ``max|ours − theirs|`` relative to the largest entry of
    any gradient of the block (and the test on that gradient being ~0 is separate).
    """
    assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))
    scale = max(float(np.max(np.abs(to_numpy(g)))) for g in theirs.values())
    errors = {}
    for name in ours:
        a, b = to_numpy(ours[name]), to_numpy(theirs[name])
        assert a.shape == b.shape, (name, a.shape, b.shape)
        if name.endswith("k.bias"):
            errors[name] = float(np.max(np.abs(a - b))) / scale
        else:
            errors[name] = rel_error(a, b)
    return errors
