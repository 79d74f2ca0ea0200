"""One limit split over several buckets (the plan's sharding): MD5 power-of-two choices per key."""

from __future__ import annotations

import itertools
import math

from flashcard_pipeline.resilience.core.clock import Clock
from flashcard_pipeline.resilience.ratelimit.algorithms import INF, Algorithm, AlgorithmName, make_algorithm
from flashcard_pipeline.resilience.ratelimit.limiter import (
    MIN_SPLIT_WAIT,
    Part,
    RateLimiter,
    shard_choices,
    shard_count,
)


class ShardedRateLimiter(RateLimiter):
    """The same limit split over ``shards`` buckets, each with ``rate / shards`` and ``burst / shards``.

    A call with ``key`` goes to the less loaded of the key's two MD5-chosen shards (power of two
    choices), falls back to the other when the first cannot serve it now, and takes from both
    when neither alone can (``acquire`` and the policy only at once: a split acquire polls). The
    shards' limits add up to the global one, so the global limit holds whatever the split.
    ``shards`` defaults to :func:`shard_count` (``max_qps / 2``, at least 10 tokens per shard). Calls
    without a key are spread round-robin.

    ``min_shard_burst`` is the largest single take (the policy's requests limit: one call). While the
    burst cannot give every shard that much (an adaptive cut, a header limit), only as many shards are
    used as can hold it, at least one, and the others are set aside empty: without this a shard of
    ``0.3`` requests would refuse every call. Set-aside shards rejoin empty when the burst allows, so no
    change of the number in use ever adds tokens.
    """

    def __init__(self, rate: float, burst: float, *, shards: int | None = None, max_qps: float | None = None,
                 algorithm: AlgorithmName = "token_bucket", clock: Clock | None = None, name: str = "limit",
                 min_shard_burst: float = 0.0) -> None:
        self._count = shard_count(rate if max_qps is None else max_qps, burst, shards)
        self._min_shard_burst = float(min_shard_burst)
        self._round_robin = itertools.count()
        self._choices: dict[str, tuple[int, int]] = {}
        #: Every shard, those set aside included (``_shards`` is the leading ones in use).
        self._all: list[Algorithm] = []
        super().__init__(rate, burst, algorithm=algorithm, clock=clock, name=name)

    def _make_shards(self, rate: float, burst: float, now: float) -> list[Algorithm]:
        active = self._in_use(burst)
        self._all = [make_algorithm(self.algorithm, rate / active, burst / active, now) if index < active
                     else make_algorithm(self.algorithm, 0.0, 0.0, now) for index in range(self._count)]
        return self._all[:active]

    def _in_use(self, burst: float) -> int:
        """All the shards, or only as many as each hold ``min_shard_burst`` (at least one)."""
        count, unit = self._count, self._min_shard_burst
        if unit > 0 and burst / count < unit:
            count = max(1, min(count, int(burst // unit)))
            while count > 1 and burst / count < unit:  # float division may round below the unit
                count -= 1
        return count

    @property
    def configured_shards(self) -> int:
        """Shards asked for; :attr:`shards` is how many are in use now."""
        return self._count

    def _pair(self, key: str | None) -> tuple[int, int]:
        count = len(self._shards)
        if key is None:
            first = next(self._round_robin) % count
            return first, (first + 1) % count
        pair = self._choices.get(key)
        if pair is None:
            if len(self._choices) > 65536:
                self._choices.clear()
            pair = self._choices[key] = shard_choices(key, count)
        return pair

    async def acquire(self, n: float = 1.0, *, key: str | None = None) -> float:
        started = now = self._monotonic()
        while True:
            parts, wait = self._take_now(now, n, key, INF)
            if parts is not None:
                break
            if wait == INF:
                raise ValueError(self._never(n))
            await self.clock.sleep(wait)  # a call split over two shards polls (see _combine_or_wait)
            now = self._monotonic()
        self.metrics.acquired += 1
        self.metrics.tokens += n
        time_to_act = max(p[1].time_to_act for p in parts)
        if time_to_act <= now:
            waited = now - started
            if waited > 0:
                self.metrics.waited += 1
                self.metrics.wait_time += waited
            return waited
        return await self._await_parts(parts, time_to_act, max(p[0].frozen_total for p in parts), started)

    def _never(self, n: float) -> str:
        shard_burst = self._burst / len(self._shards)
        if len(self._shards) > 1 and n > 2 * shard_burst:
            return (f"{self.name}: {n:g} tokens exceed what two shards hold ({2 * shard_burst:g}); "
                    "use fewer shards for calls this large")
        return super()._never(n)

    def _take_now(self, now: float, n: float, key: str | None, max_wait: float) -> tuple[list[Part] | None, float]:
        if len(self._shards) == 1:
            return super()._take_now(now, n, key, max_wait)
        a, b = self._pair(key)
        first, second = self._shards[a], self._shards[b]
        with first.lock:
            available_first = first.available(now)
        with second.lock:
            available_second = second.available(now)
        if available_second > available_first:
            first, second = second, first
        for shard in (first, second):
            with shard.lock:
                take = shard.reserve(now, n, 0.0)
            if take is not None:
                return [(shard, take)], 0.0
        # Both locks, always in shard order, so two threads combining the same pair cannot deadlock.
        low, high = (self._shards[a], self._shards[b]) if a < b else (self._shards[b], self._shards[a])
        with low.lock, high.lock:
            return self._combine_or_wait(now, n, first, second, max_wait)

    @staticmethod
    def _combine_or_wait(now: float, n: float, first: Algorithm, second: Algorithm,
                         max_wait: float) -> tuple[list[Part] | None, float]:
        """Neither shard alone can serve ``n`` now: take from both if together they hold it now, else
        reserve on the shard that can serve it soonest.

        A call split over two shards is only ever taken *now*: two parts waiting for different instants
        would make the earlier one act late, after its shard has refilled for others (which breaks the
        bound). So a call larger than one shard that cannot be served now gets ``(None, wait)`` and the
        caller polls.
        """
        have_first, have_second = max(0.0, first.available(now)), max(0.0, second.available(now))
        if have_first + have_second >= n and n - have_first <= second.burst:
            part_first = min(n, have_first)
            taken_first = first.reserve(now, part_first, 0.0)
            taken_second = second.reserve(now, n - part_first, 0.0)
            if taken_first is not None and taken_second is not None:
                return [(first, taken_first), (second, taken_second)], 0.0
            for shard, taken in ((first, taken_first), (second, taken_second)):
                if taken is not None:
                    shard.cancel(now, taken)
        single = min((first, second), key=lambda shard: shard.wait_for(now, n))
        wait = single.wait_for(now, n)
        if wait < INF:
            if wait > max_wait:
                return None, wait
            taken = single.reserve(now, n, max_wait)
            return ([(single, taken)], 0.0) if taken is not None else (None, wait)
        if n > first.burst + second.burst:
            return None, INF
        share = _balanced_share(now, n, first, second)
        return None, max(first.wait_for(now, share), second.wait_for(now, n - share), MIN_SPLIT_WAIT)

    def _take_wait(self, now: float, n: float, key: str | None) -> float:
        if len(self._shards) == 1:
            return super()._take_wait(now, n, key)
        a, b = self._pair(key)
        waits = []
        for shard in (self._shards[a], self._shards[b]):
            with shard.lock:
                waits.append(shard.wait_for(now, n))
        return min(waits)

    async def pause(self, seconds: float) -> None:
        """Every shard pauses, set-aside ones too: a waiter holding a part there must follow the pause."""
        if seconds <= 0 or math.isnan(seconds):
            return
        now = self._monotonic()
        for algorithm in self._all:
            with algorithm.lock:
                algorithm.pause(now, seconds)

    async def set_limit(self, rate: float, burst: float) -> None:
        """Split the new limit over as many shards as can each hold ``min_shard_burst``; the rest admit nothing."""
        now = self._monotonic()
        active = self._in_use(burst)
        for index, algorithm in enumerate(self._all):
            with algorithm.lock:
                if index < active:
                    algorithm.set_limit(now, rate / active, burst / active)
                else:
                    algorithm.set_limit(now, 0.0, 0.0)
        if active != len(self._shards):
            self._shards = self._all[:active]
            self._choices.clear()  # a key's two shards are chosen among those in use
        self._rate, self._burst = float(rate), float(burst)

    async def refund(self, n: float, *, key: str | None = None) -> None:
        if n <= 0:
            return
        if len(self._shards) == 1:
            await super().refund(n)
            return
        now = self._monotonic()
        a, b = self._pair(key)
        target = min((self._shards[a], self._shards[b]), key=lambda shard: shard.available(now))
        with target.lock:
            target.refund(now, None, n)
        self.metrics.refunded += n


def _balanced_share(now: float, n: float, first: Algorithm, second: Algorithm) -> float:
    """How much of ``n`` to take from ``first`` so both parts are ready at the same instant.

    Bisection on the two waits (one grows with the share, the other shrinks), so the parts act
    together and neither shard's tokens are used later than its own accounting says.
    """
    low, high = max(0.0, n - second.burst), min(n, first.burst)
    for _ in range(48):
        middle = (low + high) / 2
        if first.wait_for(now, middle) < second.wait_for(now, n - middle):
            low = middle
        else:
            high = middle
    return (low + high) / 2
