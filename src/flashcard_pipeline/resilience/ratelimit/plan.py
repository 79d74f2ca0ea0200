"""From a per-minute limit to a bucket (rate, burst), and the check that a requests limit can hold a call."""

from __future__ import annotations

import logging
import math

from flashcard_pipeline.errors import ConfigurationError
from flashcard_pipeline.resilience.ratelimit.algorithms import INF, AlgorithmName
from flashcard_pipeline.resilience.ratelimit.limiter import MIN_SHARD_CAPACITY
from flashcard_pipeline.resilience.ratelimit.settings import RateLimitSettings

log = logging.getLogger("flashcard_pipeline.resilience.rate_limit")

#: Provider limits are per minute.
WINDOW = 60.0
#: What a call takes from the requests limit: its bucket, and each shard of it, must hold this much.
ONE_CALL = 1.0


def plan_limit(per_minute: float, *, algorithm: AlgorithmName, safety: float, burst_share: float,
               min_burst: float) -> tuple[float, float]:
    """(rate per second, burst) that never puts more than ``per_minute * safety`` in any minute."""
    if not math.isfinite(per_minute):
        return INF, max(1.0, min_burst)
    usable = per_minute * safety
    if algorithm == "sliding_window":
        return usable / WINDOW, max(usable, min_burst)
    burst = min(usable, max(min_burst, per_minute * burst_share))
    # A call nearly as large as the whole limit leaves little to refill; keep a trickle rather than 0.
    return max(usable - burst, usable * 0.1) / WINDOW, burst


def _requests_burst(per_minute: float, shards: int, settings: RateLimitSettings, algorithm: AlgorithmName) -> float:
    """What each of ``shards`` buckets of a requests limit of ``per_minute`` holds."""
    burst = plan_limit(per_minute, algorithm=algorithm, safety=settings.safety, burst_share=settings.burst_share,
                       min_burst=ONE_CALL)[1]
    return burst / shards


def min_requests_per_minute(shards: int, settings: RateLimitSettings, algorithm: AlgorithmName) -> float:
    """The smallest requests limit whose planned burst gives each of ``shards`` buckets one call.

    Found by bisection on :func:`plan_limit` itself rather than by inverting its formula, so the two cannot
    drift apart (for ``shards`` > 1 it is ``shards / RL_BURST_SHARE`` with the default token bucket).
    """
    def holds(per_minute: float) -> bool:
        return _requests_burst(per_minute, shards, settings, algorithm) >= ONE_CALL

    high = shards * ONE_CALL / min(settings.safety, settings.burst_share)
    while not holds(high):
        high *= 2
    low = 0.0
    for _ in range(200):
        middle = (low + high) / 2
        if not low < middle < high:
            break
        low, high = (low, middle) if holds(middle) else (middle, high)
    return high


def _rounded_up(value: float) -> float:
    """``value`` up to two decimals, for a message (never below what is needed)."""
    return math.ceil(value * 100) / 100


def check_requests_limit(settings: RateLimitSettings, shards: int, algorithm: AlgorithmName) -> None:
    """Refuse, before any call, a requests limit that cannot give each of its ``shards`` buckets one call.

    Such a limit never grants a call: every item would fail. The limit in effect at the start is the
    configured one (``RL_REQUESTS_PER_MINUTE`` / ``--rpm``) or, for an unknown limit, where the adaptive
    loop starts (``RL_INITIAL_REQUESTS_PER_MINUTE``). Between one and ``MIN_SHARD_CAPACITY`` calls per
    shard it works, but calls wait for their shard while another has room: a warning, not an error.
    """
    if settings.requests_per_minute is not None:
        start, source = settings.requests_per_minute, "RL_REQUESTS_PER_MINUTE (--rpm)"
    elif settings.adaptive:
        start, source = settings.initial_requests_per_minute, \
            "RL_INITIAL_REQUESTS_PER_MINUTE (where the adaptive limit starts)"
    else:
        return  # no limit at all
    per_shard = _requests_burst(start, shards, settings, algorithm)
    if per_shard >= ONE_CALL:
        if shards > 1 and per_shard < MIN_SHARD_CAPACITY:
            log.warning("RL_SHARDS=%d leaves %.2g calls per shard at %g requests/min; calls wait for their shard "
                        "while others have room (RL_SHARDS=auto keeps at least %g per shard)", shards, per_shard,
                        start, MIN_SHARD_CAPACITY)
        return
    needed = _rounded_up(min_requests_per_minute(shards, settings, algorithm))
    if shards == 1:
        raise ConfigurationError(f"{source} is {start:g}: a requests limit under {needed:g} per minute cannot "
                                 "hold one call; raise it", code="requests_limit_too_small")
    fits = int(per_shard * shards // ONE_CALL)
    instead = f" or set RL_SHARDS={fits}" if fits >= 1 else ""
    raise ConfigurationError(
        f"RL_SHARDS={shards} needs a requests limit of at least {needed:g} per minute (each shard must hold one "
        f"call of the RL_BURST_SHARE={settings.burst_share:g} burst); {source} is {start:g}: raise it{instead}",
        code="requests_limit_too_small")
