r"""GELU (exact, erf-based) and the gated GEGLU unit, with their backward passes.

GELU weighs its input by the standard normal CDF ``Φ``:

.. math::
    \operatorname{gelu}(x) = x\,\Phi(x), \qquad
    \Phi(x) = \tfrac12\big(1 + \operatorname{erf}(x/\sqrt2)\big) = \tfrac12 \operatorname{erfc}(-x/\sqrt2).

This is the exact form — PyTorch's ``F.gelu`` default (``approximate="none"``),
which diffusers' ``GEGLU`` calls — not the tanh approximation. ``Φ`` is computed
as ``erfc(−x/√2)/2`` so that it keeps its relative accuracy for very negative ``x``.

Backward: with ``φ(x) = exp(−x²/2)/√(2π)`` the normal density, ``Φ' = φ`` and

.. math:: \operatorname{gelu}'(x) = \Phi(x) + x\,\varphi(x).

GEGLU (Shazeer 2020, "GLU variants improve Transformer") splits the last axis of
its input in two halves, a value ``a`` and a gate ``g``, and returns

.. math:: \operatorname{geglu}([a, g]) = a \cdot \operatorname{gelu}(g),

the order diffusers' ``GEGLU`` uses (``hidden_states, gate = proj(x).chunk(2, -1)``).
Its backward: ``da = dout · gelu(g)``, ``dg = dout · a · gelu'(g)``, and ``dx`` is
``[da, dg]`` joined along the last axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .._checks import check_cache, require_dout, require_floating_arrays
from ..backend import Array
from .erf import erfc

__all__ = ["GegluCache", "GeluCache", "geglu_backward", "geglu_forward", "gelu_backward", "gelu_forward"]

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class GeluCache:
    backward_names: ClassVar[tuple[str, ...]] = ("gelu_backward",)  # the backward that takes it

    x: Array  # the input
    cdf: Array  # Φ(x), same shape


def gelu_forward(x: Array) -> tuple[Array, GeluCache]:
    """Exact GELU ``x Φ(x)``, elementwise.

    Inputs:
        x: any shape, real floating.

    Returns:
        out: same shape as ``x``.
        cache: :class:`GeluCache`.
    """
    require_floating_arrays("gelu", x=x)
    # Φ(x) = erfc(−x/√2) / 2
    cdf = 0.5 * erfc(-x * _INV_SQRT2)
    # gelu(x) = x Φ(x)
    return x * cdf, GeluCache(x=x, cdf=cdf)


def gelu_backward(dout: Array, cache: GeluCache) -> dict[str, Array]:
    """``{"x": dout · gelu'(x)}`` with ``gelu'(x) = Φ(x) + x φ(x)``."""
    check_cache(cache, GeluCache, "gelu_backward")
    xp = require_dout(dout, cache.x.shape, cache.x.dtype, where="gelu")
    x = cache.x
    # φ(x) = exp(−x²/2) / √(2π)
    pdf = _INV_SQRT_2PI * xp.exp(-0.5 * x * x)
    # dx = dout (Φ(x) + x φ(x))
    return {"x": dout * (cache.cdf + x * pdf)}


@dataclass(frozen=True)
class GegluCache:
    backward_names: ClassVar[tuple[str, ...]] = ("geglu_backward",)  # the backward that takes it

    value: Array  # a, (..., F)
    gelu_gate: Array  # gelu(g), (..., F)
    gate: GeluCache  # the GELU of the gate g


def geglu_forward(x: Array) -> tuple[Array, GegluCache]:
    """GEGLU: ``a · gelu(g)`` where ``x = [a, g]`` along the last axis.

    Inputs:
        x: ``(..., 2F)``, real floating; the first ``F`` channels are the value,
            the last ``F`` the gate.

    Returns:
        out: ``(..., F)``.
        cache: :class:`GegluCache`.
    """
    require_floating_arrays("geglu", x=x)
    if x.ndim < 1 or x.shape[-1] % 2 != 0:
        raise ValueError(f"geglu needs an even number of channels to split into value and gate, got {tuple(x.shape)}")
    F = x.shape[-1] // 2
    value = x[..., :F]  # a, (..., F)
    gate = x[..., F:]  # g, (..., F)
    gelu_gate, gate_cache = gelu_forward(gate)
    # out = a · gelu(g)
    return value * gelu_gate, GegluCache(value=value, gelu_gate=gelu_gate, gate=gate_cache)


def geglu_backward(dout: Array, cache: GegluCache) -> dict[str, Array]:
    """``{"x": [da, dg]}``, ``(..., 2F)``: ``da = dout · gelu(g)``, ``dg = dout · a · gelu'(g)``."""
    check_cache(cache, GegluCache, "geglu_backward")
    xp = require_dout(dout, cache.value.shape, cache.value.dtype, where="geglu")
    # da = dout · gelu(g)
    d_value = dout * cache.gelu_gate
    # dg = dout · a · gelu'(g)
    d_gate = gelu_backward(dout * cache.value, cache.gate)["x"]
    return {"x": xp.concat([d_value, d_gate], axis=-1)}
