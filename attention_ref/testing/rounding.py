r"""The rounding model behind the tolerances: every operation's error at its any-order size, drawn at random.

A kernel in a dtype rounds at every operation, in an order of its own. Rather than
guess that order, the oracle computes the operation in float64 and adds, to its
result, an error drawn from the model below (Higham and Mary's probabilistic
model: rounding errors independent, mean zero, each at most the unit roundoff),
at the largest size any order allows.
Repeating the whole computation with fresh draws gives the spread of the errors a
legitimate kernel can make: :func:`largest_error_rms` is the yardstick :mod:`.tolerance`,
:mod:`.block_model` and :mod:`.transformer_calls` take from it.

Two unit roundoffs:

* ``u``: of the accumulator — float32 (2⁻²⁴) for float16, bfloat16 and float32,
  float64 (2⁻⁵³) for float64. Every sum and product is computed in it.
* ``w``: of the dtype under test (``eps/2``). Every intermediate result an
  operation hands on (``QKᵀ``, the weights ``P``, ``dS``, the output) may be
  stored in the dtype.

The errors, drawn independently per entry and per operation:

* one rounding (a product, a function, a result stored in the dtype):
  ``δ·|x|·size`` with ``size = u`` (or ``w``) and ``δ`` uniform on ``[−1, 1]`` —
  everywhere a real rounding can land, since round-to-nearest never moves ``x`` by
  more than ``u·|x|``; below the smallest normal number of the dtype (or the
  accumulator) by up to half the subnormals' spacing instead (float16: 2⁻²⁵ ≈ 3e-8, the
  size of a weight ``P ≈ 2e-4`` times a logit gradient on 4096 keys); :meth:`RoundingModel.rel`;
* a sum of ``n`` terms, in any order: normal, with standard deviation
  ``√n · u · Σ|terms|``; :meth:`RoundingModel.matmul` / :meth:`RoundingModel.sum`.

Why ``√n · u · Σ|terms|`` covers every order. Whatever the order (key by key,
pairwise, in blocks of any size, a BLAS kernel's panels, a tiled online
softmax), a sum of ``n`` terms is ``n − 1`` additions, and addition ``a`` rounds
its partial sum ``s_a`` by ``δ_a s_a`` with ``|δ_a| ≤ u``. The error is
``Σ_a δ_a s_a``; with the ``δ_a`` independent and of mean zero (Higham and Mary,
"A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 41,
2019, who replace the worst-case constant ``γ_n = nu/(1 − nu)`` by this ``√n·u``
form) its standard deviation is at most ``u · √(Σ_a s_a²) ≤ u · √(n−1) · Σ|terms|``,
because a mean-zero rounding error bounded by ``u|s_a|`` has a standard deviation of at
most ``u|s_a|`` (reached by an error of ``±u|s_a|``, two points; a uniform spread would
give ``u|s_a|/√3``, but nothing forces a rounding error to be uniform) and no partial
sum exceeds ``Σ|terms|``. The orders differ only in how large their partial sums are:
key by key, they grow to the total (the worst); pairwise and blocked, most stay small.
The products (one rounding each) are inside the same bound. So the model's draw,
``√n·u·Σ|terms|``, *is* the bound of the worst order's spread, not a multiple of it; the
margin for kernels whose roundings line up lies in the tolerance's ``c = 3`` and in the
partial sums, which most orders keep well below ``Σ|terms|``.

What it does not cover: rounding errors that are not independent — the same
term added over and over, which rounds the same way each time (``n`` equal
values summed key by key grow an error like ``n·u``, not ``√n·u``). Random
inputs never do that; a case built from identical tokens can.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .dtypes import eps, half_spacing

__all__ = ["RoundingModel", "accumulator_roundoff", "largest_error_rms", "transpose", "unit_roundoff"]


def transpose(a: np.ndarray) -> np.ndarray:
    """``a`` with its last two axes swapped (``Kᵀ`` of a stack of matrices)."""
    return np.swapaxes(a, -1, -2)


def unit_roundoff(dtype: str) -> float:
    """``w``: the unit roundoff of ``dtype``, ``eps/2`` (float16 2⁻¹¹, bfloat16 2⁻⁸, float32 2⁻²⁴, float64 2⁻⁵³)."""
    return eps(dtype) / 2


def _accumulator(dtype: str) -> str:
    return "float64" if dtype == "float64" else "float32"


def accumulator_roundoff(dtype: str) -> float:
    """``u``: the unit roundoff of the accumulator a kernel in ``dtype`` sums in (float32, or float64 for float64)."""
    return unit_roundoff(_accumulator(dtype))


class RoundingModel:
    """Draws the errors of the model for one simulated kernel in ``dtype`` (see the module docstring).

    Attributes:
        u: the accumulator's unit roundoff; w: the dtype's.
        tiny_w, tiny_u: half the spacing of the dtype's and the accumulator's subnormal numbers.
        rng: the generator the errors come from (a seeded ``numpy.random.Generator``).
    """

    def __init__(self, dtype: str, rng: np.random.Generator) -> None:
        self.u = accumulator_roundoff(dtype)
        self.w = unit_roundoff(dtype)
        self.rng = rng
        # below the smallest normal number a rounding moves x by up to half the subnormals' spacing, not w·|x|
        self.tiny_w = float(half_spacing(0.0, dtype))
        self.tiny_u = float(half_spacing(0.0, _accumulator(dtype)))

    def z(self, shape: tuple[int, ...]) -> np.ndarray:
        """Independent standard normal draws (the error of a sum, a sum of many roundings)."""
        return self.rng.standard_normal(shape)

    def rel(self, x: np.ndarray, *sizes: float) -> np.ndarray:
        """``x · (1 + Σ_s size_s · δ_s)``, ``δ_s`` uniform on ``[−1, 1]``: one independent rounding of relative size
        at most ``size_s`` per entry for each ``s``; infinite entries (masked logits) are kept. A rounding to the
        dtype (``size = w``) or to the accumulator (``u``) moves a number below the smallest normal one by up to
        half the subnormals' spacing instead (float16: 2⁻²⁵ ≈ 3e-8), which is more than ``w·|x|`` there."""
        x = np.asarray(x, dtype=np.float64)
        finite = np.isfinite(x)
        xf = np.where(finite, x, 0.0)
        error = np.zeros(x.shape)
        for size in sizes:
            step = size * xf
            tiny = self.tiny_w if size == self.w else self.tiny_u if size == self.u else 0.0
            if tiny:  # a rounding to the dtype or the accumulator: at least half a subnormal spacing (0 stays 0)
                step = np.where(xf != 0, np.sign(xf) * np.maximum(np.abs(step), tiny), 0.0)
            error += step * self.rng.uniform(-1.0, 1.0, x.shape)
        return np.where(finite, xf + error, x)

    def sum_error(self, total_abs: np.ndarray, n: int, factor: float = 1.0) -> np.ndarray:
        """The error of a sum of ``n`` terms in any order: ``factor · √n · u · Σ|terms|`` times a draw."""
        return factor * np.sqrt(n) * self.u * total_abs * self.z(np.shape(total_abs))

    def matmul(self, a: np.ndarray, b: np.ndarray, factor: float = 1.0) -> np.ndarray:
        """``a @ b`` plus the error of its sums over the shared axis in any order (:meth:`sum_error`)."""
        return a @ b + self.sum_error(np.abs(a) @ np.abs(b), a.shape[-1], factor)

    def sum(self, x: np.ndarray, axis: int | tuple[int, ...] = -1, factor: float = 1.0) -> np.ndarray:
        """``Σ x`` over ``axis`` (one or several, kept) plus the error of that sum in any order."""
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        n = math.prod(x.shape[a] for a in axes)
        total = np.sum(x, axis=axes, keepdims=True)
        return total + self.sum_error(np.sum(np.abs(x), axis=axes, keepdims=True), n, factor)


