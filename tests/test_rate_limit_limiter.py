"""The async limiters on a fake clock: acquire, Go-style reservations (execute, cancel, expiry, metrics),
waiters that are cancelled or paused, sharding, 1,000 concurrent tasks, and several threads at once."""

from __future__ import annotations

import asyncio
import threading

import pytest

from flashcard_pipeline.resilience.rate_limiter import (
    RateLimiter,
    ReservationError,
    ReservationExpiredError,
    ReservationState,
    ShardedRateLimiter,
    shard_choices,
)
from flashcard_pipeline.resilience.testing import FakeClock
from flashcard_pipeline.resilience.token_bucket import INF


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


# -- reservations --------------------------------------------------------------------------------------

async def test_reservation_reports_time_delay_and_expiry_and_runs_once() -> None:
    clock = FakeClock()
    limiter = RateLimiter(2, 1, clock=clock, reservation_ttl=5)
    await limiter.acquire()
    reservation = await limiter.reserve(1, max_wait=1)
    assert reservation.ok and reservation.delay == pytest.approx(0.5)
    assert reservation.time_to_act == pytest.approx(0.5) and reservation.expires_at == pytest.approx(5.5)
    calls: list[float] = []

    async def work() -> str:
        calls.append(clock.monotonic())
        return "done"

    assert await reservation.execute(work) == "done"
    assert calls == [pytest.approx(0.5)]
    assert reservation.state is ReservationState.EXECUTED
    with pytest.raises(ReservationError, match="already executed"):
        await reservation.execute(work)
    assert calls == [pytest.approx(0.5)], "execute twice runs once"
    assert limiter.reservation_metrics.made == 1 and limiter.reservation_metrics.executed == 1
    assert limiter.reservation_metrics.wait_time == pytest.approx(0.5)


@pytest.mark.parametrize(("case", "max_wait", "amount", "granted"), [
    ("max_wait exactly the delay", 0.5, 1, True),
    ("max_wait just short of it", 0.4999, 1, False),
    ("more than the burst", INF, 2, False),
    ("zero tokens", 0.0, 0, True),
])
async def test_reserve_table(case: str, max_wait: float, amount: float, granted: bool) -> None:
    limiter = RateLimiter(2, 1, clock=FakeClock())
    await limiter.acquire()
    before = limiter.available()
    reservation = await limiter.reserve(amount, max_wait=max_wait)
    assert reservation.ok is granted
    if not granted:
        assert limiter.available() == before, "a refused reservation changes nothing"
        assert reservation.state is ReservationState.REFUSED
        with pytest.raises(ReservationError, match="refused"):
            await reservation.execute(lambda: None)
        assert await reservation.cancel() == 0.0
        assert limiter.reservation_metrics.refused == 1


async def test_cancel_returns_what_can_be_returned() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1, 2, clock=clock)
    await limiter.acquire(2)
    middle = await limiter.reserve(2)
    last = await limiter.reserve(1)
    assert (middle.time_to_act, last.time_to_act) == (2.0, 3.0)
    assert await middle.cancel() == pytest.approx(1.0), "partial: the last one keeps its slot"
    assert await last.cancel() == pytest.approx(1.0), "the last gives everything back"
    assert await last.cancel() == 0.0
    metrics = limiter.reservation_metrics
    assert (metrics.made, metrics.cancelled, metrics.returned) == (2, 2, pytest.approx(2.0))


async def test_late_cancel_returns_nothing_and_expired_cannot_execute() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1, 1, clock=clock, reservation_ttl=2)
    late = await limiter.reserve(1)
    expiring = await limiter.reserve(1)
    clock.advance(1.5)
    assert await late.cancel() == 0.0, "its time to act has passed"
    clock.advance(2.0)
    assert expiring.expired()
    with pytest.raises(ReservationExpiredError):
        await expiring.execute(lambda: "never")
    assert expiring.state is ReservationState.EXPIRED
    assert limiter.reservation_metrics.expired == 1


async def test_reservations_never_used_are_counted_as_expired() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, 10, clock=clock, reservation_ttl=1)
    for _ in range(3):
        await limiter.reserve(1)
    assert limiter.snapshot()["pending_reservations"] == 3
    clock.advance(5)
    snapshot = limiter.snapshot()
    assert snapshot["reservations"]["expired"] == 3 and snapshot["pending_reservations"] == 0


