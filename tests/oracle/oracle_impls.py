"""Attention implementations for the oracle's own tests: correct ones, and ones with one planted bug each.

All take and return NumPy arrays in the dtype under test and compute in float32, the way a kernel would.
Each buggy function differs from a correct one in one place, marked ``# BUG``.
"""

from __future__ import annotations

import numpy as np
from oracle_kernels import ordered_attention

BLOCK = 16  # tile width of the blocked (FlashAttention-style) implementations


def t(a):
    """Transpose the last two axes."""
    return np.swapaxes(a, -1, -2)


def logits(q, k, bias, scale):
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = np.float32(scale) * (q.astype(np.float32) @ t(k.astype(np.float32)))
    return s if bias is None else s + bias.astype(np.float32)


def softmax(s, mask):
    """Row softmax over allowed keys; rows with no allowed key get 0."""
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    e = np.exp(s - np.where(np.isneginf(m), 0.0, m))
    total = np.sum(e, axis=-1, keepdims=True)
    return e / np.where(total == 0, 1.0, total)


def finish(out, like):
    return out.astype(like.dtype)


def grads_from_p(p, q, k, v, dout, scale):
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    q32, k32, v32, do32 = (a.astype(np.float32) for a in (q, k, v, dout))
    dp = do32 @ t(v32)
    ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
    dq = np.float32(scale) * (ds @ k32)
    dk = np.float32(scale) * (t(ds) @ q32)
    dv = t(p) @ do32
    return tuple(finish(g, q) for g in (dq, dk, dv))


# ---------------------------------------------------------------- correct implementations


def blocked(q, k, v, *, mask=None, bias=None, scale=None, rescale=True, drop_tail=False):
    """FlashAttention-style forward: keys in tiles of BLOCK, online softmax (running max, sum, output)."""
    s_all = logits(q, k, bias, scale)
    if mask is not None:
        s_all = np.where(mask, s_all, -np.inf)
    M = k.shape[-2]
    v32 = v.astype(np.float32)
    m = np.full((*s_all.shape[:-1], 1), -np.inf, dtype=np.float32)  # running max   (..., N, 1)
    total = np.zeros_like(m)  # running Σ exp(s - m)
    acc = np.zeros((*s_all.shape[:-1], v.shape[-1]), dtype=np.float32)  # running Σ exp(s - m) v
    stop = M - M % BLOCK if (drop_tail and M >= BLOCK) else M
    for start in range(0, stop, BLOCK):
        s = s_all[..., start : start + BLOCK]
        m_new = np.maximum(m, np.max(s, axis=-1, keepdims=True))
        shift = np.where(np.isneginf(m_new), 0.0, m_new)
        e = np.exp(s - shift)
        correction = np.exp(np.where(np.isneginf(m), -np.inf, m - shift)) if rescale else np.float32(1.0)
        total = correction * total + np.sum(e, axis=-1, keepdims=True)
        acc = correction * acc + e @ v32[..., start : start + BLOCK, :]
        m = m_new
    return finish(acc / np.where(total == 0, 1.0, total), q)


def p_rounded_to_dtype(q, k, v, *, mask=None, bias=None, scale=None):
    """Rounds the weights P to the input dtype before P·V, as FlashAttention's fp16/bf16 kernels do."""
    p = softmax(logits(q, k, bias, scale), mask).astype(q.dtype).astype(np.float32)
    return finish(p @ v.astype(np.float32), q)


# ---------------------------------------------------------------- forward bugs


def wrong_scale(q, k, v, *, mask=None, bias=None, scale=None):
    scale = 1.0 / q.shape[-1] if scale is None else scale  # BUG: 1/d instead of 1/sqrt(d)
    return finish(softmax(logits(q, k, bias, scale), mask) @ v.astype(np.float32), q)


def softmax_wrong_axis(q, k, v, *, mask=None, bias=None, scale=None):
    p = np.swapaxes(softmax(t(logits(q, k, bias, scale)), None if mask is None else t(mask)), -1, -2)  # BUG
    return finish(p @ v.astype(np.float32), q)


def no_max_subtraction(q, k, v, *, mask=None, bias=None, scale=None):
    s = logits(q, k, bias, scale)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(s)  # BUG: exp(s) overflows for s > 88 in float32
        total = np.sum(e, axis=-1, keepdims=True)
        p = e / np.where(total == 0, 1.0, total)
    return finish(p @ v.astype(np.float32), q)


def mask_ignored(q, k, v, *, mask=None, bias=None, scale=None):
    return finish(softmax(logits(q, k, bias, scale), None) @ v.astype(np.float32), q)  # BUG: mask unused


