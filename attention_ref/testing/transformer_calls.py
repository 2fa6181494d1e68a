r"""``check_model``'s judges for the diffusion transformers: joint attention (SD3, SD3.5, Flux), Wan, Sana.

Each judge takes one recorded call of one module — its inputs and its output as the model computed them — and
applies the block rule of :mod:`.blocks` (:mod:`.block_model`): the module's output must lie within
``c·(simulated modules' error) + f·ε·max‖y‖`` of the float64 reference on the same (already rounded) inputs.

* **The reference.** SD3's and Flux's attention: :func:`attention_ref.blocks.joint_attention_forward` with the
  module's weights (:func:`attention_ref.interop.from_diffusers_joint`) and, for Flux, the call's own RoPE tables.
  Wan and Sana's linear attention: :func:`attention_chain` below with no rounding — the same formulas, step by
  step in float64 (Wan's q/k norms run across the heads, which the joint block does not take).
* **The simulated modules** (:func:`attention_chain` with a :class:`~.rounding.RoundingModel`): the chain of
  operations — each projection (``x W`` rounded to the dtype before ``+ b``), the q/k RMS or layer norms (the mean
  square a sum in any order), the rotation, the attention (:func:`.simulation.simulate_attention_core`), the output
  projections — in float64 with every operation's errors drawn as :mod:`.rounding` describes. Where diffusers
  computes a step in float32 whatever the model's dtype, the step's errors are float32's, also in a float64 model:
  the mean square of diffusers' ``RMSNorm`` (SD3.5's q/k norms), Flux's ``apply_rotary_emb``, and Sana's linear
  attention (``.float()``). These are the default processors' documented precision, not errors.
* ``‖y‖``: the root-sum-square of the terms each output entry is summed from (the output projection's
  ``Σ o² W²``, or the attention's ``Σ P² V²`` without one).

A call with two outputs (a joint layer's image and text streams) is judged on both; the row keeps the worse.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..blocks import joint_attention_forward
from ..interop import from_diffusers
from ..interop.attention_mask import sdpa_mask_and_bias
from ..interop.dit import from_diffusers_joint
from ..interop.trace.families.wan import WAN_TEXT_TOKENS, from_wan_attention
from ..ops.heads import merge_heads, split_heads
from .block_model import attention_by_head, linear
from .blocks import CallJudging, call_arrays, choose_policy, module_policy, reference_mask
from .compare import compare_output, numpy_of
from .dtypes import DTYPES
from .policy import Policy
from .report import OutputCheck
from .rounding import RoundingModel, largest_error_rms
from .rounding import transpose as _t
from .torch_wrap import torch_to_numpy

__all__ = ["attention_chain", "judge_joint_call", "judge_linear_call", "judge_wan_call", "module_policy"]

U32 = 2.0**-24  # float32's unit roundoff: the steps diffusers computes in float32 whatever the dtype


def _zero() -> RoundingModel:
    """A rounding model that draws no error: the chain computes the exact formula in float64."""
    r = RoundingModel("float64", np.random.default_rng(0))
    r.u = r.w = 0.0
    return r


def _rms(r: RoundingModel, x: np.ndarray, weight: np.ndarray | None, eps: float, u_mean: float) -> np.ndarray:
    """``x / √(mean x² + ε) · γ`` over the last axis; the mean square a sum in any order with roundoff ``u_mean``."""
    n = x.shape[-1]
    squares = r.rel(x * x, u_mean)
    total = np.sum(squares, axis=-1, keepdims=True)
    # the sum of n squares in any order, its error √n·u·Σ|terms| with the roundoff of the sum's dtype
    mean = (total + math.sqrt(n) * u_mean * total * r.z(total.shape)) / n
    rstd = r.rel(1.0 / np.sqrt(mean + eps), 2 * u_mean)
    y = r.rel(x * rstd, r.u, r.w)
    return y if weight is None else r.rel(y * weight, r.u, r.w)


def _layer_norm(r: RoundingModel, x: np.ndarray, weight: Any, bias: Any, eps: float) -> np.ndarray:
    n = x.shape[-1]
    centred = r.rel(x - r.sum(x) / n, r.u)
    rstd = r.rel(1.0 / np.sqrt(r.sum(r.rel(centred * centred, r.u)) / n + eps), 2 * r.u)
    y = r.rel(centred * rstd, r.u, r.w)
    y = y if weight is None else r.rel(y * weight, r.u, r.w)
    return y if bias is None else r.rel(y + bias, r.u, r.w)


def _rotate(r: RoundingModel, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, u_rot: float) -> np.ndarray:
    """RoPE with interleaved pairs, ``x ⊙ cos + R(x) ⊙ sin``, each product and the sum rounded by ``u_rot``,
    the result stored in the dtype."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    turned = np.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)  # R(x): (a, b) ↦ (−b, a)
    y = r.rel(x * cos, u_rot) + r.rel(turned * sin, u_rot)
    return r.rel(y, u_rot, r.w)


