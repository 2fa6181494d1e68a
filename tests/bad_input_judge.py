"""Running a call of the bad-input table and judging what it gives: a clear error (a documented exception raised by
attention_ref's own code, naming the argument), or a value equal to the same call in float64."""

from __future__ import annotations

import dis
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bad_input_cases import Case

import attention_ref as ar

#: the exception types the documentation promises (docs/numerics.md, "Errors")
DOCUMENTED = (ValueError, TypeError, MemoryError)
PACKAGE = Path(ar.__file__).parent



@dataclass
class Verdict:
    kind: str  # "correct" | "clear error" | "vague error" | "silent wrong" | "internal error"
    detail: str


def _call(case: Case, arrays: dict[str, Any], params: Any) -> Any:
    spec = case.spec
    args = [arrays[n] for n in spec.positional if n in arrays]
    kwargs = {n: a for n, a in arrays.items() if n not in spec.positional}
    kwargs.update(case.masks)
    kwargs.update(case.options)
    if spec.params is not None:
        # positional parameters come before params for the blocks
        args.append(params)
    return spec.forward(*args, **kwargs)


def call(case: Case) -> Any:
    """Run the forward of ``case`` on its own inputs: ``(out, cache)``, or the output alone."""
    return _call(case, case.arrays, case.params)


def _float64(case: Case) -> tuple[dict[str, Any], Any]:
    """The case's inputs with every numeric array in float64 (what the result is compared with)."""

    def f64(a: Any) -> Any:
        if isinstance(a, np.ndarray) and (a.dtype.kind in "fiub" or a.dtype.name == "bfloat16"):
            return a.astype(np.float64)
        return a

    arrays = {n: f64(a) for n, a in case.arrays.items()}
    params = None if case.params is None else {k: f64(v) for k, v in case.params.items()}
    return arrays, params


def _deliberate(err: BaseException) -> bool:
    """Raised by a ``raise`` statement in attention_ref's own code (not by NumPy, not by a failed operation).

    Read from the bytecode of the innermost frame (the instruction that raised is ``RAISE_VARARGS``), so that
    it does not depend on the source file matching the running code.
    """
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    if not Path(code.co_filename).resolve().is_relative_to(PACKAGE.resolve()):
        return False
    raising = next((i for i in dis.get_instructions(code) if i.offset == tb.tb_lasti), None)
    return raising is not None and raising.opname == "RAISE_VARARGS"


def classify_error(err: BaseException, arg: str) -> Verdict:
    text = f"{type(err).__name__}: {err}"
    if not isinstance(err, DOCUMENTED) or not _deliberate(err):
        where = traceback.extract_tb(err.__traceback__)[-1]
        return Verdict("internal error", f"{text} (at {Path(where.filename).name}:{where.lineno})")
    names = {"dout": ("dout", "dy", "dh_out"), "cache": ("cache", "Cache")}.get(arg, (arg, arg.split(".")[0]))
    if arg and not any(n in str(err) for n in names):
        return Verdict("vague error", text)
    return Verdict("clear error", text)


def _tolerance(dtype: Any) -> float:
    return {"float16": 3e-2, "float32": 2e-4}.get(np.dtype(dtype).name, 1e-9)


def _compare(got: Any, want: Any, dtype: Any, finite_inputs: bool, magnitude: float = 1.0) -> str | None:
    """None when ``got`` equals ``want`` (float64) to the dtype's tolerance, else what differs."""
    if isinstance(want, tuple):  # several outputs: each (None where the forward gives none)
        if not isinstance(got, tuple) or len(got) != len(want):
            return f"returned a {type(got).__name__}, not {len(want)} outputs"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            if (g is None) != (w is None):
                return f"output {i}: {g!r:.40} where float64 gives {w!r:.40}"
            problem = None if w is None else _compare(g, w, dtype, finite_inputs, magnitude)
            if problem:
                return f"output {i}: {problem}"
        return None
    if isinstance(want, dict):  # a parameter dict: every entry
        if not isinstance(got, dict) or set(got) != set(want):
            return "a different set of keys"
        problems = [_compare(got[k], want[k], None, finite_inputs) for k in sorted(want)]
        return next((p for p in problems if p), None)
    if isinstance(got, np.generic):  # NumPy's 0-d results come back as scalars
        got = np.asarray(got)
    if not isinstance(got, np.ndarray):
        return f"returned a {type(got).__name__}, not an array"
    if got.shape != want.shape:
        return f"shape {got.shape}, expected {want.shape}"
    if dtype is None:  # a function that only moves entries: any dtype, the same entries
        return (
            None if np.array_equal(got, want.astype(got.dtype), equal_nan=got.dtype.kind in "fc") else "moved wrongly"
        )
    if got.dtype.kind != "f" or (dtype is not None and got.dtype != dtype):
        return f"dtype {got.dtype}, expected {np.dtype(dtype) if dtype is not None else 'floating'}"
    g, w = got.astype(np.float64), want.astype(np.float64)
    bad_nan = np.isnan(g) != np.isnan(w)
    if bad_nan.any():
        return (
            f"NaN where the float64 result has {w[bad_nan][:3]}"
            if np.isnan(g[bad_nan]).any()
            else "a number where float64 gives NaN"
        )
    limit = float(np.finfo(got.dtype).max)
    both = ~np.isnan(w)
    overflow = np.isinf(g) & (np.abs(w) >= limit)  # a value beyond the dtype's range is inf there: fine
    ok_inf = np.isinf(w) & (g == w)
    check = both & ~overflow & ~ok_inf
    if np.isinf(g[check]).any():
        return "inf where the float64 result is finite"
    scale = max(magnitude, float(np.max(np.abs(w[check]), initial=0.0)))
    err = float(np.max(np.abs(g[check] - w[check]), initial=0.0))
    if err > _tolerance(got.dtype) * scale:
        return f"off by {err:.3g} (scale {scale:.3g})"
    if finite_inputs and not np.all(np.isfinite(g)) and not overflow.any():
        return "non-finite output from finite inputs"
    return None


