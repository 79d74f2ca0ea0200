"""The adaptive loop of a limit group (AIMD): what it knows per limit, how it reads that state (local, or shared
through Redis) and how it cuts after a 429 and raises after sustained success, or restores the rate a cut took
when :mod:`~.signal` found the 429s were not rate-related."""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from flashcard_pipeline.resilience.core.clock import Clock
from flashcard_pipeline.resilience.core.events import EventHub
from flashcard_pipeline.resilience.ratelimit.algorithms import INF
from flashcard_pipeline.resilience.ratelimit.backends import GrantLimiter, LimitBackend
from flashcard_pipeline.resilience.ratelimit.events import (
    LimitCause,
    LimitCut,
    LimitRaise,
    LimitReason,
    LimitStatus,
)
from flashcard_pipeline.resilience.ratelimit.headers import Dimension
from flashcard_pipeline.resilience.ratelimit.plan import WINDOW, min_requests_per_minute, plan_limit
from flashcard_pipeline.resilience.ratelimit.settings import RateLimitSettings
from flashcard_pipeline.resilience.ratelimit.signal import RateSignal

log = logging.getLogger("flashcard_pipeline.resilience.rate_limit")

#: A dimension counts as binding when a minute's usage reached this share of its planned limit.
BINDING_SHARE = 0.8
#: After a 429 the limit settles at this share of what the provider accepted in the last minute.
SETTLE = 0.97
#: Seconds of a minute observed (in this process) before what the provider accepted in it is taken as its rate.
MIN_OBSERVED = 10.0


@dataclass
class _Dim:
    """One limit of a group, as this process last saw it (the Redis backend shares it between processes)."""

    name: Dimension
    limiter: GrantLimiter
    configured: float | None
    planned: float
    min_burst: float
    changed_at: float
    header: float | None = None
    ceiling: float | None = None
    decreased_at: float = -INF
    saturated: bool = False
    decreases: int = 0
    increases: int = 0
    #: The rate a cut took, being given back (429s that proved not rate-related); None: nothing to restore.
    restore_to: float | None = None

    @property
    def cap(self) -> float | None:
        known = [v for v in (self.configured, self.header) if v is not None]
        return min(known) if known else None

    @property
    def mode(self) -> str:
        if self.header is not None:
            return "header"
        if self.configured is not None:
            return "configured"
        return "adaptive" if math.isfinite(self.planned) else "unlimited"


@dataclass(frozen=True)
class _View:
    """The adaptive state a decision is based on, on the backend's time scale (Redis: server time)."""

    now: float
    planned: float
    ceiling: float | None
    header: float | None
    changed_at: float
    decreased_at: float
    #: Amount admitted and answered in the last minute (every process's, with Redis).
    used: float
    #: Seconds of that minute that were observed (less than 60 early in a run).
    observed: float
    shared: Any = None


@dataclass
class _Used:
    at: float
    tokens: float


