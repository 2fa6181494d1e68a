r"""``check_diffusers_attention``: a diffusers ``Attention`` module against the reference block.

The module is cast to the dtype under test and run forward and backward by
PyTorch on a few input maps; its output, input gradients (``x`` and, for
cross-attention, the context) and every weight gradient are compared with
:func:`attention_ref.self_attention_forward` / :func:`attention_ref.cross_attention_forward`
and their backward passes in float64, on the same (rounded) inputs and weights,
loaded through :func:`attention_ref.interop.from_diffusers`.

The tolerance has the shape of :mod:`.tolerance`'s, ``c·(error of a kernel-like
computation) + f·ε·max‖X‖``, with the block's own versions of both terms:

* A module run in float16 or bfloat16 is a chain of operations that each return
  the dtype — the group norm, each projection, ``scale·QKᵀ``, the softmax,
  ``P·V``, the residual sum, and on the way back every gradient between them — so
  an honest module rounds a dozen times where a single fused kernel rounds once.
  The yardstick is therefore :func:`rounded_block`: the block computed op by op in
  float32 with every op's result rounded to the dtype, and with the fused-kernel
  softmax backward (``P`` recomputed from the logsumexp, ``D = dO·O``).
* ``‖X‖`` (:func:`block_magnitudes`) is the root-sum-square of the terms each
  entry is summed from, carried along the block's formulas — the typical size of
  one rounding of every term — and the floor takes ``max(‖X‖, |X₆₄|)``. It does
  not vanish where a gradient is zero by cancellation (a key bias always gets 0;
  with a one-token context ``dS = 0``, and with it ``dq``, ``dk`` and their
  weights' gradients). The kernel check's sums of absolute values would compound
  over the block's chain of layers into a floor far above any error.

``c = 3`` for the output and ``5`` for the gradients, ``f = 1``, as for the kernel
check; float64 uses the float32 model scaled by ``ε₆₄/ε₃₂`` and ``Policy.float64_factor``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..blocks import cross_attention_backward, cross_attention_forward, self_attention_backward, self_attention_forward
from ..interop import from_diffusers, to_diffusers
from ..ops.group_norm import group_norm_backward, group_norm_forward
from ..ops.heads import merge_heads, split_heads
from ..ops.softmax import logsumexp, softmax_forward
from .dtypes import eps, numpy_dtype, round_to
from .harness import compare_output
from .report import OutputCheck, Report
from .tolerance import DEFAULT_POLICY, Policy
from .torch_wrap import numpy_to_torch, torch_to_numpy

__all__ = ["BLOCK_CASES", "BlockCase", "block_magnitudes", "check_diffusers_attention", "rounded_block"]


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


class _Ops:
    """The few ops of the block, each computing in ``work`` and rounding its result to ``dtype``."""

    def __init__(self, dtype: str, unfused: bool = False) -> None:
        self.dtype = dtype
        self.unfused = unfused  # round x W before + b, and Q Kᵀ before the scale
        self.work = np.dtype(np.float64) if dtype == "float64" else np.dtype(np.float32)

    def r(self, a: np.ndarray) -> np.ndarray:
        """One op's result: rounded to the dtype, held in the working precision."""
        return round_to(a, self.dtype).astype(self.work)

    def linear(self, x: np.ndarray, p: dict[str, np.ndarray], name: str) -> np.ndarray:
        y = x @ p[f"{name}.weight"]
        if f"{name}.bias" not in p:
            return self.r(y)
        # fused: x W + b rounded once; unfused: x W rounded, then + b rounded (PyTorch's CPU half-precision
        # Linear on a non-contiguous input computes it that way)
        return self.r((self.r(y) if self.unfused else y) + p[f"{name}.bias"])

    def linear_back(
        self, dy: np.ndarray, x: np.ndarray, p: dict[str, np.ndarray], name: str, grads: dict[str, np.ndarray]
    ) -> np.ndarray:
        width_in, width_out = p[f"{name}.weight"].shape
        grads[f"{name}.weight"] = self.r(x.reshape(-1, width_in).T @ dy.reshape(-1, width_out))
        if f"{name}.bias" in p:
            grads[f"{name}.bias"] = self.r(dy.reshape(-1, width_out).sum(axis=0))
        return self.r(dy @ p[f"{name}.weight"].T)


