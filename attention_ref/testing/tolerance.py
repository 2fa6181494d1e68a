r"""How much error an attention implementation is allowed, and why.

For each case and each output ``X`` ∈ {``out``, ``dq``, ``dk``, ``dv``} the oracle computes

* ``X₆₄``: the float64 reference (:func:`attention_ref.attention_forward` / :func:`attention_ref.attention_backward`)
  on the inputs *as rounded to the dtype under test*, so rounding the inputs is never counted against anybody;
* the yardstick ``Y_X``: the error of a *simulated* kernel — the same computation in float64 with every rounding
  error a legitimate kernel in that dtype may make *under the policy* (:mod:`.policy`) drawn at random at its
  largest size (:mod:`.simulation`, with the errors of :mod:`.rounding`) — as the root-mean-square over
  ``Policy.samples = 8`` independent simulations of ``max|X_sim − X₆₄|``, the output's own last rounding to the
  dtype left out;

and lets an implementation's output ``X`` pass when, over its entries (or each group of entries, below),

.. math::
    \max \big(|X - X_{64}| - s(X)/2\big)^+ \;\le\; c \cdot Y_X \;+\; f \cdot \varepsilon \cdot \max \|X\|,

with ``c = 3``, ``f = 0`` for ``out`` and ``f = 1`` for the gradients (:data:`DEFAULT_POLICY`), ``s(X)`` the
dtype's spacing just above ``|X|`` at the value returned, ``ε`` the dtype's machine epsilon and ``‖X‖`` the
magnitude of the terms ``X`` is made of (the floor, below). The reported *ratio* is the left side over the right
side: ≤ 1 passes. What the rule was measured to accept and reject is in ``docs/oracle.md``.

The last rounding. Whatever a kernel computed, it returned it rounded to the dtype; rounding to nearest moves a
value that came out as ``x`` by at most half the spacing above ``|x|`` (subnormals included). That much is
deducted from each entry's error (:func:`~.dtypes.half_spacing`) and left out of the simulation, so the allowance
covers only what came before: in float16 and bfloat16 one rounding of the output is as large as many bugs.

Why a simulation, not a measured kernel. Allowing a few times the error of one honest float32 run measures a
property of the BLAS (its summation order), not of the problem; the allowance must be a property of the inputs,
the dtype and the *set* of legitimate orders. :mod:`.rounding` draws every sum of ``n`` terms with a normal error
of standard deviation ``√n·u·Σ|terms|``: with independent roundings (Higham and Mary, SIAM J. Sci. Comput. 41,
2019) that bounds the spread of the error of *any* order — key by key, pairwise, blocked, a BLAS's panels, a tiled
online softmax. The margin beyond the model is ``c = 3`` and the partial sums, which most orders keep well under
``Σ|terms|``. ``c`` need not differ between the output and the gradients: the gradients' longer chain of
roundings is in the simulation itself. The root-mean-square of 8 draws of a largest error has a relative spread of
about ``1/√16 = 25 %`` where one entry dominates.

Groups. Eager code differentiates its un-detached max shift and leaves a rounding residue on each row's argmax key
(:mod:`.simulation`). So ``dk`` is judged in two groups, each against its own yardstick and floor
(:class:`Group`): the keys within rounding distance of some row's largest logit
(``4·w_S·(|max S| + (1 + √d)·max_k Σ_c|scale·q_c k_c|)``, ``w_S`` the logits' unit roundoff under the policy), and
all the others; allowed on every key, the residue would hide a kernel that drops ``dK`` on long rows.

The same allowance on any machine. The simulation is float64 arithmetic on the rounded inputs, with draws from a
generator seeded by the case's name and the dtype (NumPy's PCG64 and its normal sampler give the same numbers
everywhere). Another BLAS or thread count moves the float64 products by ~1e-16 relative: for float32, float16 and
bfloat16 the draws are ~1e-7 or more of the values, and the allowance moves by ~1e-10 of itself. For float64 the
draws are themselves of float64's size, so the simulation's own rounding is part of the yardstick and the
allowance is the same only to a few % (``tests/oracle/test_oracle.py`` swaps the simulation's matrix products for
``einsum`` and checks both). References are kept (:func:`reference`, the last 256) per case numbers, dtype and
policy.

Why it catches bugs. The allowance is a few units of the accumulator's roundoff times ``√n`` and the magnitude, plus
the roundings to the dtype the policy allows. A wrong formula changes the output by a fraction of its size;
non-finite values always fail; a precision bug (``P·V``, ``ℓ`` or an lse accumulated in float16 or bfloat16, ``S``
stored narrower than float32 under ``fused``) exceeds the model by the ratio of the roundoffs. The planted bugs of
``tests/oracle/oracle_impls.py`` are asserted in ``tests/oracle/test_oracle_bugs.py``. What the model does not
cover: rounding errors that are not independent (``n`` identical values summed key by key: an error like ``n·u``,
not ``√n·u``), and narrow sums whose error stays below the roundings around them (``dQ`` accumulated key by key in
the dtype is within what ``D = dO·O`` from the rounded output already moves). The float64 reference is itself a
float64 computation: the comparison sees up to two such errors, well inside ``c = 3``.

The floor ``f·ε·max‖X‖``. With ``P`` the exact weights (``P ≥ 0``), ``O`` the exact output and ``dS`` the exact
logit gradient:

  - ``‖out‖ = P |V|`` and ``‖dv‖ = Pᵀ |dO|`` (``P`` rounded);
  - ``‖dS‖ = |dS| + P ∘ Σ_c |dO_ic| |O_ic|`` (``dS`` rounded, and the row term ``D_i = dO_i · O_i`` computed from a
    rounded ``O``);
  - ``‖dq‖ = |scale| ‖dS‖ |K|`` and ``‖dk‖ = |scale| ‖dS‖ᵀ |Q|``.

For the gradients (``f = 1``) it is one rounding, in the dtype, of every term a kernel keeps there: it keeps the
allowance above 0 where a gradient is exactly 0 (one key: ``dq = 0``), and it covers a few partial sums of a
gradient stored in the dtype (PyTorch's CPU flash backward adds each block of queries and keys into ``dQ``,
``dK``, ``dV`` held in the dtype). The forward's output is accumulated in float32 and stored once by every fused
kernel, and its last rounding is deducted exactly: ``f = 0``, so that one rounding more — a sum kept in the dtype
— shows.

Normwise, by max magnitude. Errors are compared with the largest errors of the simulated kernels over a group of
entries, not entry by entry: an entry that is zero up to rounding would make any relative test blow up.

Non-finite values are never excused, except on rows the caller names. NaN or Inf where the reference is finite
fails, whatever the tolerance. Query rows with no allowed key must give output 0 (and ``dq`` 0);
:func:`~attention_ref.testing.check_attention`'s ``masked_rows="nan-ok"`` accepts NaN in ``out`` and ``dq`` on
exactly those rows, and ``masked_rows="finite-ok"`` any finite value (``dout`` is then 0 on those rows, so that
``dk`` and ``dv`` stay comparable). ``dk`` and ``dv`` get nothing from a dead row, so they are compared everywhere
in every mode.
"""

from __future__ import annotations

import hashlib
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..attention import attention_backward, attention_forward
from .cases import Case
from .dtypes import DTYPES, eps, round_to
from .policy import ARITHMETICS, DEFAULT_POLICY, EAGER, FUSED, OUTPUTS, POLICIES, Policy, check_policy
from .rounding import largest_error_rms
from .rounding import transpose as _t
from .simulation import simulate_attention_core, simulated_attention

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

    def simulate(r: Any) -> dict[str, np.ndarray]:
        return simulated_attention(inputs, dtype, r.rng, arithmetic)

    return largest_error_rms(simulate, exact, dtype, samples=samples, seed=seed, groups=groups)


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
