"""A worker's side of a shared run: where its items come from (leases) and the heartbeat that keeps them.

:class:`WorkerLease` registers the process in the run's ``workers`` table, feeds the pipeline from
:meth:`LeaseStore.claim <flashcard_pipeline.storage.leases.LeaseStore.claim>` instead of the pending list, renews
its leases every heartbeat, and gives its unfinished items back when it stops. A worker that found nothing to take
does not leave while other workers hold items: if one of them dies, its items come back when its lease expires,
and somebody must be there to take them.

Before each paid call the pipeline asks :meth:`HeldLeases.holds` (its ``guard``): a worker paused past its lease
(SIGSTOP, a frozen VM, a long stall) must not pay for an item another worker has taken over and paid for meanwhile.

Time comes from ``clock`` (UTC datetimes), ``monotonic`` (how long ago a lease was renewed) and waits from
``sleep``, all injectable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from flashcard_pipeline.errors import brief
from flashcard_pipeline.pipeline import Pipeline
from flashcard_pipeline.storage.leases import LeaseStore
from flashcard_pipeline.storage.ledger import PendingItem
from flashcard_pipeline.storage.schema import utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseTiming:
    """WORKER_LEASE_SECONDS, WORKER_HEARTBEAT_INTERVAL, WORKER_POLL_INTERVAL (see :class:`..config.WorkerSettings`)."""

    lease_seconds: float = 60.0
    heartbeat_interval: float = 10.0
    poll_interval: float = 2.0

    @property
    def trusted_seconds(self) -> float:
        """How long after a renewal a worker takes a lease as held without asking the database: half the lease.
        Heartbeats come every third of a lease at most (:func:`..worker.lease_timing`), so a worker whose heartbeats
        succeed never asks; the other half covers the workers' clock skew and the moment between the check and the
        request leaving."""
        return self.lease_seconds / 2


class HeldLeases:
    """What a worker knows of its leases without asking: when each item's lease was last renewed (its claim, or a
    heartbeat), on the monotonic clock. :meth:`holds` is the pipeline's guard before a paid call: free while the
    renewal is recent, one renewing statement when it is not (after a pause, or failed heartbeats)."""

    def __init__(self, store: LeaseStore, worker_id: int, *, timing: LeaseTiming,
                 clock: Callable[[], datetime] = utcnow, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store, self.worker_id, self.timing = store, worker_id, timing
        self.clock, self.monotonic = clock, monotonic
        self._renewed: dict[int, float] = {}
        self._verifying = asyncio.Lock()

    def claimed(self, items: list[PendingItem], at: float) -> None:
        """``items`` were leased by a claim sent at ``at`` (monotonic)."""
        for pending in items:
            self._renewed[pending.id] = at

    def renewed(self, held: frozenset[int], at: float) -> None:
        """A renewal sent at ``at`` kept the leases of ``held``: any other item known before it is not ours any
        more (finished, or taken over). Items claimed after it was sent are kept as they are."""
        self._renewed = {**{item: at for item in held},
                         **{item: when for item, when in self._renewed.items() if when > at}}

    def _fresh(self, item_id: int) -> bool:
        renewed = self._renewed.get(item_id)
        return renewed is not None and self.monotonic() - renewed < self.timing.trusted_seconds

    async def holds(self, pending: PendingItem) -> bool:
        """Whether the worker still holds ``pending``'s lease; asks the database (renewing every lease of the worker
        at once, one task asking for all) only when the last renewal is too old to be sure."""
        if self._fresh(pending.id):
            return True
        async with self._verifying:
            if self._fresh(pending.id):  # another task renewed while this one waited
                return True
            at, last = self.monotonic(), self._renewed.get(pending.id)
            try:
                held = await asyncio.to_thread(self.store.renew, self.worker_id, now=self.clock(),
                                               lease_seconds=self.timing.lease_seconds)
            except Exception as exc:  # unsure is no: paying for an answer twice is what this guard prevents
                log.warning("could not verify the lease on %r before a paid call: %s", pending.item.term, brief(exc))
                return False
            self.renewed(held, at)
        since = "" if last is None else f" {at - last:.1f} s after the last renewal"
        if pending.id in held:
            log.info("lease on %r verified before a paid call%s: still held, renewed", pending.item.term, since)
            return True
        log.warning("lease on %r lost%s: another worker holds the item now", pending.item.term, since)
        return False


class LeasedItems:
    """The pipeline's :class:`~flashcard_pipeline.pipeline.ItemSource` for a worker: claims what its idle tasks can
    start (at most ``batch``); when there is nothing to claim but other workers hold open items, waits
    ``poll_interval`` and looks again (one of them may die, and its items come back when its lease expires); ends
    when nobody else holds an open item."""

    def __init__(self, store: LeaseStore, run_id: int, worker_id: int, *, batch: int, timing: LeaseTiming,
                 clock: Callable[[], datetime] = utcnow,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep, held: HeldLeases) -> None:
        self.store, self.run_id, self.worker_id = store, run_id, worker_id
        self.batch, self.timing, self.clock, self.sleep = batch, timing, clock, sleep
        #: Told when each claim was sent (the pipeline's guard trusts a recent one).
        self.held = held
        self.claimed = 0

    async def next_page(self, want: int) -> list[PendingItem]:
        while True:
            now = self.clock()
            sent = self.held.monotonic()
            page = await asyncio.to_thread(self.store.claim, self.run_id, self.worker_id,
                                           limit=max(1, min(want, self.batch)), now=now,
                                           lease_seconds=self.timing.lease_seconds)
            if page:
                self.held.claimed(page, sent)
                self.claimed += len(page)
                return page
            state = await asyncio.to_thread(self.store.open_items, self.run_id, now, self.worker_id)
            if state.open == state.mine:  # only this worker's own tasks hold what is left: nothing can come back
                return []
            if not state.claimable:  # others hold the rest: wait for them to finish, or for a lease to expire
                await self.sleep(self.timing.poll_interval)


def worker_host() -> str:
    """This machine's name as the workers table shows it (a pod's name under Kubernetes)."""
    return socket.gethostname()


class WorkerLease:
    """Attach a pipeline to the run as one of its workers (``runner._execute``'s ``attach``)."""

    def __init__(self, store: LeaseStore, run_id: int, *, concurrency: int, timing: LeaseTiming,
                 clock: Callable[[], datetime] = utcnow,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store, self.run_id, self.concurrency = store, run_id, concurrency
        self.timing, self.clock, self.sleep, self.monotonic = timing, clock, sleep, monotonic
        self.worker_id: int | None = None

    @contextlib.asynccontextmanager
    async def attach(self, pipeline: Pipeline) -> AsyncIterator[None]:
        worker_id = self.worker_id = await asyncio.to_thread(
            self.store.register, self.run_id, host=worker_host(), pid=os.getpid(), concurrency=self.concurrency,
            lease_seconds=self.timing.lease_seconds, now=self.clock())
        held = HeldLeases(self.store, worker_id, timing=self.timing, clock=self.clock, monotonic=self.monotonic)
        pipeline.source = LeasedItems(self.store, self.run_id, worker_id, batch=self.concurrency,
                                      timing=self.timing, clock=self.clock, sleep=self.sleep, held=held)
        pipeline.guard = held.holds
        pipeline.durable = True
        stats = pipeline.stats
        beat = asyncio.create_task(self._beat(worker_id, pipeline, held), name="worker-heartbeat")
        try:
            yield
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            with contextlib.suppress(Exception):  # unreachable database: the leases expire on their own
                await asyncio.to_thread(self.store.release, worker_id, now=self.clock(),
                                        items_done=stats.done - stats.already_done, items_failed=stats.failed)

    async def _beat(self, worker_id: int, pipeline: Pipeline, held: HeldLeases) -> None:
        stats = pipeline.stats
        while True:
            await self.sleep(self.timing.heartbeat_interval)
            try:
                sent = self.monotonic()
                renewed = await asyncio.to_thread(self.store.heartbeat, worker_id, now=self.clock(),
                                                  lease_seconds=self.timing.lease_seconds,
                                                  items_done=stats.done - stats.already_done,
                                                  items_failed=stats.failed, in_flight=stats.in_flight)
                held.renewed(renewed, sent)
                pipeline.note_run_spending(await asyncio.to_thread(self.store.run_cost, self.run_id))
            except Exception as exc:  # a busy database must not stop the work; the next beat tries again
                log.warning("worker heartbeat failed (the leases last %g s): %s", self.timing.lease_seconds, brief(exc))
