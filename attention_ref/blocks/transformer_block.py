r"""One transformer block of Stable Diffusion's spatial transformer (diffusers' ``BasicTransformerBlock``).

On ``N`` tokens ``h`` of width ``C`` (a map's pixels, already projected in), pre-norm residual steps:

.. math::
    h &\leftarrow h + \operatorname{SelfAttn}(\operatorname{LN}_1(h)) \\
    h &\leftarrow h + \operatorname{CrossAttn}(\operatorname{LN}_2(h), \text{context}) \\
    h &\leftarrow h + \operatorname{FF}_{\text{GEGLU}}(\operatorname{LN}_3(h))

Both attentions are :func:`attention_ref.attention_layer_forward` without a norm or residual of
their own. Backward: each residual step ``h' = h + f(LN(h))`` gives
``dh = dh' + LN_backward(f_backward(dh'))``, taken in reverse order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .._checks import (
    array_namespace,
    check_cache,
    check_eps,
    require_array,
    require_dout,
    require_finite,
    require_floating,
)
from ..backend import Array
from ..ops.layer_norm import LayerNormCache, layer_norm_backward, layer_norm_forward
from .attention_layer import AttentionLayerCache, attention_layer_backward, attention_layer_forward
from .feed_forward import GegluFeedForwardCache, geglu_ff_backward, geglu_ff_forward
from .params import add_grads, check_params, prefixed, sub_params

__all__ = ["TransformerBlockCache", "transformer_block_backward", "transformer_block_forward"]

_NORMS = ("norm1", "norm2", "norm3")


@dataclass(frozen=True)
class TransformerBlockCache:
    backward_names: ClassVar[tuple[str, ...]] = ("transformer_block_backward",)  # the backward that takes it

    norm1: LayerNormCache
    attn1: AttentionLayerCache  # self-attention; attn1.weights is (B, heads, N, N) (None unless exact)
    norm2: LayerNormCache
    attn2: AttentionLayerCache  # cross-attention; attn2.weights is (B, heads, N, M)
    norm3: LayerNormCache
    ff: GegluFeedForwardCache


def _layer_norm(h: Array, params: Mapping[str, Array], name: str, eps: float, where: str) -> tuple[Array, Any]:
    """``LN(h)`` with the affine parameters ``name.weight`` / ``name.bias`` when present."""
    if f"{name}.bias" in params and f"{name}.weight" not in params:
        raise ValueError(f"{where}: {name}.bias is given without {name}.weight")
    return layer_norm_forward(h, params.get(f"{name}.weight"), params.get(f"{name}.bias"), eps=eps)


def _check_block_inputs(h: Array, context: Array | None, params: Mapping[str, Array], where: str) -> None:
    """``ValueError`` for tokens or a context of the wrong rank or with an infinite entry, or keys that belong to
    none of the block's layers; ``TypeError`` for params that are not a mapping of arrays, or non-arrays."""
    check_params(params, where)
    require_array(f"{where}: h", h)
    if context is not None:
        require_array(f"{where}: context", context)
    norm_keys = {f"{n}.{p}" for n in _NORMS for p in ("weight", "bias")}
    unknown = sorted(k for k in params if k not in norm_keys and not k.startswith(("attn1.", "attn2.", "ff.")))
    if unknown:
        raise ValueError(f"{where} params: unknown {unknown} (expected norm1-3.weight/bias, attn1.*, attn2.*, ff.*)")
    # the block's LayerNorms (norm1, norm2) come before its attention layers: a group norm inside them is not
    # part of diffusers' BasicTransformerBlock and would normalise their input twice
    inner_norms = sorted(k for k in params if k.startswith(("attn1.norm.", "attn2.norm.")))
    if inner_norms:
        raise ValueError(
            f"{where} params: {inner_norms} would add a group norm inside the attention layers; the block's "
            "own norm1 and norm2 normalise their input"
        )
    if h.ndim != 3 or context is None or context.ndim != 3:
        shapes = f"h {tuple(h.shape)}, context {None if context is None else tuple(context.shape)}"
        way_out = "; a (B, H, W, C) map is h.reshape(B, H·W, C) with grid=(H, W)" if h.ndim == 4 else ""
        raise ValueError(f"{where}: needs tokens h of shape (B, N, C) and context (B, M, D); got {shapes}{way_out}")
    xp = array_namespace(h=h, context=context)
    require_floating(xp, "h", h)
    require_finite(xp, "h", h, where)
    require_finite(xp, "context", context, where)


