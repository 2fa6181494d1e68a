"""Small, independent attention implementations to try the oracle on (and to show how to write one).

* :func:`numpy_attention` / :func:`numpy_attention_grad`: plain NumPy in float32
  accumulation, written from the formulas, not from :mod:`attention_ref.attention`.
* :func:`torch_sdpa`: ``torch.nn.functional.scaled_dot_product_attention`` in the
  harness's signature, with PyTorch choosing the backend; :func:`torch_sdpa_math` and
  :func:`torch_sdpa_flash` pin the MATH and the (CPU) FlashAttention backend;
  :func:`torch_mha` goes through ``torch.nn.functional.multi_head_attention_forward``
  with identity projections. Wrap them with :func:`~attention_ref.testing.from_torch`.

:func:`torch_mha` cannot take a custom scale, and says so in its ``unsupported``
attribute (features of :attr:`attention_ref.testing.Case.features`), which the harness
reads: those cases are reported as "not supported" rather than failed.

From the command line::

    python -m attention_ref check attention_ref.testing.examples:numpy_attention --dtype float16
    python -m attention_ref check attention_ref.testing.examples:torch_sdpa --torch --dtype bfloat16
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .harness import NotSupported

__all__ = ["numpy_attention", "numpy_attention_grad", "torch_mha", "torch_sdpa", "torch_sdpa_flash", "torch_sdpa_math"]


def _weights(q: np.ndarray, k: np.ndarray, mask: Any, bias: Any, scale: float | None) -> np.ndarray:
    """P in float32: ``softmax(scale·q kᵀ + bias)`` over allowed keys, rows without a key all 0.  (..., N, M)"""
    q32, k32 = q.astype(np.float32), k.astype(np.float32)
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = np.float32(scale) * (q32 @ np.swapaxes(k32, -1, -2))
    if bias is not None:
        s = s + bias.astype(np.float32)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)
    e = np.exp(s - m)
    total = np.sum(e, axis=-1, keepdims=True)
    return e / np.where(total == 0, 1.0, total)


def numpy_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, mask: Any = None, bias: Any = None,
                    scale: float | None = None) -> np.ndarray:  # fmt: skip
    """Attention in float32 accumulation; returns ``q``'s dtype. ``(..., N, dv)``"""
    p = _weights(q, k, mask, bias, scale)
    return (p @ v.astype(np.float32)).astype(q.dtype)


def numpy_attention_grad(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    dout: np.ndarray,
    *,
    mask: Any = None,
    bias: Any = None,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dq, dk, dv)`` of :func:`numpy_attention`, in float32 accumulation, returned in ``q``'s dtype."""
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    p = _weights(q, k, mask, bias, scale)
    q32, k32, v32, do32 = (a.astype(np.float32) for a in (q, k, v, dout))
    dv = np.swapaxes(p, -1, -2) @ do32
    dp = do32 @ np.swapaxes(v32, -1, -2)
    ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
    dq = np.float32(scale) * (ds @ k32)
    dk = np.float32(scale) * (np.swapaxes(ds, -1, -2) @ q32)
    return dq.astype(q.dtype), dk.astype(q.dtype), dv.astype(q.dtype)


def _sdpa_mask(mask: Any, bias: Any) -> Any:
    """One ``attn_mask`` for SDPA from a boolean mask and an additive bias: ``-inf`` where the mask is False."""
    if bias is None:
        return mask
    return bias if mask is None else bias.masked_fill(~mask, float("-inf"))


def torch_sdpa(q: Any, k: Any, v: Any, *, mask: Any = None, bias: Any = None, scale: float | None = None) -> Any:
    """``torch.nn.functional.scaled_dot_product_attention`` in the harness's signature (torch tensors).

    SDPA takes one ``attn_mask``, boolean or additive; a mask and a bias together become one
    additive mask with ``-inf`` where the boolean mask is False. PyTorch picks the backend.
    """
    import torch

    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=_sdpa_mask(mask, bias), scale=scale)


