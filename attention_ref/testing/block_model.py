r"""The block's rounding model: a diffusers ``Attention`` block simulated op by op, and the magnitudes of its terms.

The block checks (:mod:`.blocks`) allow ``c·(the simulated blocks' error) + f·ε·max‖X‖``, the shape of
:mod:`.tolerance`'s rule, with the block's own versions of both terms:

* The simulated block (:func:`simulated_block`) runs the block's chain of operations — the group norm, each
  projection, the attention (:func:`.simulation.simulate_attention_core`, the same model as the kernel check's),
  the residual sum, and on the way back every gradient between them — in float64, adding to every operation's
  result the errors of :mod:`.rounding`: each sum's any-order error (``√n·u·Σ|terms|``), each product's rounding,
  and the rounding of every result the operation hands on to the dtype. A module in float16 rounds a dozen times
  (every op returns the dtype, ``x W`` may be rounded before ``+ b``, ``Q Kᵀ`` before it is scaled, as PyTorch's
  CPU half-precision ``Linear`` and ``baddbmm`` do); all of these are in the model. The yardstick
  (:func:`block_yardstick`) is the root-mean-square over ``Policy.samples`` simulated blocks of their largest
  error.
* ``‖X‖`` (:func:`block_magnitudes`) is the root-sum-square of the terms each entry is summed from, carried along
  the block's formulas — the typical size of one rounding of every term — and the floor takes
  ``max(‖X‖, |X₆₄|)``. It does not vanish where a gradient is zero by cancellation (a key bias always gets 0; with
  a one-token context ``dS = 0``, and with it ``dq``, ``dk`` and their weights' gradients). The kernel check's
  sums of absolute values would compound over the block's chain of layers into a floor far above any error.

:func:`linear` and :func:`attention_by_head` are also the steps of the diffusion transformers' chains
(:mod:`.transformer_calls`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ..attention.inputs import default_scale
from ..blocks import cross_attention_backward, cross_attention_forward, self_attention_backward, self_attention_forward
from ..ops.group_norm import group_norm_forward
from ..ops.heads import merge_heads, split_heads
from ..ops.softmax import softmax_forward
from .rounding import RoundingModel, largest_error_rms
from .rounding import transpose as _t
from .simulation import simulate_attention_core

__all__ = [
    "BlockCall",
    "attention_by_head",
    "block_magnitudes",
    "block_reference",
    "block_yardstick",
    "linear",
    "simulated_block",
]


def linear(r: RoundingModel, x: np.ndarray, p: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """``x W + b``: the sum over the input width in any order; ``x W`` stored in the dtype before ``+ b`` or not."""
    y = r.rel(r.matmul(x, p[f"{name}.weight"]), r.w)
    return y if f"{name}.bias" not in p else r.rel(y + p[f"{name}.bias"], r.u, r.w)


def _linear_back(
    r: RoundingModel, dy: np.ndarray, x: np.ndarray, p: Mapping[str, np.ndarray], name: str, grads: dict
) -> np.ndarray:
    """Weight (and bias) gradients into ``grads``, summed over every token; returns ``dx = dy Wᵀ``."""
    width_in, width_out = p[f"{name}.weight"].shape
    tokens_in, tokens_out = x.reshape(-1, width_in), dy.reshape(-1, width_out)  # (tokens, width)
    grads[f"{name}.weight"] = r.rel(r.matmul(tokens_in.T, tokens_out), r.w)
    if f"{name}.bias" in p:
        grads[f"{name}.bias"] = r.rel(r.sum(tokens_out, axis=0)[0], r.w)
    return r.rel(r.matmul(dy, p[f"{name}.weight"].T), r.w)


def _group_norm(
    r: RoundingModel, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, groups: int, eps: float
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """GroupNorm of ``x (B, H, W, C)``: mean, then variance of the centred values, each a sum in any order."""
    B, C = x.shape[0], x.shape[-1]
    xg = x.reshape(B, -1, groups, C // groups)  # (B, S, G, C/G)
    n = xg.shape[1] * xg.shape[3]
    centred = r.rel(xg - r.sum(xg, axis=(1, 3)) / n, r.u)
    var = r.sum(r.rel(centred * centred, r.u), axis=(1, 3)) / n  # (B, 1, G, 1)
    rstd = r.rel(1.0 / np.sqrt(var + eps), 2 * r.u)
    xhat = r.rel(centred * rstd, r.u)
    h = xhat.reshape(x.shape) * weight + (0.0 if bias is None else bias)
    return r.rel(h, r.u, r.w), (xhat, rstd)


def _group_norm_back(
    r: RoundingModel, dh: np.ndarray, cache: tuple[np.ndarray, np.ndarray], p: Mapping[str, np.ndarray], grads: dict
) -> np.ndarray:
    """``dx = rstd·(g − mean g − x̂·mean(g x̂))`` per group with ``g = dh γ``; ``dγ``, ``dβ`` into ``grads``."""
    xhat, rstd = cache
    C = dh.shape[-1]
    flat_dh, flat_xhat = dh.reshape(-1, C), xhat.reshape(-1, C)  # (B·S, C)
    grads["norm.weight"] = r.rel(r.sum(r.rel(flat_dh * flat_xhat, r.u), axis=0)[0], r.w)
    if "norm.bias" in p:
        grads["norm.bias"] = r.rel(r.sum(flat_dh, axis=0)[0], r.w)
    g = r.rel(dh * p["norm.weight"], r.u).reshape(xhat.shape)  # (B, S, G, C/G)
    n = xhat.shape[1] * xhat.shape[3]
    mean_g = r.sum(g, axis=(1, 3)) / n
    mean_gx = r.sum(r.rel(g * xhat, r.u), axis=(1, 3)) / n
    dx = rstd * r.rel(r.rel(g - mean_g, r.u) - r.rel(xhat * mean_gx, r.u), r.u)
    return r.rel(dx, r.u, r.w).reshape(dh.shape)


def attention_by_head(
    r: RoundingModel,
    qh: np.ndarray,
    kh: np.ndarray,
    vh: np.ndarray,
    do: np.ndarray | None,
    mask: Any,
    scale: Any,
    arithmetic: str,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """:func:`simulate_attention_core` one (sample, head) at a time, so that no ``(B, heads, N, M)`` array is held."""
    B, heads, N, _ = qh.shape
    M = kh.shape[-2]
    masks = None if mask is None else np.broadcast_to(mask, (B, heads, N, M))
    out = np.empty((*qh.shape[:-1], vh.shape[-1]))
    grads = {n: np.empty(a.shape) for n, a in (("dq", qh), ("dk", kh), ("dv", vh))} if do is not None else {}
    for b in range(B):
        for h in range(heads):
            one = None if do is None else do[b, h]
            out[b, h], g = simulate_attention_core(
                r,
                qh[b, h],
                kh[b, h],
                vh[b, h],
                one,
                None,
                None if masks is None else masks[b, h],
                scale,
                arithmetic=arithmetic,
            )
            for n, a in g.items():
                grads[n][b, h] = a
    return out, grads


@dataclass(frozen=True)
class BlockCall:
    """One call of a map block (:func:`attention_ref.self_attention_forward` or ``cross_attention_forward``):
    what the block model reads.

    Fields:
        x: ``(B, H, W, C)``.
        context: ``(B, M, D)`` for cross-attention, ``None`` for self-attention.
        params: as for :func:`attention_ref.self_attention_forward` / ``cross_attention_forward``.
        options: the block's keyword options as one mapping, as for :func:`attention_ref.self_attention_forward`
            (and as :func:`attention_ref.interop.from_diffusers` returns them): ``"heads"`` (required; divides
            ``inner``, ``d = inner/heads``), ``"groups"`` (32) and ``"eps"`` (1e-6) of the group norm,
            ``"residual"`` (True: ``x`` added), ``"rescale"`` (1.0: the output divided by it), ``"scale"``
            (``None``: ``1/sqrt(d)``). ``ValueError`` for any other key, when the call is read.
        dy: ``(B, H, W, C_out)``, the output's gradient; ``None`` for the forward only.
        context_mask: ``(B, M)`` (cross-attention) and mask: broadcastable to ``(B, heads, H·W, H·W)``
            (self-attention), True = may attend.
    """

    x: np.ndarray
    context: np.ndarray | None
    params: Mapping[str, np.ndarray]
    options: Mapping[str, Any]
    dy: np.ndarray | None = None
    context_mask: np.ndarray | None = None
    mask: np.ndarray | None = None


def _block_inputs(call: BlockCall) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray], np.ndarray | None]:
    """``x``, ``context`` and ``params`` in float64, and the attention's mask: ``mask``, or the context mask
    as ``(B, 1, 1, M)``."""
    p = {n: np.asarray(a, dtype=np.float64) for n, a in call.params.items()}
    context = None if call.context is None else np.asarray(call.context, dtype=np.float64)
    mask = call.mask
    if call.context_mask is not None:
        mask = np.asarray(call.context_mask).reshape(-1, 1, 1, call.context_mask.shape[-1])  # (B, 1, 1, M)
    return np.asarray(call.x, dtype=np.float64), context, p, mask


@dataclass(frozen=True)
class _BlockOptions:
    """The map block's options, defaulting as :func:`attention_ref.self_attention_forward` does."""

    heads: int
    groups: int = 32  # the group norm's groups
    eps: float = 1e-6  # the group norm's variance epsilon
    residual: bool = True  # x + the projection
    rescale: float = 1.0  # the output (and so dy) divided by it
    scale: float | None = None  # multiplies q kᵀ; None for 1/sqrt(d)


