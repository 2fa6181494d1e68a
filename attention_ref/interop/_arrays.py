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

from .._checks import FLOAT_DTYPES

__all__ = ["as_numpy", "check_dtype", "require_keys", "weight_in_out"]


def check_dtype(dtype: Any, where: str) -> np.dtype | None:
    """The dtype a loader returns its arrays in: ``None`` (the checkpoint's own) or a real floating one.

    ``TypeError`` for anything else — an integer, bool or complex dtype would truncate the weights without a word,
    and bfloat16 or an extended precision is not a dtype the reference computes in — as for a name NumPy does not
    know. ``where``: the loader, for the message.
    """
    if dtype is None:
        return None
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError):
        dt = None
    if dt is None or dt.name not in FLOAT_DTYPES:
        raise TypeError(f"{where}: dtype must be None or one of {FLOAT_DTYPES}, got {dtype!r}")
    return dt


def as_numpy(a: Any, dtype: Any | None) -> np.ndarray:
    """A contiguous NumPy copy of a torch tensor or NumPy array, cast to ``dtype`` (``None``: keep it;
    :func:`check_dtype`'s rule).

    bfloat16 tensors (which NumPy cannot hold) go through float32, exactly.
    """
    if array_api_compat.is_torch_array(a):
        a = a.detach().cpu()
        if str(a.dtype) == "torch.bfloat16":
            a = a.float()
        a = a.numpy()
    a = np.asarray(a)
    if dtype is not None:
        a = a.astype(check_dtype(dtype, "as_numpy"))
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
