"""The bad-input table's calls: each row's valid call changed in one way (an array's dtype, shape or values, an
option, the backward's dout or cache), each marked with whether it must be refused."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from bad_input_spec import Array, Spec

import attention_ref as ar


@dataclass
class Case:
    """One call: the spec, what was changed, the inputs, and whether it must be refused."""

    spec: Spec
    what: str  # e.g. "x dtype int64"
    arg: str  # the argument that was changed (the error should name it)
    arrays: dict[str, Any]
    masks: dict[str, Any]
    options: dict[str, Any]
    params: Any
    must_fail: bool
    dout: Callable[[Array], Any] | None = None  # from the forward's output, the dout to pass (None: random)
    cache: Callable[[Any], Any] | None = None  # from the forward's cache, the cache to pass


def base_case(spec: Spec, seed: int = 0) -> Case:
    rng = np.random.default_rng(seed)
    arrays = {n: make(rng) for n, make in spec.arrays.items()}
    masks = {n: make(rng) for n, make in spec.masks.items()}
    params = spec.params() if spec.params else None
    return Case(spec, "valid", "", arrays, masks, dict(spec.options), params, must_fail=False)


def _cast(a: Any, dtype: Any) -> Any:
    return a.astype(dtype) if isinstance(a, np.ndarray) else a


def _with_float_dtype(case: Case, dtype: Any) -> Case:
    """Every floating array (and parameter) in ``dtype``."""
    arrays = {n: _cast(a, dtype) for n, a in case.arrays.items()}
    params = None if case.params is None else {k: _cast(v, dtype) for k, v in case.params.items()}
    return replace(case, arrays=arrays, params=params)


def _bfloat16() -> Any:
    try:
        import ml_dtypes

        return ml_dtypes.bfloat16
    except ImportError:  # pragma: no cover - ml_dtypes is a test dependency
        return None


def _poke(a: Array, value: float) -> Array:
    a = a.copy()
    a.reshape(-1)[0] = value
    return a


def cases(spec: Spec, seed: int = 0) -> Iterator[Case]:
    """Every one-change variation of ``spec``'s valid call (and the valid call itself)."""
    base = base_case(spec, seed)
    yield base
    yield replace(_with_float_dtype(base, np.float32), what="all float32")
    yield replace(_with_float_dtype(base, np.float16), what="all float16")
    if spec.large:
        big = _with_float_dtype(base, np.float16)
        big.arrays = {n: (a * 300).astype(np.float16) if n in spec.large else a for n, a in big.arrays.items()}
        # 300 in every entry (issue 23: q = k = 300, d = 4 overflows float16's logits)
        big.arrays = {
            n: np.full_like(a, 300) if n in spec.large and n in ("q", "k") else a for n, a in big.arrays.items()
        }
        yield replace(big, what="float16, large values", arg=spec.large[0])
    bf16 = _bfloat16()
    for name, a in base.arrays.items():
        bad_dtypes = [np.int64, np.int32, np.bool_, np.complex128] + ([bf16] if bf16 is not None else [])
        for dt in bad_dtypes:
            arrays = {**base.arrays, name: a.astype(dt) if dt is not np.bool_ else a > 0}
            accepted = np.dtype(dt).name in spec.extra_dtypes.get(name, ())
            yield replace(
                base,
                what=f"{name} dtype {np.dtype(dt).name}",
                arg=name,
                arrays=arrays,
                must_fail=not (spec.any_dtype or accepted),
            )
        if len(base.arrays) > 1 or base.params is not None:
            yield replace(
                base,
                what=f"{name} alone float32",
                arg=name,
                arrays={**base.arrays, name: a.astype(np.float32)},
                must_fail=name not in spec.mixed_ok,
            )
        # shapes: an empty axis, one too long, an extra axis, a 0-d array
        for axis in range(a.ndim):
            shape = list(a.shape)
            shape[axis] = 0
            yield replace(
                base,
                what=f"{name} axis {axis} empty",
                arg=name,
                arrays={**base.arrays, name: np.zeros(shape)},
                must_fail=_empty_mismatch(spec, name, axis),
            )
            shape[axis] = a.shape[axis] + 1
            grown = np.random.default_rng(seed).standard_normal(shape)
            yield replace(
                base,
                what=f"{name} axis {axis} grown",
                arg=name,
                arrays={**base.arrays, name: grown},
                must_fail=not _free(FREE_GROW, spec, name, axis),
            )
        yield replace(
            base,
            what=f"{name} 0-d",
            arg=name,
            arrays={**base.arrays, name: np.array(1.5)},
            must_fail=not _free(FREE_0D, spec, name, 0),
        )
        yield replace(
            base,
            what=f"{name} extra axis",
            arg=name,
            arrays={**base.arrays, name: a[None]},
            must_fail=not _free(FREE_EXTRA, spec, name, 0),
        )
        # values
        yield replace(base, what=f"{name} NaN", arg=name, arrays={**base.arrays, name: _poke(a, math.nan)})
        for value in (math.inf, -math.inf):
            yield replace(
                base,
                what=f"{name} {value}",
                arg=name,
                arrays={**base.arrays, name: _poke(a, value)},
                must_fail=name in spec.refuses_inf,
            )
        # not arrays
        required = name not in ("b", "weight", "bias") or (spec.name == "conv2d" and name == "weight")
        for label, value in (("None", None), ("list", a.tolist()), ("float", 1.5), ("str", "x")):
            if label == "None" and not required:
                continue
            yield replace(base, what=f"{name} {label}", arg=name, arrays={**base.arrays, name: value}, must_fail=True)
    for name, m in base.masks.items():
        yield replace(
            base, what=f"{name} float", arg=name, masks={**base.masks, name: m.astype(np.float64)}, must_fail=True
        )
        yield replace(
            base, what=f"{name} int", arg=name, masks={**base.masks, name: m.astype(np.int64)}, must_fail=True
        )
        yield replace(
            base,
            what=f"{name} grown",
            arg=name,
            masks={**base.masks, name: np.ones((*m.shape[:-1], m.shape[-1] + 1), bool)},
            must_fail=True,
        )
        yield replace(base, what=f"{name} all False", arg=name, masks={**base.masks, name: np.zeros_like(m)})
    for name, values in spec.bad.items():
        for value in values:
            yield replace(
                base, what=f"{name}={value!r}", arg=name, options={**base.options, name: value}, must_fail=True
            )
    if spec.params is not None:
        p = base.params
        first = sorted(p)[0]
        required = spec.required_param
        yield replace(base, what="params None", arg="params", params=None, must_fail=True)
        yield replace(base, what="params list", arg="params", params=list(p.values()), must_fail=True)
        yield replace(
            base,
            what=f"params {first} float32",
            arg=first,
            params={**p, first: p[first].astype(np.float32)},
            must_fail=True,
        )
        yield replace(
            base, what=f"params {first} int", arg=first, params={**p, first: p[first].astype(np.int64)}, must_fail=True
        )
        yield replace(base, what=f"params {first} None", arg=first, params={**p, first: None}, must_fail=True)
        infinite = {**p, first: _poke(p[first], math.inf)}
        yield replace(base, what=f"params {first} inf", arg=first, params=infinite, must_fail=bool(spec.refuses_inf))
        yield replace(base, what=f"params {first} NaN", arg=first, params={**p, first: _poke(p[first], math.nan)})
        yield replace(
            base,
            what=f"params missing {required}",
            arg=required,
            params={k: v for k, v in p.items() if k != required},
            must_fail=True,
        )
    if spec.backward is not None:
        for dt in (np.int64, np.bool_, np.float32, np.complex128):
            yield replace(
                base,
                what=f"dout {np.dtype(dt).name}",
                arg="dout",
                dout=lambda o, dt=dt: (
                    (o > 0) if dt is np.bool_ else (o * 3).astype(dt) if dt is np.int64 else o.astype(dt)
                ),
                must_fail=True,
            )
        yield replace(
            base,
            what="dout grown",
            arg="dout",
            dout=lambda o: np.ones((*o.shape[:-1], o.shape[-1] + 1)),
            must_fail=True,
        )
        yield replace(base, what="dout 0-d", arg="dout", dout=lambda o: np.array(1.0), must_fail=True)
        yield replace(base, what="dout None", arg="dout", dout=lambda o: None, must_fail=True)
        yield replace(base, what="dout list", arg="dout", dout=lambda o: o.tolist(), must_fail=True)
        yield replace(base, what="dout NaN", arg="dout", dout=lambda o: _poke(np.ones_like(o), math.nan))
        yield replace(base, what="cache None", arg="cache", cache=lambda c: None, must_fail=True)
        yield replace(base, what="cache str", arg="cache", cache=lambda c: "cache", must_fail=True)
        yield replace(
            base,
            what="cache of softmax",
            arg="cache",
            cache=lambda c: ar.softmax_forward(np.ones((2, 2)))[1],
            must_fail=spec.name != "softmax",
        )


