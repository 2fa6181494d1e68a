r"""How much error an attention implementation is allowed, and why.

For each case and each output ``X`` ∈ {``out``, ``dq``, ``dk``, ``dv``} the oracle computes

* ``X₆₄``: the float64 reference (:func:`attention_ref.attention_forward` /
  :func:`attention_ref.attention_backward`) on the inputs *as rounded to the dtype
  under test*, so rounding the inputs is never counted against anybody;
* ``X_k``: the same computation done the way a typical kernel does it in that
  dtype — inputs in the dtype, matmuls and softmax accumulated in float32, the
  result rounded to the dtype (float16, bfloat16, float32) — in two orders, the
  plain softmax and FlashAttention's online softmax over key tiles
  (:func:`attention_ref.chunked_attention_forward`); ``max|X_k − X₆₄|`` below is the
  larger of their two errors (one order's error is one sample, which may cancel by luck);

and lets an implementation's output ``X`` pass when

.. math::
    \max|X - X_{64}| \;\le\; c_X \cdot \max|X_k - X_{64}| \;+\; f_X \cdot \varepsilon \cdot \max \|X\|,

where ``‖X‖`` is the magnitude of the terms ``X`` is made of (defined below) and
``ε`` is the dtype's machine epsilon (float16 2⁻¹⁰, bfloat16 2⁻⁷, float32 2⁻²³,
float64 2⁻⁵²). The reported *ratio* is the left side over the right side: ≤ 1 passes.

float64 has no wider accumulator to measure a float64 kernel against, so there
``max|X_k − X₆₄|`` is replaced by a model: the error of the float32 kernel-like
computation on the same inputs times ``ε₆₄/ε₃₂ = 2⁻²⁹`` (to first order, rounding
errors scale with the unit roundoff), times ``Policy.float64_factor = 4``, because
the model only holds up to a constant and float64 kernels sum in an order of their
own (PyTorch's float64 SDPA is 1.5× over the unscaled rule on 1024 keys).

Why this shape.

* **Relative to a kernel-like reference, not a fixed tolerance.** What error is
  reasonable depends on the dtype, the sizes, and the data (large logits amplify
  rounding, near-uniform weights average it away). Measuring the error of a
  straightforward, honest kernel on the very same inputs gives a yardstick that
  adapts to all three. ``c_X`` says how much worse than that yardstick an
  implementation may be: :data:`DEFAULT_POLICY` uses ``c = 3`` for the output and
  ``c = 5`` for the gradients, whose longer chain of products (``dP = dO Vᵀ``, the
  softmax backward's subtraction, then two more matmuls) lets different but
  legitimate orders of operations drift further apart.
* **A floor from the dtype's resolution.** A rule of the form "at most 2× the error
  of a low-precision reference" (FlashAttention's tests) fails a correct kernel
  whenever that reference happens to be exact: with one key the output is ``v``
  itself and ``dq``, ``dk`` are exactly 0 — and then the allowed error is 0
  while a kernel that rounds in a different place (FlashAttention keeps ``P`` and ``dS`` in fp16/bf16 for its
  matmuls, and computes ``Σ_k P_ik dP_ik`` as ``dO_i·O_i`` from the rounded
  output) is a unit in the last place off. The floor ``f_X·ε·max‖X‖`` is the
  size of one rounding, in the dtype, of every term a kernel keeps in the dtype:
  this removes that failure mode and is far below any real bug. With ``P`` the
  exact weights (``P ≥ 0``), ``O`` the exact output and ``dS`` the exact logit gradient:

  - ``‖out‖ = P |V|`` and ``‖dv‖ = Pᵀ |dO|`` (``P`` rounded);
  - ``‖dS‖ = |dS| + P ∘ Σ_c |dO_ic| |O_ic|`` (``dS`` rounded, and the row term
    ``D_i = dO_i · O_i`` computed from a rounded ``O``);
  - ``‖dq‖ = |scale| ‖dS‖ |K|`` and ``‖dk‖ = |scale| ‖dS‖ᵀ |Q|``.

  ``‖X‖ ≥ |X|`` entrywise, so the floor is at least ``f_X·ε·max|X₆₄|``, but unlike
  ``max|X₆₄|`` it does not vanish when ``X`` is small or zero by cancellation.
* **Normwise, by max magnitude.** Errors are compared with the largest entry of
  the output, not entry by entry: an entry that is zero up to rounding would make
  any relative test blow up, and kernels are judged by the error they make on the
  numbers that matter.
* **Non-finite values are never excused.** NaN or Inf where the reference is
  finite fails, whatever the tolerance. Query rows with no allowed key must give
  output 0 (and ``dq`` 0); :func:`~attention_ref.testing.check_attention`'s
  ``masked_rows="nan-ok"`` accepts NaN in ``out`` and ``dq`` on exactly those rows,
  for implementations that choose it. ``dk`` and ``dv`` get nothing from a dead row,
  so they are compared everywhere in both modes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from ..attention import attention_backward, attention_forward
from .cases import Case
from .dtypes import DTYPES, eps, round_to
from .rounding import RoundingModel

__all__ = [
    "DEFAULT_POLICY",
    "OUTPUTS",
    "Policy",
    "Reference",
    "reference",
    "simulate_attention_core",
    "simulated_attention",
    "yardstick",
]

OUTPUTS = ("out", "dq", "dk", "dv")


def _frozen(d: dict[str, float]) -> MappingProxyType:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class Policy:
    """The constants of the tolerance rule (see the module docstring).

    Attributes:
        c: per output, how many times the simulated kernels' error is allowed.
        floor: per output, the floor in units of ``ε · max‖X‖``.
        samples: how many simulated kernels the yardstick is taken over.
    """

    c: MappingProxyType = field(default_factory=lambda: _frozen({"out": 3.0, "dq": 3.0, "dk": 3.0, "dv": 3.0}))
    floor: MappingProxyType = field(default_factory=lambda: _frozen({"out": 1.0, "dq": 1.0, "dk": 1.0, "dv": 1.0}))
    samples: int = 8

    def __post_init__(self) -> None:
        for name in ("c", "floor"):
            d = getattr(self, name)
            if set(d) != set(OUTPUTS):
                raise ValueError(f"Policy.{name} needs exactly the keys {OUTPUTS}, got {sorted(d)}")
            object.__setattr__(self, name, _frozen(d))
        if not (isinstance(self.samples, int) and self.samples >= 2):
            raise ValueError(f"Policy.samples must be an integer ≥ 2, got {self.samples!r}")

    def allowed(self, output: str, magnitude: float, kernel_error: float, dtype: str) -> tuple[float, float]:
        """``(allowed, floor)`` for one output: ``allowed = c·kernel_error + floor``.

        ``magnitude`` is ``max‖X‖`` and ``kernel_error`` the simulated kernels' error
        (:attr:`Reference.magnitude`, :attr:`Reference.kernel_error`).
        """
        floor = self.floor[output] * eps(dtype) * magnitude
        return self.c[output] * kernel_error + floor, floor


DEFAULT_POLICY = Policy()


def _max_abs(a: np.ndarray) -> float:
    return float(np.max(np.abs(a))) if a.size else 0.0


@dataclass(frozen=True)
class Reference:
    """One case made ready for one dtype.

    Attributes:
        inputs: ``q, k, v, dout, bias`` rounded to the dtype (NumPy arrays of that dtype),
            ``mask`` (bool) and ``scale`` (``None`` or a float) — exactly what the implementation gets.
        exact: ``out, dq, dk, dv`` in float64, from the rounded inputs.
        kernel_error: per output, the yardstick: the root-mean-square over ``Policy.samples`` simulated
            kernels (:func:`simulated_attention`) of their largest error ``max|X_sim − X₆₄|``.
        magnitude: per output, ``max‖X‖``, the magnitude of the terms it is summed from.
    """

    inputs: dict[str, Any]
    exact: dict[str, np.ndarray]
    kernel_error: dict[str, float]
    magnitude: dict[str, float]


def _t(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


def _logits(r: RoundingModel, q: np.ndarray, k: np.ndarray, bias: Any, mask: Any, scale: float) -> np.ndarray:
    """``S = scale·q kᵀ + bias`` (masked entries ``−inf``) with the errors of every legitimate way to form it."""
    # scale·q and k (or √scale·q and √scale·k, PyTorch's math backend) stored in the dtype
    qs, ks = r.rel(scale * q, r.w), r.rel(k, r.w)
    # Σ over d in any order; Q Kᵀ stored in the dtype (unfused), the scale's product rounded
    s = r.rel(r.matmul(qs, _t(ks)), r.w, r.u)
    if bias is not None:
        s = r.rel(s + bias, r.u, r.w)  # + bias, stored in the dtype
    return s if mask is None else np.where(mask, s, -np.inf)


def simulated_attention(inputs: dict[str, Any], dtype: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One simulated kernel: ``out, dq, dk, dv`` in float64 with every error of the rounding model drawn once.

    Inputs:
        inputs: as :attr:`Reference.inputs`; dtype: the dtype under test; rng: where the errors come from.

    Returns:
        ``{"out", "dq", "dk", "dv"}``, float64, shaped like the reference's. See the module docstring for the
        list of errors and :mod:`.rounding` for their sizes.
    """
    q, k, v, dout = (np.asarray(inputs[n], dtype=np.float64) for n in ("q", "k", "v", "dout"))
    bias = None if inputs["bias"] is None else np.asarray(inputs["bias"], dtype=np.float64)
    r = RoundingModel(dtype, rng)
    out, grads = simulate_attention_core(r, q, k, v, dout, bias, inputs["mask"], inputs["scale"])
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
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The attention forward (and backward when ``dout`` is given) with the errors of ``r`` drawn once.

    Inputs (float64): q ``(..., N, d)``, k ``(..., M, d)``, v ``(..., M, dv)``, dout ``(..., N, dv)`` or ``None``;
    bias, mask broadcastable to ``(..., N, M)``; scale ``None`` for ``1/sqrt(d)``.

    Returns:
        ``(out, grads)``: ``grads`` is ``{"dq", "dk", "dv"}``, empty without ``dout``.
    """
    u, w = r.u, r.w
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else float(scale)
    M = k.shape[-2]
    # forward: S, then e = exp(S − m) (the subtraction rounded, exp within one ulp)   (..., N, M)
    s = _logits(r, q, k, bias, mask, scale)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)  # a row with no key: shift by 0
    e = r.rel(np.exp(r.rel(s - m, u)), 2 * u)
    # ℓ = Σ_k e over the keys; an online softmax also rescales the running sum at every new maximum: 2× the error
    live = np.sum(e, axis=-1, keepdims=True) > 0  # (..., N, 1)
    total = np.where(live, r.sum(e, factor=2.0), 1.0)
    # P = e / ℓ, stored in the dtype; O = P V (its sum over keys rescaled like ℓ), stored in the dtype
    p = r.rel(np.where(live, e, 0.0) / total, u, w)
    out = r.rel(r.matmul(p, v, factor=2.0), u, w)  # (..., N, dv)
    if dout is None:
        return out, {}
    lse = np.where(live, m + r.rel(np.log(total), u), -np.inf)
    # backward: the weights again from the logsumexp, the logits summed over d in another order
    s_b = s + r.sum_error(np.abs(scale) * (np.abs(q) @ _t(np.abs(k))), q.shape[-1])
    finite = np.isfinite(lse)
    with np.errstate(invalid="ignore"):
        p_b = np.exp(r.rel(s_b - np.where(finite, lse, 0.0), u))
    p_b = r.rel(np.where(finite & np.isfinite(s_b), p_b, 0.0), 2 * u)
    dv = r.rel(r.matmul(_t(r.rel(p_b, w)), dout), u, w)  # P stored in the dtype for dV = Pᵀ dO
    dp = r.rel(r.matmul(dout, _t(v)), w)  # dP = dO Vᵀ, stored in the dtype
    # D_i = Σ_k P_ik dP_ik, or dO_i · O_i from the output the forward returned: the errors of both
    D = r.sum(dout * out) + r.sum_error(np.sum(p_b * np.abs(dp), axis=-1, keepdims=True), M)
    ds = r.rel(p_b * r.rel(dp - D, u), u, w)  # dS = P ∘ (dP − D), stored in the dtype
    # dQ = scale·dS K, dK = scale·dSᵀ Q; K and Q as stored (scaled) in the dtype
    dq = scale * r.matmul(ds, k) + np.abs(scale) * w * np.sqrt((ds * ds) @ (k * k)) * r.z(q.shape)
    dk = scale * r.matmul(_t(ds), q) + np.abs(scale) * w * np.sqrt(_t(ds * ds) @ (q * q)) * r.z(k.shape)
    return out, {"dq": r.rel(dq, u, w), "dk": r.rel(dk, u, w), "dv": dv}


def _case_seed(name: str, dtype: str) -> list[int]:
    return [zlib.crc32(name.encode()), DTYPES.index(dtype)]


def yardstick(
    inputs: dict[str, Any], exact: dict[str, np.ndarray], dtype: str, *, samples: int, seed: Any
) -> dict[str, float]:
    """Per output, the root-mean-square over ``samples`` simulated kernels of ``max|X_sim − X₆₄|``."""
    rng = np.random.default_rng(seed)
    squares = dict.fromkeys(exact, 0.0)
    for _ in range(samples):
        sim = simulated_attention(inputs, dtype, rng)
        for n in exact:
            squares[n] += _max_abs(sim[n] - exact[n]) ** 2
    return {n: float(np.sqrt(sq / samples)) for n, sq in squares.items()}


def _magnitudes(x64: dict[str, np.ndarray], P: np.ndarray, scale: float, inputs: dict[str, Any]) -> dict[str, float]:
    """``max‖X‖`` per output (see the module docstring); ``x64`` is the float64 reference, ``P`` its weights."""
    q, k, v, dout = (inputs[n].astype(np.float64) for n in ("q", "k", "v", "dout"))
    # dS = P ∘ (dO Vᵀ − D),  D_i = dO_i · O_i   (..., N, M)
    D = np.sum(dout * x64["out"], axis=-1, keepdims=True)
    dS = P * (dout @ np.swapaxes(v, -1, -2) - D)
    # ‖dS‖ = |dS| + P ∘ Σ_c |dO_ic| |O_ic|
    dS_terms = np.abs(dS) + P * np.sum(np.abs(dout) * np.abs(x64["out"]), axis=-1, keepdims=True)
    terms = {
        "out": P @ np.abs(v),
        "dq": abs(scale) * (dS_terms @ np.abs(k)),
        "dk": abs(scale) * (np.swapaxes(dS_terms, -1, -2) @ np.abs(q)),
        "dv": np.swapaxes(P, -1, -2) @ np.abs(dout),
    }
    return {n: _max_abs(x) for n, x in terms.items()}


def reference(case: Case, dtype: str, policy: Policy = DEFAULT_POLICY) -> Reference:
    """The inputs in ``dtype``, the float64 reference, the yardstick and the magnitudes, for one case."""
    inputs: dict[str, Any] = {n: round_to(getattr(case, n), dtype) for n in ("q", "k", "v", "dout", "bias")}
    inputs["mask"] = None if case.mask is None else np.asarray(case.mask, dtype=bool)
    inputs["scale"] = None if case.scale is None else float(case.scale)
    as64 = {n: None if a is None else a.astype(np.float64) for n, a in inputs.items() if n not in ("mask", "scale")}
    out, cache = attention_forward(
        as64["q"], as64["k"], as64["v"], mask=inputs["mask"], bias=as64["bias"], scale=inputs["scale"]
    )
    grads = attention_backward(as64["dout"], cache)
    exact = {"out": out, "dq": grads["q"], "dk": grads["k"], "dv": grads["v"]}
    kernel_error = yardstick(inputs, exact, dtype, samples=policy.samples, seed=_case_seed(case.name, dtype))
    magnitude = _magnitudes(exact, cache.weights, cache.scale, inputs)
    return Reference(inputs=inputs, exact=exact, kernel_error=kernel_error, magnitude=magnitude)
