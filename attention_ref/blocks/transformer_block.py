r"""One transformer block of Stable Diffusion's spatial transformer (diffusers' ``BasicTransformerBlock``).

On a map ``h`` of ``H×W`` pixels with ``C`` channels (already projected in), pre-norm residual steps:

.. math::
    h &\leftarrow h + \operatorname{SelfAttn}(\operatorname{LN}_1(h)) \\
    h &\leftarrow h + \operatorname{CrossAttn}(\operatorname{LN}_2(h), \text{context}) \\
    h &\leftarrow h + \operatorname{FF}_{\text{GEGLU}}(\operatorname{LN}_3(h))

Both attentions are :func:`attention_ref.self_attention_forward` /
:func:`attention_ref.cross_attention_forward` without their own norm and
residual. Backward: each residual step ``h' = h + f(LN(h))`` gives
``dh = dh' + LN_backward(f_backward(dh'))``, taken in reverse order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..backend import namespace
from ..ops.layer_norm import LayerNormCache, layer_norm_backward, layer_norm_forward
from .attention_block import AttentionBlockCache, attention_block_backward, attention_block_forward
from .feed_forward import GegluFeedForwardCache, geglu_ff_backward, geglu_ff_forward
from .params import prefixed, sub_params

__all__ = ["TransformerBlockCache", "transformer_block_backward", "transformer_block_forward"]

_NORMS = ("norm1", "norm2", "norm3")


@dataclass(frozen=True)
class TransformerBlockCache:
    norm1: LayerNormCache
    attn1: AttentionBlockCache  # self-attention; attn1.weights is (B, heads, N, N) (None unless exact)
    norm2: LayerNormCache
    attn2: AttentionBlockCache  # cross-attention; attn2.weights is (B, heads, N, M)
    norm3: LayerNormCache
    ff: GegluFeedForwardCache


def _layer_norm(h: Any, params: Mapping[str, Any], name: str, eps: float, where: str) -> tuple[Any, LayerNormCache]:
    """``LN(h)`` with the affine parameters ``name.weight`` / ``name.bias`` when present."""
    if f"{name}.bias" in params and f"{name}.weight" not in params:
        raise ValueError(f"{where}: {name}.bias is given without {name}.weight")
    return layer_norm_forward(h, params.get(f"{name}.weight"), params.get(f"{name}.bias"), eps=eps)


def _check_block_keys(params: Mapping[str, Any], where: str) -> None:
    """``ValueError`` naming keys that belong to none of the block's layers."""
    norm_keys = {f"{n}.{p}" for n in _NORMS for p in ("weight", "bias")}
    unknown = sorted(k for k in params if k not in norm_keys and not k.startswith(("attn1.", "attn2.", "ff.")))
    if unknown:
        raise ValueError(f"{where} params: unknown {unknown} (expected norm1-3.weight/bias, attn1.*, attn2.*, ff.*)")


