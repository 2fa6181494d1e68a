"""Validation of the inputs every attention variant shares: q, k, v, mask, bias, scale."""

from __future__ import annotations

import math
from types import ModuleType

from .._checks import require_bool, require_broadcastable_to, require_floating
from ..backend import Array, namespace

__all__ = ["check_attention_inputs", "check_qkv", "default_scale"]


def default_scale(d: int) -> float:
    """``1/sqrt(d)``, the scale that keeps ``q·k`` of unit-variance entries at unit variance."""
    return 1.0 / math.sqrt(d)


def check_qkv(q: Array, k: Array, v: Array) -> ModuleType:
    """Check ``q (..., N, d)``, ``k (..., M, d)``, ``v (..., M, dv)``; return their namespace.

    ``TypeError`` for non-floating or mixed dtypes, ``ValueError`` (naming the
    shapes) for anything that does not line up. Leading dims must be *equal*:
    nothing is broadcast silently.
    """
    xp = namespace(q, k, v)
    for name, a in (("q", q), ("k", k), ("v", v)):
        require_floating(xp, name, a)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2:
        raise ValueError(f"q, k, v need at least 2 dimensions (..., tokens, features); got {shapes}")
    if not (tuple(q.shape[:-2]) == tuple(k.shape[:-2]) == tuple(v.shape[:-2])):
        raise ValueError(f"q, k, v must have equal leading dimensions; got {shapes}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same feature size d; got {shapes}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same number of tokens M; got {shapes}")
    if k.shape[-2] < 1:
        raise ValueError(f"attention needs at least one key; got {shapes}")
    return xp


def check_attention_inputs(
    q: Array, k: Array, v: Array, mask: Array | None, bias: Array | None, scale: float | None
) -> tuple[ModuleType, float]:
    """Check all inputs of scaled dot-product attention; return ``(xp, scale)``.

    ``mask`` must be boolean and ``bias`` floating (of q's dtype), both
    broadcastable to ``(..., N, M)``; ``scale`` defaults to ``1/sqrt(d)``.
    """
    xp = check_qkv(q, k, v)
    logits_shape = (*q.shape[:-1], k.shape[-2])  # (..., N, M)
    if mask is not None:
        namespace(q, mask)
        require_bool(xp, "mask", mask)
        require_broadcastable_to("mask", tuple(mask.shape), logits_shape)
    if bias is not None:
        namespace(q, bias)
        require_floating(xp, "bias", bias)
        if bias.dtype != q.dtype:
            raise TypeError(f"bias must have q's dtype {q.dtype}, got {bias.dtype}")
        require_broadcastable_to("bias", tuple(bias.shape), logits_shape)
    if scale is None:
        scale = default_scale(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number, got {type(scale).__name__}")
    return xp, float(scale)
