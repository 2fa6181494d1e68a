"""The explorer page of a diffusion sample: every attention layer of the toy U-Net at every denoising step.

:func:`sample_explorer` turns the trace that :func:`attention_ref.toys.diffusion.sample` records
(:class:`~attention_ref.toys.diffusion.SampleResult`) into an :class:`~attention_ref.viz.Explorer`.
It lives here, beside the page, because ``viz`` sits above ``toys``: viz imports the toys to draw what they
compute, and the toys never import viz (which would load matplotlib with them).
"""

from __future__ import annotations

import numpy as np

from ..toys.diffusion.sample import EXPLORER_START_LAYER, SampleResult
from ..toys.scenes import SIZE
from .explorer import Explorer, ExplorerLayer

__all__ = ["sample_explorer"]


def sample_explorer(
    result: SampleResult, b: int = 0, *, title: str | None = None, notes: str = "", start_layer: str | None = None
) -> Explorer:
    """Image ``b``'s trace as an explorer page (:class:`Explorer`): every layer, every step.

    Each cross-attention layer keeps the prompt's real tokens (the padding has weight 0), each
    self-attention layer the rows of its query pixels; the step slider is labelled with the
    timesteps (``"t = 999"``), and the left panel shows the clean image ``x̂₀`` that each step
    predicts (``result.x0_pred``, 16×16 RGB: about 20 KB for 25 steps). A self-attention layer without
    query pixels (``sample(..., queries=())``) is left out. The page opens at the last step on
    ``start_layer`` (default :data:`~attention_ref.toys.diffusion.sample.EXPLORER_START_LAYER`, the mid
    block's cross-attention, where the colour words are read from their objects; the first
    cross-attention layer when there is none of that name) with the prompt's first word.
    """
    if not -len(result.prompts) <= b < len(result.prompts):
        raise ValueError(f"image {b} is outside the {len(result.prompts)} prompts")
    real = np.flatnonzero(result.context_mask[b])  # the prompt's tokens, padding left out
    layers = []
    for layer in result.layers:
        h, w = layer.grid
        maps = layer.maps[b]
        if layer.kind == "cross":
            S, heads = maps.shape[:2]
            weights = maps.reshape(S, heads, h * w, -1)[..., real]  # (S, heads, h·w, real tokens)
            layers.append(ExplorerLayer(layer.name, "cross", (h, w), weights))
        elif len(layer.queries):
            # image pixels in one cell of a coarse layer share its row: keep each cell once
            _, first = np.unique(layer.queries, axis=0, return_index=True)
            order = np.sort(first)
            S, heads, Q = maps.shape[:3]
            weights = maps.reshape(S, heads, Q, h * w)[:, :, order]  # (S, heads, distinct cells, h·w)
            layers.append(ExplorerLayer(layer.name, "self", (h, w), weights, query_pixels=layer.queries[order]))
    if not layers:
        raise ValueError("the trace holds no attention maps (sample(..., trace=False)?)")
    query = result.queries[len(result.queries) // 2] if len(result.queries) else np.array([SIZE // 2, SIZE // 2])
    if start_layer is None and any(L.name == EXPLORER_START_LAYER for L in layers):
        start_layer = EXPLORER_START_LAYER
    return Explorer(
        layers=tuple(layers),
        image=result.images[b],
        tokens=tuple(result.tokens[b]),
        steps=tuple(f"t = {int(t)}" for t in result.timesteps),
        title=title or f"“{result.prompts[b]}”, denoised in {len(result.timesteps)} DDIM steps",
        notes=notes,
        start_query=((query[0] + 0.5) / SIZE, (query[1] + 0.5) / SIZE),
        step_images=np.clip((result.x0_pred[b] + 1.0) / 2.0, 0.0, 1.0),  # (S, 16, 16, 3) from [−1, 1]
        step_images_label="x̂₀, the clean image this step predicts",
        start_layer=start_layer,
    )
