r"""Stable Diffusion's spatial transformer (CompVis ``SpatialTransformer``, diffusers ``Transformer2DModel``).

On a map ``x`` of ``H×W`` pixels with ``C`` channels and a context of ``M`` tokens:

.. math::
    h &= \operatorname{GroupNorm}(x) \quad(\epsilon = 10^{-6}) \\
    t &= h W_{in} + b_{in} \quad (B, H·W, \text{inner}), \text{ pixel } (r, c) \text{ being token } r·W + c \\
    t &\leftarrow \operatorname{TransformerBlock}_i(t, \text{context}) \quad i = 0 \dots \text{depth}-1 \\
    y &= x + t W_{out} + b_{out}

``proj_in`` / ``proj_out`` are 1×1 convolutions in SD 1.x and linear layers in
SD 2.x/XL (``use_linear_projection``); on a channels-last map both are the same
matrix product, so the reference stores both as ``(in, out)`` matrices. Each
transformer block is :func:`attention_ref.blocks.transformer_block_forward`:
LayerNorm → self-attention → +, LayerNorm → cross-attention → +, LayerNorm →
GEGLU feed-forward → +. Stable Diffusion 1.x/2.x use ``depth = 1``.

Backward: the reverse chain of the pieces' backward passes; the context gets the
sum of the cross-attention gradients of every block, and ``x`` gets ``dy``
through the residual plus the group norm's backward of ``dh``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .._checks import check_cache, check_eps, check_positive_int, require_divisible, require_dout
from ..backend import Array, namespace
from ..ops.group_norm import GroupNormCache, group_norm_backward, group_norm_forward
from ..ops.linear import LinearCache, linear_backward, linear_forward
from .attention_block import check_map
from .params import add_grads, check_param_dtypes, check_params, prefixed, sub_params
from .transformer_block import TransformerBlockCache, transformer_block_backward, transformer_block_forward

__all__ = [
    "SpatialTransformerCache",
    "spatial_transformer_backward",
    "spatial_transformer_forward",
]

_OUTER_REQUIRED = ("norm.weight", "norm.bias", "proj_in.weight", "proj_out.weight")
_OUTER_OPTIONAL = ("proj_in.bias", "proj_out.bias")
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


@dataclass(frozen=True)
class SpatialTransformerCache:
    """``blocks[i].attn1.weights`` ``(B, heads, H·W, H·W)`` and ``blocks[i].attn2.weights`` ``(B, heads, H·W, M)``.

    ``blocks[i].attn1.weights`` is ``None`` unless the self-attention was exact (see its ``weights_note``).
    """

    backward_names: ClassVar[tuple[str, ...]] = ("spatial_transformer_backward",)  # the backward that takes it

    norm: GroupNormCache
    proj_in: LinearCache
    blocks: tuple[TransformerBlockCache, ...]
    proj_out: LinearCache
    x_shape: tuple[int, int, int, int]  # (B, H, W, C)
    context_shape: tuple[int, int, int]  # (B, M, D)


def _depth(params: Mapping[str, Array]) -> int:
    """The number of transformer blocks in ``params``; ``ValueError`` for unknown keys or gaps."""
    indices = set()
    unknown = []
    for key in params:
        m = _BLOCK_KEY.match(key)
        if m:
            indices.add(int(m.group(1)))
        elif key not in _OUTER_REQUIRED + _OUTER_OPTIONAL:
            unknown.append(key)
    missing = [k for k in _OUTER_REQUIRED if k not in params]
    if unknown or missing:
        raise ValueError(f"spatial transformer params: missing {missing}, unknown {sorted(unknown)}")
    if not indices or indices != set(range(len(indices))):
        raise ValueError(f"spatial transformer params: blocks must be numbered 0, 1, …; found {sorted(indices)}")
    return len(indices)


def _check_transformer_inputs(x: Array, context: Array, params: Mapping[str, Array], groups: int) -> int:
    """The number of transformer blocks; ``ValueError`` / ``TypeError`` for inputs that do not fit."""
    if context is None:
        raise ValueError("spatial transformer: a context is required")
    check_params(params, "spatial transformer")
    B, H, W, C = check_map("spatial transformer", x, context)
    depth = _depth(params)
    check_param_dtypes(x, params, "spatial transformer")
    groups = check_positive_int("groups", groups, "spatial transformer")
    require_divisible(C, groups, "channels", "groups", where="spatial transformer")
    if B == 0 or H * W == 0 or context.shape[1] == 0:
        raise ValueError(
            f"spatial transformer: x of shape {tuple(x.shape)} and context of shape {tuple(context.shape)}: needs at "
            "least one sample, one query token and one key token (B, N, M ≥ 1)"
        )
    C_out = params["proj_out.weight"].shape[-1]
    if C_out != C:
        raise ValueError(f"spatial transformer: proj_out returns {C_out} channels, the residual needs {C}")
    return depth


def spatial_transformer_forward(
    x: Array,
    context: Array,
    params: Mapping[str, Array],
    *,
    heads: int,
    groups: int = 32,
    eps: float = 1e-6,
    norm_eps: float = 1e-5,
    scale: float | None = None,
    context_mask: Array | None = None,
    self_attention: str = "exact",
    self_attention_options: Mapping[str, Any] | None = None,
) -> tuple[Array, SpatialTransformerCache]:
    """The Stable Diffusion spatial transformer on a channels-last map.

    Inputs:
        x: ``(B, H, W, C)``, real floating (one ``(H, W, C)`` map is ``x[None]``).
        context: ``(B, M, D)``.
        params: as returned by :func:`init_spatial_transformer` (x's dtype and backend).
        heads: attention heads of every block.
        groups, eps: the outer group norm (Stable Diffusion: 32 groups, eps 1e-6).
        norm_eps: the blocks' layer norms (diffusers: 1e-5).
        scale: attention scale, default ``1/sqrt(d)`` (with ``self_attention="linear"``, of the
            cross-attentions only: linear attention has no logits to scale).
        context_mask: boolean ``(B, M)`` or ``(M,)``, True = real token (diffusers' ``encoder_attention_mask``).
        self_attention, self_attention_options: the attention of every block's self-attention ``attn1``
            (the ``(H·W)²`` one) and its options, e.g. ``"chunked"`` or ``"window", {"window": 8}``; as
            ``attention`` / ``attention_options`` of :func:`attention_ref.self_attention_forward`. The
            cross-attention ``attn2`` (``H·W × M``) stays exact.

    Returns:
        y: ``(B, H, W, C)``.
        cache: :class:`SpatialTransformerCache`.
    """
    depth = _check_transformer_inputs(x, context, params, groups)
    eps = check_eps("eps", eps, "spatial transformer")
    norm_eps = check_eps("norm_eps", norm_eps, "spatial transformer")
    xp = namespace(x)
    B, H, W, C = x.shape
    # h = GroupNorm(x)   (B, H, W, C)
    h, norm_cache = group_norm_forward(x, params["norm.weight"], params["norm.bias"], groups=groups, eps=eps)
    # t = h W_in + b_in on the tokens, pixel (row, col) being token row·W + col   (B, N, inner)
    t, in_cache = linear_forward(xp.reshape(h, (B, H * W, C)), params["proj_in.weight"], params.get("proj_in.bias"))
    block_caches = []
    for i in range(depth):
        # t ← TransformerBlock_i(t, context)   (B, N, inner)
        t, c = transformer_block_forward(
            t,
            context,
            sub_params(params, f"blocks.{i}."),
            heads=heads,
            norm_eps=norm_eps,
            scale=scale,
            context_mask=context_mask,
            grid=(H, W),
            self_attention=self_attention,
            self_attention_options=self_attention_options,
            where=f"spatial transformer blocks.{i}",
        )
        block_caches.append(c)
    # p = t W_out + b_out   (B, N, C), then back on the map (B, H, W, C)
    p, out_cache = linear_forward(t, params["proj_out.weight"], params.get("proj_out.bias"))
    p = xp.reshape(p, (B, H, W, C))
    # y = x + p
    y = x + p
    cache = SpatialTransformerCache(
        norm=norm_cache,
        proj_in=in_cache,
        blocks=tuple(block_caches),
        proj_out=out_cache,
        x_shape=tuple(x.shape),
        context_shape=tuple(context.shape),
    )
    return y, cache


def spatial_transformer_backward(dy: Array, cache: SpatialTransformerCache) -> dict[str, Array]:
    """Gradients of :func:`spatial_transformer_forward`.

    Inputs:
        dy: ``(B, H, W, C)``, the gradient of the loss with respect to ``y``.
        cache: :class:`SpatialTransformerCache` from :func:`spatial_transformer_forward`.

    Returns:
        ``{"x": (B, H, W, C), "context": (B, M, D)}`` plus one entry per params key, shaped like it.
    """
    check_cache(cache, SpatialTransformerCache, "spatial_transformer_backward")
    require_dout(dy, cache.x_shape, cache.proj_in.x.dtype, name="dy")
    xp = namespace(dy)
    grads: dict[str, Array] = {}
    B, H, W, C = dy.shape
    # p = t W_out + b_out
    dt = add_grads(grads, "proj_out", linear_backward(xp.reshape(dy, (B, H * W, C)), cache.proj_out))  # (B, N, inner)
    dcontext = None
    for i in reversed(range(len(cache.blocks))):
        gb = transformer_block_backward(dt, cache.blocks[i])
        dt = gb.pop("h")
        dc = gb.pop("context")
        # the context feeds every block: dcontext = Σ_i dcontext_i
        dcontext = dc if dcontext is None else dcontext + dc
        grads.update(prefixed(gb, f"blocks.{i}."))
    # t = h W_in + b_in
    dh = add_grads(grads, "proj_in", linear_backward(dt, cache.proj_in))  # (B, N, C)
    dx = add_grads(grads, "norm", group_norm_backward(xp.reshape(dh, (B, H, W, C)), cache.norm))
    # y = x + p   ⇒   dx = dy + GroupNormᵀ dh
    grads["x"] = dx + dy
    grads["context"] = dcontext
    return grads
