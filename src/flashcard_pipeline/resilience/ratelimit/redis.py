"""Rate limits in Redis, shared by every process (on any machine) that uses the same key.

Each operation is one Lua script (:mod:`~.redis_scripts`), so it is atomic on the server: a take, a
queued acquire, its cancel, a refund, a pause, a limit change, a state read, and the compare-and-set that
shares the adaptive loop's planned limit. The bucket is the same token bucket as
:class:`~flashcard_pipeline.resilience.ratelimit.algorithms.TokenBucket` (same arithmetic, in Lua), stored
as a hash that expires a day after its last use.

Time is Redis's own ``TIME`` unless the limiter is given a clock (tests and simulations, where every
participant shares that clock): processes on different machines then agree on time without
synchronised clocks, and a waiter sleeps the delay the server computed. All keys of one group share
a hash tag, so the two-limit take works on Redis Cluster too.

Only the token bucket runs in Redis; ``RL_ALGORITHM=sliding_window`` is in-memory only.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flashcard_pipeline.errors import ConfigurationError
from flashcard_pipeline.resilience.core.clock import Clock, SystemClock
from flashcard_pipeline.resilience.ratelimit.algorithms import INF, AlgorithmName
from flashcard_pipeline.resilience.ratelimit.limiter import TIME_EPSILON, AcquireMetrics
from flashcard_pipeline.resilience.ratelimit.redis_scripts import register_scripts


def _encode_rate(rate: float) -> float:
    return -1.0 if rate == INF else rate


def _decode_rate(raw: Any) -> float:
    value = float(raw)
    return INF if value < 0 else value


def _float(raw: Any) -> float:
    return float(raw.decode() if isinstance(raw, bytes) else raw)


def _optional(raw: Any) -> float | None:
    text = raw.decode() if isinstance(raw, bytes) else raw
    return None if text in ("", None) else float(text)


@dataclass
class RedisPart:
    """One limiter's share of a grant: refunds and charges go back to its bucket."""

    limiter: RedisRateLimiter
    amount: float
    time_to_act: float
    rate: float


@dataclass(frozen=True)
class SharedAdaptiveState:
    """The adaptive loop's state as all processes see it (``version`` guards compare-and-set)."""

    version: int
    planned: float | None
    ceiling: float | None
    header: float | None
    changed_at: float | None
    decreased_at: float | None
    #: What this limit admitted in the last minute, over every process (recorded on success).
    used_last_minute: float
    now: float


