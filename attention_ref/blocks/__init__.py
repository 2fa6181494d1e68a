"""Attention layers and blocks: the attention layer on ``(B, N, C)`` token sequences (diffusers'
``Attention``), and built on it, self-attention, cross-attention and Stable Diffusion's spatial
transformer on channels-last ``(B, H, W, C)`` maps; the diffusion transformers' joint attention (SD3, Flux);
the U-Net's residual block with its timestep term — each a forward/backward pair, with its ``init_*``
(:mod:`.inits`). The checks of their inputs are in :mod:`.layer_checks` and :mod:`.joint_checks`.
"""

from .attend import ATTENTION_VARIANTS, AttentionVariant, VariantCache
from .attention_block import AttentionBlockCache
from .attention_layer import AttentionLayerCache, attention_layer_backward, attention_layer_forward
from .cross_attention import cross_attention_backward, cross_attention_forward
from .feed_forward import GegluFeedForwardCache, geglu_ff_backward, geglu_ff_forward
from .inits import (
    init_attention_layer,
    init_cross_attention,
    init_joint_attention,
    init_res_block,
    init_self_attention,
    init_spatial_transformer,
)
from .joint_attention import JointAttentionCache, joint_attention_backward, joint_attention_forward
from .res_block import ResBlockCache, res_block_backward, res_block_forward
from .self_attention import self_attention_backward, self_attention_forward
from .spatial_transformer import SpatialTransformerCache, spatial_transformer_backward, spatial_transformer_forward
from .transformer_block import TransformerBlockCache, transformer_block_backward, transformer_block_forward

__all__ = [
    # the attention layer on (B, N, C) tokens, and the attentions it can call
    "AttentionLayerCache",
    "init_attention_layer",
    "attention_layer_forward",
    "attention_layer_backward",
    "ATTENTION_VARIANTS",
    "AttentionVariant",
    "VariantCache",
    # blocks on (B, H, W, C) maps
    "AttentionBlockCache",
    "init_self_attention",
    "self_attention_forward",
    "self_attention_backward",
    "init_cross_attention",
    "cross_attention_forward",
    "cross_attention_backward",
    "GegluFeedForwardCache",
    "geglu_ff_forward",
    "geglu_ff_backward",
    "TransformerBlockCache",
    "transformer_block_forward",
    "transformer_block_backward",
    "SpatialTransformerCache",
    "init_spatial_transformer",
    "spatial_transformer_forward",
    "spatial_transformer_backward",
    # the diffusion transformers' joint attention (SD3, Flux)
    "JointAttentionCache",
    "init_joint_attention",
    "joint_attention_forward",
    "joint_attention_backward",
    # the U-Net's residual block
    "ResBlockCache",
    "init_res_block",
    "res_block_forward",
    "res_block_backward",
]