def torch_sdpa_math(q: Any, k: Any, v: Any, *, mask: Any = None, bias: Any = None, scale: float | None = None) -> Any:
    """:func:`torch_sdpa` on PyTorch's MATH backend (the unfused composite of matmul and softmax)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return torch_sdpa(q, k, v, mask=mask, bias=bias, scale=scale)


def _pad_last(t: Any, width: int) -> Any:
    """``t`` with zero columns appended to its last axis up to ``width`` (exact: the extra columns add 0)."""
    import torch

    extra = width - t.shape[-1]
    return t if extra == 0 else torch.nn.functional.pad(t, (0, extra))


def torch_sdpa_flash(q: Any, k: Any, v: Any, *, mask: Any = None, bias: Any = None, scale: float | None = None) -> Any:
    """:func:`torch_sdpa` on the FlashAttention backend (on the CPU: PyTorch's tiled CPU kernel).

    The backend wants ``(batch, heads, tokens, features)`` and one width for q, k and v: the leading dims are
    folded into the batch (and unfolded after), and the narrower of ``d`` and ``dv`` is padded with zero
    columns — exact: zero columns of q and k add nothing to the logits (the scale is passed explicitly), and
    zero columns of v only make output columns that are cut off again.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    lead, N, M, d, dv = q.shape[:-2], q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    width = max(d, dv)

    def four(t: Any) -> Any:  # (..., rows, cols) → (batch, 1, rows, cols)
        return t.reshape(-1, 1, *t.shape[-2:])

    attn_mask = _sdpa_mask(mask, bias)
    if attn_mask is not None:
        attn_mask = four(torch.broadcast_to(attn_mask, (*lead, N, M)))
    q4, k4, v4 = (four(_pad_last(t, width)) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(
            q4, k4, v4, attn_mask=attn_mask, scale=d**-0.5 if scale is None else scale
        )
    return out[..., :dv].reshape(*lead, N, dv)


def torch_mha(q: Any, k: Any, v: Any, *, mask: Any = None, bias: Any = None, scale: float | None = None) -> Any:
    """``torch.nn.functional.multi_head_attention_forward``, one head, identity projections, in the harness's signature.

    The function takes ``(tokens, batch, features)`` with one batch axis (the leading dims are folded into it),
    a mask in which True means *masked out* (the opposite of ours), and always scales by one over the square
    root of its width. So a custom scale is not supported (declared in ``torch_mha.unsupported``); ``dv < d``
    works by padding v with zero columns (cut off again), ``dv > d`` would change the width and with it the
    scale, and raises :class:`~attention_ref.testing.NotSupported`.
    """
    import torch

    lead, N, M, d, dv = q.shape[:-2], q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    if dv > d:
        raise NotSupported("dv > d: multi_head_attention_forward scales by its width, which would change")

    def tokens_first(t: Any) -> Any:  # (..., tokens, d) → (tokens, batch, d)
        return t.reshape(-1, *t.shape[-2:]).transpose(0, 1)

    eye = torch.eye(d, dtype=q.dtype, device=q.device)
    attn_mask = None
    if mask is not None or bias is not None:
        allowed = torch.ones((), dtype=torch.bool, device=q.device) if mask is None else mask
        additive = torch.zeros((), dtype=q.dtype, device=q.device) if bias is None else bias
        attn_mask = torch.broadcast_to(additive.masked_fill(~allowed, float("-inf")), (*lead, N, M)).reshape(-1, N, M)
    out, _ = torch.nn.functional.multi_head_attention_forward(
        tokens_first(q), tokens_first(k), tokens_first(_pad_last(v, d)), d, 1,
        in_proj_weight=None, in_proj_bias=None, bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=eye, out_proj_bias=None, training=False, need_weights=False, attn_mask=attn_mask,
        use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
    )  # fmt: skip
    return out.transpose(0, 1)[..., :dv].reshape(*lead, N, dv)  # (tokens, batch, d) → (..., N, dv)


torch_mha.unsupported = ("custom scale",)  # type: ignore[attr-defined]
