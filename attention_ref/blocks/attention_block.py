r"""The attention block on a channels-last feature map, shared by self- and cross-attention.

Forward, for a map ``x`` of ``H×W`` pixels with ``C`` channels (``N = H·W`` tokens,
token ``n = row·W + col``) and, for cross-attention, a context of ``M`` tokens of
width ``D``:

.. math::
    h &= \operatorname{GroupNorm}(x) \quad(\text{or } h = x \text{ without "norm.weight"}) \\
    Q &= h W_q + b_q, \qquad K = s W_k + b_k, \qquad V = s W_v + b_v,
        \qquad s = h \text{ (self) or the context (cross)} \\
    O_j &= \operatorname{softmax}(\text{scale}\cdot Q_j K_j^\top)\, V_j \quad\text{for each head } j \\
    y &= (x + O W_o + b_o) / \text{rescale} \quad(\text{or } (O W_o + b_o)/\text{rescale} \text{ without the residual})

``W_q (C, inner)``, ``W_k, W_v (C or D, inner)``, ``W_o (inner, C_out)``; heads are
split head-major (channel ``c = j·d + i`` of ``inner = heads·d`` is entry ``i`` of
head ``j``), and ``scale`` defaults to ``1/sqrt(d)``.

Backward runs the same steps in reverse with the ops' own backward passes:

* ``y = (x + P)/r``  ⇒  ``dP = dy/r`` and a direct ``dx = dy/r`` when residual;
* ``P = O W_o + b_o``, ``Q = h W_q + b_q`` … : :func:`attention_ref.linear_backward`;
* the heads: :func:`attention_ref.attention_backward` through split/merge (which only move entries);
* self-attention: ``h`` feeds Q, K and V, so ``dh = dh_Q + dh_K + dh_V``;
  cross-attention: ``dh = dh_Q`` and ``dcontext = dcontext_K + dcontext_V``;
* ``h = GroupNorm(x)``: :func:`attention_ref.group_norm_backward`.

Padded context tokens (``context_mask`` False) get weight 0 from every query, so
they change neither the output nor any gradient, and their own gradient is 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._checks import require_bool, require_floating
from ..backend import namespace
from ..ops.group_norm import GroupNormCache, group_norm_backward, group_norm_forward
from ..ops.heads import merge_heads, split_heads
from ..ops.linear import LinearCache, linear_backward, linear_forward
from .attend import AttendCache, attend_backward, attend_forward
from .params import check_keys, check_param_dtypes

__all__ = ["AttentionBlockCache", "attention_block_backward", "attention_block_forward"]

_WEIGHTS = ("q.weight", "k.weight", "v.weight", "out.weight")
_OPTIONAL = ("norm.weight", "norm.bias", "q.bias", "k.bias", "v.bias", "out.bias")


@dataclass(frozen=True)
class AttentionBlockCache:
    """What the backward pass needs. ``weights`` gives the attention weights for plotting."""

    norm: GroupNormCache | None  # None when the block has no group norm
    q: LinearCache
    k: LinearCache
    v: LinearCache
    attention: AttendCache  # the per-head attention, weights inside
    out: LinearCache
    heads: int
    residual: bool
    rescale: float
    x_shape: tuple[int, ...]  # (B, H, W, C) or (H, W, C), as given
    context_shape: tuple[int, ...] | None  # (B, M, D) or (M, D); None for self-attention

    @property
    def batched(self) -> bool:
        return len(self.x_shape) == 4

    @property
    def weights(self) -> Any:
        """``(B, heads, H·W, M)`` (``M = H·W`` for self-attention); no ``B`` axis when ``x`` had none.

        Row ``n = row·W + col`` holds the weights of that query pixel; they sum to 1
        (to 0 when every context token is masked).
        """
        w = self.attention.weights
        return w if self.batched else w[0, ...]


def _fail(where: str, message: str) -> None:
    raise ValueError(f"{where}: {message}")


def _check_shapes(
    params: Mapping[str, Any], C: int, source_width: int, heads: int, residual: bool, where: str, is_cross: bool
) -> tuple[int, int]:
    """Check every parameter's shape against ``C`` channels; return ``(inner, C_out)``."""
    for name in _WEIGHTS:
        if params[name].ndim != 2:
            _fail(where, f"{name} must be a matrix (in, out), got shape {tuple(params[name].shape)}")
    q_in, inner = params["q.weight"].shape
    if q_in != C:
        _fail(where, f"q.weight of shape {(q_in, inner)} expects {q_in} input channels but x has {C}")
    source = "context width" if is_cross else "x's channels"
    for name in ("k.weight", "v.weight"):
        shape = tuple(params[name].shape)
        if shape[0] != source_width:
            _fail(where, f"{name} of shape {shape} expects {shape[0]} input channels; the {source} is {source_width}")
        if shape[1] != inner:
            _fail(where, f"{name} of shape {shape} does not match q.weight's {inner} output channels")
    out_in, C_out = params["out.weight"].shape
    if out_in != inner:
        _fail(where, f"out.weight of shape {(out_in, C_out)} expects {out_in} inputs but q/k/v give {inner}")
    if heads < 1 or inner % heads != 0:
        _fail(where, f"{inner} attention channels are not divisible into {heads} heads")
    if residual and C_out != C:
        _fail(where, f"the residual needs out.weight to return {C} channels, it returns {C_out}")
    for name, n in (("q.bias", inner), ("k.bias", inner), ("v.bias", inner), ("out.bias", C_out)):
        if name in params and tuple(params[name].shape) != (n,):
            _fail(where, f"{name} of shape {tuple(params[name].shape)} should be ({n},)")
    if "norm.bias" in params and "norm.weight" not in params:
        _fail(where, "norm.bias is given without norm.weight")
    return inner, C_out


