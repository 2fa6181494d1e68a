r"""SiLU (the "swish" of Ramachandran et al. 2017), the activation of diffusion U-Nets' residual blocks.

.. math:: \operatorname{silu}(x) = x\,\sigma(x), \qquad \sigma(x) = \frac{1}{1 + e^{-x}}.

``σ`` is evaluated without overflow on either side: with ``e = exp(−|x|) ∈ (0, 1]``,
``σ(x) = 1/(1 + e)`` for ``x ≥ 0`` and ``e/(1 + e)`` for ``x < 0`` (multiply the
fraction by ``e^{x}/e^{x}``), so no ``exp`` of a large positive number is taken.

Backward. ``σ' = σ(1 − σ)`` (differentiate ``(1 + e^{−x})^{−1}``:
``e^{−x}/(1 + e^{−x})² = σ · (1 − σ)``), so by the product rule

.. math:: \operatorname{silu}'(x) = \sigma(x) + x\,\sigma(x)\big(1 - \sigma(x)\big)
          = \sigma(x)\big(1 + x\,(1 - \sigma(x))\big),

and ``dx = dout · silu'(x)``. PyTorch's ``F.silu`` and diffusers' ``nn.SiLU`` compute the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .._checks import check_cache, require_dout, require_floating_arrays
from ..backend import Array

__all__ = ["SiluCache", "silu_backward", "silu_forward"]


@dataclass(frozen=True)
class SiluCache:
    backward_names: ClassVar[tuple[str, ...]] = ("silu_backward",)  # the backward that takes it

    x: Array  # the input
    sigmoid: Array  # σ(x), same shape


def silu_forward(x: Array) -> tuple[Array, SiluCache]:
    """``x σ(x)``, elementwise.

    Inputs:
        x: any shape, real floating.

    Returns:
        out: same shape as ``x``.
        cache: :class:`SiluCache`.
    """
    xp = require_floating_arrays("silu", x=x)
    # e = exp(−|x|) ∈ (0, 1]: never overflows
    e = xp.exp(-xp.abs(x))
    # σ(x) = 1/(1 + e) for x ≥ 0, e/(1 + e) for x < 0
    sigmoid = xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    # silu(x) = x σ(x)
    return x * sigmoid, SiluCache(x=x, sigmoid=sigmoid)


def silu_backward(dout: Array, cache: SiluCache) -> dict[str, Array]:
    """``{"x": dout · σ(x)(1 + x(1 − σ(x)))}``, the shape of ``x``."""
    check_cache(cache, SiluCache, "silu_backward")
    require_dout(dout, cache.x.shape, cache.x.dtype, where="silu")
    s = cache.sigmoid
    # dx = dout σ (1 + x (1 − σ))
    return {"x": dout * s * (1.0 + cache.x * (1.0 - s))}
