"""attention_ref — a readable, exact NumPy reference for the attention layers of diffusion models.

Every layer is a pair ``out, cache = thing_forward(...)`` / ``grads = thing_backward(dout, cache)``.
Arrays may come from any Array API backend (NumPy, CuPy, array_api_strict, torch);
results come back in the same backend.

The top level holds what a learner steps through: attention and its blocks, as forward/backward pairs with
their ``init_*``, and the softmax and head split/merge they are built from. Everything else lives in its
subpackage (docs/api.md lists where):

* :mod:`attention_ref.ops` — softmax, linear, the norms, conv, GELU/GEGLU/SiLU, RoPE, patchify, …;
* :mod:`attention_ref.attention` — exact attention and its variants (tiled, linear, window, neighborhood), masks;
* :mod:`attention_ref.blocks` — the attention layer, the blocks on maps, joint attention, the ResBlock, caches;
* :mod:`attention_ref.interop` — weights from diffusers, CompVis and OpenAI layouts; the trace of a model;
* :mod:`attention_ref.testing` — the test oracle (imported on demand: ``import attention_ref.testing``).
"""

from . import attention, backend, gradcheck, ops
from .attention import (
    attention_backward,
    attention_forward,
    causal_mask,
    chunked_attention_backward,
    chunked_attention_forward,
)
from .ops import merge_heads, softmax_backward, softmax_forward, split_heads

# isort: split
# the blocks are built from the ops and attention above; interop loads their weights
from . import blocks, interop
from .blocks import (
    attention_layer_backward,
    attention_layer_forward,
    cross_attention_backward,
    cross_attention_forward,
    init_attention_layer,
    init_cross_attention,
    init_joint_attention,
    init_self_attention,
    init_spatial_transformer,
    joint_attention_backward,
    joint_attention_forward,
    self_attention_backward,
    self_attention_forward,
    spatial_transformer_backward,
    spatial_transformer_forward,
    transformer_block_backward,
    transformer_block_forward,
)

__version__ = "0.1.0"

__all__ = [
    # the subpackages
    "ops",
    "attention",
    "blocks",
    "interop",
    "backend",
    "gradcheck",
    # attention: exact, and tiled (the same result in O(N) memory)
    "attention_forward", "attention_backward", "causal_mask",
    "chunked_attention_forward", "chunked_attention_backward",
    # what attention is built from
    "softmax_forward", "softmax_backward",
    "split_heads", "merge_heads",
    # the layers and blocks, one a line: init, forward, backward
    # the attention layer on (B, N, C) tokens (diffusers' Attention)
    "init_attention_layer", "attention_layer_forward", "attention_layer_backward",
    # blocks on (B, H, W, C) maps
    "init_self_attention", "self_attention_forward", "self_attention_backward",
    "init_cross_attention", "cross_attention_forward", "cross_attention_backward",
    "transformer_block_forward", "transformer_block_backward",
    "init_spatial_transformer", "spatial_transformer_forward", "spatial_transformer_backward",
    # the diffusion transformers' joint attention (SD3, Flux)
    "init_joint_attention", "joint_attention_forward", "joint_attention_backward",
]  # fmt: skip
