"""A virtual :class:`~flashcard_pipeline.resilience.core.clock.Clock` for tests and simulations.

It lives in the package (not under ``tests/``) because benchmarks and later components
(circuit breaker, rate limiter) test against it too.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from datetime import UTC, datetime, timedelta

EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


class FakeClock:
    """Time that moves only when someone sleeps (``autojump``) or the test calls :meth:`advance`.

    With ``autojump=True`` (the default) ``sleep(s)`` moves the clock forward by ``s`` at once and
    yields to the loop once, so code under test runs at full speed while seeing time pass. Each
    sleep jumps in turn, so concurrent sleepers add up rather than overlap: fine for "never earlier
    than" assertions, pessimistic for deadlines shared by many tasks.

    With ``autojump=False`` a sleeper stays suspended until :meth:`advance` passes its wake-up time,
    which lets a test act while a task is waiting (cancel it, inspect state).

    Every requested sleep is kept in :attr:`sleeps`.
    """

    def __init__(self, start: float = 0.0, *, wall_start: datetime = EPOCH, autojump: bool = True) -> None:
        self._start = start
        self._now = start
        self._wall_start = wall_start
        self.autojump = autojump
        self.sleeps: list[float] = []
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def monotonic(self) -> float:
        return self._now

    def now(self) -> datetime:
        return self._wall_start + timedelta(seconds=self._now - self._start)

    @property
    def slept(self) -> float:
        """Total virtual seconds requested through :meth:`sleep`."""
        return sum(self.sleeps)

    @property
    def sleepers(self) -> int:
        """Tasks currently suspended in :meth:`sleep` (``autojump=False`` only)."""
        return sum(1 for *_, future in self._waiters if not future.done())

    async def sleep(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.sleeps.append(seconds)
        if self.autojump:
            self._now += seconds
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (self._now + seconds, next(self._order), future))
        self._wake()
        await future

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose time has come."""
        if seconds < 0:
            raise ValueError("time cannot go backwards")
        self._now += seconds
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self._now:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)


class VirtualClock:
    """Discrete-event time: ``sleep`` parks the task; :meth:`run` jumps to the next wake-up once
    every task is blocked, so concurrent sleepers overlap as they would in real time."""

    def __init__(self) -> None:
        self._now = 0.0
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def monotonic(self) -> float:
        return self._now

    def now(self) -> datetime:
        return datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=self._now)

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (self._now + max(0.0, seconds), next(self._order), future))
        await future

    async def run(self, until: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0)
            if loop._ready:  # type: ignore[attr-defined]  # other tasks still have work at this instant
                continue
            while self._heap and self._heap[0][2].done():
                heapq.heappop(self._heap)
            if not self._heap or self._heap[0][0] > until:
                self._now = until
                return
            wake, _, future = heapq.heappop(self._heap)
            self._now = max(self._now, wake)
            future.set_result(None)