def _block_options(options: Mapping[str, Any]) -> _BlockOptions:
    """``options`` (as :func:`attention_ref.interop.from_diffusers` returns them) read into :class:`_BlockOptions`.

    ``ValueError`` naming the keys a map block does not take, or for a missing ``"heads"``.
    """
    unknown = sorted(set(options) - {f.name for f in fields(_BlockOptions)}, key=str)
    if unknown:
        raise ValueError(f"options {unknown} are not a map block's (heads, groups, eps, residual, rescale, scale)")
    if "heads" not in options:
        raise ValueError(f"options must hold 'heads'; got {sorted(options, key=str)}")
    return _BlockOptions(**options)


def simulated_block(
    call: BlockCall, *, dtype: str, rng: np.random.Generator, arithmetic: str = "eager"
) -> dict[str, np.ndarray]:
    """One simulated block in ``dtype``: the reference block in float64 with every error of :mod:`.rounding` drawn once.

    Inputs:
        call: the block's inputs and options (:class:`BlockCall`); ``call.dy = None`` for the forward only.
        dtype: the dtype under test; rng: where the errors come from; arithmetic: the attention's, ``"fused"``
            or ``"eager"`` (:class:`~attention_ref.testing.Policy`).

    Returns:
        ``{"y"}`` and, with ``call.dy``, ``"x"``, ``"context"`` (cross-attention) and every params key: float64.
    """
    opts = _block_options(call.options)
    r = RoundingModel(dtype, rng)
    x, context, p, attn_mask = _block_inputs(call)
    dy = call.dy
    B, H, W, C = x.shape
    h, norm = x, None
    if "norm.weight" in p:
        h, norm = _group_norm(r, x, p["norm.weight"], p.get("norm.bias"), opts.groups, opts.eps)
    tokens = h.reshape(B, H * W, C)  # (B, N, C)
    source = tokens if context is None else context  # (B, M, D)
    q, k, v = (linear(r, a, p, n) for a, n in ((tokens, "q"), (source, "k"), (source, "v")))
    qh, kh, vh = (split_heads(a, opts.heads) for a in (q, k, v))  # (B, heads, ·, d)
    do = None
    if dy is not None:
        dsum = np.asarray(dy, dtype=np.float64)
        dsum = r.rel(dsum / opts.rescale, r.u, r.w) if opts.rescale != 1.0 else dsum
        do = split_heads(r.rel(r.matmul(dsum.reshape(B, H * W, -1), p["out.weight"].T), r.w), opts.heads)
    oh, g = attention_by_head(r, qh, kh, vh, do, attn_mask, opts.scale, arithmetic)
    o = merge_heads(oh)  # (B, N, inner)
    proj = linear(r, o, p, "out").reshape(B, H, W, -1)
    y = r.rel(x + proj, r.u, r.w) if opts.residual else proj
    y = r.rel(y / opts.rescale, r.u, r.w) if opts.rescale != 1.0 else y
    if dy is None:
        return {"y": y}
    grads: dict[str, np.ndarray] = {"y": y}
    _linear_back(r, dsum.reshape(B, H * W, -1), o, p, "out", grads)
    d_tokens = _linear_back(r, merge_heads(g["dq"]), tokens, p, "q", grads)
    d_source = r.rel(
        _linear_back(r, merge_heads(g["dk"]), source, p, "k", grads)
        + _linear_back(r, merge_heads(g["dv"]), source, p, "v", grads),
        r.u,
        r.w,
    )
    if context is None:
        d_tokens = r.rel(d_tokens + d_source, r.u, r.w)
    else:
        grads["context"] = d_source
    dx = d_tokens.reshape(B, H, W, C)
    if norm is not None:
        dx = _group_norm_back(r, dx, norm, p, grads)
    grads["x"] = r.rel(dx + dsum, r.u, r.w) if opts.residual else dx
    return grads


