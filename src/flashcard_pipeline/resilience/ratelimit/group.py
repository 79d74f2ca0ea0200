"""A limit group: the requests limit and the tokens limit of one provider and model, around every call.

Why each rule is there (the failures seen elsewhere):

* **Both limits, per call.** A call takes one request and its estimated tokens (prompt estimate plus
  ``max_tokens``, :attr:`CallContext.estimated_tokens`) before it is sent; each stage's call takes its
  own, so a word that makes two calls pays twice. When the answer reports its real usage the unused
  part goes back (or the excess is charged), so the tokens limit tracks what the provider counts.
* **Per-minute limits with headroom.** A provider limit of ``L`` per minute becomes a bucket with
  ``burst = max(largest call, L * burst_share)`` and ``rate = (L * safety - burst) / 60`` per second,
  so even a provider that counts a sliding minute never sees more than ``L * safety``
  (``sliding_window`` plans ``L * safety`` per 60 s window instead).
* **Adaptive.** An unknown limit (``RL_REQUESTS_PER_MINUTE`` / ``RL_TOKENS_PER_MINUTE`` unset) is
  found by AIMD: after ``increase_interval`` seconds of sustained success while callers were waiting
  the planned limit rises by a fixed step; a 429 lowers it multiplicatively, but not below 97% of
  what the provider accepted in the last minute, and the rise is slow above that level. So the
  loop settles just under an unknown limit instead of sawing between half of it and all of it. A
  configured limit is the ceiling of the same loop. ``x-ratelimit-limit-*`` headers set the limit
  outright; ``x-ratelimit-remaining-* = 0`` pauses until ``x-ratelimit-reset-*``.
* **A 429 that answers our rate pauses everybody.** The caller that got it raises it to the retry
  policy, and every caller of that provider and model waits out ``Retry-After`` (or
  ``default_pause``), with the bucket drained so the pause does not end in a burst. 429s of calls
  sent before the last decrease count as the same overload and do not lower the limit again.
* **A 429 that does not answer our rate changes nothing.** :mod:`~.signal` weighs each 429 against
  the share of 429s seen under any limit; after a cut, a 429 share that does not fall means a busy
  upstream, not our limit: the cut rate is restored, and such 429s no longer pause or cut (the
  retry policy still waits each one's Retry-After before sending that call again).

Waiting callers queue FIFO behind one head, which polls the limits (so a large call is not starved by
small ones). With the Redis backend several processes share the buckets, the pause and the planned
limit.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from flashcard_pipeline.errors import ConfigurationError, RateLimitError, StructuredError
from flashcard_pipeline.resilience.core.clock import Clock
from flashcard_pipeline.resilience.core.context import CallContext, CallNotMade, ProviderAnswer
from flashcard_pipeline.resilience.core.events import EventHub
from flashcard_pipeline.resilience.ratelimit.adaptive import AdaptiveLimits, _Dim, _Used
from flashcard_pipeline.resilience.ratelimit.algorithms import INF
from flashcard_pipeline.resilience.ratelimit.backends import LimitBackend
from flashcard_pipeline.resilience.ratelimit.events import LimitPause, LimitWait
from flashcard_pipeline.resilience.ratelimit.headers import Dimension, RateLimitHeaders
from flashcard_pipeline.resilience.ratelimit.plan import WINDOW
from flashcard_pipeline.resilience.ratelimit.settings import RateLimitSettings
from flashcard_pipeline.resilience.ratelimit.signal import RateSignal, Trial

log = logging.getLogger("flashcard_pipeline.resilience.rate_limit")
T = TypeVar("T")

#: The head of the queue re-checks at least this often, so refunds and raised limits are used soon.
HEAD_POLL = 0.1
#: ... and sleeps at least this long, so rounding noise in a wait cannot spin it at one instant.
MIN_POLL = 1e-6


@dataclass
class Grant:
    """What one call holds: its parts of each limit, the tokens it reserved, and when it got them."""

    parts: list[Any]
    tokens: float
    #: On the backend's time scale, for telling which 429s belong to an overload already handled.
    granted_at: float
    #: On this process's clock, for telling calls sent before a cut from those sent after it.
    sent_at: float = 0.0


def _granted_at(parts: list[Any], fallback: float) -> float:
    for dim_parts in parts:
        for part in dim_parts:
            take = part[1] if isinstance(part, tuple) else part
            return float(take.time_to_act)
    return fallback


class LimitGroup(AdaptiveLimits):
    """The requests and tokens limits of one provider and model, with their adaptive state.

    A :class:`~flashcard_pipeline.resilience.core.policy.CallPolicy`: put it innermost, so only calls actually
    sent take from the provider's limits.
    """

    def __init__(self, provider: str, model: str, settings: RateLimitSettings, limits: LimitBackend[Any],
                 clock: Clock, events: EventHub | None = None) -> None:
        self.provider = provider
        self.model = model
        self.events = events if events is not None else EventHub()
        self.settings = settings
        self.limits = limits
        self.clock = clock
        now = clock.monotonic()
        self.started = now
        self.rate_limited = 0
        #: 429s that did not answer our rate: neither paused nor cut.
        self.rate_limited_noise = 0
        self.paused_total = 0.0
        self.signal = RateSignal()
        self._shown = {}
        self._queue = asyncio.Lock()
        self._waiting = 0
        self._used: deque[_Used] = deque()
        requests = settings.requests_per_minute
        tokens = settings.tokens_per_minute
        self.requests = self._dim("requests", requests,
                                  requests or (settings.initial_requests_per_minute if settings.adaptive else INF),
                                  1.0, now)
        self.tokens = self._dim("tokens", tokens, tokens or INF, 1.0, now)
        self._dims = (self.requests, self.tokens)
        self._limiters = (self.requests.limiter, self.tokens.limiter)
        for dim in self._dims:
            self._status(dim)

    @property
    def label(self) -> str:
        return f"{self.provider}/{self.model}"

    async def execute(self, call: Callable[[], Awaitable[T]], context: CallContext) -> T:
        started = self.clock.monotonic()
        try:
            grant = await self.acquire(context.estimated_tokens, context.item_key)
        finally:
            # Queueing for a slot (a 429's pause included) is waiting, not trying: the retry deadline skips it.
            context.record_pause(self.clock.monotonic() - started)
        context.answer = None
        try:
            result = await call()
        except CallNotMade:
            await self.returned(grant)
            raise
        except RateLimitError as error:
            await self.rate_limited_by(grant, error)
            raise
        except StructuredError as error:
            await self.failed(grant, error)
            raise
        await self.succeeded(grant, context.answer)
        return result

    def _dim(self, name: Dimension, configured: float | None, planned: float, min_burst: float, now: float) -> _Dim:
        rate, burst = self._plan(planned, min_burst)
        # Only requests are sharded: one call takes thousands of tokens, more than a shard of the tokens
        # bucket holds, so splitting that bucket would refuse ordinary calls.
        limiter = self.limits.make(f"{self.label}:{name}", rate, burst, shardable=name == "requests")
        return _Dim(name=name, limiter=limiter, configured=configured, planned=planned, min_burst=min_burst,
                    changed_at=now)

    # -- acquiring ---------------------------------------------------------------------------------

    async def _fit(self, tokens: float) -> None:
        """Grow the tokens burst to hold the largest call seen (a call larger than the burst never fits)."""
        dim = self.tokens
        if tokens <= dim.min_burst:
            return
        dim.min_burst = tokens
        if not math.isfinite(dim.planned):
            return
        if tokens > dim.planned * self.settings.safety:
            if dim.cap is not None:
                raise ConfigurationError(
                    f"a call to {self.label} may use {tokens:,.0f} tokens, more than the tokens-per-minute limit "
                    f"of {dim.planned:,.0f} allows; raise --tpm or lower max_tokens",
                    code="call_exceeds_token_limit")
            dim.planned = self._floor(dim)
        await dim.limiter.set_limit(*self._plan(dim.planned, dim.min_burst))

    async def acquire(self, tokens: float, key: str | None = None) -> Grant:
        """Wait (FIFO) until one request and ``tokens`` tokens are both available, and take them."""
        await self._fit(tokens)
        amounts = (1.0, float(tokens))
        if not self._waiting:
            parts, _, blocked = await self.limits.take(self._limiters, amounts, key)
            if parts is not None:
                now = self.clock.monotonic()
                return Grant(parts, float(tokens), _granted_at(parts, now), now)
            self._dims[blocked].saturated = True
        self._waiting += 1
        started = self.clock.monotonic()
        blocker = self._dims[0]
        try:
            async with self._queue:
                while True:
                    parts, wait, blocked = await self.limits.take(self._limiters, amounts, key)
                    if parts is not None:
                        waited = self.clock.monotonic() - started
                        metrics = blocker.limiter.metrics
                        metrics.waited += 1
                        metrics.wait_time += waited
                        self.events.emit(LimitWait(self.label, blocker.name, waited))
                        now = self.clock.monotonic()
                        return Grant(parts, float(tokens), _granted_at(parts, now), now)
                    blocker = self._dims[blocked]
                    blocker.saturated = True
                    if wait == INF:
                        raise self._never(blocker, tokens)
                    await self.clock.sleep(min(max(wait, MIN_POLL), HEAD_POLL))
        finally:
            self._waiting -= 1

    def _never(self, dim: _Dim, tokens: float) -> ConfigurationError:
        """The error for a call no wait can grant, naming the limit that refuses it."""
        if dim.name == "tokens":
            return ConfigurationError(f"{self.label}: a call of {tokens:,.0f} tokens can never be granted",
                                      code="call_exceeds_token_limit")
        return ConfigurationError(
            f"{self.label}: the requests limit of {dim.planned:g} per minute can never grant a call (its bucket holds "
            f"{dim.limiter.burst:g}); raise RL_REQUESTS_PER_MINUTE or lower RL_SHARDS",
            code="requests_limit_too_small")

    # -- outcomes ----------------------------------------------------------------------------------

    async def succeeded(self, grant: Grant, answer: ProviderAnswer | None) -> None:
        used = answer.total_tokens if answer is not None else 0
        await self._settle(grant, used, success=True)
        await self._observe(grant, limited=False)
        if answer is not None and answer.headers:
            await self._headers(RateLimitHeaders.parse(answer.headers, self.clock.now().timestamp()))
        await self._maybe_increase()

    async def failed(self, grant: Grant, error: StructuredError) -> None:
        await self._observe(grant, limited=False)
        usage = error.details.get("usage") if isinstance(error.details, dict) else None
        if isinstance(usage, Mapping):
            used = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
            await self._settle(grant, used, success=False)

    async def returned(self, grant: Grant) -> None:
        """The call was never sent: its request and its tokens go back, as if it had not asked."""
        parts = grant.parts
        await self.requests.limiter.settle_grant(parts[0] if parts else [], 1.0, 0.0)
        if len(parts) > 1:
            await self.tokens.limiter.settle_grant(parts[1], grant.tokens, 0.0)

    async def _settle(self, grant: Grant, used: int, *, success: bool) -> None:
        """Return what the call did not use (or charge the excess), and count a success as used capacity."""
        tokens = self.tokens
        delta = grant.tokens - used if used > 0 and math.isfinite(tokens.planned) and len(grant.parts) > 1 else 0.0
        if success:
            self._used.append(_Used(self.clock.monotonic(), float(used or grant.tokens)))
        await tokens.limiter.settle_grant(grant.parts[1] if len(grant.parts) > 1 else [], delta,
                                          float(used or grant.tokens) if success else 0.0)
        if success:
            await self.requests.limiter.settle_grant(grant.parts[0] if grant.parts else [], 0.0, 1.0)

    async def rate_limited_by(self, grant: Grant, error: RateLimitError) -> None:
        """A 429: if it answers our rate, pause every caller and lower the binding limits once per overload;
        if not (:mod:`~.signal`), leave both alone."""
        self.rate_limited += 1
        settings = self.settings
        await self._observe(grant, limited=True)
        now = self.clock.monotonic()
        if settings.adaptive and not self.signal.evidence(now, grant.sent_at, probing=self.requests.cap is None):
            self.rate_limited_noise += 1
            return
        wait = min(max(error.retry_after if error.retry_after is not None else settings.default_pause, 0.0),
                   settings.max_pause)
        await self.pause(wait)
        if not settings.adaptive:
            return
        before = self.requests.planned
        cuts = self.requests.decreases + self.tokens.decreases
        for dim in self._dims:
            view = await self._view(dim)
            # Calls granted before (or in the instant of) the last decrease belong to the overload it answered.
            if grant.granted_at > view.decreased_at and self._binding(dim, view):
                await self._decrease(dim, view)
        self.signal.start_trial(before, now + wait, now, cut=self.requests.decreases + self.tokens.decreases > cuts,
                                accepted=self._accepted(now))

    async def _observe(self, grant: Grant, *, limited: bool) -> None:
        """Count an answered call for :mod:`~.signal`, and act on the verdict of a cut's trial it ends."""
        if not self.settings.adaptive:
            return
        now = self.clock.monotonic()
        trial = self.signal.record(grant.sent_at, limited, now, self._accepted(now))
        if trial is not None:
            self._judged(trial)

    def _accepted(self, now: float) -> float:
        """Calls this process saw accepted in the last minute (what :mod:`~.signal` compares a trial with)."""
        used = self._used
        while used and used[0].at <= now - WINDOW:
            used.popleft()
        return float(len(used))

    def _judged(self, trial: Trial) -> None:
        dim = self.requests
        if trial.outcome == "noise":
            log.info("%s: the 429 share did not fall after the cut (%d of %d before, %d of %d after): 429s are not "
                     "rate-related; restoring %.0f requests per minute", self.label, trial.limited_before,
                     trial.total_before, trial.limited_after, trial.total_after, trial.rate_before)
            if math.isfinite(trial.rate_before) and trial.rate_before > dim.planned:
                dim.restore_to = trial.rate_before
            dim.ceiling = None
        else:
            log.info("%s: the 429 share fell after the cut (%d of %d before, %d of %d after): a rate limit, near "
                     "%.0f requests per minute", self.label, trial.limited_before, trial.total_before,
                     trial.limited_after, trial.total_after, dim.planned)
        for each in self._dims:
            self._status(each)

    async def pause(self, seconds: float) -> None:
        if seconds <= 0:
            return
        self.paused_total += seconds
        for limiter in self._limiters:
            await limiter.pause(seconds)
        log.info("%s: pausing every call for %.2fs after a rate limit", self.label, seconds)
        self.events.emit(LimitPause(self.label, seconds))

    async def _headers(self, headers: RateLimitHeaders) -> None:
        pause = 0.0
        for dim in self._dims:
            limit, remaining, reset = headers.for_dimension(dim.name)
            if limit is not None and limit > 0 and limit != dim.header:
                view = await self._view(dim)
                if limit != view.header:
                    cap = min(limit, dim.configured) if dim.configured is not None else limit
                    log.info("%s: the provider reports a %s limit of %.0f per minute", self.label, dim.name, limit)
                    before = view.planned
                    if await self._commit(dim, view, planned=cap, ceiling=None, header=limit, decreased=False) \
                            and cap != before:
                        self._changed(dim, before, cap, "header")
                    self._status(dim)
            if remaining is not None and remaining <= 0:
                pause = max(pause, reset if reset is not None else self.settings.default_pause)
        if pause > 0:
            await self.pause(min(pause, self.settings.max_pause))

    # -- reporting ---------------------------------------------------------------------------------

    async def snapshot(self) -> dict[str, Any]:
        dims: dict[str, Any] = {}
        for dim in self._dims:
            view = await self._view(dim)
            state = await dim.limiter.state()
            dims[dim.name] = {
                "mode": dim.mode,
                "reason": self.reason(dim),
                "configured_per_minute": dim.configured,
                "header_per_minute": dim.header,
                "planned_per_minute": dim.planned if math.isfinite(dim.planned) else None,
                "ceiling_per_minute": dim.ceiling,
                "used_last_minute": view.used,
                "decreases": dim.decreases,
                "increases": dim.increases,
                **state,
            }
        return {"provider": self.provider, "model": self.model, "rate_limited": self.rate_limited,
                "rate_limited_not_rate_related": self.rate_limited_noise,
                "share_429_not_rate_related": round(self.signal.floor, 4), "verdict": self.signal.verdict,
                "paused_total_s": round(self.paused_total, 3), "waiting": self._waiting, **dims}

