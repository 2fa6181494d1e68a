"""The building blocks below attention: softmax, linear, norms (group, layer, RMS), head split/merge, erf,
GELU/GEGLU, SiLU, 2-D convolution, nearest up-sampling and average pooling, the sinusoidal timestep embedding,
and the diffusion transformers' own: rotary position embedding and patchify/unpatchify.

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
from .patchify import patchify_backward, patchify_forward, unpatchify_backward, unpatchify_forward
from .resample import avg_pool_backward, avg_pool_forward, upsample_nearest_backward, upsample_nearest_forward
from .rms_norm import rms_norm_backward, rms_norm_forward
from .rope import rope_angles, rope_backward, rope_forward
from .silu import silu_backward, silu_forward
from .softmax import logsumexp, softmax_backward, softmax_forward
from .timestep_embedding import timestep_embedding_backward, timestep_embedding_forward

__all__ = [
    "avg_pool_backward",
    "avg_pool_forward",
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
    "patchify_backward",
    "patchify_forward",
    "rms_norm_backward",
    "rms_norm_forward",
    "rope_angles",
    "rope_backward",
    "rope_forward",
    "silu_backward",
    "silu_forward",
    "softmax_backward",
    "softmax_forward",
    "split_heads",
    "split_heads_backward",
    "split_heads_forward",
    "timestep_embedding_backward",
    "timestep_embedding_forward",
    "unpatchify_backward",
    "unpatchify_forward",
    "upsample_nearest_backward",
    "upsample_nearest_forward",
]
