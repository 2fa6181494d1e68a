r"""The cross-attention block: every pixel of an ``H×W×C`` map attends to ``M`` context tokens
(e.g. text embeddings), as in Stable Diffusion's ``attn2``.

.. math::
    Q = h W_q + b_q, \quad K = c\, W_k + b_k, \quad V = c\, W_v + b_v, \quad
    y = \big(x + \operatorname{softmax}(\text{scale}\cdot QK^\top) V\, W_o + b_o\big) / \text{rescale}

per head, with ``h = GroupNorm(x)`` (or ``x``) and ``c`` the context. The
formulas, shapes and the backward derivation are in
:mod:`attention_ref.blocks.attention_block`.

``attention="chunked"`` or ``"linear"`` replaces the per-head softmax attention;
window and neighborhood attention need keys on the pixel grid and so do not
apply (the keys here are context tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .attention_block import AttentionBlockCache, attention_block_backward, attention_block_forward
from .params import init_linear, init_norm

__all__ = ["cross_attention_backward", "cross_attention_forward", "init_cross_attention"]


def init_cross_attention(
    channels: int,
    context_dim: int,
    *,
    heads: int = 1,
    groups: int | None = 32,
    bias: bool = True,
    out_bias: bool = True,
    rng: np.random.Generator | int | None = None,
    dtype: Any = "float64",
) -> dict[str, np.ndarray]:
    """Random parameters for :func:`cross_attention_forward`, as NumPy arrays.

    Inputs:
        channels: ``C``, the map's channels (also the attention width, ``inner = C``).
        context_dim: ``D``, the width of a context token.
        heads, groups, bias, out_bias, rng, dtype: as in :func:`attention_ref.init_self_attention`.

    Returns:
        like :func:`attention_ref.init_self_attention`, except ``"k.weight"`` and ``"v.weight"``
        are ``(D, C)``.
    """
    if heads < 1 or channels % heads != 0:
        raise ValueError(f"{channels} channels are not divisible into {heads} heads")
    if groups is not None and (groups < 1 or channels % groups != 0):
        raise ValueError(f"{channels} channels are not divisible into {groups} groups")
    rng = np.random.default_rng(rng)
    params: dict[str, np.ndarray] = {}
    if groups is not None:
        init_norm(params, "norm", channels, dtype=dtype)
    init_linear(params, "q", channels, channels, bias=bias, rng=rng, dtype=dtype)
    init_linear(params, "k", context_dim, channels, bias=bias, rng=rng, dtype=dtype)
    init_linear(params, "v", context_dim, channels, bias=bias, rng=rng, dtype=dtype)
    init_linear(params, "out", channels, channels, bias=out_bias, rng=rng, dtype=dtype)
    return params


def cross_attention_forward(
    x: Any,
    context: Any,
    params: Mapping[str, Any],
    *,
    heads: int,
    groups: int = 32,
    eps: float = 1e-6,
    residual: bool = True,
    rescale: float = 1.0,
    scale: float | None = None,
    context_mask: Any | None = None,
    attention: str = "exact",
    attention_options: Mapping[str, Any] | None = None,
) -> tuple[Any, AttentionBlockCache]:
    """Cross-attention from the pixels of a channels-last map to a sequence of context tokens.

    Inputs:
        x: ``(B, H, W, C)`` or ``(H, W, C)``, real floating.
        context: ``(B, M, D)`` for a batched ``x``, ``(M, D)`` for an unbatched one; x's dtype.
        params: as for :func:`attention_ref.self_attention_forward`, but ``"k.weight"`` and
            ``"v.weight"`` are ``(D, inner)``.
        heads, groups, eps, residual, rescale, scale: as for :func:`attention_ref.self_attention_forward`.
        context_mask: boolean ``(B, M)`` or ``(M,)`` (the same for every sample), True = a real
            token. Padded tokens get weight 0, cannot change the output, and get gradient 0.
            A sample whose tokens are all padded gets attention output 0. Every attention below
            honours it: chunked slices it per tile; linear leaves the padded tokens out of its sums
            (exactly as if they were deleted).
        attention: ``"exact"`` (default), ``"chunked"`` or ``"linear"``; ``"window"`` and
            ``"neighborhood"`` raise ``ValueError`` (their keys must be pixels of the map, these are tokens).
        attention_options: as for :func:`attention_ref.self_attention_forward`.

    Returns:
        y: like ``x`` with ``C_out`` channels.
        cache: :class:`~attention_ref.blocks.AttentionBlockCache`; with ``"exact"``, ``cache.weights`` is
            ``(B, heads, H·W, M)`` (no ``B`` axis when ``x`` had none); otherwise ``None``, see
            ``cache.weights_note``, ``cache.weight_rows`` (chunked) and ``cache.implied_weights()`` (linear).

    Raises:
        ValueError naming the numbers for a context width that does not match ``"k.weight"``,
        channels that do not divide into groups or heads, mismatched shapes, or an attention
        that cannot run on context tokens.
    """
    if context is None:
        raise ValueError("cross-attention needs a context; use self_attention_forward for self-attention")
    return attention_block_forward(
        x,
        context,
        params,
        heads=heads,
        groups=groups,
        eps=eps,
        residual=residual,
        rescale=rescale,
        scale=scale,
        context_mask=context_mask,
        attention=attention,
        attention_options=attention_options,
        where="cross-attention",
    )


def cross_attention_backward(dy: Any, cache: AttentionBlockCache) -> dict[str, Any]:
    """Gradients of :func:`cross_attention_forward`.

    Inputs:
        dy: ``(B, H, W, C_out)`` (or ``(H, W, C_out)`` for an unbatched ``x``), the gradient of the loss
            with respect to the block's output.
        cache: from :func:`cross_attention_forward`.

    Returns:
        ``{"x": x's shape, "context": context's shape}`` plus one entry per key of ``params``.
        Padded context tokens get exactly 0.
    """
    if cache.context_shape is None:
        raise ValueError("this cache comes from self_attention_forward; use self_attention_backward")
    return attention_block_backward(dy, cache)
