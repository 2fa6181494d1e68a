"""The variants of per-head attention a layer can run instead of exact attention.

The attention layer calls exact attention (:func:`attention_ref.attention_forward`) itself;
``attention="chunked" | "linear" | "window" | "neighborhood"`` looks the variant up here, in
:data:`ATTENTION_VARIANTS`, with its options given as ``attention_options``:

* ``"chunked"`` — :func:`attention_ref.chunked_attention_forward` (FlashAttention-style tiles, the same
  result in O(N) memory); option ``block_size``; any mask, sliced per tile.
* ``"linear"`` — :func:`attention_ref.attention.linear_attention_forward`; options ``kind`` (``"elu"`` or
  ``"efficient"``), ``eps``; only a key mask (shape ``(..., 1, M)``, e.g. a context mask), which leaves
  the masked keys out of its sums; no ``scale``.
* ``"window"`` — :func:`attention_ref.attention.window_attention_forward`; options ``window`` (required), ``shift``;
  self-attention on a grid only, no mask (its windows are its mask).
* ``"neighborhood"`` — :func:`attention_ref.attention.neighborhood_attention_forward`; option ``kernel`` (required);
  self-attention on a grid only, no mask.

Window and neighborhood attention work on pixels ``(..., H, W, d)``: the ``N = H·W`` tokens
(token ``row·W + col``) are reshaped to the map here and back afterwards, so they need the
tokens' ``grid = (H, W)``, and keys that are those same pixels (self-attention).

None of the variants stores the dense ``(B, heads, N, M)`` weight matrix.
:attr:`VariantCache.weights_note` says where its weights are instead, and
:meth:`VariantCache.weight_rows` gives any band of dense rows for every variant that has
weights (all but linear), at ``O(rows · M)`` memory, so a plot of one query pixel never
builds ``N × M``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ..attention import (
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
from ..backend import Array, namespace

__all__ = [
    "ATTENTION_VARIANTS",
    "AttentionVariant",
    "VariantCache",
    "check_attention_choice",
    "variant_backward",
    "variant_forward",
]


@dataclass(frozen=True)
class AttentionVariant:
    """One kind of per-head attention a layer can run instead of exact attention.

    forward: ``(q, k, v, *, mask, scale, **options) -> (out, cache)`` on ``(B, heads, N, d)`` tokens, or, with
        ``on_grid``, ``(q, k, v, *, scale, **options)`` on the ``(B, heads, H, W, d)`` map.
    backward: ``(dout, cache) -> {"q", "k", "v", ...}``, on what its forward took.
    options: ``{option name: required}``.
    weights_note: where this variant's weights are, since it stores no dense matrix.
    has_rows: its cache can give dense weight rows (``cache.weight_rows(start, stop)``).
    on_grid: it runs on the pixel map: it needs the tokens' ``grid``, keys that are those same pixels
        (self-attention), and no mask (its windows or neighborhoods are its mask).
    """

    forward: Callable[..., tuple[Array, Any]]
    backward: Callable[[Array, Any], Mapping[str, Array]]
    options: Mapping[str, bool]
    weights_note: str
    has_rows: bool = True
    on_grid: bool = False


def _linear_forward(
    q: Array, k: Array, v: Array, *, mask: Array | None, scale: float | None, kind: str = "elu", eps: float = 1e-6
) -> tuple[Array, Any]:
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


def _as_map(xp: ModuleType, t: Array, grid: tuple[int, int]) -> Array:
    """``(..., H·W, c) → (..., H, W, c)``: token ``row·W + col`` is pixel ``(row, col)``."""
    return xp.reshape(t, (*t.shape[:-2], grid[0], grid[1], t.shape[-1]))


def _as_tokens(xp: ModuleType, t: Array) -> Array:
    """``(..., H, W, c) → (..., H·W, c)``, the inverse of :func:`_as_map`."""
    return xp.reshape(t, (*t.shape[:-3], t.shape[-3] * t.shape[-2], t.shape[-1]))


ATTENTION_VARIANTS: dict[str, AttentionVariant] = {
    "chunked": AttentionVariant(
        chunked_attention_forward,  # the mask stays in its broadcast shape and is sliced per tile
        chunked_attention_backward,
        options={"block_size": False},
        weights_note=(
            "chunked attention never stores the (N, M) weight matrix (that is how it stays O(N) in memory); "
            "cache.weight_rows(start, stop) recomputes rows of it exactly"
        ),
    ),
    "linear": AttentionVariant(
        _linear_forward,
        linear_attention_backward,
        options={"kind": False, "eps": False},
        weights_note=(
            "linear attention has no softmax weight matrix: out = φ(Q)(φ(K)ᵀV)/δ is computed without one; "
            "cache.implied_weights() builds the (B, heads, N, M) matrix A with out = A V, for inspection"
        ),
        has_rows=False,
    ),
    "window": AttentionVariant(
        window_attention_forward,
        window_attention_backward,
        options={"window": True, "shift": False},
        weights_note=(
            "window attention stores weights only inside each window (VariantCache.inner.weights, "
            "(B, heads, H/w, W/w, w², w²) on the map rolled by −shift); cache.weight_rows(start, stop) "
            "spreads rows of them over the map"
        ),
        on_grid=True,
    ),
    "neighborhood": AttentionVariant(
        neighborhood_attention_forward,
        neighborhood_attention_backward,
        options={"kernel": True},
        weights_note=(
            "neighborhood attention stores weights only for each pixel's neighbors (VariantCache.inner.weights, "
            "(B, heads, H, W, k²)); cache.weight_rows(start, stop) spreads rows of them over the map"
        ),
        on_grid=True,
    ),
}


def check_attention_choice(
    attention: Any,
    options: Mapping[str, Any] | None,
    *,
    self_attention: bool,
    keys: int,
    grid: tuple[int, int] | None,
    mask: Array | None,
    where: str,
) -> dict[str, Any]:
    """The options of ``attention`` (``"exact"`` or a variant) as a dict, after checking that it can run here.

    ``ValueError`` (prefixed by ``where``) for an unknown attention, unknown or missing options, and for
    window or neighborhood attention on context tokens (``keys`` of them), without a ``grid``, or with a mask.
    """
    if attention != "exact" and (not isinstance(attention, str) or attention not in ATTENTION_VARIANTS):
        available = sorted(["exact", *ATTENTION_VARIANTS])
        raise ValueError(f"{where}: unknown attention {attention!r}; available: {available}")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TypeError(
            f"{where}: attention_options must be a mapping of option names to values, got {type(options).__name__}"
        )
    accepted = {} if attention == "exact" else ATTENTION_VARIANTS[attention].options
    unknown = sorted(set(options) - set(accepted))
    missing = sorted(name for name, required in accepted.items() if required and name not in options)
    if unknown or missing:
        takes = ", ".join(f"{n} (required)" if r else n for n, r in accepted.items()) or "no options"
        problems = [f"unknown {unknown}"] if unknown else []
        problems += [f"missing {missing}"] if missing else []
        raise ValueError(f"{where}: {attention} attention takes {takes}; got {', '.join(problems)}")
    if attention != "exact" and ATTENTION_VARIANTS[attention].on_grid:
        what = "windows" if attention == "window" else "neighborhoods"
        if not self_attention:
            raise ValueError(
                f"{where}: {attention} attention needs keys on the pixel grid, but these keys are {keys} context "
                "tokens (cross-attention), which have no place on the map; use 'exact', 'chunked' or 'linear'"
            )
        if grid is None:
            raise ValueError(
                f"{where}: {attention} attention needs the tokens' place on the map: pass grid=(H, W) (token n is "
                "pixel (n // W, n % W)); the map blocks pass it themselves"
            )
        if mask is not None:
            raise ValueError(
                f"{where}: {attention} attention takes no mask: its {what} are its mask (it equals exact attention "
                f"under attention_ref.{attention}_mask); for another pattern use attention='exact' or 'chunked'"
            )
    return dict(options)


@dataclass(frozen=True)
class VariantCache:
    """Which variant ran, and that variant's own cache (``inner``)."""

    attention: str  # a key of ATTENTION_VARIANTS
    inner: Any  # the variant's cache, e.g. a ChunkedAttentionCache
    rows: int  # N, the number of query tokens
    grid: tuple[int, int] | None = None  # (H, W) of the map a variant on the grid ran on

    @property
    def weights_note(self) -> str:
        """One sentence: where this variant's weights are, and how to get dense rows of them."""
        return ATTENTION_VARIANTS[self.attention].weights_note

    def weight_rows(self, start: int, stop: int) -> Array:
        """Rows ``start:stop`` of the dense weights, ``(B, heads, stop − start, M)``.

        Chunked: recomputed exactly from the saved log-sum-exp. Window, neighborhood: their local
        weights spread over the map (0 outside the window/neighborhood), equal to exact attention's
        weights under the variant's mask. Memory ``O(rows · M)``.
        Linear: ``ValueError`` — it has no weight matrix (see :meth:`implied_weights`).
        """
        if not ATTENTION_VARIANTS[self.attention].has_rows:
            raise ValueError(f"no weight rows: {self.weights_note}")
        start, stop = check_row_range(start, stop, self.rows)
        return self.inner.weight_rows(start, stop)

    def implied_weights(self) -> Array:
        """Linear attention only: the ``(B, heads, N, M)`` matrix ``A`` with ``out = A V`` (O(N·M) memory)."""
        implied = getattr(self.inner, "implied_weights", None)
        if implied is None:
            raise ValueError(f"{self.attention} attention is a softmax attention with real weights; use weight_rows")
        return implied()