def transformer_block_forward(
    h: Array,
    context: Array,
    params: Mapping[str, Array],
    *,
    heads: int,
    norm_eps: float = 1e-5,
    scale: float | None = None,
    context_mask: Array | None = None,
    grid: tuple[int, int] | None = None,
    self_attention: str = "exact",
    self_attention_options: Mapping[str, Any] | None = None,
    where: str = "transformer block",
) -> tuple[Array, TransformerBlockCache]:
    """Self-attention, cross-attention and GEGLU feed-forward on tokens, each pre-normed and residual.

    Inputs:
        h: ``(B, N, C)`` tokens (in the spatial transformer: the map's pixels, token ``row·W + col``).
        context: ``(B, M, D)``.
        params: ``"norm1.weight"``, ``"norm1.bias"`` ``(C,)`` (likewise ``norm2``, ``norm3``; omit
            both for a layer norm without affine parameters), ``"attn1.*"`` (self-attention params
            without a norm), ``"attn2.*"`` (cross-attention params, ``"attn2.k.weight"`` ``(D, inner)``),
            ``"ff.*"`` (:func:`geglu_ff_forward` params).
        heads: heads of both attentions; norm_eps: the layer norms' epsilon (diffusers: 1e-5).
        scale: attention scale of both attentions, default ``1/sqrt(d)``; linear self-attention has no
            logits to scale, so with ``self_attention="linear"`` it applies to ``attn2`` only.
        context_mask: ``(B, M)`` or ``(M,)``, True = real token.
        grid: ``(H, W)`` with ``H·W = N`` when the tokens are a map's pixels; needed by window and
            neighborhood self-attention.
        self_attention, self_attention_options: the attention of ``attn1`` and its options, as
            ``attention`` / ``attention_options`` of :func:`attention_ref.attention_layer_forward`;
            the cross-attention ``attn2`` stays exact.

    Returns:
        h': ``(B, N, C)``; cache: :class:`TransformerBlockCache`.
    """
    _check_block_inputs(h, context, params, where)
    norm_eps = check_eps("norm_eps", norm_eps, where)
    caches: dict[str, Any] = {}
    # h ← h + SelfAttn(LN₁(h))
    n1, caches["norm1"] = _layer_norm(h, params, "norm1", norm_eps, where)
    a1, caches["attn1"] = attention_layer_forward(
        n1, sub_params(params, "attn1."), heads=heads, attention=self_attention, grid=grid, where=f"{where} attn1",
        attention_options=self_attention_options, scale=None if self_attention == "linear" else scale,
    )  # (linear attention has no logits to scale)
    h = h + a1
    # h ← h + CrossAttn(LN₂(h), context)
    n2, caches["norm2"] = _layer_norm(h, params, "norm2", norm_eps, where)
    a2, caches["attn2"] = attention_layer_forward(
        n2, sub_params(params, "attn2."), heads=heads, context=context, context_mask=context_mask, scale=scale,
        where=f"{where} attn2",
    )
    h = h + a2
    # h ← h + FF(LN₃(h))
    n3, caches["norm3"] = _layer_norm(h, params, "norm3", norm_eps, where)
    f, caches["ff"] = geglu_ff_forward(n3, sub_params(params, "ff."))
    h = h + f
    return h, TransformerBlockCache(**caches)


def _residual_backward(
    grads: dict[str, Array], dh: Array, g: dict[str, Array], input_key: str, layer: str, norm: LayerNormCache, name: str
) -> Array:
    """One residual step ``h' = h + f(LN(h))`` backwards: ``dh' + LNᵀ(df)``, where ``g`` holds ``f``'s gradients
    (its input's under ``input_key``); ``f``'s parameter gradients are stored under ``layer.``, LN's under ``name``."""
    dn = g.pop(input_key)
    grads.update(prefixed(g, f"{layer}."))
    return dh + add_grads(grads, name, layer_norm_backward(dn, norm))


def transformer_block_backward(dh_out: Array, cache: TransformerBlockCache) -> dict[str, Array]:
    """Gradients of :func:`transformer_block_forward`.

    Inputs:
        dh_out: ``(B, N, C)``, the gradient of the loss with respect to the block's output ``h'``.
        cache: :class:`TransformerBlockCache` from :func:`transformer_block_forward`.

    Returns:
        ``{"h": (B, N, C), "context": (B, M, D)}`` plus one entry per params key, shaped like it.
    """
    check_cache(cache, TransformerBlockCache, "transformer_block_backward")
    require_dout(dh_out, cache.attn1.h_shape, cache.attn1.q.x.dtype, name="dh_out")
    grads: dict[str, Array] = {}
    dh = dh_out
    # h' = h + FF(LN₃(h))   ⇒   dh = dh' + LN₃ᵀ FFᵀ dh'
    dh = _residual_backward(grads, dh, geglu_ff_backward(dh, cache.ff), "x", "ff", cache.norm3, "norm3")
    # h' = h + CrossAttn(LN₂(h), c)   ⇒   the same, and dc = CrossAttnᵀ dh'
    g2 = attention_layer_backward(dh, cache.attn2)
    grads["context"] = g2.pop("context")
    dh = _residual_backward(grads, dh, g2, "h", "attn2", cache.norm2, "norm2")
    # h' = h + SelfAttn(LN₁(h))   ⇒   the same
    dh = _residual_backward(grads, dh, attention_layer_backward(dh, cache.attn1), "h", "attn1", cache.norm1, "norm1")
    grads["h"] = dh
    return grads
