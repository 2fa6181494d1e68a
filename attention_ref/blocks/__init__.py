"""Attention layers and blocks: the attention layer on ``(B, N, C)`` token sequences (diffusers'
``Attention``), and built on it, self-attention, cross-attention and Stable Diffusion's spatial
transformer on channels-last ``(B, H, W, C)`` maps; the diffusion transformers' joint attention (SD3, Flux)
— each a forward/backward pair.
"""

from .attend import ATTENTION_VARIANTS, AttentionVariant, VariantCache
from .attention_block import AttentionBlockCache
from .attention_layer import (
    AttentionLayerCache,
    attention_layer_backward,
    attention_layer_forward,
    init_attention_layer,
)
from .cross_attention import cross_attention_backward, cross_attention_forward, init_cross_attention
from .feed_forward import GegluFeedForwardCache, geglu_ff_backward, geglu_ff_forward
from .joint_attention import (
    JointAttentionCache,
    init_joint_attention,
    joint_attention_backward,
    joint_attention_forward,
)
from .self_attention import init_self_attention, self_attention_backward, self_attention_forward
from .spatial_transformer import (
    SpatialTransformerCache,
    init_spatial_transformer,
    spatial_transformer_backward,
    spatial_transformer_forward,
)
from .transformer_block import TransformerBlockCache, transformer_block_backward, transformer_block_forward

__all__ = [
    "ATTENTION_VARIANTS",
    "AttentionBlockCache",
    "AttentionLayerCache",
    "AttentionVariant",
    "GegluFeedForwardCache",
    "JointAttentionCache",
    "SpatialTransformerCache",
    "TransformerBlockCache",
    "VariantCache",
    "attention_layer_backward",
    "attention_layer_forward",
    "cross_attention_backward",
    "cross_attention_forward",
    "geglu_ff_backward",
    "geglu_ff_forward",
    "joint_attention_backward",
    "joint_attention_forward",
    "init_attention_layer",
    "init_cross_attention",
    "init_joint_attention",
    "init_self_attention",
    "init_spatial_transformer",
    "self_attention_backward",
    "self_attention_forward",
    "spatial_transformer_backward",
    "spatial_transformer_forward",
    "transformer_block_backward",
    "transformer_block_forward",
]
