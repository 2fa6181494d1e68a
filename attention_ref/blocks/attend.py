"""The one place where every block calls per-head attention.

Self-attention, cross-attention and the spatial transformer all hand their
split heads ``(B, heads, N, d)`` to :func:`attend_forward` and their upstream
gradient to :func:`attend_backward`. Which attention runs is looked up by name in
:data:`ATTENTION_VARIANTS` (options as given in ``attention_options``):

* ``"exact"`` — :func:`attention_ref.attention_forward`; no options; any mask.
* ``"chunked"`` — :func:`attention_ref.chunked_attention_forward` (FlashAttention-style tiles, the same
  result in O(N) memory); option ``block_size``; any mask, sliced per tile.
* ``"linear"`` — :func:`attention_ref.linear_attention_forward`; options ``kind`` (``"elu"`` or
  ``"efficient"``), ``eps``; only a key mask (shape ``(..., 1, M)``, e.g. a context mask), which leaves
  the masked keys out of its sums; no ``scale``.
* ``"window"`` — :func:`attention_ref.window_attention_forward`; options ``window`` (required), ``shift``;
  self-attention only, no mask (its windows are its mask).
* ``"neighborhood"`` — :func:`attention_ref.neighborhood_attention_forward`; option ``kernel`` (required);
  self-attention only, no mask.

Window and neighborhood attention work on pixels ``(..., H, W, d)``: the ``N = H·W``
tokens (token ``row·W + col``) are reshaped to the map here and back afterwards. Their
keys must be those same pixels, so they run only in self-attention; cross-attention's
keys are context tokens without a place on the map.

What ``weights`` means is the same for every variant: the dense ``(B, heads, N, M)``
softmax weight matrix *when the variant stored it* (only ``"exact"``), else ``None``,
with :attr:`AttendCache.weights_note` saying why and where the weights are instead.
:meth:`AttendCache.weight_rows` gives any band of dense rows for every variant that
has weights (all but linear), at ``O(rows · M)`` memory, so a plot of one query
pixel never builds ``N × M``.

A new variant plugs in by adding one :class:`AttentionVariant` here; the blocks do
not change. Its forward is ``forward(q, k, v, *, grid, key_grid, mask, scale, **options)``
where ``grid = (H, W)`` is the query map and ``key_grid`` is ``grid`` when the keys are
the same pixels (self-attention) and ``None`` when they are context tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..attention import (
    attention_backward,
    attention_forward,
    chunked_attention_backward,
    chunked_attention_forward,
    linear_attention_backward,
    linear_attention_forward,
    neighborhood_attention_backward,
    neighborhood_attention_forward,
    window_attention_backward,
    window_attention_forward,
)
from ..attention.dense_rows import check_row_range
from ..backend import namespace

__all__ = ["ATTENTION_VARIANTS", "AttendCache", "AttentionVariant", "attend_backward", "attend_forward"]

_COMMON = ("grid", "key_grid", "mask", "scale")  # what every variant's forward receives besides q, k, v


@dataclass(frozen=True)
class AttentionVariant:
    """One kind of per-head attention the blocks can run.

    forward: ``(q, k, v, *, grid, key_grid, mask, scale, **options) -> (out, cache)`` on ``(B, heads, ·, d)``;
        its keyword-only parameters other than ``grid, key_grid, mask, scale`` are its options (those
        without a default are required).
    backward: ``(dout, cache) -> {"q", "k", "v", ...}``.
    weights_note: what a block cache's ``weights`` holds for this variant, and where to look instead.
    stores_weights: the variant's cache ``.weights`` is the dense ``(B, heads, N, M)`` matrix.
    weight_rows: ``(cache, start, stop) -> (B, heads, stop − start, M)`` dense rows; ``None`` when the
        variant has no weight matrix at all.
    """

    forward: Callable[..., tuple[Any, Any]]
    backward: Callable[[Any, Any], Mapping[str, Any]]
    weights_note: str
    stores_weights: bool = False
    weight_rows: Callable[[Any, int, int], Any] | None = None

    @property
    def options(self) -> dict[str, bool]:
        """``{option name: required}`` read from the forward's keyword-only parameters."""
        params = inspect.signature(self.forward).parameters.values()
        return {
            p.name: p.default is inspect.Parameter.empty
            for p in params
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _COMMON
        }


