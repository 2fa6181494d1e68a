"""Small, independent attention implementations to try the oracle on (and to show how to write one).

* :func:`numpy_attention` / :func:`numpy_attention_grad`: plain NumPy in float32
  accumulation, written from the formulas, not from :mod:`attention_ref.attention`.
* :func:`torch_sdpa`: ``torch.nn.functional.scaled_dot_product_attention`` in the
  harness's signature; wrap it with :func:`~attention_ref.testing.from_torch`.

From the command line::

    python -m attention_ref check attention_ref.testing.examples:numpy_attention --dtype float16
    python -m attention_ref check attention_ref.testing.examples:torch_sdpa --torch --dtype bfloat16
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["numpy_attention", "numpy_attention_grad", "torch_sdpa"]


def _weights(q: np.ndarray, k: np.ndarray, mask: Any, bias: Any, scale: float | None) -> np.ndarray:
    """P in float32: ``softmax(scale·q kᵀ + bias)`` over allowed keys, rows without a key all 0.  (..., N, M)"""
    q32, k32 = q.astype(np.float32), k.astype(np.float32)
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = np.float32(scale) * (q32 @ np.swapaxes(k32, -1, -2))
    if bias is not None:
        s = s + bias.astype(np.float32)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)
    e = np.exp(s - m)
    total = np.sum(e, axis=-1, keepdims=True)
    return e / np.where(total == 0, 1.0, total)


def numpy_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, mask: Any = None, bias: Any = None,
                    scale: float | None = None) -> np.ndarray:  # fmt: skip
    """Attention in float32 accumulation; returns ``q``'s dtype. ``(..., N, dv)``"""
    p = _weights(q, k, mask, bias, scale)
    return (p @ v.astype(np.float32)).astype(q.dtype)


def numpy_attention_grad(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    dout: np.ndarray,
    *,
    mask: Any = None,
    bias: Any = None,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dq, dk, dv)`` of :func:`numpy_attention`, in float32 accumulation, returned in ``q``'s dtype."""
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    p = _weights(q, k, mask, bias, scale)
    q32, k32, v32, do32 = (a.astype(np.float32) for a in (q, k, v, dout))
    dv = np.swapaxes(p, -1, -2) @ do32
    dp = do32 @ np.swapaxes(v32, -1, -2)
    ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
    dq = np.float32(scale) * (ds @ k32)
    dk = np.float32(scale) * (np.swapaxes(ds, -1, -2) @ q32)
    return dq.astype(q.dtype), dk.astype(q.dtype), dv.astype(q.dtype)


def torch_sdpa(q: Any, k: Any, v: Any, *, mask: Any = None, bias: Any = None, scale: float | None = None) -> Any:
    """``torch.nn.functional.scaled_dot_product_attention`` in the harness's signature (torch tensors).

    SDPA takes one ``attn_mask``, boolean or additive; a mask and a bias together become one
    additive mask with ``-inf`` where the boolean mask is False.
    """
    import torch

    attn_mask = mask
    if bias is not None:
        attn_mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
