"""Test vectors for implementations outside Python: every case as an ``.npz``, plus a JSON index.

``write_vectors(dir, dtype)`` writes, for each case of the battery,
``<dir>/<NN>_<name>.npz`` holding

* the inputs exactly as the harness passes them: ``q``, ``k``, ``v``, ``dout`` and
  (when present) ``bias`` — in the dtype itself for float16/float32/float64; for
  bfloat16, which ``.npz`` cannot name, as float32 arrays whose values are all
  exactly bfloat16 numbers (narrowing them to bfloat16 is exact); ``mask`` (bool,
  True = may attend) when present; ``scale`` (0-d float64; NaN means "the default,
  1/sqrt(d)"). ``mask`` and ``bias`` are stored in their own shapes and broadcast to
  the logits' ``(..., N, M)`` by NumPy's rules: aligned from the right, an axis of
  size 1 (or a missing leading axis) repeated — key padding is ``(B, 1, 1, M)``,
  a causal mask ``(N, M)``;
* the float64 reference ``out``, ``dq``, ``dk``, ``dv`` computed from those inputs;
* the allowed error of every entry of each output: ``allowed_out``, ``allowed_dq``, ... (arrays shaped like
  the output: one number per group of entries — for ``dk`` the keys that are some row's largest logit may
  get more, for the residue eager autograd leaves there — the same number elsewhere).

and ``<dir>/index.json`` lists the cases (file, shapes, scale, description, allowed
errors, the features of :attr:`~attention_ref.testing.Case.features` and the number of
fully masked query rows) and the tolerance policy. An implementation passes a case when, for each
output ``X`` and each entry, ``|X − X_ref| − spacing(X)/2 ≤ allowed_X`` (the left side taken as 0 when
negative), with ``X`` computed in the dtype and converted to float64 for the comparison, ``spacing(X)``
the dtype's spacing just above ``|X|`` (``nextafter(|X|, inf) − |X|`` in the dtype: the output's own last
rounding is not counted), and it has no NaN/Inf where ``X_ref`` is finite (fully masked query rows — a
query whose mask row, broadcast, holds no True — have ``X_ref = 0`` in ``out`` and ``dq``). These are the
same numbers :func:`~attention_ref.testing.check_attention` uses.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .cases import Case, select_cases
from .dtypes import dtype_name, eps
from .tolerance import DEFAULT_POLICY, OUTPUTS, Policy, check_policy, reference

__all__ = ["FORMAT_VERSION", "load_vectors", "write_vectors"]

FORMAT_VERSION = 2  # 2: allowed errors per entry, the output's own last rounding deducted, the policy named


def _file_name(i: int, name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()
    return f"{i:02d}_{slug}.npz"


def _storable(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if a.dtype.name == "bfloat16" else a


def write_vectors(
    out_dir: str | Path,
    dtype: Any = "float32",
    *,
    cases: Sequence[Case | str] | None = None,
    policy: Policy | str = DEFAULT_POLICY,
) -> Path:
    """Write every case (or ``cases``) for ``dtype`` into ``out_dir``, judged under ``policy`` (``"fused"``, the
    default, or ``"eager"``); returns the path of ``index.json``."""
    dtype = dtype_name(dtype)
    policy = check_policy(policy)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, case in enumerate(select_cases(cases)):
        ref = reference(case, dtype, policy)
        arrays: dict[str, np.ndarray] = {}
        for n in ("q", "k", "v", "dout", "bias"):
            if ref.inputs[n] is not None:
                arrays[n] = _storable(ref.inputs[n])
        if ref.inputs["mask"] is not None:
            arrays["mask"] = ref.inputs["mask"]
        scale = ref.inputs["scale"]
        arrays["scale"] = np.array(np.nan if scale is None else scale, dtype=np.float64)
        allowed = {}
        for o in OUTPUTS:
            arrays[o] = ref.exact[o]
            per_entry = np.zeros(ref.exact[o].shape)
            for group in ref.groups[o]:
                limit = policy.allowed(o, group.magnitude, group.kernel_error, dtype)[0]
                per_entry = np.where(True if group.where is None else group.where, limit, per_entry)
            arrays[f"allowed_{o}"] = per_entry
            allowed[o] = float(np.max(per_entry)) if per_entry.size else 0.0
        name = _file_name(i, case.name)
        np.savez(out / name, **arrays)
        entries.append(
            {
                "name": case.name,
                "file": name,
                "description": case.description,
                "shapes": {n: list(a.shape) for n, a in arrays.items() if a.ndim > 0},
                "scale": scale,
                "default_scale": scale is None,
                "has_mask": "mask" in arrays,
                "has_bias": "bias" in arrays,
                "features": sorted(case.features),
                "fully_masked_rows": int(np.sum(case.dead_rows)),
                "allowed": allowed,
            }
        )
    index = {
        "format": FORMAT_VERSION,
        "producer": "attention_ref.testing.write_vectors",
        "dtype": dtype,
        "eps": eps(dtype),
        "input_storage": "float32 holding exact bfloat16 values" if dtype == "bfloat16" else dtype,
        "convention": (
            "logits = scale * q @ k^T + bias over the last two axes; mask True = may attend; "
            "weights = softmax over allowed keys (a row with none gives 0); out = weights @ v; "
            "dq, dk, dv = gradients of sum(out * dout); scale NaN in a file = 1/sqrt(d)"
        ),
        "broadcasting": (
            "mask and bias are stored in their own shapes and broadcast to the logits' (..., N, M) by NumPy's "
            "rules: shapes aligned from the right, axes of size 1 and missing leading axes repeated "
            "(key padding (B, 1, 1, M), causal (N, M), a per-head bias (heads, N, M))"
        ),
        "fully_masked_rows": (
            "a query row whose broadcast mask row holds no True attends to nothing: out and dq are 0 there; "
            "each case gives its count of such rows (over all leading dims) in 'fully_masked_rows'"
        ),
        "pass_rule": (
            "for X in out, dq, dk, dv and every entry: max(|X - X_ref| - spacing(X)/2, 0) <= allowed_X (the array "
            "of the same shape), spacing(X) = nextafter(|X|, inf) - |X| in the dtype (the output's own last "
            "rounding is not counted); and no NaN/Inf where X_ref is finite"
        ),
        "policy": {
            "name": policy.name,
            "arithmetic": policy.arithmetic,
            "c": dict(policy.c),
            "floor": dict(policy.floor),
            "samples": policy.samples,
        },
        "cases": entries,
    }
    path = out / "index.json"
    path.write_text(json.dumps(index, indent=1) + "\n")
    return path


def load_vectors(in_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a directory written by :func:`write_vectors`.

    Returns ``(index, cases)``: the parsed ``index.json`` and, per case, a dict with the index
    entry's keys plus ``"arrays"`` (name → NumPy array, inputs narrowed back to bfloat16 where
    the dtype is bfloat16) and ``"scale"`` (``None`` for the default).
    """
    base = Path(in_dir)
    index = json.loads((base / "index.json").read_text())
    if index.get("format") != FORMAT_VERSION:
        raise ValueError(f"{base}: unsupported vector format {index.get('format')!r}")
    from .dtypes import numpy_dtype

    dtype = numpy_dtype(index["dtype"])
    cases = []
    for entry in index["cases"]:
        with np.load(base / entry["file"]) as data:
            arrays = {n: data[n] for n in data.files}
        for n in ("q", "k", "v", "dout", "bias"):
            if n in arrays:
                arrays[n] = arrays[n].astype(dtype)
        scale = float(arrays.pop("scale"))
        cases.append({**entry, "arrays": arrays, "scale": None if math.isnan(scale) else scale})
    return index, cases
