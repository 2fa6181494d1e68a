"""attention_ref — a readable, exact NumPy reference for the attention layers of diffusion U-Nets.

Every layer is a pair ``out, cache = thing_forward(...)`` / ``grads = thing_backward(dout, cache)``.
Arrays may come from any Array API backend (NumPy, CuPy, array_api_strict, torch);
results come back in the same backend.
"""

from . import backend, gradcheck
from .attention import AttentionCache, attention_backward, attention_forward
from .ops import (
    conv2d_backward,
    conv2d_forward,
    group_norm_backward,
    group_norm_forward,
    layer_norm_backward,
    layer_norm_forward,
    linear_backward,
    linear_forward,
    logsumexp,
    merge_heads,
    merge_heads_backward,
    merge_heads_forward,
    softmax_backward,
    softmax_forward,
    split_heads,
    split_heads_backward,
    split_heads_forward,
)

# isort: split
# blocks on H×W×C maps, and weight loading (issue 3)
from . import blocks, interop
from .blocks import (
    AttentionBlockCache,
    SpatialTransformerCache,
    cross_attention_backward,
    cross_attention_forward,
    geglu_ff_backward,
    geglu_ff_forward,
    init_cross_attention,
    init_self_attention,
    init_spatial_transformer,
    self_attention_backward,
    self_attention_forward,
    spatial_transformer_backward,
    spatial_transformer_forward,
    transformer_block_backward,
    transformer_block_forward,
)
from .ops import erf, erfc, geglu_backward, geglu_forward, gelu_backward, gelu_forward

__version__ = "0.1.0"

__all__ = [
    "backend",
    "gradcheck",
    # ops
    "softmax_forward",
    "softmax_backward",
    "logsumexp",
    "linear_forward",
    "linear_backward",
    "group_norm_forward",
    "group_norm_backward",
    "layer_norm_forward",
    "layer_norm_backward",
    "split_heads",
    "merge_heads",
    "split_heads_forward",
    "split_heads_backward",
    "merge_heads_forward",
    "merge_heads_backward",
    "conv2d_forward",
    "conv2d_backward",
    # attention
    "AttentionCache",
    "attention_forward",
    "attention_backward",
    # ops: erf and GELU (issue 3)
    "erf",
    "erfc",
    "gelu_forward",
    "gelu_backward",
    "geglu_forward",
    "geglu_backward",
    # blocks (issue 3)
    "blocks",
    "interop",
    "AttentionBlockCache",
    "SpatialTransformerCache",
    "init_self_attention",
    "self_attention_forward",
    "self_attention_backward",
    "init_cross_attention",
    "cross_attention_forward",
    "cross_attention_backward",
    "geglu_ff_forward",
    "geglu_ff_backward",
    "transformer_block_forward",
    "transformer_block_backward",
    "init_spatial_transformer",
    "spatial_transformer_forward",
    "spatial_transformer_backward",
]

# efficient attention variants (issue [3/6])
from .attention import (
    ChunkedAttentionCache,
    LinearAttentionCache,
    NeighborhoodAttentionCache,
    WindowAttentionCache,
    chunked_attention_backward,
    chunked_attention_forward,
    linear_attention_backward,
    linear_attention_forward,
    neighborhood_attention_backward,
    neighborhood_attention_forward,
    neighborhood_mask,
    window_attention_backward,
    window_attention_forward,
    window_mask,
)

__all__ += [
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
]