@dataclass
class _Forward:
    """The exact forward's values the magnitudes need."""

    x: np.ndarray  # (B, H, W, C)
    p: dict[str, np.ndarray]
    norm: Any | None  # GroupNormCache
    tokens: np.ndarray  # h as (B, N, C)
    source: np.ndarray  # (B, M, D): tokens, or the context
    qh: np.ndarray  # (B, heads, N, d)
    kh: np.ndarray  # (B, heads, M, d)
    vh: np.ndarray
    P: np.ndarray  # (B, heads, N, M)
    oh: np.ndarray  # (B, heads, N, d)
    o: np.ndarray  # (B, N, inner)
    scale: float


def _exact_forward(
    x: np.ndarray, context: np.ndarray | None, p: dict[str, np.ndarray], opts: _BlockOptions, mask: np.ndarray | None
) -> _Forward:
    """The exact block's forward on :func:`_block_inputs`' float64 arrays."""
    B, H, W, C = x.shape
    h, norm = x, None
    if "norm.weight" in p:
        h, norm = group_norm_forward(x, p["norm.weight"], p.get("norm.bias"), groups=opts.groups, eps=opts.eps)
    tokens = h.reshape(B, H * W, C)
    source = tokens if context is None else context

    def project(a: np.ndarray, name: str) -> np.ndarray:
        return a @ p[f"{name}.weight"] + p.get(f"{name}.bias", 0.0)

    qh, kh, vh = (split_heads(project(a, n), opts.heads) for a, n in ((tokens, "q"), (source, "k"), (source, "v")))
    scale = default_scale(qh.shape[-1]) if opts.scale is None else opts.scale  # the reference block's default
    P, _ = softmax_forward(scale * (qh @ _t(kh)), mask=mask)
    oh = P @ vh
    return _Forward(x, p, norm, tokens, source, qh, kh, vh, P, oh, merge_heads(oh), scale)


