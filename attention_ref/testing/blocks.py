r"""``check_diffusers_attention``: a diffusers ``Attention`` module against the reference block.

The module is cast to the dtype under test and run forward and backward by
PyTorch on a few input maps; its output, input gradients (``x`` and, for
cross-attention, the context) and every weight gradient are compared with
:func:`attention_ref.self_attention_forward` / :func:`attention_ref.cross_attention_forward`
and their backward passes in float64, on the same (rounded) inputs and weights,
loaded through :func:`attention_ref.interop.from_diffusers`.
:func:`judge_attention_call` judges one recorded call (forward only) by the same rule
(:func:`attention_ref.testing.check_call` picks it for a diffusers ``Attention``).

The tolerance has the shape of :mod:`.tolerance`'s, ``c·(the simulated blocks' error) + f·ε·max‖X‖``, with the
block's own versions of both terms (:mod:`.block_model`: the block simulated op by op with the errors of
:mod:`.rounding`, and the root-sum-square of the terms each entry sums).

``c`` and ``f`` are the kernel check's: ``Policy.c["out"]`` for ``y``, ``Policy.c["dq"]`` for
every gradient; as there, each output's own last rounding to the dtype (half a spacing at the value
returned) is deducted from its error entry by entry. The policy is the one that matches the module's
arithmetic (:func:`module_policy`, also the diffusion transformers' judges' in :mod:`.transformer_calls`):
``fused`` when its processor calls PyTorch's ``scaled_dot_product_attention`` (``AttnProcessor2_0``: every
SDPA backend keeps the logits and the softmax in float32) or diffusers' ``dispatch_attention_fn``, ``eager``
otherwise (``AttnProcessor``, ``SlicedAttnProcessor``: ``baddbmm`` and
``softmax`` in the dtype); a ``policy`` argument overrides it, and every report names the policy it used.
See ``docs/oracle.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..interop import from_diffusers, to_diffusers
from ..interop.attention_mask import mask_and_bias
from .block_model import BlockCall, block_magnitudes, block_reference, block_yardstick
from .compare import compare_output, exception_check, numpy_of
from .dtypes import DTYPES, numpy_dtype, round_to
from .policy import EAGER, FUSED, Policy, check_policy
from .report import OutputCheck, Report
from .torch_wrap import numpy_to_torch, torch_to_numpy

__all__ = [
    "BLOCK_CASES",
    "BlockCase",
    "CallJudging",
    "call_arrays",
    "check_diffusers_attention",
    "choose_policy",
    "judge_attention_call",
    "module_policy",
    "reference_mask",
]


def module_policy(attn: Any) -> Policy:
    """The policy that matches a diffusers attention module's arithmetic: ``fused`` when its processor's ``__call__``
    calls PyTorch's ``scaled_dot_product_attention`` or diffusers' ``dispatch_attention_fn`` (whose default backend
    is that function; every SDPA backend keeps the logits and the softmax in float32 or wider), ``eager`` otherwise
    (``AttnProcessor``'s ``baddbmm`` and ``softmax`` return the dtype op by op; a processor whose source cannot be
    read, or ``(params, options)``, is judged eager too: the wider rule)."""
    try:
        source = inspect.getsource(type(getattr(attn, "processor", None)).__call__)
    except (OSError, TypeError):
        return EAGER
    fused = "scaled_dot_product_attention(" in source or "dispatch_attention_fn(" in source
    return FUSED if fused else EAGER


def choose_policy(policy: Policy | str | None, attn: Any) -> Policy:
    """``policy`` as a :class:`Policy`; ``None``: the one matching the module's arithmetic (:func:`module_policy`)."""
    return module_policy(attn) if policy is None else check_policy(policy)