def inverted_mask(q, k, v, *, mask=None, bias=None, scale=None):
    mask = None if mask is None else ~mask  # BUG: True read as "masked out"
    return finish(softmax(logits(q, k, bias, scale), mask) @ v.astype(np.float32), q)


def nan_on_fully_masked_rows(q, k, v, *, mask=None, bias=None, scale=None):
    s = logits(q, k, bias, scale)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    with np.errstate(invalid="ignore"):
        e = np.exp(s - np.max(s, axis=-1, keepdims=True))  # BUG: -inf - (-inf) = NaN on rows with no key
        p = e / np.sum(e, axis=-1, keepdims=True)
    return finish(p @ v.astype(np.float32), q)


def finite_mask_value(q, k, v, *, mask=None, bias=None, scale=None):
    s = logits(q, k, bias, scale)
    if mask is not None:
        s = np.where(mask, s, np.float32(-1e9))  # BUG: a row with no key gets uniform weights, not 0
    return finish(softmax(s, None) @ v.astype(np.float32), q)


def grad_finite_mask_value(q, k, v, dout, *, mask=None, bias=None, scale=None):
    """The gradients of :func:`finite_mask_value`: a row with no key spreads its gradient over every key."""
    s = logits(q, k, bias, scale)
    if mask is not None:
        s = np.where(mask, s, np.float32(-1e9))
    return grads_from_p(softmax(s, None), q, k, v, dout, scale)


def bias_ignored(q, k, v, *, mask=None, bias=None, scale=None):
    return finish(softmax(logits(q, k, None, scale), mask) @ v.astype(np.float32), q)  # BUG: bias unused


def logits_rounded_to_float16(q, k, v, *, mask=None, bias=None, scale=None):
    s = logits(q, k, bias, scale).astype(np.float16).astype(np.float32)  # BUG: S stored in float16
    return finish(softmax(s, mask) @ v.astype(np.float32), q)


def key_dropped(q, k, v, *, mask=None, bias=None, scale=None):
    k, v = k[..., :-1, :], v[..., :-1, :]  # BUG: off by one, the last key is never read
    mask = None if mask is None else mask[..., :-1]
    bias = None if bias is None else bias[..., :-1]
    return finish(softmax(logits(q, k, bias, scale), mask) @ v.astype(np.float32), q)


def online_softmax_without_rescale(q, k, v, *, mask=None, bias=None, scale=None):
    return blocked(q, k, v, mask=mask, bias=bias, scale=scale, rescale=False)  # BUG: see `rescale`


def last_partial_tile_dropped(q, k, v, *, mask=None, bias=None, scale=None):
    return blocked(q, k, v, mask=mask, bias=bias, scale=scale, drop_tail=True)  # BUG: see `drop_tail`


def pv_accumulated_in_dtype(q, k, v, *, mask=None, bias=None, scale=None):
    p = softmax(logits(q, k, bias, scale), mask).astype(q.dtype)
    acc = np.zeros((*p.shape[:-1], v.shape[-1]), dtype=q.dtype)
    for j in range(v.shape[-2]):  # BUG: Σ_j P_ij v_j summed in the input dtype instead of float32
        acc = (acc + p[..., j : j + 1] * v[..., j : j + 1, :]).astype(q.dtype)
    return acc


def pv_accumulated_in_bfloat16(q, k, v, *, mask=None, bias=None, scale=None):
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    p = softmax(logits(q, k, bias, scale), mask)
    acc = np.zeros((*p.shape[:-1], v.shape[-1]), dtype=bf16)
    for j in range(v.shape[-2]):  # BUG: Σ_j P_ij v_j accumulated in bfloat16, whatever the dtype
        acc = (acc.astype(np.float32) + p[..., j : j + 1] * v[..., j : j + 1, :].astype(np.float32)).astype(bf16)
    return finish(acc.astype(np.float32), q)


def mask_on_query_axis(q, k, v, *, mask=None, bias=None, scale=None):
    mask = None if mask is None else t(mask)  # BUG: mask[i, j] read as mask[j, i]; only N == M broadcasts
    return finish(softmax(logits(q, k, bias, scale), mask) @ v.astype(np.float32), q)


def dropout_left_on(q, k, v, *, mask=None, bias=None, scale=None):
    p = softmax(logits(q, k, bias, scale), mask)
    keep = np.random.default_rng(0).random(p.shape) >= 0.1  # BUG: dropout p = 0.1 still on at inference
    return finish((np.where(keep, p, 0.0) / np.float32(0.9)).astype(np.float32) @ v.astype(np.float32), q)


QUERY_TILE = 16  # query tile of the query-tiled implementation


