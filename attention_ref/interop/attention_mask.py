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

``FluxAttention`` reads its mask by another rule: ``FluxAttnProcessor`` hands ``attention_mask`` as it is to
``dispatch_attention_fn``, whose default (native) backend makes a ``(B, M)`` mask ``(B, 1, 1, M)`` and gives any
other to ``scaled_dot_product_attention``, which broadcasts it to ``(B, heads, N, M)`` from the right: a ``(B, N, M)``
mask is read per head there, and ``(B, 1, 1, M)`` is the per-sample key mask. :func:`sdpa_mask_and_bias` reads that
rule; the values (boolean, or added to the logits) are read as above.

Every reader of a call's mask uses these two: the trace (:mod:`.trace.families`), which adds the bias to its logits,
and the oracle's judges (:func:`attention_ref.testing.check_call`: ``judge_attention_call``, ``judge_joint_call``),
whose reference blocks take a mask only (a bias of ``−1000`` or below is a dropped key there, anything else other
than 0 is refused).
"""

from __future__ import annotations

from typing import Any

from ..backend import namespace

__all__ = ["mask_and_bias", "sdpa_mask_and_bias"]


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
    if a.ndim == 2:
        a = a[:, None, :]
    if a.ndim != 3 or a.shape[0] not in (1, batch) or a.shape[1] not in (1, queries) or a.shape[2] != keys:
        raise ValueError(
            f"{prefix}attention_mask of shape {tuple(attention_mask.shape)} does not fit {batch} samples, "
            f"{queries} queries and {keys} keys (expected (B, M), (B, 1, M) or (B, N, M))"
        )
    return _values(a[:, None], dtype, prefix)  # (B, 1, 1 or N, M)


def sdpa_mask_and_bias(
    attention_mask: Any, batch: int, heads: int, queries: int, keys: int, dtype: Any, where: str = ""
) -> tuple[Any, Any]:
    """An ``attention_mask`` that the processor hands to ``scaled_dot_product_attention`` as it is (``FluxAttention``'s
    ``FluxAttnProcessor``, through ``dispatch_attention_fn``), as ``(mask, bias)``, each ``(B or 1, heads or 1,
    1 or N, M)`` or ``None``.

    Inputs:
        attention_mask: boolean or additive, a torch tensor or any Array API array; ``None``. ``(B, M)`` is a key mask
            per sample (the native backend's reshape to ``(B, 1, 1, M)``); any other shape of 1 to 4 axes must
            broadcast to ``(B, heads, N, M)`` aligned on the right, as ``scaled_dot_product_attention`` reads it
            (so ``(B, 1, 1, M)`` is per sample, and a 3-D ``(heads, N, M)`` per head).
        batch, heads, queries, keys: the call's ``B``, heads, ``N`` (all the queries, joined) and ``M`` (all the keys).
        dtype, where: as for :func:`mask_and_bias`.

    Returns:
        ``(mask, bias)`` as :func:`mask_and_bias` returns them, with the heads axis the mask has (``heads`` or 1).

    Raises:
        ValueError for a shape that does not broadcast so, and for NaN or ``+inf`` in an additive mask.
    """
    if attention_mask is None:
        return None, None
    prefix = f"{where}: " if where else ""
    a = attention_mask
    xp = namespace(a)
    if a.ndim == 2 and tuple(a.shape) == (batch, keys):
        a = a[:, None, None, :]  # a key mask per sample   (B, 1, 1, M)
    target = (batch, heads, queries, keys)
    fits = 1 <= a.ndim <= 4 and all(n in (1, t) for n, t in zip(reversed(a.shape), reversed(target), strict=False))
    if not fits:
        raise ValueError(
            f"{prefix}attention_mask of shape {tuple(attention_mask.shape)} does not broadcast to (B, heads, N, M) = "
            f"{target} (scaled_dot_product_attention's rule; a (B, M) mask is a key mask per sample)"
        )
    a = xp.reshape(a, (1,) * (4 - a.ndim) + tuple(a.shape))  # (B or 1, heads or 1, N or 1, M or 1)
    if a.shape[-1] != keys:  # one value for every key: broadcast it, so that every row has its M entries
        a = xp.broadcast_to(a, (*a.shape[:-1], keys))
    return _values(a, dtype, prefix)


def _values(a: Any, dtype: Any, prefix: str) -> tuple[Any, Any]:
    """``(mask, bias)`` of a mask already in its 4-D shape: a boolean one is the mask; an additive one's ``−inf``
    entries are the mask and its finite ones the bias (``None`` when 0 everywhere); NaN and ``+inf`` refused."""
    xp = namespace(a)
    if a.dtype == xp.bool:
        return a, None
    a = xp.astype(a, dtype)
    if bool(xp.any(xp.isnan(a))) or bool(xp.any(a == xp.inf)):
        raise ValueError(f"{prefix}attention_mask holds NaN or +inf")
    finite = xp.isfinite(a)
    mask = None if bool(xp.all(finite)) else finite
    bias = xp.where(finite, a, xp.zeros_like(a))
    return mask, (bias if bool(xp.any(bias != 0)) else None)
