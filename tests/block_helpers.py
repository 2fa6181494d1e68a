"""Comparing the gradients of a whole block: every key at once, with the one exactly-zero gradient handled."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from attention_ref.backend import to_numpy
from attention_ref.gradcheck import rel_error


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
