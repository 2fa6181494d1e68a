"""Which backward takes which cache: a ``TypeError`` that names the right one when a backward gets another's."""

from __future__ import annotations

from typing import Any

__all__ = ["matching_backward", "require_cache"]

# cache class → the backward that takes it (the blocks' own caches answer for themselves: see matching_backward)
_BACKWARD_OF = {
    "AttentionCache": "attention_backward",
    "ChunkedAttentionCache": "chunked_attention_backward",
    "LinearAttentionCache": "linear_attention_backward",
    "WindowAttentionCache": "window_attention_backward",
    "NeighborhoodAttentionCache": "neighborhood_attention_backward",
    "AttentionLayerCache": "attention_layer_backward",
    "TransformerBlockCache": "transformer_block_backward",
    "SpatialTransformerCache": "spatial_transformer_backward",
    "GegluFeedForwardCache": "geglu_ff_backward",
    "LinearCache": "linear_backward",
    "GroupNormCache": "group_norm_backward",
    "LayerNormCache": "layer_norm_backward",
    "Conv2dCache": "conv2d_backward",
}


def matching_backward(cache: Any) -> str | None:
    """The name of the backward that takes ``cache``, or ``None`` when it is no cache of this package."""
    backward = getattr(cache, "backward_name", None)
    if isinstance(backward, str):
        return backward
    return _BACKWARD_OF.get(type(cache).__name__)


def require_cache(cache: Any, expected: type, backward: str) -> None:
    """``TypeError`` unless ``cache`` is an ``expected`` made for ``backward``; the message names the right backward."""
    if isinstance(cache, expected) and matching_backward(cache) == backward:
        return
    right = matching_backward(cache)
    hint = f"; pass it to {right}" if right else ""
    raise TypeError(f"{backward} needs the cache of its own forward, got a {type(cache).__name__}{hint}")