def largest_error_rms(
    simulate: Callable[[RoundingModel], Mapping[str, np.ndarray]],
    exact: Mapping[str, np.ndarray],
    dtype: str,
    *,
    samples: int,
    seed: Any,
    groups: Mapping[str, Sequence[np.ndarray | None]] | None = None,
) -> dict[str, list[float]]:
    """The yardstick: per output and group of its entries, the root-mean-square over ``samples`` simulations of
    ``max|X_sim − X₆₄|`` over the group.

    ``simulate(r)`` computes the outputs once with the errors of ``r`` (a :class:`RoundingModel` in ``dtype`` on
    one generator seeded by ``seed``, shared by the samples); ``groups``: per output, boolean masks of its
    entries (``None`` = every entry); default one group of all.
    """
    rng = np.random.default_rng(seed)
    groups = groups or {n: [None] for n in exact}
    squares = {n: [0.0] * len(groups[n]) for n in exact}
    for _ in range(samples):
        sim = simulate(RoundingModel(dtype, rng))
        for n in exact:
            diff = np.abs(sim[n] - exact[n])
            for i, where in enumerate(groups[n]):
                part = diff if where is None else diff[where]
                squares[n][i] += (float(np.max(part)) if part.size else 0.0) ** 2
    return {n: [float(np.sqrt(sq / samples)) for sq in squares[n]] for n in exact}
