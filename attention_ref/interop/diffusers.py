"""diffusers modules ↔ reference parameters: ``Attention`` and ``Transformer2DModel``.

What diffusers' ``Attention`` computes with ``AttnProcessor``, ``AttnProcessor2_0`` or
``SlicedAttnProcessor`` on a ``(B, C, H, W)`` input (``x`` below is the same map
channels-last):

    h = group_norm(x)                       if norm_num_groups was given
    Q = h to_qᵀ, K = s to_kᵀ, V = s to_vᵀ   s = h, or encoder_hidden_states for cross-attention
    O = softmax(scale · Q Kᵀ) V per head    heads split head-major (``head_to_batch_dim``)
    y = to_out[0](O) (+ x if residual_connection) / rescale_output_factor

which is :func:`attention_ref.self_attention_forward` /
:func:`attention_ref.cross_attention_forward` with the options returned here.
``upcast_attention`` / ``upcast_softmax`` only change the precision diffusers
computes in (they cast to float32, even from float64), not the formula, and are
ignored. Everything else of the module that changes the formula raises
``NotImplementedError`` naming it. The processor is not inspected: only the module's
weights and configuration are read, and any processor class is accepted (whether it
computes the formula is what :func:`attention_ref.testing.check_diffusers_attention`
checks). The one exception is ``AttnProcessor2_0`` with a non-default ``scale``, which that
processor is known to ignore.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..backend import to_numpy
from ._arrays import as_numpy, check_dtype, weight_in_out

__all__ = ["from_diffusers", "from_diffusers_transformer2d", "to_diffusers"]


def _unsupported(what: str, module: str = "Attention") -> NotImplementedError:
    return NotImplementedError(f"attention_ref cannot express this diffusers {module}: {what}")


def _check_attention(attn: Any) -> None:
    """``NotImplementedError`` for every feature of ``attn`` outside the reference's formula."""
    features = [
        ("spatial_norm", getattr(attn, "spatial_norm", None) is not None),
        ("added_kv_proj_dim", getattr(attn, "added_kv_proj_dim", None) is not None),
        ("cross_attention_norm", getattr(attn, "norm_cross", None) is not None),
        ("only_cross_attention", bool(getattr(attn, "only_cross_attention", False))),
        ("qk_norm", getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None),
        ("kv_heads (grouped or multi-query attention)", attn.inner_kv_dim != attn.inner_dim),
        ("pre_only (no output projection)", getattr(attn, "to_out", None) is None),
        ("context_pre_only (joint attention)", getattr(attn, "context_pre_only", None) is not None),
        ("fused projections (fuse_projections())", bool(getattr(attn, "fused_projections", False))),
    ]
    for name, present in features:
        if present:
            raise _unsupported(name)
    _check_plain_linears(attn)
    processor = type(getattr(attn, "processor", None)).__name__
    head_dim = attn.inner_dim // attn.heads
    if processor == "AttnProcessor2_0" and not math.isclose(attn.scale, head_dim**-0.5, rel_tol=1e-12):
        raise _unsupported(f"scale {attn.scale} with AttnProcessor2_0, which ignores attn.scale (scale_qk=False)")
    if attn.training and attn.to_out[1].p > 0:
        raise _unsupported(f"dropout p={attn.to_out[1].p} in training mode (call .eval())")


def _check_plain_linears(attn: Any) -> None:
    """The projections must compute ``x Wᵀ + b`` from the weights they show: a LoRA adapter (peft's layers
    show the base layer's ``weight`` and add their own update in ``forward``), a ``Linear`` subclass with
    its own ``forward``, or integer (quantised) weights would make the reference's maps silently wrong."""
    import torch

    to_out = attn.to_out[0] if isinstance(getattr(attn, "to_out", None), torch.nn.ModuleList) else None
    for name, layer in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out[0]", to_out)):
        if layer is None:
            continue
        plain = isinstance(layer, torch.nn.Linear) and type(layer).forward is torch.nn.Linear.forward
        if not plain:
            raise _unsupported(
                f"{name} is a {type(layer).__name__}, not a plain torch.nn.Linear: its forward may not be its "
                "weight (a LoRA adapter: fuse it first, e.g. pipe.fuse_lora(); a wrapped or quantised layer)"
            )
        if not layer.weight.is_floating_point():
            raise _unsupported(f"{name} holds {layer.weight.dtype} (quantised) weights")


