"""Parameter dictionaries of the blocks: random initialisation, validation, prefixes, gradients.

A block's parameters are a flat ``dict`` from names (``"q.weight"``, ``"norm.bias"``,
``"blocks.0.attn1.k.weight"``) to arrays. Linear weights are stored ``(in, out)``,
so ``y = x @ W + b``. A missing bias key means the layer has no bias. A block's backward
returns its gradients under the same names (:func:`add_grads`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .._checks import check_positive_int, dtype_name, require_array
from ..backend import Array, namespace

__all__ = [
    "add_grads",
    "check_keys",
    "check_param_dtypes",
    "check_params",
    "check_sizes",
    "init_conv",
    "init_linear",
    "init_norm",
    "prefixed",
    "sub_params",
]


def _dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.kind != "f":
        raise TypeError(f"parameters need a real floating dtype, got {dt}")
    return dt


def init_linear(
    params: dict[str, np.ndarray],
    name: str,
    n_in: int,
    n_out: int,
    *,
    bias: bool,
    rng: np.random.Generator,
    dtype: Any,
) -> None:
    """Add ``name.weight`` ``(n_in, n_out)`` and (when ``bias``) ``name.bias`` ``(n_out,)``.

    Both are drawn from ``U(−1/√n_in, 1/√n_in)``, PyTorch's default for ``nn.Linear``
    and 1×1 convolutions, so outputs start at unit scale.
    """
    bound = 1.0 / math.sqrt(n_in)
    dt = _dtype(dtype)
    params[f"{name}.weight"] = rng.uniform(-bound, bound, (n_in, n_out)).astype(dt)
    if bias:
        params[f"{name}.bias"] = rng.uniform(-bound, bound, (n_out,)).astype(dt)


def init_conv(
    params: dict[str, np.ndarray],
    name: str,
    k: int,
    c_in: int,
    c_out: int,
    *,
    rng: np.random.Generator,
    dtype: Any,
    zero: bool = False,
) -> None:
    """Add a ``k×k`` convolution's ``name.weight`` ``(k, k, c_in, c_out)`` and ``name.bias`` ``(c_out,)``.

    Both from ``U(−1/√fan_in, 1/√fan_in)`` with ``fan_in = k·k·c_in`` (PyTorch's default for ``nn.Conv2d``),
    or zeros when ``zero`` (nothing is drawn then): a residual branch that starts at zero.
    """
    dt = _dtype(dtype)
    if zero:
        params[f"{name}.weight"] = np.zeros((k, k, c_in, c_out), dtype=dt)
        params[f"{name}.bias"] = np.zeros(c_out, dtype=dt)
        return
    bound = 1.0 / math.sqrt(k * k * c_in)
    params[f"{name}.weight"] = rng.uniform(-bound, bound, (k, k, c_in, c_out)).astype(dt)
    params[f"{name}.bias"] = rng.uniform(-bound, bound, (c_out,)).astype(dt)


def init_norm(params: dict[str, np.ndarray], name: str, channels: int, *, dtype: Any) -> None:
    """Add ``name.weight`` = 1 and ``name.bias`` = 0, ``(channels,)``: a norm that starts as plain standardisation."""
    dt = _dtype(dtype)
    params[f"{name}.weight"] = np.ones(channels, dtype=dt)
    params[f"{name}.bias"] = np.zeros(channels, dtype=dt)


def check_keys(params: Mapping[str, Array], *, required: Iterable[str], optional: Iterable[str], where: str) -> None:
    """``ValueError`` naming the keys that are missing from ``params`` or that the block does not know."""
    required, optional = list(required), list(optional)
    missing = [k for k in required if k not in params]
    unknown = sorted(set(params) - set(required) - set(optional))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unknown:
            parts.append(f"unknown {unknown}")
        raise ValueError(f"{where} params: {'; '.join(parts)} (expected {required}, optionally {optional})")


def check_sizes(where: str, optional: tuple[str, ...] = (), **sizes: Any) -> None:
    """``TypeError`` / ``ValueError`` naming the first size that is not an int ≥ 1 (those in ``optional`` may be
    ``None``: not given)."""
    for name, value in sizes.items():
        if value is not None or name not in optional:
            check_positive_int(name, value, where)


def check_params(params: Any, where: str) -> None:
    """``TypeError`` unless ``params`` is a mapping from names to arrays; ``ValueError`` for an infinite entry.

    Called first by every block, so that ``params=None``, a list or a ``None`` entry is named rather than
    failing inside. An infinite parameter is refused as an infinite input is (NaN propagates).
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"{where}: params must be a mapping of names to arrays, got {type(params).__name__}")
    for name, p in params.items():
        require_array(f"{where}: params[{name!r}]", p)
    for name, p in params.items():
        xp = namespace(p)
        if _is_floating(p) and bool(xp.any(xp.isinf(p))):
            raise ValueError(
                f"{where}: params[{name!r}] has an infinite entry; parameters must be finite (NaN is allowed: "
                "it propagates)"
            )


def _is_floating(a: Array) -> bool:
    return dtype_name(a.dtype) in ("float16", "float32", "float64")


def check_param_dtypes(x: Array, params: Mapping[str, Array], where: str, *, name: str = "the input") -> None:
    """``TypeError`` unless every parameter has ``x``'s dtype (nothing is promoted silently); ``name`` is how
    the message calls ``x``."""
    for key, p in params.items():
        if p.dtype != x.dtype:
            raise TypeError(f"{where}: {key} has dtype {p.dtype} but {name} has dtype {x.dtype}")


def sub_params(params: Mapping[str, Array], prefix: str) -> dict[str, Array]:
    """The entries of ``params`` under ``prefix`` (e.g. ``"attn1."``), with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


def prefixed(grads: Mapping[str, Array], prefix: str) -> dict[str, Array]:
    """``grads`` with ``prefix`` put in front of every key (the inverse of :func:`sub_params`)."""
    return {prefix + k: v for k, v in grads.items()}


#: A layer's own names for its gradients → the names of its parameters (linear_backward says W and b).
_GRAD_NAMES = {"W": "weight", "b": "bias"}


def add_grads(grads: dict[str, Array], name: str, g: Mapping[str, Array]) -> Array:
    """Store a layer's parameter gradients ``g`` in ``grads`` under ``name`` (``name.weight``, ``name.bias``, as
    the parameters are named); return the layer's input gradient ``g["x"]``."""
    for key, value in g.items():
        if key != "x":
            grads[f"{name}.{_GRAD_NAMES.get(key, key)}"] = value
    return g["x"]
