r"""How much error an attention implementation is allowed, and why.

For each case and each output ``X`` ∈ {``out``, ``dq``, ``dk``, ``dv``} the oracle computes

* ``X₆₄``: the float64 reference (:func:`attention_ref.attention_forward` /
  :func:`attention_ref.attention_backward`) on the inputs *as rounded to the dtype
  under test*, so rounding the inputs is never counted against anybody;
* the yardstick ``Y_X``: the error of a *simulated* kernel — the same computation
  in float64 with every rounding error a legitimate kernel in that dtype may make
  *under the policy* drawn at random at its largest size (:func:`simulated_attention`,
  below) — as the root-mean-square over ``Policy.samples = 8`` independent simulations of
  ``max|X_sim − X₆₄|``, the output's own last rounding to the dtype left out;

and lets an implementation's output ``X`` pass when, over its entries (or each group of
entries, below),

.. math::
    \max \big(|X - X_{64}| - s(X)/2\big)^+ \;\le\; c \cdot Y_X \;+\; f \cdot \varepsilon \cdot \max \|X\|,

with ``c = 3``, ``f = 0`` for ``out`` and ``f = 1`` for the gradients (:data:`DEFAULT_POLICY`),
``s(X)`` the dtype's spacing just above ``|X|`` at the value returned, ``ε`` the dtype's
machine epsilon and ``‖X‖`` the magnitude of the terms ``X`` is made of (the floor, below).
The reported *ratio* is the left side over the right side: ≤ 1 passes.

The policies (:class:`Policy`). What a correct kernel may round depends on how it computes,
and one rule for every kernel cannot see a bug where they differ most: logits near 500
stored in bfloat16 move by up to 1, which changes a weight by a factor e. So each kernel is
judged by a named policy, and every report names it:

* ``fused`` (the default): the logits ``S = scale·q kᵀ + bias``, the softmax's max, sum ``ℓ``
  and logsumexp, and every sum are kept in float32 (float64 for float64); ``q, k, v``, the
  weights ``P`` (for ``P·V``), ``dP``, ``dS`` and the outputs may be stored in the dtype.
  FlashAttention, xformers and PyTorch's SDPA backends compute so.
* ``eager``: also ``scale·q`` and ``k``, ``QKᵀ`` and its product with the scale, ``S − max``,
  ``exp``, ``ℓ`` and ``P`` may be stored in the dtype, op by op: PyTorch's eager code on half
  tensors, diffusers' ``AttnProcessor`` (``baddbmm`` in half).

In float32 and float64 the two coincide up to where a rounding lands. Under both, sums
accumulate in float32 or wider and nothing is stored narrower than the dtype.

The last rounding. Whatever a kernel computed, it returned it rounded to the dtype; rounding
to nearest moves a value that came out as ``x`` by at most half the spacing above ``|x|``
(subnormals included). That much is deducted from each entry's error (:func:`~.dtypes.half_spacing`)
and left out of the simulation, so the allowance covers only what came before: in float16 and
bfloat16 a rounding of the output is as large as many bugs (a softmax sum kept in float16 moves
a bfloat16 output by 0.2 %).

Why a simulation, not a measured kernel. An earlier rule measured one honest
float32 kernel — the reference code in float32, through NumPy's BLAS — and allowed a
few times its error. That allowance was a property of the BLAS, not of the problem:
OpenBLAS's blocked sums over 1024 keys are 5–7× more accurate than a key-by-key sum,
so every correct kernel that sums ``P·V`` key by key (PyTorch's CPU kernels, a plain
loop, MKL or XLA) was rejected on one machine and passed on another; and where a few
weights dominate (logits in the hundreds) the measured error rested on a handful of
roundings of ``QKᵀ`` that were sometimes lucky. The allowance must instead be a property of
the inputs, the dtype and the *set* of legitimate orders.

The rounding model (:mod:`.rounding`). Every operation's result gets an error at the
largest size any order allows, independent per entry and per operation: a single
rounding (a product, a function, a result stored in the dtype) moves ``x`` by
``δ·u·|x|`` (or ``δ·w·|x|``) with ``δ`` uniform on ``[−1, 1]``, and below the smallest normal
number by up to half the subnormals' spacing; a sum of ``n`` terms gets a normal error of
standard deviation ``√n·u·Σ|terms|`` (``u`` is the accumulator's unit roundoff, float32's 2⁻²⁴ —
float64's for float64 — and ``w`` the dtype's). For a sum in *any* order the error is
``Σ_a δ_a s_a`` over its additions, ``|δ_a| ≤ u`` and every partial sum
``|s_a| ≤ Σ|terms|``; with the ``δ_a`` independent (Higham and Mary's model, SIAM J. Sci.
Comput. 41, 2019) its standard deviation is at most ``u·√(n−1)·Σ|terms|``, whatever
the order: key by key (partial sums grow to the total: the worst), pairwise, blocked
with any block, a BLAS's panels. The model draws sums at that bound. The margin beyond the
model is ``c = 3`` and the partial sums: most orders keep them well under ``Σ|terms|``.

The operations of :func:`simulate_attention_core` and the errors drawn for each — the union
over the legitimate ways of computing attention under the policy:

* logits: ``QKᵀ`` summed over ``d`` in any order and scaled, in float32 (``fused``); or
  ``scale·q`` and ``k`` stored in the dtype, ``QKᵀ`` stored and its product with the scale
  stored again (``eager``); ``+ bias`` rounded (and stored, ``eager``);
* softmax: ``S − max`` rounded, ``exp`` within one ulp (each stored, ``eager``);
  ``ℓ = Σ_k e`` over the keys in any order *and* rescaled at every new running maximum, as
  the tiled online softmax does (the sum's error drawn at twice its size; stored,
  ``eager``); ``P = e/ℓ``, or ``exp(S − lse)`` — a second pass, split-K merged by lse —
  with the lse ``m + log ℓ`` rounded *as a whole*: a factor ``exp(±2u·|lse|)`` shared by the
  row (an lse near 500 in float32 moves by 3e-5; a split's and the merged lse); ``P``
  stored in the dtype for ``P·V``;
* ``O = P V``: summed over the keys, rescaled like ``ℓ``, divided by ``ℓ`` (its last
  rounding to the dtype deducted, not drawn);
* backward: the weights recomputed from the lse, kept in float32 and rounded as a whole,
  with ``QKᵀ`` summed over ``d`` in yet another order; ``P`` stored for ``dV = Pᵀ dO``
  (summed over the queries); ``dP = dO Vᵀ`` stored; ``D_i = Σ_k P_ik dP_ik`` *and*
  ``dO_i·O_i`` from the output the forward returned (both kernels' ways; ``Σ P∘dP`` also
  carries the lse's row factor, drawn independently); ``dS = P ∘ (dP − D)`` rounded and
  stored (``eager``: with ``P̃`` as the forward stored it); the residue of a shift
  ``m = max S`` that autograd differentiates (below); ``dQ = scale·dS K``,
  ``dK = scale·dSᵀ Q`` each summed in any order (``eager``: K and Q as stored, scaled, in
  the dtype).

The max shift under autograd. Eager code writes the softmax as ``e = exp(S − m)``,
``m = max_k S_k``, ``P = e/Σe``; unless ``m`` is detached, autograd also differentiates
the shift: ``∂/∂m = −Σ_k dS_k``, which ``max`` sends to each row's argmax entry, so that
entry gets ``dS_a − Σ_k dS_k``. In exact arithmetic ``Σ_k dS_k = 0``; computed, it is the sum
of the errors of the stored ``dS̃_k`` plus the sum's own rounding: the model draws a normal
error of standard deviation ``σ_i = w·Σ_k P_ik(|dP_ik| + |D_i|) + √M·u·Σ_k|dS_ik|`` onto each
row's argmax entry of ``dS``; on a long float16 row the division's backward
``Σ_k dP_k·(e_k/ℓ)/ℓ`` runs through subnormal numbers (``P ≈ 2e-4`` over 4096 keys), and
``ℓ·tiny_w·√Σ_k(1 + dP_k²)`` is added (and, ``eager``, to ``D``: the same rounding reaches every
``dS`` entry through ``ℓ·dl``). It is a formulation, not a precision: both policies draw it.
Measured through PyTorch's autograd the residue is at most ``1.11·w·Σ_k P_k(|dP_k| + |D|)``
away from long float16 rows.

Groups. That residue lands on each row's argmax key: ``dk`` is judged in two groups,
each against its own yardstick and floor (:class:`Group`) — the keys within rounding
distance of some row's largest logit (``4·w_S·(|max S| + (1 + √d)·max_k Σ_c|scale·q_c k_c|)``,
``w_S`` the logits' unit roundoff under the policy), and all the others. Allowed on every
key, the residue made ``dk``'s allowance on 1024 keys 1.0× max|dk| in float16 and 5.8× in
bfloat16: a kernel returning ``dK = 0`` whenever ``M ≥ 512`` passed.

Why the same inputs get the same allowance on any machine. The simulation is float64
arithmetic on the rounded inputs, with draws from a generator seeded by the case's name
and the dtype (NumPy's PCG64 and its normal sampler give the same numbers everywhere).
A different BLAS or thread count sums the float64 products in another order, which
moves them by ~1e-16 relative; for float32, float16 and bfloat16 the draws are ~1e-7 or
more of the values, and the allowance moves by ~1e-10 of itself. For float64 the draws
are themselves of float64's size, so the simulation's own rounding is part of the
yardstick: float64's allowance is the same on every machine only to a few %
(measured on an AMD EPYC Zen 4 with OpenBLAS: up to 3 % with NumPy's ``einsum`` in
place of the BLAS, up to 9 % with every float64 sum reversed). ``tests/test_oracle.py``
swaps the simulation's matrix products for ``einsum`` and checks both. References are kept
(:func:`reference`, the last 256) per case numbers, dtype and policy.

Why c = 3 and 8 samples. The root-mean-square of 8 draws of a largest error has a
relative spread of about ``1/√16 = 25 %`` where one entry dominates (less where many do);
real kernels' errors are well under the model's. Measured on 40 re-seeds × d ∈ {8, 16, 32, 64}
of the large-logits and long-sequence recipes through nine kernels (five summation orders,
eager code through the max shift, a two-pass forward, split-K merged by lse, a backward from
the lse with ``D = ΣP∘dP``), in float32, float64, float16 and bfloat16: 0 rejects in 46,080
checks, worst 0.51 (float32) and 0.82 (eager code under ``eager`` in bfloat16)
(``scripts/oracle_sweep.py``; ``docs/oracle.md`` has the tables). ``c`` need not differ between
the output and the gradients, because the gradients' longer chain of roundings is in the
simulation itself.

Why it catches the planted bugs. The allowance is a few units of the accumulator's roundoff
times ``√n`` and the magnitude, plus the roundings to the dtype the policy allows. The planted
bugs (``tests/oracle_impls.py``) make errors of another order: a wrong formula — scale ``1/d``,
``scale or default`` on a scale of 0, the causal mask aligned the other way, the softmax over
queries, the mask ignored or inverted, the bias ignored, the last key dropped, the online
softmax without rescaling, dropout left on, ``dS`` where ``dSᵀ`` belongs, ``dK = 0`` for long
sequences — changes the output by a fraction of its size (ratios 20 to 10⁷); non-finite values
always fail; and precision bugs exceed the model by the ratio of the roundoffs: ``P·V``, ``ℓ``
or an lse's ``ℓ`` accumulated in float16 or bfloat16, a float16 max in the numerator, ``S``
stored narrower than float32 under ``fused``, ``dV`` accumulated over the queries in the dtype.
``tests/test_oracle_bugs.py`` asserts each, on the cases that expose it.

What the model does not cover: rounding errors that are not independent, as when the
same term is added over and over (``n`` identical values summed key by key round the same
way every time: an error like ``n·u``, not ``√n·u``). Random inputs never do that; a case
built from identical tokens can. And narrow sums whose error stays below the roundings
around them: ``dQ`` accumulated key by key in the dtype is within what ``D = dO·O`` from the
rounded output already moves.

float64. The reference ``X₆₄`` is itself a float64 computation, with an error of the size
of a float64 kernel's: the comparison sees up to two such errors, well inside ``c = 3``.

The floor ``f·ε·max‖X‖``. With ``P`` the exact weights (``P ≥ 0``), ``O`` the exact output and
``dS`` the exact logit gradient:

  - ``‖out‖ = P |V|`` and ``‖dv‖ = Pᵀ |dO|`` (``P`` rounded);
  - ``‖dS‖ = |dS| + P ∘ Σ_c |dO_ic| |O_ic|`` (``dS`` rounded, and the row term
    ``D_i = dO_i · O_i`` computed from a rounded ``O``);
  - ``‖dq‖ = |scale| ‖dS‖ |K|`` and ``‖dk‖ = |scale| ‖dS‖ᵀ |Q|``.

For the gradients (``f = 1``) it is one rounding, in the dtype, of every term a kernel keeps
there: it keeps the allowance above 0 where a gradient is exactly 0 (one key: ``dq = 0``; a
FlashAttention-style backward is a rounding away from it), and it covers a few partial sums of a
gradient stored in the dtype, as PyTorch's CPU flash backward does (it adds every block of 256,
64 or 32 queries, 512 keys, into ``dQ``, ``dK``, ``dV`` held in the dtype). The forward's output
is accumulated in float32 and stored once by every fused kernel, and its last rounding is
deducted exactly: ``f = 0``, so that one rounding more — a sum kept in the dtype — shows.

Normwise, by max magnitude. Errors are compared with the largest errors of the simulated
kernels over a group of entries, not entry by entry: an entry that is zero up to rounding
would make any relative test blow up, and kernels are judged by the error they make on the
numbers that matter.

Non-finite values are never excused, except on rows the caller names. NaN or Inf where
the reference is finite fails, whatever the tolerance. Query rows with no allowed key
must give output 0 (and ``dq`` 0); :func:`~attention_ref.testing.check_attention`'s
``masked_rows="nan-ok"`` accepts NaN in ``out`` and ``dq`` on exactly those rows, and
``masked_rows="finite-ok"`` any finite value (``dout`` is then 0 on those rows, so that
``dk`` and ``dv`` stay comparable). ``dk`` and ``dv`` get nothing from a dead row, so they
are compared everywhere in every mode.
"""

