"""CompVis's VAE attention block, ``AttnBlock`` (``ldm/modules/diffusionmodules/model.py``).

Its layers: ``norm`` (GroupNorm, 32 groups, eps 1e-6, affine), ``q``, ``k``, ``v``
and ``proj_out`` (1×1 ``Conv2d`` with bias, ``C → C``). Its forward is one-head
self-attention with scale ``C^{-1/2}`` and a residual — exactly
:func:`attention_ref.self_attention_forward` with ``heads=1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._arrays import as_numpy, check_dtype, require_keys, weight_in_out

__all__ = ["from_ldm_attnblock"]

_LAYERS = {"q": "q", "k": "k", "v": "v", "proj_out": "out"}


def from_ldm_attnblock(
    state_dict: Mapping[str, Any], *, groups: int = 32, prefix: str = "", dtype: Any | None = "float64"
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reference parameters and options from the state dict of a CompVis ``AttnBlock``.

    Inputs:
        state_dict: names → torch tensors or NumPy arrays (e.g. ``block.state_dict()``, or a
            checkpoint's entries): ``norm.weight``, ``norm.bias``, ``q.weight`` ``(C, C, 1, 1)``,
            ``q.bias``, likewise ``k``, ``v``, ``proj_out``.
        groups: the group norm's groups (CompVis's ``Normalize`` uses 32).
        prefix: prepended to every name, e.g. ``"encoder.mid.attn_1."``.
        dtype: of the returned arrays (float16, float32 or float64); ``None`` keeps the checkpoint's.

    Returns:
        ``(params, options)`` with ``y, cache = attention_ref.self_attention_forward(x, params, **options)``
        for ``x`` the block's input permuted to ``(B, H, W, C)``.
    """
    dtype = check_dtype(dtype, "from_ldm_attnblock")
    names = ["norm.weight", "norm.bias"] + [f"{n}.{p}" for n in _LAYERS for p in ("weight", "bias")]
    require_keys(state_dict, [prefix + n for n in names], "from_ldm_attnblock")
    params = {
        "norm.weight": as_numpy(state_dict[prefix + "norm.weight"], dtype),
        "norm.bias": as_numpy(state_dict[prefix + "norm.bias"], dtype),
    }
    for theirs, ours in _LAYERS.items():
        params[f"{ours}.weight"] = weight_in_out(state_dict[f"{prefix}{theirs}.weight"], dtype, prefix + theirs)
        params[f"{ours}.bias"] = as_numpy(state_dict[f"{prefix}{theirs}.bias"], dtype)
    options = {"heads": 1, "groups": groups, "eps": 1e-6, "residual": True, "rescale": 1.0, "scale": None}
    return params, options
