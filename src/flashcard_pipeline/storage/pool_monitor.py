"""Connection pool monitoring from SQLAlchemy's pool events.

Efficiency is the share of checkouts served by an idle pooled connection, without waiting for
one to be returned and without opening a new one: the figure the plan wants at 95% or more.
Checkout wait is timed by :class:`MonitoredQueuePool`, because no pool event fires before a
checkout starts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool


@dataclass
class PoolSnapshot:
    checkouts: int
    checkins: int
    served_idle: int
    connects: int
    invalidations: int
    closes: int
    checked_out: int
    peak_checked_out: int
    overflow: int
    pool_size: int
    wait_total_s: float
    wait_max_s: float
    oldest_connection_age_s: float
    mean_connection_age_s: float

    @property
    def efficiency(self) -> float:
        return self.served_idle / self.checkouts if self.checkouts else 1.0

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["efficiency"] = round(self.efficiency, 4)
        data["wait_mean_ms"] = round(self.wait_total_s * 1000 / self.checkouts, 4) if self.checkouts else 0.0
        return data


class PoolMonitor:
    """Counts pool events for one engine; thread-safe, because connections are used from worker threads."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._local = threading.local()
        self.checkouts = self.checkins = self.served_idle = self.connects = 0
        self.invalidations = self.closes = self.checked_out = self.peak_checked_out = 0
        self.wait_total = self.wait_max = 0.0
        self._born: dict[int, float] = {}
        self._pool: QueuePool | None = None

    def attach(self, engine: Engine) -> PoolMonitor:
        pool = engine.pool
        self._pool = pool if isinstance(pool, QueuePool) else None
        if isinstance(pool, MonitoredQueuePool):
            pool.monitor = self
        event.listen(pool, "connect", self._on_connect)
        event.listen(pool, "checkout", self._on_checkout)
        event.listen(pool, "checkin", self._on_checkin)
        event.listen(pool, "invalidate", self._on_invalidate)
        event.listen(pool, "close", self._on_close)
        return self

    def _on_connect(self, _dbapi: Any, record: ConnectionPoolEntry) -> None:
        with self._lock:
            self.connects += 1
            self._born[id(record)] = self._clock()
        self._local.opened = True

    def _on_checkout(self, _dbapi: Any, _record: ConnectionPoolEntry, _proxy: Any) -> None:
        with self._lock:
            self.checkouts += 1
            self.checked_out += 1
            self.peak_checked_out = max(self.peak_checked_out, self.checked_out)

    def _on_checkin(self, _dbapi: Any, _record: ConnectionPoolEntry) -> None:
        with self._lock:
            self.checkins += 1
            self.checked_out = max(0, self.checked_out - 1)

    def _on_invalidate(self, _dbapi: Any, record: ConnectionPoolEntry, _exc: BaseException | None) -> None:
        with self._lock:
            self.invalidations += 1
            self._born.pop(id(record), None)

    def _on_close(self, _dbapi: Any, record: ConnectionPoolEntry) -> None:
        with self._lock:
            self.closes += 1
            self._born.pop(id(record), None)

    def record_get(self, waited: float, idle_available: bool) -> None:
        """Called by MonitoredQueuePool after each checkout from the queue."""
        opened = getattr(self._local, "opened", False)
        self._local.opened = False
        with self._lock:
            self.wait_total += waited
            self.wait_max = max(self.wait_max, waited)
            if idle_available and not opened:
                self.served_idle += 1

    def snapshot(self) -> PoolSnapshot:
        now = self._clock()
        with self._lock:
            ages = [now - born for born in self._born.values()]
            return PoolSnapshot(
                checkouts=self.checkouts, checkins=self.checkins, served_idle=self.served_idle,
                connects=self.connects, invalidations=self.invalidations, closes=self.closes,
                checked_out=self.checked_out, peak_checked_out=self.peak_checked_out,
                overflow=max(0, self._pool.overflow()) if self._pool is not None else 0,
                pool_size=self._pool.size() if self._pool is not None else 0,
                wait_total_s=self.wait_total, wait_max_s=self.wait_max,
                oldest_connection_age_s=max(ages, default=0.0),
                mean_connection_age_s=sum(ages) / len(ages) if ages else 0.0)


class MonitoredQueuePool(QueuePool):
    """A QueuePool that times each checkout and notes whether an idle connection was waiting."""

    monitor: PoolMonitor | None = None

    def _do_get(self) -> ConnectionPoolEntry:
        monitor = self.monitor
        if monitor is None:
            return super()._do_get()
        idle = self.checkedin() > 0
        started = time.perf_counter()
        try:
            return super()._do_get()
        finally:
            monitor.record_get(time.perf_counter() - started, idle)

    def recreate(self) -> MonitoredQueuePool:
        pool = super().recreate()
        assert isinstance(pool, MonitoredQueuePool)
        pool.monitor = self.monitor
        return pool
