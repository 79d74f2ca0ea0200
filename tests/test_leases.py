"""Item leases in the ledger (SQLite and the real PostgreSQL), on a clock the test moves: claims never overlap, a
heartbeat keeps an item, an expired lease is taken over, a stopped worker gives its items back, and on PostgreSQL
workers claiming at the same instant from several threads get disjoint items (FOR UPDATE SKIP LOCKED). A worker paused
past its lease starts no paid call for an item another worker took over, and checks that at no cost while its last
renewal is recent."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.exc import OperationalError

from flashcard_pipeline.errors import ServerError
from flashcard_pipeline.leasing import HeldLeases, LeaseTiming, WorkerLease
from flashcard_pipeline.models import VocabularyItem
from flashcard_pipeline.pipeline import Pipeline, RunOutcome
from flashcard_pipeline.resilience import PolicyPipeline, RateLimitSettings, Resilience
from flashcard_pipeline.resilience.retry import RetryConfig, RetryPolicy
from flashcard_pipeline.resilience.testing import FakeClock
from flashcard_pipeline.storage.db import create_db_engine, migrate
from flashcard_pipeline.storage.leases import LeaseStore
from flashcard_pipeline.storage.ledger import (
    CARDS,
    NUANCE,
    Ledger,
    PendingItem,
    StageCompleted,
    StageFailed,
    StageStarted,
)
from flashcard_pipeline.storage.schema import Item
from tests.test_pipeline import ScriptedClient, pipeline, raise_

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
LEASE = 30.0


@pytest.fixture
def engine(db_url: str) -> Engine:
    engine = create_db_engine(db_url)
    migrate(engine)
    yield engine
    engine.dispose()


def make_run(engine: Engine, count: int) -> int:
    items = [VocabularyItem(position=i, term=f"낱말{i}") for i in range(1, count + 1)]
    run = Ledger(engine).create_run(run_key="k", input_path="x.csv", input_sha256="0" * 64, provider="simulated",
                                    model="m", settings={}, target_language="Korean", learner_language="English",
                                    simulated=True, items=items)
    return run.id


def register(store: LeaseStore, run_id: int, pid: int) -> int:
    return store.register(run_id, host="host", pid=pid, concurrency=2, lease_seconds=LEASE, now=T0)


def test_claims_never_overlap_and_follow_the_input_order(engine: Engine) -> None:
    store = LeaseStore(engine)
    run_id = make_run(engine, 5)
    a, b = register(store, run_id, 1), register(store, run_id, 2)
    first = store.claim(run_id, a, limit=2, now=T0, lease_seconds=LEASE)
    second = store.claim(run_id, b, limit=10, now=T0, lease_seconds=LEASE)
    assert [p.item.position for p in first] == [1, 2]
    assert [p.item.position for p in second] == [3, 4, 5]
    assert store.claim(run_id, a, limit=10, now=T0, lease_seconds=LEASE) == []
    assert store.open_items(run_id, T0).open == 5 and store.open_items(run_id, T0).claimable == 0


def test_finished_and_failed_items_are_not_claimed(engine: Engine) -> None:
    ledger, store = Ledger(engine), LeaseStore(engine)
    run_id = make_run(engine, 3)
    ids = [p.id for p in ledger.pending_items(run_id)]
    ledger.write_batch([StageCompleted(ids[0], NUANCE, "k1", "{}", False), StageCompleted(ids[0], CARDS, "k2", "{}",
                                                                                          False, run_id=run_id),
                        StageFailed(ids[1], NUANCE, "validation", "bad", "no")])
    worker = register(store, run_id, 1)
    claimed = store.claim(run_id, worker, limit=10, now=T0, lease_seconds=LEASE)
    assert [p.item.position for p in claimed] == [3]
    assert store.open_items(run_id, T0).open == 1


def test_an_expired_lease_is_taken_over_and_a_heartbeat_keeps_it(engine: Engine) -> None:
    store = LeaseStore(engine)
    run_id = make_run(engine, 2)
    dead, alive, other = register(store, run_id, 1), register(store, run_id, 2), register(store, run_id, 3)
    assert len(store.claim(run_id, dead, limit=1, now=T0, lease_seconds=LEASE)) == 1
    assert len(store.claim(run_id, alive, limit=1, now=T0, lease_seconds=LEASE)) == 1
    later = T0 + timedelta(seconds=LEASE - 1)
    (kept,) = store.heartbeat(alive, now=later, lease_seconds=LEASE, items_done=0, items_failed=0, in_flight=1)
    assert store.claim(run_id, other, limit=10, now=later, lease_seconds=LEASE) == []
    expired = T0 + timedelta(seconds=LEASE + 1)
    taken = store.claim(run_id, other, limit=10, now=expired, lease_seconds=LEASE)
    assert [p.item.position for p in taken] == [1]  # the dead worker's item; the living one's lease holds
    assert kept != taken[0].id
    workers = {w.pid: w for w in store.workers(run_id)}
    assert workers[2].state(later) == "running" and workers[1].state(expired) == "lost"
    # The dead worker comes back: its lease is gone, so its heartbeat renews nothing.
    assert store.heartbeat(dead, now=expired, lease_seconds=LEASE, items_done=0, items_failed=0,
                           in_flight=0) == frozenset()
    assert store.renew(alive, now=expired, lease_seconds=LEASE) == {kept}, "renewed in one statement, by id"


def test_a_stopped_worker_gives_its_items_back_at_once(engine: Engine) -> None:
    store = LeaseStore(engine)
    run_id = make_run(engine, 3)
    a, b = register(store, run_id, 1), register(store, run_id, 2)
    store.claim(run_id, a, limit=3, now=T0, lease_seconds=LEASE)
    assert store.release(a, now=T0, items_done=4, items_failed=1) == 3
    assert len(store.claim(run_id, b, limit=10, now=T0, lease_seconds=LEASE)) == 3
    record = store.workers(run_id)[0]
    assert (record.status, record.items_done, record.items_failed) == ("stopped", 4, 1)
    assert record.to_dict(T0)["state"] == "stopped"


def test_a_taken_over_item_keeps_its_finished_first_stage(engine: Engine) -> None:
    ledger, store = Ledger(engine), LeaseStore(engine)
    run_id = make_run(engine, 1)
    dead, heir = register(store, run_id, 1), register(store, run_id, 2)
    (item,) = store.claim(run_id, dead, limit=1, now=T0, lease_seconds=LEASE)
    ledger.write_batch([StageCompleted(item.id, NUANCE, "k1", "{}", False)])
    (taken,) = store.claim(run_id, heir, limit=1, now=T0 + timedelta(seconds=LEASE + 1), lease_seconds=LEASE)
    assert taken.id == item.id and taken.nuance_done


def test_a_late_write_of_a_worker_that_lost_the_item_does_not_reopen_it(engine: Engine) -> None:
    """A paused worker's queued "stage started" (or a failure of a call it sent before the pause) lands after
    another worker finished the item: the item stays done, and nobody claims it again."""
    ledger, store = Ledger(engine), LeaseStore(engine)
    run_id = make_run(engine, 2)
    first, second = (p.id for p in ledger.pending_items(run_id))
    ledger.write_batch([StageCompleted(first, NUANCE, "k1", "{}", False),
                        StageCompleted(first, CARDS, "k2", "{}", False, run_id=run_id)])
    ledger.write_batch([StageStarted(first, NUANCE), StageStarted(first, CARDS), StageStarted(second, NUANCE)])
    ledger.write_batch([StageFailed(first, CARDS, "server", "server_error", "502")])
    summary = ledger.summary(run_id)
    assert (summary.done, summary.failed) == (1, 0)
    worker = register(store, run_id, 1)
    assert [p.id for p in store.claim(run_id, worker, limit=10, now=T0, lease_seconds=LEASE)] == [second]
    (started,) = [p for p in ledger.pending_items(run_id) if p.id == second]
    assert not started.nuance_done  # a stage not yet done is still started as before


def test_concurrent_claims_on_postgresql_get_disjoint_items(postgres_url: str) -> None:
    engine = create_db_engine(postgres_url)
    migrate(engine)
    try:
        store = LeaseStore(engine)
        run_id = make_run(engine, 200)
        workers = [register(store, run_id, pid) for pid in range(8)]
        claimed: dict[int, list[int]] = {w: [] for w in workers}
        start = threading.Barrier(len(workers))

        def claim_all(worker: int) -> None:
            start.wait()
            while batch := store.claim(run_id, worker, limit=7, now=T0, lease_seconds=LEASE):
                claimed[worker] += [p.item.position for p in batch]

        threads = [threading.Thread(target=claim_all, args=(w,)) for w in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        every = sorted(p for positions in claimed.values() for p in positions)
        assert every == list(range(1, 201)), "each item leased exactly once"
        with engine.begin() as conn:  # the ledger agrees with what each claim returned
            conn.execute(update(Item).values(lease_owner=None))
        assert store.open_items(run_id, T0).claimable == 200
    finally:
        engine.dispose()


async def test_the_budget_is_the_runs_whatever_the_workers_spend(engine: Engine) -> None:
    """Each heartbeat brings the run's spending as the ledger has it: --max-cost holds for the run, not per worker
    (a worker that spent $0.01 stops once the others bring the run to its budget)."""
    from sqlalchemy import insert

    from flashcard_pipeline.errors import BudgetExceededError
    from flashcard_pipeline.storage.schema import ApiCall

    store = LeaseStore(engine)
    run_id, other = make_run(engine, 2), make_run(engine, 1)
    with engine.begin() as conn:
        conn.execute(insert(ApiCall), [
            {"run_id": run_id, "stage": "nuance", "provider": "p", "model": "m", "status": "ok", "cost_usd": cost}
            for cost in (0.02, 0.02, None)] + [
            {"run_id": other, "stage": "nuance", "provider": "p", "model": "m", "status": "ok", "cost_usd": 5.0}])
    assert store.run_cost(run_id) == pytest.approx(0.04), "a call without a cost counts nothing; other runs none"

    worker = pipeline(Ledger(engine), ScriptedClient(), max_cost=0.05)
    worker.stats.cost_usd = 0.01  # what this worker spent (and recorded) itself
    beats = 0

    async def one_beat(seconds: float) -> None:
        nonlocal beats
        beats += 1
        if beats > 1:
            raise asyncio.CancelledError

    lease = WorkerLease(store, run_id, concurrency=1, timing=LeaseTiming(), clock=lambda: T0, sleep=one_beat)
    worker_id = register(store, run_id, 7)
    with pytest.raises(asyncio.CancelledError):
        await lease._beat(worker_id, worker, HeldLeases(store, worker_id, timing=lease.timing))
    assert worker.spent == pytest.approx(0.04), "the run's total, this worker's own spending counted once"
    worker._check_budget()  # $0.04 of $0.05: calls go on
    with engine.begin() as conn:
        conn.execute(insert(ApiCall), [{"run_id": run_id, "stage": "cards", "provider": "p", "model": "m",
                                        "status": "ok", "cost_usd": 0.02}])
    worker.note_run_spending(store.run_cost(run_id))
    with pytest.raises(BudgetExceededError, match=r"budget of \$0\.0500 reached"):
        worker._check_budget()
    worker.note_run_spending(0.0)
    assert worker.spent == pytest.approx(0.06), "a stale reading never lowers what was seen"


# -- a worker paused past its lease does not pay for an item another worker took over ------------------------------


class Frozen:
    """A policy that holds every call where a paused process would be (past the rate limiter, the breaker and any
    back-off, just before the request leaves) until the test thaws it."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.thaw = asyncio.Event()

    async def execute(self, call: Callable[[], Awaitable[Any]], context: Any) -> Any:
        self.reached.set()
        await self.thaw.wait()
        return await call()


