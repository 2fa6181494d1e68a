"""Mistakes in how an implementation is handed to the harness: said once, as a :class:`UsageError`, never a row.

A signature without the ``mask``, ``bias`` and ``scale`` keywords (:func:`check_signature`), a torch function given
NumPy arrays (:func:`torch_hint`) or a NumPy function given tensors by ``from_torch``
(:func:`numpy_function_hint`), a ``grad_fn`` returning a dict (:func:`grads_tuple`).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["UsageError", "check_signature", "grads_tuple", "numpy_function_hint", "torch_hint"]


class UsageError(TypeError):
    """A mistake in how the implementation is handed to the harness (a signature it cannot call, a torch function
    given NumPy arrays or the reverse, a ``grad_fn`` returning a dict): raised once, never a failed row."""


_NDARRAY_LACKS = re.compile(r"'numpy\.ndarray' object has no attribute '(\w+)'")
_TENSOR_LACKS = re.compile(r"'Tensor' object has no attribute '(\w+)'")


def torch_hint(err: BaseException) -> str | None:
    """A hint when ``err`` is a torch function complaining about the NumPy arrays it was given.

    Recognised: torch naming a ``Tensor`` it expected together with the NumPy type it got ("must be Tensor, not
    numpy.ndarray", "invalid combination of arguments ... dtype=numpy.dtype"), or an ndarray lacking a method
    that torch tensors have (``masked_fill``, ``transpose(-1, -2)``'s cousins).
    """
    message = str(err)
    if numpy_function_hint(err) is not None:
        return None
    lacks = _NDARRAY_LACKS.search(message)
    if lacks is not None:
        try:
            import torch
        except ImportError:
            return None
        torch_method = hasattr(torch.Tensor, lacks.group(1))
    else:
        torch_method = False
    if not torch_method and not ("Tensor" in message and ("numpy" in message or "ndarray" in message)):
        return None
    one_line = " ".join(message.split())[:200]
    return (
        f"the function takes torch tensors, not the NumPy arrays it was given ({type(err).__name__}: {one_line}); "
        "wrap it with attention_ref.testing.from_torch (on the command line: add --torch)"
    )


def numpy_function_hint(err: BaseException) -> str | None:
    """A hint when ``err`` is a NumPy function complaining about the torch tensors ``from_torch`` gave it: a tensor
    lacking an ndarray method (``astype``), or NumPy refusing a tensor that requires grad."""
    message = str(err)
    lacks = _TENSOR_LACKS.search(message)
    numpy_only = lacks is not None and hasattr(np.ndarray, lacks.group(1))
    if not (numpy_only or "numpy() on Tensor that requires grad" in message):
        return None
    one_line = " ".join(message.split())[:200]
    return (
        f"the function takes NumPy arrays, not the torch tensors it was given ({type(err).__name__}: {one_line}); "
        "check it directly, without from_torch (on the command line: drop --torch)"
    )


_KEYWORDS = ("mask", "bias", "scale")


def check_signature(fn: Callable[..., Any], role: str, positional: int) -> None:
    """``UsageError`` unless ``fn`` takes ``positional`` arrays and the keywords ``mask``, ``bias``, ``scale``.

    ``role``: ``"fn"`` or ``"grad_fn"``, for the message. A callable whose signature cannot be read passes.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    params = list(sig.parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        takes = set(_KEYWORDS)
    else:
        takes = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} & set(_KEYWORDS)
    slots = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
    if takes == set(_KEYWORDS) and (varargs or slots >= positional):
        return
    arrays = "q, k, v" if positional == 3 else "q, k, v, dout"
    returns = "out" if role == "fn" else "(dq, dk, dv)"
    missing = ", ".join(f"{n}=" for n in _KEYWORDS if n not in takes) or f"{positional} positional arrays"
    name = getattr(fn, "__qualname__", type(fn).__name__)
    raise UsageError(
        f"{role} must be {role}({arrays}, *, mask=None, bias=None, scale=None) -> {returns}; {name}{sig} lacks "
        f"{missing}: wrap it, e.g. lambda {arrays}, *, mask=None, bias=None, scale=None: "
        f"{name}({arrays}, ...)"
    )


def grads_tuple(grads: Any) -> tuple[Any, Any, Any]:
    """``grad_fn``'s result as ``(dq, dk, dv)``; ``UsageError`` for a dict, ``ValueError`` for another count."""
    if isinstance(grads, Mapping):
        keys = ", ".join(repr(k) for k in grads)
        raise UsageError(
            f"grad_fn returned a dict (keys {keys}); it must return a tuple (dq, dk, dv), in that order — e.g. "
            "return g['q'], g['k'], g['v']"
        )
    grads = tuple(grads)
    if len(grads) != 3:
        raise ValueError(f"grad_fn must return (dq, dk, dv), got {len(grads)} values")
    return grads