def call_arrays(dtype: str, **tensors: Any) -> dict[str, np.ndarray | None]:
    """One recorded call's tensors as NumPy (``None`` stays ``None``); ``TypeError`` when ``hidden_states`` or
    ``encoder_hidden_states`` is not in ``dtype`` (the reference must see the values the module saw)."""
    np_dtype = numpy_dtype(dtype)
    out: dict[str, np.ndarray | None] = {}
    for key, t in tensors.items():
        out[key] = None if t is None else numpy_of(t)
        if key in ("hidden_states", "encoder_hidden_states") and t is not None and out[key].dtype != np_dtype:
            raise TypeError(f"{key} is {out[key].dtype}, not {dtype}: pass the call's inputs as the module got them")
    return out


@dataclass(frozen=True)
class BlockCase:
    """An input for a block: a ``(B, C, H, W)`` map and, for cross-attention, ``M`` context tokens.

    ``x_std`` scales the map (large values test the norm and the residual path); ``padded``
    context tokens (the last ``padded`` of each row but the first batch element's) are masked out.
    """

    name: str
    B: int
    H: int
    W: int
    M: int = 7
    x_std: float = 1.0
    padded: int = 0


BLOCK_CASES = (
    BlockCase("map 5×4", 2, 5, 4),
    BlockCase("odd map 3×7", 1, 3, 7, M=11),
    BlockCase("one pixel", 2, 1, 1, M=1),
    BlockCase("large values", 2, 4, 4, x_std=20.0),
    BlockCase("padded context", 2, 4, 3, M=9, padded=4),
)



def _label(key: str) -> str:
    return key if key == "y" else f"d{key}"


def check_diffusers_attention(
    attn: Any,
    *,
    dtype: str = "float32",
    cases: Sequence[BlockCase] | None = None,
    seed: int = 0,
    policy: Policy | str | None = None,
) -> Report:
    """Check a diffusers ``Attention`` module, forward and backward, in ``dtype``.

    Inputs:
        attn: ``diffusers.models.attention_processor.Attention`` (self-attention, or cross-attention when
            built with ``cross_attention_dim``), with any processor: the processor is not inspected, its
            numbers are checked (features of the module the reference does not express — a spatial norm,
            added key/value projections, ... — raise ``NotImplementedError`` naming them). It is copied and
            cast to ``dtype``; the original is not touched.
        dtype: ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"float64"``.
        cases: :class:`BlockCase` inputs; default :data:`BLOCK_CASES` (the padded one only for cross-attention).
        seed: for the inputs and the upstream gradient.
        policy: ``None`` (default): the one matching the module's arithmetic (:func:`module_policy`: ``fused``
            for a processor calling ``scaled_dot_product_attention``, else ``eager``); or ``"fused"``, ``"eager"``,
            a :class:`~attention_ref.testing.Policy`. ``c["out"]``, ``floor["out"]`` apply to ``y``; ``c["dq"]``,
            ``floor["dq"]`` to every gradient.

    Returns:
        :class:`Report` (its ``policy`` names the policy used) with one row per case and output: ``y``, ``dx``,
        ``dcontext`` (cross-attention),
        and ``d<param>`` for every weight, e.g. ``dq.weight`` (compared in the reference's ``(in, out)`` layout).
        An exception raised by the module (forward or backward) is a failed row for each of that case's
        outputs, not re-raised.
    """
    import torch

    np_dtype = numpy_dtype(dtype)
    policy = choose_policy(policy, attn)
    module = copy.deepcopy(attn).to(getattr(torch, dtype))
    device = next(module.parameters()).device  # run where the module lives (CPU, CUDA, ...)
    params64, options = from_diffusers(module, dtype="float64")  # the module's own (rounded) weights, exactly
    torch_names = dict(zip(params64, to_diffusers(params64), strict=True))  # "q.weight" → "to_q.weight"
    is_cross = module.is_cross_attention
    C = params64["q.weight"].shape[0]
    D = params64["k.weight"].shape[0]
    C_out = params64["out.weight"].shape[1]
    chosen = [c for c in (BLOCK_CASES if cases is None else cases) if is_cross or not c.padded]
    keys = ["y", "x", *(["context"] if is_cross else []), *params64]
    checks: list[OutputCheck] = []
    for i, case in enumerate(chosen):
        rng = np.random.default_rng([seed, i])
        x = round_to(case.x_std * rng.standard_normal((case.B, case.H, case.W, C)), dtype)  # channels-last
        context = round_to(rng.standard_normal((case.B, case.M, D)), dtype) if is_cross else None
        dy = round_to(rng.standard_normal((case.B, case.H, case.W, C_out)), dtype)
        mask = None
        if case.padded:
            mask = np.ones((case.B, case.M), dtype=bool)
            mask[1:, case.M - case.padded :] = False
        # the module under test, forward and backward by autograd
        try:
            got = _run_module(module, x, context, dy, mask, torch_names, params64, device, np_dtype)
        except Exception as err:  # the module's own failure is a failed row per output, as in check_attention
            checks.extend(exception_check(case.name, _label(key), err) for key in keys)
            continue
        # the float64 reference and the simulated blocks
        as64 = {n: None if a is None else a.astype(np.float64) for n, a in (("x", x), ("c", context), ("dy", dy))}
        call = BlockCall(as64["x"], as64["c"], params64, options, dy=as64["dy"], context_mask=mask)
        exact = block_reference(call)
        yard = block_yardstick(exact, call, dtype=dtype, samples=policy.samples, seed=[seed, i, DTYPES.index(dtype)],
                               arithmetic=policy.arithmetic)  # fmt: skip
        magnitudes = block_magnitudes(call)
        for key in keys:
            checks.append(
                compare_output(
                    case.name,
                    _label(key),
                    got[key],
                    exact[key],
                    yard[key],
                    max(magnitudes[key], float(np.max(np.abs(exact[key])))),
                    dtype,
                    policy=policy,
                    kind="out" if key == "y" else "dq",
                    last_rounding=True,
                )
            )
    title = f"diffusers Attention ({type(attn.processor).__name__}, {'cross' if is_cross else 'self'})"
    return Report(dtype=dtype, checks=tuple(checks), title=title, masked_rows="n/a (blocks)", policy=policy.name)


