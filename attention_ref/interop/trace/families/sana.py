r"""Sana's self-attention: linear attention with the ReLU feature map (``SanaLinearAttnProcessor2_0``).

Sana's ``attn1`` computes ``o_i = φ(q_i)ᵀ(Σ_j φ(k_j) v_jᵀ) / (φ(q_i)·Σ_j φ(k_j) + 10⁻¹⁵)`` with ``φ = ReLU``,
per head (channels head-major), without forming the weights. They are

.. math::
    A_{ij} = \frac{\phi(q_i)\cdot\phi(k_j)}{\sum_{j'} \phi(q_i)\cdot\phi(k_{j'}) + 10^{-15}}, \quad \phi = \mathrm{relu}

(:func:`..weights.linear_rows`): the trace records them as ``"self"`` rows at the query pixels. A row sums to
just under 1, never more. Sana's cross-attention (``attn2``, ``SanaAttnProcessor2_0``) is a softmax, read by
:mod:`.standard`. diffusers computes this product in float32 whatever the model's dtype.
"""

from __future__ import annotations

from typing import Any

from ....ops.heads import split_heads
from ....ops.linear import linear_forward
from ...diffusers import from_diffusers
from ..weights import linear_rows
from .base import Family, argument, tokens_of

__all__ = ["SANA_EPS", "SanaLinearAttention"]

SANA_EPS = 1e-15  # SanaLinearAttnProcessor2_0's term in the denominator


class SanaLinearAttention(Family):
    """diffusers ``Attention`` running ``SanaLinearAttnProcessor2_0`` (ReLU linear attention). Which module runs
    linear attention is known only from its processor's class: a processor whose class name does not contain
    ``"SanaLinear"`` is taken for softmax attention."""

    module = "Attention"

    def claims(self, module: Any) -> bool:
        from diffusers.models.attention_processor import Attention

        # SanaLinearAttnProcessor2_0, its PAG variants, and processors named after it (a kernel's own)
        return isinstance(module, Attention) and "SanaLinear" in type(module.processor).__name__

    def static_kinds(self, module: Any, temporal: bool) -> tuple[str, ...]:
        return ("self",)

    def load(self, module: Any, dtype: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        return from_diffusers(module, dtype=dtype)

    def record(self, tracer: Any, name: str, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        import torch

        hidden = argument(args, kwargs, 0, "hidden_states")
        if argument(args, kwargs, 1, "encoder_hidden_states") is not None:
            raise NotImplementedError(f"{name}: Sana's linear attention called with a context")
        if not tracer.wants(name, "self"):
            return
        params, options = tracer.params(name, module, self)
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            h = tokens_of(name, hidden).detach().to(dtype=tracer.torch_dtype)  # (B, N, C)
            B, N = h.shape[0], h.shape[1]
            grid = tuple(hidden.shape[2:]) if hidden.ndim == 4 else tracer.spatial_grid(name, N, B)
            pixels, rows = tracer.query_rows(grid, h.device)
            queries = h if rows is None else h[:, rows]  # (B, Q, C)
            heads = options["heads"]
            q, _ = linear_forward(queries, params["q.weight"], params.get("q.bias"))
            k, _ = linear_forward(h, params["k.weight"], params.get("k.bias"))
            # φ(q) = relu(q), φ(k) = relu(k), per head   (B, heads, Q, d), (B, heads, N, d)
            fq, fk = (torch.relu(split_heads(a, heads)) for a in (q, k))
            A = linear_rows(fq, fk, SANA_EPS, reduce=tracer.head_reduce)  # (B, [heads,] Q, N)
            head = () if tracer.heads == "mean" else (heads,)
            maps = A.reshape(B, *head, A.shape[-2], *grid)  # (B, heads, Q, H, W)
        tracer.add(name, "self", grid, maps, heads=heads, keys=N, pixels=pixels,
                   note="linear attention (ReLU features): rows sum to just under 1")  # fmt: skip
