"""The Redis rate limiter against the real server on 127.0.0.1:6379 (skipped with the reason when none is
reachable, a failure under CI): Go semantics in Lua, the bound as a Hypothesis property, a pause and the
adaptive limit shared between policies, the live status command, and two processes sharing one limit.

Most tests pass a fake clock's time to the scripts, so they are exact and never sleep; the two-process
test runs on Redis's own clock for about a second.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from flashcard_pipeline.cli.app import app
from flashcard_pipeline.errors import ConfigurationError, RateLimitError
from flashcard_pipeline.hooks import LeaseLost
from flashcard_pipeline.llm.types import ChatResponse, Usage
from flashcard_pipeline.resilience import CallContext, RateLimitSettings
from flashcard_pipeline.resilience.ratelimit.algorithms import INF
from flashcard_pipeline.resilience.ratelimit.redis import RedisLimits, RedisPart, RedisRateLimiter
from flashcard_pipeline.resilience.testing import FakeClock
from flashcard_pipeline.storage.db import open_database
from tests.conftest import REDIS_URL, require_service
from tests.test_rate_limit_bucket import OPS, _Admitted, _Clock, _max_over_intervals
from tests.test_rate_limit_policy import Limits

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _redis_required(monkeypatch: pytest.MonkeyPatch) -> None:
    require_service("127.0.0.1", 6379, "Redis")
    for name in list(os.environ):
        if name.startswith("RL_"):
            monkeypatch.delenv(name)


async def _drop(client, prefix: str) -> None:
    keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)


@pytest.fixture
async def redis_prefix() -> AsyncIterator[tuple[object, str]]:
    """A client and a key prefix of this test's own, every key under it deleted afterwards."""
    import redis.asyncio as redis_asyncio

    client = redis_asyncio.from_url(REDIS_URL)
    prefix = f"test:rl:{uuid.uuid4().hex}:"
    try:
        yield client, prefix
    finally:
        await _drop(client, prefix)
        await client.aclose()


def limiter(client, prefix: str, clock, rate: float, burst: float, name: str = "p/m:requests",
            **kwargs) -> RedisRateLimiter:
    return RedisLimits(client, prefix=prefix, clock=clock, **kwargs).make(name, rate, burst)


# -- Go semantics in Lua -------------------------------------------------------------------------------

@pytest.mark.parametrize(("case", "rate", "burst", "calls", "expected"), [
    ("burst first, then one per 1/rate", 2.0, 4.0, [(0, 1, INF)] * 6, [0.0, 0.0, 0.0, 0.0, 0.5, 1.0]),
    ("more than the burst is refused and changes nothing", 2.0, 4.0, [(0, 5, INF), (0, 4, 0)], [None, 0.0]),
    ("max_wait exactly equal to the delay", 2.0, 1.0, [(0, 1, 0), (0, 1, 0.5), (0, 1, 0.5)], [0.0, 0.5, None]),
    ("zero rate: the burst, then never", 0.0, 2.0, [(0, 2, INF), (9, 1, INF)], [0.0, None]),
    ("infinite rate", INF, 1.0, [(0, 50, 0)], [0.0]),
    ("tiny rate", 1e-9, 1.0, [(0, 1, INF), (0, 1, INF)], [0.0, 1e9]),
    ("clock going backwards creates no tokens", 1.0, 2.0, [(10, 2, 0), (5, 1, 0), (5, 1, INF)],
     [10.0, None, 11.0]),
    ("zero tokens", 1.0, 1.0, [(0, 1, INF), (0, 0, 0)], [0.0, 0.0]),
    ("refill is capped at the burst", 1.0, 2.0, [(0, 2, 0), (100, 2, 0), (100, 1, 0)], [0.0, 100.0, None]),
])
async def test_redis_reserve_table(redis_prefix, case: str, rate: float, burst: float,
                                   calls: list[tuple[float, float, float]], expected: list[float | None]) -> None:
    client, prefix = redis_prefix
    clock = _Clock()
    clock.t = calls[0][0]
    bucket = limiter(client, prefix, clock, rate, burst)
    got = []
    for now, amount, max_wait in calls:
        clock.t = now
        ok, when, *_ = await bucket._reserve_raw(amount, max_wait)
        got.append(when if ok else None)
    assert got == pytest.approx(expected)


async def test_a_late_cancel_returns_nothing(redis_prefix) -> None:
    client, prefix = redis_prefix
    clock = FakeClock()
    bucket = limiter(client, prefix, clock, 1.0, 1.0)
    await bucket.acquire()
    ok, when, _, rate, _ = await bucket._reserve_raw(1, INF)  # queued, as a waiting acquire is
    assert ok
    clock.advance(2)
    assert await bucket._cancel_parts([RedisPart(bucket, 1, when, rate)]) == 0.0


