r"""An independent witness of the attention weights a model computes: torch's own softmax on the q, k it attends with.

:func:`sdpa_probe` wraps ``torch.nn.functional.scaled_dot_product_attention`` (which diffusers' processors and its
attention dispatcher call) while a model runs, and for every call made inside one of the model's attention
modules computes, from the ``query`` and ``key`` the call received,

.. math:: P = \mathrm{softmax}(\text{scale}\cdot q k^\top + \text{mask})

in float64 with torch alone (``scale`` the call's, ``1/√d`` by default; a boolean mask drops keys, an additive
one is added), then lets the call run unchanged. The weights are the model's own — after its projections, its
q/k norms and its rotary embedding, whatever processor put them together — and nothing of
:mod:`attention_ref` computes them: the trace's maps are checked against them.

Sana's linear attention calls no softmax; the probe takes the ReLU features it computes (the two calls of
``torch.nn.functional.relu`` inside a ``SanaLinearAttnProcessor2_0`` module) and forms the weights
``φ(q_i)·φ(k_j) / (Σ_j φ(q_i)·φ(k_j) + 10⁻¹⁵)`` from them, also in float64.

::

    with sdpa_probe(model) as probe, trace(model, heads="all", dtype="float64") as tr:
        model(*args, **kwargs)
    probe.calls["transformer_blocks.0.attn"]   # [(B, heads, L, S) float64 NumPy], one per call
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["Probe", "compare_with_trace", "diffusers_in_the_models_dtype", "sdpa_probe"]


class Probe:
    """What :func:`sdpa_probe` saw: ``calls[module path]`` is the list of the weights ``(B, heads, L, S)`` of each
    attention product computed inside that module, in order (a module call may hold several: IP-Adapter's parts,
    Wan's image context)."""

    def __init__(self) -> None:
        self.calls: dict[str, list[np.ndarray]] = {}
        self._stack: list[tuple[str, Any]] = []
        self._relu: list[Any] = []

    def _keep(self, weights: Any) -> None:
        if self._stack:
            self.calls.setdefault(self._stack[-1][0], []).append(weights.detach().cpu().numpy())


def _softmax_weights(query: Any, key: Any, attn_mask: Any, scale: Any, is_causal: bool, enable_gqa: bool) -> Any:
    import torch

    q, k = query.detach().double(), key.detach().double()
    if enable_gqa and q.shape[-3] != k.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    logits = scale * (q @ k.transpose(-1, -2))  # (B, heads, L, S)
    if is_causal:
        L, S = logits.shape[-2:]
        allowed = torch.ones(L, S, dtype=torch.bool, device=logits.device).tril()
        logits = logits.masked_fill(~allowed, -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, -math.inf)
        else:
            logits = logits + attn_mask.detach().double()
    return torch.softmax(logits, dim=-1)


@contextlib.contextmanager
def sdpa_probe(model: Any) -> Iterator[Probe]:
    """Record the weights of every ``scaled_dot_product_attention`` call inside ``model``'s attention modules.

    Inputs:
        model: a ``torch.nn.Module``; its modules of a class whose name ends in ``"Attention"`` (diffusers'
            ``Attention``, ``FluxAttention``, ``WanAttention``, …) are followed with forward pre- and post-hooks.

    Yields:
        A :class:`Probe`, filled while the model runs. Every hook and the wrapped functions are restored on
        exit, also after an exception.
    """
    import torch.nn.functional as F

    probe = Probe()
    original_sdpa, original_relu = F.scaled_dot_product_attention, F.relu

    def sdpa(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
             is_causal: bool = False, scale: Any = None, enable_gqa: bool = False) -> Any:  # fmt: skip
        probe._keep(_softmax_weights(query, key, attn_mask, scale, is_causal, enable_gqa))
        kwargs = {"enable_gqa": enable_gqa} if enable_gqa else {}
        return original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, **kwargs)  # fmt: skip

    def relu(x: Any, *args: Any, **kwargs: Any) -> Any:
        y = original_relu(x, *args, **kwargs)
        processor = type(getattr(probe._stack[-1][1], "processor", None)).__name__ if probe._stack else ""
        if processor == "SanaLinearAttnProcessor2_0":
            probe._relu.append(y.detach().double())
            if len(probe._relu) == 2:  # φ(q) (B, heads, d, N), then φ(k) (B, heads, N, d)
                fq, fk = probe._relu
                probe._relu = []
                numerator = fq.transpose(-1, -2) @ fk.transpose(-1, -2)  # (B, heads, N, N): φ(q_i)·φ(k_j)
                probe._keep(numerator / (numerator.sum(dim=-1, keepdim=True) + 1e-15))
        return y

    handles = []

    def enter(name: str) -> Any:
        def hook(module: Any, args: Any) -> None:
            probe._stack.append((name, module))
            probe._relu = []

        return hook

    def leave(module: Any, args: Any, output: Any) -> None:
        if probe._stack:
            probe._stack.pop()

    try:
        for name, module in model.named_modules():
            if type(module).__name__.endswith("Attention"):
                handles.append(module.register_forward_pre_hook(enter(name)))
                handles.append(module.register_forward_hook(leave, always_call=True))
        F.scaled_dot_product_attention, F.relu = sdpa, relu
        yield probe
    finally:
        F.scaled_dot_product_attention, F.relu = original_sdpa, original_relu
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def diffusers_in_the_models_dtype() -> Iterator[None]:
    """diffusers' RMSNorm takes its mean square in float32, and Flux's apply_rotary_emb rotates in float32, even in
    a float64 model (a float64 model's q and k are float32-rounded there): both patched, while the block runs, to
    compute in the input's dtype, so that a float64 model computes in float64 throughout. For measuring the trace
    against a float64 model (the patched functions compute the same formulas); restored on exit."""
    import torch
    from diffusers.models import normalization
    from diffusers.models.transformers import transformer_flux

    def rms_forward(self: Any, h: Any) -> Any:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h if self.weight is None else h * self.weight + (0 if self.bias is None else self.bias)

    def rotate(
        x: Any, freqs_cis: Any, use_real: bool = True, use_real_unbind_dim: int = -1, sequence_dim: int = 2
    ) -> Any:
        cos, sin = (t[None, :, None, :] if sequence_dim == 1 else t[None, None] for t in freqs_cis)
        real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        return x * cos.to(x.dtype) + torch.stack([-imag, real], dim=-1).flatten(3) * sin.to(x.dtype)

    saved = normalization.RMSNorm.forward, transformer_flux.apply_rotary_emb
    normalization.RMSNorm.forward, transformer_flux.apply_rotary_emb = rms_forward, rotate
    try:
        yield
    finally:
        normalization.RMSNorm.forward, transformer_flux.apply_rotary_emb = saved


