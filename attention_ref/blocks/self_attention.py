r"""The self-attention block of diffusion U-Nets on an ``H×W×C`` map (CompVis ``AttnBlock``,
OpenAI ``AttentionBlock``, diffusers ``Attention`` with a group norm).

Every pixel attends to every pixel:

.. math::
    h = \operatorname{GroupNorm}(x), \quad Q, K, V = h W_{q,k,v} + b_{q,k,v}, \quad
    y = \big(x + \operatorname{softmax}(\text{scale}\cdot QK^\top) V\, W_o + b_o\big) / \text{rescale}

per head: the attention layer (:func:`attention_ref.attention_layer_forward`, where the formulas,
shapes and the backward derivation are) on the map's pixels as tokens, pixel ``(row, col)``
being token ``row·W + col``.

At high resolution the ``(H·W)²`` softmax can be swapped for another attention
(``attention="chunked" | "linear" | "window" | "neighborhood"``, see
:mod:`attention_ref.blocks.attend`); the rest of the block is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._checks import check_cache
from ..backend import Array
from .attention_block import AttentionBlockCache, map_block_backward, map_block_forward

__all__ = ["self_attention_backward", "self_attention_forward"]


def self_attention_forward(
    x: Array,
    params: Mapping[str, Array],
    *,
    heads: int,
    groups: int = 32,
    eps: float = 1e-6,
    residual: bool = True,
    rescale: float = 1.0,
    scale: float | None = None,
    mask: Array | None = None,
    attention: str = "exact",
    attention_options: Mapping[str, Any] | None = None,
) -> tuple[Array, AttentionBlockCache]:
    """Self-attention over the pixels of a channels-last feature map.

    Inputs:
        x: ``(B, H, W, C)``, real floating. (A 3-D array is refused: one ``(H, W, C)`` map is
            ``x[None]``; ``(B, N, C)`` token sequences go to :func:`attention_ref.attention_layer_forward`.)
        params: ``"q.weight"``, ``"k.weight"``, ``"v.weight"`` ``(C, inner)``, ``"out.weight"``
            ``(inner, C_out)``; optional ``"q.bias"``, ``"k.bias"``, ``"v.bias"`` ``(inner,)``,
            ``"out.bias"`` ``(C_out,)``, ``"norm.weight"``, ``"norm.bias"`` ``(C,)``. All of x's dtype
            and backend. Without ``"norm.weight"`` there is no group norm.
        heads: number of heads; must divide ``inner``; ``d = inner/heads``.
        groups, eps: the group norm's groups (must divide ``C``) and variance epsilon.
        residual: add ``x`` to the output (needs ``C_out = C``).
        rescale: the output is divided by it (diffusers' ``rescale_output_factor``).
        scale: multiplies ``q kᵀ``; default ``1/sqrt(d)`` (linear attention has none: leave it ``None``).
        mask: boolean, broadcastable to ``(B, heads, H·W, H·W)``; True = query pixel ``row·W + col`` may
            attend to key pixel ``row'·W + col'``. Taken by ``"exact"`` and ``"chunked"`` (sliced per tile);
            ``"linear"`` takes only a key mask (shape ``(..., 1, H·W)``); ``"window"`` and
            ``"neighborhood"`` take none (ValueError). E.g. ``attention_ref.attention.window_mask(H, W, 4, 2)``
            makes exact attention equal ``"window"``.
        attention: the per-head attention: ``"exact"`` (default), ``"chunked"`` (the same result,
            O(H·W) memory), ``"linear"``, ``"window"`` (Swin), ``"neighborhood"`` (NATTEN).
        attention_options: that attention's options, as a mapping: ``"chunked"``: ``block_size``;
            ``"linear"``: ``kind`` (``"elu"`` | ``"efficient"``), ``eps``; ``"window"``: ``window``
            (required), ``shift``; ``"neighborhood"``: ``kernel`` (required). E.g.
            ``attention="window", attention_options={"window": 8, "shift": 4}``.

    Returns:
        y: ``(B, H, W, C_out)``.
        cache: :class:`~attention_ref.blocks.AttentionBlockCache`. With ``"exact"``, ``cache.weights`` is
            ``(B, heads, H·W, H·W)``, token ``row·W + col``; the other attentions store no such matrix,
            so ``cache.weights`` is ``None`` and ``cache.weights_note`` says why;
            ``cache.weight_rows(start, stop)`` gives dense rows for every attention but linear,
            ``cache.implied_weights()`` linear attention's equivalent matrix.

    Raises:
        ValueError naming the shapes for an ``x`` that is not ``(B, H, W, C)``, an empty map or batch,
        channels that do not divide into groups or heads, a parameter whose shape does not fit, an
        unknown attention, unknown or missing options, or a mask the attention cannot take;
        TypeError for mixed dtypes.
    """
    return map_block_forward(
        "self-attention", x, None, params, heads=heads, mask=mask, groups=groups, eps=eps, residual=residual,
        rescale=rescale, scale=scale, attention=attention, attention_options=attention_options
    )


def self_attention_backward(dy: Array, cache: AttentionBlockCache) -> dict[str, Array]:
    """Gradients of :func:`self_attention_forward`.

    Inputs:
        dy: ``(B, H, W, C_out)``, the gradient of the loss with respect to the block's output.
        cache: from :func:`self_attention_forward`.

    Returns:
        ``{"x": (B, H, W, C)}`` plus one entry per key of ``params``, each in that parameter's shape.
    """
    check_cache(cache, AttentionBlockCache, "self_attention_backward")
    return map_block_backward(dy, cache)
