r"""OpenAI's ``AttentionBlock`` (``guided_diffusion/unet.py``; also improved-diffusion, GLIDE without text).

Layers: ``norm`` (GroupNorm32: 32 groups, eps 1e-5, affine), ``qkv`` (1×1 ``Conv1d``,
``C → 3C``, bias), ``proj_out`` (1×1 ``Conv1d``, ``C → C``, bias; zero-initialised).
The attention scales q and k each by ``ch^{-1/4}`` (``ch = C/heads``), i.e. the
logits by ``1/sqrt(ch)`` — the reference's default.

The fused ``qkv`` output has ``3C`` channels, ordered in one of two ways:

* ``order="legacy"`` (``QKVAttentionLegacy``, the default of ``AttentionBlock``): split heads
  first, then q/k/v — channel ``head·3·ch + part·ch + i``;
* ``order="new"`` (``QKVAttention``, ``use_new_attention_order=True``): split q/k/v first,
  then heads — channel ``part·C + head·ch + i``;

with ``part`` 0, 1, 2 for q, k, v. Either way, channel ``head·ch + i`` of the
reference's Q (K, V) is entry ``i`` of head ``head``, as :func:`attention_ref.split_heads` does.

Note: ``GroupNorm32`` computes in float32 even for float64 input; the reference computes
in the input's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .._checks import check_positive_int, require_divisible
from ._arrays import as_numpy, check_dtype, require_keys, weight_in_out

__all__ = ["from_guided_diffusion"]


def _split_qkv(w: np.ndarray, heads: int, order: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The q, k, v parts of the fused ``(..., 3C)`` output axis, each ``(..., C)`` head-major."""
    *lead, three_c = w.shape
    C = three_c // 3
    ch = C // heads
    if order == "legacy":
        parts = w.reshape(*lead, heads, 3, ch)  # (..., heads, q/k/v, ch)
        pick = [parts[..., :, p, :] for p in range(3)]  # (..., heads, ch)
    else:
        parts = w.reshape(*lead, 3, heads, ch)  # (..., q/k/v, heads, ch)
        pick = [parts[..., p, :, :] for p in range(3)]
    q, k, v = (np.ascontiguousarray(a.reshape(*lead, C)) for a in pick)
    return q, k, v


def from_guided_diffusion(
    state_dict: Mapping[str, Any],
    heads: int,
    *,
    order: str = "legacy",
    groups: int = 32,
    eps: float = 1e-5,
    prefix: str = "",
    dtype: Any | None = "float64",
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reference parameters and options from the state dict of an OpenAI ``AttentionBlock``.

    Inputs:
        state_dict: names → torch tensors or NumPy arrays: ``norm.weight``, ``norm.bias``,
            ``qkv.weight`` ``(3C, C, 1)``, ``qkv.bias`` ``(3C,)``, ``proj_out.weight`` ``(C, C, 1)``,
            ``proj_out.bias``.
        heads: the block's ``num_heads`` (``C / num_head_channels`` when that was set).
        order: ``"legacy"`` (``QKVAttentionLegacy``) or ``"new"`` (``QKVAttention``).
        groups, eps: the group norm (guided-diffusion: 32 groups, PyTorch's eps 1e-5).
        prefix: prepended to every name, e.g. ``"middle_block.1."``.
        dtype: of the returned arrays (float16, float32 or float64); ``None`` keeps the checkpoint's.

    Returns:
        ``(params, options)`` for :func:`attention_ref.self_attention_forward` on the block's
        input permuted to ``(B, H, W, C)``.
    """
    dtype = check_dtype(dtype, "from_guided_diffusion")
    if order not in ("legacy", "new"):
        raise ValueError(f"order must be 'legacy' or 'new', got {order!r}")
    names = ["norm.weight", "norm.bias", "qkv.weight", "qkv.bias", "proj_out.weight", "proj_out.bias"]
    require_keys(state_dict, [prefix + n for n in names], "from_guided_diffusion")
    w_qkv = weight_in_out(state_dict[prefix + "qkv.weight"], dtype, prefix + "qkv.weight")  # (C, 3C)
    b_qkv = as_numpy(state_dict[prefix + "qkv.bias"], dtype)  # (3C,)
    C = w_qkv.shape[0]
    if w_qkv.shape[1] != 3 * C:
        raise ValueError(f"qkv.weight maps {C} channels to {w_qkv.shape[1]}, expected 3·{C} = {3 * C}")
    heads = check_positive_int("heads", heads, "from_guided_diffusion")
    require_divisible(C, heads, "channels", "heads")
    params = {
        "norm.weight": as_numpy(state_dict[prefix + "norm.weight"], dtype),
        "norm.bias": as_numpy(state_dict[prefix + "norm.bias"], dtype),
    }
    for name, w, b in zip("qkv", _split_qkv(w_qkv, heads, order), _split_qkv(b_qkv, heads, order), strict=True):
        params[f"{name}.weight"] = w
        params[f"{name}.bias"] = b
    params["out.weight"] = weight_in_out(state_dict[prefix + "proj_out.weight"], dtype, prefix + "proj_out.weight")
    params["out.bias"] = as_numpy(state_dict[prefix + "proj_out.bias"], dtype)
    options = {"heads": heads, "groups": groups, "eps": eps, "residual": True, "rescale": 1.0, "scale": None}
    return params, options
