r"""Wan 2.1: ``WanAttention`` — self-attention over every frame's patches (3-D RoPE) and cross-attention.

Wan cuts a ``(B, C, F, H, W)`` latent video into ``(1, 2, 2)`` patches and attends over all ``F·H·W`` of them at
once. Its q and k are RMS-normed over all heads together (``qk_norm="rms_norm_across_heads"``), then split into
heads; ``attn1`` rotates them by the call's own 3-D RoPE tables (frame, row, col; pairs interleaved):

.. math::
    P = \mathrm{softmax}\big(\tfrac{1}{\sqrt d}\,\mathrm{RoPE}(Q)\,\mathrm{RoPE}(K)^\top\big), \quad
    Q = \mathrm{split}(\mathrm{rms}(x W_q + b_q)\,\gamma_q), \ K = \mathrm{split}(\mathrm{rms}(s W_k + b_k)\,\gamma_k)

What is recorded, frames in the batch (sample ``b``, frame ``f`` at ``b·F + f``, as a video U-Net's spatial
layers), on each frame's ``(H, W)`` patch grid:

* ``attn2``: ``kind="cross"``, every patch's weights on the text tokens (a softmax over the text: rows sum to 1);
  an image-to-video model's image context (``add_k_proj``: the context's first ``M − 512`` tokens, as
  ``WanAttnProcessor`` splits it) is the part ``"image"``, with a softmax of its own;
* ``attn1`` (with ``self_queries``): ``kind="self"``, each query pixel's weights on the patches of its own frame.
  The softmax runs over every frame's patches, so a row sums to the share read from its own frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ....ops.heads import split_heads
from ....ops.linear import linear_forward
from ....ops.rms_norm import rms_norm_forward
from ....ops.rope import rope_forward
from ..._arrays import as_numpy, check_dtype, weight_in_out
from ..weights import softmax_rows
from .base import Family, argument

__all__ = ["WAN_TEXT_TOKENS", "WanAttention", "from_wan_attention"]

WAN_TEXT_TOKENS = 512  # WanAttnProcessor: the text context's length, the rest (first) is the image's


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(f"attention_ref cannot express this WanAttention: {what}")


def from_wan_attention(attn: Any, dtype: Any = "float64") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(params, options)`` of a ``WanAttention``'s scores: ``q``, ``k`` (and ``add_k``) projections, their RMS norms.

    ``params``: ``"q.weight"`` ``(C, inner)``, ``"k.weight"``, biases, ``"norm_q.weight"`` ``(inner,)``,
    ``"norm_k.weight"``; for image-to-video ``"add_k.weight"``, ``"add_k.bias"``, ``"norm_added_k.weight"``.
    ``options``: ``heads``, ``eps``, ``scale`` (``1/√d``, what the attention uses), ``qk_norm``
    (``"rms_norm_across_heads"`` or ``None``).
    """
    import torch

    dtype = check_dtype(dtype, "from_wan_attention")
    if getattr(attn, "fused_projections", False):
        raise _unsupported("fused projections (fuse_projections())")
    if attn.kv_inner_dim != attn.inner_dim:
        raise _unsupported("keys of another width than the queries (cross_attention_dim_head)")
    params: dict[str, np.ndarray] = {}
    layers = {"q": attn.to_q, "k": attn.to_k}
    if attn.add_k_proj is not None:
        layers["add_k"] = attn.add_k_proj
    for name, layer in layers.items():
        if not isinstance(layer, torch.nn.Linear) or type(layer).forward is not torch.nn.Linear.forward:
            raise _unsupported(f"{name} is a {type(layer).__name__}, not a plain torch.nn.Linear")
        params[f"{name}.weight"] = weight_in_out(layer.weight, dtype, f"{name}.weight")
        if layer.bias is not None:
            params[f"{name}.bias"] = as_numpy(layer.bias, dtype)
    norms = {"norm_q": attn.norm_q, "norm_k": attn.norm_k}
    if attn.add_k_proj is not None:
        norms["norm_added_k"] = attn.norm_added_k
    kinds = {type(n) for n in norms.values()}
    eps = None
    if kinds == {torch.nn.RMSNorm}:
        qk_norm = "rms_norm_across_heads"
        for name, norm in norms.items():
            if tuple(norm.normalized_shape) != (attn.inner_dim,) or norm.eps is None:
                raise _unsupported(f"{name} of shape {tuple(norm.normalized_shape)}, eps {norm.eps}")
            if norm.weight is not None:
                params[f"{name}.weight"] = as_numpy(norm.weight, dtype)
            eps = float(norm.eps) if eps is None else eps
            if float(norm.eps) != eps:
                raise _unsupported("q/k norms with different eps")
    elif kinds == {torch.nn.Identity}:
        qk_norm = None
    else:
        raise _unsupported(f"q/k norms {sorted(k.__name__ for k in kinds)} (the trace knows torch.nn.RMSNorm)")
    head_dim = attn.inner_dim // attn.heads
    options = {"heads": int(attn.heads), "scale": head_dim**-0.5, "qk_norm": qk_norm, "eps": eps}
    return params, options