@dataclass
class _Forward:
    """The forward's values the backward (and the magnitudes) need."""

    x: np.ndarray  # (B, H, W, C)
    p: dict[str, np.ndarray]
    norm: Any | None  # GroupNormCache
    tokens: np.ndarray  # h as (B, N, C)
    source: np.ndarray  # (B, M, D): tokens, or the context
    qh: np.ndarray  # (B, heads, N, d)
    kh: np.ndarray  # (B, heads, M, d)
    vh: np.ndarray
    S: np.ndarray  # (B, heads, N, M)
    P: np.ndarray
    lse: np.ndarray  # (B, heads, N, 1)
    mask: np.ndarray | None  # (B or 1, 1, 1, M)
    oh: np.ndarray  # (B, heads, N, d)
    o: np.ndarray  # (B, N, inner)
    scale: float
    y: np.ndarray


def _forward(ops: _Ops, x: np.ndarray, context: np.ndarray | None, params: dict[str, np.ndarray],
             heads: int, groups: int, eps: float, residual: bool, rescale: float, scale: float | None,
             context_mask: np.ndarray | None) -> _Forward:  # fmt: skip
    r = ops.r
    p = {n: np.asarray(a).astype(ops.work) for n, a in params.items()}
    x = x.astype(ops.work)
    B, H, W, C = x.shape
    # h = GroupNorm(x)
    h, norm_cache = x, None
    if "norm.weight" in p:
        h, norm_cache = group_norm_forward(x, p["norm.weight"], p.get("norm.bias"), groups=groups, eps=eps)
        h = r(h)
    tokens = h.reshape(B, H * W, C)  # (B, N, C)
    source = tokens if context is None else context.astype(ops.work)  # (B, M, D)
    q, k, v = (ops.linear(s, p, n) for s, n in ((tokens, "q"), (source, "k"), (source, "v")))
    qh, kh, vh = (split_heads(a, heads) for a in (q, k, v))  # (B, heads, ·, d)
    scale = qh.shape[-1] ** -0.5 if scale is None else scale
    # S = scale·Q Kᵀ, P = softmax(S), O = P V — each rounded; unfused: Q Kᵀ rounded before it is scaled
    # (diffusers' AttnProcessor, baddbmm with alpha = scale, in half precision on the CPU)
    qk = qh @ _t(kh)
    S = r(scale * (r(qk) if ops.unfused else qk))
    mask = None if context_mask is None else context_mask.reshape(-1, 1, 1, context_mask.shape[-1])
    P, _ = softmax_forward(S, mask=mask)
    lse = logsumexp(S, mask=mask, keepdims=True)  # what a fused kernel saves for its backward
    oh = r(r(P) @ vh)  # (B, heads, N, d)
    o = merge_heads(oh)  # (B, N, inner)
    proj = ops.linear(o, p, "out").reshape(B, H, W, -1)
    y = r(x + proj) if residual else proj
    y = r(y / rescale) if rescale != 1.0 else y
    return _Forward(x, p, norm_cache, tokens, source, qh, kh, vh, S, P, lse, mask, oh, o, scale, y)


