"""The rate-limit policy: a requests limit and a tokens limit per provider and model around every call.

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
* **A 429 pauses everybody.** The caller that got it raises it to the retry policy, and every caller
  of that provider and model waits out ``Retry-After`` (or ``default_pause``), with the bucket
  drained so the pause does not end in a burst. 429s of calls sent before the last decrease count as
  the same overload and do not lower the limit again.

Waiting callers queue FIFO behind one head, which polls the limits (so a large call is not starved by
small ones). With the Redis backend several processes share the buckets, the pause and the planned
limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar

from flashcard_pipeline.config import RateLimitSettings, read_settings
from flashcard_pipeline.errors import ConfigurationError, RateLimitError, StructuredError
from flashcard_pipeline.llm.client import header_number
from flashcard_pipeline.llm.policy import CallContext, CallPolicy, PolicyPipeline, record_pause
from flashcard_pipeline.llm.types import ChatResponse
from flashcard_pipeline.resilience.clock import Clock, SystemClock
from flashcard_pipeline.resilience.rate_limiter import (
    MIN_SHARD_CAPACITY,
    AcquireMetrics,
    Limiter,
    RateLimiter,
    ShardedRateLimiter,
)
from flashcard_pipeline.resilience.token_bucket import INF, AlgorithmName

__all__ = [
    "WINDOW",
    "LimitBackend",
    "LimitGroup",
    "MemoryLimits",
    "RateLimitHeaders",
    "RateLimitPolicy",
    "check_requests_limit",
    "min_requests_per_minute",
    "parse_duration",
    "plan_limit",
    "rate_limit_policies",
    "settings_from_env",
]

log = logging.getLogger("flashcard_pipeline.resilience.rate_limit")
T = TypeVar("T")

#: Provider limits are per minute.
WINDOW = 60.0
#: The head of the queue re-checks at least this often, so refunds and raised limits are used soon.
HEAD_POLL = 0.1
#: ... and sleeps at least this long, so rounding noise in a wait cannot spin it at one instant.
MIN_POLL = 1e-6
#: A dimension counts as binding when a minute's usage reached this share of its planned limit.
BINDING_SHARE = 0.8
#: After a 429 the limit settles at this share of what the provider accepted in the last minute.
SETTLE = 0.97
#: What a call takes from the requests limit: its bucket, and each shard of it, must hold this much.
ONE_CALL = 1.0

Dimension = Literal["requests", "tokens"]


# -- headers ---------------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(text: str | None) -> float | None:
    """Seconds from ``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"`` (OpenAI's reset headers) or ``"2.5"``."""
    if text is None:
        return None
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return value if math.isfinite(value) and value >= 0 else None
    parts = _DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    return sum(float(number) * _UNITS[unit] for number, unit in parts)


def _reset_seconds(raw: str | None, now_epoch: float) -> float | None:
    """A reset given as a duration, or (OpenRouter) as a Unix time in seconds or milliseconds."""
    value = header_number(raw)
    if value is not None and value > 1e12:
        return max(0.0, value / 1000 - now_epoch)
    if value is not None and value > 1e9:
        return max(0.0, value - now_epoch)
    return parse_duration(raw)