def from_diffusers(attn: Any, *, dtype: Any | None = "float64") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reference parameters and options from a diffusers ``Attention`` module.

    Inputs:
        attn: a ``diffusers.models.attention_processor.Attention`` (self- or cross-attention).
        dtype: of the returned arrays (default float64, exact for float32/bfloat16 weights);
            ``None`` keeps the module's.

    Returns:
        ``(params, options)``: ``params`` has the keys of :func:`attention_ref.init_self_attention`
        (``"norm.*"`` only when the module has a group norm, bias keys only where it has biases);
        ``options`` holds ``heads``, ``residual``, ``rescale``, ``scale`` (and ``groups``, ``eps``
        with a group norm), so that

            y, cache = attention_ref.self_attention_forward(x, params, **options)
            y, cache = attention_ref.cross_attention_forward(x, context, params, **options)

        reproduce ``attn(x_nchw)`` / ``attn(x_nchw, encoder_hidden_states=context)`` with
        ``x = x_nchw.permute(0, 2, 3, 1)``.

    Raises:
        NotImplementedError naming any feature the reference does not express (spatial_norm,
        added_kv_proj_dim, cross_attention_norm, only_cross_attention, qk_norm, kv_heads,
        pre_only, context_pre_only, fused projections, dropout in training, AttnProcessor2_0 with a
        scale it ignores, projections that are not plain ``torch.nn.Linear`` layers such as LoRA
        adapters). Any other processor class is accepted. TypeError for a ``dtype`` that is not ``None`` or
        float16, float32, float64 (an integer, bool or complex dtype would truncate the weights).
    """
    dtype = check_dtype(dtype, "from_diffusers")
    _check_attention(attn)
    params: dict[str, np.ndarray] = {}
    options: dict[str, Any] = {
        "heads": int(attn.heads),
        "residual": bool(attn.residual_connection),
        "rescale": float(attn.rescale_output_factor),
        "scale": float(attn.scale),
    }
    if attn.group_norm is not None:
        params["norm.weight"] = as_numpy(attn.group_norm.weight, dtype)
        params["norm.bias"] = as_numpy(attn.group_norm.bias, dtype)
        options["groups"] = int(attn.group_norm.num_groups)
        options["eps"] = float(attn.group_norm.eps)
    layers = {"q": attn.to_q, "k": attn.to_k, "v": attn.to_v, "out": attn.to_out[0]}
    for name, layer in layers.items():
        params[f"{name}.weight"] = weight_in_out(layer.weight, dtype, f"{name}.weight")
        if layer.bias is not None:
            params[f"{name}.bias"] = as_numpy(layer.bias, dtype)
    return params, options


def _check_transformer2d(model: Any) -> None:
    cfg = model.config
    if not getattr(model, "is_input_continuous", False):
        raise _unsupported("vectorized or patched input (only continuous in_channels input)", "Transformer2DModel")
    checks = [
        (f"norm_type={cfg.norm_type!r}", cfg.norm_type != "layer_norm"),
        (f"activation_fn={cfg.activation_fn!r}", cfg.activation_fn != "geglu"),
        ("only_cross_attention", bool(cfg.only_cross_attention)),
        ("double_self_attention", bool(cfg.double_self_attention)),
        (f"attention_type={cfg.attention_type!r}", cfg.attention_type != "default"),
        ("no cross_attention_dim (no cross-attention)", cfg.cross_attention_dim is None),
        ("out_channels != in_channels", model.out_channels != model.in_channels),
        (f"dropout p={cfg.dropout} in training mode (call .eval())", model.training and cfg.dropout > 0),
    ]
    for name, present in checks:
        if present:
            raise _unsupported(name, "Transformer2DModel")
    for i, block in enumerate(model.transformer_blocks):
        if getattr(block, "pos_embed", None) is not None:
            raise _unsupported(f"positional_embeddings in transformer_blocks.{i}", "Transformer2DModel")
        if type(block.ff.net[0]).__name__ != "GEGLU":
            raise _unsupported(f"feed-forward {type(block.ff.net[0]).__name__} in block {i}", "Transformer2DModel")


def _layer_norm_params(params: dict[str, np.ndarray], name: str, norm: Any, dtype: Any | None) -> float:
    if getattr(norm, "weight", None) is not None:
        params[f"{name}.weight"] = as_numpy(norm.weight, dtype)
    if getattr(norm, "bias", None) is not None:
        params[f"{name}.bias"] = as_numpy(norm.bias, dtype)
    return float(norm.eps)


def from_diffusers_transformer2d(
    model: Any, *, dtype: Any | None = "float64"
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reference parameters and options from a diffusers ``Transformer2DModel`` (continuous input).

    Inputs:
        model: a ``Transformer2DModel`` with ``in_channels`` set, ``norm_type="layer_norm"``,
            ``activation_fn="geglu"`` and a ``cross_attention_dim`` — Stable Diffusion's spatial
            transformer, with conv (``use_linear_projection=False``, SD 1.x) or linear projections
            (SD 2.x, XL), any ``num_layers``.
        dtype: of the returned arrays; ``None`` keeps the module's.

    Returns:
        ``(params, options)`` with ``y, cache = attention_ref.spatial_transformer_forward(x, context,
        params, **options)`` equal to ``model(x_nchw, encoder_hidden_states=context).sample``
        permuted to channels-last; ``options`` holds ``heads``, ``groups``, ``eps``, ``norm_eps``, ``scale``.
        diffusers' ``encoder_attention_mask`` (True = keep) is the reference's ``context_mask``, with one
        difference: diffusers turns the mask into a bias of −10000, which cancels in the softmax of a sample
        whose tokens are *all* masked (in float32 and float64 it keeps its unmasked weights; only logits rounded
        in half precision, as the eager ``AttnProcessor``'s in float16 or bfloat16, all round to −10000 and
        attend evenly), while the reference gives it no attention (output 0).

    Raises:
        NotImplementedError naming what the reference does not express; TypeError for a ``dtype`` that is not
        ``None`` or float16, float32, float64.
    """
    dtype = check_dtype(dtype, "from_diffusers_transformer2d")
    _check_transformer2d(model)
    params: dict[str, np.ndarray] = {
        "norm.weight": as_numpy(model.norm.weight, dtype),
        "norm.bias": as_numpy(model.norm.bias, dtype),
        "proj_in.weight": weight_in_out(model.proj_in.weight, dtype, "proj_in.weight"),
        "proj_in.bias": as_numpy(model.proj_in.bias, dtype),
        "proj_out.weight": weight_in_out(model.proj_out.weight, dtype, "proj_out.weight"),
        "proj_out.bias": as_numpy(model.proj_out.bias, dtype),
    }
    heads, scale, norm_eps = None, None, None
    for i, block in enumerate(model.transformer_blocks):
        prefix = f"blocks.{i}."
        for n in ("norm1", "norm2", "norm3"):
            eps_n = _layer_norm_params(params, prefix + n, getattr(block, n), dtype)
            if norm_eps is not None and eps_n != norm_eps:
                raise _unsupported(f"layer norms with different eps ({norm_eps}, {eps_n})", "Transformer2DModel")
            norm_eps = eps_n
        for a in ("attn1", "attn2"):
            p, o = from_diffusers(getattr(block, a), dtype=dtype)
            if o["residual"] or o["rescale"] != 1.0 or "groups" in o:
                what = f"transformer_blocks.{i}.{a} with its own norm, residual or rescale"
                raise _unsupported(what, "Transformer2DModel")
            if heads is not None and (o["heads"], o["scale"]) != (heads, scale):
                raise _unsupported("attentions with different heads or scales", "Transformer2DModel")
            heads, scale = o["heads"], o["scale"]
            params.update({f"{prefix}{a}.{k}": v for k, v in p.items()})
        for ours, layer in (("ff.proj", block.ff.net[0].proj), ("ff.out", block.ff.net[2])):
            params[f"{prefix}{ours}.weight"] = weight_in_out(layer.weight, dtype, ours)
            if layer.bias is not None:
                params[f"{prefix}{ours}.bias"] = as_numpy(layer.bias, dtype)
    options = {
        "heads": heads,
        "groups": int(model.norm.num_groups),
        "eps": float(model.norm.eps),
        "norm_eps": norm_eps,
        "scale": scale,
    }
    return params, options


