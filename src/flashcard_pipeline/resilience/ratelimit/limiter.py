"""A rate limiter for one limit in this process.

A limiter admits at most ``rate`` tokens per second with bursts of up to ``burst``, never more than
``rate * T + burst`` over any interval ``T``, sharded or not. ``acquire`` waits its turn (FIFO: the
waiting is the bucket's debt, as in Go's ``golang.org/x/time/rate``, not polling; a waiter cancelled
while waiting gives back what the takes after it allow); ``try_acquire`` never waits.

Time comes from an injectable :class:`~flashcard_pipeline.resilience.core.clock.Clock`; the arithmetic
lives in :mod:`~.algorithms`. :mod:`~.sharded` splits a limit over buckets, :mod:`~.redis` keeps one in
Redis, and :mod:`~.group` puts a requests and a tokens limit around each call.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from flashcard_pipeline.resilience.core.clock import Clock, SystemClock
from flashcard_pipeline.resilience.ratelimit.algorithms import (
    INF,
    Algorithm,
    AlgorithmName,
    Take,
    make_algorithm,
)

#: The plan's floor: a shard must hold at least this many tokens to be worth having.
MIN_SHARD_CAPACITY = 10.0
#: The shortest poll of a call waiting for two shards at once.
MIN_SPLIT_WAIT = 1e-3
#: Waits shorter than this are rounding noise (``t + 1e-17 == t``): act instead of sleeping forever.
TIME_EPSILON = 1e-9


@dataclass
class AcquireMetrics:
    """Counters of ``acquire``: grants, tokens, waits, refunds of unused tokens."""

    acquired: int = 0
    tokens: float = 0.0
    waited: int = 0
    wait_time: float = 0.0
    refunded: float = 0.0
    charged: float = 0.0
    #: Waiters cancelled while waiting (their tokens went back).
    abandoned: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Part = tuple[Algorithm, Take]


class Limiter(Protocol):
    """The public API shared by the in-memory and the Redis limiters."""

    name: str

    @property
    def rate(self) -> float: ...
    @property
    def burst(self) -> float: ...
    async def acquire(self, n: float = 1.0, *, key: str | None = None) -> float: ...
    async def try_acquire(self, n: float = 1.0, *, key: str | None = None) -> bool: ...
    async def refund(self, n: float, *, key: str | None = None) -> None: ...
    async def pause(self, seconds: float) -> None: ...
    async def set_limit(self, rate: float, burst: float) -> None: ...
    async def state(self) -> dict[str, Any]: ...


def shard_count(max_qps: float, capacity: float, override: int | None = None) -> int:
    """The plan's rule: ``max_qps / 2`` shards, fewer if a shard would hold under 10 tokens.

    ``override`` (``RL_SHARDS``) wins when given.
    """
    if override is not None:
        if override < 1:
            raise ValueError(f"shard count must be at least 1, got {override}")
        return override
    if not math.isfinite(max_qps) or not math.isfinite(capacity):
        return 1
    count = max(1, int(max_qps // 2))
    return max(1, min(count, int(capacity // MIN_SHARD_CAPACITY)))


def shard_choices(key: str, shards: int) -> tuple[int, int]:
    """Two distinct shards for ``key`` from its MD5 (stable across processes and runs)."""
    if shards < 2:
        return 0, 0
    digest = hashlib.md5(key.encode("utf-8"), usedforsecurity=False).digest()
    first = int.from_bytes(digest[:8], "big") % shards
    second = int.from_bytes(digest[8:], "big") % shards
    if second == first:
        second = (first + 1) % shards
    return first, second


class RateLimiter:
    """One limit in this process: ``rate`` tokens per second, bursts of ``burst``.

    ``algorithm`` is ``token_bucket`` (default) or ``sliding_window`` (``burst`` tokens per window of
    ``burst / rate`` seconds). Safe to share between tasks and threads: each bucket has its own lock,
    held only for the arithmetic.
    """

    def __init__(self, rate: float, burst: float, *, algorithm: AlgorithmName = "token_bucket",
                 clock: Clock | None = None, name: str = "limit") -> None:
        self.clock: Clock = clock or SystemClock()
        # The real clock's method is a wrapper; calling time.monotonic directly saves it on every acquire.
        self._monotonic = time.monotonic if type(self.clock) is SystemClock else self.clock.monotonic
        self.name = name
        self.algorithm: AlgorithmName = algorithm
        self.metrics = AcquireMetrics()
        self._shards: list[Algorithm] = self._make_shards(rate, burst, self._monotonic())
        self._bucket = self._shards[0]
        self._rate = float(rate)
        self._burst = float(burst)

    def _make_shards(self, rate: float, burst: float, now: float) -> list[Algorithm]:
        return [make_algorithm(self.algorithm, rate, burst, now)]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, rate={self._rate!r}, burst={self._burst!r}, "
                f"algorithm={self.algorithm!r}, shards={len(self._shards)})")

    @property
    def rate(self) -> float:
        """Tokens per second across all shards."""
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    @property
    def shards(self) -> int:
        return len(self._shards)

    # -- acquiring ---------------------------------------------------------------------------------

    async def acquire(self, n: float = 1.0, *, key: str | None = None) -> float:
        """Wait until ``n`` tokens are granted; returns the seconds waited.

        Raises ``ValueError`` for a request no wait can satisfy (more than the burst, or a zero rate).
        """
        bucket = self._bucket
        metrics = self.metrics
        with bucket.lock:
            now = self._monotonic()  # inside the lock: readings reach the bucket in order
            if bucket.try_take(now, n):
                metrics.acquired += 1
                metrics.tokens += n
                return 0.0
            take = bucket.reserve(now, n, INF)
        if take is None:
            raise ValueError(self._never(n))
        metrics.acquired += 1
        metrics.tokens += n
        delay = take.time_to_act - now
        if delay <= 0:
            return 0.0
        return await self._await_parts(((bucket, take),), take.time_to_act, bucket.frozen_total, now)

    async def _await_parts(self, parts: Sequence[Part], time_to_act: float, frozen_seen: float,
                           started: float) -> float:
        clock = self.clock
        try:
            while True:
                frozen = max(p[0].frozen_total for p in parts)
                if frozen > frozen_seen:
                    time_to_act += frozen - frozen_seen
                    frozen_seen = frozen
                    for _, take in parts:
                        take.time_to_act = max(take.time_to_act, time_to_act)
                delay = time_to_act - clock.monotonic()
                if delay <= TIME_EPSILON:
                    break
                await clock.sleep(delay)
        except asyncio.CancelledError:
            await self._cancel_parts(parts)
            self.metrics.abandoned += 1
            raise
        waited = clock.monotonic() - started
        self.metrics.waited += 1
        self.metrics.wait_time += waited
        return waited

    def _never(self, n: float) -> str:
        if n > self._burst:
            return f"{self.name}: {n:g} tokens exceed the burst of {self._burst:g}"
        return f"{self.name}: {n:g} tokens can never be granted at rate {self._rate:g}/s"

    async def try_acquire(self, n: float = 1.0, *, key: str | None = None) -> bool:
        """Take ``n`` tokens if they are there now; never waits."""
        parts, _ = self._take_now(self._monotonic(), n, key, 0.0)
        if parts is None:
            return False
        self.metrics.acquired += 1
        self.metrics.tokens += n
        return True

    async def _cancel_parts(self, parts: Sequence[Any]) -> float:
        now = self._monotonic()
        returned = 0.0
        for algorithm, take in parts:
            with algorithm.lock:
                returned += algorithm.cancel(now, take)
        return returned

    # -- what the per-call policy uses ---------------------------------------------------------------

    def _take_now(self, now: float, n: float, key: str | None, max_wait: float) -> tuple[list[Part] | None, float]:
        """Reserve ``n`` within ``max_wait``: (parts, 0) or (None, seconds until it would fit)."""
        bucket = self._bucket
        with bucket.lock:
            take = bucket.reserve(now, n, max_wait)
            if take is None:
                return None, bucket.wait_for(now, n)
        return [(bucket, take)], 0.0

    def _take_wait(self, now: float, n: float, key: str | None) -> float:
        bucket = self._bucket
        with bucket.lock:
            return bucket.wait_for(now, n)

    def _untake(self, parts: Sequence[Part]) -> None:
        now = self._monotonic()
        for algorithm, take in parts:
            with algorithm.lock:
                amount = take.amount
                if algorithm.cancel(now, take) == 0 and take.amount > 0:
                    # Already due (or others reserved behind it): give the tokens back as a refund.
                    algorithm.refund(now, take, amount)

    def _refund_parts(self, parts: Sequence[Part], amount: float) -> None:
        """Give ``amount`` unused tokens back to the shards they came from, largest part first."""
        if amount <= 0:
            return
        now = self._monotonic()
        self.metrics.refunded += amount
        for algorithm, take in sorted(parts, key=lambda p: -p[1].amount):
            share = min(amount, take.amount)
            if share <= 0:
                continue
            with algorithm.lock:
                algorithm.refund(now, take, share)
            amount -= share
            if amount <= 0:
                return

    def _charge_parts(self, parts: Sequence[Part], amount: float) -> None:
        if amount <= 0:
            return
        self.metrics.charged += amount
        algorithm, take = parts[0] if parts else (self._bucket, None)
        with algorithm.lock:
            algorithm.charge(self._monotonic(), take, amount)

    async def settle_grant(self, parts: Sequence[Part], delta: float, used: float) -> None:
        """Refund ``delta`` unused tokens of a grant (charge ``-delta`` if negative); ``used`` is the group's
        business in memory (it keeps its own log)."""
        if delta > 0:
            self._refund_parts(parts, delta)
        elif delta < 0:
            self._charge_parts(parts, -delta)

    # -- control -------------------------------------------------------------------------------------

    async def refund(self, n: float, *, key: str | None = None) -> None:
        """Give back ``n`` tokens that a grant did not use (e.g. the response reported fewer)."""
        if n <= 0:
            return
        bucket = self._bucket if key is None else self._shards[shard_choices(key, len(self._shards))[0]]
        with bucket.lock:
            bucket.refund(self._monotonic(), None, n)
        self.metrics.refunded += n

    async def pause(self, seconds: float) -> None:
        """Nobody acquires for ``seconds`` (after a 429), waiters included; the bucket drains."""
        if seconds <= 0 or math.isnan(seconds):
            return
        now = self._monotonic()
        for algorithm in self._shards:
            with algorithm.lock:
                algorithm.pause(now, seconds)

    async def set_limit(self, rate: float, burst: float) -> None:
        now = self._monotonic()
        count = len(self._shards)
        for algorithm in self._shards:
            with algorithm.lock:
                algorithm.set_limit(now, rate / count, burst / count)
        self._rate, self._burst = float(rate), float(burst)

    def paused_for(self) -> float:
        now = self._monotonic()
        return max(0.0, max(getattr(a, "frozen_until", -INF) for a in self._shards) - now)

    def available(self) -> float:
        now = self._monotonic()
        total = 0.0
        for algorithm in self._shards:
            with algorithm.lock:
                total += algorithm.available(now)
        return total

    async def state(self) -> dict[str, Any]:
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        """Rate, tokens available now, pause, and the acquire metrics, as plain JSON."""
        return {
            "name": self.name,
            "backend": "memory",
            "algorithm": self.algorithm,
            "shards": len(self._shards),
            "rate_per_second": _finite(self._rate),
            "rate_per_minute": _finite(self._rate * 60),
            "burst": self._burst,
            "available": _finite(self.available()) if math.isfinite(self._rate) else None,
            "paused_for": round(self.paused_for(), 3),
            "acquire": self.metrics.to_dict(),
        }


def _finite(value: float) -> float | None:
    """JSON has no infinity: an unlimited rate is reported as null."""
    return value if math.isfinite(value) else None
