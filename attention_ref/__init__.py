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
]
