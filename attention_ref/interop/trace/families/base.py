"""What every family provides (:class:`Family`) and how a hook reads a module call's arguments."""

from __future__ import annotations

from typing import Any

__all__ = ["Family", "argument", "dtype_name", "tokens_of"]


def argument(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    """A forward argument given by position ``index`` or by keyword ``name`` (``None`` when absent)."""
    return args[index] if len(args) > index else kwargs.get(name)


def dtype_name(t: Any) -> str:
    """``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"float64"`` of a torch tensor."""
    return str(t.dtype).removeprefix("torch.")


def tokens_of(name: str, hidden: Any) -> Any:
    """A call's ``hidden_states`` as ``(B, N, C)`` tokens: a ``(B, C, H, W)`` map row-major (token ``h·W + w``)."""
    if getattr(hidden, "ndim", None) not in (3, 4):
        shape = tuple(getattr(hidden, "shape", ()))
        raise ValueError(f"{name}: hidden_states of shape {shape} is neither (B, N, C) nor (B, C, H, W)")
    return hidden.flatten(2).transpose(1, 2) if hidden.ndim == 4 else hidden


class Family:
    """A kind of attention module the trace knows.

    Attributes:
        module: the class name it takes, for messages.
    """

    module = "Attention"

    def claims(self, module: Any) -> bool:
        """Whether this family reads ``module``."""
        raise NotImplementedError

    def static_kinds(self, module: Any, temporal: bool) -> tuple[str, ...]:
        """The kinds of the module's maps as far as its configuration tells (for ``layers=`` at entry)."""
        raise NotImplementedError

    def load(self, module: Any, dtype: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(params, options)`` in NumPy ``dtype``; ``NotImplementedError`` naming what is not expressed."""
        raise NotImplementedError

    def on_model_call(self, tracer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Called when the traced model is called (e.g. Flux reads its image positions there)."""

    def record(self, tracer: Any, name: str, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Turn one call into maps and add them to the tracer's records (``tracer.add``)."""
        raise NotImplementedError

    def verify(
        self, tracer: Any, name: str, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        """``verify=True``: judge the call's real output against the reference's (``check_model``'s judge of this
        family, in the dtype the model ran in) and ``tracer.mark`` the verdict: edited when it fails."""
        # the one import from interop into testing, which imports interop at its top (its judges read modules with
        # interop's loaders and the trace's families): only verify=True borrows check_model's judges, when asked
        from ....testing.blocks import CallJudging
        from ....testing.model_layers import call_inputs, judge_call

        hidden = argument(args, kwargs, 0, "hidden_states")
        try:
            judging = CallJudging(output=output, dtype=dtype_name(hidden), name=name)
            check = judge_call(type(self).__name__, module, call_inputs(module, args, kwargs), judging)
        except NotImplementedError as err:
            tracer.note(name, f"not verified: {err}")
            return
        edited = check.supported and not check.ok
        why = f"edited: its output is not the standard formula's (error {check.ratio:.3g}× the allowed)"
        tracer.mark(name, check.ratio, edited, why)