# ---------------------------------------------------------------- the variants' forward/backward on (B, heads, N, d)


def _exact_forward(
    q: Any, k: Any, v: Any, *, grid: tuple[int, int], key_grid: tuple[int, int] | None, mask: Any, scale: Any
) -> tuple[Any, Any]:
    """Exact attention; the pixel grid plays no part."""
    return attention_forward(q, k, v, mask=mask, scale=scale)


def _chunked_forward(
    q: Any,
    k: Any,
    v: Any,
    *,
    grid: tuple[int, int],
    key_grid: tuple[int, int] | None,
    mask: Any,
    scale: Any,
    block_size: int | tuple[int, int] | None = None,
) -> tuple[Any, Any]:
    """Tiled exact attention; the mask stays in its broadcast shape and is sliced per tile."""
    return chunked_attention_forward(q, k, v, mask=mask, scale=scale, block_size=block_size)


def _linear_forward(
    q: Any,
    k: Any,
    v: Any,
    *,
    grid: tuple[int, int],
    key_grid: tuple[int, int] | None,
    mask: Any,
    scale: Any,
    kind: str = "elu",
    eps: float = 1e-6,
) -> tuple[Any, Any]:
    """Linear attention; a mask may only leave out keys (shape ``(..., 1, M)``, e.g. a context mask)."""
    if scale is not None:
        raise ValueError(
            f"linear attention has no scale (its weights are φ(q)·φ(k) / δ, not a softmax of scaled logits); "
            f"got scale={scale!r}, leave it None"
        )
    key_mask = None
    if mask is not None:
        if mask.ndim >= 2 and mask.shape[-2] != 1:
            raise ValueError(
                f"linear attention can leave out keys (a mask of shape (..., 1, M), e.g. context_mask) but has no "
                f"linear-time form of a per-query mask; got a mask of shape {tuple(mask.shape)}"
            )
        key_mask = mask[..., 0, :] if mask.ndim >= 2 else mask  # (..., M)
    return linear_attention_forward(q, k, v, eps=eps, kind=kind, key_mask=key_mask)


def _require_pixel_keys(name: str, what: str, q: Any, k: Any, grid: Any, key_grid: Any, mask: Any) -> None:
    """``ValueError`` unless the keys are the query map's own pixels and no extra mask was given."""
    if key_grid is None:
        raise ValueError(
            f"{name} attention needs keys on the pixel grid, but these keys are {k.shape[-2]} context tokens "
            "(cross-attention), which have no place on the map; use 'exact', 'chunked' or 'linear'"
        )
    if tuple(key_grid) != tuple(grid) or q.shape[-2] != k.shape[-2]:
        raise ValueError(f"{name} attention needs keys on the query map {grid}, got keys on {key_grid}")
    if mask is not None:
        raise ValueError(
            f"{name} attention takes no mask: its {what} are its mask (it equals exact attention under "
            f"attention_ref.{name}_mask); for another pattern use attention='exact' or 'chunked' with a mask"
        )


def _as_map(xp: Any, t: Any, grid: tuple[int, int]) -> Any:
    """``(..., H·W, c) → (..., H, W, c)``: token ``row·W + col`` is pixel ``(row, col)``."""
    return xp.reshape(t, (*t.shape[:-2], grid[0], grid[1], t.shape[-1]))


def _as_tokens(xp: Any, t: Any) -> Any:
    """``(..., H, W, c) → (..., H·W, c)``, the inverse of :func:`_as_map`."""
    return xp.reshape(t, (*t.shape[:-3], t.shape[-3] * t.shape[-2], t.shape[-1]))


def _window_forward(
    q: Any,
    k: Any,
    v: Any,
    *,
    grid: tuple[int, int],
    key_grid: tuple[int, int] | None,
    mask: Any,
    scale: Any,
    window: int | tuple[int, int],
    shift: int | tuple[int, int] = 0,
) -> tuple[Any, Any]:
    """Swin window attention on the ``(B, heads, H, W, d)`` map."""
    _require_pixel_keys("window", "windows", q, k, grid, key_grid, mask)
    xp = namespace(q, k, v)
    out, cache = window_attention_forward(
        _as_map(xp, q, grid), _as_map(xp, k, grid), _as_map(xp, v, grid), window=window, shift=shift, scale=scale
    )
    return _as_tokens(xp, out), cache  # (B, heads, N, dv)