def _rows(record: Any) -> np.ndarray:
    """The query tokens ``row·W + col`` of a self or temporal record (every pixel without query pixels)."""
    H, W = record.grid
    if record.query_pixels is None:
        return np.arange(H * W)
    return record.query_pixels[:, 0] * W + record.query_pixels[:, 1]


def _expected(record: Any, weights: np.ndarray, text_first: bool) -> np.ndarray:
    """What ``record.maps`` (one call, every head) must be, from the probe's weights of that call."""
    H, W = record.grid
    N = H * W
    if record.kind == "temporal":
        # (B·H·W, heads, F, K): the query pixels' sequences, as (B, heads, Q, F, K)
        B = record.batch
        per_pixel = weights.reshape(B, N, *weights.shape[1:])[:, _rows(record)]  # (B, Q, heads, F, K)
        return per_pixel.transpose(0, 2, 1, 3, 4)
    B, heads, L, S = weights.shape
    if record.batch != B:  # a video transformer's frames in the batch (Wan): sample b, frame f at b·F + f
        F = record.batch // B
        if record.kind == "cross":
            return weights.reshape(B, heads, F, H, W, S).transpose(0, 2, 1, 3, 4, 5).reshape(B * F, heads, H, W, S)
        rows = _rows(record)
        per_frame = [weights[:, :, f * N + rows, f * N : (f + 1) * N] for f in range(F)]  # (B, heads, Q, N) each
        return np.stack(per_frame, axis=1).reshape(B * F, heads, len(rows), H, W)
    if record.kind == "joint":  # one softmax over [image; text] (SD3) or [text; image] (Flux)
        M = record.keys
        image = slice(M, M + N) if text_first else slice(0, N)
        text = slice(0, M) if text_first else slice(N, N + M)
        return weights[:, :, image, text].reshape(B, heads, H, W, M)
    if record.kind == "cross":
        return weights.reshape(B, heads, H, W, S)
    # self rows: the image keys of the query pixels' rows; a joint layer's are inside the joined sequence
    offset = L - N if (record.part == "self" and text_first) else 0
    rows = offset + _rows(record)
    return weights[:, :, rows][..., offset : offset + N].reshape(B, heads, len(rows), H, W)


def compare_with_trace(trace: Any, probe: Probe, *, text_first: bool = False) -> dict[str, float]:
    """``{record label: max |traced map − probe's weights|}`` over every call of every traced record.

    The trace must have been made with ``heads="all"`` and ``keep="all"``. A record of a module is matched with
    the probe's products of that module: the first product of each call for the main map (and a joint layer's
    self rows), the ``1 + i``-th for IP-Adapter's image part ``ip{i}``; Wan's image context (part ``"image"``)
    comes first, its text second. ``text_first``: the joined sequence of
    the joint layers puts the text first (Flux).
    """
    out: dict[str, float] = {}
    for record in trace.layers:
        if record.head_mean or record.keep != "all":
            raise ValueError("compare_with_trace needs a trace made with heads='all' and keep='all'")
        products = probe.calls.get(record.name, [])
        per_call = len(products) // max(record.calls, 1)
        index = int(record.part[2:]) + 1 if record.part and record.part.startswith("ip") else 0
        if any(r.name == record.name and r.part == "image" for r in trace.layers):
            index = 0 if record.part == "image" else 1  # Wan attends to its image context first, then to the text
        worst = 0.0
        for call in range(record.calls):
            weights = products[call * per_call + index]
            got = record.maps[call]
            worst = max(worst, float(np.max(np.abs(got - _expected(record, weights, text_first)))))
        out[record.label] = worst
    return out