async def test_a_reservation_cancelled_while_executing_gives_back_and_does_not_run() -> None:
    clock = FakeClock(autojump=False)
    limiter = RateLimiter(1, 1, clock=clock)
    await limiter.acquire()
    reservation = await limiter.reserve(1)
    ran: list[bool] = []
    task = asyncio.create_task(reservation.execute(lambda: ran.append(True)))
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ran == [] and reservation.state is ReservationState.CANCELLED
    assert limiter.available() == pytest.approx(0.0)


async def test_a_reservation_follows_a_pause() -> None:
    clock = FakeClock(autojump=False)
    limiter = RateLimiter(1, 1, clock=clock, reservation_ttl=0.5)
    await limiter.acquire()
    reservation = await limiter.reserve(1)
    task = asyncio.create_task(reservation.execute(clock.monotonic))
    await settle()
    await limiter.pause(3.0)
    await drive(clock, [task], 0.25, 10)
    assert task.result() == pytest.approx(4.0), "due at 1.0, moved back by the 3 s pause, still valid"


# -- sliding window through the limiter ----------------------------------------------------------------

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


async def test_sharded_reservations_cancel_on_every_shard() -> None:
    limiter = ShardedRateLimiter(100, 100, shards=10, clock=FakeClock())
    before = limiter.available()
    reservation = await limiter.reserve(15, key="k")
    assert reservation.ok and len(reservation._parts) == 2
    assert await reservation.cancel() == pytest.approx(15.0)
    assert limiter.available() == pytest.approx(before)



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


# (case, tokens used on every shard first, n, max_wait, delay or None): 10 shards of 10 tokens, 10 per second each.
SHARDED_RESERVE_TABLE = [
    ("one shard's worth from a full limiter", 0.0, 10, 0.0, 0.0),
    ("five shards' worth at once", 0.0, 50, 0.0, 0.0),
    ("the whole global burst at once", 0.0, 100, 0.0, 0.0),
    ("more than the key's two shards hold now, less than all of them", 5.0, 15, 0.0, 0.0),
    ("more than one shard holds, everything drained: all refill together", 10.0, 15, INF, 0.15),
    ("max_wait exactly that delay", 10.0, 15, 0.15, 0.15),
    ("max_wait just short of it", 10.0, 15, 0.1499, None),
    ("the global burst from drained shards waits until all are full", 10.0, 100, INF, 1.0),
    ("the global burst, not within max_wait", 10.0, 100, 0.5, None),
    ("more than the global burst", 0.0, 101, INF, None),
]


@pytest.mark.parametrize(("case", "used", "amount", "max_wait", "delay"), SHARDED_RESERVE_TABLE,
                         ids=[row[0] for row in SHARDED_RESERVE_TABLE])
async def test_sharded_reserve_honours_anything_within_the_global_burst(case: str, used: float, amount: float,
                                                                         max_wait: float,
                                                                         delay: float | None) -> None:
    limiter = ShardedRateLimiter(100, 100, shards=10, clock=FakeClock())
    for shard in limiter._shards:
        shard.reserve(0.0, used, 0.0)
    before = _levels(limiter)
    at = delay or 0.0
    before_at = sum(shard.available(at) for shard in limiter._shards)
    reservation = await limiter.reserve(amount, max_wait, key="k")
    if delay is None:
        assert not reservation.ok and reservation.state is ReservationState.REFUSED
        assert _levels(limiter) == before, "a refused reservation changes no shard"
        return
    assert reservation.ok and reservation.delay == pytest.approx(delay, abs=1e-9)
    parts = reservation._parts
    assert {take.time_to_act for _, take in parts} == {reservation.time_to_act}, "every part acts at one instant"
    assert sum(take.amount for _, take in parts) == pytest.approx(amount)
    after_at = sum(shard.available(reservation.time_to_act) for shard in limiter._shards)
    assert after_at == pytest.approx(before_at - amount), "the shards account exactly n at the time to act"
    assert await reservation.cancel() == pytest.approx(amount)
    assert _levels(limiter) == pytest.approx(before), "cancelling gives every shard back"


async def test_large_sharded_reservations_queue_within_the_global_bound() -> None:
    limiter = ShardedRateLimiter(100, 100, shards=10, clock=FakeClock())
    times = []
    for i in range(6):
        reservation = await limiter.reserve(60, key=f"k{i}")
        assert reservation.ok
        times.append(reservation.time_to_act)
    assert times == sorted(times) and times[0] == 0.0
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            assert 60 * (j - i + 1) <= 100 * (times[j] - start) + 100 + 1e-6


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
