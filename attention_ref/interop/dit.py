"""diffusers' diffusion-transformer attention → reference parameters: SD3, SD3.5 and Flux.

:func:`from_diffusers_joint` reads one attention module and returns ``(params, options)`` for
:func:`attention_ref.blocks.joint_attention_forward`:

* SD3 / SD3.5's joint attention — an ``Attention`` with ``added_kv_proj_dim`` and ``context_pre_only``
  (``JointAttnProcessor2_0``): two streams, image first; the last block's ``context_pre_only=True`` has no
  ``to_add_out`` (its text output is the attention output itself);
* SD3.5's second attention ``attn2`` (``use_dual_attention``) and any plain self-attention ``Attention``
  with per-head q/k norms: one stream;
* Flux's ``FluxAttention`` — double-stream (``added_kv_proj_dim``: text first) and single-stream
  (``pre_only``: one stream, no output projection); per-head RMSNorm on q and k; RoPE tables per call,
  from :func:`flux_rope_tables`.

Only the module's weights and configuration are read; the formula is that of the default processors
(``JointAttnProcessor2_0``, ``FluxAttnProcessor``). Everything that changes it raises
``NotImplementedError`` naming the feature. Two precision details of diffusers are not copied by the
options, which describe the exact formula: diffusers' ``RMSNorm`` (SD3's q/k norm) takes its mean square
in float32 and Flux's ``apply_rotary_emb`` rotates in float32, whatever the model's dtype, so a float64
model agrees with the float64 reference to about 1e-7 there. ``rope_dtype="float32"`` (a keyword of
:func:`~attention_ref.blocks.joint_attention_forward`) reproduces Flux's rotation bit for bit; the RMSNorm's
float32 sum cannot be reproduced bit for bit (its summation order is torch's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import array_api_compat
import numpy as np

from ..ops.rope import check_axes_dims, rope_angles
from ._arrays import as_numpy, check_dtype, weight_in_out

__all__ = ["flux_rope_tables", "from_diffusers_joint"]

# reference name → the module's attribute, per stream
_IMAGE_LAYERS = {"q": "to_q", "k": "to_k", "v": "to_v"}
_TEXT_LAYERS = {"add_q": "add_q_proj", "add_k": "add_k_proj", "add_v": "add_v_proj", "add_out": "to_add_out"}
_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


def _unsupported(what: str, module: str) -> NotImplementedError:
    return NotImplementedError(f"attention_ref cannot express this diffusers {module}: {what}")


def _plain_linear(layer: Any, name: str, module: str) -> None:
    """``NotImplementedError`` unless ``layer`` is a ``torch.nn.Linear`` whose forward is ``x Wᵀ + b`` with
    floating weights (not a LoRA adapter, a wrapped or a quantised layer)."""
    import torch

    plain = isinstance(layer, torch.nn.Linear) and type(layer).forward is torch.nn.Linear.forward
    if not plain:
        raise _unsupported(
            f"{name} is a {type(layer).__name__}, not a plain torch.nn.Linear: its forward may not be its weight "
            "(a LoRA adapter: fuse it first, e.g. pipe.fuse_lora(); a wrapped or quantised layer)",
            module,
        )
    if not layer.weight.is_floating_point():
        raise _unsupported(f"{name} holds {layer.weight.dtype} (quantised) weights", module)


def _qk_norm(norm: Any, name: str, head_dim: int, module: str) -> tuple[str, float]:
    """``(qk_norm, eps)`` of one q/k norm: a per-head LayerNorm or RMSNorm over ``head_dim`` channels."""
    import torch

    kind = type(norm).__name__
    if type(norm) is torch.nn.LayerNorm:
        shape, found = tuple(norm.normalized_shape), "layer_norm"
    elif type(norm) is torch.nn.RMSNorm:
        shape, found = tuple(norm.normalized_shape), "rms_norm"
        if norm.eps is None:
            raise _unsupported(
                f"{name} is a torch.nn.RMSNorm with eps=None (its eps depends on the input's dtype)", module
            )
    elif kind == "RMSNorm" and type(norm).__module__.startswith("diffusers"):
        shape, found = tuple(norm.dim), "rms_norm"
        if getattr(norm, "bias", None) is not None:
            raise _unsupported(f"{name} is an RMSNorm with a bias", module)
    else:
        # FP32LayerNorm (computes in float32), LpNorm ("l2"), …
        raise _unsupported(f"{name} is a {kind}; q/k norms must be a per-head LayerNorm or RMSNorm", module)
    if shape != (head_dim,):
        raise _unsupported(
            f"{name} normalises {shape} channels, not one head's ({head_dim},): a norm across heads "
            "(qk_norm='rms_norm_across_heads' or 'layer_norm_across_heads')",
            module,
        )
    return found, float(norm.eps)


def _read_norms(attn: Any, names: Sequence[str], head_dim: int, module: str, params: dict, dtype: Any) -> dict:
    """The q/k norms ``names`` into ``params``; returns the options ``{"qk_norm", "eps"}`` they share."""
    present = {name: getattr(attn, name, None) for name in names}
    given = [name for name, norm in present.items() if norm is not None]
    if not given:
        return {}
    # each norm's kind first (a norm across heads leaves a gap Wan-style: say that, not the gap)
    kinds = {name: _qk_norm(norm, name, head_dim, module) for name, norm in present.items() if norm is not None}
    if len(given) != len(names):
        missing = [name for name in names if name not in given]
        raise _unsupported(f"q/k norms on some projections only ({given} without {missing})", module)
    if len(set(kinds.values())) > 1:
        raise _unsupported(f"q/k norms of different kinds or eps: {kinds}", module)
    for name, norm in present.items():
        for kind in ("weight", "bias"):
            p = getattr(norm, kind, None)
            if p is not None:
                params[f"{name}.{kind}"] = as_numpy(p, dtype)
    qk_norm, eps = next(iter(kinds.values()))
    return {"qk_norm": qk_norm, "eps": eps}


def _read_linears(attn: Any, layers: dict[str, str], module: str, params: dict, dtype: Any) -> None:
    for ours, theirs in layers.items():
        layer = getattr(attn, theirs)
        _plain_linear(layer, theirs, module)
        params[f"{ours}.weight"] = weight_in_out(layer.weight, dtype, theirs)
        if layer.bias is not None:
            params[f"{ours}.bias"] = as_numpy(layer.bias, dtype)


def _read_out(attn: Any, module: str, params: dict, dtype: Any) -> None:
    """``to_out[0]`` as ``out.*``, after checking its dropout."""
    _plain_linear(attn.to_out[0], "to_out[0]", module)
    params["out.weight"] = weight_in_out(attn.to_out[0].weight, dtype, "to_out[0]")
    if attn.to_out[0].bias is not None:
        params["out.bias"] = as_numpy(attn.to_out[0].bias, dtype)
    if attn.training and len(attn.to_out) > 1 and getattr(attn.to_out[1], "p", 0) > 0:
        raise _unsupported(f"dropout p={attn.to_out[1].p} in training mode (call .eval())", module)


def _check_sd3_attention(attn: Any) -> None:
    """``NotImplementedError`` for every feature of a diffusers ``Attention`` outside joint attention's formula."""
    head_dim = attn.inner_dim // attn.heads
    features = [
        ("fused projections (fuse_projections())", bool(getattr(attn, "fused_projections", False))),
        ("spatial_norm", getattr(attn, "spatial_norm", None) is not None),
        ("a group norm (norm_num_groups)", getattr(attn, "group_norm", None) is not None),
        ("cross_attention_norm", getattr(attn, "norm_cross", None) is not None),
        ("residual_connection", bool(getattr(attn, "residual_connection", False))),
        (f"rescale_output_factor={attn.rescale_output_factor}", attn.rescale_output_factor != 1.0),
        ("only_cross_attention", bool(getattr(attn, "only_cross_attention", False))),
        ("kv_heads (grouped or multi-query attention)", attn.inner_kv_dim != attn.inner_dim),
        ("cross_attention_dim (cross-attention: use attention_ref.interop.from_diffusers)", attn.is_cross_attention),
        ("pre_only (no output projection: the joint processors need to_out)", getattr(attn, "to_out", None) is None),
        (
            "added_kv_proj_dim without add_q_proj (the added-KV cross-attention of UnCLIP/Kandinsky, not joint "
            "attention)",
            attn.added_kv_proj_dim is not None and getattr(attn, "add_q_proj", None) is None,
        ),
        (
            f"scale {attn.scale} (the joint processors use 1/sqrt(head_dim) whatever attn.scale)",
            not math.isclose(attn.scale, head_dim**-0.5, rel_tol=1e-12),
        ),
    ]
    for name, present in features:
        if present:
            raise _unsupported(name, "Attention")


