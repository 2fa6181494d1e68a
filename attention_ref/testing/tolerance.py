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

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from ..attention import (
    attention_backward,
    attention_forward,
    chunked_attention_backward,
    chunked_attention_forward,
)
from .cases import Case
from .dtypes import eps, round_to

__all__ = ["DEFAULT_POLICY", "OUTPUTS", "Policy", "Reference", "reference"]

OUTPUTS = ("out", "dq", "dk", "dv")


def _frozen(d: dict[str, float]) -> MappingProxyType:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class Policy:
    """The constants of the tolerance rule (see the module docstring).

    Attributes:
        c: per output, how many times the kernel-like reference's error is allowed.
        floor: per output, the floor in units of ``ε · max‖X‖``.
        float64_factor: extra factor on the kernel error in float64, where that error is a model.
    """

    c: MappingProxyType = field(default_factory=lambda: _frozen({"out": 3.0, "dq": 5.0, "dk": 5.0, "dv": 5.0}))
    floor: MappingProxyType = field(default_factory=lambda: _frozen({"out": 1.0, "dq": 1.0, "dk": 1.0, "dv": 1.0}))
    float64_factor: float = 4.0

    def __post_init__(self) -> None:
        for name in ("c", "floor"):
            d = getattr(self, name)
            if set(d) != set(OUTPUTS):
                raise ValueError(f"Policy.{name} needs exactly the keys {OUTPUTS}, got {sorted(d)}")
            object.__setattr__(self, name, _frozen(d))

    def allowed(self, output: str, magnitude: float, kernel_error: float, dtype: str) -> tuple[float, float]:
        """``(allowed, floor)`` for one output: ``allowed = c·kernel_error + floor``.

        ``magnitude`` is ``max‖X‖`` and ``kernel_error`` the kernel-like reference's error
        (:attr:`Reference.magnitude`, :attr:`Reference.kernel_error`).
        """
        floor = self.floor[output] * eps(dtype) * magnitude
        c = self.c[output] * (self.float64_factor if dtype == "float64" else 1.0)
        return c * kernel_error + floor, floor


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
        kernel: the same, computed like a typical kernel in the dtype (float32 for float64; see the
            module docstring).
        kernel_error: per output, ``max|kernel − exact|`` (times ``ε₆₄/ε₃₂`` for float64).
        magnitude: per output, ``max‖X‖``, the magnitude of the terms it is summed from.
    """

    inputs: dict[str, Any]
    exact: dict[str, np.ndarray]
    kernel: dict[str, np.ndarray]
    kernel_error: dict[str, float]
    magnitude: dict[str, float]


# the key and query tiles of the second kernel-like order (FlashAttention's online softmax): small, so that
# the battery's longer cases run through several tiles and their rescaling
KERNEL_TILE = 16


def _attention(inputs: dict[str, Any], dtype: np.dtype, *, tiled: bool = False) -> tuple[dict[str, np.ndarray], Any]:
    """out, dq, dk, dv computed by the reference code in ``dtype``, and the forward's cache.

    ``tiled``: by the tiled path (online softmax over key tiles of :data:`KERNEL_TILE`, the backward
    recomputing the weights from the logsumexp) instead of the plain one.
    """

    def cast(a: Any) -> Any:
        return None if a is None else np.asarray(a).astype(dtype)

    forward, backward, options = attention_forward, attention_backward, {}
    if tiled:
        forward, backward = chunked_attention_forward, chunked_attention_backward
        options = {"block_size": KERNEL_TILE}
    out, cache = forward(
        cast(inputs["q"]), cast(inputs["k"]), cast(inputs["v"]),
        mask=inputs["mask"], bias=cast(inputs["bias"]), scale=inputs["scale"], **options,
    )  # fmt: skip
    grads = backward(cast(inputs["dout"]), cache)
    return {"out": out, "dq": grads["q"], "dk": grads["k"], "dv": grads["v"]}, cache


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


def reference(case: Case, dtype: str) -> Reference:
    """The inputs in ``dtype``, the float64 reference, and the kernel-like reference, for one case."""
    inputs: dict[str, Any] = {n: round_to(getattr(case, n), dtype) for n in ("q", "k", "v", "dout", "bias")}
    inputs["mask"] = None if case.mask is None else np.asarray(case.mask, dtype=bool)
    inputs["scale"] = None if case.scale is None else float(case.scale)
    exact, cache = _attention(inputs, np.dtype(np.float64))
    # the kernel-like computation: float32 accumulation, result in the dtype (float32 for float64), in two
    # orders, plain and tiled; one order's error is one sample that may cancel by luck, so the larger counts
    kernel_dtype = "float32" if dtype == "float64" else dtype
    kernel = {n: round_to(x, kernel_dtype) for n, x in _attention(inputs, np.dtype(np.float32))[0].items()}
    tiled = {n: round_to(x, kernel_dtype) for n, x in _attention(inputs, np.dtype(np.float32), tiled=True)[0].items()}
    shrink = eps(dtype) / eps(kernel_dtype)
    kernel_error = {
        n: shrink * max(_max_abs(k[n].astype(np.float64) - exact[n]) for k in (kernel, tiled)) for n in OUTPUTS
    }
    magnitude = _magnitudes(exact, cache.weights, cache.scale, inputs)
    return Reference(inputs=inputs, exact=exact, kernel=kernel, kernel_error=kernel_error, magnitude=magnitude)