from __future__ import annotations

import hashlib
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from ..attention import attention_backward, attention_forward
from .cases import Case
from .dtypes import DTYPES, eps, round_to
from .rounding import RoundingModel

__all__ = [
    "ARITHMETICS",
    "DEFAULT_POLICY",
    "EAGER",
    "FUSED",
    "OUTPUTS",
    "POLICIES",
    "Group",
    "Policy",
    "Reference",
    "check_policy",
    "reference",
    "simulate_attention_core",
    "simulated_attention",
    "yardstick",
]

OUTPUTS = ("out", "dq", "dk", "dv")

# What a kernel keeps in float32 (or wider), and what it may store in the dtype under test: see the module docstring.
ARITHMETICS = ("fused", "eager")


def _frozen(d: dict[str, float]) -> MappingProxyType:
    return MappingProxyType(dict(d))


_C = {"out": 3.0, "dq": 3.0, "dk": 3.0, "dv": 3.0}
_FLOOR = {"out": 0.0, "dq": 1.0, "dk": 1.0, "dv": 1.0}


@dataclass(frozen=True)
class Policy:
    """What a kernel may do, and the constants of the tolerance rule (see the module docstring).

    Attributes:
        arithmetic: ``"fused"`` (the default: the logits, the softmax's max, sum and logsumexp and every sum in
            float32 or wider; ``q, k, v, P, dP, dS`` and the outputs may be stored in the dtype — FlashAttention and
            PyTorch's fused SDPA backends) or ``"eager"`` (also the logits and the softmax stored in the dtype, op
            by op — PyTorch's eager half-precision code, diffusers' ``AttnProcessor``).
        c: per output, how many times the simulated kernels' error is allowed.
        floor: per output, the floor in units of ``ε · max‖X‖``.
        samples: how many simulated kernels the yardstick is taken over.
    """

    arithmetic: str = "fused"
    c: MappingProxyType = field(default_factory=lambda: _frozen(_C))
    floor: MappingProxyType = field(default_factory=lambda: _frozen(_FLOOR))
    samples: int = 8

    def __post_init__(self) -> None:
        if self.arithmetic not in ARITHMETICS:
            raise ValueError(f"Policy.arithmetic must be one of {', '.join(ARITHMETICS)}; got {self.arithmetic!r}")
        for name in ("c", "floor"):
            d = getattr(self, name)
            if set(d) != set(OUTPUTS):
                raise ValueError(f"Policy.{name} needs exactly the keys {OUTPUTS}, got {sorted(d)}")
            object.__setattr__(self, name, _frozen(d))
        if not (isinstance(self.samples, int) and self.samples >= 2):
            raise ValueError(f"Policy.samples must be an integer ≥ 2, got {self.samples!r}")

    @property
    def name(self) -> str:
        """``"fused"`` or ``"eager"``, with ``" (custom constants)"`` when ``c``, ``floor`` or ``samples`` differ
        from the defaults."""
        default = dict(self.c) == _C and dict(self.floor) == _FLOOR and self.samples == 8
        return self.arithmetic if default else f"{self.arithmetic} (custom constants)"

    def key(self) -> tuple[Any, ...]:
        """Everything the allowance depends on, hashable."""
        return (self.arithmetic, tuple(sorted(self.c.items())), tuple(sorted(self.floor.items())), self.samples)

    def allowed(self, output: str, magnitude: float, kernel_error: float, dtype: str) -> tuple[float, float]:
        """``(allowed, floor)`` for one output: ``allowed = c·kernel_error + floor``.

        ``magnitude`` is ``max‖X‖`` and ``kernel_error`` the simulated kernels' error
        (:attr:`Group.magnitude`, :attr:`Group.kernel_error`).
        """
        floor = self.floor[output] * eps(dtype) * magnitude
        return self.c[output] * kernel_error + floor, floor


