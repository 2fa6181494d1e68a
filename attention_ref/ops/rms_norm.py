r"""RMS normalisation over the last axis (Zhang and Sennrich, 2019), with its backward.

Forward, for each row ``x`` of ``C`` entries (the last axis):

.. math::
    r = \Big(\frac1C \sum_j x_j^2 + \epsilon\Big)^{-1/2}, \qquad \hat x = x\, r, \qquad y = \gamma \odot \hat x

Unlike layer norm nothing is subtracted: the row is only rescaled to unit root-mean-square, and there
is no shift ``β``. The diffusion transformers normalise every head's query and key this way (SD3's
``qk_norm="rms_norm"``, Flux's ``norm_q``/``norm_k``): on ``(B, heads, N, d)`` the last axis is a head's
``d`` channels, so each (token, head) vector is normalised on its own.

Backward. Given ``dy = ∂L/∂y``, let ``g = dy ⊙ γ = ∂L/∂x̂``. ``x̂_i = x_i r`` depends on ``x_i`` directly
and through ``r``, with

.. math::
    \frac{\partial r}{\partial x_j} = -\tfrac12 \Big(\tfrac1C\sum_k x_k^2 + \epsilon\Big)^{-3/2} \frac{2 x_j}{C}
                                   = -\frac{r^3 x_j}{C},

so

.. math::
    \frac{\partial L}{\partial x_j} = r\, g_j + \sum_i g_i x_i \frac{\partial r}{\partial x_j}
      = r\, g_j - \frac{r^3 x_j}{C} \sum_i g_i x_i
      = r \Big(g_j - \hat x_j\, \overline{g \hat x}\Big),

the bar a mean over the row. The scale's gradient sums over every row: ``dγ = Σ_rows dy ⊙ x̂``.

float16 is computed in float32 and the result rounded to float16, as for the other norms
(:func:`attention_ref._checks.working_dtype`). diffusers' own ``RMSNorm`` (SD3's q/k norm) computes its
mean square in float32 for *every* input dtype, float64 included, so a float64 diffusers model with
``qk_norm="rms_norm"`` agrees with this float64 reference only to about 1e-7 (``torch.nn.RMSNorm``,
Flux's q/k norm, computes in the input's dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .._checks import as_dtype, check_cache, check_eps, in_working_dtype, require_dout, require_floating_arrays
from ..backend import Array

__all__ = ["RMSNormCache", "rms_norm_backward", "rms_norm_forward"]


@dataclass(frozen=True)
class RMSNormCache:
    """What :func:`rms_norm_backward` needs."""

    backward_names: ClassVar[tuple[str, ...]] = ("rms_norm_backward",)  # the backward that takes it

    xhat: Array  # x̂ = x r, (..., C) (float32 for float16 input)
    rstd: Array  # r, (..., 1)
    weight: Array | None  # γ, (C,); None without a scale
    dtype: object  # the forward's input dtype (dout must have it)


def rms_norm_forward(x: Array, weight: Array | None = None, *, eps: float = 1e-6) -> tuple[Array, RMSNormCache]:
    """RMS norm over the last axis: ``y = γ ⊙ x / sqrt(mean(x²) + eps)``.

    Inputs:
        x: ``(..., C)``, real floating, ``C ≥ 1``.
        weight: ``γ`` ``(C,)`` of x's dtype, or ``None`` for no scale (diffusers' ``elementwise_affine=False``).
        eps: added to the mean square (the diffusion transformers use 1e-6).

    Returns:
        y: ``(..., C)``, x's dtype; cache: :class:`RMSNormCache`.
    """
    xp = require_floating_arrays("rms norm", optional=("weight",), x=x, weight=weight)
    eps = check_eps("eps", eps, "rms norm")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"rms norm: x must be (..., C) with C ≥ 1, got shape {tuple(x.shape)}")
    C = x.shape[-1]
    if weight is not None:
        if tuple(weight.shape) != (C,):
            raise ValueError(
                f"rms norm: weight of shape {tuple(weight.shape)} does not match x of shape {tuple(x.shape)}"
            )
    # float16 is computed in float32 and the result rounded back (as the other norms)
    x_w, weight_w = in_working_dtype(xp, x, weight)
    # mean(x²) over the row, kept as a size-1 axis   (..., 1)
    mean_square = xp.mean(x_w * x_w, axis=-1, keepdims=True)
    # r = (mean(x²) + ε)^(-1/2)   (..., 1)
    rstd = 1.0 / xp.sqrt(mean_square + eps)
    # x̂ = x r   (..., C)
    xhat = x_w * rstd
    # y = γ ⊙ x̂
    y = xhat if weight_w is None else xhat * weight_w
    return as_dtype(xp, y, x.dtype), RMSNormCache(xhat=xhat, rstd=rstd, weight=weight, dtype=x.dtype)


def rms_norm_backward(dout: Array, cache: RMSNormCache) -> dict[str, Array]:
    """Gradients of :func:`rms_norm_forward`.

    Inputs:
        dout: ``(..., C)``, the forward's output shape and dtype.
        cache: from :func:`rms_norm_forward`.

    Returns:
        ``{"x": (..., C)}``, and ``"weight": (C,)`` when the forward had a scale; in dout's dtype.
    """
    check_cache(cache, RMSNormCache, "rms_norm_backward")
    xp = require_dout(dout, cache.xhat.shape, cache.dtype, where="rms_norm_backward")
    C = dout.shape[-1]
    dy, weight = in_working_dtype(xp, dout, cache.weight)  # float16 in float32, as the forward
    xhat, rstd = cache.xhat, cache.rstd
    grads: dict[str, Array] = {}
    g = dy
    if weight is not None:
        # dγ = Σ_rows dy ⊙ x̂   (C,)
        grads["weight"] = xp.sum(xp.reshape(dy * xhat, (-1, C)), axis=0)
        # g = ∂L/∂x̂ = dy ⊙ γ
        g = dy * weight
    # dx = r (g − x̂ mean(g x̂))   (..., C)
    grads["x"] = rstd * (g - xhat * xp.mean(g * xhat, axis=-1, keepdims=True))
    return {name: as_dtype(xp, grad, dout.dtype) for name, grad in grads.items()}