def _run_module(module: Any, x: np.ndarray, context: np.ndarray | None, dy: np.ndarray, mask: np.ndarray | None,
                torch_names: Mapping[str, str], params64: Mapping[str, np.ndarray], device: Any,
                np_dtype: np.dtype) -> dict[str, np.ndarray]:  # fmt: skip
    """The module's output and gradients (autograd) on one case, channels-last, weights in ``(in, out)`` layout."""
    tx = numpy_to_torch(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), device).requires_grad_(True)  # (B, C, H, W)
    kwargs: dict[str, Any] = {}
    if context is not None:
        tc = numpy_to_torch(context, device).requires_grad_(True)
        kwargs["encoder_hidden_states"] = tc
    if mask is not None:
        additive = np.where(mask, 0.0, -10000.0)[:, None, :].astype(np_dtype)  # diffusers: (B, 1, M), 0 = keep
        kwargs["attention_mask"] = numpy_to_torch(additive, device)
    module.zero_grad(set_to_none=True)
    ty = module(tx, **kwargs)
    ty.backward(numpy_to_torch(np.ascontiguousarray(dy.transpose(0, 3, 1, 2)), device))
    got = {"y": torch_to_numpy(ty).transpose(0, 2, 3, 1), "x": torch_to_numpy(tx.grad).transpose(0, 2, 3, 1)}
    if context is not None:
        got["context"] = torch_to_numpy(tc.grad)
    torch_params = dict(module.named_parameters())
    for key, name in torch_names.items():
        g = torch_params[name].grad
        got[key] = np.zeros(params64[key].shape, np_dtype) if g is None else torch_to_numpy(g)
        if got[key].ndim == 2:
            got[key] = got[key].T  # PyTorch's (out, in) → the reference's (in, out)
    return got


