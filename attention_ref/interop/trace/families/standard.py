r"""diffusers' ``Attention``: Stable Diffusion U-Nets, VAEs, ``Transformer2DModel``, PixArt, DiT, video U-Nets.

For each call the weights are computed from the module's parameters (:func:`attention_ref.interop.from_diffusers`)
and the call's inputs with :func:`..weights.attention_weights`:

.. math::
    P = \mathrm{softmax}(\text{scale}\cdot Q K^\top + \text{bias}), \quad
    Q = \mathrm{GroupNorm}(h) W_q + b_q, \quad K = s W_k + b_k

with ``s`` the tokens themselves (self-attention) or the context (cross-attention).

Where each map sits: a call on a ``(B, C, H, W)`` map has that grid; a call on ``(B, N, C)`` tokens gets the grid
of the nearest enclosing module running on a ``(B, C, H, W)`` map with ``H·W = N``, or ``(H/p)·(W/p) = N`` for
that module's patch size ``p`` (PixArt, DiT: the patch grid). A module inside a temporal block (SVD's
``TemporalBasicTransformerBlock``, AnimateDiff's motion modules) runs on ``(B·H·W, F, C)``: one sequence of ``F``
frames per pixel; its maps are ``"temporal"`` (the frames' weights over the frames, or over the context tokens),
recorded at the query pixels of ``self_queries``, never as a spatial map. The spatial layers of a video U-Net
run on ``(B·F, C, H, W)``: their maps have ``B·F`` samples (sample ``b``, frame ``f`` at ``b·F + f``).
"""

from __future__ import annotations

from typing import Any

from ...attention_mask import mask_and_bias
from ...diffusers import from_diffusers
from ..weights import attention_weights
from .base import Family, argument, tokens_of
from .ip_adapter import ip_key_params, ip_scale, split_context

__all__ = ["StandardAttention"]


def _context(name: str, context: Any, batch: int, dtype: Any) -> Any:
    import torch

    if context is None:
        return None
    if not isinstance(context, torch.Tensor):
        raise TypeError(f"{name}: encoder_hidden_states is a {type(context).__name__}, not a (B, M, D) tensor")
    if context.ndim != 3 or context.shape[0] != batch:
        shape = tuple(context.shape)
        raise ValueError(f"{name}: encoder_hidden_states of shape {shape} is not (B, M, D) with B = {batch}")
    return context.detach().to(dtype=dtype)  # (B, M, D), converted exactly