def rounded_block(
    x: np.ndarray,
    context: np.ndarray | None,
    params: dict[str, np.ndarray],
    dy: np.ndarray,
    *,
    dtype: str,
    heads: int,
    groups: int = 32,
    eps: float = 1e-6,
    residual: bool = True,
    rescale: float = 1.0,
    scale: float | None = None,
    context_mask: np.ndarray | None = None,
    unfused: bool = False,
) -> dict[str, np.ndarray]:
    """The attention block and its gradients as a module in ``dtype`` computes them: op by op.

    Every op works in float32 on its (dtype) inputs and rounds its result to ``dtype`` (float64
    works in float64 and rounds nothing). The attention's backward is the fused kernels' (PyTorch's
    SDPA, FlashAttention): ``P`` recomputed as ``exp(S − logsumexp)`` and ``Σ_k P_ik dP_ik`` taken as
    ``dO_i · O_i`` from the rounded output — the less accurate of the legitimate ways, so that
    identities an exact softmax backward keeps (``Σ_k P_ik = 1``) do not make the yardstick unfairly exact.

    Two orders of the forward are legitimate and round differently: fused (``x W + b`` and
    ``scale · Q Kᵀ`` each rounded once) and unfused (``x W`` rounded before ``+ b``, ``Q Kᵀ`` before
    the scale, as PyTorch's CPU half-precision Linear and ``baddbmm`` do). One rounded run is one
    sample of a rounding error, which may cancel by luck, so :func:`check_diffusers_attention`
    takes the larger error of the two orders as its yardstick.

    Inputs:
        x: ``(B, H, W, C)``; context: ``(B, M, D)`` or ``None``; dy: ``(B, H, W, C_out)``.
        params, options: as for :func:`attention_ref.self_attention_forward` / ``cross_attention_forward``.
        unfused: the unfused order (default: fused).

    Returns:
        ``{"y", "x", "context" (cross only), every params key}``, holding ``dtype`` values.
    """
    ops = _Ops(dtype, unfused)
    r = ops.r
    f = _forward(ops, x, context, params, heads, groups, eps, residual, rescale, scale, context_mask)
    B, H, W, C = f.x.shape
    grads: dict[str, np.ndarray] = {"y": f.y}
    dy = dy.astype(ops.work)
    dsum = r(dy / rescale) if rescale != 1.0 else dy
    do = split_heads(ops.linear_back(dsum.reshape(B, H * W, -1), f.o, f.p, "out", grads), heads)
    # P recomputed from the logsumexp (masked entries and empty rows 0)
    finite = np.isfinite(f.lse)
    P = np.exp(np.where(finite, f.S - np.where(finite, f.lse, 0.0), -np.inf))
    P = r(P if f.mask is None else np.where(f.mask, P, 0.0))
    dvh = r(_t(P) @ do)
    dP = r(do @ _t(f.vh))
    # dS = P ∘ (dP − D),  D_i = dO_i · O_i
    dS = r(P * (dP - np.sum(do * f.oh, axis=-1, keepdims=True)))
    dqh, dkh = r(f.scale * (dS @ f.kh)), r(f.scale * (_t(dS) @ f.qh))
    d_tokens = ops.linear_back(merge_heads(dqh), f.tokens, f.p, "q", grads)
    d_source_k = ops.linear_back(merge_heads(dkh), f.source, f.p, "k", grads)
    d_source_v = ops.linear_back(merge_heads(dvh), f.source, f.p, "v", grads)
    if context is None:
        d_tokens = r(r(d_tokens + d_source_k) + d_source_v)
    else:
        grads["context"] = r(d_source_k + d_source_v)
    dx = d_tokens.reshape(B, H, W, C)
    if f.norm is not None:
        g = group_norm_backward(dx, f.norm)
        dx = r(g["x"])
        grads["norm.weight"] = r(g["weight"])
        if "bias" in g:
            grads["norm.bias"] = r(g["bias"])
    grads["x"] = r(dx + dsum) if residual else dx
    return grads


def block_magnitudes(
    x: np.ndarray,
    context: np.ndarray | None,
    params: dict[str, np.ndarray],
    dy: np.ndarray,
    *,
    heads: int,
    groups: int = 32,
    eps: float = 1e-6,
    residual: bool = True,
    rescale: float = 1.0,
    scale: float | None = None,
    context_mask: np.ndarray | None = None,
) -> dict[str, float]:
    """``max‖X‖`` for ``y`` and every gradient: the root-sum-square of the terms each entry is summed from.

    Every sum ``Σ_k a_k b_k`` on the way is replaced by ``sqrt(Σ_k a_k² b_k²)``, the typical size of
    its rounding errors when each term is off by one unit in its last place with a random sign.
    Unlike ``|X|`` it does not vanish where a gradient is zero by cancellation (a one-token context
    makes ``dS``, and with it ``dq`` and the query and key weights' gradients, exactly 0).
    """
    f = _forward(_Ops("float64"), x, context, params, heads, groups, eps, residual, rescale, scale, context_mask)
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
    dsum2 = dy.astype(np.float64) ** 2 / rescale**2
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
    params: dict[str, np.ndarray],
    dy: np.ndarray,
    options: dict[str, Any],
    mask: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """The float64 reference block's output ``"y"`` and gradients."""
    if context is None:
        y, cache = self_attention_forward(x, params, **options)
        grads = self_attention_backward(dy, cache)
    else:
        y, cache = cross_attention_forward(x, context, params, context_mask=mask, **options)
        grads = cross_attention_backward(dy, cache)
    return {"y": y, **grads}


