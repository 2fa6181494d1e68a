"""A row of the bad-input table (:mod:`bad_input_table`): one public forward, its valid inputs, the options it
takes and the values of them that must be refused; the makers of valid inputs the rows share."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Array = np.ndarray


@dataclass(frozen=True)
class Spec:
    """One public forward (and its backward), with valid inputs.

    arrays: the floating array arguments, name → a maker ``rng -> array`` (float64); passed by name, or
        positionally when listed in ``positional``.
    masks: boolean array arguments, name → maker.
    options: the other arguments' valid values; ``bad``: option → values that must be refused.
    params: a maker of a block's parameter dict (float64), passed as ``params``.
    refuses_inf: array arguments in which an infinite entry must be refused (attention and the blocks).
    any_dtype: the function only moves entries (split/merge heads): integer inputs are fine.
    extra_dtypes: array → the dtypes it may have besides float16/32/64 (rope_angles' integer positions).
    mixed_ok: arrays that may have another floating dtype than the others (rope's cos and sin tables, which
        are cast to the compute dtype).
    dtype_option: the option that sets the result's dtype (rope_angles' ``dtype``); by default the result has
        the first floating array's dtype.

    A forward may return a tuple of arrays (rope_angles' ``(cos, sin)``, joint attention's ``(y, y_context)``,
    ``None`` for an absent one); its backward then takes a tuple of douts, one per output.
    """

    name: str
    forward: Callable[..., Any]
    arrays: Mapping[str, Callable[[np.random.Generator], Array]]
    positional: tuple[str, ...] = ()
    masks: Mapping[str, Callable[[np.random.Generator], Array]] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    bad: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    params: Callable[[], dict[str, Array]] | None = None
    backward: Callable[[Any, Any], Any] | None = None
    returns_pair: bool = True  # forward returns (out, cache); False: the output alone
    refuses_inf: tuple[str, ...] = ()
    any_dtype: bool = False
    large: tuple[str, ...] = ()  # arrays scaled by 300 in the float16 "large values" case
    required_param: str = "out.weight"  # a parameter the block cannot do without
    extra_dtypes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    mixed_ok: tuple[str, ...] = ()
    dtype_option: str | None = None


def randn(*shape: int) -> Callable[[np.random.Generator], Array]:
    return lambda rng: rng.standard_normal(shape)


def bools(*shape: int) -> Callable[[np.random.Generator], Array]:
    def make(rng: np.random.Generator) -> Array:
        m = rng.random(shape) < 0.7
        m[..., 0] = True  # no fully masked row (those are tested elsewhere)
        return m

    return make


def jittered(params: dict[str, Array]) -> dict[str, Array]:
    rng = np.random.default_rng(7)
    return {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}


INTS = (0, -1, 2.0, True, None, "2", 10**9)  # bad values for a positive int option (2 divides every size here)
INTS_3 = (*INTS, 3)  # and 3, which divides none
EPS_BAD = (-1.0, math.nan, math.inf, None, "1e-5", True)
SCALE_BAD = (math.nan, math.inf, "0.5", True, (1.0,))
AXIS_BAD = (2, -3, None, 1.0, (0, 1), True, "0")
SIZES_BAD = (0, -1, 2.0, True, None, "2")  # bad values for a size of an init