class RedisRateLimiter:
    """One limit stored in Redis under ``prefix``; same public API as the in-memory ``RateLimiter``.

    ``rate`` and ``burst`` are the configuration: a process whose configuration differs from the
    stored one replaces it (processes sharing a limit must agree), while adaptive changes
    (:meth:`set_limit`) leave it alone.
    """

    def __init__(self, client: Any, rate: float, burst: float, *, name: str = "limit",
                 prefix: str = "flashcard-pipeline:ratelimit:", clock: Clock | None = None,
                 scripts: dict[str, Any] | None = None) -> None:
        self.client = client
        self.name = name
        self.algorithm: AlgorithmName = "token_bucket"
        tag, _, leaf = name.rpartition(":")
        tag, leaf = (tag, leaf) if tag else (name, "bucket")
        base = f"{prefix}{{{tag}}}:{leaf}"
        self.key = base
        self.usage_key = base + ":used"
        self.state_key = base + ":adaptive"
        self._config = (float(rate), float(burst))
        self._rate, self._burst = float(rate), float(burst)
        self._clock_given = clock is not None
        self.clock: Clock = clock or SystemClock()
        self.metrics = AcquireMetrics()
        self._scripts = scripts if scripts is not None else register_scripts(client)

    def __repr__(self) -> str:
        return f"RedisRateLimiter(key={self.key!r}, rate={self._rate!r}, burst={self._burst!r})"

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    def _now(self) -> str:
        return repr(self.clock.monotonic()) if self._clock_given else ""

    def _config_args(self) -> list[Any]:
        rate, burst = self._config
        return [repr(_encode_rate(rate)), repr(burst)]

    # -- acquiring ---------------------------------------------------------------------------------

    async def _reserve_raw(self, n: float, max_wait: float) -> tuple[bool, float, float, float, float]:
        """(ok, time to act, server now, rate then, frozen total), times on the server's scale."""
        raw = await self._scripts["reserve"](keys=[self.key], args=[
            self._now(), repr(float(n)), "-1" if max_wait == INF else repr(max_wait), *self._config_args()])
        ok, when, now, rate, frozen = int(raw[0]), _float(raw[1]), _float(raw[2]), _float(raw[3]), _float(raw[4])
        return bool(ok), when, now, _decode_rate(rate), frozen

    async def acquire(self, n: float = 1.0, *, key: str | None = None) -> float:
        started = self.clock.monotonic()
        ok, when, now, rate, frozen = await self._reserve_raw(n, INF)
        if not ok:
            raise ValueError(f"{self.name}: {n:g} tokens can never be granted (burst {self._burst:g})")
        self.metrics.acquired += 1
        self.metrics.tokens += n
        if when - now <= TIME_EPSILON:
            return 0.0
        part = RedisPart(self, n, when, rate)
        try:
            await self._sleep_until(part, when - now, frozen)
        except asyncio.CancelledError:
            await self._cancel_parts((part,))
            self.metrics.abandoned += 1
            raise
        waited = self.clock.monotonic() - started
        self.metrics.waited += 1
        self.metrics.wait_time += waited
        return waited

    async def _sleep_until(self, part: RedisPart, delay: float, frozen_seen: float) -> None:
        """Sleep the server's delay, then follow any pause that started meanwhile."""
        while delay > TIME_EPSILON:
            await self.clock.sleep(delay)
            state = await self._bucket_state()
            frozen = state["frozen_total"]
            if frozen <= frozen_seen:
                return
            delay = frozen - frozen_seen
            part.time_to_act += delay
            frozen_seen = frozen

    async def try_acquire(self, n: float = 1.0, *, key: str | None = None) -> bool:
        ok, *_ = await self._reserve_raw(n, 0.0)
        if ok:
            self.metrics.acquired += 1
            self.metrics.tokens += n
        return ok

    async def _cancel_parts(self, parts: Sequence[Any]) -> float:
        returned = 0.0
        for part in parts:
            raw = await self._scripts["cancel"](keys=[part.limiter.key], args=[
                self._now(), repr(part.amount), repr(part.time_to_act), repr(_encode_rate(part.rate))])
            returned += _float(raw)
        return returned

    # -- what the per-call policy uses ---------------------------------------------------------------

    async def settle_grant(self, parts: Sequence[Any], delta: float, used: float) -> None:
        if delta or used:
            await self.settle(delta, used)

    async def settle(self, delta: float, used: float) -> None:
        """Refund (``delta`` > 0) or charge tokens, and record ``used`` for the shared last-minute usage."""
        if delta > 0:
            self.metrics.refunded += delta
        elif delta < 0:
            self.metrics.charged -= delta
        await self._scripts["settle"](keys=[self.key, self.usage_key], args=[self._now(), repr(delta), repr(used)])

    async def refund(self, n: float, *, key: str | None = None) -> None:
        if n > 0:
            await self.settle(n, 0.0)

    async def pause(self, seconds: float) -> None:
        if seconds > 0 and not math.isnan(seconds):
            await self._scripts["pause"](keys=[self.key], args=[self._now(), repr(seconds)])

    async def set_limit(self, rate: float, burst: float) -> None:
        await self._scripts["set_limit"](keys=[self.key], args=[
            self._now(), repr(_encode_rate(rate)), repr(burst), *self._config_args()])
        self._rate, self._burst = float(rate), float(burst)

    async def shared_state(self) -> SharedAdaptiveState:
        state = await self._bucket_state()
        return state["adaptive"]  # type: ignore[no-any-return]

    async def propose(self, expected: SharedAdaptiveState, *, planned: float, ceiling: float | None,
                      header: float | None, decreased_at: float | None, rate: float, burst: float) -> bool:
        """Set the shared planned limit (and the bucket's rate) if no other process changed it since ``expected``."""
        raw = await self._scripts["adapt"](keys=[self.state_key, self.key], args=[
            self._now(), str(expected.version), _text(planned), _text(ceiling), _text(header),
            repr(expected.now), _text(decreased_at), repr(_encode_rate(rate)), repr(burst), *self._config_args()])
        if int(raw[0]):
            self._rate, self._burst = float(rate), float(burst)
            return True
        return False

    async def _bucket_state(self) -> dict[str, Any]:
        raw = await self._scripts["state"](keys=[self.key, self.usage_key, self.state_key], args=[self._now()])
        now = _float(raw[0])
        exists = int(raw[1])
        rate, burst, available, paused, frozen, used = (_float(v) for v in raw[2:8])
        version, planned, ceiling, header, changed, decreased = raw[8:14]
        adaptive = SharedAdaptiveState(
            version=int(_optional(version) or 0), planned=_optional(planned), ceiling=_optional(ceiling),
            header=_optional(header), changed_at=_optional(changed), decreased_at=_optional(decreased),
            used_last_minute=used, now=now)
        if not exists:
            rate, burst = self._config
            available, paused, frozen = burst, 0.0, 0.0
        else:
            rate = _decode_rate(rate)
        return {"now": now, "rate": rate, "burst": burst, "available": available, "paused_for": paused,
                "frozen_total": frozen, "adaptive": adaptive}

    async def state(self) -> dict[str, Any]:
        """Live state from Redis (every process's tokens) plus this process's metrics."""
        state = await self._bucket_state()
        rate = state["rate"]
        return {
            "name": self.name,
            "backend": "redis",
            "key": self.key,
            "algorithm": self.algorithm,
            "shards": 1,
            "rate_per_second": rate if math.isfinite(rate) else None,
            "rate_per_minute": rate * 60 if math.isfinite(rate) else None,
            "burst": state["burst"],
            "available": state["available"] if math.isfinite(rate) else None,
            "paused_for": round(state["paused_for"], 3),
            "used_last_minute_all_processes": state["adaptive"].used_last_minute,
            "acquire": self.metrics.to_dict(),
        }


