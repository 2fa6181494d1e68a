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

import numpy as np

from ..backend import Array, namespace
from .attention_block import AttentionBlockCache, check_map, map_block_backward
from .attention_layer import attention_layer_forward
from .caches import require_cache
from .params import check_sizes, init_linear, init_norm

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
    check_sizes("init_self_attention", ("groups",), channels=channels, heads=heads, groups=groups)
    if channels % heads != 0:
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
            ``"neighborhood"`` take none (ValueError). E.g. ``attention_ref.window_mask(H, W, 4, 2)``
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
    B, H, W, C = check_map("self-attention", x)
    xp = namespace(x)
    # pixel (row, col) is token row·W + col   (B, N, C)
    h = xp.reshape(x, (B, H * W, C))
    # the attention layer on the tokens; the grid places them on the map for window/neighborhood   (B, N, C_out)
    y, layer = attention_layer_forward(
        h,
        params,
        heads=heads,
        mask=mask,
        groups=groups,
        eps=eps,
        residual=residual,
        rescale=rescale,
        scale=scale,
        attention=attention,
        attention_options=attention_options,
        grid=(H, W),
        where="self-attention",
    )
    # back on the map   (B, H, W, C_out)
    y = xp.reshape(y, (B, H, W, y.shape[-1]))
    return y, AttentionBlockCache(layer=layer, x_shape=(B, H, W, C))


def self_attention_backward(dy: Array, cache: AttentionBlockCache) -> dict[str, Array]:
    """Gradients of :func:`self_attention_forward`.

    Inputs:
        dy: ``(B, H, W, C_out)``, the gradient of the loss with respect to the block's output.
        cache: from :func:`self_attention_forward`.

    Returns:
        ``{"x": (B, H, W, C)}`` plus one entry per key of ``params``, each in that parameter's shape.
    """
    require_cache(cache, AttentionBlockCache, "self_attention_backward")
    return map_block_backward(dy, cache)