def _channels_last(a: np.ndarray, name: str = "hidden_states") -> np.ndarray:
    """``(B, C, H, W)`` → ``(B, H, W, C)``; tokens ``(B, N, C)`` → a one-row map ``(B, 1, N, C)``.

    ``name``: the argument ``a`` came from, for the error message.
    """
    if a.ndim == 4:
        return a.transpose(0, 2, 3, 1)
    if a.ndim == 3:
        return a[:, None]
    raise ValueError(f"{name} must be (B, C, H, W) or (B, N, C), got shape {a.shape}")


def reference_mask(mask: np.ndarray | None, bias: np.ndarray | None) -> np.ndarray | None:
    """A call's ``(mask, bias)`` (read by :mod:`attention_ref.interop.attention_mask`) as the one boolean mask the
    reference blocks take, True = may attend (``None``: every key).

    The reference blocks take a mask, not a bias: a bias's entries must be 0 (keep) or −1000 and below (drop:
    diffusers' −10000, whose weight underflows to 0); ``NotImplementedError`` for any other.
    """
    if bias is None:
        return mask
    if not np.all((bias == 0) | (bias <= -1e3)):
        raise NotImplementedError(
            "attention_mask holds values other than 0 and a large negative number: an additive bias, "
            "which the reference blocks do not take"
        )
    return bias == 0 if mask is None else mask & (bias == 0)


def _allowed_keys(attention_mask: Any, batch: int, queries: int, keys: int) -> np.ndarray:
    """diffusers' ``attention_mask`` (read by :func:`attention_ref.interop.attention_mask.mask_and_bias`) as booleans
    ``(B, 1 or N, M)``, True = may attend (:func:`reference_mask`)."""
    allowed = reference_mask(*mask_and_bias(numpy_of(attention_mask), batch, queries, keys, np.float64))
    allowed = np.ones((1, 1, 1, keys), dtype=bool) if allowed is None else allowed  # (B or 1, 1, 1 or N, M)
    return np.broadcast_to(allowed[:, 0], (batch, *allowed.shape[2:]))


@dataclass(frozen=True)
class CallJudging:
    """How one recorded call is judged, besides its inputs (:func:`~attention_ref.testing.check_call`).

    Fields:
        output: what the module returned (torch tensor or NumPy), in ``dtype``: shaped like its
            ``hidden_states`` (``C_out`` channels), or a two-stream joint layer's ``(y, y_context)``.
        dtype: the dtype the model ran in.
        policy: a :class:`Policy` or its name; ``None`` for the one matching the module's arithmetic
            (:func:`module_policy`).
        name: the row's case name.
        seed: for the simulated blocks.
    """

    output: Any
    dtype: str
    policy: Policy | str | None = None
    name: str = "call"
    seed: int = 0