class Beats:
    """A heartbeat's sleep that returns only when the test lets a beat through: a frozen process never beats. The
    worker's other waits (a poll for items another worker holds) pass at once: they only look again."""

    def __init__(self, heartbeat_interval: float = LEASE / 3) -> None:
        self.go = asyncio.Semaphore(0)
        self.naps = 0
        self.heartbeat_interval = heartbeat_interval

    async def sleep(self, seconds: float) -> None:
        if seconds != self.heartbeat_interval:
            await asyncio.sleep(0.001)
            return
        self.naps += 1
        await self.go.acquire()

    async def beat(self) -> None:
        """One heartbeat, over when the loop is asleep again."""
        after = self.naps + 1
        self.go.release()
        await wait_until(lambda: self.naps >= after)


class CountingStore(LeaseStore):
    """Counts the statements a worker sends, by method; its heartbeat fails while ``heartbeats_fail``."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.calls: Counter[str] = Counter()
        self.heartbeats_fail = False

    def claim(self, *args: Any, **kw: Any) -> list[PendingItem]:
        self.calls["claim"] += 1
        return super().claim(*args, **kw)

    def renew(self, *args: Any, **kw: Any) -> frozenset[int]:
        self.calls["renew"] += 1
        return super().renew(*args, **kw)

    def heartbeat(self, *args: Any, **kw: Any) -> frozenset[int]:
        self.calls["heartbeat"] += 1
        if self.heartbeats_fail:
            raise OperationalError("UPDATE items", {}, Exception("the database is busy"))
        return super().heartbeat(*args, **kw)


async def wait_until(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    """Polls a condition that a thread (a claim, a heartbeat) makes true: real time, a few milliseconds."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def worker_lease(store: LeaseStore, run_id: int, clock: FakeClock, beats: Beats,
                 concurrency: int = 1) -> WorkerLease:
    return WorkerLease(store, run_id, concurrency=concurrency, timing=LeaseTiming(lease_seconds=LEASE,
                                                                                  heartbeat_interval=LEASE / 3),
                       clock=clock.now, sleep=beats.sleep, monotonic=clock.monotonic)


