"""SD3 and SD3.5: diffusers ``Attention`` with ``JointAttnProcessor2_0`` — joint layers, SD3.5's ``attn2``.

SD3's ``JointTransformerBlock.attn`` has the text stream's projections (``added_kv_proj_dim``) and joins
``[image; text]``; SD3.5 adds per-head RMS norms of q and k and, in its first blocks, a second attention
``attn2`` on the image tokens alone (one stream). The image tokens are the patches of the model's ``(B, C, H, W)``
input, so the grid is the patch grid. ``JointAttnProcessor2_0`` takes no attention mask (it passes none to the
attention), and neither does the trace. What is recorded: :mod:`.joint`.
"""

from __future__ import annotations

from typing import Any

from ...dit import from_diffusers_joint
from .base import Family, argument, tokens_of
from .joint import record_joint

__all__ = ["SD3Attention"]


class SD3Attention(Family):
    """diffusers ``Attention`` running a joint processor (``JointAttnProcessor2_0`` and its kin)."""

    module = "Attention"

    def claims(self, module: Any) -> bool:
        """A joint processor, or the structure of SD3's layers whatever processor runs them: the text stream's
        projections of a joint block (``context_pre_only`` set), or per-head q/k norms on a self-attention."""
        from diffusers.models.attention_processor import Attention

        if not isinstance(module, Attention):
            return False
        joint = module.added_kv_proj_dim is not None and getattr(module, "context_pre_only", None) is not None
        normed_self = module.norm_q is not None and module.added_kv_proj_dim is None and not module.is_cross_attention
        return joint or normed_self or "Joint" in type(module.processor).__name__

    def static_kinds(self, module: Any, temporal: bool) -> tuple[str, ...]:
        return ("joint", "self") if getattr(module, "added_kv_proj_dim", None) is not None else ("self",)

    def load(self, module: Any, dtype: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        return from_diffusers_joint(module, dtype=dtype)

    def record(self, tracer: Any, name: str, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        import torch

        hidden = argument(args, kwargs, 0, "hidden_states")
        context = argument(args, kwargs, 1, "encoder_hidden_states")
        if kwargs.get("ip_hidden_states") is not None:
            tracer.note(name, "the IP-Adapter image part (ip_hidden_states) is not traced")
        params, options = tracer.params(name, module, self)
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            x = tokens_of(name, hidden).detach().to(dtype=tracer.torch_dtype)  # (B, N, C)
            c = None if context is None else context.detach().to(dtype=tracer.torch_dtype)  # (B, M, D)
            grid = tracer.spatial_grid(name, x.shape[1], x.shape[0])
            record_joint(tracer, name, grid, x, c if "add_k.weight" in params else None, params, options)
