r"""The sinusoidal timestep embedding of diffusion U-Nets (DDPM, OpenAI's ``timestep_embedding``).

A diffusion step ``t`` (a number, usually an integer in ``[0, T)``) becomes a
vector of ``dim`` channels, cosines then sines of ``t`` at ``dim/2`` geometrically
spaced frequencies — the Transformer's positional encoding applied to time:

.. math::
    \omega_k = P^{-k/h} \ (k = 0 \dots h-1,\ h = \text{dim}/2,\ P = \text{max\_period}), \qquad
    e(t) = \big[\cos(t\,\omega_0), \dots, \cos(t\,\omega_{h-1}),\ \sin(t\,\omega_0), \dots, \sin(t\,\omega_{h-1})\big].

This is the order of OpenAI's guided-diffusion and of diffusers' ``Timesteps`` with
``flip_sin_to_cos=True, downscale_freq_shift=0`` (Stable Diffusion's setting).
It has no parameters; the U-Net's time MLP learns what to read from it.

Backward (with respect to ``t``, which is real-valued here; a sampler never needs
it, but it makes the op a complete pair and lets the derivative be checked):

.. math:: \frac{\partial L}{\partial t}
          = \sum_{k<h} \omega_k\big(-\sin(t\,\omega_k)\, dc_k + \cos(t\,\omega_k)\, ds_k\big),

where ``dc`` and ``ds`` are the halves of ``dout`` for the cosines and the sines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .._checks import check_cache, check_positive_int, check_real, require_dout, require_floating_arrays
from ..backend import Array, device_of

__all__ = ["TimestepEmbeddingCache", "timestep_embedding_backward", "timestep_embedding_forward"]


@dataclass(frozen=True)
class TimestepEmbeddingCache:
    backward_names: ClassVar[tuple[str, ...]] = ("timestep_embedding_backward",)  # the backward that takes it

    args: Array  # t ω, (B, h)
    freqs: Array  # ω, (h,)


def timestep_embedding_forward(
    t: Array, dim: int, *, max_period: float = 10000.0
) -> tuple[Array, TimestepEmbeddingCache]:
    """Cosines and sines of the timesteps at ``dim/2`` frequencies.

    Inputs:
        t: ``(B,)`` timesteps, real floating (cast integer steps with ``astype`` first).
        dim: even number of output channels.
        max_period: ``P``; the slowest frequency is ``P^{−(h−1)/h}``.

    Returns:
        emb: ``(B, dim)``, ``[cos(t ω), sin(t ω)]``.
        cache: :class:`TimestepEmbeddingCache`.
    """
    xp = require_floating_arrays("timestep embedding", t=t)
    if t.ndim != 1:
        raise ValueError(f"timestep embedding: t must be (B,), got shape {tuple(t.shape)}")
    dim = check_positive_int("dim", dim, "timestep embedding")
    if dim % 2:
        raise ValueError(f"timestep embedding: dim must be an even int ≥ 2, got {dim!r}")
    max_period = check_real("max_period", max_period, "timestep embedding")
    if max_period <= 0:
        raise ValueError(f"timestep embedding: max_period must be positive, got {max_period}")
    half = dim // 2
    k = xp.arange(half, dtype=t.dtype, device=device_of(t))
    # ω_k = P^(−k/h) = exp(−ln P · k/h)   (h,)
    freqs = xp.exp(-math.log(max_period) * k / half)
    # t ω   (B, h)
    args = t[:, None] * freqs[None, :]
    # e(t) = [cos(t ω), sin(t ω)]   (B, dim)
    emb = xp.concat([xp.cos(args), xp.sin(args)], axis=-1)
    return emb, TimestepEmbeddingCache(args=args, freqs=freqs)


def timestep_embedding_backward(dout: Array, cache: TimestepEmbeddingCache) -> dict[str, Array]:
    """``{"t": (B,)}``: ``Σ_k ω_k (−sin(t ω_k) dc_k + cos(t ω_k) ds_k)``."""
    check_cache(cache, TimestepEmbeddingCache, "timestep_embedding_backward")
    B, half = cache.args.shape
    xp = require_dout(dout, (B, 2 * half), cache.args.dtype, where="timestep embedding")
    dc, ds = dout[:, :half], dout[:, half:]  # (B, h) each
    # ∂L/∂t = Σ_k ω_k (−sin(t ω_k) dc_k + cos(t ω_k) ds_k)
    dt = xp.sum(cache.freqs * (-xp.sin(cache.args) * dc + xp.cos(cache.args) * ds), axis=-1)
    return {"t": dt}