def _weights(q: np.ndarray, k: np.ndarray, mask: Any, scale: float) -> np.ndarray:
    """The exact softmax weights (for the magnitudes)."""
    s = scale * (q @ _t(k))
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    s = s - np.max(s, axis=-1, keepdims=True)
    e = np.exp(s)
    return e / np.sum(e, axis=-1, keepdims=True)


def attention_chain(
    r: RoundingModel,
    x: np.ndarray,
    context: np.ndarray | None,
    params: Mapping[str, np.ndarray],
    options: Mapping[str, Any],
    *,
    rope: tuple[np.ndarray, np.ndarray] | None = None,
    mask: np.ndarray | None = None,
    magnitudes: bool = False,
) -> dict[str, np.ndarray]:
    """One call of a joint, Wan or linear attention module with the errors of ``r`` drawn once (none: exact).

    Inputs:
        x: ``(B, N, C)`` the image tokens (or all the tokens of a one-stream module); context: ``(B, M, D)`` the
            text stream of a joint module (``options["order"]`` says where it goes), the context of Wan's
            cross-attention, or ``None``.
        params, options: ``from_diffusers_joint``'s, ``from_wan_attention``'s (with ``"wan": True``) or Sana's
            (``"linear": True``); ``options["float32_steps"]``: the steps diffusers runs in float32.
        rope: ``(cos, sin)`` ``(L, d)`` in the joined order; mask: boolean, broadcastable to ``(B, heads, L, L)``.
        magnitudes: also return ``"|y|"`` (and ``"|y_ctx|"``), the root-sum-square of each entry's terms.

    Returns:
        ``{"y"}`` (``"y_ctx"`` for a joint module's text stream), float64.
    """
    heads = options["heads"]
    steps = options.get("float32_steps", ())
    u_norm = U32 if "rms_norm" in steps else r.u
    u_rot = U32 if "rope" in steps else r.u
    if r.u == 0.0:
        u_norm = u_rot = 0.0
    qk_norm = options.get("qk_norm")
    arithmetic = options.get("arithmetic", "eager")

    def norm(a: np.ndarray, name: str) -> np.ndarray:
        if qk_norm in ("rms_norm", "rms_norm_across_heads"):
            return _rms(r, a, params.get(f"{name}.weight"), options["eps"], u_norm)
        if qk_norm == "layer_norm":
            return _layer_norm(r, a, params.get(f"{name}.weight"), params.get(f"{name}.bias"), options["eps"])
        return a

    def stream(a: np.ndarray, names: tuple[str, str, str], norms: tuple[str, str]) -> tuple[np.ndarray, ...]:
        q, k, v = (linear(r, a, params, n) for n in names)
        if options.get("wan"):  # normed across the heads, then split
            return tuple(split_heads(t, heads) for t in (norm(q, norms[0]), norm(k, norms[1]), v))
        qh, kh, vh = (split_heads(t, heads) for t in (q, k, v))  # (B, heads, L, d)
        return norm(qh, norms[0]), norm(kh, norms[1]), vh

    if options.get("linear"):  # Sana: relu features, the products in float32 (diffusers' .float())
        q, k, v = (split_heads(linear(r, x, params, n), heads) for n in ("q", "k", "v"))
        fq, fk = np.maximum(q, 0.0), np.maximum(k, 0.0)
        s = RoundingModel("float32", r.rng)  # every sum and result in float32, whatever the dtype
        if r.u == 0.0:
            s.u = s.w = 0.0
        kv = s.rel(s.matmul(_t(fk), v), s.u)  # Σ_j φ(k_j) v_jᵀ   (B, heads, d, d_v)
        z = s.rel(np.sum(fk, axis=-2)[..., None] + s.sum_error(np.sum(fk, axis=-2)[..., None], fk.shape[-2]), s.u)
        o = s.rel(s.rel(s.matmul(fq, kv), s.u) / s.rel(s.matmul(fq, z) + 1e-15, s.u), s.u, r.w)
        out = {"y": linear(r, merge_heads(o), params, "out")}
        if magnitudes:
            A = (fq @ _t(fk)) / (fq @ z + 1e-15)
            o2 = merge_heads(np.sqrt((A * A) @ (v * v)))
            out["|y|"] = _out_magnitude(o2, params, "out")
        return out
    if options.get("wan") and context is not None:  # Wan's cross-attention: queries from x, keys from the context
        q = split_heads(norm(linear(r, x, params, "q"), "norm_q"), heads)
        parts = [(context, "k", "v", "norm_k")]
        if "add_k.weight" in params:
            split = context.shape[1] - options["text_tokens"]
            parts = [(context[:, split:], "k", "v", "norm_k"), (context[:, :split], "add_k", "add_v", "norm_added_k")]
        o = 0.0
        o2 = 0.0
        for tokens, kn, vn, nn in parts:
            k = split_heads(norm(linear(r, tokens, params, kn), nn), heads)
            v = split_heads(linear(r, tokens, params, vn), heads)
            o = o + attention_by_head(r, q, k, v, None, None, options["scale"], arithmetic)[0]
            if magnitudes:
                P = _weights(q, k, None, options["scale"])
                o2 = o2 + (P * P) @ (v * v)
        o = r.rel(o, r.u, r.w) if len(parts) > 1 else o
        out = {"y": linear(r, merge_heads(o), params, "out")}
        if magnitudes:
            out["|y|"] = _out_magnitude(merge_heads(np.sqrt(o2)), params, "out")
        return out
    qx, kx, vx = stream(x, ("q", "k", "v"), ("norm_q", "norm_k"))
    N = x.shape[1]
    text_first = options.get("order") == "text_first"
    if context is not None:
        qc, kc, vc = stream(context, ("add_q", "add_k", "add_v"), ("norm_added_q", "norm_added_k"))
        M = context.shape[1]
        q, k, v = (np.concatenate([c, i] if text_first else [i, c], axis=2) for i, c in ((qx, qc), (kx, kc), (vx, vc)))
    else:
        M, q, k, v = 0, qx, kx, vx
    if rope is not None:
        cos, sin = rope
        q, k = _rotate(r, q, cos, sin, u_rot), _rotate(r, k, cos, sin, u_rot)
    o, _ = attention_by_head(r, q, k, v, None, mask, options["scale"], arithmetic)  # (B, heads, L, d)
    image, text = (slice(M, M + N), slice(0, M)) if text_first else (slice(0, N), slice(N, N + M))
    out: dict[str, np.ndarray] = {}
    o2 = None
    if magnitudes:
        P = _weights(q, k, mask, options["scale"])
        o2 = np.sqrt((P * P) @ (v * v))
    for key, rows, proj in (("y", image, "out"), ("y_ctx", text, "add_out")):
        if key == "y_ctx" and context is None:
            continue
        oi = merge_heads(o[:, :, rows])  # (B, rows, inner)
        out[key] = linear(r, oi, params, proj) if f"{proj}.weight" in params else oi
        if magnitudes:
            mi = merge_heads(o2[:, :, rows])
            out[f"|{key}|"] = _out_magnitude(mi, params, proj) if f"{proj}.weight" in params else mi
    return out


