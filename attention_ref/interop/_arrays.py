"""Turning checkpoint tensors into reference parameters: NumPy conversion and weight layouts.

PyTorch stores a linear layer's weight ``(out, in)`` and a 1×1 convolution's
``(out, in, 1, 1)`` (``(out, in, 1)`` for Conv1d); the reference stores
``(in, out)``. Both become ``(in, out)`` by dropping the unit kernel axes and
transposing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import array_api_compat
import numpy as np

__all__ = ["as_numpy", "require_keys", "weight_in_out"]


def as_numpy(a: Any, dtype: Any | None) -> np.ndarray:
    """A contiguous NumPy copy of a torch tensor or NumPy array, cast to ``dtype`` (``None``: keep it).

    bfloat16 tensors (which NumPy cannot hold) go through float32, exactly.
    """
    if array_api_compat.is_torch_array(a):
        a = a.detach().cpu()
        if str(a.dtype) == "torch.bfloat16":
            a = a.float()
        a = a.numpy()
    a = np.asarray(a)
    if dtype is not None:
        a = a.astype(np.dtype(dtype))
    return np.ascontiguousarray(a)


def weight_in_out(w: Any, dtype: Any | None, name: str) -> np.ndarray:
    """A linear or 1×1-convolution weight ``(out, in[, 1, …])`` as a reference matrix ``(in, out)``."""
    a = as_numpy(w, dtype)
    if a.ndim < 2 or any(n != 1 for n in a.shape[2:]):
        raise ValueError(f"{name} of shape {a.shape} is neither a linear weight (out, in) nor a 1×1 convolution")
    return np.ascontiguousarray(a.reshape(a.shape[0], a.shape[1]).T)


def require_keys(state_dict: Mapping[str, Any], keys: list[str], where: str) -> None:
    """``KeyError`` naming the keys the state dict lacks (and a few it has, to spot a wrong prefix)."""
    missing = [k for k in keys if k not in state_dict]
    if missing:
        have = sorted(state_dict)[:8]
        raise KeyError(f"{where}: the state dict lacks {missing}; it has e.g. {have} (wrong prefix?)")
