"""The breaker's rolling window: ``buckets`` time buckets of ``bucket`` seconds each, as three parallel lists.

Lists rather than bucket objects because the closed path of :class:`~.circuit.CircuitBreaker` counts a success
inline (index, slot, one increment); :meth:`SamplingWindow.clear` empties them in place, so the breaker may keep
references to them.
"""

from __future__ import annotations

import math

from flashcard_pipeline.resilience.breaker.events import HealthInfo


class SamplingWindow:
    __slots__ = ("bucket", "failures", "ids", "size", "successes")

    def __init__(self, duration: float, buckets: int) -> None:
        self.bucket = duration / buckets
        self.size = buckets
        #: The bucket index each slot holds (``-inf``: empty); a slot is reused when its index is stale.
        self.ids: list[float] = [-math.inf] * buckets
        self.successes: list[int] = [0] * buckets
        self.failures: list[int] = [0] * buckets

    def clear(self) -> None:
        self.ids[:] = [-math.inf] * self.size
        self.successes[:] = [0] * self.size
        self.failures[:] = [0] * self.size

    def add(self, now: float, *, failed: bool) -> None:
        index = int(now // self.bucket)
        slot = index % self.size
        if self.ids[slot] != index:
            self.ids[slot] = index
            self.successes[slot] = self.failures[slot] = 0
        if failed:
            self.failures[slot] += 1
        else:
            self.successes[slot] += 1

    def health(self, now: float) -> HealthInfo:
        """The window at ``now``, computed without changing anything."""
        newest = int(now // self.bucket)
        oldest = newest - self.size
        successes = failures = 0
        for slot, index in enumerate(self.ids):
            if oldest < index <= newest:
                successes += self.successes[slot]
                failures += self.failures[slot]
        return HealthInfo(successes, failures)