FUSED = Policy("fused")
EAGER = Policy("eager")
POLICIES = MappingProxyType({"fused": FUSED, "eager": EAGER})
DEFAULT_POLICY = FUSED


def check_policy(policy: Any) -> Policy:
    """``policy`` as a :class:`Policy`: a Policy itself, or the name of one (``"fused"``, ``"eager"``).

    ``TypeError`` for anything else (a dict is not read as one), ``ValueError`` for an unknown name.
    """
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"no policy named {policy!r}; the policies: {', '.join(POLICIES)}")
        return POLICIES[policy]
    if not isinstance(policy, Policy):
        raise TypeError(
            f"policy must be 'fused', 'eager' or a Policy (attention_ref.testing.Policy(arithmetic=..., c=..., "
            f"floor=..., samples=...)), got {type(policy).__name__}"
        )
    return policy


def _max_abs(a: np.ndarray) -> float:
    return float(np.max(np.abs(a))) if a.size else 0.0


@dataclass(frozen=True)
class Group:
    """Entries of one output judged together, with their own yardstick and magnitude.

    Attributes:
        where: boolean, the output's shape: the entries of the group; ``None`` for all of them.
        kernel_error: the root-mean-square over the simulated kernels of their largest error on these entries.
        magnitude: ``max‖X‖`` over these entries.
        label: what the group is (``""`` for a whole output; ``"argmax keys"``: the keys ``dk`` of each row's
            largest logit, where autograd through an un-detached max shift leaves its residue).
    """

    where: np.ndarray | None
    kernel_error: float
    magnitude: float
    label: str = ""


