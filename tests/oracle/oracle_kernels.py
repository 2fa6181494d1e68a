"""Correct attention kernels in every legitimate formulation, for the oracle's own tests and scripts: explicit
summation orders, a tiled online softmax, eager code through the max shift (NumPy and PyTorch), logsumexp kernels,
and the sweep's set of them. The tolerance must accept every one (the planted bugs are in oracle_impls.py).
"""

from __future__ import annotations

import itertools

import numpy as np

from attention_ref.testing.rounding import transpose as t

# ---------------------------------------------------------------- kernels in explicit summation orders
# One attention, forward and backward, whose every sum runs in an order of our choosing, in a working dtype (float32
# for the low-precision dtypes, float64 for float64). The tolerance must accept all of them: a correct kernel may
# sum in any order.

ORDERS = ("sequential", "reverse", "pairwise", "blas", "blocked")
SUM_BLOCK = 32  # the block of the "blocked" order: within a block in sequence, then the block sums in sequence


def _work(dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def ordered_sum(x, order):
    """Σ over the last axis of ``x`` (in x's dtype) in the given order."""
    n = x.shape[-1]
    if n == 0:
        return np.zeros(x.shape[:-1], x.dtype)
    if order == "blas":
        return np.sum(x, axis=-1)
    if order in ("sequential", "reverse"):
        idx = range(n) if order == "sequential" else range(n - 1, -1, -1)
        acc = np.zeros(x.shape[:-1], x.dtype)
        for j in idx:
            acc = acc + x[..., j]
        return acc
    if order == "pairwise":
        while x.shape[-1] > 1:
            if x.shape[-1] % 2:
                x = np.concatenate([x, np.zeros((*x.shape[:-1], 1), x.dtype)], axis=-1)
            x = x[..., 0::2] + x[..., 1::2]
        return x[..., 0]
    if order == "blocked":
        parts = [ordered_sum(x[..., s : s + SUM_BLOCK], "sequential") for s in range(0, n, SUM_BLOCK)]
        return ordered_sum(np.stack(parts, axis=-1), "sequential")
    raise ValueError(order)


def contract(a, b, order):
    """``a @ b`` with the sum over the shared axis in the given order (products rounded one by one)."""
    if order == "blas":
        return a @ b
    terms = a[..., :, :, None] * b[..., None, :, :]  # (..., N, K, M)
    return ordered_sum(np.swapaxes(terms, -1, -2), order)


def scaled_logits(q, k, mask, bias, scale, w):
    """``S = scale·q kᵀ + bias`` in the working dtype ``w`` (BLAS order), ``-inf`` where masked."""
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = w.type(scale) * (q.astype(w) @ t(k.astype(w)))
    if bias is not None:
        s = s + bias.astype(w)
    return s if mask is None else np.where(mask, s, -np.inf)


def ordered_attention(order, qk_order=None):
    """``(fn, grad_fn)`` of the plain attention with every sum in ``order`` (``qk_order`` for QKᵀ over d)."""
    qk_order = qk_order or order

    def weights(q, k, mask, bias, scale, w):
        scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
        s = w.type(scale) * contract(q.astype(w), t(k.astype(w)), qk_order)
        if bias is not None:
            s = s + bias.astype(w)
        if mask is not None:
            s = np.where(mask, s, -np.inf)
        m = np.max(s, axis=-1, keepdims=True)
        e = np.exp(s - np.where(np.isneginf(m), 0.0, m).astype(w))
        total = ordered_sum(e, order)[..., None]
        return (e / np.where(total == 0, 1.0, total)).astype(w)

    def fn(q, k, v, *, mask=None, bias=None, scale=None):
        w = _work(q.dtype)
        p = weights(q, k, mask, bias, scale, w)
        return contract(p, v.astype(w), order).astype(q.dtype)

    def grad_fn(q, k, v, dout, *, mask=None, bias=None, scale=None):
        w = _work(q.dtype)
        p = weights(q, k, mask, bias, scale, w)
        scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
        q_, k_, v_, do = (a.astype(w) for a in (q, k, v, dout))
        dp = contract(do, t(v_), order)
        ds = p * (dp - ordered_sum(p * dp, order)[..., None])
        dq = w.type(scale) * contract(ds, k_, order)
        dk = w.type(scale) * contract(t(ds), q_, order)
        dv = contract(t(p), do, order)
        return tuple(g.astype(q.dtype) for g in (dq, dk, dv))

    return fn, grad_fn


def tiled_attention(tile=32):
    """``(fn, grad_fn)``: FlashAttention in the working dtype, keys in tiles of ``tile``: online softmax forward;
    backward recomputing P from the logsumexp tile by tile, D = dO·O from the rounded output."""

    def forward(q, k, v, mask, bias, scale):
        w = _work(q.dtype)
        s_all, v_ = scaled_logits(q, k, mask, bias, scale, w), v.astype(w)
        m = np.full((*s_all.shape[:-1], 1), -np.inf, dtype=w)
        total = np.zeros_like(m)
        acc = np.zeros((*s_all.shape[:-1], v.shape[-1]), dtype=w)
        for start in range(0, k.shape[-2], tile):
            s = s_all[..., start : start + tile]
            m_new = np.maximum(m, np.max(s, axis=-1, keepdims=True))
            shift = np.where(np.isneginf(m_new), 0.0, m_new).astype(w)
            e = np.exp(s - shift)
            alpha = np.exp(np.where(np.isneginf(m), -np.inf, m - shift)).astype(w)
            total = alpha * total + np.sum(e, axis=-1, keepdims=True)
            acc = alpha * acc + e @ v_[..., start : start + tile, :]
            m = m_new
        out = acc / np.where(total == 0, 1.0, total)
        with np.errstate(divide="ignore"):
            lse = np.where(total == 0, -np.inf, m + np.log(np.where(total == 0, 1.0, total))).astype(w)
        return out, lse

    def fn(q, k, v, *, mask=None, bias=None, scale=None):
        return forward(q, k, v, mask, bias, scale)[0].astype(q.dtype)

    def grad_fn(q, k, v, dout, *, mask=None, bias=None, scale=None):
        w = _work(q.dtype)
        out, lse = forward(q, k, v, mask, bias, scale)
        o = out.astype(q.dtype).astype(w)  # the output as the forward returned it
        scale_ = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
        q_, k_, v_, do = (a.astype(w) for a in (q, k, v, dout))
        s_all = scaled_logits(q, k, mask, bias, scale, w)
        d = np.sum(do * o, axis=-1, keepdims=True)  # D_i = dO_i · O_i
        dq = np.zeros(q_.shape, w)
        dks, dvs = [], []
        finite = np.isfinite(lse)
        for start in range(0, k.shape[-2], tile):
            s = s_all[..., start : start + tile]
            p = np.where(finite, np.exp(s - np.where(finite, lse, 0.0)), 0.0).astype(w)
            dvs.append(t(p) @ do)
            dp = do @ t(v_[..., start : start + tile, :])
            ds = p * (dp - d)
            dq = dq + w.type(scale_) * (ds @ k_[..., start : start + tile, :])
            dks.append(w.type(scale_) * (t(ds) @ q_))
        dk, dv = np.concatenate(dks, axis=-2), np.concatenate(dvs, axis=-2)
        return tuple(g.astype(q.dtype) for g in (dq, dk, dv))

    return fn, grad_fn


def eager_attention(detach_max=False):
    """``(fn, grad_fn)``: attention as eager PyTorch code writes it, ``e = exp(S − max S)``, ``P = e / Σe``, with
    every op's result stored in the dtype (sums in the working dtype), and the backward that autograd derives from
    those ops. Unless ``detach_max``, the gradient also flows through the shift: ``m = max_k S_k`` adds
    ``−Σ_k dS_k`` — zero in exact arithmetic, a rounding residue in practice — to each row's argmax entry."""

    def forward(q, k, v, mask, bias, scale):
        w = _work(q.dtype)

        def st(x):  # an op's result stored in the dtype, read back in the working dtype
            return x.astype(q.dtype).astype(w)

        scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
        s = st(st(q.astype(w) @ t(k.astype(w))) * w.type(scale))
        if bias is not None:
            s = st(s + bias.astype(w))
        if mask is not None:
            s = np.where(mask, s, -np.inf)
        m = np.max(s, axis=-1, keepdims=True)
        m = np.where(np.isneginf(m), 0.0, m).astype(w)
        e = st(np.exp(st(s - m)))
        total = st(np.sum(e, axis=-1, keepdims=True))
        total = np.where(total == 0, 1.0, total).astype(w)
        p = st(e / total)
        return st(p @ v.astype(w)), (s, e, total, p, w, st, scale)

    def fn(q, k, v, *, mask=None, bias=None, scale=None):
        return forward(q, k, v, mask, bias, scale)[0].astype(q.dtype)

    def grad_fn(q, k, v, dout, *, mask=None, bias=None, scale=None):
        _, (s, e, total, p, w, st, scale_) = forward(q, k, v, mask, bias, scale)
        q_, k_, v_, do = (a.astype(w) for a in (q, k, v, dout))
        dv = st(t(p) @ do)
        dp = st(do @ t(v_))
        # P = e / ℓ: de = dP / ℓ, dℓ = −Σ_k dP_k e_k / ℓ²; ℓ = Σ e sends dℓ to every e_k
        dl = st(-np.sum(st(dp * e), axis=-1, keepdims=True) / (total * total))
        de = st(st(dp / total) + dl)
        dx = st(de * e)  # through exp: the gradient of S − m
        if not detach_max:  # through m = max_k S_k: −Σ_k dx_k onto the argmax entry
            dm = st(-np.sum(dx, axis=-1, keepdims=True))
            dx = st(dx + np.where(np.arange(s.shape[-1]) == np.argmax(s, axis=-1)[..., None], dm, 0.0))
        ds = st(dx * w.type(scale_))  # through S = scale·(Q Kᵀ)
        dq, dk = st(ds @ k_), st(t(ds) @ q_)
        return tuple(g.astype(q.dtype) for g in (dq, dk, dv))

    return fn, grad_fn


# ---------------------------------------------------------------- logsumexp formulations
# Kernels that keep a row's logsumexp lse = m + log ℓ (in the working dtype: float32, or float64 for float64) and
# form the weights as P = exp(S − lse): FlashAttention's backward, two-pass forwards, split-K decoding. An lse near
# 500 is rounded as a whole, which moves every weight of its row by the same factor: legitimate, and modelled.


def _lse(s, w):
    """``lse = m + log Σ_k exp(s_k − m)`` over the last axis, in ``w``; ``-inf`` on a row with no key.  (..., N, 1)"""
    m = np.max(s, axis=-1, keepdims=True)
    shift = np.where(np.isneginf(m), 0.0, m).astype(w)
    total = np.sum(np.exp(s - shift), axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return np.where(total == 0, -np.inf, shift + np.log(np.where(total == 0, 1.0, total))).astype(w)


def _p_from_lse(s, lse):
    """``P = exp(S − lse)``, 0 on rows with no key."""
    finite = np.isfinite(lse)
    with np.errstate(invalid="ignore"):
        return np.where(finite, np.exp(s - np.where(finite, lse, 0.0)), 0.0).astype(s.dtype)


def lse_attention(forward="two-pass", splits=4, d_from="dO·O"):
    """``(fn, grad_fn)`` of attention through the logsumexp, in the working dtype.

    forward: ``"two-pass"`` — a first pass forms each row's lse, a second ``P = exp(S − lse)`` (stored in the input
        dtype) and ``O = P V``; ``"split-k"`` — the keys in ``splits`` chunks, each giving its own normalised output
        and lse, merged as ``lse = log Σ_s exp(lse_s)``, ``O = Σ_s exp(lse_s − lse) O_s`` (FlashDecoding).
    The backward recomputes ``P = exp(S − lse)`` from the forward's lse, with ``D_i = dO_i·O_i`` from the output
    as returned (``d_from="dO·O"``, FlashAttention-2) or ``D_i = Σ_k P_ik dP_ik`` (``"ΣP∘dP"``).
    """

    def two_pass(s, v_, like):
        lse = _lse(s, s.dtype)
        p = _p_from_lse(s, lse).astype(like).astype(s.dtype)
        return p @ v_, lse

    def split_k(s, v_, like):
        M, w = s.shape[-1], s.dtype
        bounds = np.linspace(0, M, splits + 1).astype(int)
        outs, lses = [], []
        for a, b in itertools.pairwise(bounds):
            if a == b:
                continue
            o_s, lse_s = two_pass(s[..., a:b], v_[..., a:b, :], like)
            outs.append(o_s)
            lses.append(lse_s)
        lse_all = np.concatenate(lses, axis=-1)  # (..., N, splits)
        lse = _lse(lse_all, w)
        weight = _p_from_lse(lse_all, lse)  # exp(lse_s − lse)
        out = sum(weight[..., i : i + 1] * o for i, o in enumerate(outs))
        return out.astype(w), lse

    run = {"two-pass": two_pass, "split-k": split_k}[forward]

    def forward_(q, k, v, mask, bias, scale):
        w = _work(q.dtype)
        return run(scaled_logits(q, k, mask, bias, scale, w), v.astype(w), q.dtype)

    def fn(q, k, v, *, mask=None, bias=None, scale=None):
        return forward_(q, k, v, mask, bias, scale)[0].astype(q.dtype)

    def grad_fn(q, k, v, dout, *, mask=None, bias=None, scale=None):
        w = _work(q.dtype)
        out, lse = forward_(q, k, v, mask, bias, scale)
        scale_ = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
        q_, k_, v_, do = (a.astype(w) for a in (q, k, v, dout))
        p = _p_from_lse(scaled_logits(q, k, mask, bias, scale, w), lse)
        dp = do @ t(v_)
        if d_from == "dO·O":
            d = np.sum(do * out.astype(q.dtype).astype(w), axis=-1, keepdims=True)
        else:
            d = np.sum(p * dp, axis=-1, keepdims=True)
        ds = p * (dp - d)
        dq, dk, dv = w.type(scale_) * (ds @ k_), w.type(scale_) * (t(ds) @ q_), t(p) @ do
        return tuple(g.astype(q.dtype) for g in (dq, dk, dv))

    return fn, grad_fn


# ---------------------------------------------------------------- the sweep's kernels
# Every correct formulation the tolerance must accept on re-seeds of the battery's most data-dependent recipes
# (tests/oracle/test_oracle_sweep.py runs a few seeds on every `make test`; scripts/oracle_sweep.py runs all 40).


def sweep_kernels():
    """``{name: ((fn, grad_fn), policy)}``: five summation orders, eager code through the max shift (judged as eager
    code: in float32 and float64 that is the fused policy's arithmetic too), three logsumexp formulations."""
    return {
        "sequential over keys": (ordered_attention("sequential"), "fused"),
        "pairwise": (ordered_attention("pairwise"), "fused"),
        "BLAS": (ordered_attention("blas"), "fused"),
        "tiled over 32 keys": (tiled_attention(32), "fused"),
        "QKᵀ reversed over d": (ordered_attention("blas", qk_order="reverse"), "fused"),
        "eager, autograd through the max shift": (eager_attention(), "eager"),
        "two-pass forward": (lse_attention("two-pass"), "fused"),
        "split-K merged by lse": (lse_attention("split-k", splits=4), "fused"),
        "backward from lse, D = ΣP∘dP": (lse_attention("two-pass", d_from="ΣP∘dP"), "fused"),
    }


def sweep_ratios(kernel, ref, dtype):
    """Per output, the check's ratio for one kernel on one reference (the harness's own comparison)."""
    from attention_ref.testing.harness import compare_output

    fn, grad_fn = kernel
    x = ref.inputs
    kw = {"mask": x["mask"], "bias": x["bias"], "scale": x["scale"]}
    got = {"out": fn(x["q"], x["k"], x["v"], **kw)}
    got.update(zip(("dq", "dk", "dv"), grad_fn(x["q"], x["k"], x["v"], x["dout"], **kw), strict=True))
    return {
        o: compare_output("sweep", o, got[o], ref.exact[o], ref.kernel_error[o], ref.magnitude[o], dtype,
                          policy=ref.policy, groups=ref.groups[o], last_rounding=True).ratio
        for o in ("out", "dq", "dk", "dv")
    }  # fmt: skip


# ---------------------------------------------------------------- eager PyTorch


def torch_eager_attention(q, k, v, *, mask=None, bias=None, scale=None):
    """Eager PyTorch code on torch tensors, the max shift not detached: ``e = exp(s − s.amax(-1))``, ``e / e.sum(-1)``
    (its gradients by autograd through the shift: judged by the eager policy)."""
    import torch

    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    s = s if bias is None else s + bias
    s = s if mask is None else s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isinf(m), torch.zeros_like(m), m))
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total == 0, torch.ones_like(total), total) @ v
