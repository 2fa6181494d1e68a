r"""Local attention weights spread out into rows of the dense ``(N, N)`` weight matrix, for plots and tests.

Window and neighborhood attention keep, for each query, only the ``L`` weights of the keys it can see
(``L = w²`` or ``k²``). For a query row that is the pair

* ``local (…, R, L)`` — the weights of its ``L`` visible keys, and
* ``key_index (R, L)`` — which pixel (token ``row·W + col``) each of them is,

and the dense row has ``local[…, r, l]`` in column ``key_index[r, l]`` and 0 everywhere else:

.. math:: \text{dense}_{r, n} = \sum_l \text{local}_{r, l}\, [\text{key\_index}_{r, l} = n].

Only the rows asked for are built (``R·N`` entries, not ``N²``), so one query pixel's heatmap costs
``O(N)`` even on a large map.
"""

from __future__ import annotations

import operator
from types import ModuleType
from typing import Any

from ..backend import Array, device_of

__all__ = ["check_row_range", "spread_rows"]


def check_row_range(start: Any, stop: Any, n: int) -> tuple[int, int]:
    """``(start, stop)`` as ints; ``ValueError`` unless ``0 ≤ start ≤ stop ≤ n``, ``TypeError`` for non-integers.

    Any integer type counts (Python ``int``, ``numpy.int64``: whatever has ``__index__``), not ``bool``.
    """
    rows = []
    for name, value in (("start", start), ("stop", stop)):
        if isinstance(value, bool) or not hasattr(type(value), "__index__"):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
        rows.append(operator.index(value))
    start, stop = rows
    if not 0 <= start <= stop <= n:
        raise ValueError(f"rows {start}:{stop} are not within the {n} query rows (need 0 ≤ start ≤ stop ≤ {n})")
    return start, stop


def spread_rows(xp: ModuleType, local: Array, key_index: Array, n_keys: int) -> Array:
    """Dense weight rows ``(…, R, n_keys)`` from local weights ``(…, R, L)`` and their key indices ``(R, L)``.

    Each row's ``L`` key indices must be distinct (they are: a query sees each key at most once).
    """
    keys = xp.arange(n_keys, device=device_of(local))  # (n_keys,)
    dense = xp.zeros((*local.shape[:-1], n_keys), dtype=local.dtype, device=device_of(local))
    for slot in range(local.shape[-1]):
        # dense[…, r, key_index[r, slot]] = local[…, r, slot]
        hit = xp.expand_dims(key_index[:, slot], axis=-1) == keys  # (R, n_keys), one True per row
        dense = xp.where(hit, local[..., slot : slot + 1], dense)
    return dense
