"""Validation of q, k, v laid out as feature maps ``(..., H, W, channels)``, for the spatial variants."""

from __future__ import annotations

from types import ModuleType

from ..backend import Array
from .inputs import check_qkv

__all__ = ["check_map_qkv"]


def check_map_qkv(q: Array, k: Array, v: Array) -> tuple[ModuleType, int, int]:
    """Check ``q (..., H, W, d)``, ``k (..., H, W, d)``, ``v (..., H, W, dv)`` with at least one leading
    axis; return ``(xp, H, W)``.

    Queries and keys live on the same map (self-attention), so everything but the channel axis must be
    equal. ``TypeError``/``ValueError`` as :func:`attention_ref.attention.inputs.check_qkv`.
    """
    xp = check_qkv(q, k, v)
    if q.ndim == 3:
        # (H, W, d) and a batch of token sequences (B, N, d) look alike: one map must say so with a batch axis
        raise ValueError(
            f"q of shape {tuple(q.shape)} is 3-D: the window and neighborhood variants take maps (..., H, W, d) "
            "with at least one leading axis (batch or heads); for one (H, W, d) map pass q[None], k[None], v[None]"
        )
    if q.ndim < 4 or not (tuple(q.shape[:-1]) == tuple(k.shape[:-1]) == tuple(v.shape[:-1])):
        raise ValueError(
            "q, k, v must be maps (..., H, W, channels) with equal leading dims and H, W; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    return xp, q.shape[-3], q.shape[-2]
