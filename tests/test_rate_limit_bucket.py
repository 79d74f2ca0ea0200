"""The rate-limit algorithms on explicit time: Go ``rate.Limiter`` semantics as tables, and the bound
``admitted over any interval T <= rate * T + burst`` as a Hypothesis property (plain and sharded):
grants at their time to act, minus refunds of unused tokens at the instant they are returned.

Nothing here sleeps: every instant is passed in.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashcard_pipeline.resilience.ratelimit.algorithms import INF, SlidingWindowLog, Take, TokenBucket, make_algorithm
from flashcard_pipeline.resilience.ratelimit.limiter import Part, RateLimiter, shard_choices, shard_count
from flashcard_pipeline.resilience.ratelimit.sharded import ShardedRateLimiter

# -- reservations: (case, rate, burst, [(now, amount, max_wait)], expected time to act or None) ----------

RESERVE_TABLE = [
    ("burst first, then one per 1/rate", 2.0, 4.0, [(0, 1, INF)] * 6, [0.0, 0.0, 0.0, 0.0, 0.5, 1.0]),
    ("more than the burst is refused and changes nothing", 2.0, 4.0, [(0, 5, INF), (0, 4, 0)], [None, 0.0]),
    ("zero tokens are granted at once even in debt", 1.0, 1.0, [(0, 1, INF), (0, 1, INF), (0, 0, 0)],
     [0.0, 1.0, 0.0]),
    ("infinite rate grants anything at once", INF, 0.0, [(0, 1000, 0), (0, 1e9, 0)], [0.0, 0.0]),
    ("zero rate: the burst, then never", 0.0, 3.0, [(0, 2, INF), (0, 1, INF), (5, 1, INF), (1e6, 1, INF)],
     [0.0, 0.0, None, None]),
    ("tiny rate: one token per 1e9 s", 1e-9, 1.0, [(0, 1, INF), (0, 1, INF)], [0.0, 1e9]),
    ("max_wait exactly equal to the delay is granted", 2.0, 1.0, [(0, 1, 0), (0, 1, 0.5), (0, 1, 0.5)],
     [0.0, 0.5, None]),
    ("max_wait just below the delay is refused", 2.0, 1.0, [(0, 1, 0), (0, 1, 0.49999)], [0.0, None]),
    ("a refused reservation leaves the queue as it was", 1.0, 1.0, [(0, 1, 0), (0, 1, 0.1), (0, 1, INF)],
     [0.0, None, 1.0]),
    ("refill is capped at the burst", 1.0, 2.0, [(0, 2, 0), (100, 2, 0), (100, 1, 0)], [0.0, 100.0, None]),
    ("clock going backwards creates no tokens", 1.0, 2.0, [(10, 2, 0), (5, 1, 0), (5, 1, INF)],
     [10.0, None, 11.0]),
    ("fractional amounts", 4.0, 1.0, [(0, 0.25, 0)] * 5, [0.0, 0.0, 0.0, 0.0, None]),
]


@pytest.mark.parametrize(("case", "rate", "burst", "calls", "expected"), RESERVE_TABLE,
                         ids=[row[0] for row in RESERVE_TABLE])
def test_token_bucket_reserve_table(case: str, rate: float, burst: float,
                                    calls: list[tuple[float, float, float]], expected: list[float | None]) -> None:
    bucket = TokenBucket(rate, burst, now=calls[0][0])
    got = []
    for now, amount, max_wait in calls:
        take = bucket.reserve(now, amount, max_wait)
        got.append(None if take is None else take.time_to_act)
    assert got == pytest.approx(expected)


@pytest.mark.parametrize(("case", "rate", "burst", "calls", "expected"), RESERVE_TABLE,
                         ids=[row[0] for row in RESERVE_TABLE])
def test_try_take_agrees_with_a_zero_wait_reservation(case: str, rate: float, burst: float,
                                                      calls: list[tuple[float, float, float]],
                                                      expected: list[float | None]) -> None:
    fast, slow = TokenBucket(rate, burst, now=calls[0][0]), TokenBucket(rate, burst, now=calls[0][0])
    for now, amount, _ in calls:
        took = fast.try_take(now, amount)
        reserved = slow.reserve(now, amount, 0.0)
        if took:
            assert reserved is not None and reserved.time_to_act == now
        elif reserved is not None:  # the fast path declined: the caller falls back to reserve
            assert fast.reserve(now, amount, 0.0) is not None
        assert fast.available(now) == pytest.approx(slow.available(now))


def test_clock_going_backwards_never_goes_negative_or_refills() -> None:
    bucket = TokenBucket(1.0, 5.0, now=100.0)
    assert bucket.reserve(100.0, 5.0, 0) is not None
    assert bucket.available(50.0) == 0.0
    assert bucket.wait_for(50.0, 1.0) == pytest.approx(51.0), "refill resumes at the bucket's own time"
    assert bucket.reserve(50.0, 1.0, 0.0) is None
    assert bucket.last == 100.0, "a stale reading never moves the bucket's time back"
    assert bucket.available(100.5) == pytest.approx(0.5), "so the refill since 100 is counted once"


# -- cancel: (case, rate, burst, amounts reserved at t=0, which to cancel, cancel at, tokens returned) ---

CANCEL_TABLE = [
    ("cancelling the last gives everything back", 1.0, 1.0, [1, 1], 1, 0.0, 1.0),
    ("cancelling the only reservation in debt", 1.0, 2.0, [2, 2], 1, 0.0, 2.0),
    ("partial: later reservations keep their slots", 1.0, 2.0, [2, 2, 1], 1, 0.0, 1.0),
    ("nothing when later reservations took all of its slot", 1.0, 1.0, [1, 1, 1], 1, 0.0, 0.0),
    ("late: after its time to act nothing returns", 1.0, 1.0, [1, 1], 1, 1.5, 0.0),
    ("a granted-at-once take returns into the burst", 1.0, 3.0, [2], 0, 0.0, 2.0),
]


@pytest.mark.parametrize(("case", "rate", "burst", "amounts", "index", "at", "returned"), CANCEL_TABLE,
                         ids=[row[0] for row in CANCEL_TABLE])
def test_token_bucket_cancel_table(case: str, rate: float, burst: float, amounts: list[float], index: int,
                                   at: float, returned: float) -> None:
    bucket = TokenBucket(rate, burst)
    takes = [bucket.reserve(0.0, amount) for amount in amounts]
    assert all(take is not None for take in takes)
    before = bucket.available(at)
    target = takes[index]
    assert target is not None
    assert bucket.cancel(at, target) == pytest.approx(returned)
    assert bucket.available(at) == pytest.approx(before + returned)
    assert bucket.cancel(at, target) == 0.0, "a reservation cancels once"


def test_cancelling_the_last_moves_the_next_reservation_forward() -> None:
    bucket = TokenBucket(1.0, 1.0)
    bucket.reserve(0.0, 1)
    second = bucket.reserve(0.0, 1)
    assert second is not None and second.time_to_act == 1.0
    bucket.cancel(0.0, second)
    third = bucket.reserve(0.0, 1)
    assert third is not None and third.time_to_act == 1.0, "the freed slot is reused, not the one after it"


def test_refund_returns_unused_tokens_and_charge_adds_debt() -> None:
    bucket = TokenBucket(1.0, 10.0)
    take = bucket.reserve(0.0, 10)
    bucket.refund(0.0, take, 4)
    assert bucket.available(0.0) == pytest.approx(4.0)
    bucket.charge(0.0, take, 6)
    assert bucket.available(0.0) == pytest.approx(-2.0)
    assert bucket.wait_for(0.0, 1) == pytest.approx(3.0)
    bucket.refund(0.0, take, 100)
    assert bucket.available(0.0) == 10.0, "never beyond the burst"


def test_refund_does_not_give_away_refill_promised_to_pending_reservations() -> None:
    bucket = TokenBucket(0.5, 1.0)
    first = bucket.reserve(0.0, 1)
    pending = bucket.reserve(0.0, 1)
    assert pending is not None and pending.time_to_act == 2.0
    bucket.refund(1.5, first, 0.5)
    late = bucket.reserve(1.5, 1 / 3)
    assert late is not None and late.time_to_act == pytest.approx(2 + 2 / 3), "not next to the queued one"
    bucket.refund(1.5, pending, 0.5)
    assert pending.amount == 0.5, "a pending take refunds by Go's partial-cancel rule"


def test_refund_of_the_last_pending_take_comes_back_in_full() -> None:
    bucket = TokenBucket(1.0, 2.0)
    bucket.reserve(0.0, 2)
    last = bucket.reserve(0.0, 2)
    bucket.refund(0.0, last, 1.5)
    assert bucket.available(0.0) == pytest.approx(-0.5)


def test_pause_drains_holds_and_moves_the_queue() -> None:
    bucket = TokenBucket(1.0, 5.0)
    waiting = bucket.reserve(0.0, 6 - 0.0) if False else bucket.reserve(0.0, 5)
    assert waiting is not None
    assert bucket.pause(0.0, 2.0) == 2.0
    assert bucket.available(1.0) == 0.0
    assert bucket.reserve(1.0, 1, 0.5) is None
    assert bucket.wait_for(0.0, 1) == pytest.approx(3.0)
    assert bucket.pause(1.0, 2.0) == pytest.approx(1.0), "overlapping pauses add only the part beyond"
    assert bucket.frozen_total == pytest.approx(3.0)
    assert bucket.available(3.5) == pytest.approx(0.5)


def test_set_limit_keeps_accrued_tokens_and_caps_to_the_new_burst() -> None:
    bucket = TokenBucket(1.0, 10.0)
    bucket.reserve(0.0, 10)
    bucket.set_limit(4.0, 2.0, 3.0)
    assert bucket.available(4.0) == 3.0
    assert bucket.available(4.0) == bucket.burst
    bucket.reserve(4.0, 3)
    assert bucket.wait_for(4.0, 1) == pytest.approx(0.5)


@pytest.mark.parametrize(("rate", "burst"), [(-1.0, 1.0), (math.nan, 1.0), (1.0, -1.0), (1.0, INF)])
def test_invalid_limits_are_rejected(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


# -- sliding window ------------------------------------------------------------------------------------

SLIDING_TABLE = [
    ("a full window, then the next one", 1.0, 3.0, [(0, 1, INF)] * 5, [0.0, 0.0, 0.0, 3.0, 3.0]),
    ("more than the window holds is refused", 1.0, 3.0, [(0, 4, INF)], [None]),
    ("max_wait equal to the wait is granted", 1.0, 2.0, [(0, 2, 0), (0, 1, 2.0)], [0.0, 2.0]),
    ("max_wait below it is refused", 1.0, 2.0, [(0, 2, 0), (0, 1, 1.9)], [0.0, None]),
    ("zero rate: the window never slides", 0.0, 2.0, [(0, 2, 0), (1e9, 1, INF)], [0.0, None]),
    ("infinite rate", INF, 0.0, [(0, 50, 0)], [0.0]),
    ("queued reservations stay in order", 1.0, 2.0, [(0, 2, 0), (0, 2, INF), (0, 1, INF)], [0.0, 2.0, 4.0]),
]


@pytest.mark.parametrize(("case", "rate", "burst", "calls", "expected"), SLIDING_TABLE,
                         ids=[row[0] for row in SLIDING_TABLE])
def test_sliding_window_reserve_table(case: str, rate: float, burst: float,
                                      calls: list[tuple[float, float, float]], expected: list[float | None]) -> None:
    window = SlidingWindowLog(rate, burst)
    got = []
    for now, amount, max_wait in calls:
        take = window.reserve(now, amount, max_wait)
        got.append(None if take is None else take.time_to_act)
    assert got == pytest.approx(expected)


def test_sliding_window_cancel_refund_and_pause() -> None:
    window = SlidingWindowLog(1.0, 2.0)
    first = window.reserve(0.0, 2)
    queued = window.reserve(0.0, 2)
    assert first is not None and queued is not None and queued.time_to_act == 2.0
    assert window.cancel(0.0, queued) == 2.0, "a log gives everything back, later reservations or not"
    window.refund(0.0, first, 1.5)
    assert window.available(0.0) == pytest.approx(1.5)
    later = window.reserve(0.0, 2)
    assert later is not None and later.time_to_act == 2.0
    assert window.pause(0.0, 1.0) == 1.0
    assert later.time_to_act == 3.0, "a pause moves the waiting entries back"
    assert window.cancel(5.0, later) == 0.0, "late"


def test_make_algorithm_names() -> None:
    assert isinstance(make_algorithm("token_bucket", 1, 1), TokenBucket)
    assert isinstance(make_algorithm("sliding_window", 1, 1), SlidingWindowLog)
    with pytest.raises(ValueError, match="unknown"):
        make_algorithm("leaky", 1, 1)  # type: ignore[arg-type]


# -- shard arithmetic ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("qps", "capacity", "override", "expected"), [
    (10, 1000, None, 5), (100, 1000, None, 50), (100, 120, None, 12), (100, 15, None, 1), (1, 1000, None, 1),
    (INF, 100, None, 1), (100, 1000, 3, 3)])
def test_shard_count(qps: float, capacity: float, override: int | None, expected: int) -> None:
    assert shard_count(qps, capacity, override) == expected


def test_shard_count_rejects_zero() -> None:
    with pytest.raises(ValueError):
        shard_count(10, 100, 0)


def test_shard_choices_are_two_stable_distinct_shards() -> None:
    pairs = {shard_choices(f"key{i}", 8) for i in range(500)}
    assert all(a != b and 0 <= a < 8 and 0 <= b < 8 for a, b in pairs)
    assert shard_choices("사과", 8) == shard_choices("사과", 8)
    firsts = [shard_choices(f"key{i}", 8)[0] for i in range(4000)]
    assert min(firsts.count(i) for i in range(8)) > 350, "MD5 spreads keys evenly"


# -- the bound, as a property --------------------------------------------------------------------------

class _Clock:
    """Explicit time for the async limiters: tests move it; nobody sleeps."""

    def __init__(self) -> None:
        self.t = 0.0

    def monotonic(self) -> float:
        return self.t

    def now(self):  # pragma: no cover - not used by these limiters
        raise NotImplementedError

    async def sleep(self, seconds: float) -> None:  # pragma: no cover - reservations are never awaited here
        raise AssertionError("nothing sleeps in this test")


@dataclass
class _Admitted:
    at: float
    amount: float


def _max_over_intervals(admitted: list[_Admitted], rate: float, burst: float) -> float:
    """The largest ``net admitted - (rate * T + burst)`` over every interval [a, b] whose ends are events
    (refunds, negative, are counted when made; events at one instant all fall inside)."""
    events = sorted(admitted, key=lambda a: (a.at, -a.amount))
    worst = -INF
    for i, start in enumerate(events):
        if i and events[i - 1].at == start.at:
            continue
        total = 0.0
        for j, end in enumerate(events[i:], start=i):
            total += end.amount
            if j + 1 < len(events) and events[j + 1].at == end.at:
                continue
            worst = max(worst, total - (rate * (end.at - start.at) + burst))
    return worst


OPS = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "reserve", "reserve", "cancel", "refund", "tick"]),
        st.floats(min_value=0.0, max_value=3.0),
        st.floats(min_value=0.0, max_value=2.0),
        st.floats(min_value=0.0, max_value=1.0),
    ),
    min_size=1, max_size=40)


def _run_ops(reserve, cancel, refund, ops, clock: _Clock, burst: float) -> list[_Admitted]:
    """Drive one limiter with ``ops``; return the net flow: each grant at its time to act, each refund as
    a negative amount at the instant it is made (a grant cancelled before acting leaves with its refunds)."""
    grants: list[tuple[object, _Admitted, list[_Admitted]]] = []
    for op, x, y, z in ops:
        if op == "tick":
            clock.t += x
        elif op == "reserve":
            amount = round(min(burst, x * burst / 3), 3)
            made = reserve(amount, 0.0 if z > 0.85 else y if z > 0.3 else INF)
            if made is not None:
                handle, when = made
                grants.append((handle, _Admitted(when, amount), []))
        elif op == "cancel" and grants:
            index = int(z * (len(grants) - 1))
            handle, admitted, _ = grants[index]
            cancel(handle)
            if clock.t <= admitted.at:  # a late cancel changes nothing: that reservation has acted
                grants.pop(index)
        elif op == "refund" and grants:
            handle, admitted, refunds = grants[int(z * (len(grants) - 1))]
            left = admitted.amount + sum(r.amount for r in refunds)
            part = round(left * y / 2, 3)
            if part > 0:
                refund(handle, part)
                if clock.t < admitted.at:
                    admitted.amount -= part  # not acted yet: it will act with less
                else:
                    refunds.append(_Admitted(clock.t, -part))
    return [event for _, admitted, refunds in grants for event in (admitted, *refunds)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(algorithm=st.sampled_from(["token_bucket", "sliding_window"]),
       rate=st.sampled_from([0.5, 1.0, 7.0, 100.0]), burst=st.sampled_from([1.0, 3.0, 10.0]), ops=OPS)
def test_admitted_never_exceeds_rate_times_t_plus_burst(algorithm: str, rate: float, burst: float, ops) -> None:
    clock = _Clock()
    bucket = make_algorithm(algorithm, rate, burst, 0.0)  # type: ignore[arg-type]

    def reserve(amount: float, max_wait: float) -> tuple[Take, float] | None:
        if max_wait == 0 and bucket.try_take(clock.t, amount):  # the allocation-free path acquire uses
            return Take(amount, clock.t, bucket.rate), clock.t
        take = bucket.reserve(clock.t, amount, max_wait)
        return None if take is None else (take, take.time_to_act)

    admitted = _run_ops(reserve, lambda take: bucket.cancel(clock.t, take),
                        lambda take, part: bucket.refund(clock.t, take, part), ops, clock, burst)
    assert _max_over_intervals(admitted, rate, burst) <= 1e-6


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shards=st.integers(min_value=1, max_value=6), rate=st.sampled_from([1.0, 20.0, 300.0]),
       burst=st.sampled_from([12.0, 60.0]), algorithm=st.sampled_from(["token_bucket", "sliding_window"]),
       ops=OPS, keys=st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=6))
def test_sharded_limiter_never_exceeds_the_global_bound(shards: int, rate: float, burst: float, algorithm: str,
                                                        ops, keys: list[str]) -> None:
    clock = _Clock()
    limiter = ShardedRateLimiter(rate, burst, shards=shards, algorithm=algorithm, clock=clock)  # type: ignore[arg-type]
    turn = iter(range(10**6))

    def take(amount: float, max_wait: float) -> tuple[list[Part], float] | None:
        """What ``acquire`` and the policy's take do: one shard, the other, or both at once."""
        key = keys[next(turn) % len(keys)]
        parts, _ = limiter._take_now(clock.t, amount, key, max_wait)
        return None if parts is None else (parts, max(p[1].time_to_act for p in parts))

    def refund(parts: list[Part], part: float) -> None:
        limiter._refund_parts(parts, part)

    # ``cancel`` is what a waiter cancelled while waiting does with its parts.
    admitted = _run_ops(take, lambda parts: asyncio.run(limiter._cancel_parts(parts)), refund, ops, clock, burst)
    assert _max_over_intervals(admitted, rate, burst) <= 1e-6


def test_unsharded_limiter_is_a_single_bucket() -> None:
    limiter = RateLimiter(10, 5)
    assert limiter.shards == 1
    assert ShardedRateLimiter(10, 5).shards == 1, "too small to shard: under 10 tokens per shard"
    assert ShardedRateLimiter(1000, 1000).shards == 100