def _text(value: float | None) -> str:
    return "" if value is None else repr(float(value))


class RedisLimits:
    """A :class:`~flashcard_pipeline.resilience.ratelimit.backends.LimitBackend` in Redis: every process using the
    same URL and prefix shares the buckets, the pauses after 429s and the adaptive limits."""

    name = "redis"

    def __init__(self, url_or_client: Any, *, prefix: str = "flashcard-pipeline:ratelimit:",
                 algorithm: AlgorithmName = "token_bucket", clock: Clock | None = None) -> None:
        if algorithm != "token_bucket":
            raise ConfigurationError("the Redis rate-limit backend implements token_bucket only; "
                                     "unset RL_ALGORITHM or use RL_BACKEND=memory")
        if isinstance(url_or_client, str):
            import redis.asyncio as redis_asyncio

            self.client = redis_asyncio.from_url(url_or_client)
            self._owns = True
        else:
            self.client = url_or_client
            self._owns = False
        self.prefix = prefix
        self.algorithm: AlgorithmName = algorithm
        self.clock = clock
        self._scripts = register_scripts(self.client)

    def make(self, name: str, rate: float, burst: float, *, shardable: bool = True) -> RedisRateLimiter:
        """One bucket in Redis (shared by every process, so never sharded)."""
        return RedisRateLimiter(self.client, rate, burst, name=name, prefix=self.prefix, clock=self.clock,
                                scripts=self._scripts)

    async def take(self, limiters: Sequence[RedisRateLimiter], amounts: Sequence[float],
                   key: str | None) -> tuple[list[Any] | None, float, int]:
        args: list[Any] = [limiters[0]._now()]
        for limiter, amount in zip(limiters, amounts, strict=True):
            args.extend([repr(float(amount)), *limiter._config_args()])
        raw = await self._scripts["take"](keys=[limiter.key for limiter in limiters], args=args)
        ok, wait, blocked, now = int(raw[0]), _float(raw[1]), int(raw[2]), _float(raw[3])
        if not ok:
            return None, INF if wait < 0 else wait, blocked
        parts: list[Any] = []
        for limiter, amount in zip(limiters, amounts, strict=True):
            limiter.metrics.acquired += 1
            limiter.metrics.tokens += amount
            parts.append([RedisPart(limiter, amount, now, limiter.rate)])
        return parts, 0.0, -1

    async def aclose(self) -> None:
        if self._owns:
            await self.client.aclose()
