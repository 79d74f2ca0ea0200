"""The async limiters on a fake clock: acquire, waiters that are cancelled or paused, sharding, 1,000
concurrent tasks, and several threads at once."""

from __future__ import annotations

import asyncio
import threading

import pytest

from flashcard_pipeline.resilience.ratelimit.algorithms import INF
from flashcard_pipeline.resilience.ratelimit.limiter import RateLimiter, shard_choices
from flashcard_pipeline.resilience.ratelimit.sharded import ShardedRateLimiter
from flashcard_pipeline.resilience.testing import FakeClock


async def settle() -> None:
    """Let every ready task run until all of them wait again."""
    for _ in range(20):
        await asyncio.sleep(0)


async def drive(clock: FakeClock, tasks: list[asyncio.Task], step: float, limit: float) -> None:
    """Advance a non-jumping fake clock in ``step``s until ``tasks`` are done (or ``limit`` seconds pass)."""
    await settle()
    while not all(task.done() for task in tasks) and clock.monotonic() < limit:
        clock.advance(step)
        await settle()


# -- acquire -------------------------------------------------------------------------------------------

async def test_acquire_waits_its_turn_and_counts_it() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, 5, clock=clock)
    waits = [await limiter.acquire() for _ in range(8)]
    assert waits[:5] == [0.0] * 5
    assert waits[5:] == pytest.approx([0.1, 0.1, 0.1])
    assert clock.monotonic() == pytest.approx(0.3)
    assert limiter.metrics.acquired == 8 and limiter.metrics.waited == 3
    assert limiter.metrics.wait_time == pytest.approx(0.3)


async def test_acquire_more_than_the_burst_or_at_zero_rate_is_an_error() -> None:
    with pytest.raises(ValueError, match="burst"):
        await RateLimiter(10, 5, clock=FakeClock()).acquire(6)
    zero = RateLimiter(0, 1, clock=FakeClock())
    await zero.acquire()
    with pytest.raises(ValueError, match="never"):
        await zero.acquire()


async def test_try_acquire_never_waits() -> None:
    limiter = RateLimiter(1, 2, clock=FakeClock())
    assert [await limiter.try_acquire() for _ in range(3)] == [True, True, False]


async def test_a_waiter_cancelled_while_waiting_gives_its_tokens_back() -> None:
    clock = FakeClock(autojump=False)
    limiter = RateLimiter(1, 1, clock=clock)
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await settle()
    assert clock.sleepers == 1
    assert limiter.available() == pytest.approx(-1.0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.available() == pytest.approx(0.0), "its token went back"
    assert limiter.metrics.abandoned == 1
    clock.advance(1.0)
    assert await limiter.try_acquire(), "the next caller does not pay for the cancelled one"


async def test_a_pause_holds_waiters_that_were_already_queued() -> None:
    clock = FakeClock(autojump=False)
    limiter = RateLimiter(1, 1, clock=clock)
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await settle()
    clock.advance(0.5)
    await limiter.pause(2.0)
    await drive(clock, [waiter], 0.25, 10)
    assert waiter.done()
    assert clock.monotonic() == pytest.approx(3.0), "due at 1.0, moved back by the 2 s pause"


# -- sliding window ------------------------------------------------------------------------------------

async def test_sliding_window_limiter_admits_a_window_then_waits_for_it_to_slide() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1, 3, algorithm="sliding_window", clock=clock)
    waits = [await limiter.acquire() for _ in range(4)]
    assert waits == pytest.approx([0, 0, 0, 3.0])


# -- 1,000 concurrent tasks ----------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["token_bucket", "sliding_window"])
async def test_a_thousand_concurrent_tasks_are_admitted_in_order_within_the_bound(algorithm: str) -> None:
    clock = FakeClock(autojump=False)
    limiter = RateLimiter(100, 10, algorithm=algorithm, clock=clock)  # type: ignore[arg-type]
    admitted: list[tuple[float, int]] = []

    async def task(index: int) -> None:
        await limiter.acquire()
        admitted.append((clock.monotonic(), index))

    tasks = [asyncio.create_task(task(i)) for i in range(1000)]
    await drive(clock, tasks, 0.01, 60)
    assert all(t.done() and t.exception() is None for t in tasks)
    times = [t for t, _ in admitted]
    assert [i for _, i in admitted] == list(range(1000)), "FIFO"
    assert max(times) == pytest.approx(9.9 if algorithm == "token_bucket" else 99 * 0.1, abs=0.02)
    for start in range(0, 1000, 7):
        for end in range(start, min(start + 60, 1000)):
            assert end - start + 1 <= 100 * (times[end] - times[start]) + 10 + 1e-6


# -- sharding ------------------------------------------------------------------------------------------

