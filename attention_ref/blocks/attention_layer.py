r"""The attention layer on token sequences ``(B, N, C)``: diffusers' ``Attention`` on 3-D input.

Forward, for ``N`` tokens of width ``C`` and, for cross-attention, a context of ``M`` tokens
of width ``D``:

.. math::
    n &= \operatorname{GroupNorm}(h) \quad(\text{or } n = h \text{ without "norm.weight"}) \\
    c &= \operatorname{Norm}_{\text{cross}}(\text{context}) \quad(\text{or the context itself}) \\
    Q &= n W_q + b_q, \qquad K = s W_k + b_k, \qquad V = s W_v + b_v,
        \qquad s = n \text{ (self) or } c \text{ (cross)} \\
    O_j &= \operatorname{softmax}(\text{scale}\cdot Q_j K_j^\top)\, V_j \quad\text{for each head } j \\
    y &= (h + O W_o + b_o) / \text{rescale} \quad(\text{or } (O W_o + b_o)/\text{rescale} \text{ without the residual})

``W_q (C, inner)``, ``W_k, W_v (C or D, inner)``, ``W_o (inner, C_out)``; heads are split
head-major (channel ``c = j·d + i`` of ``inner = heads·d`` is entry ``i`` of head ``j``), and
``scale`` defaults to ``1/sqrt(d)``. The group norm takes its statistics over the ``N`` tokens
and the ``C/groups`` channels of each group, per sample — diffusers' ``group_norm`` applied to
``h.transpose(1, 2)``.

Backward runs the same steps in reverse with the ops' own backward passes:

* ``y = (h + P)/r``  ⇒  ``dP = dy/r`` and a direct ``dh = dy/r`` when residual;
* ``P = O W_o + b_o``, ``Q = n W_q + b_q`` … : :func:`attention_ref.ops.linear_backward`;
* the heads: :func:`attention_ref.attention_backward` through split/merge (which only move entries);
* self-attention: ``n`` feeds Q, K and V, so ``dn = dn_Q + dn_K + dn_V``;
  cross-attention: ``dn = dn_Q`` and ``dc = dc_K + dc_V``, then the context norm's backward;
* ``n = GroupNorm(h)``: :func:`attention_ref.ops.group_norm_backward`.

Padded context tokens (``context_mask`` False) get weight 0 from every query, so, as long as they
are finite, they change neither the output nor any gradient, and their own gradient is 0 (NaN in a
padded token propagates, as in diffusers: ``0 · NaN`` is NaN).

The per-head step is exact attention (:func:`attention_ref.attention_forward`) unless
``attention=`` names a variant of :data:`attention_ref.blocks.ATTENTION_VARIANTS`
(``"chunked"``, ``"linear"``, ``"window"``, ``"neighborhood"``, see
:mod:`attention_ref.blocks.attend`); everything around it is unchanged, and so is the backward
above with the variant's own backward in place of ``attention_backward``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .._checks import check_cache, require_dout
from ..attention import AttentionCache, attention_backward, attention_forward
from ..attention.dense_rows import check_row_range
from ..backend import Array, namespace
from ..ops.group_norm import GroupNormCache, group_norm_backward, group_norm_forward
from ..ops.heads import merge_heads, split_heads
from ..ops.layer_norm import LayerNormCache, layer_norm_backward, layer_norm_forward
from ..ops.linear import LinearCache, linear_backward, linear_forward
from .attend import VariantCache, variant_backward, variant_forward
from .layer_checks import check_layer_inputs
from .params import add_grads

__all__ = ["AttentionLayerCache", "attention_layer_backward", "attention_layer_forward"]

_EXACT_NOTE = "exact attention stores its (B, heads, N, M) weights: cache.weights"


@dataclass(frozen=True)
class AttentionLayerCache:
    """What :func:`attention_layer_backward` needs. ``weights`` gives the attention weights for plotting."""

    backward_names: ClassVar[tuple[str, ...]] = ("attention_layer_backward",)  # the backward that takes it

    norm: GroupNormCache | None  # None without a group norm
    cross_norm: LayerNormCache | GroupNormCache | None  # None without a context norm
    q: LinearCache
    k: LinearCache
    v: LinearCache
    attention: AttentionCache | VariantCache  # exact attention's cache, or the variant's
    out: LinearCache
    heads: int
    residual: bool
    rescale: float
    h_shape: tuple[int, int, int]  # (B, N, C)
    context_shape: tuple[int, int, int] | None  # (B, M, D); None for self-attention

    @property
    def weights(self) -> Array | None:
        """``(B, heads, N, M)`` (``M = N`` for self-attention): row ``n`` holds query token ``n``'s weights.

        Rows sum to 1 (to 0 when every key is masked). ``None`` unless exact attention ran (the
        variants store no dense matrix): :attr:`weights_note` says where their weights are, and
        :meth:`weight_rows` works for every attention that has weights.
        """
        return self.attention.weights if isinstance(self.attention, AttentionCache) else None

    @property
    def weights_note(self) -> str:
        """What :attr:`weights` holds for the attention that ran, and how to get weights otherwise."""
        return _EXACT_NOTE if isinstance(self.attention, AttentionCache) else self.attention.weights_note

    def weight_rows(self, start: int, stop: int) -> Array:
        """Rows ``start:stop`` (query tokens) of the dense weights, ``(B, heads, stop − start, M)``.

        For every attention with weights — exact (sliced), chunked (recomputed), window and
        neighborhood (their local weights placed on the map, 0 elsewhere) — in ``O(rows · M)``
        memory; ``weight_rows(0, N)`` is the whole matrix. Linear attention has no weight matrix:
        ``ValueError`` (see :meth:`implied_weights`).
        """
        if isinstance(self.attention, AttentionCache):
            start, stop = check_row_range(start, stop, self.h_shape[1])
            return self.attention.weights[..., start:stop, :]
        return self.attention.weight_rows(start, stop)

    def implied_weights(self) -> Array:
        """Linear attention only: the ``(B, heads, N, M)`` matrix ``A`` with ``O = A V``, for inspection."""
        if isinstance(self.attention, AttentionCache):
            raise ValueError("exact attention is a softmax attention with real weights; use weights or weight_rows")
        return self.attention.implied_weights()


def _norm_context(
    context: Array, params: Mapping[str, Array], cross_norm: str | None, groups: int, eps: float
) -> tuple[Array, LayerNormCache | GroupNormCache | None]:
    """``Norm_cross(context)`` with the affine parameters ``norm_cross.*``, or the context itself without a norm."""
    weight, bias = params.get("norm_cross.weight"), params.get("norm_cross.bias")
    if cross_norm == "layer_norm":
        return layer_norm_forward(context, weight, bias, eps=eps)
    if cross_norm == "group_norm":
        # statistics over the M tokens and the D/groups channels of each group, per sample
        return group_norm_forward(context, weight, bias, groups=groups, eps=eps)
    return context, None


def attention_layer_forward(
    h: Array,
    params: Mapping[str, Array],
    *,
    heads: int,
    context: Array | None = None,
    context_mask: Array | None = None,
    mask: Array | None = None,
    groups: int = 32,
    eps: float = 1e-5,
    cross_norm: str | None = None,
    cross_norm_groups: int = 32,
    cross_norm_eps: float = 1e-5,
    residual: bool = False,
    rescale: float = 1.0,
    scale: float | None = None,
    attention: str = "exact",
    attention_options: Mapping[str, Any] | None = None,
    grid: tuple[int, int] | None = None,
    where: str = "attention layer",
) -> tuple[Array, AttentionLayerCache]:
    """Self-attention (``context=None``) or cross-attention on token sequences, as diffusers' ``Attention``.

    Inputs:
        h: ``(B, N, C)``, real floating: ``B`` sequences of ``N`` tokens of width ``C``.
        params: ``"q.weight"`` ``(C, inner)``, ``"k.weight"``, ``"v.weight"`` ``(C or D, inner)``,
            ``"out.weight"`` ``(inner, C_out)``; optional ``"q.bias"``, ``"k.bias"``, ``"v.bias"``
            ``(inner,)``, ``"out.bias"`` ``(C_out,)``; ``"norm.weight"``, ``"norm.bias"`` ``(C,)`` (the
            group norm, present exactly when ``"norm.weight"`` is); ``"norm_cross.weight"``,
            ``"norm_cross.bias"`` ``(D,)`` (the context norm's affine parameters, with ``cross_norm``).
            All of h's dtype and backend.
        heads: number of heads; must divide ``inner``; ``d = inner/heads``.
        context: ``(B, M, D)``, h's dtype, for cross-attention; ``None`` for self-attention.
        context_mask: boolean ``(B, M)`` or ``(M,)``, True = a real context token; padded tokens get
            weight 0, cannot change the output (if finite) and get gradient 0; a sample with every
            token padded gets attention output 0.
        mask: boolean ``(N, M)`` or ``(B or 1, heads or 1, N, M)`` (``M = N`` for self-attention), True =
            query token ``n`` may attend to key token ``m``. diffusers' boolean ``attention_mask`` of shape
            ``(B, 1, M)`` or ``(B, N, M)`` is ``mask[:, None]``; a 3-D mask is refused, as it could be either
            that or ``(heads, N, M)``. With ``context_mask`` too, a key must pass both.
        groups, eps: the group norm's groups (must divide ``C``) and epsilon (diffusers' ``norm_num_groups``,
            ``eps``; default 1e-5 as there).
        cross_norm: ``None``, ``"layer_norm"`` or ``"group_norm"``: diffusers' ``cross_attention_norm``,
            a norm of the context before ``K, V``; cross_norm_groups, cross_norm_eps: its groups
            (``"group_norm"``) and epsilon (1e-5 in diffusers).
        residual: add ``h`` to the output (needs ``C_out = C``; diffusers' ``residual_connection``).
        rescale: the output is divided by it (diffusers' ``rescale_output_factor``).
        scale: multiplies ``q kᵀ``; default ``1/sqrt(d)`` (linear attention has none: leave it ``None``).
        attention: the per-head attention: ``"exact"`` (default), or a variant: ``"chunked"`` (the same
            result, O(N) memory), ``"linear"``, ``"window"`` (Swin), ``"neighborhood"`` (NATTEN).
        attention_options: that variant's options, as a mapping: ``"chunked"``: ``block_size``;
            ``"linear"``: ``kind`` (``"elu"`` | ``"efficient"``), ``eps``; ``"window"``: ``window``
            (required), ``shift``; ``"neighborhood"``: ``kernel`` (required).
        grid: ``(H, W)`` with ``H·W = N`` when the tokens are the pixels of a map (token ``row·W + col``);
            needed only by ``"window"`` and ``"neighborhood"``.
        where: names the caller in error messages.

    Returns:
        y: ``(B, N, C_out)``.
        cache: :class:`AttentionLayerCache`; with ``"exact"``, ``cache.weights`` is ``(B, heads, N, M)``;
            the variants store no such matrix (``cache.weights`` is ``None``, ``cache.weights_note`` says
            why); ``cache.weight_rows(start, stop)`` gives dense rows for every attention but linear,
            ``cache.implied_weights()`` linear attention's equivalent matrix.

    Raises:
        ValueError naming the shapes for ``h`` that is not ``(B, N, C)`` (a 4-D map: use the map blocks),
        a context that is not ``(B, M, D)``, an empty axis (``B``, ``N`` or ``M`` = 0), parameters that do
        not fit, channels that do not divide into groups or heads, a mask that does not broadcast, an
        unknown attention or options; TypeError for mixed dtypes or a non-boolean mask.

    Not expressed (diffusers options without a counterpart here): ``spatial_norm``, ``qk_norm``,
    ``added_kv_proj_dim``, ``kv_heads``, ``only_cross_attention``, additive (float) attention masks —
    give the boolean ``mask`` instead — and dropout in training. Parameters of those features are
    unknown keys (``ValueError``).
    """
    eps, cross_norm_eps, rescale, options = check_layer_inputs(
        h, params, heads, context, context_mask, mask, groups, eps, cross_norm, cross_norm_groups, cross_norm_eps,
        residual, rescale, attention, attention_options, grid, where
    )
    xp = namespace(h)
    # n = GroupNorm(h) over the tokens of each sample, or h itself   (B, N, C)
    n, norm_cache = h, None
    if "norm.weight" in params:
        n, norm_cache = group_norm_forward(h, params["norm.weight"], params.get("norm.bias"), groups=groups, eps=eps)
    # s = n for self-attention; the context, normed when cross_norm is given, for cross-attention   (B, M, C or D)
    s, cross_cache = n, None
    if context is not None:
        s, cross_cache = _norm_context(context, params, cross_norm, cross_norm_groups, cross_norm_eps)
    if context_mask is not None:
        # a padded context token is a key for no query: mask ∧ context_mask   (B or 1, 1, 1, M)
        key_mask = xp.reshape(context_mask, (-1, 1, 1, context_mask.shape[-1]))
        mask = key_mask if mask is None else xp.logical_and(mask, key_mask)
    # Q = n W_q + b_q   (B, N, inner);   K = s W_k + b_k,  V = s W_v + b_v   (B, M, inner)
    q, q_cache = linear_forward(n, params["q.weight"], params.get("q.bias"))
    k, k_cache = linear_forward(s, params["k.weight"], params.get("k.bias"))
    v, v_cache = linear_forward(s, params["v.weight"], params.get("v.bias"))
    # split the channels into heads, head-major: channel j·d + i is entry i of head j   (B, heads, N or M, d)
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    # O_j = softmax(scale · Q_j K_jᵀ) V_j, or the chosen variant of attention   (B, heads, N, d)
    if attention == "exact":
        oh, attention_cache = attention_forward(qh, kh, vh, mask=mask, scale=scale)
    else:
        oh, attention_cache = variant_forward(
            qh, kh, vh, attention=attention, options=options, grid=grid, mask=mask, scale=scale
        )
    o = merge_heads(oh)  # (B, N, inner)
    # P = O W_o + b_o   (B, N, C_out)
    proj, out_cache = linear_forward(o, params["out.weight"], params.get("out.bias"))
    # y = (h + P) / rescale, or P / rescale
    y = h + proj if residual else proj
    if rescale != 1:
        y = y / rescale
    cache = AttentionLayerCache(
        norm=norm_cache, cross_norm=cross_cache, q=q_cache, k=k_cache, v=v_cache, attention=attention_cache,
        out=out_cache, heads=heads, residual=residual, rescale=rescale, h_shape=tuple(h.shape),
        context_shape=None if context is None else tuple(context.shape),
    )
    return y, cache


def attention_layer_backward(dy: Array, cache: AttentionLayerCache) -> dict[str, Array]:
    """Gradients of :func:`attention_layer_forward`.

    Inputs:
        dy: ``(B, N, C_out)``, the gradient of the loss with respect to the layer's output.
        cache: :class:`AttentionLayerCache` from :func:`attention_layer_forward`.

    Returns:
        ``{"h": (B, N, C)}``, ``"context"`` ``(B, M, D)`` for cross-attention, and one entry per key
        of ``params``, each in that parameter's shape. Padded context tokens get exactly 0.
    """
    check_cache(cache, AttentionLayerCache, "attention_layer_backward")
    B, N, _ = cache.h_shape
    require_dout(dy, (B, N, cache.out.W.shape[1]), cache.q.x.dtype, name="dy")
    grads: dict[str, Array] = {}
    # y = (h + P) / r   ⇒   dP = dy / r  (and dh gets dy / r straight through the residual)
    dproj = dy / cache.rescale if cache.rescale != 1 else dy
    # P = O W_o + b_o
    do = add_grads(grads, "out", linear_backward(dproj, cache.out))  # (B, N, inner)
    # heads: dO → dQ, dK, dV   (B, heads, ·, d), merged back to (B, ·, inner)
    doh = split_heads(do, cache.heads)
    if isinstance(cache.attention, AttentionCache):
        dheads = attention_backward(doh, cache.attention)
    else:
        dheads = variant_backward(doh, cache.attention)
    dq, dk, dv = merge_heads(dheads["q"]), merge_heads(dheads["k"]), merge_heads(dheads["v"])
    dn = add_grads(grads, "q", linear_backward(dq, cache.q))  # (B, N, C)
    ds_k = add_grads(grads, "k", linear_backward(dk, cache.k))  # (B, M, C or D)
    ds_v = add_grads(grads, "v", linear_backward(dv, cache.v))
    if cache.context_shape is None:
        # n feeds Q, K and V: dn = dn_Q + dn_K + dn_V
        dn = dn + ds_k + ds_v
    else:
        # the (normed) context feeds K and V: ds = ds_K + ds_V
        ds = ds_k + ds_v
        if isinstance(cache.cross_norm, LayerNormCache):
            ds = add_grads(grads, "norm_cross", layer_norm_backward(ds, cache.cross_norm))
        elif isinstance(cache.cross_norm, GroupNormCache):
            ds = add_grads(grads, "norm_cross", group_norm_backward(ds, cache.cross_norm))
        grads["context"] = ds
    dh = dn
    if cache.norm is not None:
        # n = GroupNorm(h)
        dh = add_grads(grads, "norm", group_norm_backward(dn, cache.norm))
    if cache.residual:
        dh = dh + dproj
    grads["h"] = dh
    return grads
