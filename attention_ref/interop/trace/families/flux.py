"""Flux: ``FluxAttention`` — double-stream joint layers (text first) and single-stream layers, with RoPE.

Flux's transformer takes its latent already cut into 2×2 patches, as tokens ``(B, N, C)``; where each token sits
is its ``img_ids`` row ``(0, row, col)``, one of the model's inputs. The trace reads the grid from them (a full
row-major grid ``(H, W)``, else the call is refused) when the traced model is called. A double-stream block
(``FluxTransformerBlock.attn``) gets the image tokens and the text; a single-stream block
(``FluxSingleTransformerBlock.attn``) gets ``[text; image]`` joined, the text the first ``L − N`` tokens. The
rotary tables are the call's own ``image_rotary_emb`` (converted exactly). An ``attention_mask`` (boolean, or added to
the logits) is read as ``FluxAttnProcessor`` hands it to ``scaled_dot_product_attention``
(:func:`~attention_ref.interop.attention_mask.sdpa_mask_and_bias`: ``(B, L)`` a key mask per sample, any other shape
broadcast to ``(B, heads, L, L)``). What is recorded: :mod:`.joint`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...attention_mask import sdpa_mask_and_bias
from ...dit import from_diffusers_joint
from .base import Family, argument
from .joint import record_joint

__all__ = ["FluxAttention", "grid_of_ids"]


def grid_of_ids(ids: Any) -> tuple[int, int]:
    """``(H, W)`` of image position ids ``(N, 3)`` that enumerate a grid row-major: ``(·, r0 + n // W, c0 + n % W)``."""
    a = np.asarray(ids.detach().cpu().double().numpy() if hasattr(ids, "detach") else ids, dtype=np.float64)
    if a.ndim == 3:
        a = a[0]
    if a.ndim != 2 or a.shape[1] < 3 or a.shape[0] == 0:
        raise ValueError(f"img_ids of shape {a.shape} are not (N, 3) position ids")
    rows, cols = a[:, 1] - a[0, 1], a[:, 2] - a[0, 2]
    W = int(cols.max()) + 1
    n = np.arange(a.shape[0])
    if a.shape[0] % W or not (np.array_equal(rows, n // W) and np.array_equal(cols, n % W)):
        raise ValueError(
            "img_ids do not enumerate one (H, W) grid row by row (e.g. Flux Kontext's reference-image tokens "
            "after the image's): the trace cannot lay these tokens out as a map"
        )
    return a.shape[0] // W, W


class FluxAttention(Family):
    """diffusers' ``FluxAttention`` (``FluxAttnProcessor``)."""

    module = "FluxAttention"

    def claims(self, module: Any) -> bool:
        return type(module).__name__ == "FluxAttention"

    def static_kinds(self, module: Any, temporal: bool) -> tuple[str, ...]:
        return ("joint", "self")

    def load(self, module: Any, dtype: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        return from_diffusers_joint(module, dtype=dtype)

    def on_model_call(self, tracer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = tracer.model_inputs.get("img_ids")
        tracer.family_state["flux_grid"] = None if ids is None else grid_of_ids(ids)

    def record(self, tracer: Any, name: str, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        import torch

        hidden = argument(args, kwargs, 0, "hidden_states")
        context = argument(args, kwargs, 1, "encoder_hidden_states")
        attention_mask = argument(args, kwargs, 2, "attention_mask")
        rope = argument(args, kwargs, 3, "image_rotary_emb")
        grid = tracer.family_state.get("flux_grid")
        if grid is None:
            raise ValueError(f"{name}: the traced model was not called with img_ids; the trace needs them for the grid")
        N = grid[0] * grid[1]
        if kwargs.get("ip_hidden_states") is not None:
            tracer.note(name, "the IP-Adapter image part (ip_hidden_states) is not traced")
        params, options = tracer.params(name, module, self)
        dtype = tracer.torch_dtype
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            x = hidden.detach().to(dtype=dtype)  # (B, N, C), or (B, M + N, C) joined
            c = None if context is None else context.detach().to(dtype=dtype)  # (B, M, D)
            B, L = x.shape[0], x.shape[1] + (0 if c is None else c.shape[1])
            joined_text = L - N if c is None else 0
            if (c is None and L < N) or (c is not None and x.shape[1] != N):
                raise ValueError(f"{name}: {x.shape[1]} tokens do not fit the {grid[0]}×{grid[1]} grid of img_ids")
            tables = None if rope is None else tuple(t.detach().to(dtype=dtype) for t in rope)
            # read as FluxAttnProcessor hands it to scaled_dot_product_attention   (B|1, heads|1, 1|L, L)
            mask, bias = sdpa_mask_and_bias(attention_mask, B, options["heads"], L, L, dtype, name)
            record_joint(tracer, name, grid, x, c, params, options, joined_text=joined_text, rope=tables, mask=mask,
                         bias=bias)  # fmt: skip
