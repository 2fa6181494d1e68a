r"""The normalisation step shared by group norm and layer norm, with its backward.

Over a set of ``n`` entries (the reduction axes):

.. math::
    \mu = \frac1n \sum x, \qquad \sigma^2 = \frac1n \sum (x-\mu)^2, \qquad
    r = (\sigma^2 + \epsilon)^{-1/2}, \qquad \hat x = (x - \mu)\, r .

Backward. Given ``g = ∂L/∂x̂``: ``x̂`` depends on ``x`` directly, through ``μ``
and through ``r``. Using ``∂μ/∂x_i = 1/n`` and ``∂r/∂x_i = −r³ (x_i − μ)/n``
(the ``μ`` term of ``σ²`` drops out because ``Σ (x − μ) = 0``),

.. math::
    \frac{\partial L}{\partial x_i}
      = r\, g_i - \frac{r}{n}\sum_j g_j - \frac{r^3 (x_i-\mu)}{n} \sum_j g_j (x_j-\mu)
      = r \Big(g_i - \overline{g} - \hat x_i\, \overline{g\,\hat x}\Big),

where the bars are means over the reduction axes.

float16 is computed in float32, as torch does (its squares overflow at 256):
the callers pass their inputs through :func:`attention_ref._checks.in_working_dtype`
and round their results back.
"""

from __future__ import annotations

from types import ModuleType

from ..backend import Array, device_of


def mean_over(xp: ModuleType, x: Array, axes: tuple[int, ...]) -> Array:
    """The mean of ``x`` over ``axes``, kept as size-1 axes: ``xp.mean(x, axis=axes, keepdims=True)``.

    Summed one axis at a time, outermost first: NumPy reduces two axes that are not next to each other
    (a group norm's positions and channels, ``(1, 3)`` of ``(B, S, G, C/G)``) 15–20× slower in one call.
    """
    total = x
    for axis in sorted(a % x.ndim for a in axes):
        total = xp.sum(total, axis=axis, keepdims=True)
    count = 1
    for axis in axes:
        count *= x.shape[axis]
    return total / count


def along_rows(xp: ModuleType, stat: Array, shape: tuple[int, ...]) -> Array:
    """A statistic (size 1 on the reduced axes), repeated along the last axis when that axis was reduced but is
    short and other axes were reduced too: a group norm's ``(B, 1, G, 1)`` becomes ``(B, 1, G, C/G)``.

    The same numbers; only the speed changes. NumPy's elementwise loops run along the last axis, so a
    statistic that broadcasts along 2 channels makes them 2 numbers long (5× slower at the toys' sizes);
    repeated, it lines up with ``x``'s ``(G, C/G)`` and the loops run along whole rows of ``C``.
    """
    n = shape[-1]
    if stat.shape[-1] == 1 and 1 < n < 16 and _size(tuple(stat.shape)) * n < _size(shape):
        return stat * xp.ones((n,), dtype=stat.dtype, device=device_of(stat))  # s · 1 = s exactly
    return stat


def _size(shape: tuple[int, ...]) -> int:
    size = 1
    for n in shape:
        size *= n
    return size


def normalize(xp: ModuleType, x: Array, axes: tuple[int, ...], eps: float) -> tuple[Array, Array]:
    """``(x̂, r)``: ``x`` centred and scaled over ``axes``; ``r`` keeps those axes as size 1."""
    shape = tuple(x.shape)
    # μ = mean(x)
    mu = mean_over(xp, x, axes)
    centred = x - along_rows(xp, mu, shape)
    # σ² = mean((x - μ)²)
    var = mean_over(xp, centred * centred, axes)
    # r = 1 / sqrt(σ² + ε)
    rstd = 1.0 / xp.sqrt(var + eps)
    # x̂ = (x - μ) r
    return centred * along_rows(xp, rstd, shape), rstd


def normalize_backward(xp: ModuleType, g: Array, xhat: Array, rstd: Array, axes: tuple[int, ...]) -> Array:
    """``∂L/∂x`` from ``g = ∂L/∂x̂``: ``r (g − mean(g) − x̂ mean(g x̂))``."""
    shape = tuple(g.shape)
    mean_g = along_rows(xp, mean_over(xp, g, axes), shape)
    mean_gx = along_rows(xp, mean_over(xp, g * xhat, axes), shape)
    # dx = r (g - mean(g) - x̂ mean(g x̂))
    return along_rows(xp, rstd, shape) * (g - mean_g - xhat * mean_gx)