async def test_a_waiter_cancelled_while_waiting_gives_its_tokens_back(redis_prefix) -> None:
    client, prefix = redis_prefix
    clock = FakeClock(autojump=False)
    bucket = limiter(client, prefix, clock, 1.0, 1.0)
    await bucket.acquire()
    waiter = asyncio.create_task(bucket.acquire())
    for _ in range(2000):  # the waiter needs a round trip to Redis before it sleeps
        if clock.sleepers:
            break
        await asyncio.sleep(0.001)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (await bucket.state())["available"] == pytest.approx(0.0)
    assert bucket.metrics.abandoned == 1


async def test_new_configuration_replaces_the_stored_one_but_adaptive_changes_do_not(redis_prefix) -> None:
    client, prefix = redis_prefix
    clock = _Clock()
    first = limiter(client, prefix, clock, 1.0, 2.0)
    await first.try_acquire()
    await first.set_limit(0.5, 2.0)
    assert (await first.state())["rate_per_second"] == 0.5, "an adaptive change sticks"
    await first.try_acquire()
    assert (await first.state())["rate_per_second"] == 0.5
    second = limiter(client, prefix, clock, 3.0, 6.0)
    await second.try_acquire()
    assert (await second.state())["rate_per_second"] == 3.0, "a new --rpm takes over"


def test_sliding_window_is_refused_on_redis() -> None:
    with pytest.raises(ConfigurationError, match="token_bucket"):
        RedisLimits(object(), algorithm="sliding_window")


# -- the bound, as a property, in Redis ----------------------------------------------------------------

@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rate=st.sampled_from([0.5, 7.0, 100.0]), burst=st.sampled_from([1.0, 10.0]), ops=OPS)
def test_redis_admitted_never_exceeds_rate_times_t_plus_burst(rate: float, burst: float, ops) -> None:
    """The same operations as the in-memory property, each one a script call on explicit time."""
    import redis.asyncio as redis_asyncio

    async def scenario() -> list[_Admitted]:
        client = redis_asyncio.from_url(REDIS_URL)
        prefix = f"test:rl:{uuid.uuid4().hex}:"
        clock = _Clock()
        bucket = limiter(client, prefix, clock, rate, burst)
        grants: list[tuple[RedisPart, float, list[_Admitted]]] = []
        try:
            for op, x, y, z in ops:
                if op == "tick":
                    clock.t += x
                elif op == "reserve":
                    amount = round(min(burst, x * burst / 3), 3)
                    wait = 0.0 if z > 0.85 else y if z > 0.3 else INF
                    ok, when, _, rate_then, _ = await bucket._reserve_raw(amount, wait)
                    if ok:
                        grants.append((RedisPart(bucket, amount, when, rate_then), amount, []))
                elif op == "cancel" and grants:
                    index = int(z * (len(grants) - 1))
                    await bucket._cancel_parts([grants[index][0]])
                    if clock.t <= grants[index][0].time_to_act:  # late cancels change nothing
                        grants.pop(index)
                elif op == "refund" and grants:
                    index = int(z * (len(grants) - 1))
                    held, acted, refunds = grants[index]
                    part = round(held.amount * y / 2, 3)
                    if part > 0:
                        await bucket.settle(part, 0.0)
                        held.amount -= part  # a later cancel returns only what is left
                        if clock.t < held.time_to_act:
                            grants[index] = (held, acted - part, refunds)  # not acted yet: acts with less
                        else:
                            refunds.append(_Admitted(clock.t, -part))
            return [event for held, acted, refunds in grants
                    for event in (_Admitted(held.time_to_act, acted), *refunds)]
        finally:
            await _drop(client, prefix)
            await client.aclose()

    assert _max_over_intervals(asyncio.run(scenario()), rate, burst) <= 1e-6


# -- the policy on Redis: shared pause, shared adaptive state, live status -----------------------------

def _context() -> CallContext:
    return CallContext(stage="nuance", item_key="k", provider="p", model="m", estimated_tokens=1000)


async def test_a_429_in_one_process_pauses_the_others_and_lowers_the_shared_limit(redis_prefix) -> None:
    client, prefix = redis_prefix
    clock = FakeClock()
    settings = RateLimitSettings(requests_per_minute=600, backend="redis", redis_prefix=prefix)
    one = Limits(settings, clock=clock, limits=RedisLimits(client, prefix=prefix, clock=clock))
    two = Limits(settings, clock=clock, limits=RedisLimits(client, prefix=prefix, clock=clock))

    async def ok() -> tuple[str, ChatResponse]:
        return "ok", ChatResponse(content="{}", finish_reason="stop", usage=Usage(200, 100), model="m",
                                  response_id=None, latency_s=0.1, status_code=200)

    async def limited() -> None:
        raise RateLimitError("429", status_code=429, retry_after=4.0)

    for _ in range(3):
        await one.execute(ok, _context())
    clock.advance(1)
    with pytest.raises(RateLimitError):
        await one.execute(limited, _context())
    other = two.group("p", "m")
    assert (await other.requests.limiter.state())["paused_for"] == pytest.approx(4.0)
    view = await other._view(other.requests)
    assert view.planned == pytest.approx(300), "the cut is shared (nothing much accepted: x0.5)"
    assert view.used == 3, "successes of every process are counted"
    before = clock.monotonic()
    await two.execute(ok, _context())
    assert clock.monotonic() - before >= 4.0 - 1e-6, "the other process waited out the pause"
    assert other.requests.planned == pytest.approx(300)