def _out_magnitude(o: np.ndarray, params: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """``√(Σ o² W² + b²)`` per output entry: the root-sum-square of the terms of ``o W + b``."""
    w = params[f"{name}.weight"]
    total = (o * o) @ (w * w) + (params[f"{name}.bias"] ** 2 if f"{name}.bias" in params else 0.0)
    return np.sqrt(total)


def _judge(
    judging: CallJudging,
    policy: Policy,
    got: Mapping[str, Any],
    x: np.ndarray,
    context: np.ndarray | None,
    params: Mapping[str, np.ndarray],
    options: Mapping[str, Any],
    exact: Mapping[str, np.ndarray] | None,
    rope: Any = None,
    mask: Any = None,
) -> OutputCheck:
    """The block rule on each output of one call (``policy``: ``judging.policy`` as chosen for the module); the
    worse check is returned."""
    name, dtype = judging.name, judging.dtype

    def chain(r: RoundingModel, magnitudes: bool = False) -> dict[str, np.ndarray]:
        return attention_chain(r, x, context, params, options, rope=rope, mask=mask, magnitudes=magnitudes)

    options = {**options, "arithmetic": policy.arithmetic}
    plain = chain(_zero(), magnitudes=True)
    exact = {k: v for k, v in plain.items() if not k.startswith("|")} if exact is None else dict(exact)
    seed_ = [judging.seed, zlib.crc32(name.encode()), DTYPES.index(dtype)]
    yard = largest_error_rms(chain, exact, dtype, samples=policy.samples, seed=seed_)
    checks = []
    for key in exact:
        value = got.get(key)
        if value is not None and type(value).__module__.startswith("torch"):
            value = torch_to_numpy(value)  # bfloat16 through ml_dtypes
        label = "y" if key == "y" else "y_ctx"
        magnitude = max(float(np.max(plain[f"|{key}|"])), float(np.max(np.abs(exact[key]))))
        checks.append(compare_output(name, label, value, exact[key], yard[key][0], magnitude, dtype, policy=policy,
                                     kind="out", last_rounding=True))  # fmt: skip
    worst = max(checks, key=lambda c: math.inf if math.isnan(c.ratio) else c.ratio)
    if len(checks) > 1:
        other = next(c for c in checks if c is not worst)
        note = f"{other.output}: ratio {other.ratio:.3g}"
        worst = dataclasses.replace(worst, note=f"{worst.note}; {note}".strip("; "))
    return worst


def judge_joint_call(attn: Any, inputs: Mapping[str, Any], judging: CallJudging) -> OutputCheck:
    """One call of SD3's or SD3.5's joint ``Attention`` or of a ``FluxAttention`` (double or single stream).

    Inputs:
        attn: the module, its weights in the dtype under test.
        inputs: the call's arguments by name: ``"hidden_states"`` ``(B, N, C)`` (for Flux's single blocks: the
            joined ``(B, M + N, C)``); ``"encoder_hidden_states"`` ``(B, M, D)`` or ``None``;
            ``"attention_mask"``: ``None``, or Flux's mask as ``FluxAttnProcessor`` hands it to
            ``scaled_dot_product_attention`` (:func:`attention_ref.interop.attention_mask.sdpa_mask_and_bias`:
            boolean True = may attend, or additive 0 / −10000 / −inf; ``(B, L)`` a key mask per sample, any other
            shape broadcast to ``(B, heads, L, L)``; ``NotImplementedError`` for another bias);
            ``"image_rotary_emb"``: Flux's ``(cos, sin)``. Absent means ``None``.
        judging: :class:`~attention_ref.testing.blocks.CallJudging`; its ``output`` is ``(y, y_context)`` for a
            two-stream call, else ``y``.
    """
    hidden_states, encoder_hidden_states = inputs["hidden_states"], inputs.get("encoder_hidden_states")
    attention_mask, image_rotary_emb = inputs.get("attention_mask"), inputs.get("image_rotary_emb")
    policy = choose_policy(judging.policy, attn)
    params, options = from_diffusers_joint(attn, dtype="float64")
    a = call_arrays(judging.dtype, hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states)
    x, context = a["hidden_states"].astype(np.float64), a["encoder_hidden_states"]
    if "add_q.weight" not in params:
        context = None
    context = None if context is None else context.astype(np.float64)
    rope = None
    if image_rotary_emb is not None:
        rope = tuple(torch_to_numpy(t).astype(np.float64).reshape(-1, t.shape[-1]) for t in image_rotary_emb)
    mask = None
    if attention_mask is not None:  # as FluxAttnProcessor hands it to scaled_dot_product_attention
        L = x.shape[1] + (0 if context is None else context.shape[1])
        read = sdpa_mask_and_bias(numpy_of(attention_mask), x.shape[0], options["heads"], L, L, np.float64)
        mask = reference_mask(*read)  # (B|1, heads|1, 1|L, L)
    (y, y_ctx), _ = joint_attention_forward(x, context, params, rope=rope, mask=mask, **options)
    exact = {"y": y} if context is None else {"y": y, "y_ctx": y_ctx}
    outs = judging.output if isinstance(judging.output, (tuple, list)) else (judging.output,)
    got = dict(zip(exact, outs, strict=False))
    options = dict(options)
    kind = type(attn).__name__
    steps = ["rope"] if kind == "FluxAttention" else []
    if options.get("qk_norm") == "rms_norm" and type(getattr(attn, "norm_q", None)).__module__.startswith("diffusers"):
        steps.append("rms_norm")  # diffusers' RMSNorm: the mean square in float32
    options["float32_steps"] = tuple(steps)
    return _judge(judging, policy, got, x, context, params, options, exact, rope=rope, mask=mask)


def judge_wan_call(attn: Any, inputs: Mapping[str, Any], judging: CallJudging) -> OutputCheck:
    """One call of a ``WanAttention`` (self-attention with its RoPE tables ``inputs["rotary_emb"]``, or
    cross-attention to ``inputs["encoder_hidden_states"]``)."""
    hidden_states, encoder_hidden_states = inputs["hidden_states"], inputs.get("encoder_hidden_states")
    rotary_emb = inputs.get("rotary_emb")
    policy = choose_policy(judging.policy, attn)
    params, options = from_wan_attention(attn, "float64")
    for n, layer in (("v", attn.to_v), ("out", attn.to_out[0])) + ((("add_v", attn.add_v_proj),) if attn.add_v_proj
                                                                     is not None else ()):  # fmt: skip
        params[f"{n}.weight"] = torch_to_numpy(layer.weight).astype(np.float64).T
        if layer.bias is not None:
            params[f"{n}.bias"] = torch_to_numpy(layer.bias).astype(np.float64)
    a = call_arrays(judging.dtype, hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states)
    x = a["hidden_states"].astype(np.float64)
    context = None if a["encoder_hidden_states"] is None else a["encoder_hidden_states"].astype(np.float64)
    rope = None
    if rotary_emb is not None and context is None:
        rope = tuple(torch_to_numpy(t).astype(np.float64).reshape(x.shape[1], -1) for t in rotary_emb)
    options = {**options, "wan": True, "text_tokens": WAN_TEXT_TOKENS, "order": "image_first"}
    return _judge(judging, policy, {"y": judging.output}, x, context, params, options, None, rope=rope)


def judge_linear_call(attn: Any, inputs: Mapping[str, Any], judging: CallJudging) -> OutputCheck:
    """One call of Sana's linear attention (``SanaLinearAttnProcessor2_0``: ReLU features, no softmax) on
    ``inputs["hidden_states"]`` ``(B, N, C)``."""
    policy = choose_policy(judging.policy, attn)
    params, options = from_diffusers(attn, dtype="float64")
    a = call_arrays(judging.dtype, hidden_states=inputs["hidden_states"])
    x = a["hidden_states"].astype(np.float64)
    if x.ndim != 3:
        raise ValueError(f"Sana's linear attention takes (B, N, C) tokens, got shape {x.shape}")
    options = {**options, "linear": True}
    return _judge(judging, policy, {"y": judging.output}, x, None, params, options, None)