# reference name → diffusers name, for the pieces of an Attention and of a Transformer2DModel
_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}
_BLOCK_NAMES = {"norm1": "norm1", "norm2": "norm2", "norm3": "norm3", "ff.proj": "ff.net.0.proj", "ff.out": "ff.net.2"}


def _diffusers_name(key: str, transformer: bool) -> str:
    layer, kind = key.rsplit(".", 1)
    if not transformer:
        if layer not in _ATTENTION_NAMES:
            raise ValueError(f"to_diffusers: {key!r} is not a parameter of a diffusers Attention")
        return f"{_ATTENTION_NAMES[layer]}.{kind}"
    if layer in ("norm", "proj_in", "proj_out"):
        return key
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", layer)
    if m is None:
        raise ValueError(f"to_diffusers: {key!r} is not a parameter of a Transformer2DModel")
    i, rest = m.groups()
    if rest in _BLOCK_NAMES:
        return f"transformer_blocks.{i}.{_BLOCK_NAMES[rest]}.{kind}"
    attn, _, sub = rest.partition(".")
    if attn in ("attn1", "attn2") and sub in _ATTENTION_NAMES and sub != "norm":
        return f"transformer_blocks.{i}.{attn}.{_ATTENTION_NAMES[sub]}.{kind}"
    raise ValueError(f"to_diffusers: {key!r} is not a parameter of a Transformer2DModel")


