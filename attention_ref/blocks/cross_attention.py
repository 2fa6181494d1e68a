r"""The cross-attention block: every pixel of an ``H×W×C`` map attends to ``M`` context tokens
(e.g. text embeddings), as in Stable Diffusion's ``attn2``.

.. math::
    Q = h W_q + b_q, \quad K = c\, W_k + b_k, \quad V = c\, W_v + b_v, \quad
    y = \big(x + \operatorname{softmax}(\text{scale}\cdot QK^\top) V\, W_o + b_o\big) / \text{rescale}

per head, with ``h = GroupNorm(x)`` (or ``x``) and ``c`` the context: the attention layer
(:func:`attention_ref.attention_layer_forward`, where the formulas, shapes and the backward
derivation are) on the map's pixels as tokens, pixel ``(row, col)`` being token ``row·W + col``.

``attention="chunked"`` or ``"linear"`` replaces the per-head softmax attention;
window and neighborhood attention need keys on the pixel grid and so do not
apply (the keys here are context tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._checks import check_cache
from ..backend import Array
from .attention_block import AttentionBlockCache, map_block_backward, map_block_forward

__all__ = ["cross_attention_backward", "cross_attention_forward"]


def cross_attention_forward(
    x: Array,
    context: Array,
    params: Mapping[str, Array],
    *,
    heads: int,
    groups: int = 32,
    eps: float = 1e-6,
    residual: bool = True,
    rescale: float = 1.0,
    scale: float | None = None,
    context_mask: Array | None = None,
    attention: str = "exact",
    attention_options: Mapping[str, Any] | None = None,
) -> tuple[Array, AttentionBlockCache]:
    """Cross-attention from the pixels of a channels-last map to a sequence of context tokens.

    Inputs:
        x: ``(B, H, W, C)``, real floating. (A 3-D array is refused: one ``(H, W, C)`` map is
            ``x[None]``; ``(B, N, C)`` token sequences go to :func:`attention_ref.attention_layer_forward`.)
        context: ``(B, M, D)``, x's dtype (one ``(M, D)`` sequence is ``context[None]``).
        params: as for :func:`attention_ref.self_attention_forward`, but ``"k.weight"`` and
            ``"v.weight"`` are ``(D, inner)``.
        heads, groups, eps, residual, rescale, scale: as for :func:`attention_ref.self_attention_forward`.
        context_mask: boolean ``(B, M)`` or ``(M,)`` (the same for every sample), True = a real
            token. Padded tokens get weight 0, cannot change the output (if finite), and get gradient 0.
            A sample whose tokens are all padded gets attention output 0. Every attention below
            honours it: chunked slices it per tile; linear leaves the padded tokens out of its sums
            (exactly as if they were deleted).
        attention: ``"exact"`` (default), ``"chunked"`` or ``"linear"``; ``"window"`` and
            ``"neighborhood"`` raise ``ValueError`` (their keys must be pixels of the map, these are tokens).
        attention_options: as for :func:`attention_ref.self_attention_forward`.

    Returns:
        y: ``(B, H, W, C_out)``.
        cache: :class:`~attention_ref.blocks.AttentionBlockCache`; with ``"exact"``, ``cache.weights`` is
            ``(B, heads, H·W, M)``; otherwise ``None``, see ``cache.weights_note``, ``cache.weight_rows``
            (chunked) and ``cache.implied_weights()`` (linear).

    Raises:
        ValueError naming the shapes for an ``x`` that is not ``(B, H, W, C)``, a context that is not
        ``(B, M, D)`` or has no tokens, a context width that does not match ``"k.weight"``, channels
        that do not divide into groups or heads, or an attention that cannot run on context tokens.
    """
    if context is None:
        raise ValueError("cross-attention needs a context; use self_attention_forward for self-attention")
    return map_block_forward(
        "cross-attention", x, context, params, heads=heads, context_mask=context_mask, groups=groups, eps=eps,
        residual=residual, rescale=rescale, scale=scale, attention=attention, attention_options=attention_options
    )


def cross_attention_backward(dy: Array, cache: AttentionBlockCache) -> dict[str, Array]:
    """Gradients of :func:`cross_attention_forward`.

    Inputs:
        dy: ``(B, H, W, C_out)``, the gradient of the loss with respect to the block's output.
        cache: from :func:`cross_attention_forward`.

    Returns:
        ``{"x": (B, H, W, C), "context": (B, M, D)}`` plus one entry per key of ``params``.
        Padded context tokens get exactly 0.
    """
    check_cache(cache, AttentionBlockCache, "cross_attention_backward")
    return map_block_backward(dy, cache)
