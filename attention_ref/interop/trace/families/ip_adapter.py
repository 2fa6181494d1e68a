"""IP-Adapter: the image part of a ``(text, image)`` context, each part with its own softmax.

IP-Adapter's processors (``IPAdapterAttnProcessor``, ``IPAdapterAttnProcessor2_0``, ``IPAdapterXFormersAttnProcessor``)
attend with the layer's queries to the text tokens (the layer's ``to_k``, its mask) and, separately, to each
adapter's image tokens (the processor's ``to_k_ip[i]``, no mask), and add the results:

    y = to_out(softmax(scale · Q K_textᵀ + mask) V_text + Σ_i s_i softmax(scale · Q K_iᵀ) V_i)

so each part's weights are a softmax of their own (rows sum to 1 over the text, and over each image's tokens).
The context comes as the pair ``(text, [image tokens per adapter])``, or, in the older layout, as one tensor
with the image tokens appended to the text (the last ``num_tokens[0]`` tokens are the image's), which the
processor splits as :func:`split_context` does here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..._arrays import as_numpy, weight_in_out

__all__ = ["ImagePart", "ip_key_params", "is_ip_processor", "split_context"]


def is_ip_processor(processor: Any) -> bool:
    """A processor with IP-Adapter's image projections (``to_k_ip``) and token counts (``num_tokens``)."""
    return hasattr(processor, "to_k_ip") and hasattr(processor, "num_tokens") and hasattr(processor, "scale")


class ImagePart:
    """One adapter's image tokens of one call: ``part`` (``"ip0"``, …), ``tokens`` ``(B, M_i, D)``, ``to_k``."""

    def __init__(self, part: str, tokens: Any, to_k: Any) -> None:
        self.part, self.tokens, self.to_k = part, tokens, to_k


def split_context(module: Any, context: Any, kwargs: dict[str, Any]) -> tuple[Any, list[ImagePart], str]:
    """``(text context, image parts, note)`` of one call's ``encoder_hidden_states``.

    The note says what of the image part is not traced and why (a processor that is not IP-Adapter's,
    spatial ``ip_adapter_masks``, a scale of 0, which the processor skips); it is ``""`` when everything is.
    """
    processor = getattr(module, "processor", None)
    ip = is_ip_processor(processor)
    if isinstance(context, (tuple, list)):
        if len(context) != 2:
            return None, [], f"encoder_hidden_states is a {type(context).__name__} of {len(context)}, not (text, image)"
        text, images = context
        if not ip:
            why = f"{type(processor).__name__} is not an IP-Adapter processor"
            return text, [], f"the image part of the (text, image) context is not traced: {why}"
    elif ip and context is not None and getattr(context, "ndim", 0) == 3:
        # the older layout: the image tokens appended to the text, as the processor splits them
        end = context.shape[1] - int(processor.num_tokens[0])
        text, images = context[:, :end], [context[:, end:]]
    else:
        return context, [], ""
    if not isinstance(images, (list, tuple)):
        images = [images]
    if kwargs.get("ip_adapter_masks") is not None:
        return text, [], "the image parts are not traced: ip_adapter_masks (a spatial mask per image) is given"
    parts, notes = [], []
    for i, (tokens, scale, to_k) in enumerate(zip(images, processor.scale, processor.to_k_ip, strict=False)):
        scales = scale if isinstance(scale, list) else [scale]
        if all(s == 0 for s in scales):
            notes.append(f"ip{i}: scale 0, the processor skips it")
            continue
        if tokens.ndim == 4:  # (B, images, tokens, D): one softmax over every image's tokens
            tokens = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])
        parts.append(ImagePart(f"ip{i}", tokens, to_k))
    return text, parts, "; ".join(notes)


def ip_key_params(to_k: Any, dtype: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """An adapter's key projection ``to_k_ip[i]`` as reference parameters ``{"k.weight"(, "k.bias")}``."""
    import torch

    if not isinstance(to_k, torch.nn.Linear) or type(to_k).forward is not torch.nn.Linear.forward:
        raise NotImplementedError(f"to_k_ip is a {type(to_k).__name__}, not a plain torch.nn.Linear")
    params = {"k.weight": weight_in_out(to_k.weight, dtype, "to_k_ip.weight")}
    if to_k.bias is not None:
        params["k.bias"] = as_numpy(to_k.bias, dtype)
    return params, {}


def ip_scale(module: Any, head_dim: int) -> float:
    """The logits' factor of the image part: ``attn.scale`` for ``IPAdapterAttnProcessor`` (its
    ``get_attention_scores``), ``1/√d`` for the ``scaled_dot_product_attention`` and xformers processors."""
    if type(module.processor).__name__ == "IPAdapterAttnProcessor":
        return float(module.scale)
    return head_dim**-0.5