def judge_attention_call(attn: Any, inputs: Mapping[str, Any], judging: CallJudging) -> OutputCheck:
    """One recorded call of a diffusers ``Attention`` against the reference block: its output against the reference's.

    The reference block runs in float64 on the call's inputs as they are (already in the dtype) with the module's
    weights; the allowed error is ``c·(simulated blocks' error) + f·ε·max‖y‖``, exactly as in
    :func:`check_diffusers_attention` (forward only).

    Inputs:
        attn: the ``Attention`` module (its weights in the dtype under test, as the model ran), or
            ``(params, options)`` from :func:`attention_ref.interop.from_diffusers`.
        inputs: the call's arguments by name: ``"hidden_states"``, ``(B, C, H, W)`` or tokens ``(B, N, C)`` (torch
            tensor or NumPy); ``"encoder_hidden_states"``, ``(B, M, D)`` for cross-attention (absent or ``None``
            otherwise); ``"attention_mask"`` as diffusers takes it — additive (0 keep, −10000 or −inf drop) or
            boolean (True keep), ``(B, M)``, ``(B, 1, M)`` or (self-attention) ``(B, N, N)``, ``B`` the call's
            batch or 1; absent or ``None`` for none. The mask is read by the trace's rule
            (:mod:`attention_ref.interop.attention_mask`): ``ValueError`` for NaN or ``+inf``,
            ``NotImplementedError`` for another bias than 0 and ≤ −1000 (the block has none).
        judging: the output, dtype, policy, row name and seed (:class:`CallJudging`).

    Returns:
        One :class:`OutputCheck` (output ``"y"``): ``ratio`` (worst error / allowed), ``ok``. A query whose
        every key is masked is not compared (diffusers does not give 0 there: −10000 on every key cancels in the
        softmax; the reference gives 0): a
        whole sample of them, or single query rows of a self-attention mask ``(B, N, N)``; the row says so in
        ``note`` and is marked not supported when no sample is left.
    """
    name, dtype, seed = judging.name, judging.dtype, judging.seed
    policy = choose_policy(judging.policy, attn)
    attention_mask = inputs.get("attention_mask")
    arrays = call_arrays(
        dtype, hidden_states=inputs["hidden_states"], encoder_hidden_states=inputs.get("encoder_hidden_states")
    )
    params, options = from_diffusers(attn, dtype="float64") if not isinstance(attn, tuple) else attn
    x = _channels_last(arrays["hidden_states"].astype(np.float64))  # (B, H, W, C)
    B, H, W, _ = x.shape
    context = arrays["encoder_hidden_states"]
    context = None if context is None else context.astype(np.float64)
    got = _channels_last(numpy_of(judging.output), "output")  # its dtype is checked with its values: a failed row
    keys = H * W if context is None else context.shape[-2]
    allowed = None if attention_mask is None else _allowed_keys(attention_mask, B, H * W, keys)  # (B, 1|N, M)
    context_mask = mask = None
    if allowed is not None and context is not None:
        if allowed.shape[1] != 1 and not np.all(allowed == allowed[:, :1]):
            raise NotImplementedError("a cross-attention mask that differs between queries")
        context_mask = allowed[:, 0, :]  # (B, M)
    elif allowed is not None:
        mask = allowed[:, None]  # (B, 1, 1|N, N)
    dead = np.zeros(B, dtype=bool) if allowed is None else ~np.any(allowed, axis=(1, 2))
    note = ""
    if dead.any():
        note = f"samples {np.flatnonzero(dead).tolist()} have every key masked: not compared"
        if dead.all():
            return OutputCheck(case=name, output="y", error=math.nan, where=None, allowed=math.nan, ratio=math.nan,
                               note=note, supported=False)  # fmt: skip
        keep = ~dead
        x, got = x[keep], got[keep]
        context = None if context is None else context[keep]
        context_mask = None if context_mask is None else context_mask[keep]
        mask = None if mask is None else mask[keep]
    call = BlockCall(x, context, params, options, context_mask=context_mask, mask=mask)
    exact = block_reference(call)
    if mask is not None and mask.shape[2] > 1:
        # single query rows with every key masked: each token's output reads only its own row of weights,
        # so those tokens are left out by taking the reference's value there (error 0)
        dead_rows = ~np.any(mask[:, 0], axis=-1)  # (B', N)
        if dead_rows.any():
            tokens = (got.shape[0], -1, got.shape[-1])
            flat = got.reshape(tokens).copy()  # (B', N, C_out), token n = row·W + col
            flat[dead_rows] = exact["y"].reshape(tokens)[dead_rows]
            got = flat.reshape(got.shape)
            rows = f"{int(dead_rows.sum())} query rows with every key masked: not compared"
            note = f"{note}; {rows}" if note else rows
    seed_ = [seed, zlib.crc32(name.encode()), DTYPES.index(dtype)]
    yard = block_yardstick(exact, call, dtype=dtype, samples=policy.samples, seed=seed_, arithmetic=policy.arithmetic)
    magnitude = block_magnitudes(call)["y"]
    check = compare_output(name, "y", got, exact["y"], yard["y"], max(magnitude, float(np.max(np.abs(exact["y"])))),
                           dtype, policy=policy, kind="out", last_rounding=True)  # fmt: skip
    return check if not note else dataclasses.replace(check, note=note if check.ok else f"{check.note} {note}".strip())

