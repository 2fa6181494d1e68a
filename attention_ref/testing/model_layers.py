"""Which attention modules ``check_model`` checks, what kind each call is, and which judge reads it.

The modules are those the trace knows (:mod:`attention_ref.interop.trace.families`): diffusers' ``Attention``
(U-Nets, VAEs, PixArt, DiT, video U-Nets; SD3's joint layers; Sana's linear attention), ``FluxAttention`` and
``WanAttention``. :func:`check_call` judges one call of any of them, by the rule of :mod:`.blocks` with the
reference of its family:

=====================  ============================================  ==========================================
family                 judge                                         kinds
=====================  ============================================  ==========================================
diffusers Attention    :func:`.blocks.judge_attention_call`          ``self``, ``cross``, ``temporal`` (frames)
SD3/SD3.5 joint        :func:`.transformer_calls.judge_joint_call`   ``joint`` (two streams), ``self`` (one)
FluxAttention          :func:`.transformer_calls.judge_joint_call`   ``joint`` (double- and single-stream)
WanAttention           :func:`.transformer_calls.judge_wan_call`     ``self``, ``cross``
Sana's linear          :func:`.transformer_calls.judge_linear_call`  ``self``
=====================  ============================================  ==========================================
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from ..interop.trace.families import family_of
from ..interop.trace.families.ip_adapter import is_ip_processor
from ..interop.trace.hooks import TEMPORAL_CONTAINERS
from .blocks import CallJudging, judge_attention_call
from .policy import Policy
from .report import OutputCheck
from .transformer_calls import judge_joint_call, judge_linear_call, judge_wan_call

__all__ = ["attention_modules", "call_inputs", "call_kind", "check_call", "judge_call"]


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


def _plain_attention_call(
    hidden_states: Any, encoder_hidden_states: Any = None, attention_mask: Any = None, **cross_attention_kwargs: Any
) -> None:
    """The arguments of a diffusers ``Attention`` call: how a call is read for ``(params, options)``."""


# a forward that hides its signature behind (*args, **kwargs) (a wrapper without __wrapped__): its positional
# arguments are named in diffusers' order, the fourth by the module's class
_POSITIONAL = ("hidden_states", "encoder_hidden_states", "attention_mask")
_FOURTH = {"FluxAttention": "image_rotary_emb", "WanAttention": "rotary_emb"}


def call_inputs(module: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The call's arguments by name, bound as ``module.forward`` binds them (diffusers' extra keywords, e.g.
    ``cross_attention_kwargs``, by their own names); ``TypeError`` for arguments the module would refuse."""
    forward = _plain_attention_call if isinstance(module, tuple) else module.forward
    try:
        bound = inspect.signature(forward).bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"the call's arguments do not fit {type(module).__name__}'s forward: {err}") from None
    named: dict[str, Any] = {}
    for key, value in bound.arguments.items():
        kind = bound.signature.parameters[key].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            order = (*_POSITIONAL, _FOURTH.get(type(module).__name__, "fourth argument"))
            if len(value) > len(order):
                raise TypeError(f"{type(module).__name__} takes at most {len(order)} positional arguments {order}")
            named.update(zip(order, value, strict=False))
        else:
            named.update(value if kind is inspect.Parameter.VAR_KEYWORD else {key: value})
    if named.get("hidden_states") is None:
        raise TypeError(f"a call of {type(module).__name__} needs its hidden_states; got {sorted(named)}")
    return named


def call_kind(family: str, temporal: bool, inputs: Mapping[str, Any]) -> str:
    """The kind of one call (``inputs`` from :func:`call_inputs`): ``"joint"`` for a joint layer's (Flux's
    single-stream blocks too: text and image joined), ``"temporal"`` inside a temporal block, else ``"self"`` or
    ``"cross"``."""
    context = inputs.get("encoder_hidden_states")
    if family == "FluxAttention" or (family == "SD3Attention" and context is not None):
        return "joint"
    if temporal and family == "StandardAttention":
        return "temporal"
    return "self" if context is None else "cross"