class AdaptiveLimits:
    """The adaptive half of :class:`~.group.LimitGroup`: the state each limit plans with, and its changes."""

    settings: RateLimitSettings
    limits: LimitBackend[Any]
    clock: Clock
    events: EventHub
    started: float
    _used: deque[_Used]
    _dims: tuple[_Dim, _Dim]
    signal: RateSignal
    _shown: dict[str, tuple[float | None, LimitReason]]

    @property
    def label(self) -> str:
        raise NotImplementedError

    def _plan(self, planned: float, min_burst: float) -> tuple[float, float]:
        s = self.settings
        return plan_limit(planned, algorithm=self.limits.algorithm, safety=s.safety, burst_share=s.burst_share,
                          min_burst=min_burst)

    async def _view(self, dim: _Dim) -> _View:
        shared_state = getattr(dim.limiter, "shared_state", None)
        if shared_state is None:
            now = self.clock.monotonic()
            used = self._used
            while used and used[0].at <= now - WINDOW:
                used.popleft()
            total = float(len(used)) if dim.name == "requests" else sum(u.tokens for u in used)
            return _View(now=now, planned=dim.planned, ceiling=dim.ceiling, header=dim.header,
                         changed_at=dim.changed_at, decreased_at=dim.decreased_at, used=total,
                         observed=min(WINDOW, now - self.started))
        shared = await shared_state()
        if shared.planned is not None:
            dim.planned, dim.ceiling, dim.header = shared.planned, shared.ceiling, shared.header
        return _View(now=shared.now, planned=dim.planned, ceiling=dim.ceiling, header=dim.header,
                     changed_at=-INF if shared.changed_at is None else shared.changed_at,
                     decreased_at=-INF if shared.decreased_at is None else shared.decreased_at,
                     used=shared.used_last_minute, observed=WINDOW, shared=shared)

    async def _commit(self, dim: _Dim, view: _View, *, planned: float, ceiling: float | None,
                      header: float | None, decreased: bool) -> bool:
        """Apply a new planned limit; with Redis only if no other process changed it since ``view``."""
        rate, burst = self._plan(planned, dim.min_burst)
        decreased_at = view.now if decreased else view.decreased_at
        if view.shared is not None:
            ok = await dim.limiter.propose(  # type: ignore[attr-defined]
                view.shared, planned=planned, ceiling=ceiling, header=header,
                decreased_at=None if decreased_at == -INF else decreased_at, rate=rate, burst=burst)
            if not ok:
                return False
        else:
            await dim.limiter.set_limit(rate, burst)
        dim.planned, dim.ceiling, dim.header = planned, ceiling, header
        dim.changed_at, dim.decreased_at = view.now, decreased_at
        dim.saturated = False
        return True

    def _changed(self, dim: _Dim, before: float, after: float, cause: LimitCause) -> None:
        event = LimitCut if after < before else LimitRaise
        self.events.emit(event(self.label, dim.name, before, after, cause))
        self._status(dim)

    def reason(self, dim: _Dim) -> LimitReason:
        """Why ``dim``'s limit is what it is (see :data:`~.events.LimitReason`)."""
        if dim.header is not None:
            return "headers"
        if not math.isfinite(dim.planned):
            return "unlimited"
        if self.signal.verdict == "noise":
            return "429s are not rate-related"
        if self.signal.verdict == "limit" and dim.ceiling is not None:
            return "found"
        return "configured" if dim.configured is not None else "probing"

    def _status(self, dim: _Dim) -> None:
        """Tell listeners the limit's level and reason when either changed."""
        planned = dim.planned if math.isfinite(dim.planned) else None
        shown = (planned, self.reason(dim))
        if self._shown.get(dim.name) != shown:
            self._shown[dim.name] = shown
            self.events.emit(LimitStatus(self.label, dim.name, *shown))

    def _binding(self, dim: _Dim, view: _View) -> bool:
        if not math.isfinite(view.planned):
            return False
        if dim.name == "requests":
            return True
        return view.observed > 0 and view.used / (view.planned * view.observed / WINDOW) >= BINDING_SHARE

    def _floor(self, dim: _Dim) -> float:
        """The lowest a cut goes: for requests, what still holds one call (sharded limiters then use fewer
        shards); for tokens, twice the largest call."""
        floor = self.settings.min_per_minute
        if dim.name == "tokens":
            floor = max(floor, 2 * dim.min_burst / self.settings.safety)
        else:
            floor = max(floor, min_requests_per_minute(1, self.settings, self.limits.algorithm))
        return floor

    async def _decrease(self, dim: _Dim, view: _View) -> None:
        """Multiplicative decrease, but not below ``SETTLE`` times what the provider accepted in the last
        minute: that much it demonstrably takes, so the loop settles just under the limit instead of
        oscillating between half of it and all of it."""
        before = view.planned
        if (view.ceiling is not None and view.now - view.decreased_at < WINDOW
                and before <= view.ceiling * SETTLE):
            # Cut within the last minute to under what the provider had accepted: this 429 answers traffic
            # still in its window (the overshoot that caused the cut), not our rate. The pause waits it out;
            # cutting 3% per refusal would compound. One cut per window, as TCP cuts once per round trip.
            return
        halved = before * self.settings.decrease_factor
        new = max(halved, view.used * SETTLE)
        accepted = view.used * WINDOW / max(view.observed, MIN_OBSERVED)
        if view.shared is None and view.observed >= MIN_OBSERVED and 0 < accepted * SETTLE < halved:
            # The plan ran far ahead of what the provider took (a sliding window, emptied while we were slow,
            # let slow start run on): halving it would still be far over the limit. Cut to what it took.
            new = accepted * SETTLE
        new = max(min(new, before * SETTLE), self._floor(dim))
        if await self._commit(dim, view, planned=new, ceiling=view.used if view.used > 0 else before,
                              header=view.header, decreased=True):
            dim.decreases += 1
            log.info("%s: %s limit %.0f -> %.0f per minute after a 429", self.label, dim.name, before, new)
            self._changed(dim, before, new, "rate_limited")

    async def _maybe_increase(self) -> None:
        """Increase after ``increase_interval`` s of success with callers waiting on this limit:
        ``probe_step`` x the current limit until the first 429 (slow start), then additively,
        ``increase_step`` x the level the provider accepted while below it, and ``settle_step`` x that
        level above it."""
        settings = self.settings
        if not settings.adaptive or self.signal.suspect is not None:
            return  # a suspicion is checked at the rate it was seen at
        local_now = self.clock.monotonic()
        for dim in self._dims:
            if dim.restore_to is not None:
                await self._restore(dim, local_now)
                continue
            interval = settings.probe_interval if dim.ceiling is None else settings.increase_interval
            if not dim.saturated or local_now - dim.changed_at < interval \
                    or local_now - dim.decreased_at < interval:
                continue
            view = await self._view(dim)
            if view.shared is not None and (view.now - view.changed_at < interval
                                            or view.now - view.decreased_at < interval):
                dim.changed_at = local_now
                continue
            cap = dim.cap
            if not math.isfinite(view.planned) or (cap is not None and view.planned >= cap):
                continue
            if view.ceiling is None:
                # Before the first 429 nothing is known: grow multiplicatively (TCP's slow start), so a
                # high unknown limit is reached in seconds rather than minutes.
                step = settings.probe_step * view.planned
            elif view.planned < view.ceiling * SETTLE:
                step = settings.increase_step * view.ceiling
            else:
                step = settings.settle_step * view.ceiling
            planned = min(cap if cap is not None else INF, view.planned + step)
            if await self._commit(dim, view, planned=planned, ceiling=view.ceiling, header=view.header,
                                  decreased=False):
                dim.increases += 1
                self._changed(dim, view.planned, planned, "adaptive")
            if view.shared is not None:
                dim.changed_at = local_now

    async def _restore(self, dim: _Dim, local_now: float) -> None:
        """Give back the rate a cut took, in one step (the cut did not lower the share of 429s: the rate
        before it was not their cause), then probe on from there as before any 429."""
        target = dim.restore_to
        if target is None:
            return
        view = await self._view(dim)
        cap = dim.cap
        planned = min(target, cap) if cap is not None else target
        dim.restore_to = None
        if planned > view.planned and await self._commit(dim, view, planned=planned, ceiling=None,
                                                         header=view.header, decreased=False):
            dim.increases += 1
            self._changed(dim, view.planned, planned, "adaptive")
        dim.changed_at = local_now