def block_magnitudes(call: BlockCall) -> dict[str, float]:
    """``max‖X‖`` for ``y`` and (with ``dy``) every gradient: the root-sum-square of the terms each entry sums.

    Every sum ``Σ_k a_k b_k`` on the way is replaced by ``sqrt(Σ_k a_k² b_k²)``, the typical size of
    its rounding errors when each term is off by one unit in its last place with a random sign.
    Unlike ``|X|`` it does not vanish where a gradient is zero by cancellation (a one-token context
    makes ``dS``, and with it ``dq`` and the query and key weights' gradients, exactly 0).

    Inputs:
        call: the block's inputs and options (:class:`BlockCall`).

    Returns:
        ``{"y": max‖y‖}`` and, with ``call.dy``, the same for ``"x"``, ``"context"`` (cross-attention) and every params
        key: floats.
    """
    opts = _block_options(call.options)
    x, context, p, attn_mask = _block_inputs(call)
    f = _exact_forward(x, context, p, opts, attn_mask)
    sq = {n: w * w for n, w in f.p.items()}  # squared weights
    B, H, W, C = f.x.shape
    out: dict[str, np.ndarray] = {}  # squared magnitudes

    def linear_back(g2: np.ndarray, inp: np.ndarray, name: str) -> np.ndarray:
        width_in, width_out = sq[f"{name}.weight"].shape
        out[f"{name}.weight"] = (inp * inp).reshape(-1, width_in).T @ g2.reshape(-1, width_out)
        if f"{name}.bias" in sq:
            out[f"{name}.bias"] = g2.reshape(-1, width_out).sum(axis=0)
        return g2 @ sq[f"{name}.weight"].T

    proj2 = (f.o * f.o) @ sq["out.weight"] + (sq["out.bias"] if "out.bias" in sq else 0.0)
    out["y"] = ((f.x * f.x if opts.residual else 0.0) + proj2.reshape(B, H, W, -1)) / opts.rescale**2
    if call.dy is None:
        return {"y": float(np.sqrt(np.max(out["y"])))}
    dsum2 = np.asarray(call.dy, dtype=np.float64) ** 2 / opts.rescale**2
    do2 = split_heads(linear_back(dsum2.reshape(B, H * W, -1), f.o, "out"), opts.heads)
    P2 = f.P * f.P
    dvh2 = _t(P2) @ do2
    # ‖dS‖² = P² ∘ (‖dO‖² V² + Σ_c ‖dO‖² O²): the terms of dP and of D = dO·O
    dS2 = P2 * (do2 @ _t(f.vh * f.vh) + np.sum(do2 * f.oh * f.oh, axis=-1, keepdims=True))
    dqh2, dkh2 = f.scale**2 * (dS2 @ (f.kh * f.kh)), f.scale**2 * (_t(dS2) @ (f.qh * f.qh))
    d_tokens2 = linear_back(merge_heads(dqh2), f.tokens, "q")
    d_source2 = linear_back(merge_heads(dkh2), f.source, "k") + linear_back(merge_heads(dvh2), f.source, "v")
    if context is None:
        d_tokens2 = d_tokens2 + d_source2
    else:
        out["context"] = d_source2
    dx2 = d_tokens2.reshape(B, H, W, C)
    if f.norm is not None:
        # dx = r (g − mean g − x̂ mean(g x̂)) per group, g = dh γ  ⇒  ‖dx‖² = r² (‖g‖² + mean ‖g‖² + x̂² mean(‖g‖² x̂²))
        xhat2 = f.norm.xhat**2  # (B, S, G, C/G)
        out["norm.weight"] = (dx2.reshape(-1, C) * xhat2.reshape(-1, C)).sum(axis=0)
        out["norm.bias"] = dx2.reshape(-1, C).sum(axis=0)
        g2 = (dx2 * sq["norm.weight"]).reshape(xhat2.shape)
        g_mean = np.mean(g2, axis=(1, 3), keepdims=True)
        gx_mean = np.mean(g2 * xhat2, axis=(1, 3), keepdims=True)
        dx2 = (f.norm.rstd**2 * (g2 + g_mean + xhat2 * gx_mean)).reshape(B, H, W, C)
    out["x"] = dx2 + dsum2 if opts.residual else dx2
    keep = ("y", "x", "context", *call.params)
    return {n: float(np.sqrt(np.max(v))) if np.size(v) else 0.0 for n, v in out.items() if n in keep}


def block_reference(call: BlockCall) -> dict[str, np.ndarray]:
    """The float64 reference block's output ``"y"`` and (with ``call.dy``) its gradients."""
    if call.context is None:
        y, cache = self_attention_forward(call.x, call.params, mask=call.mask, **call.options)
        grads = {} if call.dy is None else self_attention_backward(call.dy, cache)
    else:
        y, cache = cross_attention_forward(
            call.x, call.context, call.params, context_mask=call.context_mask, **call.options
        )
        grads = {} if call.dy is None else cross_attention_backward(call.dy, cache)
    return {"y": y, **grads}


def block_yardstick(
    exact: Mapping[str, np.ndarray], call: BlockCall, *, dtype: str, samples: int, seed: Any, arithmetic: str = "eager"
) -> dict[str, float]:
    """Per output, the root-mean-square over ``samples`` simulated blocks of ``max|X_sim − X₆₄|``."""

    def simulate(r: RoundingModel) -> dict[str, np.ndarray]:
        return simulated_block(call, dtype=dtype, rng=r.rng, arithmetic=arithmetic)

    yard = largest_error_rms(simulate, exact, dtype, samples=samples, seed=seed)
    return {n: errors[0] for n, errors in yard.items()}