def judge_call(family: str, module: Any, inputs: Mapping[str, Any], judging: CallJudging) -> OutputCheck:
    """The :class:`~attention_ref.testing.OutputCheck` of one call of ``module`` (of ``family``, the name of its
    trace family), ``inputs`` as :func:`call_inputs` reads them. Raises what the judge raises
    (``NotImplementedError`` for what the reference does not express)."""
    if family == "SanaLinearAttention":
        return judge_linear_call(module, inputs, judging)
    if family == "SD3Attention":
        return judge_joint_call(module, {**inputs, "attention_mask": None}, judging)  # SD3's processor takes no mask
    if family == "FluxAttention":
        return judge_joint_call(module, inputs, judging)
    if family == "WanAttention":
        return judge_wan_call(module, inputs, judging)
    context = inputs.get("encoder_hidden_states")
    if isinstance(context, (tuple, list)) or is_ip_processor(getattr(module, "processor", None)):
        # IP-Adapter: a (text, image embeddings) pair, or the image tokens appended to the text
        if isinstance(context, (tuple, list)):
            what = f"a {type(context).__name__} context"
        else:
            what = "a context with the image tokens appended to the text"
        raise NotImplementedError(
            f"{what} (IP-Adapter's text and image embeddings): the reference block has no image-prompt branch"
        )
    return judge_attention_call(module, inputs, judging)


def check_call(
    attn: Any,
    *args: Any,
    output: Any,
    dtype: str,
    policy: Policy | str | None = None,
    name: str = "call",
    seed: int = 0,
    **kwargs: Any,
) -> OutputCheck:
    """Judge one recorded call of an attention module: its output against the float64 reference's.

    The reference runs in float64 on the call's inputs as they are (already in the dtype) with the module's
    weights; the allowed error is ``c·(simulated modules' error) + f·ε·max‖y‖``, the block rule of
    :func:`~attention_ref.testing.blocks.check_diffusers_attention` (forward only). The module's family picks the
    reference and the simulated chain (the table in :mod:`attention_ref.testing.model_layers`).

    Inputs:
        attn: the module, its weights in the dtype under test as the model ran: a diffusers ``Attention`` (U-Nets,
            VAEs, PixArt, DiT, video U-Nets, SD3's joint layers, Sana's linear attention), ``FluxAttention`` or
            ``WanAttention``; or ``(params, options)`` from :func:`attention_ref.interop.from_diffusers` for a
            plain ``Attention`` block.
        args, kwargs: the call's arguments as the module got them (torch tensors or NumPy): ``hidden_states``,
            ``encoder_hidden_states``, ``attention_mask``, and Flux's ``image_rotary_emb`` or Wan's
            ``rotary_emb``. What each family reads from them: :func:`.blocks.judge_attention_call`,
            :func:`.transformer_calls.judge_joint_call`, ``judge_wan_call``, ``judge_linear_call``.
        output: what the module returned, in ``dtype``: shaped like ``hidden_states`` (``C_out`` channels), or a
            two-stream joint layer's ``(y, y_context)``.
        dtype: the dtype the model ran in; policy: ``None`` (default) for the one matching the module's
            arithmetic (:func:`~attention_ref.testing.blocks.module_policy`), or a policy or its name;
        name: the row's case name; seed: for the simulated modules.

    Returns:
        One :class:`~attention_ref.testing.OutputCheck`: ``ratio`` (worst error / allowed), ``ok``, ``note``.

    Raises:
        TypeError for a module no judge knows, arguments its forward would refuse, or inputs not in ``dtype``;
        NotImplementedError for what the reference does not express (an IP-Adapter's image prompt, an additive
        bias in the mask); ValueError for inputs whose shapes do not fit the module.
    """
    if isinstance(attn, tuple):
        if len(attn) != 2 or not all(isinstance(part, Mapping) for part in attn):
            kinds = ", ".join(type(part).__name__ for part in attn)
            raise TypeError(f"attn as a tuple must be (params, options) from from_diffusers; got ({kinds})")
        family = "StandardAttention"
    else:
        found = family_of(attn)
        if found is None:
            raise TypeError(f"{type(attn).__name__} is not an attention module the reference knows (see docs/trace.md)")
        family = type(found).__name__
    judging = CallJudging(output=output, dtype=dtype, policy=policy, name=name, seed=seed)
    return judge_call(family, attn, call_inputs(attn, args, kwargs), judging)