def check_diffusers_attention(
    attn: Any,
    *,
    dtype: str = "float32",
    cases: Sequence[BlockCase] | None = None,
    seed: int = 0,
    policy: Policy = DEFAULT_POLICY,
) -> Report:
    """Check a diffusers ``Attention`` module, forward and backward, in ``dtype``.

    Inputs:
        attn: ``diffusers.models.attention_processor.Attention`` (self-attention, or cross-attention when
            built with ``cross_attention_dim``), with a processor the reference expresses
            (``AttnProcessor``, ``AttnProcessor2_0``, ``SlicedAttnProcessor``). It is copied and cast to
            ``dtype``; the original is not touched.
        dtype: ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"float64"``.
        cases: :class:`BlockCase` inputs; default :data:`BLOCK_CASES` (the padded one only for cross-attention).
        seed: for the inputs and the upstream gradient.
        policy: ``c["out"]``, ``floor["out"]`` apply to ``y``; ``c["dq"]``, ``floor["dq"]`` to every gradient.

    Returns:
        :class:`Report` with one row per case and output: ``y``, ``dx``, ``dcontext`` (cross-attention),
        and ``d<param>`` for every weight, e.g. ``dq.weight`` (compared in the reference's ``(in, out)`` layout).
    """
    import torch

    np_dtype = numpy_dtype(dtype)
    module = copy.deepcopy(attn).to(getattr(torch, dtype))
    device = next(module.parameters()).device  # run where the module lives (CPU, CUDA, ...)
    params64, options = from_diffusers(module, dtype="float64")  # the module's own (rounded) weights, exactly
    torch_names = dict(zip(params64, to_diffusers(params64), strict=True))  # "q.weight" → "to_q.weight"
    is_cross = module.is_cross_attention
    C = params64["q.weight"].shape[0]
    D = params64["k.weight"].shape[0]
    C_out = params64["out.weight"].shape[1]
    model_dtype = "float32" if dtype == "float64" else dtype
    shrink = eps(dtype) / eps(model_dtype)
    chosen = [c for c in (BLOCK_CASES if cases is None else cases) if is_cross or not c.padded]
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
        tx = numpy_to_torch(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), device).requires_grad_(True)  # (B, C, H, W)
        kwargs: dict[str, Any] = {}
        if is_cross:
            tc = numpy_to_torch(context, device).requires_grad_(True)
            kwargs["encoder_hidden_states"] = tc
        if mask is not None:
            additive = np.where(mask, 0.0, -10000.0)[:, None, :].astype(np_dtype)  # diffusers: (B, 1, M), 0 = keep
            kwargs["attention_mask"] = numpy_to_torch(additive, device)
        module.zero_grad(set_to_none=True)
        ty = module(tx, **kwargs)
        ty.backward(numpy_to_torch(np.ascontiguousarray(dy.transpose(0, 3, 1, 2)), device))
        got = {"y": torch_to_numpy(ty).transpose(0, 2, 3, 1), "x": torch_to_numpy(tx.grad).transpose(0, 2, 3, 1)}
        if is_cross:
            got["context"] = torch_to_numpy(tc.grad)
        torch_params = dict(module.named_parameters())
        for key, name in torch_names.items():
            g = torch_params[name].grad
            got[key] = np.zeros(params64[key].shape, np_dtype) if g is None else torch_to_numpy(g)
            if got[key].ndim == 2:
                got[key] = got[key].T  # PyTorch's (out, in) → the reference's (in, out)
        # the float64 reference and the op-by-op rounded model
        as64 = {n: None if a is None else a.astype(np.float64) for n, a in (("x", x), ("c", context), ("dy", dy))}
        exact = _reference(as64["x"], as64["c"], params64, as64["dy"], options, mask)
        models = [
            rounded_block(x, context, params64, dy, dtype=model_dtype, context_mask=mask, unfused=u, **options)
            for u in (False, True)
        ]
        magnitudes = block_magnitudes(as64["x"], as64["c"], params64, as64["dy"], context_mask=mask, **options)
        for key in ["y", "x", *(["context"] if is_cross else []), *params64]:
            kind = "out" if key == "y" else "dq"
            x64 = exact[key]
            kernel_error = shrink * max(float(np.max(np.abs(m[key].astype(np.float64) - x64))) for m in models)
            label = key if key == "y" else f"d{key}"
            check = compare_output(
                case.name,
                label,
                got[key],
                x64,
                kernel_error,
                max(magnitudes[key], np.max(np.abs(x64))),
                dtype,
                policy=policy,
                kind=kind,
            )
            checks.append(check)
    title = f"diffusers Attention ({type(attn.processor).__name__}, {'cross' if is_cross else 'self'})"
    return Report(dtype=dtype, checks=tuple(checks), title=title, masked_rows="n/a (blocks)")
