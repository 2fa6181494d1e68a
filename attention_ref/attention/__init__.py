"""Scaled dot-product attention and its variants."""

# efficient variants: tiled exact, linear, window (Swin), neighborhood (NATTEN)
from .chunked import DEFAULT_BLOCK_SIZE, ChunkedAttentionCache, chunked_attention_backward, chunked_attention_forward
from .exact import AttentionCache, attention_backward, attention_forward
from .linear_attention import LinearAttentionCache, linear_attention_backward, linear_attention_forward
from .masks import causal_mask, neighborhood_mask, window_mask
from .neighborhood import NeighborhoodAttentionCache, neighborhood_attention_backward, neighborhood_attention_forward
from .window import WindowAttentionCache, window_attention_backward, window_attention_forward

__all__ = [
    "AttentionCache",
    "attention_backward",
    "attention_forward",
    "DEFAULT_BLOCK_SIZE",
    "ChunkedAttentionCache",
    "chunked_attention_forward",
    "chunked_attention_backward",
    "LinearAttentionCache",
    "linear_attention_forward",
    "linear_attention_backward",
    "WindowAttentionCache",
    "window_attention_forward",
    "window_attention_backward",
    "window_mask",
    "NeighborhoodAttentionCache",
    "neighborhood_attention_forward",
    "neighborhood_attention_backward",
    "neighborhood_mask",
    "causal_mask",
]
