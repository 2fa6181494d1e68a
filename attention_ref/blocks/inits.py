"""Random parameters for every block, as flat dicts of NumPy arrays (:mod:`attention_ref.blocks.params`).

Linear weights and biases are drawn from ``U(−1/√fan_in, 1/√fan_in)``, PyTorch's default, so outputs
start at unit scale; norms start as plain standardisation (weight 1, bias 0). The map blocks, the
spatial transformer's attentions and the attention layer are one layer (:func:`init_attention_layer`);
each init draws from ``rng`` in the order of its parameters, so a seed gives the same numbers every time.
Convert the arrays to another backend with its ``asarray``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._checks import require_divisible
from .joint_checks import NORMS, PROJECTIONS, QK_NORMS
from .layer_checks import CROSS_NORMS
from .params import check_sizes, init_conv, init_linear, init_norm, prefixed

__all__ = [
    "init_attention_layer",
    "init_cross_attention",
    "init_joint_attention",
    "init_res_block",
    "init_self_attention",
    "init_spatial_transformer",
]


def _head_dim(channels: int, heads: int, head_dim: int | None, where: str = "") -> int:
    """``head_dim`` as given, or ``channels / heads`` (``ValueError`` unless ``heads`` divides ``channels``)."""
    if head_dim is not None:
        return head_dim
    require_divisible(channels, heads, "channels", "heads", where=where, hint="; give head_dim")
    return channels // heads


def init_attention_layer(
    channels: int,
    context_dim: int | None = None,
    *,
    heads: int = 1,
    head_dim: int | None = None,
    groups: int | None = None,
    cross_norm: str | None = None,
    bias: bool = False,
    out_bias: bool = True,
    rng: np.random.Generator | int | None = None,
    dtype: Any = "float64",
) -> dict[str, np.ndarray]:
    """Random parameters for :func:`attention_ref.attention_layer_forward` (diffusers' ``Attention`` defaults).

    Inputs:
        channels: ``C``, the tokens' width (also the output width).
        context_dim: ``D``, the context tokens' width, for cross-attention; ``None`` for self-attention.
        heads, head_dim: the attention width is ``inner = heads · head_dim`` (default ``head_dim = C/heads``).
        groups: give a group norm (``"norm.*"``; ``groups`` must divide ``C``); ``None`` for none.
        cross_norm: ``"layer_norm"`` or ``"group_norm"`` gives the context norm's ``"norm_cross.*"``.
        bias: give Q, K, V biases (off by default, as in diffusers); out_bias: give the output a bias.
        rng, dtype: as in :func:`init_self_attention`.

    Returns:
        ``{"q.weight" (C, inner), "k.weight", "v.weight" (C or D, inner), "out.weight" (inner, C)}``, the
        biases asked for, norm weights 1 and biases 0.
    """
    check_sizes(
        "init_attention_layer",
        ("context_dim", "head_dim", "groups"),
        channels=channels,
        context_dim=context_dim,
        heads=heads,
        head_dim=head_dim,
        groups=groups,
    )
    head_dim = _head_dim(channels, heads, head_dim)
    if groups is not None:
        require_divisible(channels, groups, "channels", "groups")
    if cross_norm is not None and (context_dim is None or cross_norm not in CROSS_NORMS):
        raise ValueError(f"cross_norm must be one of {CROSS_NORMS} with a context_dim, got {cross_norm!r}")
    rng = np.random.default_rng(rng)
    inner = heads * head_dim
    source = channels if context_dim is None else context_dim
    params: dict[str, np.ndarray] = {}
    if groups is not None:
        init_norm(params, "norm", channels, dtype=dtype)
    if cross_norm is not None:
        init_norm(params, "norm_cross", source, dtype=dtype)
    init_linear(params, "q", channels, inner, bias=bias, rng=rng, dtype=dtype)
    init_linear(params, "k", source, inner, bias=bias, rng=rng, dtype=dtype)
    init_linear(params, "v", source, inner, bias=bias, rng=rng, dtype=dtype)
    init_linear(params, "out", inner, channels, bias=out_bias, rng=rng, dtype=dtype)
    return params


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
    """Random parameters for :func:`attention_ref.self_attention_forward`: the attention layer's, with a group
    norm and Q, K, V biases by default.

    Inputs:
        channels: ``C``, the map's channels (also the attention width, ``inner = C``).
        heads: must divide ``C``.
        groups: group-norm groups, must divide ``C``; ``None`` for a block without a norm.
        bias: give Q, K, V biases; out_bias: give the output projection a bias.
        rng: a ``numpy.random.Generator`` or a seed (``None``: fresh entropy).
        dtype: floating dtype of the arrays.

    Returns:
        ``{"norm.weight" (C,) = 1, "norm.bias" (C,) = 0, "q.weight" (C, C), "q.bias" (C,),
        "k.weight", "k.bias", "v.weight", "v.bias", "out.weight" (C, C), "out.bias" (C,)}``.
    """
    check_sizes("init_self_attention", ("groups",), channels=channels, heads=heads, groups=groups)
    require_divisible(channels, heads, "channels", "heads")
    return init_attention_layer(
        channels, heads=heads, groups=groups, bias=bias, out_bias=out_bias, rng=rng, dtype=dtype
    )


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
    """Random parameters for :func:`attention_ref.cross_attention_forward`.

    Inputs:
        channels: ``C``, the map's channels (also the attention width, ``inner = C``).
        context_dim: ``D``, the width of a context token.
        heads, groups, bias, out_bias, rng, dtype: as in :func:`init_self_attention`.

    Returns:
        like :func:`init_self_attention`, except ``"k.weight"`` and ``"v.weight"`` are ``(D, C)``.
    """
    check_sizes(
        "init_cross_attention", ("groups",), channels=channels, context_dim=context_dim, heads=heads, groups=groups
    )
    require_divisible(channels, heads, "channels", "heads")
    return init_attention_layer(
        channels, context_dim, heads=heads, groups=groups, bias=bias, out_bias=out_bias, rng=rng, dtype=dtype
    )


def init_spatial_transformer(
    channels: int,
    context_dim: int,
    *,
    heads: int = 1,
    head_dim: int | None = None,
    depth: int = 1,
    groups: int = 32,
    ff_mult: int = 4,
    attention_bias: bool = False,
    rng: np.random.Generator | int | None = None,
    dtype: Any = "float64",
) -> dict[str, np.ndarray]:
    """Random parameters for :func:`attention_ref.spatial_transformer_forward`.

    Inputs:
        channels: ``C`` of the map; context_dim: ``D`` of a context token.
        heads, head_dim: the attention width is ``inner = heads · head_dim`` (default ``head_dim = C/heads``).
        depth: number of transformer blocks; groups: the group norm's groups (must divide ``C``).
        ff_mult: the feed-forward's hidden width is ``F = ff_mult · inner``.
        attention_bias: give Q, K, V biases (diffusers' ``attention_bias``; off in Stable Diffusion).
        rng, dtype: as in :func:`init_self_attention`.

    Returns:
        ``"norm.weight"``, ``"norm.bias"`` ``(C,)``; ``"proj_in.weight"`` ``(C, inner)``, ``"proj_in.bias"``;
        for each block ``i``: ``"blocks.i.norm1.weight"`` … ``"blocks.i.norm3.bias"`` ``(inner,)``,
        ``"blocks.i.attn1.{q,k,v}.weight"`` ``(inner, inner)``, ``"blocks.i.attn1.out.weight"``,
        ``"blocks.i.attn1.out.bias"``, the same for ``attn2`` with ``k``/``v`` weights ``(D, inner)``,
        ``"blocks.i.ff.proj.weight"`` ``(inner, 2F)``, ``"blocks.i.ff.proj.bias"``,
        ``"blocks.i.ff.out.weight"`` ``(F, inner)``, ``"blocks.i.ff.out.bias"``;
        ``"proj_out.weight"`` ``(inner, C)``, ``"proj_out.bias"`` ``(C,)``.
    """
    check_sizes(
        "init_spatial_transformer",
        ("head_dim",),
        channels=channels,
        context_dim=context_dim,
        heads=heads,
        head_dim=head_dim,
        depth=depth,
        groups=groups,
        ff_mult=ff_mult,
    )
    inner = heads * _head_dim(channels, heads, head_dim)
    require_divisible(channels, groups, "channels", "groups")
    rng = np.random.default_rng(rng)
    F = ff_mult * inner
    params: dict[str, np.ndarray] = {}
    init_norm(params, "norm", channels, dtype=dtype)
    init_linear(params, "proj_in", channels, inner, bias=True, rng=rng, dtype=dtype)
    for i in range(depth):
        b = f"blocks.{i}."
        for n in ("norm1", "norm2", "norm3"):
            init_norm(params, b + n, inner, dtype=dtype)
        # attn1 attends among the tokens, attn2 to the context; neither has a norm of its own
        for attn, source in (("attn1", None), ("attn2", context_dim)):
            layer = init_attention_layer(inner, source, bias=attention_bias, rng=rng, dtype=dtype)
            params.update(prefixed(layer, f"{b}{attn}."))
        init_linear(params, b + "ff.proj", inner, 2 * F, bias=True, rng=rng, dtype=dtype)
        init_linear(params, b + "ff.out", F, inner, bias=True, rng=rng, dtype=dtype)
    init_linear(params, "proj_out", inner, channels, bias=True, rng=rng, dtype=dtype)
    return params


def init_joint_attention(
    dim: int,
    context_dim: int | None = None,
    *,
    heads: int,
    head_dim: int | None = None,
    qk_norm: str | None = None,
    bias: bool = True,
    out_bias: bool = True,
    pre_only: bool = False,
    context_pre_only: bool = False,
    out_dim: int | None = None,
    context_out_dim: int | None = None,
    rng: np.random.Generator | int | None = None,
    dtype: Any = "float64",
) -> dict[str, np.ndarray]:
    """Random parameters for :func:`attention_ref.blocks.joint_attention_forward`.

    Inputs:
        dim: ``C``, the image tokens' width.
        context_dim: ``D``, the text tokens' width; ``None`` for one stream (no ``add_*`` parameters).
        heads, head_dim: ``inner = heads · head_dim`` (default ``head_dim = dim/heads``).
        qk_norm: ``None``, ``"rms_norm"`` (scale ``(d,)`` = 1) or ``"layer_norm"`` (scale 1, shift 0).
        bias: give the q/k/v projections of both streams biases (SD3 and Flux have them);
            out_bias: give the output projections biases.
        pre_only: no image output projection (Flux's single-stream blocks);
            context_pre_only: no text output projection (SD3's last block).
        out_dim, context_out_dim: the output projections' widths (default ``dim`` for both, as diffusers'
            ``to_out`` and ``to_add_out``).
        rng, dtype: a generator or seed, and the arrays' floating dtype.

    Returns:
        ``{"q.weight" (C, inner), "k.weight", "v.weight", "out.weight" (inner, out_dim), "add_q.weight"
        (D, inner), "add_k.weight", "add_v.weight", "add_out.weight" (inner, context_out_dim), their biases,
        "norm_q.weight" (d,), "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight" (and ``.bias``
        for layer norm)}``, as asked.
    """
    optional = ("context_dim", "head_dim", "out_dim", "context_out_dim")
    check_sizes(
        "init_joint_attention",
        optional,
        dim=dim,
        context_dim=context_dim,
        heads=heads,
        head_dim=head_dim,
        out_dim=out_dim,
        context_out_dim=context_out_dim,
    )
    head_dim = _head_dim(dim, heads, head_dim, "init_joint_attention")
    if qk_norm is not None and qk_norm not in QK_NORMS:
        raise ValueError(f"init_joint_attention: qk_norm must be one of {QK_NORMS} or None, got {qk_norm!r}")
    if context_dim is None and context_pre_only:
        raise ValueError("init_joint_attention: context_pre_only needs a text stream (context_dim)")
    rng = np.random.default_rng(rng)
    inner = heads * head_dim
    params: dict[str, np.ndarray] = {}
    streams = {"image": dim} if context_dim is None else {"image": dim, "text": context_dim}
    for stream, width in streams.items():
        q, k, v, out = PROJECTIONS[stream]
        for name in (q, k, v):
            init_linear(params, name, width, inner, bias=bias, rng=rng, dtype=dtype)
        no_out = pre_only if stream == "image" else context_pre_only
        if not no_out:
            n_out = out_dim if stream == "image" else context_out_dim
            n_out = dim if n_out is None else n_out
            init_linear(params, out, inner, n_out, bias=out_bias, rng=rng, dtype=dtype)
        if qk_norm is not None:
            for norm in NORMS[stream]:
                params[f"{norm}.weight"] = np.ones(head_dim, dtype=np.dtype(dtype))
                if qk_norm == "layer_norm":
                    params[f"{norm}.bias"] = np.zeros(head_dim, dtype=np.dtype(dtype))
    return params


def init_res_block(
    c_in: int,
    c_out: int,
    time_dim: int,
    *,
    rng: np.random.Generator | int | None = None,
    dtype: Any = "float64",
) -> dict[str, np.ndarray]:
    """Random parameters for :func:`attention_ref.blocks.res_block_forward`.

    Inputs:
        c_in, c_out: the block's input and output channels; time_dim: ``D_t``, the time embedding's width.
        rng, dtype: as in :func:`init_self_attention`.

    Returns:
        ``"norm1.*"`` ``(C_in,)``, ``"conv1.*"`` ``(3, 3, C_in, C_out)``, ``"time.*"`` ``(D_t, C_out)``,
        ``"norm2.*"`` ``(C_out,)``, ``"conv2.*"`` ``(3, 3, C_out, C_out)`` and, when ``C_in ≠ C_out``, the 1×1
        skip ``"skip.*"`` ``(C_in, C_out)``. ``conv2`` starts at zero, so a fresh block is the identity (or its
        skip), as in OpenAI's guided-diffusion U-Net: randomise it to test the residual branch.
    """
    check_sizes("init_res_block", c_in=c_in, c_out=c_out, time_dim=time_dim)
    rng = np.random.default_rng(rng)
    params: dict[str, np.ndarray] = {}
    init_norm(params, "norm1", c_in, dtype=dtype)
    init_conv(params, "conv1", 3, c_in, c_out, rng=rng, dtype=dtype)
    init_linear(params, "time", time_dim, c_out, bias=True, rng=rng, dtype=dtype)
    init_norm(params, "norm2", c_out, dtype=dtype)
    init_conv(params, "conv2", 3, c_out, c_out, rng=rng, dtype=dtype, zero=True)
    if c_in != c_out:
        init_linear(params, "skip", c_in, c_out, bias=True, rng=rng, dtype=dtype)
    return params
