"""Validation of what every attention variant shares: q, k, v, mask, bias and scale.

A backward's ``dout`` and cache are checked as every backward's are, by
:func:`attention_ref._checks.require_dout` and :func:`attention_ref._checks.check_cache`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from .._checks import (
    array_namespace,
    check_real,
    dtype_name,
    require_array,
    require_bool,
    require_broadcastable_to,
    require_floating,
)
from ..backend import Array, is_out_of_memory

__all__ = [
    "check_attention_inputs",
    "check_qkv",
    "check_scale",
    "default_scale",
    "hint_chunked_when_out_of_memory",
]


def default_scale(d: int) -> float:
    """``1/sqrt(d)``, the scale that keeps ``q·k`` of unit-variance entries at unit variance.

    With ``d = 0`` every ``q·k`` is an empty sum, 0, whatever the scale: 1 is returned.
    """
    return 1.0 / math.sqrt(d) if d > 0 else 1.0


def check_scale(scale: Any, d: int) -> float:
    """``scale`` as a float, ``1/sqrt(d)`` when ``None``.

    Any real scalar counts (``0.5``, ``2``, ``numpy.float32(0.5)``); ``TypeError`` for anything else
    (a bool, a string, an array), ``ValueError`` for ``inf`` or NaN.
    """
    if scale is None:
        return default_scale(d)
    return check_real("scale", scale)


def check_qkv(q: Array, k: Array, v: Array) -> ModuleType:
    """Check ``q (..., N, d)``, ``k (..., M, d)``, ``v (..., M, dv)``; return their namespace.

    ``TypeError`` for non-floating or mixed dtypes, ``ValueError`` (naming the
    shapes) for anything that does not line up. Leading dims must be *equal*:
    nothing is broadcast silently. Any of ``N``, ``M``, ``d``, ``dv`` may be 0.
    ``ValueError`` for an infinite entry: ``q·k`` would be ``±inf`` or ``0·inf``
    (NaN). NaN entries are allowed; they propagate.
    """
    for name, a in (("q", q), ("k", k), ("v", v)):
        require_array(name, a)
    xp = array_namespace(q=q, k=k, v=v)
    for name, a in (("q", q), ("k", k), ("v", v)):
        require_floating(xp, name, a)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {', '.join(dtype_name(a.dtype) for a in (q, k, v))}")
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2:
        raise ValueError(f"q, k, v need at least 2 dimensions (..., tokens, features); got {shapes}")
    if not (tuple(q.shape[:-2]) == tuple(k.shape[:-2]) == tuple(v.shape[:-2])):
        raise ValueError(f"q, k, v must have equal leading dimensions; got {shapes}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same feature size d; got {shapes}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same number of tokens M; got {shapes}")
    for name, a in (("q", q), ("k", k), ("v", v)):
        if bool(xp.any(xp.isinf(a))):
            raise ValueError(
                f"{name} has an infinite entry; q, k and v must be finite (NaN is allowed: it propagates). "
                "To keep a key out of a query's softmax use mask, or a bias of -inf"
            )
    return xp


def check_attention_inputs(
    q: Array, k: Array, v: Array, mask: Array | None, bias: Array | None, scale: Any
) -> tuple[ModuleType, float]:
    """Check all inputs of scaled dot-product attention; return ``(xp, scale)``.

    ``mask`` must be boolean and ``bias`` floating (of q's dtype), both
    broadcastable to ``(..., N, M)``; ``scale`` as :func:`check_scale`.
    """
    xp = check_qkv(q, k, v)
    logits_shape = (*q.shape[:-1], k.shape[-2])  # (..., N, M)
    if mask is not None:
        array_namespace(q=q, mask=mask)
        require_bool(xp, "mask", mask)
        require_broadcastable_to("mask", tuple(mask.shape), logits_shape)
    if bias is not None:
        array_namespace(q=q, bias=bias)
        require_floating(xp, "bias", bias)
        if bias.dtype != q.dtype:
            raise TypeError(f"bias must have q's dtype {q.dtype}, got {bias.dtype}")
        require_broadcastable_to("bias", tuple(bias.shape), logits_shape)
    return xp, check_scale(scale, q.shape[-1])


@contextmanager
def hint_chunked_when_out_of_memory(q: Array, k: Array) -> Iterator[None]:
    """Re-raise running out of memory inside exact attention as a ``MemoryError`` that suggests the tiled path.

    Exact attention holds every ``N × M`` weight: 8 GiB per matrix at ``N = M = 32,768`` in float64.
    torch reports a failed allocation as a ``RuntimeError``; it is turned into a ``MemoryError`` too.
    """
    try:
        yield
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        n, m, matrices = q.shape[-2], k.shape[-2], math.prod(q.shape[:-2])
        gib = matrices * n * m * _itemsize(q) / 2**30
        raise MemoryError(
            f"exact attention holds all its weights, {matrices}×{n}×{m} numbers ({gib:,.1f} GiB in "
            f"{dtype_name(q.dtype)}): more than there is memory for. chunked_attention_forward gives the same "
            "result tile by tile in O(N) memory (attention='chunked' in the blocks)"
        ) from err


def _itemsize(a: Array) -> int:
    """Bytes per entry of ``a`` (from its dtype's name, which every backend has)."""
    name = dtype_name(a.dtype)
    return 2 if "16" in name else 4 if "32" in name else 8
