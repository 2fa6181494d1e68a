"""The one place where every block calls per-head attention.

Self-attention, cross-attention and the spatial transformer all hand their
split heads to :func:`attend_forward` and their upstream gradient to
:func:`attend_backward`. Which attention runs is looked up by name in
:data:`ATTENTION_VARIANTS`, so another kind of attention (tiled, linear, window,
neighborhood) plugs in by adding one entry there, without touching the blocks.

Today the only entry is ``"exact"``: :func:`attention_ref.attention_forward`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..attention import attention_backward, attention_forward

__all__ = ["ATTENTION_VARIANTS", "AttendCache", "attend_backward", "attend_forward"]


def _exact_forward(
    q: Any, k: Any, v: Any, *, grid: tuple[int, int], mask: Any | None, scale: float | None
) -> tuple[Any, Any]:
    """Exact attention; the pixel grid plays no part."""
    return attention_forward(q, k, v, mask=mask, scale=scale)


# name → (forward, backward). forward(q, k, v, *, grid, mask, scale, **options) -> (out, cache);
# backward(dout, cache) -> {"q", "k", "v", ...}.
ATTENTION_VARIANTS: dict[str, tuple[Callable[..., tuple[Any, Any]], Callable[[Any, Any], Mapping[str, Any]]]] = {
    "exact": (_exact_forward, attention_backward),
}


@dataclass(frozen=True)
class AttendCache:
    """Which attention ran and that attention's own cache."""

    attention: str  # a key of ATTENTION_VARIANTS
    inner: Any  # the variant's cache, e.g. an AttentionCache for "exact"

    @property
    def weights(self) -> Any:
        """The attention weights ``(B, heads, N, M)`` as the variant keeps them."""
        return self.inner.weights


def attend_forward(
    q: Any,
    k: Any,
    v: Any,
    *,
    grid: tuple[int, int],
    mask: Any | None = None,
    scale: float | None = None,
    attention: str = "exact",
    options: Mapping[str, Any] | None = None,
) -> tuple[Any, AttendCache]:
    """Per-head attention inside a block.

    Inputs:
        q: ``(B, heads, N, d)``, one query per pixel, token ``n = row·W + col``.
        k: ``(B, heads, M, d)``; ``M = N`` for self-attention, the context length for cross-attention.
        v: ``(B, heads, M, d)``.
        grid: ``(H, W)``, the map the ``N`` queries come from (``N = H·W``).
        mask: boolean, broadcastable to ``(B, heads, N, M)``, True = may attend.
        scale: multiplies ``q kᵀ``; default ``1/sqrt(d)``.
        attention: the name of the variant in :data:`ATTENTION_VARIANTS`.
        options: extra keyword options for that variant.

    Returns:
        out: ``(B, heads, N, d)``.
        cache: :class:`AttendCache`.
    """
    if attention not in ATTENTION_VARIANTS:
        raise ValueError(f"unknown attention {attention!r}; available: {sorted(ATTENTION_VARIANTS)}")
    if q.shape[-2] != grid[0] * grid[1]:
        raise ValueError(f"{q.shape[-2]} queries do not fill an H×W = {grid[0]}×{grid[1]} grid")
    forward, _ = ATTENTION_VARIANTS[attention]
    out, inner = forward(q, k, v, grid=grid, mask=mask, scale=scale, **dict(options or {}))
    return out, AttendCache(attention=attention, inner=inner)


def attend_backward(dout: Any, cache: AttendCache) -> dict[str, Any]:
    """``{"q", "k", "v"}`` gradients of :func:`attend_forward`, each shaped like its input."""
    _, backward = ATTENTION_VARIANTS[cache.attention]
    grads = backward(dout, cache.inner)
    return {"q": grads["q"], "k": grads["k"], "v": grads["v"]}