def _window_backward(dout: Any, cache: Any) -> dict[str, Any]:
    xp = namespace(dout)
    grads = window_attention_backward(_as_map(xp, dout, (cache.height, cache.width)), cache)
    return {name: _as_tokens(xp, g) for name, g in grads.items()}


def _neighborhood_forward(
    q: Any,
    k: Any,
    v: Any,
    *,
    grid: tuple[int, int],
    key_grid: tuple[int, int] | None,
    mask: Any,
    scale: Any,
    kernel: int | tuple[int, int],
) -> tuple[Any, Any]:
    """NATTEN neighborhood attention on the ``(B, heads, H, W, d)`` map."""
    _require_pixel_keys("neighborhood", "neighborhoods", q, k, grid, key_grid, mask)
    xp = namespace(q, k, v)
    out, cache = neighborhood_attention_forward(
        _as_map(xp, q, grid), _as_map(xp, k, grid), _as_map(xp, v, grid), kernel=kernel, scale=scale
    )
    return _as_tokens(xp, out), cache  # (B, heads, N, dv)


def _neighborhood_backward(dout: Any, cache: Any) -> dict[str, Any]:
    xp = namespace(dout)
    grads = neighborhood_attention_backward(_as_map(xp, dout, tuple(cache.q.shape[-3:-1])), cache)
    return {name: _as_tokens(xp, g) for name, g in grads.items()}


def _stored_rows(cache: Any, start: int, stop: int) -> Any:
    return cache.weights[..., start:stop, :]


def _recomputed_rows(cache: Any, start: int, stop: int) -> Any:
    return cache.weight_rows(start, stop)


ATTENTION_VARIANTS: dict[str, AttentionVariant] = {
    "exact": AttentionVariant(
        _exact_forward,
        attention_backward,
        weights_note="exact attention stores its (B, heads, N, M) weights: cache.weights",
        stores_weights=True,
        weight_rows=_stored_rows,
    ),
    "chunked": AttentionVariant(
        _chunked_forward,
        chunked_attention_backward,
        weights_note=(
            "chunked attention never stores the (N, M) weight matrix (that is how it stays O(N) in memory); "
            "cache.weight_rows(start, stop) recomputes rows of it exactly"
        ),
        weight_rows=_recomputed_rows,
    ),
    "linear": AttentionVariant(
        _linear_forward,
        linear_attention_backward,
        weights_note=(
            "linear attention has no softmax weight matrix: out = φ(Q)(φ(K)ᵀV)/δ is computed without one; "
            "cache.implied_weights() builds the (B, heads, N, M) matrix A with out = A V, for inspection"
        ),
    ),
    "window": AttentionVariant(
        _window_forward,
        _window_backward,
        weights_note=(
            "window attention stores weights only inside each window (cache.attention.inner.weights, "
            "(B, heads, H/w, W/w, w², w²) on the map rolled by −shift); cache.weight_rows(start, stop) "
            "spreads rows of them over the map"
        ),
        weight_rows=_recomputed_rows,
    ),
    "neighborhood": AttentionVariant(
        _neighborhood_forward,
        _neighborhood_backward,
        weights_note=(
            "neighborhood attention stores weights only for each pixel's neighbors (cache.attention.inner.weights, "
            "(B, heads, H, W, k²)); cache.weight_rows(start, stop) spreads rows of them over the map"
        ),
        weight_rows=_recomputed_rows,
    ),
}


# ---------------------------------------------------------------- the hook


def _variant(attention: Any) -> AttentionVariant:
    if not isinstance(attention, str) or attention not in ATTENTION_VARIANTS:
        raise ValueError(f"unknown attention {attention!r}; available: {sorted(ATTENTION_VARIANTS)}")
    return ATTENTION_VARIANTS[attention]