@dataclass(frozen=True)
class RateLimitHeaders:
    """What a response says about the limits: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``.

    The unsuffixed ``x-ratelimit-remaining`` / ``-reset`` (OpenRouter) count requests; their
    ``-limit`` is left alone because its window is not a minute.
    """

    limit_requests: float | None = None
    remaining_requests: float | None = None
    reset_requests: float | None = None
    limit_tokens: float | None = None
    remaining_tokens: float | None = None
    reset_tokens: float | None = None

    @classmethod
    def parse(cls, headers: Mapping[str, str], now_epoch: float | None = None) -> RateLimitHeaders:
        now_epoch = time.time() if now_epoch is None else now_epoch
        lower = {k.lower(): v for k, v in headers.items() if k.lower().startswith("x-ratelimit")}
        get = lower.get

        return cls(
            limit_requests=header_number(get("x-ratelimit-limit-requests")),
            remaining_requests=header_number(get("x-ratelimit-remaining-requests") or get("x-ratelimit-remaining")),
            reset_requests=_reset_seconds(get("x-ratelimit-reset-requests") or get("x-ratelimit-reset"), now_epoch),
            limit_tokens=header_number(get("x-ratelimit-limit-tokens")),
            remaining_tokens=header_number(get("x-ratelimit-remaining-tokens")),
            reset_tokens=_reset_seconds(get("x-ratelimit-reset-tokens"), now_epoch),
        )

    def for_dimension(self, dimension: Dimension) -> tuple[float | None, float | None, float | None]:
        if dimension == "requests":
            return self.limit_requests, self.remaining_requests, self.reset_requests
        return self.limit_tokens, self.remaining_tokens, self.reset_tokens


# -- plans -----------------------------------------------------------------------------------------

def plan_limit(per_minute: float, *, algorithm: AlgorithmName, safety: float, burst_share: float,
               min_burst: float) -> tuple[float, float]:
    """(rate per second, burst) that never puts more than ``per_minute * safety`` in any minute."""
    if not math.isfinite(per_minute):
        return INF, max(1.0, min_burst)
    usable = per_minute * safety
    if algorithm == "sliding_window":
        return usable / WINDOW, max(usable, min_burst)
    burst = min(usable, max(min_burst, per_minute * burst_share))
    # A call nearly as large as the whole limit leaves little to refill; keep a trickle rather than 0.
    return max(usable - burst, usable * 0.1) / WINDOW, burst


def _requests_burst(per_minute: float, shards: int, settings: RateLimitSettings, algorithm: AlgorithmName) -> float:
    """What each of ``shards`` buckets of a requests limit of ``per_minute`` holds."""
    burst = plan_limit(per_minute, algorithm=algorithm, safety=settings.safety, burst_share=settings.burst_share,
                       min_burst=ONE_CALL)[1]
    return burst / shards


def min_requests_per_minute(shards: int, settings: RateLimitSettings, algorithm: AlgorithmName) -> float:
    """The smallest requests limit whose planned burst gives each of ``shards`` buckets one call.

    Found by bisection on :func:`plan_limit` itself rather than by inverting its formula, so the two cannot
    drift apart (for ``shards`` > 1 it is ``shards / RL_BURST_SHARE`` with the default token bucket).
    """
    def holds(per_minute: float) -> bool:
        return _requests_burst(per_minute, shards, settings, algorithm) >= ONE_CALL

    high = shards * ONE_CALL / min(settings.safety, settings.burst_share)
    while not holds(high):
        high *= 2
    low = 0.0
    for _ in range(200):
        middle = (low + high) / 2
        if not low < middle < high:
            break
        low, high = (low, middle) if holds(middle) else (middle, high)
    return high


def _rounded_up(value: float) -> float:
    """``value`` up to two decimals, for a message (never below what is needed)."""
    return math.ceil(value * 100) / 100


