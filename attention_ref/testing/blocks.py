r"""``check_diffusers_attention``: a diffusers ``Attention`` module against the reference block.

The module is cast to the dtype under test and run forward and backward by
PyTorch on a few input maps; its output, input gradients (``x`` and, for
cross-attention, the context) and every weight gradient are compared with
:func:`attention_ref.self_attention_forward` / :func:`attention_ref.cross_attention_forward`
and their backward passes in float64, on the same (rounded) inputs and weights,
loaded through :func:`attention_ref.interop.from_diffusers`.
:func:`check_attention_call` judges one recorded call (forward only) by the same rule.

The tolerance has the shape of :mod:`.tolerance`'s, ``c·(the simulated kernels' error)
+ f·ε·max‖X‖``, with the block's own versions of both terms:

* The simulated block (:func:`simulated_block`) runs the block's chain of operations —
  the group norm, each projection, the attention (:func:`.tolerance.simulate_attention_core`,
  the same model as the kernel check's), the residual sum, and on the way back every
  gradient between them — in float64, adding to every operation's result the errors of
  :mod:`.rounding`: each sum's any-order error (``√n·u·Σ|terms|``), each product's
  rounding, and the rounding of every result the operation hands on to the dtype. A
  module in float16 rounds a dozen times (every op returns the dtype, ``x W`` may be
  rounded before ``+ b``, ``Q Kᵀ`` before it is scaled, as PyTorch's CPU half-precision
  ``Linear`` and ``baddbmm`` do); all of these are in the model. The yardstick is the
  root-mean-square over ``Policy.samples`` simulated blocks of their largest error.
* ``‖X‖`` (:func:`block_magnitudes`) is the root-sum-square of the terms each entry is
  summed from, carried along the block's formulas — the typical size of one rounding of
  every term — and the floor takes ``max(‖X‖, |X₆₄|)``. It does not vanish where a
  gradient is zero by cancellation (a key bias always gets 0; with a one-token context
  ``dS = 0``, and with it ``dq``, ``dk`` and their weights' gradients). The kernel check's
  sums of absolute values would compound over the block's chain of layers into a floor
  far above any error.

``c`` and ``f`` are the kernel check's: ``Policy.c["out"]`` for ``y``, ``Policy.c["dq"]`` for
every gradient; as there, each output's own last rounding to the dtype (half a spacing at the value
returned) is deducted from its error entry by entry. The policy is the one that matches the module's
arithmetic (:func:`module_policy`): ``fused`` when its processor calls PyTorch's
``scaled_dot_product_attention`` (``AttnProcessor2_0``: every SDPA backend keeps the logits and the
softmax in float32), ``eager`` otherwise (``AttnProcessor``, ``SlicedAttnProcessor``: ``baddbmm`` and
``softmax`` in the dtype); a ``policy`` argument overrides it, and every report names the policy it used.
See ``docs/oracle.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..blocks import cross_attention_backward, cross_attention_forward, self_attention_backward, self_attention_forward
from ..interop import from_diffusers, to_diffusers
from ..ops.group_norm import group_norm_forward
from ..ops.heads import merge_heads, split_heads
from ..ops.softmax import softmax_forward
from .dtypes import DTYPES, numpy_dtype, round_to
from .harness import compare_output, exception_check
from .report import OutputCheck, Report
from .rounding import RoundingModel
from .tolerance import EAGER, FUSED, Policy, check_policy, simulate_attention_core
from .torch_wrap import numpy_to_torch, torch_to_numpy

__all__ = [
    "BLOCK_CASES",
    "BlockCase",
    "block_magnitudes",
    "check_attention_call",
    "check_diffusers_attention",
    "module_policy",
    "simulated_block",
]


def module_policy(attn: Any) -> Policy:
    """The policy that matches a diffusers ``Attention``'s arithmetic: ``fused`` when its processor's ``__call__``
    calls PyTorch's ``scaled_dot_product_attention`` (every SDPA backend keeps the logits and the softmax in float32
    or wider), ``eager`` otherwise (``AttnProcessor``'s ``baddbmm`` and ``softmax`` return the dtype op by op; a
    processor whose source cannot be read, or ``(params, options)``, is judged eager too: the wider rule)."""
    processor = getattr(attn, "processor", None)
    try:
        source = inspect.getsource(type(processor).__call__)
    except (OSError, TypeError):
        return EAGER
    return FUSED if "scaled_dot_product_attention(" in source else EAGER


def _choose(policy: Policy | str | None, attn: Any) -> Policy:
    return module_policy(attn) if policy is None else check_policy(policy)


@dataclass(frozen=True)
class BlockCase:
    """An input for a block: a ``(B, C, H, W)`` map and, for cross-attention, ``M`` context tokens.

    ``x_std`` scales the map (large values test the norm and the residual path); ``padded``
    context tokens (the last ``padded`` of each row but the first batch element's) are masked out.
    """

    name: str
    B: int
    H: int
    W: int
    M: int = 7
    x_std: float = 1.0
    padded: int = 0


BLOCK_CASES = (
    BlockCase("map 5×4", 2, 5, 4),
    BlockCase("odd map 3×7", 1, 3, 7, M=11),
    BlockCase("one pixel", 2, 1, 1, M=1),
    BlockCase("large values", 2, 4, 4, x_std=20.0),
    BlockCase("padded context", 2, 4, 3, M=9, padded=4),
)


def _t(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


def _linear(r: RoundingModel, x: np.ndarray, p: Mapping[str, np.ndarray], name: str) -> np.ndarray:
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


def _attention_slices(
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


def simulated_block(
    x: np.ndarray,
    context: np.ndarray | None,
    params: Mapping[str, np.ndarray],
    dy: np.ndarray | None,
    *,
    dtype: str,
    rng: np.random.Generator,
    heads: int,
    groups: int = 32,
    eps: float = 1e-6,
    residual: bool = True,
    rescale: float = 1.0,
    scale: float | None = None,
    context_mask: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    arithmetic: str = "eager",
) -> dict[str, np.ndarray]:
    """One simulated block in ``dtype``: the reference block in float64 with every error of :mod:`.rounding` drawn once.

    Inputs:
        x: ``(B, H, W, C)``; context: ``(B, M, D)`` or ``None``; dy: ``(B, H, W, C_out)``, or ``None`` for the
            forward only.
        params, options (heads … scale): as for :func:`attention_ref.self_attention_forward` /
            ``cross_attention_forward``; context_mask: ``(B, M)`` (cross-attention) and mask: broadcastable to
            ``(B, heads, H·W, H·W)`` (self-attention), True = may attend.
        dtype: the dtype under test; rng: where the errors come from; arithmetic: the attention's, ``"fused"``
            or ``"eager"`` (:class:`~attention_ref.testing.Policy`).

    Returns:
        ``{"y"}`` and, with ``dy``, ``"x"``, ``"context"`` (cross-attention) and every params key: float64.
    """
    r = RoundingModel(dtype, rng)
    p = {n: np.asarray(a, dtype=np.float64) for n, a in params.items()}
    x = np.asarray(x, dtype=np.float64)
    B, H, W, C = x.shape
    h, norm = x, None
    if "norm.weight" in p:
        h, norm = _group_norm(r, x, p["norm.weight"], p.get("norm.bias"), groups, eps)
    tokens = h.reshape(B, H * W, C)  # (B, N, C)
    source = tokens if context is None else np.asarray(context, dtype=np.float64)  # (B, M, D)
    q, k, v = (_linear(r, a, p, n) for a, n in ((tokens, "q"), (source, "k"), (source, "v")))
    qh, kh, vh = (split_heads(a, heads) for a in (q, k, v))  # (B, heads, ·, d)
    attn_mask = mask
    if context_mask is not None:
        attn_mask = np.asarray(context_mask).reshape(-1, 1, 1, context_mask.shape[-1])  # (B, 1, 1, M)
    do = None
    if dy is not None:
        dsum = np.asarray(dy, dtype=np.float64)
        dsum = r.rel(dsum / rescale, r.u, r.w) if rescale != 1.0 else dsum
        do = split_heads(r.rel(r.matmul(dsum.reshape(B, H * W, -1), p["out.weight"].T), r.w), heads)
    oh, g = _attention_slices(r, qh, kh, vh, do, attn_mask, scale, arithmetic)
    o = merge_heads(oh)  # (B, N, inner)
    proj = _linear(r, o, p, "out").reshape(B, H, W, -1)
    y = r.rel(x + proj, r.u, r.w) if residual else proj
    y = r.rel(y / rescale, r.u, r.w) if rescale != 1.0 else y
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
    grads["x"] = r.rel(dx + dsum, r.u, r.w) if residual else dx
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


def _exact_forward(x: np.ndarray, context: np.ndarray | None, params: Mapping[str, np.ndarray], heads: int,
                   groups: int, eps: float, scale: float | None, mask: np.ndarray | None) -> _Forward:  # fmt: skip
    p = {n: np.asarray(a, dtype=np.float64) for n, a in params.items()}
    x = np.asarray(x, dtype=np.float64)
    B, H, W, C = x.shape
    h, norm = x, None
    if "norm.weight" in p:
        h, norm = group_norm_forward(x, p["norm.weight"], p.get("norm.bias"), groups=groups, eps=eps)
    tokens = h.reshape(B, H * W, C)
    source = tokens if context is None else np.asarray(context, dtype=np.float64)

    def linear(a: np.ndarray, name: str) -> np.ndarray:
        return a @ p[f"{name}.weight"] + p.get(f"{name}.bias", 0.0)

    qh, kh, vh = (split_heads(linear(a, n), heads) for a, n in ((tokens, "q"), (source, "k"), (source, "v")))
    scale = qh.shape[-1] ** -0.5 if scale is None else scale
    P, _ = softmax_forward(scale * (qh @ _t(kh)), mask=mask)
    oh = P @ vh
    return _Forward(x, p, norm, tokens, source, qh, kh, vh, P, oh, merge_heads(oh), scale)


def block_magnitudes(
    x: np.ndarray,
    context: np.ndarray | None,
    params: Mapping[str, np.ndarray],
    dy: np.ndarray | None,
    *,
    heads: int,
    groups: int = 32,
    eps: float = 1e-6,
    residual: bool = True,
    rescale: float = 1.0,
    scale: float | None = None,
    context_mask: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> dict[str, float]:
    """``max‖X‖`` for ``y`` and (with ``dy``) every gradient: the root-sum-square of the terms each entry sums.

    Every sum ``Σ_k a_k b_k`` on the way is replaced by ``sqrt(Σ_k a_k² b_k²)``, the typical size of
    its rounding errors when each term is off by one unit in its last place with a random sign.
    Unlike ``|X|`` it does not vanish where a gradient is zero by cancellation (a one-token context
    makes ``dS``, and with it ``dq`` and the query and key weights' gradients, exactly 0).
    """
    attn_mask = mask
    if context_mask is not None:
        attn_mask = np.asarray(context_mask).reshape(-1, 1, 1, context_mask.shape[-1])
    f = _exact_forward(x, context, params, heads, groups, eps, scale, attn_mask)
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
    out["y"] = ((f.x * f.x if residual else 0.0) + proj2.reshape(B, H, W, -1)) / rescale**2
    if dy is None:
        return {"y": float(np.sqrt(np.max(out["y"])))}
    dsum2 = np.asarray(dy, dtype=np.float64) ** 2 / rescale**2
    do2 = split_heads(linear_back(dsum2.reshape(B, H * W, -1), f.o, "out"), heads)
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
    out["x"] = dx2 + dsum2 if residual else dx2
    keep = ("y", "x", "context", *params)
    return {n: float(np.sqrt(np.max(v))) if np.size(v) else 0.0 for n, v in out.items() if n in keep}


def _reference(
    x: np.ndarray,
    context: np.ndarray | None,
    params: Mapping[str, np.ndarray],
    dy: np.ndarray | None,
    options: Mapping[str, Any],
    context_mask: np.ndarray | None,
    mask: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The float64 reference block's output ``"y"`` and (with ``dy``) its gradients."""
    if context is None:
        y, cache = self_attention_forward(x, params, mask=mask, **options)
        grads = {} if dy is None else self_attention_backward(dy, cache)
    else:
        y, cache = cross_attention_forward(x, context, params, context_mask=context_mask, **options)
        grads = {} if dy is None else cross_attention_backward(dy, cache)
    return {"y": y, **grads}


def _block_yardstick(
    exact: Mapping[str, np.ndarray],
    x: np.ndarray,
    context: np.ndarray | None,
    params: Mapping[str, np.ndarray],
    dy: np.ndarray | None,
    options: Mapping[str, Any],
    *,
    dtype: str,
    samples: int,
    seed: Any,
    context_mask: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    arithmetic: str = "eager",
) -> dict[str, float]:
    """Per output, the root-mean-square over ``samples`` simulated blocks of ``max|X_sim − X₆₄|``."""
    rng = np.random.default_rng(seed)
    squares = dict.fromkeys(exact, 0.0)
    for _ in range(samples):
        sim = simulated_block(x, context, params, dy, dtype=dtype, rng=rng, context_mask=context_mask, mask=mask,
                              arithmetic=arithmetic, **options)  # fmt: skip
        for n in exact:
            squares[n] += float(np.max(np.abs(sim[n] - exact[n]))) ** 2 if exact[n].size else 0.0
    return {n: math.sqrt(sq / samples) for n, sq in squares.items()}


def _label(key: str) -> str:
    return key if key == "y" else f"d{key}"


def check_diffusers_attention(
    attn: Any,
    *,
    dtype: str = "float32",
    cases: Sequence[BlockCase] | None = None,
    seed: int = 0,
    policy: Policy | str | None = None,
) -> Report:
    """Check a diffusers ``Attention`` module, forward and backward, in ``dtype``.

    Inputs:
        attn: ``diffusers.models.attention_processor.Attention`` (self-attention, or cross-attention when
            built with ``cross_attention_dim``), with any processor: the processor is not inspected, its
            numbers are checked (features of the module the reference does not express — a spatial norm,
            added key/value projections, ... — raise ``NotImplementedError`` naming them). It is copied and
            cast to ``dtype``; the original is not touched.
        dtype: ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"float64"``.
        cases: :class:`BlockCase` inputs; default :data:`BLOCK_CASES` (the padded one only for cross-attention).
        seed: for the inputs and the upstream gradient.
        policy: ``None`` (default): the one matching the module's arithmetic (:func:`module_policy`: ``fused``
            for a processor calling ``scaled_dot_product_attention``, else ``eager``); or ``"fused"``, ``"eager"``,
            a :class:`~attention_ref.testing.Policy`. ``c["out"]``, ``floor["out"]`` apply to ``y``; ``c["dq"]``,
            ``floor["dq"]`` to every gradient.

    Returns:
        :class:`Report` (its ``policy`` names the policy used) with one row per case and output: ``y``, ``dx``,
        ``dcontext`` (cross-attention),
        and ``d<param>`` for every weight, e.g. ``dq.weight`` (compared in the reference's ``(in, out)`` layout).
        An exception raised by the module (forward or backward) is a failed row for each of that case's
        outputs, not re-raised.
    """
    import torch

    np_dtype = numpy_dtype(dtype)
    policy = _choose(policy, attn)
    module = copy.deepcopy(attn).to(getattr(torch, dtype))
    device = next(module.parameters()).device  # run where the module lives (CPU, CUDA, ...)
    params64, options = from_diffusers(module, dtype="float64")  # the module's own (rounded) weights, exactly
    torch_names = dict(zip(params64, to_diffusers(params64), strict=True))  # "q.weight" → "to_q.weight"
    is_cross = module.is_cross_attention
    C = params64["q.weight"].shape[0]
    D = params64["k.weight"].shape[0]
    C_out = params64["out.weight"].shape[1]
    chosen = [c for c in (BLOCK_CASES if cases is None else cases) if is_cross or not c.padded]
    keys = ["y", "x", *(["context"] if is_cross else []), *params64]
    checks: list[OutputCheck] = []
    for i, case in enumerate(chosen):
        rng = np.random.default_rng([seed, i])
        x = round_to(case.x_std * rng.standard_normal((case.B, case.H, case.W, C)), dtype)  # channels-last
        context = round_to(rng.standard_normal((case.B, case.M, D)), dtype) if is_cross else None
        dy = round_to(rng.standard_normal((case.B, case.H, case.W, C_out)), dtype)
        mask = None
        if case.padded:
            mask = np.ones((case.B, case.M), dtype=bool)
            mask[1:, case.M - case.padded :] = False
        # the module under test, forward and backward by autograd
        try:
            got = _run_module(module, x, context, dy, mask, torch_names, params64, device, np_dtype)
        except Exception as err:  # the module's own failure is a failed row per output, as in check_attention
            checks.extend(exception_check(case.name, _label(key), err) for key in keys)
            continue
        # the float64 reference and the simulated blocks
        as64 = {n: None if a is None else a.astype(np.float64) for n, a in (("x", x), ("c", context), ("dy", dy))}
        exact = _reference(as64["x"], as64["c"], params64, as64["dy"], options, mask)
        yard = _block_yardstick(
            exact, as64["x"], as64["c"], params64, as64["dy"], options, dtype=dtype, samples=policy.samples,
            seed=[seed, i, DTYPES.index(dtype)], context_mask=mask, arithmetic=policy.arithmetic,
        )  # fmt: skip
        magnitudes = block_magnitudes(as64["x"], as64["c"], params64, as64["dy"], context_mask=mask, **options)
        for key in keys:
            checks.append(
                compare_output(
                    case.name,
                    _label(key),
                    got[key],
                    exact[key],
                    yard[key],
                    max(magnitudes[key], float(np.max(np.abs(exact[key])))),
                    dtype,
                    policy=policy,
                    kind="out" if key == "y" else "dq",
                    last_rounding=True,
                )
            )
    title = f"diffusers Attention ({type(attn.processor).__name__}, {'cross' if is_cross else 'self'})"
    return Report(dtype=dtype, checks=tuple(checks), title=title, masked_rows="n/a (blocks)", policy=policy.name)


def _run_module(module: Any, x: np.ndarray, context: np.ndarray | None, dy: np.ndarray, mask: np.ndarray | None,
                torch_names: Mapping[str, str], params64: Mapping[str, np.ndarray], device: Any,
                np_dtype: np.dtype) -> dict[str, np.ndarray]:  # fmt: skip
    """The module's output and gradients (autograd) on one case, channels-last, weights in ``(in, out)`` layout."""
    tx = numpy_to_torch(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), device).requires_grad_(True)  # (B, C, H, W)
    kwargs: dict[str, Any] = {}
    if context is not None:
        tc = numpy_to_torch(context, device).requires_grad_(True)
        kwargs["encoder_hidden_states"] = tc
    if mask is not None:
        additive = np.where(mask, 0.0, -10000.0)[:, None, :].astype(np_dtype)  # diffusers: (B, 1, M), 0 = keep
        kwargs["attention_mask"] = numpy_to_torch(additive, device)
    module.zero_grad(set_to_none=True)
    ty = module(tx, **kwargs)
    ty.backward(numpy_to_torch(np.ascontiguousarray(dy.transpose(0, 3, 1, 2)), device))
    got = {"y": torch_to_numpy(ty).transpose(0, 2, 3, 1), "x": torch_to_numpy(tx.grad).transpose(0, 2, 3, 1)}
    if context is not None:
        got["context"] = torch_to_numpy(tc.grad)
    torch_params = dict(module.named_parameters())
    for key, name in torch_names.items():
        g = torch_params[name].grad
        got[key] = np.zeros(params64[key].shape, np_dtype) if g is None else torch_to_numpy(g)
        if got[key].ndim == 2:
            got[key] = got[key].T  # PyTorch's (out, in) → the reference's (in, out)
    return got


def _as_numpy(a: Any) -> np.ndarray:
    """A NumPy array of a torch tensor (any dtype, bfloat16 through ml_dtypes) or of anything array-like."""
    if type(a).__module__.startswith("torch"):
        return torch_to_numpy(a)
    return np.asarray(a)


def _channels_last(a: np.ndarray, name: str = "hidden_states") -> np.ndarray:
    """``(B, C, H, W)`` → ``(B, H, W, C)``; tokens ``(B, N, C)`` → a one-row map ``(B, 1, N, C)``.

    ``name``: the argument ``a`` came from, for the error message.
    """
    if a.ndim == 4:
        return a.transpose(0, 2, 3, 1)
    if a.ndim == 3:
        return a[:, None]
    raise ValueError(f"{name} must be (B, C, H, W) or (B, N, C), got shape {a.shape}")


def _allowed_keys(attention_mask: Any, batch: int, queries: int, keys: int) -> np.ndarray:
    """diffusers' ``attention_mask`` as booleans ``(B, 1 or N, M)``, True = may attend.

    diffusers passes an additive mask (0 = keep, a large negative number such as −10000 or −inf = drop), of
    shape ``(B, M)``, ``(B, 1, M)`` or ``(B, N, M)``; a boolean mask (True = keep) is taken as it is. Anything
    else would be an additive bias, which the reference blocks do not take.
    """
    a = _as_numpy(attention_mask)
    if a.dtype != bool:
        a = a.astype(np.float64)
        if not np.all((a == 0) | (a <= -1e3)):
            raise NotImplementedError(
                "attention_mask holds values other than 0 and a large negative number: an additive bias, "
                "which the reference blocks do not take"
            )
        a = a == 0
    if a.ndim == 2:
        a = a[:, None, :]
    if a.ndim != 3 or a.shape[0] != batch or a.shape[1] not in (1, queries) or a.shape[2] != keys:
        raise ValueError(
            f"attention_mask of shape {a.shape} does not fit {batch} samples, {queries} queries and {keys} keys "
            "(expected (B, M), (B, 1, M) or (B, N, M))"
        )
    return a


def check_attention_call(
    attn: Any,
    hidden_states: Any,
    encoder_hidden_states: Any = None,
    attention_mask: Any = None,
    *,
    output: Any,
    dtype: str,
    policy: Policy | str | None = None,
    name: str = "call",
    seed: int = 0,
) -> OutputCheck:
    """Judge one recorded call of a diffusers ``Attention`` by the block rule: its output against the reference's.

    The reference block runs in float64 on the call's inputs as they are (already in the dtype) with the module's
    weights; the allowed error is ``c·(simulated blocks' error) + f·ε·max‖y‖``, exactly as in
    :func:`check_diffusers_attention` (forward only).

    Inputs:
        attn: the ``Attention`` module (its weights in the dtype under test, as the model ran), or
            ``(params, options)`` from :func:`attention_ref.interop.from_diffusers`.
        hidden_states: the call's input, ``(B, C, H, W)`` or tokens ``(B, N, C)`` (torch tensor or NumPy).
        encoder_hidden_states: ``(B, M, D)`` for cross-attention, else ``None``.
        attention_mask: as diffusers takes it — additive (0 keep, −10000 or −inf drop) or boolean (True keep),
            ``(B, M)``, ``(B, 1, M)`` or (self-attention) ``(B, N, N)``; ``None`` for none.
        output: what the module returned, shaped like ``hidden_states`` (``C_out`` channels), in ``dtype``.
        dtype: the dtype the model ran in; policy: ``None`` (default) for the one matching the module's
            arithmetic (:func:`module_policy`), or a policy or its name; name: the row's case name;
        seed: for the simulated blocks.

    Returns:
        One :class:`OutputCheck` (output ``"y"``): ``ratio`` (worst error / allowed), ``ok``. A query whose
        every key is masked is not compared (diffusers averages the values there, the reference gives 0): a
        whole sample of them, or single query rows of a self-attention mask ``(B, N, N)``; the row says so in
        ``note`` and is marked not supported when no sample is left.
    """
    np_dtype = numpy_dtype(dtype)
    policy = _choose(policy, attn)
    inputs = {"hidden_states": _as_numpy(hidden_states)}
    if encoder_hidden_states is not None:
        inputs["encoder_hidden_states"] = _as_numpy(encoder_hidden_states)
    for arg, a in inputs.items():  # the reference must see the values the module saw
        if a.dtype != np_dtype:
            raise TypeError(f"{arg} is {a.dtype}, not {dtype}: pass the call's inputs as the module got them")
    params, options = from_diffusers(attn, dtype="float64") if not isinstance(attn, tuple) else attn
    x = _channels_last(inputs["hidden_states"].astype(np.float64))  # (B, H, W, C)
    B, H, W, _ = x.shape
    context = inputs.get("encoder_hidden_states")
    context = None if context is None else context.astype(np.float64)
    got = _channels_last(_as_numpy(output), "output")  # its dtype is checked with its values: a failed row
    keys = H * W if context is None else context.shape[-2]
    allowed = None if attention_mask is None else _allowed_keys(attention_mask, B, H * W, keys)  # (B, 1|N, M)
    context_mask = mask = None
    if allowed is not None and context is not None:
        if allowed.shape[1] != 1 and not np.all(allowed == allowed[:, :1]):
            raise NotImplementedError("a cross-attention mask that differs between queries")
        context_mask = allowed[:, 0, :]  # (B, M)
    elif allowed is not None:
        mask = allowed[:, None]  # (B, 1, 1|N, N)
    dead = np.zeros(B, dtype=bool) if allowed is None else ~np.any(allowed, axis=(1, 2))
    note = ""
    if dead.any():
        note = f"samples {np.flatnonzero(dead).tolist()} have every key masked: not compared"
        if dead.all():
            return OutputCheck(case=name, output="y", error=math.nan, where=None, allowed=math.nan, ratio=math.nan,
                               note=note, supported=False)  # fmt: skip
        keep = ~dead
        x, got = x[keep], got[keep]
        context = None if context is None else context[keep]
        context_mask = None if context_mask is None else context_mask[keep]
        mask = None if mask is None else mask[keep]
    exact = _reference(x, context, params, None, options, context_mask, mask)
    if mask is not None and mask.shape[2] > 1:
        # single query rows with every key masked: each token's output reads only its own row of weights,
        # so those tokens are left out by taking the reference's value there (error 0)
        dead_rows = ~np.any(mask[:, 0], axis=-1)  # (B', N)
        if dead_rows.any():
            tokens = (got.shape[0], -1, got.shape[-1])
            flat = got.reshape(tokens).copy()  # (B', N, C_out), token n = row·W + col
            flat[dead_rows] = exact["y"].reshape(tokens)[dead_rows]
            got = flat.reshape(got.shape)
            rows = f"{int(dead_rows.sum())} query rows with every key masked: not compared"
            note = f"{note}; {rows}" if note else rows
    seed_ = [seed, zlib.crc32(name.encode()), DTYPES.index(dtype)]
    yard = _block_yardstick(exact, x, context, params, None, options, dtype=dtype, samples=policy.samples,
                            seed=seed_, context_mask=context_mask, mask=mask,
                            arithmetic=policy.arithmetic)  # fmt: skip
    magnitude = block_magnitudes(x, context, params, None, context_mask=context_mask, mask=mask, **options)["y"]
    check = compare_output(name, "y", got, exact["y"], yard["y"], max(magnitude, float(np.max(np.abs(exact["y"])))),
                           dtype, policy=policy, kind="out", last_rounding=True)  # fmt: skip
    return check if not note else dataclasses.replace(check, note=note if check.ok else f"{check.note} {note}".strip())
