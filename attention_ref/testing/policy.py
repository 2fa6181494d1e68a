"""The policies: what a correct attention kernel may round, and the constants of the tolerance rule.

What a kernel may round depends on how it computes, and one rule for every kernel cannot see a bug where they
differ most (logits near 500 stored in bfloat16 move by up to 1, which changes a weight by a factor e). So each
kernel is judged by a named policy, and every report names it:

* ``fused`` (the default): the logits ``S = scale·q kᵀ + bias``, the softmax's max, sum ``ℓ`` and logsumexp, and
  every sum are kept in float32 (float64 for float64); ``q, k, v``, the weights ``P`` (for ``P·V``), ``dP``,
  ``dS`` and the outputs may be stored in the dtype. FlashAttention, xformers and PyTorch's SDPA backends compute
  so.
* ``eager``: also ``scale·q`` and ``k``, ``QKᵀ`` and its product with the scale, ``S − max``, ``exp``, ``ℓ`` and
  ``P`` may be stored in the dtype, op by op: PyTorch's eager code on half tensors, diffusers' ``AttnProcessor``
  (``baddbmm`` in half).

In float32 and float64 the two coincide up to where a rounding lands. Under both, sums accumulate in float32 or
wider and nothing is stored narrower than the dtype. The simulation of each is :mod:`.simulation`; the rule that
uses the constants is :mod:`.tolerance`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .dtypes import eps

__all__ = ["ARITHMETICS", "DEFAULT_POLICY", "EAGER", "FUSED", "OUTPUTS", "POLICIES", "Policy", "check_policy"]

OUTPUTS = ("out", "dq", "dk", "dv")

# What a kernel keeps in float32 (or wider), and what it may store in the dtype under test (module docstring).
ARITHMETICS = ("fused", "eager")


def _frozen(d: dict[str, float]) -> MappingProxyType:
    return MappingProxyType(dict(d))


_C = {"out": 3.0, "dq": 3.0, "dk": 3.0, "dv": 3.0}
_FLOOR = {"out": 0.0, "dq": 1.0, "dk": 1.0, "dv": 1.0}


@dataclass(frozen=True)
class Policy:
    """What a kernel may do, and the constants of the tolerance rule (:mod:`.tolerance`).

    Attributes:
        arithmetic: ``"fused"`` (the default: the logits, the softmax's max, sum and logsumexp and every sum in
            float32 or wider; ``q, k, v, P, dP, dS`` and the outputs may be stored in the dtype — FlashAttention and
            PyTorch's fused SDPA backends) or ``"eager"`` (also the logits and the softmax stored in the dtype, op
            by op — PyTorch's eager half-precision code, diffusers' ``AttnProcessor``).
        c: per output, how many times the simulated kernels' error is allowed.
        floor: per output, the floor in units of ``ε · max‖X‖``.
        samples: how many simulated kernels the yardstick is taken over.
    """

    arithmetic: str = "fused"
    c: MappingProxyType = field(default_factory=lambda: _frozen(_C))
    floor: MappingProxyType = field(default_factory=lambda: _frozen(_FLOOR))
    samples: int = 8

    def __post_init__(self) -> None:
        if self.arithmetic not in ARITHMETICS:
            raise ValueError(f"Policy.arithmetic must be one of {', '.join(ARITHMETICS)}; got {self.arithmetic!r}")
        for name in ("c", "floor"):
            d = getattr(self, name)
            if set(d) != set(OUTPUTS):
                raise ValueError(f"Policy.{name} needs exactly the keys {OUTPUTS}, got {sorted(d)}")
            object.__setattr__(self, name, _frozen(d))
        if not (isinstance(self.samples, int) and self.samples >= 2):
            raise ValueError(f"Policy.samples must be an integer ≥ 2, got {self.samples!r}")

    @property
    def name(self) -> str:
        """``"fused"`` or ``"eager"``, with ``" (custom constants)"`` when ``c``, ``floor`` or ``samples`` differ
        from the defaults."""
        default = dict(self.c) == _C and dict(self.floor) == _FLOOR and self.samples == 8
        return self.arithmetic if default else f"{self.arithmetic} (custom constants)"

    def key(self) -> tuple[Any, ...]:
        """Everything the allowance depends on, hashable."""
        return (self.arithmetic, tuple(sorted(self.c.items())), tuple(sorted(self.floor.items())), self.samples)

    def allowed(self, output: str, magnitude: float, kernel_error: float, dtype: str) -> tuple[float, float]:
        """``(allowed, floor)`` for one output: ``allowed = c·kernel_error + floor``.

        ``magnitude`` is ``max‖X‖`` and ``kernel_error`` the simulated kernels' error
        (:attr:`.tolerance.Group.magnitude`, :attr:`.tolerance.Group.kernel_error`).
        """
        floor = self.floor[output] * eps(dtype) * magnitude
        return self.c[output] * kernel_error + floor, floor


FUSED = Policy("fused")
EAGER = Policy("eager")
POLICIES = MappingProxyType({"fused": FUSED, "eager": EAGER})
DEFAULT_POLICY = FUSED


def check_policy(policy: Any) -> Policy:
    """``policy`` as a :class:`Policy`: a Policy itself, or the name of one (``"fused"``, ``"eager"``).

    ``TypeError`` for anything else (a dict is not read as one), ``ValueError`` for an unknown name.
    """
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"no policy named {policy!r}; the policies: {', '.join(POLICIES)}")
        return POLICIES[policy]
    if not isinstance(policy, Policy):
        raise TypeError(
            f"policy must be 'fused', 'eager' or a Policy (attention_ref.testing.Policy(arithmetic=..., c=..., "
            f"floor=..., samples=...)), got {type(policy).__name__}"
        )
    return policy