async def work(lease: WorkerLease, pipe: Pipeline, run_id: int) -> RunOutcome:
    run = pipe.ledger.get_run(run_id)
    assert run is not None
    async with lease.attach(pipe):
        return await pipe.run(run)


@pytest.mark.parametrize("heartbeat_first", [False, True], ids=["call-first", "heartbeat-first"])
async def test_a_worker_paused_past_its_lease_does_not_pay_for_an_item_taken_over(
        engine: Engine, heartbeat_first: bool, caplog: pytest.LogCaptureFixture) -> None:
    """A claims the item and freezes just before its call; its lease expires and B claims the item, pays and
    finishes it. A thaws: its call is not sent (whether its heartbeat or its call runs first on waking), and the item
    is neither failed nor done by A. Each answer paid once."""
    clock = FakeClock(wall_start=T0, autojump=False)
    store, ledger = LeaseStore(engine), Ledger(engine)
    run_id = make_run(engine, 1)
    frozen, a_beats = Frozen(), Beats()
    client_a, client_b = ScriptedClient(), ScriptedClient()
    limits = Resilience(ratelimit=RateLimitSettings(requests_per_minute=600), clock=FakeClock())
    pipe_a = pipeline(ledger, client_a, policy=PolicyPipeline([frozen, limits]))
    a = asyncio.create_task(work(worker_lease(store, run_id, clock, a_beats), pipe_a, run_id))
    await asyncio.wait_for(frozen.reached.wait(), 10)

    clock.advance(LEASE + 10)  # A sleeps through its lease
    outcome_b = await work(worker_lease(store, run_id, clock, Beats()), pipeline(ledger, client_b), run_id)
    assert outcome_b.stats.done == 1
    if heartbeat_first:
        await a_beats.beat()
    caplog.set_level(logging.INFO, logger="flashcard_pipeline")
    frozen.thaw.set()
    outcome_a = await asyncio.wait_for(a, 10)

    assert client_a.calls == [], "A never starts a paid call for an item it no longer holds"
    assert client_b.calls == [("낱말1", "nuance"), ("낱말1", "cards")]
    assert len(ledger.api_calls(run_id)) == 2, "one paid call per answer in all"
    assert (outcome_a.stats.handed_over, outcome_a.stats.failed, outcome_a.stats.done) == (1, 0, 0)
    summary = ledger.summary(run_id)
    assert (summary.done, summary.failed) == (1, 0)
    assert "lease on '낱말1' lost" in caplog.text and "dropped without a call" in caplog.text
    requests = limits.limit_groups[0].requests.limiter
    assert requests.metrics.refunded == 1 and requests.available() == requests.burst, "A's slot went back"


