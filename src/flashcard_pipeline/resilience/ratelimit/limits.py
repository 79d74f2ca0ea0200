"""What every limit group of an engine shares: the settings, the backend (memory or Redis), the clock and the
events, plus reporting over all groups (``ratelimit status`` reads what :meth:`RateLimits.publishing` saves)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from flashcard_pipeline.resilience.core.clock import Clock
from flashcard_pipeline.resilience.core.events import EventHub
from flashcard_pipeline.resilience.ratelimit.backends import LimitBackend, MemoryLimits
from flashcard_pipeline.resilience.ratelimit.group import LimitGroup
from flashcard_pipeline.resilience.ratelimit.plan import check_requests_limit
from flashcard_pipeline.resilience.ratelimit.redis import RedisLimits
from flashcard_pipeline.resilience.ratelimit.settings import RateLimitSettings

log = logging.getLogger("flashcard_pipeline.resilience.rate_limit")


def make_limits(settings: RateLimitSettings, clock: Clock) -> LimitBackend[Any]:
    """The backend ``settings`` ask for: this process's memory, or Redis shared by every worker."""
    if settings.backend == "redis":
        return RedisLimits(settings.redis_url, prefix=settings.redis_prefix, algorithm=settings.algorithm)
    return MemoryLimits(algorithm=settings.algorithm, shards=settings.shards, clock=clock)


class RateLimits:
    """Makes the :class:`LimitGroup` of each provider and model, all on one backend.

    Building it checks ``RL_SHARDS`` against the starting requests limit, so a limit its buckets cannot hold
    is one clear error before any call instead of a confusing one per item.
    """

    def __init__(self, settings: RateLimitSettings, *, clock: Clock, events: EventHub,
                 limits: LimitBackend[Any] | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.events = events
        self.backend: LimitBackend[Any] = limits if limits is not None else make_limits(settings, clock)
        shards = self.backend.shards if isinstance(self.backend, MemoryLimits) else 1
        check_requests_limit(settings, shards if isinstance(shards, int) else 1, self.backend.algorithm)

    def __repr__(self) -> str:
        return f"RateLimits(backend={self.backend.name!r}, algorithm={self.backend.algorithm!r})"

    def group(self, provider: str, model: str) -> LimitGroup:
        """A new group for ``provider`` and ``model`` (the engine keeps one per pair)."""
        return LimitGroup(provider, model, self.settings, self.backend, self.clock, self.events)

    async def snapshot(self, groups: Iterable[LimitGroup]) -> dict[str, Any]:
        """Every limit's state and metrics as JSON, for ``ratelimit status`` (published into the run's metrics)."""
        return {
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "backend": self.backend.name,
            "algorithm": self.backend.algorithm,
            "shards": self.settings.shards,
            "limits": {group.label: await group.snapshot() for group in groups},
        }

    @contextlib.asynccontextmanager
    async def publishing(self, publish: Callable[[dict[str, Any]], Awaitable[None]],
                         groups: Callable[[], Iterable[LimitGroup]],
                         interval: float | None = None) -> AsyncIterator[None]:
        """Publish :meth:`snapshot` of ``groups()`` every ``interval`` seconds while the block runs, and once
        at its end."""
        interval = self.settings.publish_interval if interval is None else interval

        async def loop() -> None:
            while True:
                await self.clock.sleep(interval)
                try:
                    await publish(await self.snapshot(groups()))
                except Exception:  # a failed publication must never stop the run
                    log.warning("could not publish the rate limiter's state", exc_info=True)

        task = asyncio.create_task(loop(), name="ratelimit-publisher")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await publish(await self.snapshot(groups()))

    async def aclose(self) -> None:
        await self.backend.aclose()
