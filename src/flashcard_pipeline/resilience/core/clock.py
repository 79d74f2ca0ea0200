"""Time as a dependency: retries, breakers and limiters ask a :class:`Clock` instead of the
``time`` module, so tests can run hours of back-off in microseconds and assert exact instants.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back: for intervals and deadlines."""
        ...

    def now(self) -> datetime:
        """Aware UTC wall time: for HTTP dates such as ``Retry-After: <date>``."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``; cancelling the caller interrupts the wait."""
        ...


class SystemClock:
    """The real clock and the event loop's sleep."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