@dataclass(frozen=True)
class Reference:
    """One case made ready for one dtype and policy.

    Attributes:
        inputs: ``q, k, v, dout, bias`` rounded to the dtype (NumPy arrays of that dtype),
            ``mask`` (bool) and ``scale`` (``None`` or a float) — exactly what the implementation gets.
        exact: ``out, dq, dk, dv`` in float64, from the rounded inputs.
        groups: per output, the groups of entries judged together (one, or for ``dk`` the argmax keys and the
            rest), each with its yardstick and magnitude.
        kernel_error: per output, the yardstick over all its entries: the root-mean-square over
            ``Policy.samples`` simulated kernels (:func:`simulated_attention`) of their largest error
            ``max|X_sim − X₆₄|``, the output's own last rounding to the dtype left out (it is deducted from the
            implementation's error entry by entry instead).
        magnitude: per output, ``max‖X‖``, the magnitude of the terms it is summed from.
        policy: the policy the yardstick was simulated under.
    """

    inputs: dict[str, Any]
    exact: dict[str, np.ndarray]
    groups: dict[str, tuple[Group, ...]]
    kernel_error: dict[str, float]
    magnitude: dict[str, float]
    policy: Policy = DEFAULT_POLICY


def _t(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


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
        arithmetic: ``"fused"`` or ``"eager"`` (:class:`Policy`).

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


def _case_seed(name: str, dtype: str) -> list[int]:
    return [zlib.crc32(name.encode()), DTYPES.index(dtype)]


def yardstick(
    inputs: dict[str, Any],
    exact: dict[str, np.ndarray],
    dtype: str,
    *,
    samples: int,
    seed: Any,
    arithmetic: str = "fused",
    groups: dict[str, list[np.ndarray | None]] | None = None,
) -> dict[str, list[float]]:
    """Per output and group of its entries (``groups``: boolean masks, ``None`` = every entry; default one group of
    all), the root-mean-square over ``samples`` simulated kernels of ``max|X_sim − X₆₄|`` over the group."""
    rng = np.random.default_rng(seed)
    groups = groups or {n: [None] for n in exact}
    squares = {n: [0.0] * len(groups[n]) for n in exact}
    for _ in range(samples):
        sim = simulated_attention(inputs, dtype, rng, arithmetic)
        for n in exact:
            diff = np.abs(sim[n] - exact[n])
            for i, where in enumerate(groups[n]):
                squares[n][i] += _max_abs(diff if where is None else diff[where]) ** 2
    return {n: [float(np.sqrt(sq / samples)) for sq in squares[n]] for n in exact}


def _magnitudes(
    x64: dict[str, np.ndarray], P: np.ndarray, scale: float, inputs: dict[str, Any]
) -> dict[str, np.ndarray]:
    """``‖X‖`` per output and entry (see the module docstring); ``x64`` is the float64 reference, ``P`` its weights."""
    q, k, v, dout = (inputs[n].astype(np.float64) for n in ("q", "k", "v", "dout"))
    # dS = P ∘ (dO Vᵀ − D),  D_i = dO_i · O_i   (..., N, M)
    D = np.sum(dout * x64["out"], axis=-1, keepdims=True)
    dS = P * (dout @ np.swapaxes(v, -1, -2) - D)
    # ‖dS‖ = |dS| + P ∘ Σ_c |dO_ic| |O_ic|
    dS_terms = np.abs(dS) + P * np.sum(np.abs(dout) * np.abs(x64["out"]), axis=-1, keepdims=True)
    return {
        "out": P @ np.abs(v),
        "dq": abs(scale) * (dS_terms @ np.abs(k)),
        "dk": abs(scale) * (np.swapaxes(dS_terms, -1, -2) @ np.abs(q)),
        "dv": np.swapaxes(P, -1, -2) @ np.abs(dout),
    }


def _argmax_keys(s: np.ndarray, k_shape: tuple[int, ...], margin: np.ndarray) -> np.ndarray:
    """Boolean, ``dk``'s shape ``(..., M, d)``: the keys within ``margin`` of some query row's largest logit.

    ``s``: the exact logits ``(..., N, M)`` (``-inf`` where masked); ``margin``: ``(..., N, 1)``, how far a
    kernel's rounded logits may reorder the largest ones (a kernel's max may land on a near-tie).
    """
    m = np.max(s, axis=-1, keepdims=True)
    near = np.isfinite(s) & (s >= m - margin)  # (..., N, M)
    keys = np.any(near, axis=-2)  # (..., M)
    return np.broadcast_to(keys[..., None], k_shape)


_CACHE: OrderedDict[tuple[Any, ...], Reference] = OrderedDict()
_CACHE_SIZE = 256


def _digest(case: Case) -> str:
    """A fingerprint of everything in ``case`` the reference depends on (name included: it seeds the draws)."""
    h = hashlib.blake2b(case.name.encode(), digest_size=16)
    for n in ("q", "k", "v", "dout", "mask", "bias"):
        a = getattr(case, n)
        h.update(f"|{n}:{None if a is None else (a.dtype.str, a.shape)}".encode())
        if a is not None:
            h.update(np.ascontiguousarray(a).tobytes())
    h.update(f"|scale:{case.scale!r}".encode())
    return h.hexdigest()


def reference(case: Case, dtype: str, policy: Policy | str = DEFAULT_POLICY) -> Reference:
    """The inputs in ``dtype``, the float64 reference, the yardstick and the magnitudes, for one case.

    The result depends only on the case's numbers, the dtype and the policy; the last 256 are kept, so that
    checking several kernels on one battery simulates each case once. Its arrays are read-only.
    """
    policy = check_policy(policy)
    key = (_digest(case), dtype, policy.key())
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    ref = _reference(case, dtype, policy)
    _CACHE[key] = ref
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return ref


def _reference(case: Case, dtype: str, policy: Policy) -> Reference:
    inputs: dict[str, Any] = {
        n: round_to(getattr(case, n), dtype, f"case {case.name!r}: {n}") for n in ("q", "k", "v", "dout", "bias")
    }
    inputs["mask"] = None if case.mask is None else np.asarray(case.mask, dtype=bool)
    inputs["scale"] = None if case.scale is None else float(case.scale)
    as64 = {n: None if a is None else a.astype(np.float64) for n, a in inputs.items() if n not in ("mask", "scale")}
    out, cache = attention_forward(
        as64["q"], as64["k"], as64["v"], mask=inputs["mask"], bias=as64["bias"], scale=inputs["scale"]
    )
    grads = attention_backward(as64["dout"], cache)
    exact = {"out": out, "dq": grads["q"], "dk": grads["k"], "dv": grads["v"]}
    # the keys each row's largest logit may sit on, in a kernel's rounding of the logits: dk's own group, where
    # autograd through an un-detached max shift puts its residue
    q, k = as64["q"], as64["k"]
    s = cache.scale * (q @ _t(k)) + (0.0 if as64["bias"] is None else as64["bias"])
    if inputs["mask"] is not None:
        s = np.where(inputs["mask"], s, -np.inf)
    terms = np.abs(cache.scale) * (np.abs(q) @ _t(np.abs(k)))  # (..., N, M)
    w_s = eps(dtype) / 2 if policy.arithmetic == "eager" else eps("float64" if dtype == "float64" else "float32") / 2
    peak = np.max(np.where(np.isfinite(s), np.abs(s), 0.0), axis=-1, keepdims=True)
    margin = 4 * w_s * (peak + (1 + np.sqrt(q.shape[-1])) * np.max(terms, axis=-1, keepdims=True))
    reach = _argmax_keys(s, k.shape, margin)
    masks: dict[str, list[np.ndarray | None]] = {n: [None] for n in OUTPUTS}
    split = bool(reach.any() and not reach.all())
    if split:
        masks["dk"] = [~reach, reach]
    groups = {**masks, "dk": [None, *masks["dk"]] if split else [None]}  # the whole of dk first, then its groups
    yard = yardstick(inputs, exact, dtype, samples=policy.samples, seed=_case_seed(case.name, dtype),
                     arithmetic=policy.arithmetic, groups=groups)  # fmt: skip
    norms = _magnitudes(exact, cache.weights, cache.scale, inputs)
    groups: dict[str, tuple[Group, ...]] = {}
    for n in OUTPUTS:
        whole = yard[n][0]
        if n == "dk" and split:
            groups[n] = tuple(
                Group(where, err, _max_abs(norms[n][where]), label)
                for where, err, label in zip(masks["dk"], yard[n][1:], ("", "argmax keys"), strict=True)
            )
        else:
            groups[n] = (Group(None, whole, _max_abs(norms[n])),)
    for a in (*exact.values(), reach):
        a.setflags(write=False)
    return Reference(
        inputs=inputs,
        exact=exact,
        groups=groups,
        kernel_error={n: yard[n][0] for n in OUTPUTS},
        magnitude={n: _max_abs(norms[n]) for n in OUTPUTS},
        policy=policy,
    )
