r"""Linear attention: O(N) time and memory by never forming the N × M weight matrix.

Two kinds, chosen with ``kind=``:

``kind="elu"`` — Katharopoulos et al. 2020, "Transformers are RNNs". With the feature map
``φ(x) = elu(x) + 1`` (positive, so the weights below are positive), applied entrywise:

.. math::
    S = \sum_j \phi(k_j)\, v_j^\top = \phi(K)^\top V \ (d \times d_v), \qquad
    z = \sum_j \phi(k_j) \ (d), \qquad
    o_i = \frac{\phi(q_i)^\top S}{\phi(q_i)^\top z + \varepsilon}.

It is attention with weights ``A_ij = φ(q_i)·φ(k_j) / (φ(q_i)·z + ε)`` (rows sum to just under 1),
but associating ``(φ(Q) φ(K)ᵀ) V = φ(Q) (φ(K)ᵀ V)`` costs O((N + M)·d·dv) instead of O(N·M·d).

``kind="efficient"`` — Shen et al. 2021, "Efficient Attention: Attention with Linear Complexities".
A softmax over the features of each query and a softmax over the positions of each key feature:

.. math::
    \rho_q(Q)_{ic} = \frac{e^{Q_{ic}}}{\sum_{c'} e^{Q_{ic'}}}, \qquad
    \rho_k(K)_{jc} = \frac{e^{K_{jc}}}{\sum_{j'} e^{K_{j'c}}}, \qquad
    O = \rho_q(Q)\,\big(\rho_k(K)^\top V\big).

Its weights ``A = ρ_q(Q) ρ_k(K)ᵀ`` have rows that sum to exactly 1; there is no ``eps`` and no scale.

Backward of ``kind="elu"``. Write ``n_i = φ(q_i)ᵀ S`` (numerator), ``δ_i = φ(q_i)·z + ε``, ``o_i = n_i / δ_i``:

* ``dn_i = do_i / δ_i`` and ``dδ_i = −Σ_c do_ic n_ic / δ_i² = −(do_i · o_i) / δ_i``;
* ``dφ(q_i) = S dn_i + z dδ_i``, ``dS = Σ_i φ(q_i) dn_iᵀ = φ(Q)ᵀ dN``, ``dz = Σ_i φ(q_i) dδ_i``;
* ``S = φ(K)ᵀ V``, ``z = φ(K)ᵀ 1``  ⇒  ``dφ(K) = V dSᵀ + 1 dzᵀ``, ``dV = φ(K) dS``;
* ``φ'(x) = 1`` for ``x > 0`` and ``eˣ`` otherwise  ⇒  ``dQ = dφ(Q) ∘ φ'(Q)``, ``dK = dφ(K) ∘ φ'(K)``.

Key mask (``key_mask``, True = the key counts; e.g. padded context tokens are False). Masking a key
removes its term from the sums over keys: ``φ(k_j)`` (or ``ρ_k(K)``'s softmax over positions) is
replaced by 0 for a masked ``j``, so ``S``, ``z`` and ``G`` are sums over the allowed keys only. This is
exactly linear attention on the allowed keys alone (the implied weights of masked keys are 0 and every
other weight is what it would be without those keys). A row whose keys are all masked gets ``S = 0``,
``z = 0``, output 0 and gradients 0 (with ``eps = 0`` its denominator 0 is replaced by 1, never NaN).
Backward: ``dK`` and ``dV`` of a masked key are 0 (its features were replaced by a constant); the
formulas below hold with ``φ(K)`` the masked features and ``φ'(K)`` zeroed at masked keys.

Backward of ``kind="efficient"``. With ``G = ρ_k(K)ᵀ V``: ``dρ_q = dO Gᵀ``, ``dG = ρ_qᵀ dO``,
``dρ_k = V dGᵀ``, ``dV = ρ_k dG``, and each softmax's backward (:mod:`attention_ref.ops.softmax`)
along its own axis gives ``dQ`` and ``dK``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from types import ModuleType
from typing import ClassVar

from .._checks import as_dtype, check_cache, in_working_dtype, require_bool, require_broadcastable_to, require_dout
from ..backend import Array, namespace
from ..ops.softmax import SoftmaxCache, softmax_backward, softmax_forward
from .inputs import check_qkv

__all__ = ["LINEAR_KINDS", "LinearAttentionCache", "linear_attention_backward", "linear_attention_forward"]

LINEAR_KINDS = ("elu", "efficient")


@dataclass(frozen=True)
class LinearAttentionCache:
    """What :func:`linear_attention_backward` needs.

    ``weights`` is always ``None``: linear attention never forms an ``N × M`` weight matrix.
    :meth:`implied_weights` builds the matrix it is equivalent to, for small inputs and plots.
    """

    backward_names: ClassVar[tuple[str, ...]] = ("linear_attention_backward",)  # the backward that takes it

    q: Array  # (..., N, d), as given
    k: Array  # (..., M, d)
    v: Array  # (..., M, dv)
    kind: str  # "elu" or "efficient"
    eps: float
    # the intermediates below are in the working dtype: float32 for float16 input
    q_features: Array  # φ(Q) or ρ_q(Q), (..., N, d)
    k_features: Array  # φ(K) or ρ_k(K), (..., M, d)
    kv: Array  # S = φ(K)ᵀ V or G = ρ_k(K)ᵀ V, (..., d, dv)
    k_sum: Array | None  # z = Σ_j φ(k_j), (..., d); None for "efficient"
    denominator: Array | None  # δ_i = φ(q_i)·z + ε, (..., N, 1); None for "efficient"
    out: Array  # (..., N, dv), unrounded
    weights: None = field(default=None, init=False)  # never formed; see implied_weights
    key_mask: Array | None = None  # as given, broadcastable to (..., M); None = every key counts

    def implied_weights(self) -> Array:
        """The ``(..., N, M)`` weights ``A`` with ``out = A V`` — O(N·M), for inspection only."""
        xp = namespace(self.q_features)
        # A = φ(Q) φ(K)ᵀ / δ   or   A = ρ_q(Q) ρ_k(K)ᵀ
        a = self.q_features @ xp.matrix_transpose(self.k_features)
        return as_dtype(xp, a if self.denominator is None else a / self.denominator, self.q.dtype)


def _elu_plus_one(xp: ModuleType, x: Array) -> tuple[Array, Array]:
    """``(φ(x), φ'(x))`` for ``φ(x) = elu(x) + 1``: ``x + 1`` and 1 for ``x > 0``, ``eˣ`` and ``eˣ`` otherwise."""
    # exp of min(x, 0) so that large positive x, whose branch is not used, cannot overflow
    exp_neg = xp.exp(xp.minimum(x, 0.0))
    positive = x > 0.0
    return xp.where(positive, x + 1.0, exp_neg), xp.where(positive, 1.0, exp_neg)


def _check_key_mask(xp: ModuleType, key_mask: Array, k: Array) -> Array:
    """``key_mask`` as ``(..., M, 1)`` (one flag per key, broadcast over the features); errors name the shapes."""
    namespace(k, key_mask)
    require_bool(xp, "key_mask", key_mask)
    require_broadcastable_to("key_mask", tuple(key_mask.shape), tuple(k.shape[:-1]))
    return xp.expand_dims(key_mask, axis=-1)


def linear_attention_forward(
    q: Array, k: Array, v: Array, *, eps: float = 1e-6, kind: str = "elu", key_mask: Array | None = None
) -> tuple[Array, LinearAttentionCache]:
    """Linear attention in O(N): Katharopoulos et al. (``kind="elu"``) or Shen et al. (``kind="efficient"``).

    Inputs:
        q: ``(..., N, d)`` queries.
        k: ``(..., M, d)`` keys; leading dims equal to q's.
        v: ``(..., M, dv)`` values.
        eps: added to the denominator ``φ(q_i)·z`` (``kind="elu"`` only; ``"efficient"`` has none).
        kind: ``"elu"`` — ``φ(x) = elu(x) + 1`` features; ``"efficient"`` — softmax of each query over its
            features and of each key feature over the positions.
        key_mask: boolean, broadcastable to ``(..., M)``; True = the key counts. Masked keys are left out of
            every sum over keys — the same as deleting them (a per-query mask has no linear-time form).

    Returns:
        out: ``(..., N, dv)``.
        cache: :class:`LinearAttentionCache` (``cache.weights`` is ``None``; see ``implied_weights()``).
    """
    xp = check_qkv(q, k, v)
    q_in, k_in, v_in = q, k, v  # as given, for the cache
    if kind not in LINEAR_KINDS:
        raise ValueError(f"kind must be one of {LINEAR_KINDS}, got {kind!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    if not 0 <= eps < math.inf:
        raise ValueError(f"eps must be finite and ≥ 0, got {eps}")
    keys_on = None if key_mask is None else _check_key_mask(xp, key_mask, k)  # (..., M, 1)
    # float16 is computed in float32 (φ(q)·z sums d·M products: 4 keys of 300 overflow float16), as exact
    # attention does; the output is rounded back, the cache keeps the float32 intermediates
    dtype = q.dtype
    q, k, v = in_working_dtype(xp, q, k, v)
    if kind == "elu":
        q_features, _ = _elu_plus_one(xp, q)  # φ(Q)   (..., N, d)
        k_features, _ = _elu_plus_one(xp, k)  # φ(K)   (..., M, d)
        if keys_on is not None:
            # a masked key contributes nothing: φ(k_j) → 0
            k_features = xp.where(keys_on, k_features, 0.0)
        # S = φ(K)ᵀ V   (..., d, dv)
        kv = xp.matrix_transpose(k_features) @ v
        # z = Σ_j φ(k_j)   (..., d)
        k_sum = xp.sum(k_features, axis=-2)
        # δ_i = φ(q_i)·z + ε   (..., N, 1)
        denominator = q_features @ xp.expand_dims(k_sum, axis=-1) + eps
        # δ = 0 only with eps = 0 and no key (all masked, or M = 0): the numerator is 0 there, so divide by 1
        denominator = xp.where(denominator == 0.0, 1.0, denominator)
        # o_i = φ(q_i)ᵀ S / δ_i   (..., N, dv)
        out = q_features @ kv / denominator
    else:
        q_features, _ = softmax_forward(q, axis=-1)  # ρ_q(Q): each query's features sum to 1
        # ρ_k(K): each key feature sums to 1 over the (allowed) positions; masked keys get 0
        k_features, _ = softmax_forward(k, axis=-2, mask=keys_on)
        # G = ρ_k(K)ᵀ V   (..., d, dv)
        kv = xp.matrix_transpose(k_features) @ v
        k_sum, denominator = None, None
        # O = ρ_q(Q) G   (..., N, dv)
        out = q_features @ kv
    cache = LinearAttentionCache(
        q=q_in,
        k=k_in,
        v=v_in,
        kind=kind,
        eps=float(eps),
        q_features=q_features,
        k_features=k_features,
        kv=kv,
        k_sum=k_sum,
        denominator=denominator,
        out=out,
        key_mask=key_mask,
    )
    return as_dtype(xp, out, dtype), cache


def linear_attention_backward(dout: Array, cache: LinearAttentionCache) -> dict[str, Array]:
    """Gradients of :func:`linear_attention_forward`.

    Inputs:
        dout: ``(..., N, dv)``, the gradient of the loss with respect to ``out``.
        cache: from :func:`linear_attention_forward`.

    Returns:
        ``{"q": (..., N, d), "k": (..., M, d), "v": (..., M, dv)}``.
    """
    check_cache(cache, LinearAttentionCache, "linear_attention_backward")
    xp = require_dout(dout, cache.out.shape, cache.q.dtype, like=cache.q)
    dtype = dout.dtype
    # float16 in float32, as the forward (whose intermediates in the cache are float32 already)
    dout, v, q_w, k_w = in_working_dtype(xp, dout, cache.v, cache.q, cache.k)
    phi_q, phi_k, kv = cache.q_features, cache.k_features, cache.kv
    grads = _gradients(xp, dout, cache, phi_q, phi_k, kv, v, q_w, k_w)
    return {name: as_dtype(xp, g, dtype) for name, g in grads.items()}


def _gradients(
    xp: ModuleType,
    dout: Array,
    cache: LinearAttentionCache,
    phi_q: Array,
    phi_k: Array,
    kv: Array,
    v: Array,
    q: Array,
    k: Array,
) -> dict[str, Array]:
    """The backward's arithmetic, in the working dtype (see :func:`linear_attention_backward`)."""
    if cache.kind == "efficient":
        # dρ_q = dO Gᵀ   (..., N, d)
        d_phi_q = dout @ xp.matrix_transpose(kv)
        # dG = ρ_qᵀ dO   (..., d, dv)
        d_kv = xp.matrix_transpose(phi_q) @ dout
        # dρ_k = V dGᵀ   (..., M, d)
        d_phi_k = v @ xp.matrix_transpose(d_kv)
        return {
            "q": softmax_backward(d_phi_q, SoftmaxCache(weights=phi_q, axis=-1))["x"],
            "k": softmax_backward(d_phi_k, SoftmaxCache(weights=phi_k, axis=-2))["x"],
            # dV = ρ_k dG   (..., M, dv)
            "v": phi_k @ d_kv,
        }
    denominator = cache.denominator
    # dn_i = do_i / δ_i   (..., N, dv)
    d_num = dout / denominator
    # dδ_i = -(do_i · o_i) / δ_i   (..., N, 1)
    d_den = -xp.sum(dout * cache.out, axis=-1, keepdims=True) / denominator
    # dφ(q_i) = S dn_i + z dδ_i   (..., N, d)
    d_phi_q = d_num @ xp.matrix_transpose(kv) + d_den * xp.expand_dims(cache.k_sum, axis=-2)
    # dS = φ(Q)ᵀ dN   (..., d, dv)
    d_kv = xp.matrix_transpose(phi_q) @ d_num
    # dz = Σ_i φ(q_i) dδ_i   (..., 1, d)
    d_k_sum = xp.matrix_transpose(xp.matrix_transpose(phi_q) @ d_den)
    # dφ(k_j) = dS v_j + dz   (..., M, d)
    d_phi_k = v @ xp.matrix_transpose(d_kv) + d_k_sum
    _, dphi_dq = _elu_plus_one(xp, q)
    _, dphi_dk = _elu_plus_one(xp, k)
    if cache.key_mask is not None:
        # φ(k_j) of a masked key was replaced by the constant 0: its derivative is 0
        dphi_dk = xp.where(xp.expand_dims(cache.key_mask, axis=-1), dphi_dk, 0.0)
    return {
        "q": d_phi_q * dphi_dq,  # dQ = dφ(Q) ∘ φ'(Q)
        "k": d_phi_k * dphi_dk,  # dK = dφ(K) ∘ φ'(K)
        "v": phi_k @ d_kv,  # dV = φ(K) dS   (..., M, dv)
    }