def query_tiled(q, k, v, *, mask=None, bias=None, scale=None, last_size_everywhere=False):
    """Attention one tile of QUERY_TILE queries at a time (correct unless ``last_size_everywhere``)."""
    N = q.shape[-2]
    s = logits(q, k, bias, scale)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    out = np.zeros((*s.shape[:-1], v.shape[-1]), dtype=np.float32)
    last = N - (N - 1) // QUERY_TILE * QUERY_TILE  # the size of the last tile (1 … QUERY_TILE)
    for start in range(0, N, QUERY_TILE):
        size = last if last_size_everywhere else min(QUERY_TILE, N - start)
        rows = slice(start, start + size)
        out[..., rows, :] = softmax(s[..., rows, :], None) @ v.astype(np.float32)
    return finish(out, q)


def last_query_tile_size_everywhere(q, k, v, *, mask=None, bias=None, scale=None):
    return query_tiled(q, k, v, mask=mask, bias=bias, scale=scale, last_size_everywhere=True)  # BUG: see `query_tiled`


# ---------------------------------------------------------------- forward bugs of low-precision kernels and wrappers
# Each is found by a kernel engineer's own tests only where it is large: the battery must show it in the dtypes the
# kernels ship (float16, bfloat16), under the "fused" policy (logits, max, ℓ, lse and every sum in float32).


def _causal_pattern(mask, N, M, alignment):
    """True when ``mask`` is exactly the causal mask (N, M) of that alignment (as a wrapper recognises one)."""
    from attention_ref import causal_mask

    return mask is not None and mask.shape[-2:] == (N, M) and bool(np.all(mask == causal_mask(N, M, alignment)))


def causal_bottom_right_for_top_left(q, k, v, *, mask=None, bias=None, scale=None):
    """A wrapper that recognises PyTorch's (top-left) causal mask and calls a kernel's ``causal=True``, which aligns
    bottom-right (FlashAttention ≥ 2.1): the same mask when N == M."""
    from attention_ref import causal_mask

    N, M = q.shape[-2], k.shape[-2]
    if _causal_pattern(mask, N, M, "top_left"):
        mask = causal_mask(N, M, "bottom_right")  # BUG: the kernel's causal flag is aligned bottom-right
    return working_precision_forward(q, k, v, mask=mask, bias=bias, scale=scale)


def causal_top_left_for_bottom_right(q, k, v, *, mask=None, bias=None, scale=None):
    """The reverse: a bottom-right causal mask (FlashAttention's) handed to ``is_causal=True`` (PyTorch's, top-left)."""
    from attention_ref import causal_mask

    N, M = q.shape[-2], k.shape[-2]
    if _causal_pattern(mask, N, M, "bottom_right"):
        mask = causal_mask(N, M, "top_left")  # BUG: is_causal is aligned top-left
    return working_precision_forward(q, k, v, mask=mask, bias=bias, scale=scale)


def scale_or_default(q, k, v, *, mask=None, bias=None, scale=None):
    scale = scale or 1.0 / np.sqrt(q.shape[-1])  # BUG: a scale of 0 is taken as "use the default"
    return working_precision_forward(q, k, v, mask=mask, bias=bias, scale=scale)


def grad_scale_or_default(q, k, v, dout, *, mask=None, bias=None, scale=None):
    scale = scale or 1.0 / np.sqrt(q.shape[-1])  # BUG: as in scale_or_default
    return working_precision_grad(q, k, v, dout, mask=mask, bias=bias, scale=scale)


def working_precision_forward(q, k, v, *, mask=None, bias=None, scale=None):
    """The plain correct forward in the working dtype (float32, or float64 for float64)."""
    return ordered_attention("blas")[0](q, k, v, mask=mask, bias=bias, scale=scale)


def working_precision_grad(q, k, v, dout, *, mask=None, bias=None, scale=None):
    """The plain correct backward in the working dtype (float32, or float64 for float64)."""
    return ordered_attention("blas")[1](q, k, v, dout, mask=mask, bias=bias, scale=scale)