async def test_sharded_limiter_falls_back_and_combines_but_holds_the_global_limit() -> None:
    clock = FakeClock(autojump=False)
    limiter = ShardedRateLimiter(40, 40, shards=4, clock=clock)
    assert limiter.shards == 4
    granted = 0
    while await limiter.try_acquire(key="same key"):
        granted += 1
    assert granted == 20, "a key reaches its two shards: the first, then the fallback"
    used = set(shard_choices("same key", 4))
    fresh = next(f"k{i}" for i in range(100) if not used & set(shard_choices(f"k{i}", 4)))
    assert await limiter.try_acquire(15, key=fresh), "neither fresh shard holds 15: both are combined"
    total = 20 + 15 + sum([await limiter.try_acquire(key=f"more{i}") for i in range(200)])
    assert total == 40, "every token is reachable through some key, and never more than the global burst"
    assert await limiter.try_acquire(19, key="x") is False
    clock.advance(1.0)
    assert 0 < sum([await limiter.try_acquire(key=f"after{i}") for i in range(60)]) <= 40


async def test_sharded_limiter_serves_a_call_larger_than_one_shard_from_two() -> None:
    clock = FakeClock()
    limiter = ShardedRateLimiter(100, 100, shards=10, clock=clock)
    assert await limiter.acquire(15, key="big") == 0.0
    waited = await limiter.acquire(20, key="big")
    assert waited > 0
    with pytest.raises(ValueError, match="two shards"):
        await limiter.acquire(21, key="big")


async def test_a_burst_cut_below_one_call_per_shard_uses_fewer_shards_and_never_adds_tokens() -> None:
    """An adaptive cut to 2.5 requests of burst over 4 shards would leave 0.625 each: no call could ever fit."""
    clock = FakeClock()
    limiter = ShardedRateLimiter(40 / 60, 40, shards=4, clock=clock, min_shard_burst=1.0)
    assert limiter.shards == 4 and limiter.configured_shards == 4
    await limiter.set_limit(2.5 / 60, 2.5)
    assert limiter.shards == 2 and [s.burst for s in limiter._shards] == [1.25, 1.25]
    assert limiter.available() <= 2.5
    granted = sum([await limiter.try_acquire(key=f"k{i}") for i in range(50)])
    assert granted == 2, "each shard in use holds one call; the set-aside ones admit nothing"
    assert await limiter.acquire(key="waits") > 0, "a call is still granted (after a wait), never refused"
    await limiter.set_limit(0.5 / 60, 0.5)
    assert limiter.shards == 1, "under one call in all: a single shard, as unsharded"
    await limiter.set_limit(40 / 60, 40)
    assert limiter.shards == 4
    assert [s.available(clock.monotonic()) for s in limiter._shards[1:]] == [0.0, 0.0, 0.0], \
        "shards rejoin empty: changing how many are used never hands out a burst"


async def test_without_a_minimum_a_sharded_limiter_keeps_every_shard() -> None:
    limiter = ShardedRateLimiter(1.0, 40, shards=4, clock=FakeClock())
    await limiter.set_limit(0.1, 2.0)
    assert limiter.shards == 4 and limiter._shards[0].burst == 0.5, "fractional takes may use any shard"


def _levels(limiter: ShardedRateLimiter) -> list[float]:
    now = limiter.clock.monotonic()
    return [shard.available(now) for shard in limiter._shards]


@pytest.mark.parametrize(("drained", "served"), [(0, 1), (1, 0)])
async def test_power_of_two_choices_takes_from_the_fuller_of_the_key_s_two_shards(drained: int, served: int) -> None:
    limiter = ShardedRateLimiter(40, 40, shards=4, clock=FakeClock())
    pair = shard_choices("k", 4)
    limiter._shards[pair[drained]].reserve(0.0, 4, 0.0)
    before = _levels(limiter)
    assert await limiter.try_acquire(key="k")
    expected = list(before)
    expected[pair[served]] -= 1
    assert _levels(limiter) == pytest.approx(expected), "the fuller shard pays, whichever MD5 named first"


async def test_a_split_call_whose_second_half_fails_gives_the_first_half_back() -> None:
    limiter = ShardedRateLimiter(40, 40, shards=4, algorithm="sliding_window", clock=FakeClock())
    first, second = (limiter._shards[i] for i in shard_choices("k", 4))
    # A cancelled queued reservation: the second shard holds 8 but nothing can act before it (FIFO) at 1.0.
    second.reserve(0.0, 2, 0.0)
    second.cancel(0.0, second.reserve(0.0, 10, INF))
    assert (first.available(0.0), second.available(0.0)) == (10.0, 8.0)
    assert await limiter.try_acquire(15, key="k") is False
    assert first.available(0.0) == 10.0, "the 10 taken from the first shard went back"


# -- threads -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shards", [1, 4])
def test_threads_sharing_one_limiter_never_exceed_the_burst(shards: int) -> None:
    clock = FakeClock()
    limiter = ShardedRateLimiter(1.0, 400, shards=shards, clock=clock) if shards > 1 else RateLimiter(1.0, 400)
    granted = [0] * 4

    def hammer(index: int) -> None:
        async def run() -> None:
            for i in range(300):
                if await limiter.try_acquire(key=f"{index}-{i}"):
                    granted[index] += 1
        asyncio.run(run())

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 390 <= sum(granted) <= 400 + 1, "time frozen (or nearly): at most the burst"
