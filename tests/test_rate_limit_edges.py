"""The limiters' less travelled paths, each with the rule it keeps: the sliding window's cancel, refund, charge
and pause; the sharded limiter's round robin, refunds, pauses, waits and its message for calls too large."""

from __future__ import annotations

import pytest

from flashcard_pipeline.resilience.ratelimit.algorithms import INF
from flashcard_pipeline.resilience.ratelimit.sharded import ShardedRateLimiter
from flashcard_pipeline.resilience.ratelimit.sliding_window import SlidingWindowLog
from flashcard_pipeline.resilience.testing import FakeClock

# -- the sliding window log ---------------------------------------------------------------------------------


def test_the_window_is_burst_over_rate_and_a_take_beyond_the_burst_is_refused() -> None:
    log = SlidingWindowLog(2.0, 4.0)
    assert log.window == 2.0 and "in_window=0.0" in repr(log)
    assert SlidingWindowLog(INF, 4.0).window == 0.0
    assert SlidingWindowLog(0.0, 4.0).window == INF, "at rate 0 nothing ever comes back"
    assert log.reserve(0.0, 5.0) is None and log.total == 0.0
    assert log.try_take(0.0, 1.0) is False, "a log records every take: only reserve takes"


def test_cancel_returns_a_take_not_yet_acted_and_nothing_else() -> None:
    log = SlidingWindowLog(1.0, 2.0)
    first, second = log.reserve(0.0, 2.0), log.reserve(0.0, 1.0)
    assert first is not None and second is not None and second.time_to_act == pytest.approx(2.0)
    assert log.cancel(1.0, first) == 0.0, "acted already: it stays in the window"
    assert log.cancel(1.0, second) == 1.0 and log.total == 2.0
    assert log.cancel(1.0, second) == 0.0, "never returned twice"


def test_refund_and_charge_adjust_what_the_window_holds() -> None:
    log = SlidingWindowLog(1.0, 10.0)
    take = log.reserve(0.0, 6.0)
    assert take is not None
    log.refund(0.0, take, 10.0)  # more than it took: only what it took comes back
    assert take.amount == 0.0 and log.total == 0.0
    log.refund(0.0, None, 3.0)
    assert log.total == 0.0, "a refund without its take has nothing to return"
    log.charge(0.0, None, 4.0)  # the answer used more than estimated: logged as a take of its own
    log.charge(1.0, None, 2.0)
    assert log.total == 6.0 and [(e.time_to_act, e.amount) for e in log.entries] == [(0.0, 0.0), (0.0, 4.0),
                                                                                      (1.0, 2.0)]
    assert log.available(1.0) == 4.0
    assert log.available(10.5) == 8.0 and log.available(11.0) == 10.0, "each leaves 10 s (burst / rate) after"


def test_a_pause_moves_queued_takes_and_a_shorter_pause_adds_nothing() -> None:
    log = SlidingWindowLog(1.0, 1.0)
    log.reserve(0.0, 1.0)
    queued = log.reserve(0.0, 1.0)
    assert queued is not None and queued.time_to_act == pytest.approx(1.0)
    assert log.pause(0.5, 2.0) == pytest.approx(2.0)
    assert queued.time_to_act == pytest.approx(3.0), "a take not yet acted waits out the pause"
    assert log.pause(0.5, 1.0) == 0.0, "inside a longer pause"
    assert log.frozen_total == pytest.approx(2.0)


# -- the sharded limiter ------------------------------------------------------------------------------------


async def test_calls_without_a_key_are_spread_round_robin_and_refunds_go_to_the_emptier_shard() -> None:
    clock = FakeClock(autojump=False)
    limiter = ShardedRateLimiter(4.0, 8.0, shards=4, clock=clock)
    assert limiter.configured_shards == 4 and limiter.shards == 4
    for _ in range(4):
        assert await limiter.try_acquire(1.0)
    assert [s.available(0.0) for s in limiter._shards] == [1.0] * 4, "one from each, in turn"
    await limiter.refund(1.0, key="학교")
    assert sorted(s.available(0.0) for s in limiter._shards) == [1.0, 1.0, 1.0, 2.0]
    assert limiter.metrics.refunded == 1.0
    await limiter.refund(0.0, key="학교")
    assert limiter.metrics.refunded == 1.0


async def test_a_pause_holds_every_shard_and_waits_are_the_sooner_of_a_keys_two() -> None:
    clock = FakeClock(autojump=False)
    limiter = ShardedRateLimiter(4.0, 8.0, shards=4, clock=clock)
    await limiter.pause(0.0)
    await limiter.pause(float("nan"))
    assert limiter.paused_for() == 0.0, "nothing to pause for"
    await limiter.pause(3.0)
    assert limiter.paused_for() == pytest.approx(3.0)
    assert limiter._take_wait(0.0, 1.0, "학교") == pytest.approx(4.0), "the pause, then a token (it drains)"
    clock.advance(3.0)
    assert limiter._take_wait(3.0, 1.0, "학교") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="exceed what two shards hold"):
        await limiter.acquire(5.0, key="학교")


async def test_one_shard_in_use_behaves_as_a_single_bucket() -> None:
    clock = FakeClock(autojump=False)
    limiter = ShardedRateLimiter(4.0, 8.0, shards=4, clock=clock, min_shard_burst=8.0)
    assert limiter.shards == 1 and limiter.configured_shards == 4
    assert await limiter.try_acquire(8.0, key="학교")
    assert limiter._take_wait(0.0, 1.0, "학교") == pytest.approx(0.25)
    await limiter.refund(2.0, key="학교")
    assert limiter.available() == pytest.approx(2.0)
