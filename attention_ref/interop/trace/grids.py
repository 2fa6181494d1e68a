"""Where each map sits: the trace's stack of the running blocks around the attention modules, and the grids.

The trace attaches a pre- and a post-hook to every module that encloses a traced attention module
(:meth:`BlockGrids._enter_block`, :meth:`BlockGrids._leave_block`), so that, when an attention module is called,
the stack holds the running blocks with their input's shape and patch sizes. A call on ``(B, N, C)`` tokens gets its
``(H, W)`` from the nearest block running on a ``(B, C, H, W)`` map with ``H·W = N`` or ``(H/p)·(W/p) = N``
(:meth:`BlockGrids.spatial_grid`); a frame attention on ``(B·H·W, F, C)`` from a ``(B·F, C, H, W)`` map
(:meth:`BlockGrids.temporal_grid`); a video transformer's tokens from its ``(B, C, F, H, W)`` input
(:meth:`BlockGrids.spacetime_grid`). Nothing is guessed from ``N`` alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["BlockGrids"]


def _first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args:
        return args[0]
    for key in ("hidden_states", "sample", "x"):
        if key in kwargs:
            return kwargs[key]
    return None


def _patch_sizes(module: Any) -> tuple[Any, ...]:
    """The patch sizes a module on a map may cut it into: 1, and its ``config.patch_size`` when it has one."""
    config = getattr(module, "config", None)
    if isinstance(config, dict) and "patch_size" in config:
        p = config["patch_size"]
    else:
        p = vars(module).get("patch_size")  # an attribute of its own (not diffusers' deprecated config lookup)
    if isinstance(p, (list, tuple)):
        return (1, tuple(int(v) for v in p))
    return (1,) if not isinstance(p, int) or p <= 1 else (1, p)


class BlockGrids:
    """The stack of running blocks and the grids read from it (mixed into :class:`~.hooks.Trace`)."""

    _stack: list[tuple[str, tuple[int, ...] | None, tuple[Any, ...]]]

    def _enter_block(self, name: str, module: Any) -> Callable[..., None]:
        patches = _patch_sizes(module)

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = _first_input(args, kwargs)
            shape = tuple(x.shape) if getattr(x, "ndim", 0) in (4, 5) else None
            self._stack.append((name, shape, patches))

        return hook

    def _leave_block(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            for i in range(len(self._stack) - 1, -1, -1):
                if self._stack[i][0] == name:
                    del self._stack[i]
                    break

        return hook

    def spatial_grid(self, name: str, tokens: int, batch: int) -> tuple[int, int]:
        """``(H, W)`` of a module called on ``(B, N, C)`` tokens: the nearest enclosing module running on a
        ``(B, C, H, W)`` map with ``H·W = N``, or ``(H/p)·(W/p) = N`` for its patch size ``p``."""
        for block, shape, patches in reversed(self._stack):
            inside = block == "" or name.startswith(block + ".")
            # the map's batch must be the tokens' too: a video U-Net's temporal attention runs on
            # (B·H·W, frames, C) inside a block whose map is (B·frames, C, H, W)
            if not inside or shape is None or len(shape) != 4 or shape[0] != batch:
                continue
            H, W = shape[2], shape[3]
            for p in patches:
                if isinstance(p, int) and H % p == 0 and W % p == 0 and (H // p) * (W // p) == tokens:
                    return H // p, W // p
        raise ValueError(
            f"{name}: called on {tokens} tokens (B, N, C), and no enclosing module runs on a (B, C, H, W) map with "
            f"H·W = {tokens} (or (H/p)·(W/p) for its patch size p) and the same B; trace a model in which the "
            "attention sits in a block with a map input (a Transformer2DModel, a UNet, a DiT)"
        )

    def temporal_grid(self, name: str, batch: int, frames: int) -> tuple[int, int, int]:
        """``(B, H, W)`` of a temporal module called on ``(B·H·W, F, C)``: the nearest enclosing module on a
        ``(B·F, C, H, W)`` map."""
        for block, shape, _ in reversed(self._stack):
            inside = block == "" or name.startswith(block + ".")
            if not inside or shape is None or len(shape) != 4 or shape[0] % frames:
                continue
            B, H, W = shape[0] // frames, shape[2], shape[3]
            if B * H * W == batch:
                return B, H, W
        raise ValueError(
            f"{name}: a temporal (frame) attention called on {batch} sequences of {frames} frames, and no enclosing "
            f"module runs on a (B·F, C, H, W) map with B·H·W = {batch}"
        )

    def spacetime_grid(self, name: str, tokens: int, batch: int) -> tuple[int, int, int]:
        """``(F, H, W)`` of a module called on ``(B, F·H·W, C)`` tokens inside a module on a ``(B, C, F, H, W)``
        video cut into ``(p_t, p_h, p_w)`` patches (Wan)."""
        for block, shape, patches in reversed(self._stack):
            inside = block == "" or name.startswith(block + ".")
            if not inside or shape is None or len(shape) != 5 or shape[0] != batch:
                continue
            F, H, W = shape[2:]
            for p in patches:
                pt, ph, pw = (p, p, p) if isinstance(p, int) else p
                if F % pt == 0 and H % ph == 0 and W % pw == 0 and (F // pt) * (H // ph) * (W // pw) == tokens:
                    return F // pt, H // ph, W // pw
        raise ValueError(f"{name}: called on {tokens} tokens, and no enclosing module runs on a (B, C, F, H, W) "
                         "video whose patches are these tokens")  # fmt: skip
