"""Item leases and the workers table: how several ``worker`` processes share one run through the ledger.

A worker claims a batch of the run's open items with ``SELECT ... FOR UPDATE SKIP LOCKED`` (PostgreSQL): two
workers claiming at once never wait for each other and never get the same item. A claim is a lease: the item is
the worker's until ``lease_expires_at``, which its heartbeat keeps pushing forward; a worker that dies (SIGKILL,
a lost machine) stops renewing, and once its leases expire any other worker of the run takes its items over.

No queue beside the ledger: the items table is the queue, so an item's state and its owner change in the same
database that records its answers. Every method takes ``now`` from the caller (a clock the tests control); the
workers' clocks must agree to well within a lease (NTP does).

SQLite has no ``FOR UPDATE``; the claim still holds there (one writer at a time, and the update re-checks that
the lease is free), but SQLite is the single-process default and the CLI refuses workers on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, func, insert, or_, select, update
from sqlalchemy.orm import Session

from flashcard_pipeline.storage.ledger import PendingItem, item_model
from flashcard_pipeline.storage.records import WORKER_COLUMNS, WORKER_RUNNING, WORKER_STOPPED, worker_record
from flashcard_pipeline.storage.records import WorkerRecord as WorkerRecord
from flashcard_pipeline.storage.schema import ApiCall, Item, StageState, Worker

RUNNING = WORKER_RUNNING
STOPPED = WORKER_STOPPED
#: Items no worker should take: finished, failed (until the next `process` or `--retry-failed` resets them), or set
#: aside. Everything else is open.
_CLOSED = (StageState.FAILED, StageState.QUARANTINED)
_OPEN = ((Item.cards_state != StageState.DONE) & Item.nuance_state.not_in(_CLOSED)
         & Item.cards_state.not_in(_CLOSED))


def _free(now: datetime) -> object:
    return or_(Item.lease_owner.is_(None), Item.lease_expires_at.is_(None), Item.lease_expires_at <= now)


@dataclass(frozen=True)
class OpenItems:
    """A run's open items: how many, how many of them no live lease holds (``claimable``), and how many the asking
    worker holds (``mine``)."""

    open: int
    claimable: int
    mine: int = 0


class LeaseStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def register(self, run_id: int, *, host: str, pid: int, concurrency: int, lease_seconds: float,
                 now: datetime) -> int:
        """A new row in ``workers``; its id owns the worker's leases."""
        with Session(self.engine) as session, session.begin():
            return int(session.execute(insert(Worker).values(
                run_id=run_id, host=host[:255], pid=pid, status=RUNNING, concurrency=concurrency,
                lease_seconds=lease_seconds, items_done=0, items_failed=0, in_flight=0, started_at=now,
                last_heartbeat=now).returning(Worker.id)).scalar_one())

    def claim(self, run_id: int, worker_id: int, *, limit: int, now: datetime,
              lease_seconds: float) -> list[PendingItem]:
        """Lease up to ``limit`` open items nobody holds (or whose lease expired), in input order."""
        free = (Item.run_id == run_id) & _OPEN & _free(now)
        with Session(self.engine) as session, session.begin():
            ids = list(session.scalars(select(Item.id).where(free).order_by(Item.position).limit(limit)
                                       .with_for_update(skip_locked=True)))
            if not ids:
                return []
            # The WHERE is checked again in the update: where FOR UPDATE is a no-op (SQLite), a concurrent claim
            # that took an item in between keeps it.
            session.execute(update(Item).where(Item.id.in_(ids), free).values(
                lease_owner=worker_id, lease_expires_at=now + timedelta(seconds=lease_seconds)))
            rows = session.scalars(select(Item).where(Item.id.in_(ids), Item.lease_owner == worker_id)
                                   .order_by(Item.position)).all()
            return [PendingItem(id=r.id, item=item_model(r), nuance_done=r.nuance_state == StageState.DONE)
                    for r in rows]

    def heartbeat(self, worker_id: int, *, now: datetime, lease_seconds: float, items_done: int,
                  items_failed: int, in_flight: int) -> frozenset[int]:
        """Push the worker's leases on its open items forward and record its heartbeat; returns the items it holds
        (a lease already taken over by another worker is not renewed: that item is the other's now)."""
        with Session(self.engine) as session, session.begin():
            held = self._renew(session, worker_id, now, lease_seconds)
            session.execute(update(Worker).where(Worker.id == worker_id).values(
                last_heartbeat=now, items_done=items_done, items_failed=items_failed, in_flight=in_flight))
            return held

    def renew(self, worker_id: int, *, now: datetime, lease_seconds: float) -> frozenset[int]:
        """The heartbeat's renewal alone, in one statement: what a worker asks before a paid call when it cannot
        be sure its lease is still alive (after a pause, or failed heartbeats). Returns the items it still holds."""
        with Session(self.engine) as session, session.begin():
            return self._renew(session, worker_id, now, lease_seconds)

    @staticmethod
    def _renew(session: Session, worker_id: int, now: datetime, lease_seconds: float) -> frozenset[int]:
        return frozenset(session.scalars(
            update(Item).where(Item.lease_owner == worker_id, _OPEN)
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds)).returning(Item.id)))

    def run_cost(self, run_id: int) -> float:
        """Dollars every worker of the run has recorded: what each one's ``--max-cost`` check is measured against."""
        with Session(self.engine) as session:
            return float(session.scalar(select(func.coalesce(func.sum(ApiCall.cost_usd), 0.0))
                                        .where(ApiCall.run_id == run_id)) or 0.0)

    def release(self, worker_id: int, *, now: datetime, items_done: int, items_failed: int) -> int:
        """The worker stops: its open items go back at once (no lease to wait for) and it is marked stopped."""
        with Session(self.engine) as session, session.begin():
            released = session.execute(update(Item).where(Item.lease_owner == worker_id).values(
                lease_owner=None, lease_expires_at=None)).rowcount
            session.execute(update(Worker).where(Worker.id == worker_id).values(
                status=STOPPED, stopped_at=now, last_heartbeat=now, items_done=items_done,
                items_failed=items_failed, in_flight=0))
            return int(released or 0)

    def open_items(self, run_id: int, now: datetime, worker_id: int | None = None) -> OpenItems:
        with Session(self.engine) as session:
            total, claimable, mine = session.execute(
                select(func.count(), func.count().filter(_free(now)),  # type: ignore[no-untyped-call]
                       func.count().filter(Item.lease_owner == worker_id))  # type: ignore[no-untyped-call]
                .select_from(Item).where(Item.run_id == run_id, _OPEN)).one()
        return OpenItems(open=int(total), claimable=int(claimable), mine=int(mine))

    def workers(self, run_id: int) -> list[WorkerRecord]:
        """The run's workers, oldest first."""
        with Session(self.engine) as session:
            rows = session.scalars(select(Worker).where(Worker.run_id == run_id).order_by(Worker.id)).all()
            return [worker_record({c: getattr(r, c) for c in WORKER_COLUMNS}) for r in rows]