def _empty_mismatch(spec: Spec, name: str, axis: int) -> bool:
    """Whether emptying ``axis`` of ``name`` alone makes attention's inputs disagree (so it must be refused).

    Elsewhere an empty axis is a value case: the result, or a clear error.
    """
    if spec.name in ("attention", "chunked_attention", "linear_attention"):
        # q's N, v's dv may be 0 on their own; batch, d and M must agree between the arrays
        return (name, axis) in {
            ("q", 0),
            ("q", 2),
            ("k", 0),
            ("k", 1),
            ("k", 2),
            ("v", 0),
            ("v", 1),
            ("bias", 0),
            ("bias", 1),
        }
    return False


ALL = "all"
#: (array, axis) whose growth by one leaves a valid call (everything else must be refused)
FREE_GROW: dict[str, Any] = {
    **dict.fromkeys(("erf", "erfc", "gelu", "silu", "merge_heads", "merge_heads_plain"), ALL),
    **dict.fromkeys(("upsample_nearest", "timestep_embedding"), ALL),
    "linear": {("x", 0), ("x", 1)},
    "group_norm": {("x", 0), ("x", 1), ("x", 2)},
    "layer_norm": {("x", 0), ("x", 1)},
    "split_heads": {("x", 0), ("x", 1)},
    "split_heads_plain": {("x", 0), ("x", 1)},
    "conv2d": {("x", 0), ("x", 1), ("x", 2), ("weight", 0), ("weight", 1)},
    "geglu": {("x", 0)},
    "avg_pool": {("x", 0), ("x", 3)},
    "attention": {("v", 2)},
    "chunked_attention": {("v", 2)},
    "linear_attention": {("q", 1), ("v", 2)},
    "window_attention": {("v", 3)},
    "neighborhood_attention": {("v", 3)},
    "attention_layer": {("h", 0), ("h", 1)},
    "self_attention": {("x", 0), ("x", 1), ("x", 2)},
    "cross_attention": {("x", 1), ("x", 2), ("context", 1)},
    "geglu_ff": {("x", 0), ("x", 1)},
    "transformer_block": {("h", 1), ("context", 1)},
    "spatial_transformer": {("x", 1), ("x", 2), ("context", 1)},
    "res_block": {("x", 1), ("x", 2)},
    "rms_norm": {("x", 0), ("x", 1)},
    "rope_angles": {("positions", 0)},
    "rope": {("x", 0), ("x", 1)},
    "patchify": {("x", 0), ("x", 3)},
    "unpatchify": {("tokens", 0)},
    "joint_attention_single": {("x", 0), ("x", 1)},
    "flux_rope_tables": {("txt_ids", 0), ("img_ids", 0)},
}
#: arrays that may take one more leading axis
FREE_EXTRA: dict[str, Any] = {
    **dict.fromkeys(("softmax", "logsumexp", "erf", "erfc", "gelu", "silu", "geglu"), ALL),
    **dict.fromkeys(("merge_heads", "merge_heads_plain", "split_heads", "split_heads_plain"), ALL),
    **dict.fromkeys(("linear", "layer_norm", "group_norm", "geglu_ff"), frozenset({("x", 0)})),
    **dict.fromkeys(("attention", "chunked_attention"), frozenset({("bias", 0)})),
    **dict.fromkeys(("rms_norm", "rope", "rope_halves"), frozenset({("x", 0)})),
}
#: arrays that may be 0-d
FREE_0D: dict[str, Any] = {
    **dict.fromkeys(("erf", "erfc", "gelu", "silu"), ALL),
    **dict.fromkeys(("attention", "chunked_attention"), frozenset({("bias", 0)})),
}


def _free(table: Mapping[str, Any], spec: Spec, name: str, axis: int) -> bool:
    entry = table.get(spec.name, set())
    return entry == ALL or (name, axis) in entry
