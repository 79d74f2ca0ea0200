"""The breaker's rolling window: ``buckets`` time buckets of ``bucket`` seconds each, as three parallel lists.

Lists rather than bucket objects because the closed path of :class:`~.circuit.CircuitBreaker` counts a success
inline (index, slot, one increment); :meth:`SamplingWindow.clear` empties them in place, so the breaker may keep
references to them.
"""

from __future__ import annotations

import math
from statistics import NormalDist

from flashcard_pipeline.resilience.breaker.events import HealthInfo


def one_sided_z(confidence: float) -> float:
    """The normal quantile of a one-sided bound at ``confidence`` (0.95 -> 1.645); 0 for no bound."""
    return NormalDist().inv_cdf(confidence) if confidence > 0 else 0.0


def wilson_lower(failures: int, total: int, z: float) -> float:
    """The Wilson score lower bound of a failure ratio: the true ratio is at least this, at the bound's confidence.

    Small samples get wide intervals: 6 failures of 10 bound the ratio only above 0.35 (z = 1.645), while 10 of
    10 bound it above 0.79. With ``z = 0`` it is the observed ratio.
    """
    if total <= 0:
        return 0.0
    p = failures / total
    if z <= 0:
        return p
    z2 = z * z
    centre = p + z2 / (2 * total)
    spread = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    return max(0.0, (centre - spread) / (1 + z2 / total))


def trips(failures: int, total: int, *, ratio: float, min_throughput: int, z: float) -> bool:
    """The closed circuit's trip rule: enough calls, a failure ratio at the threshold, and (with ``z`` > 0) a
    ratio whose Wilson lower bound reaches the threshold too, so noise in a small sample does not trip it. A
    threshold the bound can never reach with ``total`` calls (1.0 needs infinitely many) is met by every call
    failing."""
    if total < min_throughput or failures / total < ratio:
        return False
    return z <= 0 or failures == total or wilson_lower(failures, total, z) >= ratio


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

    def health(self, now: float, buckets: int | None = None) -> HealthInfo:
        """The window at ``now`` (or its newest ``buckets`` buckets), computed without changing anything."""
        newest = int(now // self.bucket)
        oldest = newest - (self.size if buckets is None else min(buckets, self.size))
        successes = failures = 0
        for slot, index in enumerate(self.ids):
            if oldest < index <= newest:
                successes += self.successes[slot]
                failures += self.failures[slot]
        return HealthInfo(successes, failures)

    def tripping(self, now: float, *, ratio: float, min_throughput: int, z: float,
                 recent_buckets: int) -> tuple[HealthInfo, float] | None:
        """The sample that trips the circuit at ``now`` and the seconds it spans, or None: the whole window, or
        its newest ``recent_buckets`` buckets alone with twice the minimum throughput (a sudden outage in a busy
        run, while the whole window still holds the successes from before it)."""
        health = self.health(now)
        if trips(health.failures, health.throughput, ratio=ratio, min_throughput=min_throughput, z=z):
            return health, self.bucket * self.size
        if recent_buckets:
            recent = self.health(now, recent_buckets)
            if trips(recent.failures, recent.throughput, ratio=ratio, min_throughput=2 * min_throughput, z=z):
                return recent, self.bucket * min(recent_buckets, self.size)
        return None
