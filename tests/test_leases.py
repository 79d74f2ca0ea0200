"""Item leases in the ledger (SQLite and the real PostgreSQL), on a clock the test moves: claims never overlap, a
heartbeat keeps an item, an expired lease is taken over, a stopped worker gives its items back, and on PostgreSQL
workers claiming at the same instant from several threads get disjoint items (FOR UPDATE SKIP LOCKED)."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, update

from flashcard_pipeline.models import VocabularyItem
from flashcard_pipeline.storage.db import create_db_engine, migrate
from flashcard_pipeline.storage.leases import LeaseStore
from flashcard_pipeline.storage.ledger import CARDS, NUANCE, Ledger, StageCompleted, StageFailed
from flashcard_pipeline.storage.schema import Item

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
    assert store.heartbeat(alive, now=later, lease_seconds=LEASE, items_done=0, items_failed=0, in_flight=1) == 1
    assert store.claim(run_id, other, limit=10, now=later, lease_seconds=LEASE) == []
    expired = T0 + timedelta(seconds=LEASE + 1)
    taken = store.claim(run_id, other, limit=10, now=expired, lease_seconds=LEASE)
    assert [p.item.position for p in taken] == [1]  # the dead worker's item; the living one's lease holds
    workers = {w.pid: w for w in store.workers(run_id)}
    assert workers[2].state(later) == "running" and workers[1].state(expired) == "lost"
    # The dead worker comes back: its lease is gone, so its heartbeat renews nothing.
    assert store.heartbeat(dead, now=expired, lease_seconds=LEASE, items_done=0, items_failed=0, in_flight=0) == 0


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
    from flashcard_pipeline.leasing import LeaseTiming, WorkerLease
    from flashcard_pipeline.storage.schema import ApiCall
    from tests.test_pipeline import ScriptedClient, pipeline

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
        await lease._beat(worker_id, worker)
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