def online_sum_in_float16(q, k, v, *, mask=None, bias=None, scale=None):
    """:func:`blocked` (online softmax over tiles of BLOCK keys) whose running sum ℓ is kept in float16."""
    s_all = logits(q, k, bias, scale)
    if mask is not None:
        s_all = np.where(mask, s_all, -np.inf)
    v32 = v.astype(np.float32)
    m = np.full((*s_all.shape[:-1], 1), -np.inf, dtype=np.float32)
    total = np.zeros(m.shape, np.float16)  # BUG: the running Σ exp(s - m) in float16, not float32
    acc = np.zeros((*s_all.shape[:-1], v.shape[-1]), dtype=np.float32)
    for start in range(0, k.shape[-2], BLOCK):
        s = s_all[..., start : start + BLOCK]
        m_new = np.maximum(m, np.max(s, axis=-1, keepdims=True))
        shift = np.where(np.isneginf(m_new), 0.0, m_new)
        e = np.exp(s - shift)
        correction = np.exp(np.where(np.isneginf(m), -np.inf, m - shift))
        total = (correction * total + np.sum(e, axis=-1, keepdims=True)).astype(np.float16)
        acc = correction * acc + e @ v32[..., start : start + BLOCK, :]
        m = m_new
    total = total.astype(np.float32)
    return finish(acc / np.where(total == 0, 1.0, total), q)


def softmax_sum_in_float16(q, k, v, *, mask=None, bias=None, scale=None):
    """Otherwise correct: ℓ = Σ_k exp(s_k − m) accumulated key by key in a float16 register."""
    s = logits(q, k, bias, scale)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    e = np.exp(s - np.where(np.isneginf(m), 0.0, m))
    total = np.zeros(m.shape, np.float16)
    for j in range(e.shape[-1]):  # BUG: the softmax's sum in float16
        total = (total + e[..., j : j + 1]).astype(np.float16)
    total = total.astype(np.float32)
    return finish((e @ v.astype(np.float32)) / np.where(total == 0, 1.0, total), q)


def max_in_float16_numerator(q, k, v, *, mask=None, bias=None, scale=None):
    """The row max kept in float16 where the numerator exp(s − m) is formed, in float32 for the denominator ℓ."""
    s = logits(q, k, bias, scale)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    m32 = np.max(s, axis=-1, keepdims=True)
    m32 = np.where(np.isneginf(m32), 0.0, m32)
    m16 = m32.astype(np.float16).astype(np.float32)  # BUG: the numerator's shift rounded to float16
    total = np.sum(np.exp(s - m32), axis=-1, keepdims=True)
    with np.errstate(over="ignore"):
        numerator = np.exp(s - m16) @ v.astype(np.float32)
    return finish(numerator / np.where(total == 0, 1.0, total), q)


def mask_by_multiplying_exp(q, k, v, *, mask=None, bias=None, scale=None):
    """Masks by multiplying exp(s − m) by the mask, with m the max over *every* key, masked ones too: where a masked
    key's logit is far above the allowed ones, their exp underflows and the row comes out 0."""
    s = logits(q, k, bias, scale)
    m = np.max(s, axis=-1, keepdims=True)  # BUG: the max over the masked keys too
    e = np.exp(s - m)
    if mask is not None:
        e = e * mask
    total = np.sum(e, axis=-1, keepdims=True)
    return finish((e / np.where(total == 0, 1.0, total)) @ v.astype(np.float32), q)


# ---------------------------------------------------------------- backward (correct and buggy)


def grad(q, k, v, dout, *, mask=None, bias=None, scale=None):
    return grads_from_p(softmax(logits(q, k, bias, scale), mask), q, k, v, dout, scale)


def grad_missing_softmax_term(q, k, v, dout, *, mask=None, bias=None, scale=None):
    scale_ = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    p = softmax(logits(q, k, bias, scale), mask)
    q32, k32, v32, do32 = (a.astype(np.float32) for a in (q, k, v, dout))
    ds = p * (do32 @ t(v32))  # BUG: dS = P ∘ dP, missing "- Σ_k P_ik dP_ik"
    dq, dk, dv = np.float32(scale_) * (ds @ k32), np.float32(scale_) * (t(ds) @ q32), t(p) @ do32
    return tuple(finish(g, q) for g in (dq, dk, dv))


def grad_dq_missing_scale(q, k, v, dout, *, mask=None, bias=None, scale=None):
    _, dk, dv = grad(q, k, v, dout, mask=mask, bias=bias, scale=scale)
    p = softmax(logits(q, k, bias, scale), mask)
    do32, v32 = dout.astype(np.float32), v.astype(np.float32)
    dp = do32 @ t(v32)
    ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
    return finish(ds @ k.astype(np.float32), q), dk, dv  # BUG: dQ = dS K, no scale


def grad_dk_not_transposed(q, k, v, dout, *, mask=None, bias=None, scale=None):
    scale_ = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    p = softmax(logits(q, k, bias, scale), mask)
    dq, _, dv = grads_from_p(p, q, k, v, dout, scale)
    do32, v32, q32 = dout.astype(np.float32), v.astype(np.float32), q.astype(np.float32)
    dp = do32 @ t(v32)
    ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
    dk = np.float32(scale_) * (ds[..., : k.shape[-2], : q.shape[-2]] @ q32)  # BUG: dS where dSᵀ belongs
    return dq, finish(dk, q), dv