def check_requests_limit(settings: RateLimitSettings, shards: int, algorithm: AlgorithmName) -> None:
    """Refuse, before any call, a requests limit that cannot give each of its ``shards`` buckets one call.

    Such a limit never grants a call: every item would fail. The limit in effect at the start is the
    configured one (``RL_REQUESTS_PER_MINUTE`` / ``--rpm``) or, for an unknown limit, where the adaptive
    loop starts (``RL_INITIAL_REQUESTS_PER_MINUTE``). Between one and ``MIN_SHARD_CAPACITY`` calls per
    shard it works, but calls wait for their shard while another has room: a warning, not an error.
    """
    if settings.requests_per_minute is not None:
        start, source = settings.requests_per_minute, "RL_REQUESTS_PER_MINUTE (--rpm)"
    elif settings.adaptive:
        start, source = settings.initial_requests_per_minute, \
            "RL_INITIAL_REQUESTS_PER_MINUTE (where the adaptive limit starts)"
    else:
        return  # no limit at all
    per_shard = _requests_burst(start, shards, settings, algorithm)
    if per_shard >= ONE_CALL:
        if shards > 1 and per_shard < MIN_SHARD_CAPACITY:
            log.warning("RL_SHARDS=%d leaves %.2g calls per shard at %g requests/min; calls wait for their shard "
                        "while others have room (RL_SHARDS=auto keeps at least %g per shard)", shards, per_shard,
                        start, MIN_SHARD_CAPACITY)
        return
    needed = _rounded_up(min_requests_per_minute(shards, settings, algorithm))
    if shards == 1:
        raise ConfigurationError(f"{source} is {start:g}: a requests limit under {needed:g} per minute cannot "
                                 "hold one call; raise it", code="requests_limit_too_small")
    fits = int(per_shard * shards // ONE_CALL)
    instead = f" or set RL_SHARDS={fits}" if fits >= 1 else ""
    raise ConfigurationError(
        f"RL_SHARDS={shards} needs a requests limit of at least {needed:g} per minute (each shard must hold one "
        f"call of the RL_BURST_SHARE={settings.burst_share:g} burst); {source} is {start:g}: raise it{instead}",
        code="requests_limit_too_small")


# -- backends --------------------------------------------------------------------------------------

class GrantLimiter(Limiter, Protocol):
    metrics: AcquireMetrics

    async def settle_grant(self, parts: Sequence[Any], delta: float, used: float) -> None:
        """Refund ``delta`` tokens of a grant (charge if negative) and record ``used`` as answered usage."""
        ...


class LimitBackend(Protocol):
    """Where a group's limits live: this process (:class:`MemoryLimits`) or Redis."""

    name: str
    algorithm: AlgorithmName

    def make(self, name: str, rate: float, burst: float, *, shardable: bool = True) -> GrantLimiter:
        """A limiter; ``shardable=False`` keeps it one bucket whatever ``RL_SHARDS`` says."""
        ...

    async def take(self, limiters: Sequence[GrantLimiter], amounts: Sequence[float],
                   key: str | None) -> tuple[list[Any] | None, float, int]:
        """All amounts at once or nothing: (parts per limiter, 0, -1) or (None, wait, index that blocked)."""
        ...

    async def aclose(self) -> None: ...


class MemoryLimits:
    """Limits in this process: a :class:`RateLimiter`, or a :class:`ShardedRateLimiter` for ``shards`` > 1."""

    name = "memory"

    def __init__(self, *, algorithm: AlgorithmName = "token_bucket", shards: int | Literal["auto"] = 1,
                 clock: Clock | None = None, reservation_ttl: float = 60.0) -> None:
        self.algorithm: AlgorithmName = algorithm
        self.shards = shards
        self.clock = clock or SystemClock()
        self.reservation_ttl = reservation_ttl

    def make(self, name: str, rate: float, burst: float, *, shardable: bool = True) -> RateLimiter:
        if self.shards == 1 or not shardable:
            return RateLimiter(rate, burst, algorithm=self.algorithm, clock=self.clock, name=name,
                               reservation_ttl=self.reservation_ttl)
        # Only the requests limit is sharded, and a call takes one request: a limit cut below what the shards
        # hold uses fewer of them rather than refusing every call.
        return ShardedRateLimiter(rate, burst, shards=None if self.shards == "auto" else self.shards,
                                  algorithm=self.algorithm, clock=self.clock, name=name,
                                  reservation_ttl=self.reservation_ttl, min_shard_burst=ONE_CALL)

    async def take(self, limiters: Sequence[RateLimiter], amounts: Sequence[float],
                   key: str | None) -> tuple[list[Any] | None, float, int]:
        now = self.clock.monotonic()
        taken: list[Any] = []
        for index, (limiter, amount) in enumerate(zip(limiters, amounts, strict=True)):
            parts, wait = limiter._take_now(now, amount, key, 0.0)
            if parts is None:
                for done, made in zip(limiters, taken, strict=False):
                    done._untake(made)
                for other, other_amount in zip(limiters[index + 1:], amounts[index + 1:], strict=True):
                    wait = max(wait, other._take_wait(now, other_amount, key))
                return None, wait, index
            taken.append(parts)
        for limiter, amount in zip(limiters, amounts, strict=True):
            limiter.metrics.acquired += 1
            limiter.metrics.tokens += amount
        return taken, 0.0, -1

    async def aclose(self) -> None:
        return None


# -- one provider and model --------------------------------------------------------------------------

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
class Grant:
    """What one call holds: its parts of each limit, the tokens it reserved, and when it got them."""

    parts: list[Any]
    tokens: float
    #: On the backend's time scale, for telling which 429s belong to an overload already handled.
    granted_at: float


def _granted_at(parts: list[Any], fallback: float) -> float:
    for dim_parts in parts:
        for part in dim_parts:
            take = part[1] if isinstance(part, tuple) else part
            return float(take.time_to_act)
    return fallback


@dataclass
class _Used:
    at: float
    tokens: float


class LimitGroup:
    """The requests and tokens limits of one provider and model, with their adaptive state."""

    def __init__(self, provider: str, model: str, settings: RateLimitSettings, limits: LimitBackend,
                 clock: Clock, on_pause: Callable[[LimitGroup, float], Any] | None = None) -> None:
        self.provider = provider
        self.on_pause = on_pause
        self.model = model
        self.settings = settings
        self.limits = limits
        self.clock = clock
        now = clock.monotonic()
        self.started = now
        self.rate_limited = 0
        self.paused_total = 0.0
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

    @property
    def label(self) -> str:
        return f"{self.provider}/{self.model}"

    def _plan(self, planned: float, min_burst: float) -> tuple[float, float]:
        s = self.settings
        return plan_limit(planned, algorithm=self.limits.algorithm, safety=s.safety, burst_share=s.burst_share,
                          min_burst=min_burst)

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
                return Grant(parts, float(tokens), _granted_at(parts, self.clock.monotonic()))
            self._dims[blocked].saturated = True
        self._waiting += 1
        started = self.clock.monotonic()
        blocker = self._dims[0]
        try:
            async with self._queue:
                while True:
                    parts, wait, blocked = await self.limits.take(self._limiters, amounts, key)
                    if parts is not None:
                        metrics = blocker.limiter.metrics
                        metrics.waited += 1
                        metrics.wait_time += self.clock.monotonic() - started
                        return Grant(parts, float(tokens), _granted_at(parts, self.clock.monotonic()))
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

    async def succeeded(self, grant: Grant, response: ChatResponse | None) -> None:
        used = response.usage.total_tokens if response is not None else 0
        await self._settle(grant, used, success=True)
        if response is not None and response.headers:
            await self._headers(RateLimitHeaders.parse(response.headers, self.clock.now().timestamp()))
        await self._maybe_increase()

    async def failed(self, grant: Grant, error: StructuredError) -> None:
        usage = error.details.get("usage") if isinstance(error.details, dict) else None
        if isinstance(usage, Mapping):
            used = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
            await self._settle(grant, used, success=False)

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
        """A 429: pause every caller, and lower the binding limits once per overload."""
        self.rate_limited += 1
        settings = self.settings
        wait = error.retry_after if error.retry_after is not None else settings.default_pause
        await self.pause(min(max(wait, 0.0), settings.max_pause))
        if not settings.adaptive:
            return
        for dim in self._dims:
            view = await self._view(dim)
            # Calls granted before (or in the instant of) the last decrease belong to the overload it answered.
            if grant.granted_at > view.decreased_at and self._binding(dim, view):
                await self._decrease(dim, view)

    async def pause(self, seconds: float) -> None:
        if seconds <= 0:
            return
        self.paused_total += seconds
        for limiter in self._limiters:
            await limiter.pause(seconds)
        log.info("%s: pausing every call for %.2fs after a rate limit", self.label, seconds)
        if self.on_pause is not None:
            try:
                self.on_pause(self, seconds)
            except Exception:  # a display must never break the limiter
                log.exception("the rate limit pause listener failed")

    # -- adaptation --------------------------------------------------------------------------------

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
        new = max(before * self.settings.decrease_factor, view.used * SETTLE)
        new = max(min(new, before * SETTLE), self._floor(dim))
        if await self._commit(dim, view, planned=new, ceiling=view.used if view.used > 0 else before,
                              header=view.header, decreased=True):
            dim.decreases += 1
            log.info("%s: %s limit %.0f -> %.0f per minute after a 429", self.label, dim.name, before, new)

    async def _maybe_increase(self) -> None:
        """Increase after ``increase_interval`` s of success with callers waiting on this limit:
        ``probe_step`` x the current limit until the first 429 (slow start), then additively,
        ``increase_step`` x the level the provider accepted while below it, and ``settle_step`` x that
        level above it."""
        settings = self.settings
        if not settings.adaptive:
            return
        local_now = self.clock.monotonic()
        for dim in self._dims:
            if not dim.saturated or local_now - dim.changed_at < settings.increase_interval \
                    or local_now - dim.decreased_at < settings.increase_interval:
                continue
            view = await self._view(dim)
            if view.shared is not None and (view.now - view.changed_at < settings.increase_interval
                                            or view.now - view.decreased_at < settings.increase_interval):
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
            if view.shared is not None:
                dim.changed_at = local_now

    async def _headers(self, headers: RateLimitHeaders) -> None:
        pause = 0.0
        for dim in self._dims:
            limit, remaining, reset = headers.for_dimension(dim.name)
            if limit is not None and limit > 0 and limit != dim.header:
                view = await self._view(dim)
                if limit != view.header:
                    cap = min(limit, dim.configured) if dim.configured is not None else limit
                    log.info("%s: the provider reports a %s limit of %.0f per minute", self.label, dim.name, limit)
                    await self._commit(dim, view, planned=cap, ceiling=None, header=limit, decreased=False)
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
                "paused_total_s": round(self.paused_total, 3), "waiting": self._waiting, **dims}


