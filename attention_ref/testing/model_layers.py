"""Which attention modules ``check_model`` checks, what kind each call is, and which judge reads it.

The modules are those the trace knows (:mod:`attention_ref.interop.trace.families`): diffusers' ``Attention``
(U-Nets, VAEs, PixArt, DiT, video U-Nets; SD3's joint layers; Sana's linear attention), ``FluxAttention`` and
``WanAttention``. A call is judged by the rule of :mod:`.blocks` with the reference of its family:

=====================  ======================================  ==========================================
family                 judge                                   kinds
=====================  ======================================  ==========================================
diffusers Attention    :func:`.blocks.check_attention_call`    ``self``, ``cross``, ``temporal`` (frames)
SD3/SD3.5 joint        :func:`.transformer_calls.check_joint_call`  ``joint`` (two streams), ``self`` (one)
FluxAttention          :func:`.transformer_calls.check_joint_call`  ``joint`` (double- and single-stream)
WanAttention           :func:`.transformer_calls.check_wan_call`    ``self``, ``cross``
Sana's linear          :func:`.transformer_calls.check_linear_call` ``self``
=====================  ======================================  ==========================================
"""

from __future__ import annotations

from typing import Any

from ..interop.trace.families import family_of
from ..interop.trace.families.ip_adapter import is_ip_processor
from ..interop.trace.hooks import TEMPORAL_CONTAINERS
from .blocks import check_attention_call
from .transformer_calls import check_joint_call, check_linear_call, check_wan_call

__all__ = ["attention_modules", "call_inputs", "call_kind", "judge_call"]


def attention_modules(model: Any) -> list[tuple[str, Any, str, bool]]:
    """``[(path, module, family, temporal)]`` of every attention module of ``model`` the checks know."""
    modules = dict(model.named_modules())
    found = []
    for name, module in modules.items():
        family = family_of(module)
        if family is None:
            continue
        parts = name.split(".")
        temporal = any(type(modules[".".join(parts[:i])]).__name__ in TEMPORAL_CONTAINERS for i in range(len(parts)))
        found.append((name, module, type(family).__name__, temporal))
    return found


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def call_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """``(hidden_states, encoder_hidden_states)`` of a call (``KeyError`` without hidden states)."""
    return (args[0] if args else kwargs["hidden_states"]), _arg(args, kwargs, 1, "encoder_hidden_states")


def call_kind(family: str, temporal: bool, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The kind of one call: ``"joint"`` for a joint layer's (Flux's single-stream blocks too: text and image
    joined), ``"temporal"`` inside a temporal block, else ``"self"`` or ``"cross"``."""
    _, context = call_inputs(args, kwargs)
    if family == "FluxAttention" or (family == "SD3Attention" and context is not None):
        return "joint"
    if temporal and family == "StandardAttention":
        return "temporal"
    return "self" if context is None else "cross"


def judge_call(
    family: str, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, **judge: Any
) -> Any:
    """The :class:`~attention_ref.testing.OutputCheck` of one call; ``judge``: ``dtype``, ``policy``, ``name``,
    ``seed``. Raises what the judge raises (``NotImplementedError`` for what the reference does not express)."""
    hidden, context = call_inputs(args, kwargs)
    if family == "SanaLinearAttention":
        return check_linear_call(module, hidden, output=output, **judge)
    if family in ("SD3Attention", "FluxAttention"):
        flux = family == "FluxAttention"
        mask = _arg(args, kwargs, 2, "attention_mask") if flux else None  # SD3's processor takes no mask
        rope = _arg(args, kwargs, 3, "image_rotary_emb") if flux else None
        return check_joint_call(module, hidden, context, mask, rope, output=output, **judge)
    if family == "WanAttention":
        return check_wan_call(module, hidden, context, _arg(args, kwargs, 3, "rotary_emb"), output=output, **judge)
    if isinstance(context, (tuple, list)) or is_ip_processor(getattr(module, "processor", None)):
        # IP-Adapter: a (text, image embeddings) pair, or the image tokens appended to the text
        if isinstance(context, (tuple, list)):
            what = f"a {type(context).__name__} context"
        else:
            what = "a context with the image tokens appended to the text"
        raise NotImplementedError(
            f"{what} (IP-Adapter's text and image embeddings): the reference block has no image-prompt branch"
        )
    mask = _arg(args, kwargs, 2, "attention_mask")
    return check_attention_call(module, hidden, context, mask, output=output, **judge)
