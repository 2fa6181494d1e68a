"""``from_torch``: check a PyTorch attention with the NumPy harness; gradients by autograd.

torch is imported only when a wrapped function is called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .dtypes import numpy_dtype
from .usage import check_signature

__all__ = ["from_torch", "numpy_to_torch", "torch_to_numpy"]


def numpy_to_torch(a: np.ndarray | None, device: Any = None) -> Any:
    """A torch tensor with ``a``'s values and dtype (ml_dtypes bfloat16 → torch.bfloat16); ``None`` stays ``None``."""
    if a is None:
        return None
    import torch

    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        # every bfloat16 is exactly a float32: go through float32, then narrow (exact)
        t = torch.from_numpy(np.ascontiguousarray(a.astype(np.float32))).to(torch.bfloat16)
    else:
        t = torch.from_numpy(np.ascontiguousarray(a))
    return t if device is None else t.to(device)


def torch_to_numpy(t: Any) -> np.ndarray:
    """A NumPy array with the tensor's values and dtype (torch.bfloat16 → ml_dtypes bfloat16)."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.to(torch.float32).numpy().astype(numpy_dtype("bfloat16"))
    return t.numpy()


def from_torch(
    torch_fn: Callable[..., Any], *, device: Any = None
) -> tuple[Callable[..., np.ndarray], Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Wrap ``torch_fn(q, k, v, *, mask=None, bias=None, scale=None) -> out`` (torch tensors) for the harness.

    Inputs:
        torch_fn: attention on torch tensors, same signature and conventions as the harness's ``fn``
            (boolean ``mask``, True = may attend; additive ``bias``; ``scale=None`` means ``1/sqrt(d)``).
        device: where to run (``"cuda"``, ``"mps"``, ...); ``None`` keeps tensors on the CPU.

    Returns:
        ``(fn, grad_fn)``: ``fn(q, k, v, *, mask, bias, scale) -> out`` and
        ``grad_fn(q, k, v, dout, *, mask, bias, scale) -> (dq, dk, dv)`` on NumPy arrays, dtypes kept
        both ways (bfloat16 through ml_dtypes). Gradients come from ``torch.autograd.grad`` of ``out``
        with upstream ``dout``; an input ``out`` does not depend on gets a zero gradient.

    Raises:
        :class:`~attention_ref.testing.UsageError` (a ``TypeError``) when ``torch_fn`` does not take
        ``mask``, ``bias`` and ``scale`` keywords (a function with ``attn_mask=`` must be wrapped first).

    A ``torch.compile``-d function recompiles for every new shape, and past ``torch._dynamo.config.recompile_limit``
    (8 by default) PyTorch silently runs it eagerly: the battery has more shapes than that, so raise the limit
    (``torch._dynamo.config.recompile_limit = 64``) or compile with ``dynamic=True`` to check the compiled code.
    """
    check_signature(torch_fn, "fn", 3)

    def fn(
        q: np.ndarray, k: np.ndarray, v: np.ndarray, *, mask: Any = None, bias: Any = None, scale: Any = None
    ) -> np.ndarray:
        import torch

        args = [numpy_to_torch(a, device) for a in (q, k, v, mask, bias)]
        with torch.no_grad():
            out = torch_fn(*args[:3], mask=args[3], bias=args[4], scale=scale)
        return torch_to_numpy(out)

    def grad_fn(
        q: np.ndarray, k: np.ndarray, v: np.ndarray, dout: np.ndarray, *, mask: Any = None, bias: Any = None,
        scale: Any = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        import torch

        tq, tk, tv = (numpy_to_torch(a, device).requires_grad_(True) for a in (q, k, v))
        out = torch_fn(tq, tk, tv, mask=numpy_to_torch(mask, device), bias=numpy_to_torch(bias, device), scale=scale)
        grads = torch.autograd.grad(out, (tq, tk, tv), grad_outputs=numpy_to_torch(dout, device), allow_unused=True)
        return tuple(
            torch_to_numpy(torch.zeros_like(t) if g is None else g) for g, t in zip(grads, (tq, tk, tv), strict=True)
        )

    if hasattr(torch_fn, "unsupported"):
        fn.unsupported = grad_fn.unsupported = tuple(torch_fn.unsupported)  # type: ignore[attr-defined]
    return fn, grad_fn