class StandardAttention(Family):
    """diffusers' ``Attention`` with a processor that computes the standard formula (any, as far as the trace sees)."""

    module = "Attention"

    def claims(self, module: Any) -> bool:
        from diffusers.models.attention_processor import Attention

        return isinstance(module, Attention)

    def static_kinds(self, module: Any, temporal: bool) -> tuple[str, ...]:
        if temporal:
            return ("temporal",)
        return ("cross",) if getattr(module, "is_cross_attention", False) else ("self",)

    def load(self, module: Any, dtype: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        return from_diffusers(module, dtype=dtype)

    def record(self, tracer: Any, name: str, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        import torch

        hidden = argument(args, kwargs, 0, "hidden_states")
        context = argument(args, kwargs, 1, "encoder_hidden_states")
        attention_mask = argument(args, kwargs, 2, "attention_mask")
        text, images, note = split_context(module, context, kwargs)
        if note:
            tracer.note(name, note)
        temporal = tracer.is_temporal(name)
        kind = "temporal" if temporal else ("self" if text is None else "cross")
        if not tracer.wants(name, kind):
            return
        params, options = tracer.params(name, module, self)
        # no autocast: the maps are computed in the trace's dtype, whatever precision the model runs in
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            h = tokens_of(name, hidden).detach().to(dtype=tracer.torch_dtype)  # (B, N, C), converted exactly
            ctx = _context(name, text, h.shape[0], tracer.torch_dtype)
            if temporal:
                self._temporal(tracer, name, h, ctx, attention_mask, params, options)
            else:
                B, N = h.shape[0], h.shape[1]
                grid = tuple(hidden.shape[2:]) if hidden.ndim == 4 else tracer.spatial_grid(name, N, B)
                self._spatial(tracer, name, module, kind, grid, h, ctx, attention_mask, params, options, images, note)

    def _spatial(self, tracer: Any, name: str, module: Any, kind: str, grid: tuple[int, int], h: Any, ctx: Any,
                 attention_mask: Any, params: dict[str, Any], options: dict[str, Any], images: list[Any],
                 note: str) -> None:  # fmt: skip
        B, N = h.shape[0], h.shape[1]
        H, W = grid
        keys = N if ctx is None else ctx.shape[1]
        mask, bias = mask_and_bias(attention_mask, B, N, keys, tracer.torch_dtype, name)
        pixels = rows = None
        if kind == "self":
            pixels, rows = tracer.query_rows(grid, h.device)
        heads = options["heads"]
        head = () if tracer.heads == "mean" else (heads,)
        # (B, heads, Q, K), or its mean over the heads (B, Q, K), computed where the model runs
        P = attention_weights(h, params, options, context=ctx, mask=mask, bias=bias, rows=rows,
                              reduce=tracer.head_reduce)  # fmt: skip
        if kind == "cross":
            maps = P.reshape(B, *head, H, W, keys)  # (B, heads, H, W, M)
        else:
            maps = P.reshape(B, *head, P.shape[-2], H, W)  # (B, heads, Q, H, W)
        tracer.add(name, kind, grid, maps, heads=heads, keys=keys, pixels=pixels, note=note)
        for part in images:
            # the image part: the same queries, the adapter's keys, no mask, a softmax of its own
            ip = _context(f"{name}[{part.part}]", part.tokens, B, tracer.torch_dtype)
            key_params, _ = tracer.params((name, part.part), part.to_k, loader=ip_key_params)
            ip_params = {k: v for k, v in params.items() if not k.startswith("k.")} | key_params
            ip_options = {**options, "scale": ip_scale(module, params["q.weight"].shape[1] // heads)}
            P_ip = attention_weights(h, ip_params, ip_options, context=ip, reduce=tracer.head_reduce)
            tracer.add(name, "cross", grid, P_ip.reshape(B, *head, H, W, ip.shape[1]), heads=heads,
                       keys=ip.shape[1], part=part.part)  # fmt: skip

    def _temporal(self, tracer: Any, name: str, h: Any, ctx: Any, attention_mask: Any, params: dict[str, Any],
                  options: dict[str, Any]) -> None:  # fmt: skip
        """Rows of a frame attention on ``(B·H·W, F, C)``: at each query pixel, the frames' weights."""
        import torch

        sequences, F = h.shape[0], h.shape[1]
        B, H, W = tracer.temporal_grid(name, sequences, F)
        pixels, rows = tracer.query_rows((H, W), h.device)
        if rows is None:
            rows = torch.arange(H * W, device=h.device)
        Q = rows.shape[0]
        # the sequences of the query pixels: sample b, pixel p at b·H·W + p   (B·Q,)
        chosen = (torch.arange(B, device=h.device)[:, None] * (H * W) + rows[None, :]).reshape(-1)
        keys = F if ctx is None else ctx.shape[1]
        mask, bias = mask_and_bias(attention_mask, sequences, F, keys, tracer.torch_dtype, name)
        mask = mask[chosen] if mask is not None and mask.shape[0] != 1 else mask  # the chosen sequences' rows
        bias = bias[chosen] if bias is not None and bias.shape[0] != 1 else bias
        heads = options["heads"]
        P = attention_weights(h[chosen], params, options, context=None if ctx is None else ctx[chosen], mask=mask,
                              bias=bias, reduce=tracer.head_reduce)  # (B·Q, [heads,] F, K)  # fmt: skip
        if tracer.heads == "mean":
            maps = P.reshape(B, Q, F, keys)  # (B, Q, F, K)
        else:
            maps = P.reshape(B, Q, heads, F, keys).permute(0, 2, 1, 3, 4)  # (B, heads, Q, F, K)
        tracer.add(name, "temporal", (H, W), maps, heads=heads, keys=keys, pixels=pixels, frames=F)

    def verify(self, tracer: Any, name: str, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
               output: Any) -> None:  # fmt: skip
        context = argument(args, kwargs, 1, "encoder_hidden_states")
        _, images, _ = split_context(module, context, kwargs)
        if images or isinstance(context, (tuple, list)):
            tracer.note(name, "not verified: the check knows the standard formula, not IP-Adapter's sum of parts")
            return
        super().verify(tracer, name, module, args, kwargs, output)