async def test_status_reads_the_live_redis_state(redis_prefix, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    client, prefix = redis_prefix
    bucket = limiter(client, prefix, None, 0.01, 5.0, name="prov/model:requests")
    await bucket.acquire(2)
    monkeypatch.setenv("RL_BACKEND", "redis")
    monkeypatch.setenv("RL_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("RL_REDIS_PREFIX", prefix)
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    open_database(db).dispose()  # status reads an existing database; it never makes one
    result = await asyncio.to_thread(CliRunner().invoke, app, ["ratelimit", "status", "--db", db, "--json"])
    assert result.exit_code == 0, result.output
    live = json.loads(result.output)["redis"]
    assert [state["key"] for state in live] == [bucket.key]
    assert live[0]["rate_per_minute"] == pytest.approx(0.6) and live[0]["available"] == pytest.approx(3.0, abs=0.1)
    table = await asyncio.to_thread(CliRunner().invoke, app, ["ratelimit", "status", "--db", db])
    assert "live in Redis" in table.output


# -- two processes, one limit --------------------------------------------------------------------------

_WORKER = textwrap.dedent("""
    import asyncio, json, sys, time
    import redis.asyncio as redis_asyncio
    from flashcard_pipeline.resilience.ratelimit.redis import RedisLimits

    async def main(url, prefix, start, seconds):
        client = redis_asyncio.from_url(url)
        limiter = RedisLimits(client, prefix=prefix).make("shared/limit:requests", 40.0, 5.0)
        while time.time() < start:
            await asyncio.sleep(0.005)
        granted = []
        while time.time() < start + seconds:
            await limiter.acquire()
            granted.append(time.time())
        await client.aclose()
        print(json.dumps(granted))

    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])))
""")


@pytest.mark.slow
async def test_two_processes_sharing_a_redis_limit_stay_within_it_together(redis_prefix) -> None:
    import time

    _, prefix = redis_prefix
    start, seconds = time.time() + 1.5, 1.2
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    workers = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WORKER, REDIS_URL, prefix, repr(start), repr(seconds),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env) for _ in range(2)]
    outputs = []
    for worker in workers:
        out, err = await asyncio.wait_for(worker.communicate(), timeout=30)
        assert worker.returncode == 0, err.decode()
        outputs.append(json.loads(out))
    assert all(len(granted) >= 10 for granted in outputs), "both processes got their share"
    times = sorted(t for granted in outputs for t in granted)
    span = times[-1] - times[0]
    assert len(times) <= 40 * span + 5 + 1, "together, never more than rate * T + burst (+1 for scheduling)"
    assert len(times) >= 0.8 * 40 * seconds, "and the shared limit is used, not starved"
    for i, first in enumerate(times):
        for j in range(i, min(i + 60, len(times))):
            assert j - i + 1 <= 40 * (times[j] - first) + 5 + 1


async def test_a_pause_holds_an_unlimited_redis_bucket_too(redis_prefix) -> None:
    client, prefix = redis_prefix
    clock = _Clock()
    bucket = limiter(client, prefix, clock, INF, 1.0)
    ok, when, *_ = await bucket._reserve_raw(5, INF)
    assert ok and when == pytest.approx(0.0)
    await bucket.pause(3.0)
    ok, when, *_ = await bucket._reserve_raw(5, INF)
    assert ok and when == pytest.approx(3.0), "granted, but only after the pause"
    ok, wait, *_ = await bucket._reserve_raw(1, 1.0)
    assert not ok and wait == pytest.approx(3.0), "a caller that cannot wait that long is refused"
    clock.t = 3.5
    ok, when, *_ = await bucket._reserve_raw(1, 0)
    assert ok and when == pytest.approx(3.5)


async def test_a_call_not_sent_gives_its_shared_slot_back(redis_prefix) -> None:
    client, prefix = redis_prefix
    clock = FakeClock()
    settings = RateLimitSettings(requests_per_minute=600, tokens_per_minute=100_000, backend="redis",
                                 redis_prefix=prefix)
    policy = Limits(settings, clock=clock, limits=RedisLimits(client, prefix=prefix, clock=clock))

    async def lost() -> None:
        raise LeaseLost

    group = policy.group("p", "m")
    with pytest.raises(LeaseLost):
        await policy.execute(lost, _context())
    first = await group.requests.limiter.state()
    with pytest.raises(LeaseLost):
        await policy.execute(lost, _context())
    second = await group.requests.limiter.state()
    assert second["available"] == pytest.approx(first["available"]), "given back, like the first"
    assert first["available"] == pytest.approx(first["burst"])
    assert group.requests.limiter.metrics.refunded == pytest.approx(2)
    assert group.tokens.limiter.metrics.refunded == pytest.approx(2000)
    tokens = await group.tokens.limiter.state()
    assert tokens["available"] == pytest.approx(tokens["burst"])
