"""The model families the trace knows: which attention modules each one takes and how it reads their calls.

A family (:class:`Family`) claims a module class (diffusers' ``Attention`` with a given processor,
``FluxAttention``, ``WanAttention``), reads its parameters into the reference's form, and turns one call's
inputs into maps (:meth:`Family.record`) with the arithmetic of :mod:`..weights`. The first family in
:data:`FAMILIES` that claims a module takes it.
"""

from __future__ import annotations

from typing import Any

from .base import Family, argument
from .flux import FluxAttention
from .sana import SanaLinearAttention
from .sd3 import SD3Attention
from .standard import StandardAttention
from .wan import WanAttention

__all__ = ["FAMILIES", "Family", "argument", "family_of"]

FAMILIES: tuple[Family, ...] = (SanaLinearAttention(), SD3Attention(), StandardAttention(), FluxAttention(),
                                WanAttention())  # fmt: skip


def family_of(module: Any) -> Family | None:
    """The family that takes ``module``, or ``None`` when the trace does not know it."""
    for family in FAMILIES:
        if family.claims(module):
            return family
    return None