def transformer_block_forward(
    h: Any,
    context: Any,
    params: Mapping[str, Any],
    *,
    heads: int,
    norm_eps: float = 1e-5,
    scale: float | None = None,
    context_mask: Any | None = None,
    self_attention: str = "exact",
    self_attention_options: Mapping[str, Any] | None = None,
    where: str = "transformer block",
) -> tuple[Any, TransformerBlockCache]:
    """Self-attention, cross-attention and GEGLU feed-forward, each pre-normed and residual.

    Inputs:
        h: ``(B, H, W, C)``.
        context: ``(B, M, D)``.
        params: ``"norm1.weight"``, ``"norm1.bias"`` ``(C,)`` (likewise ``norm2``, ``norm3``; omit
            both for a layer norm without affine parameters), ``"attn1.*"`` (self-attention params
            without a norm), ``"attn2.*"`` (cross-attention params, ``"attn2.k.weight"`` ``(D, inner)``),
            ``"ff.*"`` (:func:`geglu_ff_forward` params).
        heads: heads of both attentions; norm_eps: the layer norms' epsilon (diffusers: 1e-5).
        scale: attention scale of both attentions, default ``1/sqrt(d)``; linear self-attention has no
            logits to scale, so with ``self_attention="linear"`` it applies to ``attn2`` only.
        context_mask: ``(B, M)`` or ``(M,)``, True = real token.
        self_attention, self_attention_options: the attention of ``attn1`` and its options, as
            ``attention`` / ``attention_options`` of :func:`attention_ref.self_attention_forward`;
            the cross-attention ``attn2`` stays exact.

    Returns:
        h': ``(B, H, W, C)``; cache: :class:`TransformerBlockCache`.
    """
    _check_block_keys(params, where)
    xp = namespace(h)
    if h.ndim != 4 or context is None or context.ndim != 3:
        shapes = f"h {tuple(h.shape)}, context {None if context is None else tuple(context.shape)}"
        raise ValueError(f"{where}: needs h of shape (B, H, W, C) and context (B, M, D); got {shapes}")
    caches: dict[str, Any] = {}
    # h ← h + SelfAttn(LN₁(h))
    n1, caches["norm1"] = _layer_norm(h, params, "norm1", norm_eps, where)
    a1, caches["attn1"] = attention_block_forward(
        n1,
        None,
        sub_params(params, "attn1."),
        heads=heads,
        residual=False,
        scale=None if self_attention == "linear" else scale,  # linear attention has no logits to scale
        attention=self_attention,
        attention_options=self_attention_options,
        where=f"{where} attn1",
    )
    h = h + a1
    # h ← h + CrossAttn(LN₂(h), context)
    n2, caches["norm2"] = _layer_norm(h, params, "norm2", norm_eps, where)
    a2, caches["attn2"] = attention_block_forward(
        n2,
        context,
        sub_params(params, "attn2."),
        heads=heads,
        residual=False,
        scale=scale,
        context_mask=context_mask,
        where=f"{where} attn2",
    )
    h = h + a2
    # h ← h + FF(LN₃(h)), on the (B, N, C) tokens: one matrix product per sample rather than one per row
    n3, caches["norm3"] = _layer_norm(h, params, "norm3", norm_eps, where)
    B, H, W, C = h.shape
    f, caches["ff"] = geglu_ff_forward(xp.reshape(n3, (B, H * W, C)), sub_params(params, "ff."))
    h = h + xp.reshape(f, (B, H, W, f.shape[-1]))
    return h, TransformerBlockCache(**caches)


def _layer_norm_grads(grads: dict[str, Any], name: str, g: Mapping[str, Any]) -> Any:
    for key in ("weight", "bias"):
        if key in g:
            grads[f"{name}.{key}"] = g[key]
    return g["x"]


def transformer_block_backward(dh_out: Any, cache: TransformerBlockCache) -> dict[str, Any]:
    """Gradients of :func:`transformer_block_forward`.

    Inputs:
        dh_out: ``(B, H, W, C)``, the gradient of the loss with respect to the block's output ``h'``.
        cache: :class:`TransformerBlockCache` from :func:`transformer_block_forward`.

    Returns:
        ``{"h": (B, H, W, C), "context": (B, M, D)}`` plus one entry per params key, shaped like it.
    """
    grads: dict[str, Any] = {}
    dh = dh_out
    # h' = h + FF(LN₃(h))   ⇒   dh = dh' + LN₃ᵀ FFᵀ dh'
    xp = namespace(dh_out)
    B, H, W, C = dh.shape
    g_ff = geglu_ff_backward(xp.reshape(dh, (B, H * W, C)), cache.ff)
    dn3 = xp.reshape(g_ff.pop("x"), (B, H, W, C))
    grads.update(prefixed(g_ff, "ff."))
    dh = dh + _layer_norm_grads(grads, "norm3", layer_norm_backward(dn3, cache.norm3))
    # h' = h + CrossAttn(LN₂(h), c)
    g2 = attention_block_backward(dh, cache.attn2)
    grads["context"] = g2.pop("context")
    dn2 = g2.pop("x")
    grads.update(prefixed(g2, "attn2."))
    dh = dh + _layer_norm_grads(grads, "norm2", layer_norm_backward(dn2, cache.norm2))
    # h' = h + SelfAttn(LN₁(h))
    g1 = attention_block_backward(dh, cache.attn1)
    dn1 = g1.pop("x")
    grads.update(prefixed(g1, "attn1."))
    dh = dh + _layer_norm_grads(grads, "norm1", layer_norm_backward(dn1, cache.norm1))
    grads["h"] = dh
    return grads