def attention_block_forward(
    x: Any,
    context: Any | None,
    params: Mapping[str, Any],
    *,
    heads: int,
    groups: int = 32,
    eps: float = 1e-6,
    residual: bool = True,
    rescale: float = 1.0,
    scale: float | None = None,
    context_mask: Any | None = None,
    where: str = "attention block",
) -> tuple[Any, AttentionBlockCache]:
    """Self-attention (``context=None``) or cross-attention block on a channels-last map.

    See :func:`attention_ref.self_attention_forward` and
    :func:`attention_ref.cross_attention_forward` for the inputs; ``where``
    prefixes error messages.
    """
    is_cross = context is not None
    xp = namespace(x, context, context_mask, *params.values())
    require_floating(xp, "x", x)
    if x.ndim not in (3, 4):
        _fail(where, f"x must be (B, H, W, C) or (H, W, C), got shape {tuple(x.shape)}")
    check_keys(params, required=_WEIGHTS, optional=_OPTIONAL, where=where)
    check_param_dtypes(x, params, where)
    batched = x.ndim == 4
    xb = x if batched else xp.reshape(x, (1, *x.shape))  # (B, H, W, C)
    B, H, W, C = xb.shape
    N = H * W

    source_width = C
    if is_cross:
        require_floating(xp, "context", context)
        if context.dtype != x.dtype:
            raise TypeError(f"{where}: context has dtype {context.dtype} but x has dtype {x.dtype}")
        want = 3 if batched else 2
        if context.ndim != want or (batched and context.shape[0] != B):
            expected = f"({B}, M, D)" if batched else "(M, D)"
            _fail(where, f"context must be {expected} for x of shape {tuple(x.shape)}, got {tuple(context.shape)}")
        source_width = context.shape[-1]
    elif context_mask is not None:
        _fail(where, "context_mask is only for cross-attention")
    _, C_out = _check_shapes(params, C, source_width, heads, residual, where, is_cross)

    # h = GroupNorm(x), or x itself when the block has no norm   (B, H, W, C)
    norm_cache = None
    h = xb
    if "norm.weight" in params:
        if groups < 1 or C % groups != 0:
            _fail(where, f"{C} channels are not divisible into {groups} groups")
        h, norm_cache = group_norm_forward(xb, params["norm.weight"], params.get("norm.bias"), groups=groups, eps=eps)
    tokens = xp.reshape(h, (B, N, C))  # (B, N, C), token n = row·W + col
    source = tokens
    if is_cross:
        source = context if batched else xp.reshape(context, (1, *context.shape))  # (B, M, D)
    M = source.shape[1]

    mask = None
    if context_mask is not None:
        require_bool(xp, "context_mask", context_mask)
        allowed = {(M,), (B, M)} if batched else {(M,)}
        if tuple(context_mask.shape) not in allowed:
            _fail(where, f"context_mask of shape {tuple(context_mask.shape)} should be one of {sorted(allowed)}")
        key_mask = xp.reshape(context_mask, (-1, M))  # (B or 1, M)
        mask = xp.reshape(key_mask, (key_mask.shape[0], 1, 1, M))  # (B or 1, 1, 1, M): same keys for every head, query

    # Q = h W_q + b_q   (B, N, inner);  K, V from the source   (B, M, inner)
    q, q_cache = linear_forward(tokens, params["q.weight"], params.get("q.bias"))
    k, k_cache = linear_forward(source, params["k.weight"], params.get("k.bias"))
    v, v_cache = linear_forward(source, params["v.weight"], params.get("v.bias"))
    # split heads head-major   (B, heads, N or M, d)
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    # O_j = softmax(scale · Q_j K_jᵀ) V_j   (B, heads, N, d)
    oh, attend_cache = attend_forward(qh, kh, vh, grid=(H, W), mask=mask, scale=scale)
    o = merge_heads(oh)  # (B, N, inner)
    # P = O W_o + b_o   (B, N, C_out)
    proj, out_cache = linear_forward(o, params["out.weight"], params.get("out.bias"))
    proj = xp.reshape(proj, (B, H, W, C_out))  # (B, H, W, C_out)
    # y = (x + P) / rescale, or P / rescale
    y = (xb + proj) / rescale if residual else proj / rescale
    if not batched:
        y = xp.reshape(y, (H, W, C_out))
    cache = AttentionBlockCache(
        norm=norm_cache,
        q=q_cache,
        k=k_cache,
        v=v_cache,
        attention=attend_cache,
        out=out_cache,
        heads=heads,
        residual=residual,
        rescale=float(rescale),
        x_shape=tuple(x.shape),
        context_shape=None if context is None else tuple(context.shape),
    )
    return y, cache


