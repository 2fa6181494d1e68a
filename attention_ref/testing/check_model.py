"""``check_model``: a whole diffusers model's attention, call by call, against the float64 reference.

::

    from attention_ref.testing import check_model

    report = check_model(unet, latents, t, encoder_hidden_states=context, dtype="float16")
    print(report)          # failing layers first: name, kind, shapes, worst ratio, verdict
    assert report.ok

The model is run once, forward, in ``dtype`` (a copy cast to it when its parameters have another
dtype; its floating inputs are cast too). A forward hook on every diffusers ``Attention`` module
records that call's inputs (``hidden_states``, ``encoder_hidden_states``, ``attention_mask``) and
output as the model computed them, whatever processor is installed, and judges the call at once with
:func:`attention_ref.testing.check_call`: the reference block runs in float64 on the
inputs as they are (already rounded to the dtype) with the module's weights (read by
:func:`attention_ref.interop.from_diffusers`), and the module's output must lie within
``c·(simulated blocks' error) + f·ε·max‖y‖`` of it — the block oracle's rule (``docs/oracle.md``).
Each call is judged on its own inputs, so an error does not travel: a layer that goes wrong fails
there, and the layers after it, fed its wrong output, still pass when they compute their own formula.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..interop.trace.records import KINDS, LayerFilter
from .blocks import CallJudging
from .dtypes import DTYPES
from .harness import exception_check
from .model_layers import attention_modules, call_inputs, call_kind, judge_call
from .report import OutputCheck
from .tolerance import Policy, check_policy

__all__ = ["LayerCall", "ModelReport", "check_model"]


@dataclass(frozen=True)
class LayerCall:
    """One call of one ``Attention`` module and its verdict.

    Attributes:
        name: the module's path in the model; call: which call of that module (0 = its first).
        kind: ``"self"``, ``"cross"``, ``"joint"`` (a joint layer: two streams, one softmax) or ``"temporal"``
            (attention along a video's frames); processor: the processor's class name.
        hidden_shape, context_shape, output_shape: the call's tensors' shapes (``context_shape`` ``None``
            for self-attention).
        check: the :class:`~attention_ref.testing.OutputCheck` of its output ``y``.
    """

    name: str
    call: int
    kind: str
    processor: str
    hidden_shape: tuple[int, ...]
    context_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...]
    check: OutputCheck

    @property
    def ratio(self) -> float:
        """Worst error / allowed error (pass when ≤ 1; ``inf`` for a failure without numbers)."""
        return self.check.ratio

    @property
    def ok(self) -> bool:
        return self.check.ok

    @property
    def failed(self) -> bool:
        return self.check.failed

    @property
    def verdict(self) -> str:
        """``"ok"``, ``"FAIL"`` or ``"not supported"``."""
        if not self.check.supported:
            return "not supported"
        return "ok" if self.check.ok else "FAIL"

    @property
    def shapes(self) -> str:
        """``hidden, ctx context → output``, e.g. ``(2, 256, 32), ctx (2, 77, 32) → (2, 256, 32)``."""
        ctx = "" if self.context_shape is None else f", ctx {self.context_shape}"
        return f"{self.hidden_shape}{ctx} → {self.output_shape}"


@dataclass(frozen=True)
class ModelReport:
    """Every ``Attention`` call of one model run, judged; ``print(report)`` lists the failing layers first."""

    dtype: str
    rows: tuple[LayerCall, ...]
    title: str = "model"

    @property
    def ran(self) -> list[LayerCall]:
        return [r for r in self.rows if r.check.supported]

    @property
    def ok(self) -> bool:
        """At least one call was checked and every checked call passed."""
        return bool(self.ran) and all(r.ok for r in self.ran)

    @property
    def failures(self) -> list[LayerCall]:
        """The failed calls, worst first."""
        return sorted((r for r in self.rows if r.failed), key=lambda r: -_sort_key(r.ratio))

    @property
    def failed_layers(self) -> list[str]:
        """Names of the modules with at least one failed call, in the order of the model's calls."""
        failed = {r.name for r in self.rows if r.failed}
        return [n for n in dict.fromkeys(r.name for r in self.rows) if n in failed]

    @property
    def layers(self) -> list[str]:
        """Names of every called module, in call order."""
        return list(dict.fromkeys(r.name for r in self.rows))

    def worst_ratio(self) -> float:
        ratios = [r.ratio for r in self.ran]
        return max(ratios, key=_sort_key) if ratios else 0.0

    def summary(self) -> str:
        """One line: the verdict with the counts and the worst ratio."""
        skipped = len(self.rows) - len(self.ran)
        if not self.ran:
            verdict = "NOTHING CHECKED"
        elif self.ok:
            verdict = "PASSED"
        else:
            verdict = f"FAILED ({len(self.failures)} of {len(self.ran)} calls, in {len(self.failed_layers)} layers)"
        extra = f", {skipped} not supported" if skipped else ""
        policies = sorted({r.check.policy for r in self.ran if r.check.policy})
        under = f" ({' and '.join(policies)} policy)" if policies else ""
        return (
            f"{self.title}: {len(self.rows)} attention calls in {len(self.layers)} layers, checked in {self.dtype}"
            f"{under}{extra} — {verdict}; worst ratio {_ratio(self.worst_ratio())}"
        )

    def format(self, verbose: bool = True) -> str:
        """The summary and a table: the failing calls first (worst first), then, when ``verbose``, the others."""
        rows = self.failures + [r for r in self.rows if not r.failed] if verbose else self.failures
        lines = [self.summary(), "ratio = max|error| / allowed; a call passes when ≤ 1"]
        if rows:
            labels = [f"{r.name}#{r.call}" if r.call else r.name for r in rows]
            width = max(len(s) for s in labels)
            kw = max(5, *(len(r.kind) for r in rows))
            head = f"{'verdict':<13}  {'ratio':>8}  {'layer':<{width}}  {'kind':<{kw}}  {'processor':<20}  shapes"
            lines += [head, "-" * len(head)]
            for r, label in zip(rows, labels, strict=True):
                note = f"  ({r.check.note})" if r.check.note else ""
                lines.append(
                    f"{r.verdict:<13}  {_ratio(r.ratio):>8}  {label:<{width}}  {r.kind:<{kw}}  {r.processor:<20}  "
                    f"{r.shapes}{note}"
                )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format(verbose=True)


def _sort_key(r: float) -> float:
    return math.inf if math.isnan(r) else r


def _ratio(r: float) -> str:
    return "inf" if math.isinf(r) else ("nan" if math.isnan(r) else f"{r:.3g}")


def _shape(value: Any) -> tuple[int, ...]:
    """A tensor's shape as a tuple of ints (a joint layer's pair ``(y, y_context)``: ``y``'s); ``()`` for anything
    without one."""
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    try:
        return tuple(int(n) for n in value.shape)
    except (AttributeError, TypeError):
        return ()


def _cast(value: Any, dtype: Any, device: Any) -> Any:
    """Floating tensors (also inside lists, tuples and dicts) cast to ``dtype`` on ``device``; the rest as it is."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype, device) for v in value)
    if isinstance(value, Mapping):
        return {k: _cast(v, dtype, device) for k, v in value.items()}
    return value


def check_model(
    model: Any,
    *args: Any,
    dtype: str = "float32",
    policy: Policy | str | None = None,
    seed: int = 0,
    title: str | None = None,
    layers: Any = None,
    **kwargs: Any,
) -> ModelReport:
    """Run ``model(*args, **kwargs)`` once in ``dtype`` and check every ``Attention`` call against the reference.

    Inputs:
        model: a ``torch.nn.Module`` holding diffusers ``Attention`` modules (a ``UNet2DConditionModel``, a
            ``Transformer2DModel``, a VAE, ...), any processors installed. When its parameters are not all of
            ``dtype`` a deep copy with every parameter cast to ``dtype`` runs (also modules a checkpoint keeps in
            float32; the model itself is not touched); otherwise the model runs as it is, with hooks that are
            removed afterwards.
        args, kwargs: the model's inputs; floating tensors among them (also in lists, tuples, dicts) are cast
            to ``dtype`` and moved to the model's device.
        dtype: ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"float64"``.
        policy: ``None`` (default): per call, the policy matching the module's arithmetic
            (:func:`~attention_ref.testing.blocks.module_policy`: ``fused`` for a processor that calls
            ``scaled_dot_product_attention`` or ``dispatch_attention_fn``, ``eager`` otherwise); or ``"fused"``,
            ``"eager"``, a :class:`~attention_ref.testing.Policy`. seed: of the simulated blocks.
        title: the report's title (default the model's class name).
        layers: which modules to check, as the trace's ``layers=``: a module path, a glob on the paths, a kind
            (``"self"``, ``"cross"``, ``"joint"``, ``"temporal"``), a list of these, or a predicate
            ``(name, kind) -> bool``; default every attention module.

    Returns:
        :class:`ModelReport`, one :class:`LayerCall` per call of an ``Attention`` module, in call order. A module
        the reference does not express (``from_diffusers`` raises ``NotImplementedError``) gives a "not
        supported" row naming the feature (also an IP-Adapter ``(text, image)`` context); any exception while
        judging a call or building its row is a failed row.
    """
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if policy is not None:
        policy = check_policy(policy)
    chosen = LayerFilter(layers)
    if not isinstance(model, torch.nn.Module):
        held = [a for a in ("unet", "transformer") if hasattr(model, a)]
        hint = f" (for a pipeline, check pipe.{held[0]} with its inputs)" if held else ""
        raise TypeError(f"check_model needs a torch.nn.Module, got {type(model).__name__}{hint}")
    torch_dtype = getattr(torch, dtype)
    parameters = list(model.parameters())
    if not parameters:
        raise ValueError(f"{type(model).__name__} has no parameters")
    same = all(p.dtype == torch_dtype for p in parameters if p.is_floating_point())
    runner = model if same else torch.nn.Module.to(copy.deepcopy(model), torch_dtype)  # every parameter in dtype
    device = parameters[0].device
    attentions = attention_modules(runner)
    if not attentions:
        known = "diffusers Attention module (nor FluxAttention, WanAttention)"
        raise ValueError(f"{type(model).__name__} holds no {known}")
    unmatched = chosen.unmatched_globs(n for n, _, _, _ in attentions)
    if unmatched:
        raise ValueError(f"layers={layers!r}: {unmatched} match no attention module (kinds are {list(KINDS)})")
    rows: list[LayerCall] = []
    calls: dict[str, int] = {}

    def make_hook(name: str, family: str, temporal: bool) -> Any:
        def hook(module: Any, hook_args: tuple[Any, ...], hook_kwargs: dict[str, Any], output: Any) -> None:
            i = calls.get(name, 0)
            calls[name] = i + 1
            label = f"{name}#{i}"
            hidden = context = None
            kind = "?"
            try:
                inputs = call_inputs(module, hook_args, hook_kwargs)
                hidden, context = inputs.get("hidden_states"), inputs.get("encoder_hidden_states")
                kind = call_kind(family, temporal, inputs)
                if not chosen(name, kind):
                    return
                judging = CallJudging(output=output, dtype=dtype, policy=policy, name=label, seed=seed)
                check = judge_call(family, module, inputs, judging)
            except NotImplementedError as err:
                check = OutputCheck(case=label, output="y", error=math.nan, where=None, allowed=math.nan,
                                    ratio=math.nan, note=f"not supported: {err}", supported=False)  # fmt: skip
            except Exception as err:  # a call the check could not judge is a failure, reported, not raised
                check = exception_check(label, "y", err)
            try:  # whatever the call held, it becomes a row
                text = context[0] if isinstance(context, (tuple, list)) and context else context
                row = LayerCall(
                    name=name,
                    call=i,
                    kind=kind,
                    processor=type(module.processor).__name__,
                    hidden_shape=_shape(hidden),
                    context_shape=None if context is None else _shape(text),
                    output_shape=_shape(output),
                    check=check,
                )
            except Exception as err:
                processor = type(getattr(module, "processor", None)).__name__
                row = LayerCall(name=name, call=i, kind="?", processor=processor, hidden_shape=(), context_shape=None,
                                output_shape=(), check=exception_check(label, "y", err))  # fmt: skip
            rows.append(row)

        return hook

    handles = []
    try:
        for name, module, family, temporal in attentions:
            # a module that no glob names and no kind or predicate could take is not hooked
            maybe = chosen.everything or chosen.predicate is not None or chosen.kinds or chosen.name_matches(name)
            if not maybe:
                continue
            handles.append(module.register_forward_hook(make_hook(name, family, temporal), with_kwargs=True))
        with torch.no_grad():
            runner(*_cast(args, torch_dtype, device), **_cast(kwargs, torch_dtype, device))
    finally:
        for handle in handles:
            handle.remove()
    return ModelReport(dtype=dtype, rows=tuple(rows), title=title or type(model).__name__)