def _heads(x: Any, params: dict[str, Any], options: dict[str, Any], name: str, norm: str) -> Any:
    """``split(rms(x W + b) γ)``: Wan's q or k, normed across the heads, then split   (B, heads, L, d)."""
    y, _ = linear_forward(x, params[f"{name}.weight"], params.get(f"{name}.bias"))
    if options["qk_norm"] is not None:
        y, _ = rms_norm_forward(y, params.get(f"{norm}.weight"), eps=options["eps"])
    return split_heads(y, options["heads"])


class WanAttention(Family):
    """diffusers' ``WanAttention`` (``WanAttnProcessor``)."""

    module = "WanAttention"

    def claims(self, module: Any) -> bool:
        return type(module).__name__ == "WanAttention"

    def static_kinds(self, module: Any, temporal: bool) -> tuple[str, ...]:
        return ("cross",) if getattr(module, "is_cross_attention", False) else ("self",)

    def load(self, module: Any, dtype: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        return from_wan_attention(module, dtype)

    def record(self, tracer: Any, name: str, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        import torch

        hidden = argument(args, kwargs, 0, "hidden_states")
        context = argument(args, kwargs, 1, "encoder_hidden_states")
        if argument(args, kwargs, 2, "attention_mask") is not None:
            raise NotImplementedError(f"{name}: an attention_mask on a WanAttention")
        rope = argument(args, kwargs, 3, "rotary_emb")
        kind = "self" if context is None else "cross"
        if not tracer.wants(name, kind):
            return
        params, options = tracer.params(name, module, self)
        dtype = tracer.torch_dtype
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            x = hidden.detach().to(dtype=dtype)  # (B, F·H·W, C)
            B, L = x.shape[0], x.shape[1]
            F, H, W = tracer.spacetime_grid(name, L, B)
            heads = options["heads"]
            head = () if tracer.heads == "mean" else (heads,)
            if kind == "cross":
                c = context.detach().to(dtype=dtype)
                parts = {None: c}
                if "add_k.weight" in params:  # image-to-video: [image; text], split as WanAttnProcessor does
                    split = c.shape[1] - WAN_TEXT_TOKENS
                    parts = {None: c[:, split:], "image": c[:, :split]}
                q = _heads(x, params, options, "q", "norm_q")  # (B, heads, L, d)
                for part, tokens in parts.items():
                    k_name, norm = ("k", "norm_k") if part is None else ("add_k", "norm_added_k")
                    k = _heads(tokens, params, options, k_name, norm)  # (B, heads, M, d)
                    P = softmax_rows(q, k, options["scale"], reduce=tracer.head_reduce)  # (B, [heads,] L, M)
                    M = k.shape[2]
                    maps = P.reshape(B, *head, F, H, W, M)
                    if head:
                        maps = maps.transpose(1, 2)  # (B, F, heads, H, W, M)
                    tracer.add(name, "cross", (H, W), maps.reshape(B * F, *head, H, W, M), heads=heads, keys=M,
                               part=part)  # fmt: skip
                return
            q_all = _heads(x, params, options, "q", "norm_q")
            k = _heads(x, params, options, "k", "norm_k")
            if rope is not None:
                cos, sin = (t.detach().to(dtype=dtype).reshape(L, -1) for t in rope)  # (L, d)
                k = rope_forward(k, cos, sin, pairs="interleaved")[0]
            pixels, rows = tracer.query_rows((H, W), x.device)
            if rows is None:
                rows = torch.arange(H * W, device=x.device)
            frames = []
            for f in range(F):
                at = f * H * W + rows  # the query pixels of frame f, in the video's tokens
                q = q_all[:, :, at]
                if rope is not None:
                    q = rope_forward(q, cos[at], sin[at], pairs="interleaved")[0]
                # P[query rows, keys of frame f] of the softmax over every frame's keys   (B, [heads,] Q, H·W)
                frames.append(softmax_rows(q, k, options["scale"], columns=slice(f * H * W, (f + 1) * H * W),
                                           reduce=tracer.head_reduce))  # fmt: skip
            maps = torch.stack(frames, dim=1)  # (B, F, [heads,] Q, H·W)
            note = "a row sums to the share read from its own frame (the softmax runs over every frame)"
            tracer.add(name, "self", (H, W), maps.reshape(B * F, *head, rows.shape[0], H, W), heads=heads,
                       keys=H * W, pixels=pixels, note=note)  # fmt: skip
