"""What self- and cross-attention on a ``(B, H, W, C)`` map share: the map check, the cache, forward and backward.

A map block is the attention layer (:mod:`attention_ref.blocks.attention_layer`) on the map's
pixels as tokens: pixel ``(row, col)`` is token ``n = row·W + col`` (row-major), so
``(B, H, W, C) → (B, H·W, C)`` is a reshape, and so is the way back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._checks import array_namespace, require_array, require_dout, require_finite, require_floating
from ..backend import Array, namespace
from .attention_layer import AttentionLayerCache, attention_layer_backward, attention_layer_forward
from .layer_checks import check_context_shape

__all__ = ["AttentionBlockCache", "check_map", "map_block_backward", "map_block_forward"]


@dataclass(frozen=True)
class AttentionBlockCache:
    """What a map block's backward needs: the attention layer's cache and the map's shape.

    ``weights`` gives the attention weights for plotting, ``(B, heads, H·W, M)``.
    """

    layer: AttentionLayerCache  # the attention layer on the (B, H·W, C) tokens
    x_shape: tuple[int, int, int, int]  # (B, H, W, C)

    @property
    def backward_names(self) -> tuple[str, ...]:
        """The backward that takes this cache: self- or cross-attention's, by the forward that made it."""
        return ("self_attention_backward",) if self.layer.context_shape is None else ("cross_attention_backward",)

    @property
    def weights(self) -> Array | None:
        """``(B, heads, H·W, M)`` (``M = H·W`` for self-attention); row ``row·W + col`` is that query pixel's.

        Rows sum to 1 (to 0 when every key is masked). ``None`` unless exact attention ran:
        :attr:`weights_note` says why and where the weights are instead; :meth:`weight_rows`
        works for every attention that has weights.
        """
        return self.layer.weights

    @property
    def weights_note(self) -> str:
        """What :attr:`weights` holds for the attention that ran, and how to get weights otherwise."""
        return self.layer.weights_note

    def weight_rows(self, start: int, stop: int) -> Array:
        """Rows ``start:stop`` (query pixels ``row·W + col``) of the dense weights, ``(B, heads, stop − start, M)``.

        See :meth:`AttentionLayerCache.weight_rows`; ``weight_rows(0, H·W)`` is the whole matrix.
        """
        return self.layer.weight_rows(start, stop)

    def implied_weights(self) -> Array:
        """Linear attention only: the ``(B, heads, H·W, M)`` matrix ``A`` with ``O = A V``, for inspection."""
        return self.layer.implied_weights()


def check_map(where: str, x: Array, context: Array | None = None) -> tuple[int, int, int, int]:
    """``(B, H, W, C)`` of the map ``x``; ``ValueError`` naming both ways out for anything else.

    A 3-D ``x`` is refused rather than guessed at: it may be one ``(H, W, C)`` map or a batch of
    ``(B, N, C)`` token sequences. ``context``, when given, must be ``(B, M, D)``.
    """
    require_array(f"{where}: x", x)
    xp = array_namespace(x=x, context=context)
    require_floating(xp, "x", x)
    if x.ndim != 4:
        call = "attention_layer_forward(x, params, heads=..." + (", context=context)" if context is not None else ")")
        raise ValueError(
            f"{where}: x of shape {tuple(x.shape)} is not a (B, H, W, C) map; for one (H, W, C) map pass x[None], "
            f"for (B, N, C) token sequences call {call}"
        )
    if context is not None:
        check_context_shape(context, tuple(x.shape), where)
    # an infinite pixel has no output (its group norm is inf − inf): refused, as infinite q, k, v are
    require_finite(xp, "x", x, where)
    if context is not None:
        require_finite(xp, "context", context, where)
    return tuple(x.shape)


def map_block_forward(
    where: str, x: Array, context: Array | None, params: Any, **layer_options: Any
) -> tuple[Array, AttentionBlockCache]:
    """The attention layer on the pixels of the map ``x`` ``(B, H, W, C)`` as tokens: ``y`` ``(B, H, W, C_out)``.

    ``layer_options`` go to :func:`attention_ref.attention_layer_forward` as they are; the map's ``grid``
    places the tokens on it for window and neighborhood attention.
    """
    B, H, W, C = check_map(where, x, context)
    xp = namespace(x)
    # pixel (row, col) is token row·W + col   (B, N, C)
    h = xp.reshape(x, (B, H * W, C))
    # the attention layer on the tokens (to the context, for cross-attention)   (B, N, C_out)
    y, layer = attention_layer_forward(h, params, context=context, grid=(H, W), where=where, **layer_options)
    # back on the map   (B, H, W, C_out)
    y = xp.reshape(y, (B, H, W, y.shape[-1]))
    return y, AttentionBlockCache(layer=layer, x_shape=(B, H, W, C))


def map_block_backward(dy: Array, cache: AttentionBlockCache) -> dict[str, Array]:
    """The attention layer's backward on the map: ``dy`` ``(B, H, W, C_out)`` → ``{"x": (B, H, W, C), ...}``."""
    B, H, W, _ = cache.x_shape
    C_out = cache.layer.out.W.shape[1]
    require_dout(dy, (B, H, W, C_out), cache.layer.q.x.dtype, name="dy")
    xp = namespace(dy)
    grads = attention_layer_backward(xp.reshape(dy, (B, H * W, C_out)), cache.layer)  # tokens (B, N, C_out)
    grads["x"] = xp.reshape(grads.pop("h"), cache.x_shape)  # back on the map (B, H, W, C)
    return grads