def to_diffusers(params: Mapping[str, Any], module: Any | None = None) -> dict[str, Any]:
    """The reverse of :func:`from_diffusers` / :func:`from_diffusers_transformer2d`: a diffusers state dict.

    Inputs:
        params: reference parameters of a self- or cross-attention block, or of a spatial
            transformer (recognised by ``"proj_in.weight"``); any backend.
        module: optional diffusers ``Attention`` or ``Transformer2DModel`` to load the weights into
            (``load_state_dict(strict=True)``; values are cast to the module's dtype). Its
            ``proj_in``/``proj_out`` decide between 1×1-convolution and linear weight shapes.

    Returns:
        ``{diffusers name: torch tensor}`` in the parameters' dtype — e.g. ``"to_q.weight"``
        ``(inner, C)``, ``"to_out.0.bias"``, ``"group_norm.weight"``; for a spatial transformer
        ``"transformer_blocks.0.attn2.to_k.weight"``, ``"transformer_blocks.0.ff.net.0.proj.weight"``, …
        Without ``module``, projections get linear shapes (``use_linear_projection=True``).
    """
    import torch

    transformer = "proj_in.weight" in params
    conv = False
    if module is not None and transformer:
        conv = getattr(module.proj_in, "weight", None) is not None and module.proj_in.weight.ndim == 4
    state: dict[str, Any] = {}
    for key, value in params.items():
        a = np.ascontiguousarray(to_numpy(value))
        name = _diffusers_name(key, transformer)
        if key.endswith(".weight") and a.ndim == 2:
            a = np.ascontiguousarray(a.T)  # (in, out) → PyTorch's (out, in)
            if conv and key in ("proj_in.weight", "proj_out.weight"):
                a = a.reshape(*a.shape, 1, 1)  # a 1×1 Conv2d weight (out, in, 1, 1)
        state[name] = torch.from_numpy(a.copy())
    if module is not None:
        module.load_state_dict(state, strict=True)
    return state
