"""diffusers' ``attention_mask``, read by one rule: which keys each query may attend to, and what the logits get added.

diffusers' ``Attention`` takes ``attention_mask`` as its processors use it: ``Attention.prepare_attention_mask``
repeats it over the heads, and the processor adds it to the logits (``AttnProcessor``'s ``baddbmm``) or hands it to
``scaled_dot_product_attention`` (``AttnProcessor2_0``), which adds a float mask and keeps the keys of a boolean
one. So:

* a boolean mask keeps the keys where it is True;
* any other mask is added to the logits: 0 keeps a key, ``−inf`` drops it, diffusers' ``−10000`` (what a pipeline's
  ``encoder_attention_mask`` becomes) leaves it a weight that underflows to 0 — unless every key of a row has it:
  then the row is the plain softmax of its logits, as in diffusers — and any other value biases it. NaN and
  ``+inf`` are refused.

Shapes ``(B, M)``, ``(B, 1, M)`` (one row for every query) or ``(B, N, M)``. ``B`` is the call's batch, or 1: one
mask for every sample (diffusers' own processors repeat a mask over the heads only, so they take a batch of one
for a larger batch only with one head, where ``baddbmm`` broadcasts it; nothing they compute is refused here).

Both readers of a call's mask use :func:`mask_and_bias`: the trace (:mod:`.trace.families`), which adds the bias
to its logits, and the oracle's :func:`attention_ref.testing.check_attention_call`, whose reference block takes a
mask only (a bias of ``−1000`` or below is a dropped key there, anything else other than 0 is refused).
"""

from __future__ import annotations

from typing import Any

from ..backend import namespace

__all__ = ["mask_and_bias"]


def mask_and_bias(
    attention_mask: Any, batch: int, queries: int, keys: int, dtype: Any, where: str = ""
) -> tuple[Any, Any]:
    """diffusers' ``attention_mask`` as ``(mask, bias)``, each ``(B or 1, 1, 1 or N, M)`` or ``None``.

    Inputs:
        attention_mask: a torch tensor or any array of the Array API (NumPy …), boolean or additive; ``None``.
        batch, queries, keys: the call's ``B``, ``N`` and ``M``.
        dtype: of the bias (the array's own library's dtype, e.g. ``torch.float32`` or ``numpy.float64``).
        where: the layer, for the messages (``"down_blocks.0.attentions.0.transformer_blocks.0.attn2"``).

    Returns:
        ``mask``: boolean, True = may attend (a boolean mask itself, or the finite entries of an additive one;
        ``None`` when every key is kept); ``bias``: the additive mask's finite entries, 0 where the mask drops
        (``None`` when it is 0 everywhere, or the mask is boolean). Same library and device as the input.

    Raises:
        ValueError for a shape that does not fit the call, and for NaN or ``+inf`` in an additive mask.
    """
    if attention_mask is None:
        return None, None
    prefix = f"{where}: " if where else ""
    a = attention_mask
    xp = namespace(a)
    if a.ndim == 2:
        a = a[:, None, :]
    if a.ndim != 3 or a.shape[0] not in (1, batch) or a.shape[1] not in (1, queries) or a.shape[2] != keys:
        raise ValueError(
            f"{prefix}attention_mask of shape {tuple(attention_mask.shape)} does not fit {batch} samples, "
            f"{queries} queries and {keys} keys (expected (B, M), (B, 1, M) or (B, N, M))"
        )
    a = a[:, None]  # (B, 1, 1 or N, M)
    if a.dtype == xp.bool:
        return a, None
    a = xp.astype(a, dtype)
    if bool(xp.any(xp.isnan(a))) or bool(xp.any(a == xp.inf)):
        raise ValueError(f"{prefix}attention_mask holds NaN or +inf")
    finite = xp.isfinite(a)
    mask = None if bool(xp.all(finite)) else finite
    bias = xp.where(finite, a, xp.zeros_like(a))
    return mask, (bias if bool(xp.any(bias != 0)) else None)
