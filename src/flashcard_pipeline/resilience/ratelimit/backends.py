"""Where a group's limits live: this process (:class:`MemoryLimits`) or Redis (:mod:`~.redis`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol, TypeVar

from flashcard_pipeline.resilience.core.clock import Clock, SystemClock
from flashcard_pipeline.resilience.ratelimit.algorithms import AlgorithmName
from flashcard_pipeline.resilience.ratelimit.limiter import AcquireMetrics, Limiter, RateLimiter
from flashcard_pipeline.resilience.ratelimit.plan import ONE_CALL
from flashcard_pipeline.resilience.ratelimit.sharded import ShardedRateLimiter


class GrantLimiter(Limiter, Protocol):
    metrics: AcquireMetrics

    async def settle_grant(self, parts: Sequence[Any], delta: float, used: float) -> None:
        """Refund ``delta`` tokens of a grant (charge if negative) and record ``used`` as answered usage."""
        ...


L = TypeVar("L", bound=GrantLimiter)


class LimitBackend(Protocol[L]):
    """Where a group's limits live: this process (:class:`MemoryLimits`) or Redis. ``take`` is given the
    limiters ``make`` made."""

    name: str
    algorithm: AlgorithmName

    def make(self, name: str, rate: float, burst: float, *, shardable: bool = True) -> L:
        """A limiter; ``shardable=False`` keeps it one bucket whatever ``RL_SHARDS`` says."""
        ...

    async def take(self, limiters: Sequence[L], amounts: Sequence[float],
                   key: str | None) -> tuple[list[Any] | None, float, int]:
        """All amounts at once or nothing: (parts per limiter, 0, -1) or (None, wait, index that blocked)."""
        ...

    async def aclose(self) -> None: ...


class MemoryLimits:
    """Limits in this process: a :class:`RateLimiter`, or a :class:`ShardedRateLimiter` for ``shards`` > 1."""

    name = "memory"

    def __init__(self, *, algorithm: AlgorithmName = "token_bucket", shards: int | Literal["auto"] = 1,
                 clock: Clock | None = None) -> None:
        self.algorithm: AlgorithmName = algorithm
        self.shards = shards
        self.clock: Clock = clock or SystemClock()

    def make(self, name: str, rate: float, burst: float, *, shardable: bool = True) -> RateLimiter:
        if self.shards == 1 or not shardable:
            return RateLimiter(rate, burst, algorithm=self.algorithm, clock=self.clock, name=name)
        # Only the requests limit is sharded, and a call takes one request: a limit cut below what the shards
        # hold uses fewer of them rather than refusing every call.
        return ShardedRateLimiter(rate, burst, shards=None if self.shards == "auto" else self.shards,
                                  algorithm=self.algorithm, clock=self.clock, name=name, min_shard_burst=ONE_CALL)

    async def take(self, limiters: Sequence[RateLimiter], amounts: Sequence[float],
                   key: str | None) -> tuple[list[Any] | None, float, int]:
        now = self.clock.monotonic()
        taken: list[Any] = []
        for index, (limiter, amount) in enumerate(zip(limiters, amounts, strict=True)):
            parts, wait = limiter._take_now(now, amount, key, 0.0)
            if parts is None:
                for done, made in zip(limiters, taken, strict=False):
                    done._untake(made)
                for other, other_amount in zip(limiters[index + 1:], amounts[index + 1:], strict=True):
                    wait = max(wait, other._take_wait(now, other_amount, key))
                return None, wait, index
            taken.append(parts)
        for limiter, amount in zip(limiters, amounts, strict=True):
            limiter.metrics.acquired += 1
            limiter.metrics.tokens += amount
        return taken, 0.0, -1

    async def aclose(self) -> None:
        return None