async def test_a_retry_is_not_sent_once_the_lease_was_taken_over(engine: Engine) -> None:
    """The check is made before every call, not once per stage: a retry whose back-off outlasted the lease (the
    process paused in it) is dropped like a first call."""
    clock, retry_clock = FakeClock(wall_start=T0, autojump=False), FakeClock(autojump=False)
    store, ledger = LeaseStore(engine), Ledger(engine)
    run_id = make_run(engine, 1)
    client_a, client_b = ScriptedClient(faults={("낱말1", "nuance"): raise_(ServerError("busy", status_code=502))}), \
        ScriptedClient()
    retry = RetryPolicy(RetryConfig(max_attempts=5), clock=retry_clock)
    a = asyncio.create_task(work(worker_lease(store, run_id, clock, Beats()), pipeline(ledger, client_a, policy=retry),
                                 run_id))
    await wait_until(lambda: retry_clock.sleepers == 1)  # the first call failed; the retry waits its back-off
    clock.advance(LEASE + 10)
    await work(worker_lease(store, run_id, clock, Beats()), pipeline(ledger, client_b), run_id)
    retry_clock.advance(3600)
    outcome_a = await asyncio.wait_for(a, 10)
    assert client_a.calls == [("낱말1", "nuance")], "the failed first call only: its retry was never sent"
    assert (outcome_a.stats.handed_over, outcome_a.stats.failed) == (1, 0)
    assert ledger.summary(run_id).done == 1


