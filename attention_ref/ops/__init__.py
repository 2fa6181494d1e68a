"""The building blocks below attention: softmax, linear, norms, head split/merge, erf, GELU/GEGLU, 2-D convolution.

Each operation is a pair ``out, cache = thing_forward(...)`` /
``grads = thing_backward(dout, cache)``.
"""

from .conv2d import conv2d_backward, conv2d_forward
from .erf import erf, erfc
from .gelu import geglu_backward, geglu_forward, gelu_backward, gelu_forward
from .group_norm import group_norm_backward, group_norm_forward
from .heads import (
    merge_heads,
    merge_heads_backward,
    merge_heads_forward,
    split_heads,
    split_heads_backward,
    split_heads_forward,
)
from .layer_norm import layer_norm_backward, layer_norm_forward
from .linear import linear_backward, linear_forward
from .softmax import logsumexp, softmax_backward, softmax_forward

__all__ = [
    "conv2d_backward",
    "conv2d_forward",
    "erf",
    "erfc",
    "geglu_backward",
    "geglu_forward",
    "gelu_backward",
    "gelu_forward",
    "group_norm_backward",
    "group_norm_forward",
    "layer_norm_backward",
    "layer_norm_forward",
    "linear_backward",
    "linear_forward",
    "logsumexp",
    "merge_heads",
    "merge_heads_backward",
    "merge_heads_forward",
    "softmax_backward",
    "softmax_forward",
    "split_heads",
    "split_heads_backward",
    "split_heads_forward",
]
