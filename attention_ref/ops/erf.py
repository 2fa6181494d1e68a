r"""The error function ``erf`` and its complement ``erfc``, in Array API calls only.

The Array API standard has no ``erf``, so it is computed here from two classical
expansions, each used where it converges fast, with no fitted coefficients:

**Small arguments,** ``0 ≤ s < 2.5``: the power series of ``erf`` written with the
factor ``exp(−s²)`` taken out, which makes every term positive (no cancellation):

.. math::
    \operatorname{erf}(s) = \frac{2}{\sqrt\pi}\, e^{-s^2} \sum_{n\ge 0} \frac{2^n s^{2n+1}}{1\cdot 3\cdots(2n+1)},
    \qquad t_0 = s,\quad t_n = t_{n-1}\,\frac{2s^2}{2n+1}.

(Differentiate ``e^{s²} erf(s)``: it satisfies ``y' = 2s y + 2/√π``, whose power
series has exactly these coefficients.) At ``s = 2.5`` the terms fall below
``1e-17`` of the sum after 40 terms.

**Large arguments,** ``s ≥ 2.5``: Laplace's continued fraction for ``erfc``,

.. math::
    \operatorname{erfc}(s) = \frac{e^{-s^2}}{\sqrt\pi}\;
    \cfrac{1}{s + \cfrac{1/2}{s + \cfrac{1}{s + \cfrac{3/2}{s + \cdots}}}},

evaluated from the bottom up with 40 levels (the ``k``-th partial numerator is
``k/2``); it converges faster the larger ``s`` is, and 40 levels give full float64
accuracy from ``s = 2.5`` on.

Negative arguments use ``erf(−s) = −erf(s)`` and ``erfc(−s) = 2 − erfc(s)``.
Both branches are evaluated on every entry (with ``s`` clamped into each branch's
range — the fraction's to ``[2.5, 28]``, past which ``erfc`` is 0 in float64 — so
neither overflows) and the right one is picked with ``where``: one code
path for every backend.

Accuracy in float64, measured against ``math.erf``/``math.erfc`` in the tests:
``erf`` to about 1e-15 relative everywhere; ``erfc`` to about 1e-15 relative for
``x ≥ 2.5`` (the continued fraction) and to 1e-15 *absolute* below that, where
``erfc = 1 − erf`` (at most ~2e-12 relative, at ``x`` just under 2.5, where
``erfc ≈ 4e-4``). Cost: about 200 elementwise operations per entry.
"""

from __future__ import annotations

import math
from types import ModuleType

from .._checks import require_floating_arrays
from ..backend import Array

__all__ = ["erf", "erfc"]

# Where the series hands over to the continued fraction, and how many terms each uses.
_SWITCH = 2.5
_SERIES_TERMS = 40
_FLUSH = 28.0
_FRACTION_LEVELS = 40
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_ONE_OVER_SQRT_PI = 1.0 / math.sqrt(math.pi)


def _erf_series(xp: ModuleType, s: Array) -> Array:
    """``erf(s)`` for ``0 ≤ s ≤ 2.5`` by the all-positive series."""
    two_s2 = 2.0 * s * s
    term = s
    total = s
    for n in range(1, _SERIES_TERMS):
        # t_n = t_{n-1} · 2s² / (2n + 1)
        term = term * two_s2 / (2 * n + 1)
        total = total + term
    # erf(s) = 2/√π · exp(−s²) · Σ t_n
    return _TWO_OVER_SQRT_PI * xp.exp(-s * s) * total


def _erfc_fraction(xp: ModuleType, s: Array) -> Array:
    """``erfc(s)`` for ``s ≥ 2.5`` by Laplace's continued fraction, evaluated bottom-up."""
    tail = s
    for k in range(_FRACTION_LEVELS, 0, -1):
        # level k:  s + (k/2) / (everything below)
        tail = s + (0.5 * k) / tail
    # exp(−s²) without the rounding error of s·s, which is up to 6e-14 relative at s = 27:
    # s = c + r with c = s rounded down to a multiple of 1/16, so c² is exact and
    # s² = c² + r (s + c) with a small second term.
    c = xp.floor(16.0 * s) / 16.0
    gaussian = xp.exp(-c * c) * xp.exp(-(s - c) * (s + c))
    # erfc(s) = exp(−s²) / (√π · tail)
    return _ONE_OVER_SQRT_PI * gaussian / tail


def _erf_and_erfc_of_abs(xp: ModuleType, x: Array) -> tuple[Array, Array, Array]:
    """``(erf(|x|), erfc(|x|), x < 0)``, each computed by the branch that is accurate for it."""
    s = xp.abs(x)
    small = s < _SWITCH
    erf_small = _erf_series(xp, xp.minimum(s, _SWITCH))
    # beyond s = 28, erfc(s) < 1e-342 is 0 in float64; clamping there keeps s = inf from making inf − inf
    erfc_large = _erfc_fraction(xp, xp.minimum(xp.maximum(s, _SWITCH), _FLUSH))
    erf_abs = xp.where(small, erf_small, 1.0 - erfc_large)
    erfc_abs = xp.where(small, 1.0 - erf_small, erfc_large)
    return erf_abs, erfc_abs, x < 0


def erf(x: Array) -> Array:
    r"""The error function ``erf(x) = 2/√π ∫₀ˣ exp(−t²) dt``, elementwise.

    Inputs:
        x: any shape, real floating.

    Returns:
        same shape and dtype as ``x``; NaN stays NaN, ``±inf`` gives ``±1``.
    """
    xp = require_floating_arrays("erf", x=x)
    erf_abs, _, negative = _erf_and_erfc_of_abs(xp, x)
    # erf(−s) = −erf(s)
    return xp.where(negative, -erf_abs, erf_abs)


def erfc(x: Array) -> Array:
    r"""The complementary error function ``erfc(x) = 1 − erf(x)``, elementwise, accurate in the right tail.

    Inputs:
        x: any shape, real floating.

    Returns:
        same shape and dtype as ``x``; in ``[0, 2]``.
    """
    xp = require_floating_arrays("erfc", x=x)
    _, erfc_abs, negative = _erf_and_erfc_of_abs(xp, x)
    # erfc(−s) = 2 − erfc(s)
    return xp.where(negative, 2.0 - erfc_abs, erfc_abs)
