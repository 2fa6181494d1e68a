r"""The simulated kernel: attention in float64 with every rounding a legitimate kernel may make, drawn once.

:func:`simulate_attention_core` runs the forward and the backward of attention with the errors of
:mod:`.rounding` added to every operation's result — the union over the legitimate ways of computing attention
under the policy (:mod:`.policy`). :mod:`.tolerance` takes its yardstick from repeated simulations; the block
checks (:mod:`.block_model`, :mod:`.transformer_calls`) run it inside their chains.

The operations and the errors drawn for each:

* logits: ``QKᵀ`` summed over ``d`` in any order and scaled, in float32 (``fused``); or ``scale·q`` and ``k``
  stored in the dtype, ``QKᵀ`` stored and its product with the scale stored again (``eager``); ``+ bias``
  rounded (and stored, ``eager``);
* softmax: ``S − max`` rounded, ``exp`` within one ulp (each stored, ``eager``); ``ℓ = Σ_k e`` over the keys in
  any order *and* rescaled at every new running maximum, as the tiled online softmax does (the sum's error drawn
  at twice its size; stored, ``eager``); ``P = e/ℓ``, or ``exp(S − lse)`` — a second pass, split-K merged by
  lse — with the lse ``m + log ℓ`` rounded *as a whole*: a factor ``exp(±2u·|lse|)`` shared by the row (an lse
  near 500 in float32 moves by 3e-5; a split's and the merged lse); ``P`` stored in the dtype for ``P·V``;
* ``O = P V``: summed over the keys, rescaled like ``ℓ``, divided by ``ℓ`` (its last rounding to the dtype
  deducted by the harness, not drawn);
* backward: the weights recomputed from the lse, kept in float32 and rounded as a whole, with ``QKᵀ`` summed
  over ``d`` in yet another order; ``P`` stored for ``dV = Pᵀ dO`` (summed over the queries); ``dP = dO Vᵀ``
  stored; ``D_i = Σ_k P_ik dP_ik`` *and* ``dO_i·O_i`` from the output the forward returned (both kernels' ways;
  ``Σ P∘dP`` also carries the lse's row factor, drawn independently); ``dS = P ∘ (dP − D)`` rounded and stored
  (``eager``: with ``P̃`` as the forward stored it); the residue of the max shift (below); ``dQ = scale·dS K``,
  ``dK = scale·dSᵀ Q`` each summed in any order (``eager``: K and Q as stored, scaled, in the dtype).

The max shift under autograd. Eager code writes the softmax as ``e = exp(S − m)``, ``m = max_k S_k``,
``P = e/Σe``; unless ``m`` is detached, autograd also differentiates the shift: ``∂/∂m = −Σ_k dS_k``, which
``max`` sends to each row's argmax entry, so that entry gets ``dS_a − Σ_k dS_k``. In exact arithmetic
``Σ_k dS_k = 0``; computed, it is the sum of the errors of the stored ``dS̃_k`` plus the sum's own rounding: a
normal error of standard deviation ``σ_i = w·Σ_k P_ik(|dP_ik| + |D_i|) + √M·u·Σ_k|dS_ik|`` is drawn onto each
row's argmax entry of ``dS``. On a long float16 row the division's backward ``Σ_k dP_k·(e_k/ℓ)/ℓ`` runs through
subnormal numbers (``P ≈ 2e-4`` over 4096 keys), and ``ℓ·tiny_w·√Σ_k(1 + dP_k²)`` is added (and, ``eager``, to
``D``: the same rounding reaches every ``dS`` entry through ``ℓ·dl``). It is a formulation, not a precision: both
policies draw it (``docs/oracle.md`` has what PyTorch's autograd was measured to leave there).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .policy import ARITHMETICS
from .rounding import RoundingModel
from .rounding import transpose as _t

__all__ = ["simulate_attention_core", "simulated_attention"]


def _logits(
    r: RoundingModel, q: np.ndarray, k: np.ndarray, bias: Any, mask: Any, scale: float, eager: bool
) -> np.ndarray:
    """``S = scale·q kᵀ + bias`` (masked entries ``−inf``) with the errors of every legitimate way to form it."""
    if eager:
        # scale·q and k (or √scale·q and √scale·k) stored in the dtype; Σ over d in any order; Q Kᵀ stored in the
        # dtype and its product with the scale stored again (PyTorch's eager q @ kᵀ * scale; diffusers' baddbmm
        # on the CPU rounds Q Kᵀ before it scales it)
        qs, ks = r.rel(scale * q, r.w), r.rel(k, r.w)
        s = r.rel(r.matmul(qs, _t(ks)), r.w, r.w, r.u)
        if bias is not None:
            s = r.rel(s + bias, r.u, r.w)  # + bias, stored in the dtype
    else:
        # q, k as given; Σ over d in any order and the scale's product, in float32 (fused)
        s = r.rel(scale * r.matmul(q, _t(k)), r.u)
        if bias is not None:
            s = r.rel(s + bias, r.u)
    return s if mask is None else np.where(mask, s, -np.inf)


def simulated_attention(
    inputs: dict[str, Any], dtype: str, rng: np.random.Generator, arithmetic: str = "fused"
) -> dict[str, np.ndarray]:
    """One simulated kernel: ``out, dq, dk, dv`` in float64 with every error of the rounding model drawn once.

    Inputs:
        inputs: as :attr:`Reference.inputs`; dtype: the dtype under test; rng: where the errors come from;
        arithmetic: ``"fused"`` or ``"eager"`` (:class:`~.policy.Policy`).

    Returns:
        ``{"out", "dq", "dk", "dv"}``, float64, shaped like the reference's, *before* their last rounding to the
        dtype (the harness deducts that rounding from the implementation's error entry by entry). See the module
        docstring for the list of errors and :mod:`.rounding` for their sizes.
    """
    q, k, v, dout = (np.asarray(inputs[n], dtype=np.float64) for n in ("q", "k", "v", "dout"))
    bias = None if inputs["bias"] is None else np.asarray(inputs["bias"], dtype=np.float64)
    r = RoundingModel(dtype, rng)
    out, grads = simulate_attention_core(
        r, q, k, v, dout, bias, inputs["mask"], inputs["scale"], arithmetic=arithmetic, last_rounding=False
    )
    return {"out": out, **grads}


def simulate_attention_core(
    r: RoundingModel,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    dout: np.ndarray | None,
    bias: np.ndarray | None,
    mask: np.ndarray | None,
    scale: float | None,
    *,
    arithmetic: str,
    last_rounding: bool = True,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The attention forward (and backward when ``dout`` is given) with the errors of ``r`` drawn once.

    Inputs (float64): q ``(..., N, d)``, k ``(..., M, d)``, v ``(..., M, dv)``, dout ``(..., N, dv)`` or ``None``;
    bias, mask broadcastable to ``(..., N, M)``; scale ``None`` for ``1/sqrt(d)``; arithmetic ``"fused"`` or
    ``"eager"``; last_rounding: whether the results are rounded to the dtype (stored) as they are handed on.

    Returns:
        ``(out, grads)``: ``grads`` is ``{"dq", "dk", "dv"}``, empty without ``dout``.
    """
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic must be one of {', '.join(ARITHMETICS)}; got {arithmetic!r}")
    eager = arithmetic == "eager"
    u, w = r.u, r.w
    stored = (w,) if eager else ()  # the softmax's intermediates: in the dtype (eager) or float32 (fused)
    last = (w,) if last_rounding else ()
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else float(scale)
    d, M = q.shape[-1], k.shape[-2]
    qk_terms = np.abs(scale) * (np.abs(q) @ _t(np.abs(k)))  # Σ_c |scale·q_c k_c|, the terms of each logit
    # forward: S, then e = exp(S − m) (the subtraction rounded, exp within one ulp)   (..., N, M)
    s = _logits(r, q, k, bias, mask, scale, eager)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)  # a row with no key: shift by 0
    e = r.rel(np.exp(r.rel(s - m, u, *stored)), 2 * u, *stored)
    # ℓ = Σ_k e over the keys; an online softmax also rescales the running sum at every new maximum: 2× the error
    live = np.sum(e, axis=-1, keepdims=True) > 0  # (..., N, 1)
    total = np.where(live, r.rel(r.sum(e, factor=2.0), *stored), 1.0)
    lse = np.where(live, m + np.log(total), 0.0)
    # P = e / ℓ; or exp(S − lse) (two passes, split-K merged by lse), the lse rounded as a whole, a split's and the
    # merged one: a factor exp(±2u·|lse|) shared by the row (an lse near 500 in float32 moves by 3e-5)
    row = np.exp(2 * u * np.abs(lse) * r.rng.uniform(-1.0, 1.0, lse.shape))
    p = np.where(live, e / total, 0.0) * row
    # P stored in the dtype for P·V; O = P V (its sum over keys rescaled like ℓ), divided by ℓ, stored in the dtype
    p = r.rel(p, u, w)
    out_pre = r.rel(r.matmul(p, v, factor=2.0), u)  # (..., N, dv)
    out = r.rel(out_pre, w)  # the output as returned
    if dout is None:
        return (out if last_rounding else out_pre), {}
    # backward: the weights again from the logsumexp, kept in float32 and rounded as a whole (|lse| ~ 500 moves by
    # u·500), with the logits summed over d in yet another order
    lse_b = np.where(live, r.rel(m + r.rel(np.log(total), u), u), np.inf)
    s_b = s + np.where(np.isfinite(s), r.sum_error(qk_terms, d), 0.0)
    with np.errstate(invalid="ignore"):
        p_b = np.exp(r.rel(s_b - lse_b, u))
    p_b = r.rel(np.where(live & np.isfinite(s_b), p_b, 0.0), 2 * u)
    dv = r.rel(r.matmul(_t(r.rel(p_b, w)), dout), u, *last)  # P stored in the dtype for dV = Pᵀ dO
    dp = r.rel(r.matmul(dout, _t(v)), w)  # dP = dO Vᵀ, stored in the dtype
    # D_i = Σ_k P_ik dP_ik, or dO_i · O_i from the output the forward returned: the errors of both; Σ P∘dP also
    # carries the row factor of P from the lse (an independent draw of its size)
    D = r.sum(dout * out) + r.sum_error(np.sum(p_b * np.abs(dp), axis=-1, keepdims=True), M)
    D = D * np.exp(2 * u * np.abs(np.where(live, lse, 0.0)) * r.rng.uniform(-1.0, 1.0, D.shape))
    # eager autograd forms D as ℓ·Σ_k dP_k·(e_k/ℓ)/ℓ (the division's backward), whose terms fall below the dtype's
    # normal numbers on a long row (float16, ℓ ~ 2000): each rounded by up to half a subnormal spacing
    subnormal = total * r.tiny_w * np.sqrt(np.sum(1.0 + dp * dp, axis=-1, keepdims=True))  # (..., N, 1)
    if eager:
        D = D + subnormal * r.z(D.shape)
    # dS = P ∘ (dP − D), stored in the dtype; eager autograd uses the weights P̃ as the forward stored them
    ds = r.rel((r.rel(p_b, w) if eager else p_b) * r.rel(dp - D, u), u, w)
    # autograd through an un-detached shift m = max_k S_k adds −Σ_k dS_k (0 up to rounding) to each row's argmax
    # entry: a normal draw of σ_i = w·Σ_k P_ik (|dP_ik| + |D_i|) + √M·u·Σ_k |dS_ik| there (module docstring)
    at_max = np.arange(M) == np.argmax(s, axis=-1)[..., None]  # (..., N, M), one entry per row
    sigma = w * np.sum(p_b * (np.abs(dp) + np.abs(D)), axis=-1, keepdims=True)
    sigma = sigma + np.sqrt(M) * u * np.sum(np.abs(ds), axis=-1, keepdims=True)  # (..., N, 1)
    sigma = sigma + subnormal  # ... and the division's backward, in subnormal numbers (above)
    ds = ds + np.where(at_max & live, sigma * r.z(sigma.shape), 0.0)
    # dQ = scale·dS K, dK = scale·dSᵀ Q; eager: K and Q as stored (scaled) in the dtype; fused: the scale in float32
    ws = w if eager else u
    dq = scale * r.matmul(ds, k) + np.abs(scale) * ws * np.sqrt((ds * ds) @ (k * k)) * r.z(q.shape)
    dk = scale * r.matmul(_t(ds), q) + np.abs(scale) * ws * np.sqrt(_t(ds * ds) @ (q * q)) * r.z(k.shape)
    return (out if last_rounding else out_pre), {"dq": r.rel(dq, u, *last), "dk": r.rel(dk, u, *last), "dv": dv}