def _from_sd3_attention(attn: Any, dtype: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    module = "Attention"
    _check_sd3_attention(attn)
    heads, head_dim = int(attn.heads), attn.inner_dim // attn.heads
    params: dict[str, np.ndarray] = {}
    _read_linears(attn, _IMAGE_LAYERS, module, params, dtype)
    _read_out(attn, module, params, dtype)
    joint = attn.added_kv_proj_dim is not None
    text_layers = dict(_TEXT_LAYERS)
    if joint and attn.to_add_out is None:
        del text_layers["add_out"]  # context_pre_only: the text output is the attention output itself
    if joint:
        _read_linears(attn, text_layers, module, params, dtype)
    options: dict[str, Any] = {"heads": heads, "order": "image_first", "scale": head_dim**-0.5}
    options.update(_read_norms(attn, _NORMS if joint else _NORMS[:2], head_dim, module, params, dtype))
    if not joint and any(getattr(attn, name, None) is not None for name in _NORMS[2:]):
        raise _unsupported("norm_added_q / norm_added_k without a text stream", module)
    return params, options


def _from_flux_attention(attn: Any, dtype: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    module = "FluxAttention"
    if getattr(attn, "fused_projections", False):
        raise _unsupported("fused projections (fuse_projections())", module)
    joint = attn.added_kv_proj_dim is not None
    has_out = getattr(attn, "to_out", None) is not None
    if joint and not has_out:
        raise _unsupported("pre_only with added_kv_proj_dim (FluxAttnProcessor needs to_out for two streams)", module)
    heads, head_dim = int(attn.heads), int(attn.head_dim)
    params: dict[str, np.ndarray] = {}
    _read_linears(attn, _IMAGE_LAYERS, module, params, dtype)
    if has_out:
        _read_out(attn, module, params, dtype)
    if joint:
        _read_linears(attn, _TEXT_LAYERS, module, params, dtype)
    options: dict[str, Any] = {
        "heads": heads,
        "order": "text_first",
        "scale": head_dim**-0.5,
        "rope_pairs": "interleaved",
    }
    options.update(_read_norms(attn, _NORMS if joint else _NORMS[:2], head_dim, module, params, dtype))
    return params, options


def from_diffusers_joint(attn: Any, *, dtype: Any | None = "float64") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reference parameters and options from SD3's, SD3.5's or Flux's attention module.

    Inputs:
        attn: a diffusers ``Attention`` — SD3/SD3.5 joint attention (``added_kv_proj_dim``, ``context_pre_only``;
            ``JointAttnProcessor2_0``), SD3.5's ``attn2`` or another one-stream self-attention with per-head q/k
            norms — or a ``FluxAttention`` (double-stream with added projections, single-stream ``pre_only``).
        dtype: of the returned arrays (default float64, exact for float32/bfloat16 weights); ``None`` keeps
            the module's.

    Returns:
        ``(params, options)`` for :func:`attention_ref.blocks.joint_attention_forward`: ``params`` under the
        reference's names (``to_q`` → ``"q.*"``, ``to_out.0`` → ``"out.*"``, ``add_q_proj`` → ``"add_q.*"``,
        ``to_add_out`` → ``"add_out.*"``, the norms' names kept; ``(in, out)`` matrices), ``options`` with
        ``heads``, ``order`` (``"image_first"`` for ``Attention``, ``"text_first"`` for ``FluxAttention``),
        ``scale`` (``1/sqrt(head_dim)``, what the processors use), ``qk_norm`` and ``eps`` when the module
        normalises q and k, and ``rope_pairs`` for Flux. Then

            (y, y_ctx), cache = joint_attention_forward(x, ctx, params, **options)               # SD3
            (y, y_ctx), cache = joint_attention_forward(x, ctx, params, rope=tables, **options)  # Flux
            (y, _), cache = joint_attention_forward(h, None, params, rope=tables, **options)     # Flux single

        reproduce ``attn(x, ctx)``, ``attn(x, ctx, image_rotary_emb=tables)`` and
        ``attn(h, image_rotary_emb=tables)``, with ``tables = flux_rope_tables(txt_ids, img_ids, …)``.
        A two-stream module is recognised by ``"add_q.weight"`` in ``params``: pass it the context.

    Raises:
        NotImplementedError naming any feature outside that formula: fused projections, projections that are
        not plain ``torch.nn.Linear`` (LoRA adapters, wrapped or quantised layers), a group, spatial or context
        norm, residual connection, rescaled output, grouped-query heads, cross-attention, added-KV
        cross-attention without ``add_q_proj``, q/k norms across heads or of another kind (FP32LayerNorm, l2),
        q/k norms on some projections only, a non-default scale, dropout in training. TypeError for a module
        that is neither, and for a ``dtype`` that is not ``None`` or float16, float32, float64.
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_flux import FluxAttention

    dtype = check_dtype(dtype, "from_diffusers_joint")
    if isinstance(attn, FluxAttention):
        return _from_flux_attention(attn, dtype)
    if isinstance(attn, Attention):
        return _from_sd3_attention(attn, dtype)
    raise TypeError(
        f"from_diffusers_joint takes a diffusers Attention (SD3, SD3.5) or FluxAttention, got a {type(attn).__name__}"
    )


def flux_rope_tables(
    txt_ids: Any, img_ids: Any, axes_dims_rope: Any, *, theta: float = 10000.0, dtype: str = "float64"
) -> tuple[np.ndarray, np.ndarray]:
    """The ``(cos, sin)`` RoPE tables of one Flux call, for its joined text-then-image sequence.

    Inputs:
        txt_ids: ``(M, 3)`` text position ids (zeros in Flux), torch or NumPy.
        img_ids: ``(N, 3)`` image position ids ``(0, row, col)`` (or whatever the pipeline built).
        axes_dims_rope: the channels of each id axis, e.g. ``(16, 56, 56)`` (``transformer.config.axes_dims_rope``);
            or a ``FluxPosEmbed`` or a ``FluxTransformer2DModel``, whose ``axes_dim`` and ``theta`` are read.
        theta: the frequencies' base (10000 in Flux; read from the module when one is given).
        dtype: of the tables. ``"float32"`` gives exactly ``FluxPosEmbed``'s output (computed in float64 and
            rounded, as there); the default keeps the float64 values.

    Returns:
        ``cos, sin``: ``(M + N, d)`` NumPy arrays, ``d = Σ axes_dims_rope``, rows in Flux's joined order (text
        first), interleaved pairs — the ``rope`` of :func:`attention_ref.blocks.joint_attention_forward`. As
        ``FluxPosEmbed`` does, the ids are rounded to float32 first (exact for integer ids below 2²⁴).
    """
    where = "flux_rope_tables"
    pos_embed = getattr(axes_dims_rope, "pos_embed", axes_dims_rope)
    if hasattr(pos_embed, "axes_dim"):
        axes, theta = check_axes_dims(pos_embed.axes_dim, where, "axes_dim"), float(pos_embed.theta)
    else:
        axes = check_axes_dims(axes_dims_rope, where, "axes_dims_rope")
    ids = []
    for name, a in (("txt_ids", txt_ids), ("img_ids", img_ids)):
        if not (isinstance(a, np.ndarray) or array_api_compat.is_torch_array(a)):
            raise TypeError(f"{where}: {name} must be a NumPy array or a torch tensor, got {type(a).__name__}")
        a = as_numpy(a, None)  # torch's bfloat16 ids (a bfloat16 pipeline's) through float32, exactly
        if a.dtype.kind not in "iuf" and a.dtype.name != "bfloat16":
            raise TypeError(f"{where}: {name} must hold integer or real position ids, got {a.dtype}")
        if a.ndim != 2:
            hint = f"; diffusers takes {name}[0] of a batched (1, n, A) array: pass that" if a.ndim == 3 else ""
            raise ValueError(f"{where}: {name} must be (n, A) ids, got shape {a.shape}{hint}")
        ids.append(a)
    if ids[0].shape[1] != ids[1].shape[1]:
        raise ValueError(f"{where}: txt_ids {ids[0].shape} and img_ids {ids[1].shape} have different axes")
    if ids[0].shape[1] != len(axes):
        raise ValueError(
            f"{where}: axes_dims_rope {axes} has {len(axes)} axes but the ids have {ids[0].shape[1]} columns "
            f"(txt_ids {ids[0].shape}, img_ids {ids[1].shape}): one channel count per id axis"
        )
    # FluxPosEmbed reads its ids as float32: do the same, so that the angles are its angles
    positions = np.concatenate(ids).astype(np.float32)  # (M + N, A), text first
    return rope_angles(positions, axes, theta, pairs="interleaved", dtype=dtype)