def variant_forward(
    q: Array,
    k: Array,
    v: Array,
    *,
    attention: str,
    options: Mapping[str, Any],
    grid: tuple[int, int] | None,
    mask: Array | None,
    scale: float | None,
) -> tuple[Array, VariantCache]:
    """Per-head attention by the variant ``attention``.

    Inputs:
        q: ``(B, heads, N, d)``; k: ``(B, heads, M, d)``; v: ``(B, heads, M, dv)``.
        attention: a key of :data:`ATTENTION_VARIANTS`; options: its options, already checked by
            :func:`check_attention_choice`.
        grid: ``(H, W)`` with ``H·W = N`` (token ``row·W + col``), or ``None`` when the tokens have no map
            (window and neighborhood attention run on it: the checks made sure the keys are those pixels).
        mask: boolean, broadcastable to ``(B, heads, N, M)``, True = may attend.
        scale: multiplies ``q kᵀ``; default ``1/sqrt(d)``; must stay ``None`` for linear attention.

    Returns:
        out: ``(B, heads, N, dv)``; cache: :class:`VariantCache`.
    """
    variant = ATTENTION_VARIANTS[attention]
    if not variant.on_grid:
        out, inner = variant.forward(q, k, v, mask=mask, scale=scale, **options)
        return out, VariantCache(attention=attention, inner=inner, rows=q.shape[-2])
    # on the map: token row·W + col is pixel (row, col)   (B, heads, H, W, d), and back   (B, heads, N, dv)
    xp = namespace(q, k, v)
    q, k, v = _as_map(xp, q, grid), _as_map(xp, k, grid), _as_map(xp, v, grid)
    out, inner = variant.forward(q, k, v, scale=scale, **options)
    return _as_tokens(xp, out), VariantCache(attention=attention, inner=inner, rows=grid[0] * grid[1], grid=grid)


def variant_backward(dout: Array, cache: VariantCache) -> dict[str, Array]:
    """Gradients of :func:`variant_forward`: ``{"q", "k", "v"}``, each shaped like its input."""
    variant = ATTENTION_VARIANTS[cache.attention]
    if not variant.on_grid:
        grads = variant.backward(dout, cache.inner)
        return {"q": grads["q"], "k": grads["k"], "v": grads["v"]}
    xp = namespace(dout)
    grads = variant.backward(_as_map(xp, dout, cache.grid), cache.inner)  # on the map (B, heads, H, W, ·)
    return {name: _as_tokens(xp, grads[name]) for name in ("q", "k", "v")}
