r"""The noise schedule, the forward (noising) process, the DDPM loss and the deterministic DDIM step.

**Forward process** (Ho et al. 2020). With ``ᾱ_t`` decreasing from ≈1 to ≈0 over
``t = 0 … T−1``, a clean image ``x₀`` is noised in one jump:

.. math:: x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \varepsilon,
          \qquad \varepsilon \sim \mathcal N(0, I).

**Schedule**: the cosine schedule of Nichol & Dhariwal (2021), which for small images
keeps more steps at moderate noise than DDPM's linear betas:
``f(u) = cos²((u/T + s)/(1 + s) · π/2)``, ``s = 0.008``,
``β_t = min(1 − f(t+1)/f(t), 0.999)``, ``ᾱ_t = Π_{k≤t}(1 − β_k)``.

**Loss** (ε-prediction, DDPM's "simple" objective): the network sees ``x_t`` and
``t`` and predicts the noise,

.. math:: L = \operatorname{mean}\big(\hat\varepsilon(x_t, t, c) - \varepsilon\big)^2,
          \qquad \frac{\partial L}{\partial \hat\varepsilon} = \frac{2}{n}(\hat\varepsilon - \varepsilon),

``n`` the number of entries; ``t`` uniform in ``[0, T)``.

**DDIM** (Song et al. 2021, ``η = 0``): from ``x_t`` and ``ε̂``, the implied clean
image and a deterministic jump to an earlier step ``s < t``:

.. math::
    \hat x_0 = \frac{x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon}{\sqrt{\bar\alpha_t}}, \qquad
    x_s = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1-\bar\alpha_s}\,\hat\varepsilon ,

with ``ᾱ_s = 1`` after the last step (``x_s = x̂₀``). ``x̂₀`` is clipped to the data
range ``[−1, 1]`` and ``ε̂`` recomputed from the clipped ``x̂₀``
(``ε̂ = (x_t − √ᾱ_t x̂₀)/√(1 − ᾱ_t)``), so the two stay consistent.

**Classifier-free guidance** (Ho & Salimans 2022): with ``ε̂_c`` for the prompt and
``ε̂_∅`` for the empty prompt, ``ε̂ = ε̂_∅ + w (ε̂_c − ε̂_∅)``; ``w = 1`` is the plain
conditional model.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["Schedule", "cosine_schedule", "ddim_step", "ddim_timesteps", "guided_eps", "noise_images"]

T = 1000


class Schedule:
    """``ᾱ_t`` for ``t = 0 … T−1`` (``alpha_bar``, ``(T,)`` float64)."""

    def __init__(self, alpha_bar: np.ndarray) -> None:
        self.alpha_bar = np.asarray(alpha_bar, dtype=np.float64)

    @property
    def steps(self) -> int:
        return self.alpha_bar.shape[0]


def cosine_schedule(steps: int = T, s: float = 0.008) -> Schedule:
    """The cosine schedule (module docstring) over ``steps`` diffusion steps."""
    u = np.arange(steps + 1, dtype=np.float64)
    # f(u) = cos²((u/T + s)/(1 + s) · π/2)
    f = np.cos((u / steps + s) / (1 + s) * math.pi / 2) ** 2
    # β_t = min(1 − f(t+1)/f(t), 0.999);  ᾱ_t = Π_{k≤t} (1 − β_k)
    betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    return Schedule(np.cumprod(1.0 - betas))


def noise_images(schedule: Schedule, x0: np.ndarray, t: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """The forward process: ``x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε``.

    Inputs:
        x0: ``(B, H, W, C)`` clean images in [−1, 1]; t: ``(B,)`` int steps; eps: like ``x0``.

    Returns:
        x_t: like ``x0`` (``x0``'s dtype).
    """
    t = np.asarray(t)
    if x0.ndim != 4 or eps.shape != x0.shape or t.shape != x0.shape[:1]:
        raise ValueError(
            f"noising needs x0 (B, H, W, C), eps of the same shape and t (B,); got x0 {x0.shape}, "
            f"eps {eps.shape}, t {t.shape}"
        )
    _check_steps(schedule, t, "t")
    ab = schedule.alpha_bar[t].astype(x0.dtype)[:, None, None, None]  # (B, 1, 1, 1)
    return np.sqrt(ab) * x0 + np.sqrt(1.0 - ab) * eps


def _check_steps(schedule: Schedule, t: np.ndarray, name: str) -> None:
    """Steps are integers in ``[0, T)``: a negative one would silently index from the end."""
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"{name} must hold integer steps, got {t.dtype}")
    if t.size and (t.min() < 0 or t.max() >= schedule.steps):
        raise ValueError(f"{name} must lie in [0, {schedule.steps}), got {t.min()} to {t.max()}")


def ddim_timesteps(steps: int, total: int = T) -> np.ndarray:
    """``steps`` evenly spaced diffusion steps from ``total − 1`` down to 0, ``(steps,)`` int."""
    if not 1 <= steps <= total:
        raise ValueError(f"DDIM needs 1 ≤ steps ≤ {total}, got {steps}")
    return np.round(np.linspace(total - 1, 0, steps)).astype(int)


def guided_eps(eps_cond: np.ndarray, eps_uncond: np.ndarray, guidance: float) -> np.ndarray:
    """Classifier-free guidance: ``ε̂ = ε̂_∅ + w (ε̂_c − ε̂_∅)``."""
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def ddim_step(
    schedule: Schedule, x_t: np.ndarray, eps: np.ndarray, t: int, t_prev: int | None, *, clip: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """One deterministic DDIM step from ``t`` to ``t_prev`` (``None``: to the clean image).

    Inputs:
        x_t: ``(B, H, W, C)``; eps: ``ε̂`` like ``x_t``; t, t_prev: steps.
        clip: clip ``x̂₀`` to [−1, 1] (and make ``ε̂`` consistent with it).

    Returns:
        ``(x_prev, x0_hat)``, both like ``x_t``.
    """
    if eps.shape != x_t.shape:
        raise ValueError(f"DDIM: eps of shape {eps.shape} does not match x_t {x_t.shape}")
    _check_steps(schedule, np.asarray(t), "t")
    if t_prev is not None and not 0 <= t_prev < t:
        raise ValueError(f"DDIM steps to an earlier step: need 0 ≤ t_prev < t, got t_prev={t_prev}, t={t}")
    ab = schedule.alpha_bar[t]
    ab_prev = 1.0 if t_prev is None else schedule.alpha_bar[t_prev]
    # x̂₀ = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t
    x0 = (x_t - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
    if clip:
        x0 = np.clip(x0, -1.0, 1.0)
        # ε̂ = (x_t − √ᾱ_t x̂₀) / √(1 − ᾱ_t)
        eps = (x_t - math.sqrt(ab) * x0) / math.sqrt(1.0 - ab)
    # x_s = √ᾱ_s x̂₀ + √(1 − ᾱ_s) ε̂
    x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(1.0 - ab_prev) * eps
    return x_prev.astype(x_t.dtype), x0.astype(x_t.dtype)
