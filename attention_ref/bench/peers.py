"""The torch side of the benchmark: ``scaled_dot_product_attention`` with autograd, and the same block.

torch is imported here lazily, only when the benchmark compares against it. The
peer gets the same NumPy inputs as ours, on the same kind of device (CPU when
ours runs on NumPy, CUDA when ours runs on CuPy); on the CPU the caller sets
``torch.set_num_threads`` to the benchmark's thread count.

The blocks restated in torch follow the blocks' definitions: ``h = GroupNorm(x)``, ``Q = h W_q + b_q``,
``K, V = s W + b`` with ``s = h`` (self-attention) or the context (cross-attention), split head-major
into heads, ``O = SDPA(Q, K, V)`` merged back, ``y = x + O W_o + b_o``; the backward is autograd's, for
``x`` (and the context) and every weight.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from .cases import BLOCK_GROUPS, BLOCK_PARTS, Inputs, Runner, work

BLOCK_EPS = 1e-6


def torch_available(device: str = "cpu") -> bool:
    """Whether torch is installed (and, for ``device="cuda"``, sees a CUDA device)."""
    if importlib.util.find_spec("torch") is None:
        return False
    if device == "cuda":
        import torch

        return torch.cuda.is_available()
    return True


def torch_runner(inputs: Inputs, device: str) -> Runner:
    """torch's implementation of the case (``device`` "cpu" or "cuda"), differentiated by autograd."""
    import torch
    import torch.nn.functional as F

    def leaf(a: Any) -> Any:
        return torch.asarray(a, device=device).requires_grad_(True)

    dout = torch.asarray(inputs.dout, device=device)
    if inputs.part in BLOCK_PARTS:
        x = leaf(inputs.x)  # (batch, side, side, C), channels-last like ours
        context = None if inputs.context is None else leaf(inputs.context)  # (batch, M, C)
        params = {name: leaf(p) for name, p in inputs.params.items()}
        leaves = (x, *(() if context is None else (context,)), *params.values())
        batch, heads, n, m, c = inputs.batch, inputs.heads, inputs.n, inputs.keys, inputs.channels

        def linear(h: Any, name: str) -> Any:
            # h W + b with W stored (in, out)
            out = h @ params[name + ".weight"]
            return out + params[name + ".bias"] if name + ".bias" in params else out

        def split(a: Any, rows: int) -> Any:
            return a.reshape(batch, rows, heads, c // heads).transpose(1, 2)  # (batch, heads, rows, d)

        def fwd() -> Any:
            # GroupNorm wants channels first: (batch, C, side, side)
            h = x.permute(0, 3, 1, 2)
            if "norm.weight" in params:
                h = F.group_norm(h, BLOCK_GROUPS, params["norm.weight"], params.get("norm.bias"), BLOCK_EPS)
            h = h.flatten(2).transpose(1, 2)  # (batch, N, C), token h*W + w
            source = h if context is None else context  # keys and values: the map's tokens, or the context
            q, k, v = split(linear(h, "q"), n), split(linear(source, "k"), m), split(linear(source, "v"), m)
            o = F.scaled_dot_product_attention(q, k, v)  # (batch, heads, N, d)
            o = o.transpose(1, 2).reshape(batch, n, c)  # (batch, N, C)
            return x + linear(o, "out").reshape(x.shape)

    else:
        q, k, v = leaf(inputs.q), leaf(inputs.k), leaf(inputs.v)
        leaves = (q, k, v)

        def fwd() -> Any:
            return F.scaled_dot_product_attention(q, k, v)

    def bwd(out: Any) -> Any:
        return torch.autograd.grad(out, leaves, dout)

    memory = "cuda" if device == "cuda" else "rss"
    return Runner("torch", fwd, bwd, memory, work(inputs, "torch"))


def torch_sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def torch_threads(threads: int | None) -> int | None:
    """Set torch's CPU thread count (when ``threads`` is given); return the previous one."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    return previous
