"""Rate-limit algorithms as plain state machines on explicit time.

Nothing here reads a clock, sleeps or awaits: every operation takes ``now`` (seconds on a monotonic
scale), so the same code runs under the real clock, a fake one and (translated to Lua) inside Redis,
and tests can walk it through any sequence of instants, backwards ones included.

Two algorithms share one interface (:class:`Algorithm`):

* :class:`TokenBucket` (the default): Go's ``golang.org/x/time/rate.Limiter``. Tokens refill
  continuously at ``rate`` per second up to ``burst``; a reservation may take the bucket into debt
  and is told when to act, so waiters queue in order without polling.
* :class:`SlidingWindowLog`: at most ``burst`` tokens in any window of ``burst / rate`` seconds,
  exactly what providers that count "requests in the last minute" enforce.

Both admit at most ``rate * T + burst`` tokens over any interval of length ``T`` (counted at the
instants the holders are told to act), and both can be paused (after a 429 nobody acts until the
pause ends, and reservations already waiting move back by the pause).

They are not thread-safe by themselves: each carries a ``lock`` that the in-memory limiters hold
around every call.
"""


from __future__ import annotations

from flashcard_pipeline.resilience.ratelimit.algorithm import ALGORITHMS, INF, Algorithm, AlgorithmName, Take
from flashcard_pipeline.resilience.ratelimit.sliding_window import SlidingWindowLog
from flashcard_pipeline.resilience.ratelimit.token_bucket import TokenBucket

__all__ = [
    "ALGORITHMS",
    "INF",
    "Algorithm",
    "AlgorithmName",
    "SlidingWindowLog",
    "Take",
    "TokenBucket",
    "make_algorithm",
]


def make_algorithm(name: AlgorithmName, rate: float, burst: float, now: float = 0.0) -> TokenBucket | SlidingWindowLog:
    if name == "token_bucket":
        return TokenBucket(rate, burst, now)
    if name == "sliding_window":
        return SlidingWindowLog(rate, burst, now)
    raise ValueError(f"unknown rate-limit algorithm {name!r}; use one of {', '.join(ALGORITHMS)}")