def grad_recomputes_p_without_mask(q, k, v, dout, *, mask=None, bias=None, scale=None):
    p = softmax(logits(q, k, bias, scale), None)  # BUG: the backward forgets the mask
    return grads_from_p(p, q, k, v, dout, scale)


def grad_dv_accumulated_in_dtype(q, k, v, dout, *, mask=None, bias=None, scale=None):
    p = softmax(logits(q, k, bias, scale), mask)
    dq, dk, _ = grads_from_p(p, q, k, v, dout, scale)
    do32 = dout.astype(np.float32)
    dv = np.zeros(v.shape, q.dtype)
    for i in range(q.shape[-2]):  # BUG: dV = Σ_i P_ij dO_i accumulated query by query in the input dtype
        dv = (dv.astype(np.float32) + p[..., i, :, None] * do32[..., i, None, :]).astype(q.dtype)
    return dq, dk, dv


def grad_lse_from_sum_in_float16(q, k, v, dout, *, mask=None, bias=None, scale=None):
    """FlashAttention's backward (P = exp(S − lse), D = dO·O), with the lse formed from an ℓ summed in float16."""
    scale_ = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = logits(q, k, bias, scale)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)
    e = np.exp(s - m)
    total = np.zeros(m.shape, np.float16)
    for j in range(e.shape[-1]):  # BUG: ℓ summed key by key in float16
        total = (total + e[..., j : j + 1]).astype(np.float16)
    total = total.astype(np.float32)
    with np.errstate(divide="ignore"):
        lse = np.where(total == 0, np.inf, m + np.log(np.where(total == 0, 1.0, total)))
    p = np.exp(s - lse)  # (..., N, M); a row with no key: exp(-inf - inf) = 0
    q32, k32, v32, do32 = (a.astype(np.float32) for a in (q, k, v, dout))
    o = (softmax(s, None) @ v32).astype(q.dtype).astype(np.float32)  # the forward's (correct) output
    dp = do32 @ t(v32)
    ds = p * (dp - np.sum(do32 * o, axis=-1, keepdims=True))
    dq, dk, dv = np.float32(scale_) * (ds @ k32), np.float32(scale_) * (t(ds) @ q32), t(p) @ do32
    return tuple(finish(g, q) for g in (dq, dk, dv))


def grad_dk_zero_for_long_sequences(q, k, v, dout, *, mask=None, bias=None, scale=None):
    dq, dk, dv = grad(q, k, v, dout, mask=mask, bias=bias, scale=scale)
    if k.shape[-2] >= 512:
        dk = np.zeros_like(dk)  # BUG: a launch configuration for M ≥ 512 that never writes dK
    return dq, dk, dv


def grad_zero_for_large_queries(q, k, v, dout, *, mask=None, bias=None, scale=None):
    dq, dk, dv = grad(q, k, v, dout, mask=mask, bias=bias, scale=scale)
    if np.max(np.abs(q.astype(np.float32))) > 20:
        dq, dk = np.zeros_like(dq), np.zeros_like(dk)  # BUG: a guard against large inputs that zeroes the gradients
    return dq, dk, dv


def flash_style_grad(q, k, v, dout, *, mask=None, bias=None, scale=None):
    """FlashAttention-2's backward in the input dtype: P and dS rounded to it for the matmuls, D = rowsum(dO ∘ O)
    from the rounded output O, float32 accumulation."""
    lo = q.dtype
    scale_ = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    q32, k32, v32, do32 = (a.astype(np.float32) for a in (q, k, v, dout))
    p = softmax(logits(q, k, bias, scale), mask)
    o = (p.astype(lo).astype(np.float32) @ v32).astype(lo).astype(np.float32)  # the forward's rounded output
    d = np.sum(do32 * o, axis=-1, keepdims=True)  # D_i = dO_i · O_i
    p_lo = p.astype(lo).astype(np.float32)
    dv = t(p_lo) @ do32
    dp = do32 @ t(v32)
    ds = (p * (dp - d)).astype(lo).astype(np.float32)
    dq = np.float32(scale_) * (ds @ k32)
    dk = np.float32(scale_) * (t(ds) @ q32)
    return tuple(finish(g, q) for g in (dq, dk, dv))


def numpy_forward(q, k, v, *, mask=None, bias=None, scale=None):
    """The plain correct forward."""
    return finish(softmax(logits(q, k, bias, scale), mask) @ v.astype(np.float32), q)
