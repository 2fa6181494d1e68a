r"""The self-attention block of diffusion U-Nets on an ``H×W×C`` map (CompVis ``AttnBlock``,
OpenAI ``AttentionBlock``, diffusers ``Attention`` with a group norm).

Every pixel attends to every pixel:

.. math::
    h = \operatorname{GroupNorm}(x), \quad Q, K, V = h W_{q,k,v} + b_{q,k,v}, \quad
    y = \big(x + \operatorname{softmax}(\text{scale}\cdot QK^\top) V\, W_o + b_o\big) / \text{rescale}

per head. The formulas, shapes and the backward derivation are in
:mod:`attention_ref.blocks.attention_block`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .attention_block import AttentionBlockCache, attention_block_backward, attention_block_forward
from .params import init_linear, init_norm

__all__ = ["init_self_attention", "self_attention_backward", "self_attention_forward"]


def init_self_attention(
    channels: int,
    *,
    heads: int = 1,
    groups: int | None = 32,
    bias: bool = True,
    out_bias: bool = True,
    rng: np.random.Generator | int | None = None,
    dtype: Any = "float64",
) -> dict[str, np.ndarray]:
    """Random parameters for :func:`self_attention_forward`, as NumPy arrays.

    Inputs:
        channels: ``C``, the map's channels (also the attention width, ``inner = C``).
        heads: must divide ``C``.
        groups: group-norm groups, must divide ``C``; ``None`` for a block without a norm.
        bias: give Q, K, V biases; out_bias: give the output projection a bias.
        rng: a ``numpy.random.Generator`` or a seed (``None``: fresh entropy).
        dtype: floating dtype of the arrays.

    Returns:
        ``{"norm.weight" (C,) = 1, "norm.bias" (C,) = 0, "q.weight" (C, C), "q.bias" (C,),
        "k.weight", "k.bias", "v.weight", "v.bias", "out.weight" (C, C), "out.bias" (C,)}``;
        weights and biases uniform in ``±1/√C`` (PyTorch's default). Convert them to
        another backend with its ``asarray``.
    """
    if heads < 1 or channels % heads != 0:
        raise ValueError(f"{channels} channels are not divisible into {heads} heads")
    if groups is not None and (groups < 1 or channels % groups != 0):
        raise ValueError(f"{channels} channels are not divisible into {groups} groups")
    rng = np.random.default_rng(rng)
    params: dict[str, np.ndarray] = {}
    if groups is not None:
        init_norm(params, "norm", channels, dtype=dtype)
    for name in ("q", "k", "v"):
        init_linear(params, name, channels, channels, bias=bias, rng=rng, dtype=dtype)
    init_linear(params, "out", channels, channels, bias=out_bias, rng=rng, dtype=dtype)
    return params


def self_attention_forward(
    x: Any,
    params: Mapping[str, Any],
    *,
    heads: int,
    groups: int = 32,
    eps: float = 1e-6,
    residual: bool = True,
    rescale: float = 1.0,
    scale: float | None = None,
) -> tuple[Any, AttentionBlockCache]:
    """Self-attention over the pixels of a channels-last feature map.

    Inputs:
        x: ``(B, H, W, C)`` or ``(H, W, C)``, real floating.
        params: ``"q.weight"``, ``"k.weight"``, ``"v.weight"`` ``(C, inner)``, ``"out.weight"``
            ``(inner, C_out)``; optional ``"q.bias"``, ``"k.bias"``, ``"v.bias"`` ``(inner,)``,
            ``"out.bias"`` ``(C_out,)``, ``"norm.weight"``, ``"norm.bias"`` ``(C,)``. All of x's dtype
            and backend. Without ``"norm.weight"`` there is no group norm.
        heads: number of heads; must divide ``inner``; ``d = inner/heads``.
        groups, eps: the group norm's groups (must divide ``C``) and variance epsilon.
        residual: add ``x`` to the output (needs ``C_out = C``).
        rescale: the output is divided by it (diffusers' ``rescale_output_factor``).
        scale: multiplies ``q kᵀ``; default ``1/sqrt(d)``.

    Returns:
        y: ``(B, H, W, C_out)`` or ``(H, W, C_out)``, like ``x``.
        cache: :class:`~attention_ref.blocks.AttentionBlockCache`; ``cache.weights`` is
            ``(B, heads, H·W, H·W)`` (no ``B`` axis when ``x`` had none), token ``row·W + col``.

    Raises:
        ValueError naming the numbers when channels do not divide into groups or heads, or
        a parameter's shape does not fit; TypeError for mixed dtypes.
    """
    return attention_block_forward(
        x,
        None,
        params,
        heads=heads,
        groups=groups,
        eps=eps,
        residual=residual,
        rescale=rescale,
        scale=scale,
        where="self-attention",
    )


def self_attention_backward(dy: Any, cache: AttentionBlockCache) -> dict[str, Any]:
    """Gradients of :func:`self_attention_forward`.

    Inputs:
        dy: the output's shape.
        cache: from :func:`self_attention_forward`.

    Returns:
        ``{"x": x's shape}`` plus one entry per key of ``params``, each in that parameter's shape.
    """
    if cache.context_shape is not None:
        raise ValueError("this cache comes from cross_attention_forward; use cross_attention_backward")
    return attention_block_backward(dy, cache)