def _response_of(result: Any) -> ChatResponse | None:
    """The provider response inside an attempt's result: the pipeline's attempts return ``(value, response)``."""
    if isinstance(result, ChatResponse):
        return result
    if isinstance(result, tuple):
        return next((item for item in result if isinstance(item, ChatResponse)), None)
    return None


class RateLimitPolicy:
    """A :class:`CallPolicy` that holds each call to its provider's and model's limits (put it innermost)."""

    def __init__(self, settings: RateLimitSettings | None = None, *, clock: Clock | None = None,
                 limits: LimitBackend | None = None) -> None:
        self.settings = settings or read_settings(RateLimitSettings)
        self.clock: Clock = clock or SystemClock()
        self.limits: LimitBackend = limits or make_limits(self.settings, self.clock)
        shards = self.limits.shards if isinstance(self.limits, MemoryLimits) else 1
        # Before any call: a limit its buckets cannot hold would fail every item with a confusing error.
        check_requests_limit(self.settings, shards if isinstance(shards, int) else 1, self.limits.algorithm)
        self._groups: dict[tuple[str, str], LimitGroup] = {}
        #: Told ``(group, seconds)`` whenever a 429 pauses every caller of a group, for the progress display.
        self.on_pause: Callable[[LimitGroup, float], Any] | None = None

    def __repr__(self) -> str:
        return f"RateLimitPolicy(backend={self.limits.name!r}, algorithm={self.limits.algorithm!r})"

    @classmethod
    def from_env(cls, *, rpm: float | None = None, tpm: float | None = None,
                 clock: Clock | None = None) -> RateLimitPolicy | None:
        """The policy ``RL_*`` asks for, with ``--rpm`` / ``--tpm`` overriding; ``None`` when RL_ENABLED=false."""
        settings = settings_from_env(rpm=rpm, tpm=tpm)
        return cls(settings, clock=clock) if settings.enabled else None

    def group(self, provider: str, model: str) -> LimitGroup:
        group = self._groups.get((provider, model))
        if group is None:
            group = self._groups[provider, model] = LimitGroup(provider, model, self.settings, self.limits,
                                                               self.clock, on_pause=self._paused)
        return group

    def _paused(self, group: LimitGroup, seconds: float) -> None:
        if self.on_pause is not None:
            self.on_pause(group, seconds)

    @property
    def groups(self) -> list[LimitGroup]:
        return list(self._groups.values())

    async def execute(self, call: Callable[[], Awaitable[T]], context: CallContext) -> T:
        group = self.group(context.provider, context.model)
        started = self.clock.monotonic()
        try:
            grant = await group.acquire(context.estimated_tokens, context.item_key)
        finally:
            # Queueing for a slot (a 429's pause included) is waiting, not trying: the retry deadline skips it.
            record_pause(self.clock.monotonic() - started)
        try:
            result = await call()
        except RateLimitError as error:
            await group.rate_limited_by(grant, error)
            raise
        except StructuredError as error:
            await group.failed(grant, error)
            raise
        await group.succeeded(grant, _response_of(result))
        return result

    async def snapshot(self) -> dict[str, Any]:
        """Every limit's state and metrics as JSON, for ``ratelimit status`` (published into the run's metrics)."""
        return {
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "backend": self.limits.name,
            "algorithm": self.limits.algorithm,
            "shards": self.settings.shards,
            "limits": {group.label: await group.snapshot() for group in self._groups.values()},
        }

    async def aclose(self) -> None:
        await self.limits.aclose()

    @contextlib.asynccontextmanager
    async def publishing(self, publish: Callable[[dict[str, Any]], Awaitable[None]],
                         interval: float | None = None) -> Any:
        """Publish :meth:`snapshot` every ``interval`` seconds while the block runs, and once at its end."""
        interval = self.settings.publish_interval if interval is None else interval

        async def loop() -> None:
            while True:
                await self.clock.sleep(interval)
                try:
                    await publish(await self.snapshot())
                except Exception:  # a failed publication must never stop the run
                    log.warning("could not publish the rate limiter's state", exc_info=True)

        task = asyncio.create_task(loop(), name="ratelimit-publisher")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await publish(await self.snapshot())


