"""The cyclic garbage collector tuned for a long run (``process`` and ``worker`` enter :func:`long_run_gc`).

With Python's defaults a run spends about 7% of its CPU in the collector: a young-generation pass every 700
allocations, and full passes that walk every object the imports made (some 130,000: SQLAlchemy, pydantic, the
HTTP stack) though none of them will ever be garbage. Freezing what exists when the run starts takes those out of
every pass, and a young generation of 10,000 makes young passes rarer (18 in a 1,000-term run, against 274):
the collector's share falls to 2-3% (the ``gc`` column of ``benchmarks/bench_overhead.py``, docs/benchmarks.md).
Reference counting still frees almost everything at once; the collector is only for cycles, which wait a little
longer.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["RUN_THRESHOLDS", "long_run_gc"]

#: Allocations (net of frees) before a young-generation pass, then young passes per middle pass, middle passes
#: per full one: Python's defaults are (700, 10, 10).
RUN_THRESHOLDS = (10_000, 10, 10)


@contextmanager
def long_run_gc() -> Iterator[None]:
    """Within the block: what exists now is frozen out of the collector's passes, and passes come less often.
    Both are undone after it (a freeze that was there before stays), so an application that calls the CLI keeps
    its own settings."""
    before, frozen_before = gc.get_threshold(), gc.get_freeze_count()
    gc.freeze()
    gc.set_threshold(*RUN_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        if not frozen_before:
            gc.unfreeze()
