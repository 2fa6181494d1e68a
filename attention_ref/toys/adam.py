r"""The Adam optimiser (Kingma & Ba 2015) on a dict of NumPy parameters.

For each parameter θ with gradient g at step t = 1, 2, …:

.. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1)\, g, \qquad
    v_t = \beta_2 v_{t-1} + (1-\beta_2)\, g^2, \\
    \hat m_t = m_t / (1-\beta_1^t), \qquad \hat v_t = v_t / (1-\beta_2^t), \qquad
    \theta \leftarrow \theta - \text{lr}\cdot \hat m_t / (\sqrt{\hat v_t} + \epsilon).

The bias corrections undo the zero initialisation of ``m`` and ``v``, so the first
steps are not too small.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["Adam"]


class Adam:
    """Adam on ``params`` (a dict of NumPy arrays, updated in place by :meth:`step`).

    Inputs:
        params: name → float array; the same dict object is updated.
        lr: learning rate; betas: ``(β₁, β₂)``; eps: added to ``√v̂``.
    """

    def __init__(
        self,
        params: dict[str, np.ndarray],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params = params
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.t = 0
        self.m = {name: np.zeros_like(p) for name, p in params.items()}
        self.v = {name: np.zeros_like(p) for name, p in params.items()}

    def step(self, grads: Mapping[str, np.ndarray], lr: float | None = None) -> None:
        """One update of every parameter that has a gradient in ``grads`` (others are left alone)."""
        lr = self.lr if lr is None else lr
        self.t += 1
        correction1 = 1.0 - self.beta1**self.t
        correction2 = 1.0 - self.beta2**self.t
        for name, g in grads.items():
            if name not in self.params:
                continue
            p = self.params[name]
            if g.shape != p.shape:
                raise ValueError(f"Adam: gradient of {name!r} has shape {g.shape}, the parameter {p.shape}")
            # m = β₁ m + (1 − β₁) g ;  v = β₂ v + (1 − β₂) g²
            self.m[name] = self.beta1 * self.m[name] + (1.0 - self.beta1) * g
            self.v[name] = self.beta2 * self.v[name] + (1.0 - self.beta2) * g * g
            # θ ← θ − lr · m̂ / (√v̂ + ε)
            m_hat = self.m[name] / correction1
            v_hat = self.v[name] / correction2
            p -= lr * m_hat / (np.sqrt(v_hat) + self.eps)
