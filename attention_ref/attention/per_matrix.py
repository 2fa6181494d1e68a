"""Cutting a stack of attention problems into its matrices, to spread them over the CPU's cores.

Inputs of shape ``(..., N, d)`` hold one attention problem per leading index
(batch, head): the problems share nothing, so on NumPy each can run in its own
thread (:func:`attention_ref.backend.parallel_map`). The helpers here name one
problem by an index that keeps every dimension (``(slice(b, b+1), slice(h, h+1), ...)``:
a size-1 slice per leading dimension, then ``...`` for the matrix), and cut a broadcastable ``mask`` or ``bias``
to match it: a dimension of size 1 broadcasts over all problems and is kept whole.
"""

from __future__ import annotations

import itertools
from typing import Any

from ..backend import Array

__all__ = ["broadcast_index", "matrix_indices", "slab_indices", "take"]

Index = tuple[Any, ...]  # size-1 slices of the leading dims, then Ellipsis


def matrix_indices(leading: tuple[int, ...]) -> list[Index]:
    """Every leading index of a stack with leading dims ``leading``, as size-1 slices, in C order.

    ``matrix_indices((2, 3))`` has 6 entries, the first ``(slice(0, 1), slice(0, 1), ...)``; the
    trailing ``...`` takes the matrix whole (the Array API wants every dimension indexed).
    With no leading dims there is one problem: ``[(...,)]``.
    """
    return [(*(slice(i, i + 1) for i in idx), ...) for idx in itertools.product(*(range(n) for n in leading))]


def slab_indices(leading: tuple[int, ...], parts: int) -> list[Index]:
    """The stack cut into at most ``parts`` slabs of whole problems, along one leading dim, in order.

    The dim cut is the first with at least ``parts`` entries, else the longest; its range is split
    into nearly equal runs (``slab_indices((32, 4), 2)`` is ``[(0:16, :, ...), (16:32, :, ...)]``).
    A slab is one thread's work: far fewer hand-overs than one problem per thread when the problems
    are small. With no dim longer than 1 there is one slab, ``[(...,)]``.
    """
    if not leading or max(leading) <= 1:
        return [(...,)]
    axis = next((i for i, n in enumerate(leading) if n >= parts), max(range(len(leading)), key=lambda i: leading[i]))
    n = leading[axis]
    count = min(parts, n)
    bounds = [n * i // count for i in range(count + 1)]
    before, after = (slice(None),) * axis, (slice(None),) * (len(leading) - axis - 1)
    return [(*before, slice(a, b), *after, ...) for a, b in itertools.pairwise(bounds)]


def broadcast_index(shape: tuple[int, ...], index: Index, rank: int) -> Index:
    """The part of an array of ``shape`` that problem (or slab) ``index`` of a rank-``rank`` stack reads.

    ``shape`` is broadcastable to the stack's ``(..., N, M)``; it may have fewer dims
    (they are aligned from the right, as in broadcasting). A leading dim of size 1
    is taken whole; the last two dims are always taken whole.
    """
    leading = [i for i in index if i is not Ellipsis]
    skipped = rank - len(shape)  # leading dims of the stack that ``shape`` does not have
    parts = []
    for axis, n in enumerate(shape):
        stack_axis = axis + skipped
        is_leading = stack_axis < len(leading)
        parts.append(leading[stack_axis] if is_leading and n != 1 else slice(None))
    return tuple(parts)


def take(a: Array | None, index: Index, rank: int) -> Array | None:
    """``a``'s part for problem ``index`` (see :func:`broadcast_index`); ``None`` stays ``None``."""
    if a is None:
        return None
    return a[broadcast_index(tuple(a.shape), index, rank)]
