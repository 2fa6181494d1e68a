"""The benchmarks: time and peak memory of the library's attention, measured one way.

* :mod:`.measure` — the one timing stack: a forward + backward timed in wall and CPU seconds
  (:func:`~.measure.clock_pair`), best-of-runs on one thread (:func:`~.measure.time_passes`,
  :func:`~.measure.summarise`, :func:`~.measure.one_thread`), the best of several runs of one call
  (:func:`~.measure.best_seconds`), peak memory by what can see the allocations
  (:func:`~.measure.peak_memory_bytes`), the machine's load;
* :mod:`.run` — :func:`run_bench`: our attention paths and the small blocks against the machine's
  limit (:mod:`.limits`), torch (:mod:`.peers`) and the bare matrix products (:mod:`.cases`), reported
  by :mod:`.report`; :mod:`.breakdown` times the tiled path part by part;
* :mod:`.complexity` — :func:`run_complexity`: exact attention and its variants against map size
  (the gallery's cost figure).

The commands that run them, ``python -m attention_ref bench`` and ``python -m attention_ref complexity``,
are :mod:`attention_ref.cli.bench` and :mod:`attention_ref.cli.complexity`. See docs/performance.md.
"""

from __future__ import annotations

from .complexity import run_complexity
from .run import run_bench

__all__ = ["run_bench", "run_complexity"]