def settings_from_env(*, rpm: float | None = None, tpm: float | None = None) -> RateLimitSettings:
    """``RL_*`` from the environment, with explicit per-minute limits winning; a bad value is a usage error."""
    for flag, value in (("--rpm", rpm), ("--tpm", tpm)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigurationError(f"{flag} must be a positive number per minute, got {value!r}")
    settings = read_settings(RateLimitSettings)
    updates = {k: v for k, v in (("requests_per_minute", rpm), ("tokens_per_minute", tpm)) if v is not None}
    return settings.model_copy(update=updates) if updates else settings


def make_limits(settings: RateLimitSettings, clock: Clock) -> LimitBackend:
    """The backend ``settings`` ask for: this process's memory, or Redis shared by every worker."""
    if settings.backend == "redis":
        from flashcard_pipeline.resilience.rate_limiter_redis import RedisLimits

        return RedisLimits(settings.redis_url, prefix=settings.redis_prefix, algorithm=settings.algorithm,
                           reservation_ttl=settings.reservation_ttl)
    return MemoryLimits(algorithm=settings.algorithm, shards=settings.shards, clock=clock,
                        reservation_ttl=settings.reservation_ttl)


def rate_limit_policies(policy: CallPolicy | None) -> list[RateLimitPolicy]:
    """The rate-limit policies inside ``policy`` (itself, or nested in pipelines)."""
    if isinstance(policy, RateLimitPolicy):
        return [policy]
    if isinstance(policy, PolicyPipeline):
        return [found for inner in policy.policies for found in rate_limit_policies(inner)]
    return []