async def test_a_fresh_lease_costs_no_statement_per_call(engine: Engine) -> None:
    """While the last renewal is recent the guard answers from memory: every call is checked, and none costs a
    database statement. A lone `process` has no guard at all."""
    clock = FakeClock(wall_start=T0, autojump=False)
    store, ledger = CountingStore(engine), Ledger(engine)
    run_id = make_run(engine, 4)
    client = ScriptedClient()
    pipe = pipeline(ledger, client, concurrency=2)
    assert pipeline(ledger, client).guard is None
    lease = worker_lease(store, run_id, clock, Beats(), concurrency=2)
    run = ledger.get_run(run_id)
    assert run is not None
    checked: list[int] = []
    async with lease.attach(pipe):
        guard = pipe.guard
        assert guard is not None

        async def counted(pending: PendingItem) -> bool:
            checked.append(pending.id)
            clock.advance(1.0)  # time passes, within half a lease of every claim
            return await guard(pending)

        pipe.guard = counted
        outcome = await pipe.run(run)
    assert outcome.stats.done == 4 and len(client.calls) == 8
    assert len(checked) == 8, "every paid call was checked"
    assert store.calls["renew"] == 0, "and none of the checks asked the database"


async def test_a_worker_whose_heartbeats_failed_verifies_its_lease_once_and_goes_on(
        engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    """Heartbeats failed past the lease but nobody took the item: the guard cannot trust its memory, asks once
    (renewing the lease), still holds the item and pays for it; the next call trusts that renewal."""
    clock = FakeClock(wall_start=T0, autojump=False)
    store, ledger = CountingStore(engine), Ledger(engine)
    run_id = make_run(engine, 1)
    frozen, beats = Frozen(), Beats()
    client = ScriptedClient()
    task = asyncio.create_task(work(worker_lease(store, run_id, clock, beats), pipeline(ledger, client, policy=frozen),
                                    run_id))
    await asyncio.wait_for(frozen.reached.wait(), 10)
    store.heartbeats_fail = True
    for _ in range(4):
        clock.advance(LEASE / 3)
        await beats.beat()
    assert store.calls["heartbeat"] == 4 and store.calls["renew"] == 0
    caplog.set_level(logging.INFO, logger="flashcard_pipeline")
    frozen.thaw.set()
    outcome = await asyncio.wait_for(task, 10)
    assert client.calls == [("낱말1", "nuance"), ("낱말1", "cards")]
    assert outcome.stats.done == 1 and outcome.stats.handed_over == 0
    assert store.calls["renew"] == 1, "one statement verified and renewed the lease; the cards call trusted it"
    assert "lease on '낱말1' verified before a paid call 40.0 s after the last renewal" in caplog.text