def _output_shape(cache: AttentionBlockCache) -> tuple[int, ...]:
    """The shape of ``y``: ``x``'s with ``C_out`` channels."""
    return (*cache.x_shape[:-1], cache.out.W.shape[1])


def _linear_grads(grads: dict[str, Any], name: str, g: Mapping[str, Any]) -> Any:
    """Store a linear layer's weight/bias gradients under ``name``; return its input gradient."""
    grads[f"{name}.weight"] = g["W"]
    if "b" in g:
        grads[f"{name}.bias"] = g["b"]
    return g["x"]


def attention_block_backward(dy: Any, cache: AttentionBlockCache) -> dict[str, Any]:
    """Gradients of :func:`attention_block_forward`: ``"x"``, ``"context"`` (cross only), every params key."""
    xp = namespace(dy)
    if tuple(dy.shape) != _output_shape(cache):
        raise ValueError(f"dy of shape {tuple(dy.shape)} does not match the output shape {_output_shape(cache)}")
    B, H, W = cache.x_shape[:3] if cache.batched else (1, *cache.x_shape[:2])
    C = cache.x_shape[-1]
    N = H * W
    grads: dict[str, Any] = {}
    # y = (x + P) / r   ⇒   dP = dy / r  (and dx gets dy / r straight through the residual)
    dproj = dy / cache.rescale
    C_out = dy.shape[-1]
    dproj = xp.reshape(dproj, (B, N, C_out))  # (B, N, C_out)
    # P = O W_o + b_o
    do = _linear_grads(grads, "out", linear_backward(dproj, cache.out))  # (B, N, inner)
    # heads: dO → dQ, dK, dV   (B, heads, ·, d), merged back to (B, ·, inner)
    dheads = attend_backward(split_heads(do, cache.heads), cache.attention)
    dq, dk, dv = merge_heads(dheads["q"]), merge_heads(dheads["k"]), merge_heads(dheads["v"])
    dtokens = _linear_grads(grads, "q", linear_backward(dq, cache.q))  # (B, N, C)
    d_source_k = _linear_grads(grads, "k", linear_backward(dk, cache.k))  # (B, M, C or D)
    d_source_v = _linear_grads(grads, "v", linear_backward(dv, cache.v))
    if cache.context_shape is None:
        # h feeds Q, K and V: dh = dh_Q + dh_K + dh_V
        dtokens = dtokens + d_source_k + d_source_v
    else:
        # the context feeds K and V: dcontext = dcontext_K + dcontext_V
        grads["context"] = xp.reshape(d_source_k + d_source_v, cache.context_shape)
    dh = xp.reshape(dtokens, (B, H, W, C))  # (B, H, W, C)
    dx = dh
    if cache.norm is not None:
        g = group_norm_backward(dh, cache.norm)
        grads["norm.weight"] = g["weight"]
        if "bias" in g:
            grads["norm.bias"] = g["bias"]
        dx = g["x"]
    dx = xp.reshape(dx, cache.x_shape)
    if cache.residual:
        dx = dx + dy / cache.rescale
    grads["x"] = dx
    return grads