def check_attention_options(attention: Any, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options for variant ``attention`` as a dict; ``ValueError`` naming unknown or missing ones."""
    variant = _variant(attention)
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TypeError(f"attention_options must be a mapping of option names to values, got {type(options).__name__}")
    accepted = variant.options
    unknown = sorted(set(options) - set(accepted))
    missing = sorted(name for name, required in accepted.items() if required and name not in options)
    if unknown or missing:
        takes = ", ".join(f"{n} (required)" if r else n for n, r in accepted.items()) or "no options"
        problems = [f"unknown {unknown}"] if unknown else []
        problems += [f"missing {missing}"] if missing else []
        raise ValueError(f"{attention} attention takes {takes}; got {', '.join(problems)}")
    return dict(options)


@dataclass(frozen=True)
class AttendCache:
    """Which attention ran, on which map, and that attention's own cache (``inner``)."""

    attention: str  # a key of ATTENTION_VARIANTS
    inner: Any  # the variant's cache, e.g. an AttentionCache for "exact"
    grid: tuple[int, int]  # (H, W) of the queries

    @property
    def weights(self) -> Any | None:
        """The dense weights ``(B, heads, N, M)`` when the variant stored them (``"exact"``), else ``None``.

        :attr:`weights_note` says why they are missing and where to look instead.
        """
        return self.inner.weights if ATTENTION_VARIANTS[self.attention].stores_weights else None

    @property
    def weights_note(self) -> str:
        """One sentence: what :attr:`weights` holds for this variant, and how to get weights otherwise."""
        return ATTENTION_VARIANTS[self.attention].weights_note

    def weight_rows(self, start: int, stop: int) -> Any:
        """Rows ``start:stop`` of the dense weights, ``(B, heads, stop − start, M)``, for any variant with weights.

        Exact: sliced from the stored weights. Chunked: recomputed exactly from the saved log-sum-exp.
        Window, neighborhood: their local weights spread over the map (0 outside the window/neighborhood),
        equal to exact attention's weights under the variant's mask. Memory ``O(rows · M)``.
        Linear: ``ValueError`` — it has no weight matrix (see :meth:`implied_weights`).
        """
        rows = ATTENTION_VARIANTS[self.attention].weight_rows
        if rows is None:
            raise ValueError(f"no weight rows: {self.weights_note}")
        start, stop = check_row_range(start, stop, self.grid[0] * self.grid[1])
        return rows(self.inner, start, stop)

    def implied_weights(self) -> Any:
        """Linear attention only: the ``(B, heads, N, M)`` matrix ``A`` with ``out = A V`` (O(N·M) memory)."""
        implied = getattr(self.inner, "implied_weights", None)
        if implied is None:
            raise ValueError(
                f"{self.attention} attention is a softmax attention with real weights; use weights or weight_rows"
            )
        return implied()


def attend_forward(
    q: Any,
    k: Any,
    v: Any,
    *,
    grid: tuple[int, int],
    key_grid: tuple[int, int] | None = None,
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
        key_grid: ``grid`` when the keys are the same pixels (self-attention); ``None`` when they are
            context tokens (cross-attention). Window and neighborhood attention need it.
        mask: boolean, broadcastable to ``(B, heads, N, M)``, True = may attend (which variants take
            which masks: see the module docstring).
        scale: multiplies ``q kᵀ``; default ``1/sqrt(d)``; must stay ``None`` for linear attention.
        attention: the name of the variant in :data:`ATTENTION_VARIANTS`.
        options: that variant's options, e.g. ``{"window": 4, "shift": 2}``.

    Returns:
        out: ``(B, heads, N, d)``.
        cache: :class:`AttendCache`.

    Raises:
        ValueError for an unknown variant, unknown or missing options, a mask or key layout the
        variant cannot take, or ``q`` that does not fill the grid.
    """
    options = check_attention_options(attention, options)
    if q.shape[-2] != grid[0] * grid[1]:
        raise ValueError(f"{q.shape[-2]} queries do not fill an H×W = {grid[0]}×{grid[1]} grid")
    forward = ATTENTION_VARIANTS[attention].forward
    out, inner = forward(q, k, v, grid=grid, key_grid=key_grid, mask=mask, scale=scale, **options)
    return out, AttendCache(attention=attention, inner=inner, grid=tuple(grid))


def attend_backward(dout: Any, cache: AttendCache) -> dict[str, Any]:
    """Gradients of :func:`attend_forward`.

    Inputs:
        dout: ``(B, heads, N, dv)``, the gradient of the loss with respect to the forward's output.
        cache: :class:`AttendCache` from :func:`attend_forward`.

    Returns:
        ``{"q": (B, heads, N, d), "k": (B, heads, M, d), "v": (B, heads, M, dv)}``, each shaped like its input.
    """
    grads = ATTENTION_VARIANTS[cache.attention].backward(dout, cache.inner)
    return {"q": grads["q"], "k": grads["k"], "v": grads["v"]}