def _finite(case: Case) -> bool:
    def ok(a: Any) -> bool:
        return not isinstance(a, np.ndarray) or a.dtype.kind not in "fc" or bool(np.all(np.isfinite(a)))

    return all(ok(a) for a in case.arrays.values()) and (
        case.params is None or not isinstance(case.params, dict) or all(ok(v) for v in case.params.values())
    )


def run_case(case: Case) -> Verdict:
    """Run ``case`` (forward, then backward) and judge it; warnings turned into errors count as errors."""
    spec = case.spec
    with warnings.catch_warnings():
        # finite inputs must not warn; NaN and inf may (as NumPy's own arithmetic does), unless refused
        warnings.simplefilter("error" if _finite(case) else "ignore")
        try:
            result = _call(case, case.arrays, case.params)
        except Exception as err:
            return classify_error(err, case.arg)
        out, cache = result if spec.returns_pair else (result, None)
        grads = None
        if spec.backward is not None:
            dout = _douts(case, out)
            try:
                grads = spec.backward(dout, case.cache(cache) if case.cache else cache)
            except Exception as err:
                if case.dout is None and case.cache is None:
                    return classify_error(err, case.arg)
                return classify_error(err, "dout" if case.dout else "cache")
    if case.must_fail:
        return Verdict("silent wrong", f"returned instead of refusing ({case.what})")
    # the same call in float64
    arrays64, params64 = _float64(case)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = _call(case, arrays64, params64)
            ref_out, ref_cache = ref if spec.returns_pair else (ref, None)
            ref_grads = None
            if grads is not None:
                d = each(lambda a: np.asarray(a, dtype=np.float64), _douts(case, out))
                ref_grads = spec.backward(d, ref_cache)
    except Exception as err:
        return Verdict("silent wrong", f"returned, but the float64 call fails: {type(err).__name__}: {err}")
    dtype = _result_dtype(case)
    finite = _finite(case) and (case.dout is None or "NaN" not in case.what)
    problem = _compare(out, each(np.asarray, ref_out), dtype, finite)
    if problem is None and grads is not None:
        for name in sorted(ref_grads):
            if name not in grads:
                problem = f"gradient {name!r} missing"
                break
            problem = _compare(grads[name], np.asarray(ref_grads[name]), _grad_dtype(case), finite, _magnitude(case))
            if problem:
                problem = f"gradient {name}: {problem}"
                break
    if problem:
        return Verdict("silent wrong", problem)
    return Verdict("correct", "")


def each(f: Callable[[Any], Any], out: Any) -> Any:
    """``f`` of each output of a forward that returns a tuple (``None`` kept), or of its one output."""
    if isinstance(out, tuple):
        return tuple(None if o is None else f(o) for o in out)
    if isinstance(out, dict):
        return out
    return f(out)


def _douts(case: Case, out: Any) -> Any:
    """The dout(s) to pass: the case's change of each output, or a seeded random array of its shape and dtype."""
    rng = np.random.default_rng(1)
    if case.dout:
        return each(lambda o: case.dout(np.asarray(o)), out)
    return each(lambda o: rng.standard_normal(np.shape(o)).astype(np.asarray(o).dtype), out)


def _magnitude(case: Case) -> float:
    """The largest finite input entry (at least 1): gradients are products with the inputs, rounded at that scale."""
    big = [
        float(np.max(np.abs(a[np.isfinite(a)]), initial=1.0))
        for a in case.arrays.values()
        if isinstance(a, np.ndarray) and a.dtype.kind == "f"
    ]
    return max([1.0, *big])


def _result_dtype(case: Case) -> Any:
    if case.spec.dtype_option is not None:
        return np.dtype(case.options[case.spec.dtype_option])
    return _grad_dtype(case)


def _grad_dtype(case: Case) -> Any:
    """The dtype of the gradients: that of the first floating array (the forward's input)."""
    floats = [a.dtype for a in case.arrays.values() if isinstance(a, np.ndarray) and a.dtype.kind == "f"]
    if case.spec.any_dtype:
        return None
    return floats[0] if floats else None
