"""A worker's side of a shared run: where its items come from (leases) and the heartbeat that keeps them.

:class:`WorkerLease` registers the process in the run's ``workers`` table, feeds the pipeline from
:meth:`LeaseStore.claim <flashcard_pipeline.storage.leases.LeaseStore.claim>` instead of the pending list, renews
its leases every heartbeat, and gives its unfinished items back when it stops. A worker that found nothing to take
does not leave while other workers hold items: if one of them dies, its items come back when its lease expires,
and somebody must be there to take them.

Time comes from ``clock`` (UTC datetimes) and waits from ``sleep``, both injectable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

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


class LeasedItems:
    """The pipeline's :class:`~flashcard_pipeline.pipeline.ItemSource` for a worker: claims what its idle tasks can
    start (at most ``batch``); when there is nothing to claim but other workers hold open items, waits
    ``poll_interval`` and looks again (one of them may die, and its items come back when its lease expires); ends
    when nobody else holds an open item."""

    def __init__(self, store: LeaseStore, run_id: int, worker_id: int, *, batch: int, timing: LeaseTiming,
                 clock: Callable[[], datetime] = utcnow,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.store, self.run_id, self.worker_id = store, run_id, worker_id
        self.batch, self.timing, self.clock, self.sleep = batch, timing, clock, sleep
        self.claimed = 0

    async def next_page(self, want: int) -> list[PendingItem]:
        while True:
            now = self.clock()
            page = await asyncio.to_thread(self.store.claim, self.run_id, self.worker_id,
                                           limit=max(1, min(want, self.batch)), now=now,
                                           lease_seconds=self.timing.lease_seconds)
            if page:
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
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.store, self.run_id, self.concurrency = store, run_id, concurrency
        self.timing, self.clock, self.sleep = timing, clock, sleep
        self.worker_id: int | None = None

    @contextlib.asynccontextmanager
    async def attach(self, pipeline: Pipeline) -> AsyncIterator[None]:
        worker_id = self.worker_id = await asyncio.to_thread(
            self.store.register, self.run_id, host=worker_host(), pid=os.getpid(), concurrency=self.concurrency,
            lease_seconds=self.timing.lease_seconds, now=self.clock())
        pipeline.source = LeasedItems(self.store, self.run_id, worker_id, batch=self.concurrency,
                                      timing=self.timing, clock=self.clock, sleep=self.sleep)
        pipeline.durable = True
        stats = pipeline.stats
        beat = asyncio.create_task(self._beat(worker_id, pipeline), name="worker-heartbeat")
        try:
            yield
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            with contextlib.suppress(Exception):  # unreachable database: the leases expire on their own
                await asyncio.to_thread(self.store.release, worker_id, now=self.clock(),
                                        items_done=stats.done - stats.already_done, items_failed=stats.failed)

    async def _beat(self, worker_id: int, pipeline: Pipeline) -> None:
        stats = pipeline.stats
        while True:
            await self.sleep(self.timing.heartbeat_interval)
            try:
                await asyncio.to_thread(self.store.heartbeat, worker_id, now=self.clock(),
                                        lease_seconds=self.timing.lease_seconds,
                                        items_done=stats.done - stats.already_done, items_failed=stats.failed,
                                        in_flight=stats.in_flight)
                pipeline.note_run_spending(await asyncio.to_thread(self.store.run_cost, self.run_id))
            except Exception as exc:  # a busy database must not stop the work; the next beat tries again
                log.warning("worker heartbeat failed (the leases last %g s): %s", self.timing.lease_seconds, exc)
